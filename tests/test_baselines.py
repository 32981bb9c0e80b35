"""Tests for lad_jax/baselines.py: every baseline on hand-computed cases, gradients, robustness.

Expected numbers are hand computations from the formulas in shared/reference/baselines.md (cited
by section), written out in the comments next to each assertion.
"""

from __future__ import annotations

import functools
import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import baselines
from lad_jax import losses
from lad_jax import objectives
from lad_jax.losses import LossInputs

BASELINES = ("alpha_dpg", "clip_cov", "dapo", "drgrpo", "entadv", "flowrl", "grpo", "gspo", "kl_cov",
             "pg")
SPECS = {name: objectives.SPECS[name] for name in BASELINES}
KEY = jax.random.key(0)
# One entry per distinct function / aggregation: dapo and drgrpo are grpo with other defaults or
# aggregation, pg is alpha_dpg's REINFORCE with token-mean; the registry test covers them.
GENERIC = ["alpha_dpg", "clip_cov", "entadv", "flowrl", "grpo", "gspo", "kl_cov"]


def _inputs(logp, old_logp, adv, mask=None, **extra) -> LossInputs:
  logp = jnp.asarray(logp, jnp.float32)
  mask = jnp.ones(logp.shape) if mask is None else jnp.asarray(mask, jnp.float32)
  return LossInputs(logp=logp, old_logp=jnp.asarray(old_logp, jnp.float32),
                    advantages=jnp.asarray(adv, jnp.float32), mask=mask,
                    **{k: jnp.asarray(v, jnp.float32) for k, v in extra.items()})


def _random_inputs(seed, b=4, t=6, dtype=jnp.float32, scale=0.3) -> LossInputs:
  # numpy draws: eager jax.random would compile threefry for every new shape.
  rng = np.random.default_rng(seed)
  logp = -np.abs(rng.normal(size=(b, t)))
  lengths = np.arange(b) % t + 2
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
  arrays = dict(
      logp=logp, old_logp=logp + scale * rng.normal(size=(b, t)), advantages=rng.normal(size=(b,)),
      mask=mask, ref_logp=logp + scale * rng.normal(size=(b, t)),
      entropy=np.abs(rng.normal(size=(b, t))), log_z=rng.normal(size=(b,)))
  return LossInputs(**{k: jnp.asarray(v, jnp.float32 if k == "mask" else dtype)
                       for k, v in arrays.items()})


def _loss_fn(name, **hparams):
  """Scalar loss of a registered baseline as a function of (logp, log_z), for jax.grad."""
  spec = SPECS[name]

  def loss(logp, log_z, inputs, key, norm_length=None):
    per_token, metrics = spec.fn(inputs.replace(logp=logp, log_z=log_z), key=key,
                                 **{**spec.defaults, **hparams})
    return losses.aggregate(per_token, inputs.mask, spec.agg_mode, norm_length=norm_length), (
        per_token, metrics)

  return loss


def _run(fn, inputs, key=KEY, **hparams):
  """fn(inputs, key=key, **hparams) under one jit (cheaper than op-by-op dispatch)."""
  return jax.jit(lambda x, k: fn(x, key=k, **hparams))(inputs, key)


@functools.lru_cache(maxsize=None)
def _jitted_value_and_grad(name, hparams):
  return jax.jit(jax.value_and_grad(_loss_fn(name, **dict(hparams)), argnums=(0, 1), has_aux=True),
                 static_argnums=4)


def _value_and_grads(name, inputs, key=KEY, norm_length=None, **hparams):
  """(loss, per_token, metrics, d loss / d logp, d loss / d log_z), jitted once per signature."""
  fn = _jitted_value_and_grad(name, tuple(sorted(hparams.items())))
  (loss, (per_token, metrics)), (g_logp, g_log_z) = fn(inputs.logp, inputs.log_z, inputs, key,
                                                       norm_length)
  return loss, per_token, metrics, g_logp, g_log_z


# ------------------------------------------------------------------------------------------------
# GRPO / DAPO (ref §2.2, §3)
# ------------------------------------------------------------------------------------------------

# One sequence, six tokens with per-token advantages; eps 0.2 / 0.2, dual clip c = 3:
#   t0 A=+1 l=0.5    r=1.6487 > 1.2 -> clipped, loss -1.2
#   t1 A=+1 l=0.1    r=1.1052 in [0.8, 1.2] -> loss -1.1052, gradient -A r
#   t2 A=-1 l=-0.5   r=0.6065 < 0.8 -> clipped, loss max(0.6065, 0.8) = 0.8
#   t3 A=-1 l=log 4  r=4: clip1 = max(4, 1.2) = 4 > c = 3 -> dual clip, loss 3
#   t4 A=+1 l=log 4  r=4: max(-4, -1.2) = -1.2 clipped; no dual clip for A > 0
#   t5 A=-1 l=0.1    r=1.1052 -> loss 1.1052, gradient -A r
_L = np.array([[0.5, 0.1, -0.5, math.log(4.0), math.log(4.0), 0.1]])
_A = np.array([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0]])
_OLD = np.full((1, 6), -2.0)


def test_grpo_hand_computed_values_and_metrics():
  inputs = _inputs(_OLD + _L, _OLD, _A)
  per_token, metrics = _run(baselines.grpo, inputs)
  np.testing.assert_allclose(per_token, [[-1.2, -math.exp(0.1), 0.8, 3.0, -1.2, math.exp(0.1)]],
                             rtol=1e-5)
  # pg2 > pg1 on t0, t2, t4 -> 3/6; dual clip on t3 only -> 1/6 (verl's metric definitions).
  np.testing.assert_allclose(metrics["pg_clipfrac"], 0.5)
  np.testing.assert_allclose(metrics["pg_clipfrac_lower"], 1 / 6, rtol=1e-6)
  np.testing.assert_allclose(metrics["ppo_kl"], -_L.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_max"], 4.0, rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_min"], math.exp(-0.5), rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio_mean"], np.exp(_L).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl_loss"], 0.0)


def test_grpo_gradient_is_minus_a_r_on_unclipped_tokens_only():
  inputs = _inputs(_OLD + _L, _OLD, _A)
  _, _, _, grad, _ = _value_and_grads("grpo", inputs)
  # token-mean over 6 tokens: d/dlogp_t = -A_t r_t / 6 on t1, t5; clipped and dual-clipped: 0.
  r = np.exp(_L)
  want = np.where([[False, True, False, False, False, True]], -_A * r / 6, 0.0)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_clip_higher_is_asymmetric():
  # A=+1, r=1.25: 1.25 > 1 + 0.2 is clipped (loss -1.2) but 1.25 < 1 + 0.28 is not (loss -1.25).
  # A=-1, r=0.75: below 1 - 0.2 for both, loss 0.8; eps_high does not touch the lower side.
  inputs = _inputs(np.log([[1.25, 0.75]]), np.zeros((1, 2)), [[1.0, -1.0]])
  sym, m_sym = _run(baselines.grpo, inputs, eps_high=0.2)
  dapo, m_dapo = _run(objectives.get("dapo"), inputs)
  np.testing.assert_allclose(sym, [[-1.2, 0.8]], rtol=1e-6)
  np.testing.assert_allclose(dapo, [[-1.25, 0.8]], rtol=1e-6)
  np.testing.assert_allclose([m_sym["pg_clipfrac"], m_dapo["pg_clipfrac"]], [1.0, 0.5])


def test_dual_clip_only_for_negative_advantages():
  # r = e^3 = 20.09. A=-1: clip1 = 20.09; verl c=3 -> 3, DAPO c=10 -> 10. A=+1: max(-20.09, -1.2)
  # = -1.2 (DAPO: -1.28) whatever c is. c=None: no dual clip, 20.09.
  inputs = _inputs([[3.0, 3.0]], [[0.0, 0.0]], [[-1.0, 1.0]])
  np.testing.assert_allclose(_run(baselines.grpo, inputs)[0], [[3.0, -1.2]], rtol=1e-6)
  np.testing.assert_allclose(_run(objectives.get("dapo"), inputs)[0], [[10.0, -1.28]], rtol=1e-6)
  np.testing.assert_allclose(_run(baselines.grpo, inputs, clip_ratio_c=None)[0],
                             [[math.exp(3.0), -1.2]], rtol=1e-6)
  # The capped token has zero gradient (the loss is the constant -A c).
  _, _, _, grad, _ = _value_and_grads("grpo", inputs)
  np.testing.assert_array_equal(grad, 0.0)
  with pytest.raises(ValueError, match="must be > 1"):
    baselines.grpo(inputs, clip_ratio_c=0.5)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_grpo_kl_to_reference(estimator):
  # l_ref = ref - logp = [0.5, -1]: k1 = -l_ref, k2 = l_ref^2 / 2, k3 = e^l_ref - l_ref - 1 (§2.2).
  lr = np.array([[0.5, -1.0]])
  want = {"k1": -lr, "k2": 0.5 * lr ** 2, "k3": np.exp(lr) - lr - 1}[estimator]
  inputs = _inputs([[-1.0, -1.0]], [[-1.0, -1.0]], [[0.0, 0.0]], ref_logp=-1.0 + lr)
  per_token, metrics = _run(baselines.grpo, inputs, kl_coef=0.1, kl_estimator=estimator)
  # A = 0 makes the PPO part 0, so the loss is 0.1 * KL.
  np.testing.assert_allclose(per_token, 0.1 * want, rtol=1e-5)
  np.testing.assert_allclose(metrics["kl_loss"], want.mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="needs LossInputs.ref_logp"):
    baselines.grpo(inputs.replace(ref_logp=None), kl_coef=0.1)
  with pytest.raises(ValueError, match="valid: k1, k2, k3"):
    baselines.grpo(inputs, kl_estimator="k4")


# ------------------------------------------------------------------------------------------------
# GSPO (Zheng et al. 2025; verl compute_policy_loss_gspo, ref §2.4)
# ------------------------------------------------------------------------------------------------

# Four responses, T = 3, eps 3e-4 / 4e-4 (the defaults); l per token, s = e^(mean of valid l):
#   r0 A=+1 l=[0.3, -0.1, 0.1]  s=e^0.1  > 1.0004 -> clipped, loss -1.0004, no gradient
#   r1 A=-1 l=[-0.2, -0.4, pad] s=e^-0.3 < 0.9997 -> clipped, loss 0.9997, no gradient
#   r2 A=+1 l=[-0.1, -0.2, -0.3] s=e^-0.2: max(-s, -0.9997) = -s, unclipped
#   r3 A=-1 l=[0.5, pad, pad]   s=e^0.5: max(s, 1.0004) = s, unclipped
_GSPO_L = np.array([[0.3, -0.1, 0.1], [-0.2, -0.4, 0.0], [-0.1, -0.2, -0.3], [0.5, 0.0, 0.0]])
_GSPO_MASK = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], np.float32)
_GSPO_A = np.array([1.0, -1.0, 1.0, -1.0])
_GSPO_S = np.exp([0.1, -0.3, -0.2, 0.5])


def _gspo_case():
  old = np.full((4, 3), -1.5)
  logp = np.where(_GSPO_MASK > 0, old + _GSPO_L, np.nan)  # padding holds garbage
  return _inputs(logp, old, _GSPO_A, _GSPO_MASK)


def test_gspo_hand_computed_sequence_ratio_clipping_and_metrics():
  loss, per_token, metrics, grad, _ = _value_and_grads("gspo", _gspo_case())
  want = np.array([-1.0004, 0.9997, -_GSPO_S[2], _GSPO_S[3]])[:, None] * _GSPO_MASK
  np.testing.assert_allclose(per_token, want, rtol=1e-6)
  np.testing.assert_allclose(loss, want.sum(1) / _GSPO_MASK.sum(1) @ np.full(4, 0.25), rtol=1e-6)
  # Clipped responses: zero gradient; unclipped: -A s / (B |y|) on each valid token.
  n = _GSPO_MASK.sum(1)
  want_grad = np.where([[0], [0], [1], [1]], (-_GSPO_A * _GSPO_S / (4 * n))[:, None], 0.0)
  np.testing.assert_allclose(grad, want_grad * _GSPO_MASK, rtol=1e-5, atol=1e-8)
  valid = _GSPO_MASK > 0
  np.testing.assert_allclose(metrics["pg_clipfrac"], 5 / 9, rtol=1e-6)  # r0, r1's tokens
  assert float(metrics["pg_clipfrac_lower"]) == 0.0 and float(metrics["kl_loss"]) == 0.0
  np.testing.assert_allclose(metrics["ppo_kl"], -_GSPO_L[valid].mean(), rtol=1e-5)
  s_tokens = np.broadcast_to(_GSPO_S[:, None], (4, 3))[valid]
  np.testing.assert_allclose(metrics["ratio_mean"], s_tokens.mean(), rtol=1e-6)
  np.testing.assert_allclose([metrics["ratio_max"], metrics["ratio_min"]],
                             [_GSPO_S[3], _GSPO_S[1]], rtol=1e-6)


def _gspo_sequence_form(logp, inputs, eps_low, eps_high):
  """The GSPO paper's sequence objective: mean_i -min(s_i A_i, clip(s_i) A_i), s_i differentiated
  directly."""
  valid = inputs.mask > 0
  log_s = jnp.where(valid, logp - inputs.old_logp, 0.0).sum(1) / valid.sum(1)
  s, adv = jnp.exp(log_s), inputs.advantages
  return -jnp.minimum(s * adv, jnp.clip(s, 1 - eps_low, 1 + eps_high) * adv).mean()


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.1, 0.1)])
def test_gspo_token_form_gradient_equals_sequence_form(eps):
  inputs = _random_inputs(7, b=8, t=6, scale=0.6)
  loss, _, _, grad, _ = _value_and_grads("gspo", inputs, eps_low=eps[0], eps_high=eps[1])
  seq_loss, seq_grad = jax.jit(jax.value_and_grad(_gspo_sequence_form), static_argnums=(2, 3))(
      inputs.logp, inputs, *eps)
  np.testing.assert_allclose(loss, seq_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, seq_grad, rtol=1e-5, atol=1e-8)
  assert np.any(np.asarray(grad) != 0.0)


def test_gspo_equals_grpo_without_dual_clip_on_one_token_responses():
  # One valid token per response (at different positions): s_i = r_t, so GSPO is PPO-clip.
  l = np.array([0.5, 0.1, -0.5, 1e-4, -1e-4, 2.0])
  mask = np.zeros((6, 3), np.float32)
  mask[np.arange(6), [0, 2, 1, 0, 1, 2]] = 1.0
  old = np.full((6, 3), -1.0)
  adv = np.array([1.0, -1.0, -1.0, 1.0, -1.0, -1.0])
  inputs = _inputs(old + l[:, None] * mask, old, adv, mask)
  for eps_low, eps_high in ((3e-4, 4e-4), (0.2, 0.28)):
    _, per_token, _, grad, _ = _value_and_grads("gspo", inputs, eps_low=eps_low, eps_high=eps_high)
    ppo = lambda lp: baselines.ppo_clip_loss(
        lp, inputs.old_logp, jnp.broadcast_to(inputs.advantages[:, None], (6, 3)), inputs.mask,
        eps_low=eps_low, eps_high=eps_high, clip_ratio_c=None)[0] * mask
    # seq-mean-token-mean of one-token responses is the mean over the 6 valid tokens.
    want, want_grad = jax.jit(lambda lp: (ppo(lp), jax.grad(lambda x: ppo(x).sum() / 6)(lp)))(
        inputs.logp)
    np.testing.assert_allclose(per_token, want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# FlowRL (ref §5)
# ------------------------------------------------------------------------------------------------


def _flowrl_case():
  # Row 0: 3 tokens. mean logp -2, mean ref -2, A 0.1, log_z 0.3 -> delta = 0.3-2-1.5+2 = -1.2;
  #        sum l = 0.5 -> w = e^0.5; loss = e^0.5 * 1.44.
  # Row 1: 2 valid tokens (third is padding with garbage). mean logp -1, mean ref -1, A -0.2,
  #        log_z -0.1 -> delta = -0.1 - 1 + 3 + 1 = 2.9; sum l = 0 - 1 = -1 -> w = e^-1;
  #        loss = e^-1 * 8.41.
  return _inputs(
      logp=[[-1.0, -2.0, -3.0], [-0.5, -1.5, 50.0]],
      old_logp=[[-1.5, -2.0, -3.0], [-0.5, -0.5, -50.0]],
      adv=[0.1, -0.2],
      mask=[[1, 1, 1], [1, 1, 0]],
      ref_logp=[[-2.0, -2.0, -2.0], [-1.0, -1.0, 7.0]],
      log_z=[0.3, -0.1],
  )


def test_flowrl_hand_computed_delta_weight_and_gradients():
  inputs = _flowrl_case()
  w = np.array([math.exp(0.5), math.exp(-1.0)])
  delta = np.array([-1.2, 2.9])
  loss, per_token, metrics, g_logp, g_log_z = _value_and_grads("flowrl", inputs)
  # seq-mean-token-sum = mean over the 2 sequences of w * delta^2.
  np.testing.assert_allclose(loss, np.mean(w * delta ** 2), rtol=1e-5)
  np.testing.assert_allclose(per_token, [[w[0] * 1.44 / 3] * 3, [w[1] * 8.41 / 2] * 2 + [0.0]],
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["importance_weight"], w.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["tb_loss"], np.mean(w * delta ** 2), rtol=1e-5)
  # d/dlog_z = 2 w delta / B; d/dlogp_t = 2 w delta / (n_b B) on valid tokens (w is detached).
  np.testing.assert_allclose(g_log_z, w * delta, rtol=1e-5)
  np.testing.assert_allclose(g_logp, [[w[0] * delta[0] / 3] * 3, [w[1] * delta[1] / 2] * 2 + [0.0]],
                             rtol=1e-5)


def test_flowrl_weight_is_unclipped_sequence_ratio_with_overflow_guard():
  # sum l = 3 -> w = e^3 = 20.09, not clipped to 1 ± 0.2 (the authors' clip is computed, unused).
  # sum l = 100 -> log w clamped at 20 -> e^20; max_weight=10 reproduces verl's recipe cap.
  inputs = _inputs([[1.0, 2.0], [50.0, 50.0]], [[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0],
                   ref_logp=np.zeros((2, 2)), log_z=[0.0, 0.0])
  _, metrics = _run(baselines.flowrl, inputs)
  np.testing.assert_allclose(metrics["importance_weight"], (math.exp(3.0) + math.exp(20.0)) / 2,
                             rtol=1e-5)
  _, metrics = _run(baselines.flowrl, inputs, max_weight=10.0)
  np.testing.assert_allclose(metrics["importance_weight"], 10.0)
  with pytest.raises(ValueError, match="needs LossInputs.log_z"):
    baselines.flowrl(inputs.replace(log_z=None))


def test_flowrl_fully_masked_row_contributes_zero():
  inputs = _flowrl_case()
  full = losses.aggregate(_run(baselines.flowrl, inputs)[0], inputs.mask, "seq-mean-token-sum")
  masked = inputs.replace(mask=inputs.mask.at[1].set(0.0))
  per_token, _ = _run(baselines.flowrl, masked)
  np.testing.assert_array_equal(per_token[1], 0.0)
  # Row 0 alone: e^0.5 * 1.44, divided by B = 2.
  np.testing.assert_allclose(losses.aggregate(per_token, masked.mask, "seq-mean-token-sum"),
                             math.exp(0.5) * 1.44 / 2, rtol=1e-5)
  assert float(full) > 0


def test_log_z_head_matches_authors_torch_module():
  torch = pytest.importorskip("torch")

  class ProjZModule(torch.nn.Module):  # FlowRL fsdp_workers.py, ref §5
    def __init__(self, hidden_size, num_layers=3, dropout=0.1):
      super().__init__()
      layers = []
      for _ in range(num_layers - 1):
        layers += [torch.nn.Linear(hidden_size, hidden_size), torch.nn.GELU(),
                   torch.nn.LayerNorm(hidden_size), torch.nn.Dropout(dropout)]
      layers.append(torch.nn.Linear(hidden_size, 1))
      self.net = torch.nn.Sequential(*layers)

    def forward(self, x):
      return self.net(x)

  b, s, h = 3, 5, 8
  torch.manual_seed(0)
  ref = ProjZModule(h).eval()
  hidden = np.random.default_rng(0).normal(size=(b, s, h)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)
  # The authors' input: verl masked_mean over prompt positions of the last hidden states.
  pooled = (hidden * mask[..., None]).sum(1) / (mask.sum(1, keepdims=True) + 1e-8)
  with torch.no_grad():
    want = ref(torch.from_numpy(pooled))[:, 0].numpy()

  head = baselines.LogZHead()
  params = head.init(KEY, jnp.asarray(hidden), jnp.asarray(mask))["params"]
  dense = [m for m in ref.net if isinstance(m, torch.nn.Linear)]
  norms = [m for m in ref.net if isinstance(m, torch.nn.LayerNorm)]
  new = {}
  for i, m in enumerate(dense):
    new[f"Dense_{i}"] = {"kernel": jnp.asarray(m.weight.detach().numpy().T),
                         "bias": jnp.asarray(m.bias.detach().numpy())}
  for i, m in enumerate(norms):
    new[f"LayerNorm_{i}"] = {"scale": jnp.asarray(m.weight.detach().numpy()),
                             "bias": jnp.asarray(m.bias.detach().numpy())}
  assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(dict(params))
  got = head.apply({"params": new}, jnp.asarray(hidden), jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  # Padding does not leak into the pooled state; dropout is live only when not deterministic.
  garbage = hidden.copy()
  garbage[mask == 0] = 1e4
  np.testing.assert_allclose(head.apply({"params": new}, jnp.asarray(garbage), jnp.asarray(mask)),
                             got, rtol=1e-6)
  train = head.apply({"params": new}, jnp.asarray(hidden), jnp.asarray(mask), deterministic=False,
                     rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(train, got)


# ------------------------------------------------------------------------------------------------
# KL-Cov and Clip-Cov (ref §4)
# ------------------------------------------------------------------------------------------------

# One sequence of 10 tokens. A = +1 on t0..t4, -1 on t5..t9 (mean 0); logp below, mean -1.47.
# cov_t = A_t (logp_t + 1.47):
#   t0 1.37, t1 0.97, t2 0.47, t3 -0.53, t4 -1.53, t5 -1.27, t6 -1.07, t7 0.03, t8 1.03, t9 2.03.
_COV_LOGP = np.array([[-0.1, -0.5, -1.0, -2.0, -3.0, -0.2, -0.4, -1.5, -2.5, -3.5]])
_COV_A = np.array([[1.0] * 5 + [-1.0] * 5])
_COV_L = np.array([[0.1, -0.1, 0.05, 0.0, 0.1, -0.1, 0.1, 0.0, -0.5, 0.3]])


def test_kl_cov_penalises_the_top_k_cov_tokens():
  inputs = _inputs(_COV_LOGP, _COV_LOGP - _COV_L, _COV_A)
  # k = max(1, int(10 * 0.2)) = 2 -> the two largest cov: t9 (2.03) and t0 (1.37).
  loss, per_token, metrics, grad, _ = _value_and_grads("kl_cov", inputs, k_ratio=0.2, kl_coef=1.0)
  selected = np.zeros((1, 10), bool)
  selected[0, [0, 9]] = True
  r = np.exp(_COV_L)
  np.testing.assert_allclose(per_token, -_COV_A * r + np.where(selected, np.abs(_COV_L), 0.0),
                             rtol=1e-5, atol=1e-7)
  # No PPO clip anywhere: gradient -A r / 10, plus sign(l) / 10 on the penalised tokens.
  np.testing.assert_allclose(grad, (-_COV_A * r + np.where(selected, np.sign(_COV_L), 0.0)) / 10,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["kl_cov_frac"], 0.2)
  np.testing.assert_allclose(metrics["ppo_kl_abs"], np.abs(_COV_L).mean(), rtol=1e-5)


def test_kl_cov_counts_and_centres_over_valid_tokens_only():
  # Mask t9: 9 valid tokens, means A 1/9 and logp -11.2/9 = -1.2444. cov t0 = (8/9)(1.1444)
  # = 1.017, t8 = (-10/9)(-1.2556) = 1.395, the rest lower; k = max(1, int(9 * 0.2)) = 1 -> t8 only.
  mask = np.ones((1, 10))
  mask[0, 9] = 0
  inputs = _inputs(_COV_LOGP, _COV_LOGP - _COV_L, _COV_A, mask=mask)
  per_token, metrics = _run(baselines.kl_cov, inputs, k_ratio=0.2)
  penalty = np.asarray(per_token) - (-_COV_A * np.exp(_COV_L))
  np.testing.assert_allclose(penalty[0, :9], np.where(np.arange(9) == 8, 0.5, 0.0), atol=1e-6)
  np.testing.assert_allclose(metrics["kl_cov_frac"], 1 / 9, rtol=1e-6)


def _clip_cov_case():
  # Same cov as above. Candidates need 1 < cov < 5: t0 (1.37), t8 (1.03), t9 (2.03).
  # t8 has A = -1 and l = -0.5 -> r = 0.607: PPO-clipped for eps 0.2 (pg2 = 0.8 > pg1 = 0.607),
  # not for the originals' eps 1.0 (range [0, 2]).
  return _inputs(_COV_LOGP, _COV_LOGP - _COV_L, _COV_A)


def test_clip_cov_selects_exactly_clip_num_candidates_with_zero_gradient():
  inputs = _clip_cov_case()
  # clip_num = max(1, int(0.2 * 10)) = 2 of the 3 candidates {t0, t8, t9}.
  loss, per_token, metrics, grad, _ = _value_and_grads("clip_cov", inputs, KEY, clip_cov_ratio=0.2)
  zeroed = np.asarray(per_token[0]) == 0.0
  assert zeroed.sum() == 2 and set(np.flatnonzero(zeroed)) <= {0, 8, 9}
  np.testing.assert_array_equal(np.asarray(grad[0])[zeroed], 0.0)
  # Elsewhere max(pg1, pg2) = -A r (eps 1 clips nothing here), gradient -A r / 10.
  r = np.exp(_COV_L[0])
  np.testing.assert_allclose(np.asarray(per_token[0])[~zeroed], (-_COV_A[0] * r)[~zeroed],
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad[0])[~zeroed], (-_COV_A[0] * r / 10)[~zeroed],
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["pg_clipfrac"], 0.2)
  np.testing.assert_allclose(metrics["clip_cov_candidates"], 0.3)
  # Deterministic for a key.
  again, _ = _run(baselines.clip_cov, inputs, KEY, clip_cov_ratio=0.2)
  np.testing.assert_array_equal(again, per_token)


def test_clip_cov_excludes_ppo_clipped_tokens_and_caps_at_candidates():
  inputs = _clip_cov_case()
  # eps 0.2: t8 is PPO-clipped -> candidates {t0, t9}; ratio 1.0 -> clip_num 10 >= 2 -> both.
  per_token, metrics = _run(baselines.clip_cov, inputs, KEY, clip_cov_ratio=1.0, eps_low=0.2,
                              eps_high=0.2)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(per_token[0]) == 0.0), [0, 9])
  # t8 keeps its clipped PPO loss max(0.607, 0.8) = 0.8.
  np.testing.assert_allclose(per_token[0, 8], 0.8, rtol=1e-6)
  # Default ratio 2e-4: clip_num = max(1, int(2e-4 * 10)) = 1 token.
  per_token, _ = _run(baselines.clip_cov, inputs, KEY)
  assert int(np.sum(np.asarray(per_token) == 0.0)) == 1
  with pytest.raises(ValueError, match="pass key="):
    baselines.clip_cov(inputs)


def test_clip_cov_selection_is_uniform_over_candidates():
  inputs = _clip_cov_case()
  keys = jax.random.split(jax.random.key(7), 2000)
  def zeroed(key):
    return baselines.clip_cov(inputs, key=key, clip_cov_ratio=0.2)[0]

  per_token = jax.jit(jax.vmap(zeroed))(keys)
  freq = np.mean(np.asarray(per_token[:, 0]) == 0.0, axis=0)
  # torch.randperm picks 2 of 3 uniformly: each candidate with probability 2/3 (binomial std over
  # 2000 draws: 0.011, so 0.04 is ~4 std); non-candidates never.
  np.testing.assert_allclose(freq[[0, 8, 9]], 2 / 3, atol=0.04)
  np.testing.assert_array_equal(np.delete(freq, [0, 8, 9]), 0.0)


# ------------------------------------------------------------------------------------------------
# EntAdv (ref §6)
# ------------------------------------------------------------------------------------------------


def test_entadv_hand_computed():
  # A + min(0.4 H, |A| / 2): A=1,H=1 -> 1 + min(0.4, 0.5) = 1.4; A=-1,H=2 -> -1 + min(0.8, 0.5)
  # = -0.5;
  # A=0,H=5 -> 0; A=0.2,H=3 -> 0.2 + min(1.2, 0.1) = 0.3.
  adv = jnp.array([[1.0, -1.0, 0.0, 0.2]])
  ent = jnp.array([[1.0, 2.0, 5.0, 3.0]])
  np.testing.assert_allclose(baselines.entadv_shaping(adv, ent), [[1.4, -0.5, 0.0, 0.3]], rtol=1e-6)
  # The loss is GRPO's on the shaped advantages.
  inputs = _inputs(np.full((1, 4), -1.0), np.full((1, 4), -1.1), adv, entropy=ent)
  shaped = jnp.array([[1.4, -0.5, 0.0, 0.3]])
  np.testing.assert_allclose(_run(baselines.entadv, inputs)[0],
                             _run(baselines.grpo, inputs.replace(advantages=shaped))[0], rtol=1e-6)
  with pytest.raises(ValueError, match="needs LossInputs.entropy"):
    baselines.entadv(inputs.replace(entropy=None))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    # No subnormals: XLA on CPU flushes them to 0, so the input would not be what numpy sees.
    st.lists(st.floats(-10, 10, width=32, allow_subnormal=False), min_size=4, max_size=4),
    st.lists(st.floats(0, 20, width=32, allow_subnormal=False), min_size=4, max_size=4),
    st.floats(1.01, 5.0),
)
def test_entadv_bonus_nonnegative_never_flips_sign(adv, ent, kappa):
  adv = np.asarray([adv], np.float32)
  shaped = np.asarray(baselines.entadv_shaping(jnp.asarray(adv), jnp.asarray([ent]), kappa=kappa))
  assert np.all(shaped >= adv)
  assert np.all(np.sign(shaped[adv != 0]) == np.sign(adv[adv != 0]))
  np.testing.assert_array_equal(shaped[adv == 0], 0.0)


# ------------------------------------------------------------------------------------------------
# REINFORCE: alpha-DPG and pg (ref §7)
# ------------------------------------------------------------------------------------------------


def test_alpha_dpg_objective_is_plain_reinforce():
  inputs = _inputs([[-1.0, -2.0, 9.0], [-0.5, -0.5, -0.5]], np.zeros((2, 3)), [2.0, -1.0],
                   mask=[[1, 1, 0], [1, 1, 1]])
  loss, per_token, _, grad, _ = _value_and_grads("alpha_dpg", inputs, norm_length=4)
  # mean_seq(-A sum_t logp) / MAX_TOKENS, MAX_TOKENS = 4: (-2 * -3 + 1 * -1.5) / (2 * 4) = 0.5625.
  np.testing.assert_allclose(loss, 0.5625, rtol=1e-6)
  # No ratio, no clip: gradient -A / (B * MAX_TOKENS) on valid tokens; old_logp plays no part.
  np.testing.assert_allclose(grad, [[-0.25, -0.25, 0.0], [0.125, 0.125, 0.125]], rtol=1e-6)
  # pg: the same per-token loss, token-mean.
  np.testing.assert_array_equal(_run(baselines.reinforce, inputs)[0], per_token)


# ------------------------------------------------------------------------------------------------
# Every objective: registry, robustness, jit/vmap, masking, sharding
# ------------------------------------------------------------------------------------------------


def test_registered_entries():
  names = objectives.names()
  for name in SPECS:
    assert name in names
    assert SPECS[name].fn.__module__ == baselines.__name__
  assert objectives.get("dapo").agg_mode == "token-mean"
  assert objectives.get("drgrpo").agg_mode == "seq-mean-token-sum-norm"
  assert SPECS["drgrpo"].advantage_estimator == "drgrpo"
  assert SPECS["alpha_dpg"].advantage_estimator == "alpha_dpg"
  assert SPECS["flowrl"].agg_mode == "seq-mean-token-sum"
  assert SPECS["gspo"].agg_mode == "seq-mean-token-mean"
  assert SPECS["gspo"].advantage_estimator == "grpo" and SPECS["gspo"].kl_to_ref_coef == "kl_coef"
  gspo = objectives.get("gspo")
  assert gspo.needs == () and (gspo.hparam("eps_low"), gspo.hparam("eps_high")) == (3e-4, 4e-4)
  with pytest.raises(ValueError, match="accepts: eps_low, eps_high"):
    objectives.get("grpo", clip_ratio=0.2)
  with pytest.raises(ValueError, match="needs LossInputs.entropy"):
    objectives.get("entadv")(_random_inputs(0).replace(entropy=None))
  # Bound hyperparameters reach the function: dapo's eps_high 0.28 vs grpo's 0.2 (hand case of
  # test_clip_higher_is_asymmetric: r = 1.25, A = +1 -> -1.25 vs -1.2).
  inputs = _inputs(np.log([[1.25]]), np.zeros((1, 1)), [[1.0]])
  loss, _ = jax.jit(lambda x: objectives.get("grpo", eps_high=0.28).loss(x))(inputs)
  np.testing.assert_allclose(loss, -1.25, rtol=1e-6)


def _extreme_inputs(dtype):
  # |l| up to 1e4 (beyond any exp), advantages up to ~30, one fully masked row, one partial row.
  rng = np.random.default_rng(3)
  b, t = 4, 5
  mask = np.ones((b, t), np.float32)
  mask[3] = 0.0
  mask[0, 3:] = 0.0
  arrays = dict(
      logp=rng.uniform(-1e4, 0.0, size=(b, t)), old_logp=rng.uniform(-1e4, 0.0, size=(b, t)),
      advantages=10.0 * rng.normal(size=(b,)), ref_logp=rng.uniform(-1e4, 0.0, size=(b, t)),
      entropy=100.0 * rng.uniform(size=(b, t)), log_z=1e3 * rng.normal(size=(b,)))
  return LossInputs(mask=jnp.asarray(mask), **{k: jnp.asarray(v, dtype) for k, v in arrays.items()})


@pytest.mark.parametrize("name", GENERIC)
def test_no_nan_or_inf_for_extreme_inputs(name):
  for dtype in (jnp.float32, jnp.bfloat16):
    inputs = _extreme_inputs(dtype)
    loss, per_token, metrics, g_logp, g_log_z = _value_and_grads(name, inputs)
    assert per_token.dtype == jnp.float32
    for x in (loss, per_token, g_logp, g_log_z, *metrics.values()):
      assert np.all(np.isfinite(np.asarray(x, np.float32))), name
    # The fully masked row gets no loss and no gradient.
    np.testing.assert_array_equal(per_token[3], 0.0)
    np.testing.assert_array_equal(np.asarray(g_logp[3], np.float32), 0.0)
  # A fully masked batch: loss 0, finite metrics.
  empty = inputs.replace(mask=jnp.zeros_like(inputs.mask))
  loss, _, metrics, g_logp, _ = _value_and_grads(name, empty)
  assert float(loss) == 0.0 and np.all(np.asarray(g_logp, np.float32) == 0.0)
  assert all(np.isfinite(np.asarray(v)) for v in metrics.values())


@pytest.mark.parametrize("name", GENERIC)
def test_jit_no_retrace_and_batching(name):
  # (The name must not contain "vmap.": chex detects transformed functions by their repr.)
  spec = SPECS[name]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss_fn(inputs, key):
    per_token, metrics = spec.fn(inputs, key=key)
    return losses.aggregate(per_token, inputs.mask, spec.agg_mode), per_token, metrics

  try:
    a, b = _random_inputs(1), _random_inputs(2)
    _, per_token_a, _ = loss_fn(a, KEY)
    _, per_token_b, _ = loss_fn(b, KEY)  # same shapes: a second trace would raise
  finally:
    chex.clear_trace_counter()
  stacked = jax.tree_util.tree_map(lambda x, y: jnp.stack([x, y]), a, b)
  per_token, _ = jax.jit(jax.vmap(lambda x: spec.fn(x, key=KEY)))(stacked)
  np.testing.assert_allclose(per_token[0], per_token_a, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(per_token[1], per_token_b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", GENERIC)
def test_masked_equals_sliced(name):
  inputs = _random_inputs(4, b=3, t=5)
  inputs = inputs.replace(mask=jnp.ones_like(inputs.mask))
  # Three padding columns holding garbage (inf, NaN, huge values) that the mask must hide.
  garbage = jnp.array([jnp.inf, jnp.nan, -1e30])

  def pad(x):
    if x is None or x.ndim != 2:
      return x
    return jnp.concatenate([x, jnp.broadcast_to(garbage, (x.shape[0], 3)).astype(x.dtype)], axis=1)

  padded = jax.tree_util.tree_map(pad, inputs)
  padded = padded.replace(mask=jnp.concatenate([inputs.mask, jnp.zeros((3, 3))], axis=1))
  # Clip-Cov draws random priorities per position; with clip_num >= candidates it is deterministic.
  hparams = {"clip_cov_ratio": 1.0, "clip_cov_lb": -1.0} if name == "clip_cov" else {}
  loss, per_token, metrics, g_logp, g_log_z = _value_and_grads(name, inputs, norm_length=5,
                                                               **hparams)
  loss_p, per_token_p, metrics_p, g_logp_p, g_log_z_p = _value_and_grads(
      name, padded, norm_length=5, **hparams)
  np.testing.assert_allclose(loss_p, loss, rtol=1e-6)
  np.testing.assert_allclose(per_token_p[:, :5], per_token, rtol=1e-6)
  np.testing.assert_allclose(g_logp_p[:, :5], g_logp, rtol=1e-6, atol=1e-8)
  np.testing.assert_array_equal(g_logp_p[:, 5:], 0.0)
  np.testing.assert_allclose(g_log_z_p, g_log_z, rtol=1e-6)
  for k in metrics:
    np.testing.assert_allclose(metrics_p[k], metrics[k], rtol=1e-6, err_msg=k)


# The objectives with a cross-token selection (top_k over the flattened batch); the others are
# elementwise ops and row reductions that XLA partitions without help.
@pytest.mark.parametrize("name,axis_type", [("kl_cov", "Auto"), ("clip_cov", "Explicit")])
def test_sharded_equals_unsharded(name, axis_type):
  spec = SPECS[name]
  inputs = _random_inputs(6, b=8, t=4)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = jax.device_put(inputs, sharding)
  fn = jax.jit(lambda x: losses.aggregate(spec.fn(x, key=KEY, **(
      {"clip_cov_ratio": 0.5} if name == "clip_cov" else {}))[0], x.mask, spec.agg_mode))
  np.testing.assert_allclose(fn(sharded), fn(inputs), rtol=1e-6)
