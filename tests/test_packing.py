"""Tests for lad_jax/packing.py and the packed paths of scoring / train / rollout / rl.

The claim under test: a trimmed, packed batch is the same computation as the padded one. The
planner places every token once, segment ids and positions restart per sequence, shapes come
from a bounded set; packed scores equal unpacked scores; the train step's loss and gradient are
the same packed or not, for every objective and aggregation mode, with and without
micro-batches; behaviour scoring in micro-batch chunks equals one call.

Tiny fp32 models (1 layer), jits with `xla_backend_optimization_level=0` (as tests/test_train.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lad_jax import losses
from lad_jax import objectives
from lad_jax import packing
from lad_jax import rl
from lad_jax import rollout
from lad_jax import scoring
from lad_jax import sharding
from lad_jax import train
from lad_jax.models import Decoder
from lad_jax.models import testing

FAST = {"xla_backend_optimization_level": 0}
N, P, R = 8, 6, 24  # rows, prompt bucket, max response width (untrimmed)


def _cfg():
  return testing.tiny_config("llama", num_layers=1, hidden_size=32, intermediate_size=32,
                             num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=64)


def _mesh(n=1):
  return sharding.make_mesh(data=n, fsdp=1, tensor=1, devices=jax.devices()[:n])


def _rollout(n=N, seed=0, max_response=R - 6):
  """Left-padded prompts (>= 1 token), right-padded responses of varied length (some empty)."""
  rng = np.random.default_rng(seed)
  prompt_len = rng.integers(1, P + 1, n)
  resp_len = rng.integers(0, max_response + 1, n)
  prompt_mask = np.arange(P)[None] >= P - prompt_len[:, None]
  response_mask = np.arange(R)[None] < resp_len[:, None]
  prompt = np.where(prompt_mask, rng.integers(1, 64, (n, P)), 0).astype(np.int32)
  response = np.where(response_mask, rng.integers(1, 64, (n, R)), 0).astype(np.int32)
  logp = np.where(response_mask, -np.log(64) + 0.1 * rng.normal(size=(n, R)), 0.0)
  objects = np.empty(n, dtype=object)
  return rollout.Rollout(
      prompt_tokens=prompt, prompt_mask=prompt_mask, response_tokens=response,
      response_mask=response_mask, logp=logp.astype(np.float32),
      truncated=np.zeros(n, bool), lengths=resp_len.astype(np.int32),
      rewards=rng.normal(size=n).astype(np.float32), correct=np.zeros(n, bool),
      texts=objects, reasons=objects, answers=objects, prompt_index=np.arange(n))


# ------------------------------------------------------------------------------------------------
# The planner
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mini,micro,multiple", [(1, 1, 1), (2, 2, 1), (1, 4, 2)])
def test_plan_places_every_token_once(mini, micro, multiple):
  r = _rollout(n=16, seed=1)
  settings = packing.PackSettings(mini_batches=mini, micro_batches=micro, length_bucket=4,
                                  row_multiple=multiple)
  plan = packing.plan(r.prompt_mask, r.response_mask, settings)
  tokens_NL = np.concatenate([r.prompt_tokens, r.response_tokens[:, :plan.response_width]], 1)
  packed = packing.pack_tokens(plan, tokens_NL)
  valid = plan.valid_NL
  assert valid.sum() == r.prompt_mask.sum() + r.response_mask.sum()  # trimming drops no token
  flat = plan.flat_NL[valid]
  assert len(np.unique(flat)) == flat.size  # every token its own slot
  np.testing.assert_array_equal(packed.tokens_RC.reshape(-1)[flat], tokens_NL[valid])
  seg, pos = packed.segment_ids_RC.reshape(-1), packed.positions_RC.reshape(-1)
  assert (seg > 0).sum() == valid.sum()  # nothing else is marked as a token
  c = plan.capacity
  for n in range(16):
    f = plan.flat_NL[n][valid[n]]
    np.testing.assert_array_equal(pos[f], np.arange(f.size))  # positions restart at 0
    assert len(set(seg[f])) == 1 and len(set(f // c)) == 1  # one segment, one row
    np.testing.assert_array_equal(np.diff(f), 1)  # contiguous, in order
  # Segments of one packed row are distinct sequences.
  owners = {}
  for n in range(16):
    f = plan.flat_NL[n][valid[n]]
    if f.size:
      key = (int(f[0] // c), int(seg[f[0]]))
      assert key not in owners
      owners[key] = n
  assert plan.unit_rows % multiple == 0
  assert packed.tokens_RC.shape == (mini * micro * plan.unit_rows, c)
  _check_index_follows_micro_batches(packed, tokens_NL, valid, mini * micro)
  again = packing.plan(r.prompt_mask, r.response_mask, settings)  # deterministic
  for a, b in zip(plan, again):
    np.testing.assert_array_equal(a, b)


def _check_index_follows_micro_batches(packed, tokens_NL, valid, units):
  """index_NL of micro-batch unit u addresses unit u's own packed rows (packing.to_units)."""
  tok_U = np.asarray(packing.to_units(packed.tokens_RC, packed.micro_batches, units))
  idx_U = np.asarray(packing.to_units(packed.index_NL, packed.micro_batches, units))
  want_U = np.asarray(packing.to_units(tokens_NL, packed.micro_batches, units))
  ok_U = np.asarray(packing.to_units(valid, packed.micro_batches, units))
  for u in range(units):
    flat = np.concatenate([tok_U[u].reshape(-1), [-1]])
    got = flat[idx_U[u]]
    np.testing.assert_array_equal(np.where(ok_U[u], got, -1), np.where(ok_U[u], want_U[u], -1))
    assert np.all(got[~ok_U[u]] == -1)  # padding reads the pad slot


def test_shapes_come_from_a_bounded_set():
  """Trimmed widths are multiples of the bucket; rows per micro-batch 4 significant bits."""
  shapes = set()
  for seed in range(40):
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(np.log(60), 0.8, 64).astype(int), 256)
    response_mask = np.arange(256)[None] < lengths[:, None]
    prompt_mask = np.ones((64, 8), bool)
    plan = packing.plan(prompt_mask, response_mask,
                        packing.PackSettings(micro_batches=2, length_bucket=32))
    assert plan.response_width % 32 == 0 or plan.response_width == 256
    shapes.add((plan.response_width, plan.capacity, plan.unit_rows))
  assert len({s[0] for s in shapes}) <= 256 // 32
  for rows in range(1, 2000):
    b = packing.bucket_rows(rows, 2)
    assert rows <= b <= rows * 17 / 16 + 2 and b % 2 == 0
  assert len({packing.bucket_rows(x) for x in range(1, 1025)}) <= 16 * 6 + 16


def test_rows_that_do_not_pack_stay_unpacked_but_trimmed():
  """Full prompts, short responses: one sequence per row saves nothing (and would run the LM
  head on the prompts): the batch is only trimmed."""
  r = _rollout(seed=4, max_response=3)
  r = r._replace(prompt_mask=np.ones_like(r.prompt_mask), prompt_tokens=r.prompt_tokens + 1)
  batch = rollout.to_train_batch(r, mesh=_mesh(), pack=packing.PackSettings(length_bucket=4))
  assert batch.packed is None and batch.tokens.shape == (N, P + 4)


def test_pack_settings_reject_bad_values():
  with pytest.raises(ValueError, match="micro_batches must be >= 1"):
    packing.PackSettings(micro_batches=0)
  with pytest.raises(ValueError, match="capacity must be >= 0"):
    packing.PackSettings(capacity=-1)


# ------------------------------------------------------------------------------------------------
# Scores and behaviour scoring
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
  cfg = _cfg()
  mesh = _mesh()
  params = {"model": testing.random_params(cfg, seed=0),
            "logz_head": scoring.init_logz_head(jax.random.key(1), cfg.hidden_size)}
  return cfg, mesh, params


def _batches(r, mesh, *, micro=1, mini=1, multiple=1):
  """(unpacked untrimmed, packed trimmed) TrainBatches of one rollout."""
  full = rollout.to_train_batch(r, mesh=mesh, with_prompt_mask=True)
  pack = packing.PackSettings(mini_batches=mini, micro_batches=micro, length_bucket=4,
                              row_multiple=multiple)
  packed = rollout.to_train_batch(r, mesh=mesh, with_prompt_mask=True, pack=pack)
  assert packed.packed is not None
  return full, packed


def test_packed_scores_equal_unpacked(setup):
  """logp, entropy, log Z and their VJPs (any objective's gradient goes through these)."""
  cfg, mesh, params = setup
  full, packed = _batches(_rollout(), mesh)
  width = packed.tokens.shape[1]
  assert width < full.tokens.shape[1]  # trimmed
  mask = np.asarray(full.loss_mask)
  rng = np.random.default_rng(5)
  ct_logp, ct_z = rng.normal(size=mask.shape), rng.normal(size=(N,))

  def run(batch):
    def f(p):
      kw = dict(cfg=cfg, prompt_length=P, with_entropy=True, prompt_mask_NL=batch.prompt_mask,
                chunk_size=5)
      s = (scoring.score(p, batch.tokens, batch.mask, **kw) if batch.packed is None
           else scoring.score_packed(p, batch.packed, **kw))
      logp = jnp.pad(s.logp, ((0, 0), (0, mask.shape[1] - s.logp.shape[1])))
      ent = jnp.pad(s.entropy, ((0, 0), (0, mask.shape[1] - s.logp.shape[1])))
      obj = jnp.sum(jnp.where(mask, logp * ct_logp, 0.0)) + jnp.sum(s.log_z * ct_z)
      return obj, (jnp.where(mask, logp, 0.0), jnp.where(mask, ent, 0.0), s.log_z)
    return jax.jit(jax.value_and_grad(f, has_aux=True), compiler_options=FAST)(params)

  (v0, aux0), g0 = run(full)
  (v1, aux1), g1 = run(packed)
  for a, b in zip(aux0, aux1):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_behaviour_scoring_chunked_and_packed_equal_one_call(setup):
  cfg, mesh, params = setup
  r = _rollout(n=32, seed=2)
  full, packed = _batches(r, mesh, micro=2, mini=2)
  mask = np.asarray(full.loss_mask)
  one = scoring.make_logp_fn(cfg, mesh=mesh, chunk_size=8)
  chunked = scoring.make_logp_fn(cfg, mesh=mesh, chunk_size=8, row_chunks=4)
  ref = np.asarray(one(params["model"], full.tokens, full.mask, prompt_length=P))
  got = np.asarray(chunked(params["model"], full.tokens, full.mask, prompt_length=P))
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  got_packed = np.asarray(chunked(params["model"], packed.tokens, packed.mask, prompt_length=P,
                                  packed=packed.packed))
  width = got_packed.shape[1]
  np.testing.assert_allclose(np.where(mask[:, :width], got_packed, 0.0),
                             np.where(mask, ref, 0.0)[:, :width], rtol=1e-5, atol=1e-5)
  assert not mask[:, width:].any()
  # Scored through rl.score_behaviour, the batch keeps its packed rows.
  out, _ = rl.score_behaviour(packed, logp_fn=chunked, params=params["model"],
                              ref_params=params["model"], recompute_old_logp=True)
  np.testing.assert_allclose(np.asarray(out.ref_logp), got_packed, rtol=1e-6, atol=1e-6)
  assert out.packed is packed.packed


# ------------------------------------------------------------------------------------------------
# The train step
# ------------------------------------------------------------------------------------------------


def _step_fn(cfg, objective, micro):
  spec = train.StepSpec(model_cfg=cfg, objective=objective, tx=optax.sgd(1.0),
                        micro_batches=micro, norm_length=float(R))

  def fn(params, batch, key):
    grads, loss, metrics, ent = train.accumulate_gradients(params, batch, key, spec=spec)
    return grads, loss, metrics, ent
  return jax.jit(fn, compiler_options=FAST)


def _with_inputs(batch, r, name):
  """ref_logp (and per-token advantages for lad_theoretical) from the rollout, cut to L."""
  rng = np.random.default_rng(7)
  width = batch.tokens.shape[1] - P
  ref = np.where(r.response_mask, r.logp + 0.05 * rng.normal(size=r.logp.shape), 0.0)
  ref_NL = np.concatenate([np.zeros((N, P)), ref[:, :width]], 1).astype(np.float32)
  adv = rng.normal(size=(N,)).astype(np.float32)
  if name == "lad_theoretical":  # scores a full action axis; per-token advantages: sequences
    adv_full = np.concatenate([np.zeros((N, P)), rng.normal(size=(N, R))], 1)
    adv = adv_full[:, :P + width].astype(np.float32)
  return batch.replace(ref_logp=jnp.asarray(ref_NL), advantages=jnp.asarray(adv))


# Every objective (default aggregation) and every aggregation mode at micro_batches=2; a few at 1
# (no split: the other code path). flowrl brings log Z, entadv the entropy, both ref_logp.
CASES = ([(name, None, 2) for name in objectives.names()]
         + [("lad", mode, 2) for mode in losses.AGG_MODES if mode != "token-mean"]
         + [("lad", "token-mean", 1), ("lad", "seq-mean-token-sum-norm", 1), ("flowrl", None, 1),
            ("entadv", "seq-mean-token-sum", 2)])


@pytest.mark.parametrize("name,mode,micro", CASES)
def test_packed_train_step_equals_unpacked(setup, name, mode, micro):
  """accumulate_gradients (the step's loss and exact micro-batch gradient) on the same rollouts:
  padded to R (norm_length R) vs trimmed and packed."""
  cfg, mesh, params = setup
  r = _rollout(seed=3)
  full, packed = _batches(r, mesh, micro=micro)
  full, packed = _with_inputs(full, r, name), _with_inputs(packed, r, name)
  objective = objectives.get(name, agg_mode=mode)
  step = _step_fn(cfg, objective, micro)
  key = jax.random.key(4)
  g0, loss0, m0, e0 = step(params, full, key)
  g1, loss1, m1, e1 = step(params, packed, key)
  assert np.isfinite(float(loss0)) and abs(float(loss0)) > 0
  np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(e1), float(e0), rtol=1e-5)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0))
  assert scale > 0
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * scale)
  for k in m0:
    np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_jitted_step_and_mini_batches_on_a_sharded_mesh():
  """rl.update over 2 mini-batches of a packed batch on 2 devices equals the unpacked update."""
  cfg = _cfg()
  mesh = _mesh(2)
  tx = optax.sgd(0.5)
  state, shardings = train.create_train_state(Decoder(cfg), tx, jax.random.key(0), mesh=mesh,
                                              compiler_options=FAST)
  r = _rollout(n=32, seed=6)
  full, packed = _batches(r, mesh, micro=2, mini=2, multiple=2)
  adv = jnp.asarray(np.random.default_rng(1).normal(size=(32,)).astype(np.float32))
  spec = train.StepSpec(model_cfg=cfg, objective=objectives.get("grpo"), tx=tx, micro_batches=2)
  step = train.jit_train_step(spec, mesh=mesh, state_shardings=shardings, compiler_options=FAST)
  clone = lambda t: jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), t)
  out = []
  for batch in (full, packed):
    s, m = rl.update(clone(state), batch.replace(advantages=adv), train_step=step,
                     mini_batches=2, mesh=mesh)
    out.append((jax.device_get(s.params), m))
  for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out[1][1]["loss"], out[0][1]["loss"], rtol=1e-5)


def test_bad_packed_batches_raise(setup):
  cfg, mesh, params = setup
  _, packed = _batches(_rollout(), mesh, micro=2)
  spec = train.StepSpec(model_cfg=cfg, objective=objectives.get("pg"), tx=optax.sgd(1.0),
                        micro_batches=1)
  with pytest.raises(ValueError, match="PackSettings\\(micro_batches=1\\)"):
    train.check_batch(packed, spec, has_logz_head=False)
  bad = dataclasses.replace(packed.packed, index_NL=packed.packed.index_NL[:, :-1])
  with pytest.raises(ValueError, match="index_NL has shape"):
    train.check_batch(packed.replace(packed=bad), dataclasses.replace(spec, micro_batches=2),
                      has_logz_head=False)


@pytest.mark.parametrize("key,value,message", [
    ("pack_length_bucket", 0, "pack_length_bucket=0 is not valid"),
    ("pack_capacity", -1, "pack_capacity=-1 is not valid")])
def test_config_keys_are_validated(key, value, message):
  from lad_jax import config_utils  # pylint: disable=g-import-not-at-top
  config = config_utils.base_config()
  config.train[key] = value
  with pytest.raises(config_utils.ConfigError, match=message):
    config_utils.validate(config)


def test_max_sequences_caps_the_sequences_of_a_row():
  """No packed row holds more sequences than the attention path handles (cuDNN's segments)."""
  lengths = np.full(12, 3)
  row, offset = packing.first_fit_decreasing(lengths, capacity=40, max_items=4)
  assert np.bincount(row).max() == 4 and np.bincount(row).size == 3
  for r in range(3):
    starts = np.sort(offset[row == r])
    np.testing.assert_array_equal(starts, [0, 3, 6, 9])
  row, _ = packing.first_fit_decreasing(lengths, capacity=40)
  assert np.bincount(row).max() == 12  # no limit: one row
  with pytest.raises(Exception, match="max_sequences"):
    packing.PackSettings(max_sequences=-1)
