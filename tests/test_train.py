"""Tests for lad_jax/train.py: the pure train step (golden step against a hand-written loss), its
jit (sharded, donated, no retrace), micro-batching, non-finite updates, bf16 master weights.

Compile time dominates on CPU, so every model is a 1-layer toy, T = 16, and every jit is built
with `xla_backend_optimization_level=0` (about 3x faster to compile; same numerics).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lad_jax import losses
from lad_jax import objectives
from lad_jax import scoring
from lad_jax import sharding
from lad_jax import train
from lad_jax.models import Decoder
from lad_jax.models import logprobs
from lad_jax.models import testing

FAST = {"xla_backend_optimization_level": 0}
N, L, P = 8, 16, 6  # rows, total length, prompt bucket


def _cfg(**overrides):
  fields = dict(num_layers=1, hidden_size=32, intermediate_size=32, num_heads=4, num_kv_heads=2,
                head_dim=8, vocab_size=64)
  fields.update(overrides)
  return testing.tiny_config("llama", **fields)


def _mesh(data=1, fsdp=1, tensor=1):
  n = data * fsdp * tensor
  return sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=jax.devices()[:n])


def _batch(cfg, *, n=N, seed=0, token_advantages=False):
  """Left-padded prompts, responses of varying length (some rows end early), like the sampler."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (n, L)).astype(np.int32)
  prompt_len = rng.integers(2, P + 1, n)
  resp_len = rng.integers(1, L - P + 1, n)
  cols = np.arange(L)[None, :]
  prompt_mask = (cols < P) & (cols >= P - prompt_len[:, None])
  loss_mask = (cols >= P) & (cols < P + resp_len[:, None])
  mask = prompt_mask | loss_mask
  tokens = np.where(mask, tokens, 0).astype(np.int32)
  old_logp = np.where(loss_mask, -np.log(cfg.vocab_size) + 0.1 * rng.normal(size=(n, L)), 0.0)
  ref_logp = np.where(loss_mask, -np.log(cfg.vocab_size) + 0.1 * rng.normal(size=(n, L)), 0.0)
  adv_shape = (n, L) if token_advantages else (n,)
  return dict(tokens=tokens, mask=mask, loss_mask=loss_mask,
              old_logp=old_logp.astype(np.float32), ref_logp=ref_logp.astype(np.float32),
              advantages=rng.normal(size=adv_shape).astype(np.float32),
              prompt_mask=prompt_mask, rewards=rng.normal(size=(n,)))  # extra key: ignored


@pytest.fixture(autouse=True)
def _fresh_trace_counter():
  chex.clear_trace_counter()  # max_traces counts per test, not across parametrized cases


def _tb(batch, prompt_length=0):
  """A dict of host arrays as the train step's TrainBatch (extra keys dropped)."""
  fields = ("tokens", "mask", "loss_mask", "old_logp", "advantages", "ref_logp", "prompt_mask")
  return train.TrainBatch(prompt_length=prompt_length,
                          **{k: batch[k] for k in fields if k in batch})


def _jit_step(cfg, objective, tx, mesh, shardings, **spec_fields):
  max_traces = spec_fields.pop("max_traces", None)
  spec = train.StepSpec(model_cfg=cfg, objective=objective, tx=tx, **spec_fields)
  return train.jit_train_step(spec, mesh=mesh, state_shardings=shardings,
                              compiler_options=FAST, max_traces=max_traces)


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _clone(tree):
  """A copy in the same shardings (the step donates its input state)."""
  return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), tree)


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def fp32_setup():
  cfg = _cfg()
  mesh = _mesh(data=2, fsdp=2)
  tx = train.make_optimizer(lr=1e-2, warmup_steps=4, weight_decay=0.01, grad_clip=1.0)
  state, shardings = train.create_train_state(Decoder(cfg), tx, jax.random.key(0), mesh=mesh,
                                              with_logz_head=True, compiler_options=FAST)
  return cfg, mesh, tx, state, shardings


@pytest.mark.parametrize("name", objectives.names())
def test_every_objective_trains(fp32_setup, name):
  cfg, mesh, tx, state0, shardings = fp32_setup
  state = _clone(state0)
  params0 = _host(state0.params)
  # lad_theoretical scores a full action axis; per-token advantages make it run on sequences.
  batch = _batch(cfg, token_advantages=name == "lad_theoretical")
  if name == "grpo":  # old_logp recomputed at the current params: ratio 1, ppo_kl 0
    logp_fn = scoring.make_logp_fn(cfg, mesh=mesh)
    batch["old_logp"] = np.asarray(logp_fn(state.params["model"], batch["tokens"], batch["mask"]))
  step = _jit_step(cfg, objectives.get(name), tx, mesh, shardings, max_traces=1)
  first = state
  for i in range(2):
    state, metrics = step(state, _tb(batch))
    for k, v in metrics.items():
      assert np.isfinite(v), (name, i, k, v)
    assert metrics["grad_norm"] > 0, name
    if name == "grpo" and i == 0:
      assert abs(float(metrics["ppo_kl"])) < 1e-6
      np.testing.assert_allclose(metrics["ratio_mean"], 1.0, atol=1e-5)
    # lr of step k is lr * (k + 1) / warmup (make_schedule).
    np.testing.assert_allclose(metrics["lr"], 1e-2 * (i + 1) / 4, rtol=1e-6)
  assert metrics["tokens"] == batch["loss_mask"].sum()
  assert int(state.step) == 2 and metrics["skipped"] == 0  # max_traces=1: no retrace
  assert all(x.is_deleted() for x in jax.tree.leaves(first.params))  # state donated
  changed = _max_diff(params0["model"], _host(state.params["model"]))
  assert changed > 1e-4, name
  if name == "flowrl":
    assert _max_diff(params0["logz_head"], _host(state.params["logz_head"])) > 1e-4


def _reference_grads(cfg, objective, params, batch):
  """Gradient of the plain, unbatched loss: forward_logprobs -> objective -> aggregate."""
  model = Decoder(cfg)

  def loss(p):
    logp = logprobs.forward_logprobs(model, p["model"], batch["tokens"], mask_BT=batch["mask"])
    inputs = losses.LossInputs(logp=logp, old_logp=batch["old_logp"],
                               advantages=batch["advantages"], mask=batch["loss_mask"])
    return objective.loss(inputs)[0]

  return jax.jit(jax.grad(loss))({"model": params["model"]})


@pytest.fixture(scope="module")
def sgd_setup():
  cfg = _cfg()
  mesh = _mesh(data=2, fsdp=2)
  tx = optax.sgd(1.0)
  state, shardings = train.create_train_state(Decoder(cfg), tx, jax.random.key(0), mesh=mesh,
                                              compiler_options=FAST)
  return cfg, mesh, tx, state, shardings


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_equal_one_batch(sgd_setup, agg_mode):
  """4 accumulated micro-batches give the gradient of the one large batch (jax.grad of the plain
  loss). With SGD(lr=1), params_0 - params_1 is the gradient, so scale errors (e.g. dividing by
  each micro-batch's own denominator) cannot hide behind Adam's normalisation."""
  cfg, mesh, tx, state, shardings = sgd_setup
  objective = objectives.get("lad", divergence="js", eta=0.5, agg_mode=agg_mode)
  batch = _batch(cfg, n=16, seed=3)
  params0 = _host(state.params)
  step = _jit_step(cfg, objective, tx, mesh, shardings, micro_batches=4)
  new_state, metrics = step(_clone(state), _tb(batch))
  grads = jax.tree.map(lambda a, b: a - b, params0, _host(new_state.params))
  ref = _host(_reference_grads(cfg, objective, params0, batch))
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref))
  assert scale > 1e-3  # a real gradient
  assert _max_diff(grads, ref) < 1e-6
  assert metrics["tokens"] == batch["loss_mask"].sum()


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_prompt_length_skips_only_unscored_columns(sgd_setup, chunk_size):
  """prompt_length=P (no LM head on the P prompt columns) gives the same update and metrics as
  scoring every column, and logp_fn the same response log-probs with 0 on the prompt."""
  cfg, mesh, tx, state, shardings = sgd_setup
  objective = objectives.get("lad", divergence="js", eta=0.5)
  batch = _batch(cfg, seed=5)
  # One compile per prompt length: more than two traces fail.
  step = _jit_step(cfg, objective, tx, mesh, shardings, chunk_size=chunk_size, max_traces=2)
  full_state, full_m = step(_clone(state), _tb(batch))
  resp_state, resp_m = step(_clone(state), _tb(batch, P))
  assert _max_diff(_host(full_state.params), _host(resp_state.params)) < 1e-6
  for k in full_m:
    np.testing.assert_allclose(resp_m[k], full_m[k], rtol=1e-5, atol=1e-7, err_msg=k)
  logp_fn = scoring.make_logp_fn(cfg, mesh=mesh, chunk_size=chunk_size)
  args = (state.params["model"], batch["tokens"], batch["mask"])
  full = np.asarray(logp_fn(*args))
  resp = np.asarray(logp_fn(*args, prompt_length=P))
  np.testing.assert_allclose(resp[:, P:], full[:, P:], rtol=1e-6, atol=1e-6)
  assert np.all(resp[:, :P] == 0.0) and np.all(full[:, 1:P] != 0.0)
  with pytest.raises(ValueError, match="loss_mask is True in a column < prompt_length"):
    step(state, _tb(batch, P + 1))  # column P holds response tokens
  for bad in (-1, L, 2.0):
    with pytest.raises(ValueError, match="prompt_length must be an int"):
      step(state, _tb(batch, bad))


def test_sharded_and_remat_equal_unsharded():
  cfg = _cfg()
  model = Decoder(cfg)
  # Adam's first step is lr * g / (|g| + eps): with eps 1e-8 a gradient of 1e-9, whose value
  # depends on the reduction order, would move a weight by ~lr/10; eps 1e-3 makes it smooth.
  tx = train.make_optimizer(lr=1e-2, eps=1e-3, weight_decay=0.1, grad_clip=1.0)
  objective = objectives.get("lad")
  batch = _tb(_batch(cfg, seed=5))
  results = []
  params0 = None
  for dims in ((1, 1, 1), (2, 2, 2)):
    mesh = _mesh(*dims)
    state, shardings = train.create_train_state(model, tx, jax.random.key(0), mesh=mesh,
                                                params=params0, compiler_options=FAST)
    params0 = _host(state.params["model"]) if params0 is None else params0
    # Remat changes what the backward pass recomputes, never the result.
    step_cfg = cfg.replace(remat_policy="full") if dims == (2, 2, 2) else cfg
    step = _jit_step(step_cfg, objective, tx, mesh, shardings)
    state, metrics = step(state, batch)
    if dims == (2, 2, 2):  # really sharded: FSDP on embed, tensor on heads
      spec = state.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec
      assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    results.append((_host(state.params), _host(metrics)))
  (p1, m1), (p8, m8) = results
  assert _max_diff(p1, params0) > 1e-4
  assert _max_diff(p1, p8) < 1e-6
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_bf16_params_keep_fp32_master_and_moments():
  cfg = _cfg(param_dtype="bfloat16", dtype="bfloat16")
  mesh = _mesh()  # 1 device: bf16 compiles slowly on CPU, and sharding is tested above
  tx = train.make_optimizer(lr=1e-3)
  state, shardings = train.create_train_state(Decoder(cfg), tx, jax.random.key(0), mesh=mesh,
                                              compiler_options=FAST)
  assert isinstance(state.opt_state, train.MasterWeightsState)
  master0 = _host(state.opt_state.master)
  step = _jit_step(cfg, objectives.get("grpo"), tx, mesh, shardings)
  state, metrics = step(state, _tb(_batch(cfg, seed=7)))
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
  params, opt = state.params, state.opt_state
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(opt.master))
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  adam = [x for x in jax.tree.leaves(opt.inner, is_leaf=is_adam) if is_adam(x)]
  assert len(adam) == 1
  moments = jax.tree.leaves((adam[0].mu, adam[0].nu))
  assert len(moments) == 2 * len(jax.tree.leaves(params))
  assert all(x.dtype == jnp.float32 for x in moments)
  assert all(jnp.array_equal(p, m.astype(jnp.bfloat16))
             for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(opt.master)))
  # Adam's first step moves every weight by ~lr = 1e-3: visible in the master copy.
  assert _max_diff(master0, _host(opt.master)) > 5e-4


def test_bad_batches_raise_clear_errors(fp32_setup):
  cfg, mesh, tx, _, shardings = fp32_setup
  batch = _batch(cfg)
  step = _jit_step(cfg, objectives.get("flowrl"), tx, mesh, shardings)
  with pytest.raises(ValueError, match="prompt_mask"):
    step(None, _tb({k: v for k, v in batch.items() if k != "prompt_mask"}))
  with pytest.raises(ValueError, match="ref_logp"):
    step(None, _tb({k: v for k, v in batch.items() if k != "ref_logp"}))
  with pytest.raises(ValueError, match="old_logp has shape"):
    step(None, _tb(dict(batch, old_logp=batch["old_logp"][:, 1:])))
  step4 = _jit_step(cfg, objectives.get("grpo"), tx, mesh, shardings, micro_batches=4)
  with pytest.raises(ValueError, match="multiple of"):
    step4(None, _tb(batch))  # 8 rows, 4 micro-batches x 4 batch devices
  with pytest.raises(ValueError, match="valid schedules"):
    train.make_optimizer(lr=1.0, schedule="linear")
  with pytest.raises(ValueError, match="total_steps"):
    train.make_optimizer(lr=1.0, schedule="cosine")


def _hand_lad_js_loss(params, cfg, batch, *, eta):
  """LAD-JS (paper Eq. 8, DESIGN §2 table), written out by hand: full logits from the decoder,
  log_softmax, token t scored from position t - 1, token-mean over the response mask.

  per token: 1/2 [r (l - u) - (r + e^u)(softplus(l - u) - log 2)], l = logp - old_logp,
  r = e^l, u = A / eta.
  """
  logits = Decoder(cfg).apply({"params": params["model"]}, batch["tokens"],
                              mask_BT=batch["mask"]).logits.astype(jnp.float32)
  logp_all = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  logp = jnp.take_along_axis(logp_all, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
  logp = jnp.pad(logp, ((0, 0), (1, 0)))
  l = logp - batch["old_logp"]
  u = (batch["advantages"] / eta)[:, None]
  r = jnp.exp(l)
  per_token = 0.5 * (r * (l - u) - (r + jnp.exp(u)) * (jax.nn.softplus(l - u) - jnp.log(2.0)))
  mask = batch["loss_mask"]
  return jnp.sum(jnp.where(mask, per_token, 0.0)) / jnp.sum(mask)


def test_golden_step_equals_hand_written_loss_and_grad():
  """`train.train_step`, called directly (no jit, no mesh), against the hand-written loss: the
  loss value, and with SGD(lr) the new params = params - lr * grad of the hand-written loss."""
  cfg = _cfg()
  lr, eta = 0.5, 0.5
  tx = optax.sgd(lr)
  state, _ = train.create_train_state(Decoder(cfg), tx, jax.random.key(0), mesh=_mesh(),
                                      compiler_options=FAST)
  batch = _batch(cfg, seed=11)
  spec = train.StepSpec(model_cfg=cfg, objective=objectives.get("lad", divergence="js", eta=eta),
                        tx=tx)
  params0 = _host(state.params)
  want_loss, want_grad = jax.value_and_grad(_hand_lad_js_loss)(params0, cfg, batch, eta=eta)
  new_state, metrics = train.train_step(state, _tb(batch), spec=spec)
  # Golden value: the hand-written loss of this seed (fixed inputs, threefry init).
  np.testing.assert_allclose(want_loss, 2.128535, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
  want_params = jax.tree.map(lambda p, g: p - lr * g, params0, want_grad)
  assert _max_diff(_host(new_state.params), want_params) < 1e-6
  assert _max_diff(_host(new_state.params), params0) > 1e-3  # a real step
  assert int(new_state.step) == 1 and metrics["tokens"] == batch["loss_mask"].sum()


def _adam_moments(opt_state):
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  return [(x.mu, x.nu) for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]


def test_nonfinite_updates_are_skipped_and_counted(sgd_setup):
  """A NaN loss (NaN advantages) leaves params and moments unchanged and counts the streak; a
  finite batch afterwards applies and resets it."""
  cfg, mesh, _, _, _ = sgd_setup
  tx = train.make_optimizer(lr=1e-2)
  state, shardings = train.create_train_state(Decoder(cfg), tx, jax.random.key(0), mesh=mesh,
                                              compiler_options=FAST)
  step = _jit_step(cfg, objectives.get("lad"), tx, mesh, shardings, max_traces=1)
  good = _batch(cfg, seed=2)
  bad = dict(good, advantages=np.full_like(good["advantages"], np.nan))
  start = _host((state.params, state.opt_state))
  for streak in (1, 2):
    state, metrics = step(state, _tb(bad))
    assert not np.isfinite(metrics["loss"])
    assert metrics["skipped"] == 1 and metrics["nonfinite_streak"] == streak
    jax.tree.map(np.testing.assert_array_equal,
                 _host((state.params, _adam_moments(state.opt_state))),
                 (start[0], _adam_moments(start[1])))
  state, metrics = step(state, _tb(good))
  assert metrics["skipped"] == 0 and metrics["nonfinite_streak"] == 0
  assert _max_diff(_host(state.params), start[0]) > 1e-3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_host(state)))


def test_cosine_schedule():
  sched = train.make_schedule(lr=1.0, warmup_steps=2, schedule="cosine", total_steps=6,
                              final_lr_ratio=0.1)
  got = [float(sched(k)) for k in range(8)]
  # Warmup (k+1)/2, then 0.1 + 0.9 * (1 + cos(pi * (k - 2) / 4)) / 2, held at 0.1.
  want = [0.5, 1.0] + [0.1 + 0.45 * (1 + np.cos(np.pi * j / 4)) for j in range(4)] + [0.1, 0.1]
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("scale", [0.0, 0.1, 10.0])
def test_clip_by_global_norm_equals_optax(scale):
  """Our one-factor clip vs optax's per-element division: below, above and at zero norm."""
  k1, k2 = jax.random.split(jax.random.key(0))
  grads = {"a": scale * jax.random.normal(k1, (3, 4)), "b": [scale * jax.random.normal(k2, (5,))]}
  ours, state = train.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  want, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  assert state == train.clip_by_global_norm(1.0).init(grads) == optax.EmptyState()
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=0), ours, want)
  norm = float(optax.global_norm(ours))
  assert np.isfinite(norm) and norm <= 1.0 + 1e-6


# ------------------------------------------------------------------------------------------------
# Rollout correction: IS weights on the per-token loss (lad_jax/rollout_correction.py)
# ------------------------------------------------------------------------------------------------


def _grads_and_loss(cfg, tx, params, batch, name="lad"):
  spec = train.StepSpec(model_cfg=cfg, objective=objectives.get(name), tx=tx)
  grads, loss, _, _ = train.accumulate_gradients(params, batch, jax.random.key(1), spec=spec)
  return _host(grads), float(loss)


@pytest.mark.parametrize("name", ["lad", "grpo"])
def test_is_weights_off_equals_no_weights_and_scale_the_loss(fp32_setup, name):
  cfg, _, tx, state, _ = fp32_setup
  b = _batch(cfg)
  tb = _tb(b, prompt_length=P)
  g0, l0 = _grads_and_loss(cfg, tx, state.params, tb, name)
  ones = jnp.asarray(b["loss_mask"], jnp.float32)
  g1, l1 = _grads_and_loss(cfg, tx, state.params, tb.replace(is_weights=ones), name)
  assert l1 == l0 and _max_diff(g1, g0) == 0.0  # weight 1 is today's loss, bit for bit
  g2, l2 = _grads_and_loss(cfg, tx, state.params, tb.replace(is_weights=2.0 * ones), name)
  np.testing.assert_allclose(l2, 2.0 * l0, rtol=1e-6)  # token-mean: every term doubled
  assert _max_diff(g2, jax.tree.map(lambda g: 2.0 * g, g0)) < 1e-6


def test_rejected_tokens_get_no_gradient(fp32_setup):
  """Mask mode: tokens out of the loss mask (weight 0) do not move the loss or the gradient,
  whatever their old log-probs are; kept tokens do."""
  cfg, _, tx, state, _ = fp32_setup
  b = _batch(cfg, seed=3)
  rng = np.random.default_rng(0)
  rejected = b["loss_mask"] & (rng.random(b["loss_mask"].shape) < 0.3)
  kept = b["loss_mask"] & ~rejected
  w = np.where(kept, rng.uniform(0.5, 2.0, kept.shape), 0.0).astype(np.float32)
  tb = _tb(b, prompt_length=P).replace(loss_mask=kept, is_weights=w)
  wild = tb.replace(old_logp=np.where(rejected, 5.0, b["old_logp"]).astype(np.float32))
  g, loss = _grads_and_loss(cfg, tx, state.params, tb)
  g_wild, loss_wild = _grads_and_loss(cfg, tx, state.params, wild)
  assert loss == loss_wild and _max_diff(g, g_wild) == 0.0
  moved = tb.replace(old_logp=np.where(kept, b["old_logp"] + 0.5, b["old_logp"]).astype(
      np.float32))
  assert _max_diff(g, _grads_and_loss(cfg, tx, state.params, moved)[0]) > 1e-6
