"""Tests of the shared helpers in lad_jax.losses: aggregation, the log-ratio clamp, ratio metrics,
KL estimators. (The registry is tested in test_objectives.py.)"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import losses

# A 2 x 4 batch: row 0 has 3 valid tokens (1, 2, 3), row 1 has 1 (5); 4, 6, 7, 8 are padding.
PER_TOKEN = jnp.asarray([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
MASK = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]], jnp.float32)
# Worked by hand from verl's agg_loss definitions (core_algos.py; shared/reference/baselines.md):
HAND = {
    "token-mean": (1 + 2 + 3 + 5) / 4,  # 2.75: sum / valid tokens
    "seq-mean-token-mean": ((1 + 2 + 3) / 3 + 5 / 1) / 2,  # 3.5: mean of per-row means
    "seq-mean-token-sum": ((1 + 2 + 3) + 5) / 2,  # 5.5: mean of per-row sums
    "seq-mean-token-sum-norm": (1 + 2 + 3 + 5) / (2 * 4),  # 1.375: sum / (B * T)
}


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_aggregate_matches_hand_values(mode):
  np.testing.assert_allclose(losses.aggregate(PER_TOKEN, MASK, mode), HAND[mode], rtol=1e-7)
  # A bool mask means the same as a {0, 1} float mask.
  np.testing.assert_allclose(losses.aggregate(PER_TOKEN, MASK > 0, mode), HAND[mode], rtol=1e-7)


def test_norm_length_overrides_padded_length():
  # Dr.GRPO divides by a constant generation budget, not the padded T: 11 / (2 * 10).
  got = losses.aggregate(PER_TOKEN, MASK, "seq-mean-token-sum-norm", norm_length=10)
  np.testing.assert_allclose(got, 11 / 20, rtol=1e-7)


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_micro_batches_combine_exactly(mode):
  rng = np.random.default_rng(0)
  per_token = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(6, 5)) < 0.6, jnp.float32).at[0].set(0.0)
  whole = losses.aggregate(per_token, mask, mode)
  # Unequal micro-batches, one of them starting with a fully masked row.
  parts = [losses.aggregate_parts(per_token[s], mask[s], mode) for s in (slice(0, 1), slice(1, 4),
                                                                        slice(4, 6))]
  total = sum(p[0] for p in parts)
  denominator = sum(p[1] for p in parts)
  np.testing.assert_allclose(total / denominator, whole, rtol=1e-6)


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_masked_equals_sliced(mode):
  rng = np.random.default_rng(1)
  lengths = [5, 2, 4]
  rows = [rng.normal(size=n) for n in lengths]
  t = 6
  padded = np.full((3, t), 1e9)  # garbage on padding must not matter
  mask = np.zeros((3, t), np.float32)
  for i, row in enumerate(rows):
    padded[i, :len(row)] = row
    mask[i, :len(row)] = 1
  sums = np.asarray([r.sum() for r in rows])
  want = {
      "token-mean": sums.sum() / sum(lengths),
      "seq-mean-token-mean": np.mean([r.mean() for r in rows]),
      "seq-mean-token-sum": sums.mean(),
      "seq-mean-token-sum-norm": sums.sum() / (3 * t),
  }[mode]
  got = losses.aggregate(jnp.asarray(padded, jnp.float32), jnp.asarray(mask), mode)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_masked_tokens_get_exactly_zero_gradient(mode):
  # inf and NaN on padding stay out of the value, and the cotangent reaching masked entries is 0.
  # (An objective whose own derivative is inf on padding would still turn that 0 into NaN: the
  # `where` trap; objectives keep their padding finite, e.g. lad.practical_per_token's mask.)
  per_token = PER_TOKEN.at[0, 3].set(jnp.inf).at[1, 2].set(jnp.nan)
  value, grad = jax.value_and_grad(lambda p: losses.aggregate(p, MASK, mode))(per_token)
  np.testing.assert_allclose(value, HAND[mode], rtol=1e-7)
  np.testing.assert_array_equal(grad[MASK == 0], 0.0)
  # Valid entries get the mode's weight: 1/4 (token-mean), 1/(B len_b), 1/B, 1/(B T).
  weights = {
      "token-mean": [[1 / 4] * 3, [1 / 4]],
      "seq-mean-token-mean": [[1 / 6] * 3, [1 / 2]],
      "seq-mean-token-sum": [[1 / 2] * 3, [1 / 2]],
      "seq-mean-token-sum-norm": [[1 / 8] * 3, [1 / 8]],
  }[mode]
  np.testing.assert_allclose(grad[0, :3], weights[0], rtol=1e-7)
  np.testing.assert_allclose(grad[1, :1], weights[1], rtol=1e-7)
  # Through a finite objective the zeros stay exact zeros on the objective's inputs too.
  x_grad = jax.grad(lambda x: losses.aggregate(jnp.square(x) + jnp.sin(x), MASK, mode))(PER_TOKEN)
  np.testing.assert_array_equal(x_grad[MASK == 0], 0.0)


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_fully_masked_rows_and_batches_give_zero_not_nan(mode):
  empty = jnp.zeros_like(MASK)
  value, grad = jax.value_and_grad(lambda p: losses.aggregate(p, empty, mode))(PER_TOKEN)
  assert float(value) == 0.0
  np.testing.assert_array_equal(grad, 0.0)
  # One fully masked row counts as a row with loss 0 in the per-sequence modes (B stays 2).
  one_row = MASK.at[1].set(0.0)
  want = {
      "token-mean": 6 / 3,
      "seq-mean-token-mean": (2 + 0) / 2,
      "seq-mean-token-sum": (6 + 0) / 2,
      "seq-mean-token-sum-norm": 6 / 8,
  }[mode]
  np.testing.assert_allclose(losses.aggregate(PER_TOKEN, one_row, mode), want, rtol=1e-7)


def test_safe_divide_and_masked_mean():
  quotient = losses.safe_divide(jnp.asarray([1.0, 2.0]), jnp.asarray([0.0, 4.0]))
  np.testing.assert_array_equal(quotient, [0.0, 0.5])
  grad = jax.grad(lambda n: losses.safe_divide(n, jnp.float32(0.0)))(jnp.float32(3.0))
  assert float(grad) == 0.0
  np.testing.assert_allclose(losses.masked_mean(PER_TOKEN, MASK), 11 / 4, rtol=1e-7)
  np.testing.assert_allclose(losses.masked_mean(PER_TOKEN, MASK, axis=-1), [2.0, 5.0], rtol=1e-7)
  assert float(losses.masked_mean(PER_TOKEN, jnp.zeros_like(MASK))) == 0.0


def test_token_advantages_broadcast_and_shape_checks():
  adv = jnp.asarray([1.0, -2.0])
  np.testing.assert_array_equal(losses.token_advantages(adv, (2, 3)),
                                [[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
  per_token = jnp.arange(6.0).reshape(2, 3)
  assert losses.token_advantages(per_token, (2, 3)) is per_token
  with pytest.raises(AssertionError):
    losses.token_advantages(jnp.ones(3), (2, 3))
  with pytest.raises(AssertionError):
    losses.token_advantages(jnp.ones((2, 4)), (2, 3))


def test_kl_penalty_estimators_match_hand_values():
  # Schulman's estimators of KL(pi || ref) with l = ref_logp - logp (verl's kl_penalty):
  # logp = -1, ref = -2: l = -1, k1 = 1, k2 = 1/2, k3 = e^-1 + 1 - 1 = e^-1.
  # logp = -2, ref = -1: l = 1, k1 = -1, k2 = 1/2, k3 = e - 2.
  logp = jnp.asarray([[-1.0, -2.0]])
  ref = jnp.asarray([[-2.0, -1.0]])
  np.testing.assert_allclose(losses.kl_penalty(logp, ref, estimator="k1"), [[1.0, -1.0]], rtol=1e-7)
  np.testing.assert_allclose(losses.kl_penalty(logp, ref, estimator="k2"), [[0.5, 0.5]], rtol=1e-7)
  want_k3 = [[math.exp(-1.0), math.e - 2.0]]
  np.testing.assert_allclose(losses.kl_penalty(logp, ref, estimator="k3"), want_k3, rtol=1e-6)
  np.testing.assert_allclose(losses.kl_penalty(logp, ref, estimator="low_var_kl"), want_k3,
                             rtol=1e-6)
  # k3 is clamped to [-clip, clip] (verl: 10): l = 30 would give e^30 - 31.
  big = losses.kl_penalty(jnp.asarray([[-30.0]]), jnp.asarray([[0.0]]), estimator="k3")
  np.testing.assert_allclose(big, [[10.0]])
  # d k3 / d logp = 1 - e^l (ref is a constant): at l = -1, 1 - e^-1; zero once clamped.
  grad = jax.grad(lambda lp: losses.kl_penalty(lp, ref, estimator="k3").sum())(logp)
  np.testing.assert_allclose(grad, [[1 - math.exp(-1.0), 1 - math.e]], rtol=1e-6)
  grad_ref = jax.grad(lambda r: losses.kl_penalty(logp, r, estimator="k3").sum())(ref)
  np.testing.assert_array_equal(grad_ref, 0.0)
  with pytest.raises(ValueError, match="valid estimators: k1, k2, k3, low_var_kl"):
    losses.kl_penalty(logp, ref, estimator="k4")


def test_log_ratio_clamps_before_exp_and_stops_old_gradient():
  # l = logp - old_logp clamped to +-LOG_RATIO_CLIP (20, verl): -1 - (-1.5) = 0.5, 0 - (-30) = 30
  # -> 20, -30 - 0 = -30 -> -20; clamped entries have zero gradient, old_logp none at all.
  assert losses.LOG_RATIO_CLIP == 20.0
  logp = jnp.asarray([[-1.0, 0.0, -30.0]])
  old = jnp.asarray([[-1.5, -30.0, 0.0]])
  np.testing.assert_allclose(losses.log_ratio(logp, old), [[0.5, 20.0, -20.0]], rtol=1e-7)
  np.testing.assert_allclose(losses.log_ratio(logp, old, clip=0.25), [[0.25, 0.25, -0.25]])
  grad = jax.grad(lambda lp: losses.log_ratio(lp, old).sum())(logp)
  np.testing.assert_array_equal(grad, [[1.0, 0.0, 0.0]])
  grad_old = jax.grad(lambda o: losses.log_ratio(logp, o).sum())(old)
  np.testing.assert_array_equal(grad_old, 0.0)
  # bf16 is computed in fp32; a float64 input keeps float64 (LAD's float64 reference tests).
  assert losses.log_ratio(logp.astype(jnp.bfloat16), old).dtype == jnp.float32
  with jax.enable_x64(True):
    assert losses.log_ratio(jnp.zeros((1, 2), jnp.float64), jnp.zeros((1, 2))).dtype == jnp.float64
  with pytest.raises(AssertionError):
    losses.log_ratio(jnp.zeros((1, 2)), jnp.zeros((1, 3)))


def test_ratio_metrics_over_valid_tokens_only():
  # Valid l: 0, log 2, -log 4 (row 0), log 3 (row 1); padding holds huge values that must not count.
  l = jnp.log(jnp.asarray([[1.0, 2.0, 0.25, 1e30], [3.0, 1e-30, 1e30, 1e30]]))
  got = losses.ratio_metrics(l, MASK)
  np.testing.assert_allclose(got["ratio_mean"], (1 + 2 + 0.25 + 3) / 4, rtol=1e-6)
  np.testing.assert_allclose(got["ratio_max"], 3.0, rtol=1e-6)
  np.testing.assert_allclose(got["ratio_min"], 0.25, rtol=1e-6)
  np.testing.assert_allclose(got["ppo_kl"], -(math.log(2) - math.log(4) + math.log(3)) / 4,
                             rtol=1e-6)
  np.testing.assert_allclose(got["log_ratio_abs_mean"],
                             (math.log(2) + math.log(4) + math.log(3)) / 4, rtol=1e-6)
  empty = losses.ratio_metrics(l, jnp.zeros_like(MASK))
  assert all(float(v) == 0.0 for v in empty.values())
  grad = jax.grad(lambda x: sum(losses.ratio_metrics(x, MASK).values()))(jnp.zeros((2, 4)))
  np.testing.assert_array_equal(grad, 0.0)  # metrics are detached
