"""Tests for lad_jax/advantages.py: group estimators, alpha-DPG pseudo-rewards, DAPO filter."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import advantages


# ------------------------------------------------------------------------------------------------
# References written from the public code (shared/reference/baselines.md): float64, sample loops.
# ------------------------------------------------------------------------------------------------


def _verl_grpo_reference(scores, index, *, eps=1e-6, norm_by_std=True):
  """verl `compute_grpo_outcome_advantage` (§2.1): loop over uids, torch.std (unbiased)."""
  groups = {}
  for s, i in zip(scores, index):
    groups.setdefault(i, []).append(s)
  out = []
  for s, i in zip(scores, index):
    g = np.asarray(groups[i], np.float64)
    mean, std = (0.0, 1.0) if len(g) == 1 else (g.mean(), g.std(ddof=1))
    out.append((s - mean) / (std + eps) if norm_by_std else s - mean)
  return np.asarray(out)


def _alpha_dpg_reference(seq_policy, seq_ref, rewards, *, alpha, z_default=1e-4, clip=10.0):
  """naver/alpha-dpg, one group: compute_partition_function (reset_z) + compute_fcdpg_advantage
  (general-alpha branch) + apply_leave_one_out_baseline, in float64 with log(0) = -inf."""
  with np.errstate(divide="ignore"):
    target = np.asarray(seq_ref, np.float64) + np.log(np.asarray(rewards, np.float64))
  policy = np.asarray(seq_policy, np.float64)
  z = min(np.mean(np.exp(target - policy)), 1.0)
  z = z_default if z == 0 else z
  log_t = policy - (target - np.log(z))
  with np.errstate(invalid="ignore", over="ignore"):
    pseudo = -(-np.expm1(log_t * (alpha - 1.0)))
  pseudo = np.minimum(pseudo, clip)
  total = pseudo.sum()
  loo = np.array([pseudo[i] - (total - pseudo[i]) / (len(pseudo) - 1) for i in range(len(pseudo))])
  return pseudo, loo


# ------------------------------------------------------------------------------------------------
# grpo / drgrpo / rloo
# ------------------------------------------------------------------------------------------------


def test_grpo_hand_computed():
  # Hand computation: rewards [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735,
  # A = ±0.5 / (0.57735 + 1e-6) = ±0.866024.
  adv = advantages.grpo(jnp.array([[1.0, 0.0, 0.0, 1.0]]))
  np.testing.assert_allclose(adv, [[0.866024, -0.866024, -0.866024, 0.866024]], rtol=1e-5)


def test_grpo_matches_verl_reference():
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(5, 6))
  ref = _verl_grpo_reference(rewards.ravel(), np.repeat(np.arange(5), 6)).reshape(5, 6)
  np.testing.assert_allclose(advantages.grpo(jnp.asarray(rewards)), ref, rtol=1e-5, atol=1e-5)
  ref_dr = _verl_grpo_reference(rewards.ravel(), np.repeat(np.arange(5), 6), norm_by_std=False)
  np.testing.assert_allclose(advantages.drgrpo(jnp.asarray(rewards)), ref_dr.reshape(5, 6),
                             rtol=1e-5, atol=1e-6)


def test_singleton_groups():
  r = jnp.array([[2.0], [-1.0]])
  # verl §2.1: a group of one gets mean 0 and std 1 -> A = r / (1 + 1e-6).
  np.testing.assert_allclose(advantages.grpo(r), r / (1.0 + 1e-6), rtol=1e-7)
  # verl with norm_adv_by_std_in_grpo=False: mean 0 -> A = r.
  np.testing.assert_array_equal(advantages.drgrpo(r), r)
  # No other sample to form a leave-one-out baseline -> 0 (the choice).
  np.testing.assert_array_equal(advantages.rloo(r), jnp.zeros_like(r))


@pytest.mark.parametrize("fn", [advantages.grpo, advantages.drgrpo, advantages.rloo])
def test_all_equal_groups_get_exactly_zero(fn):
  # 0.1 is not representable: a computed mean/std of [0.1] * 3 can be off by an ulp, and
  # (r - mean) / (ulp + 1e-6) would then be ~1e-2 instead of 0.
  r = jnp.array([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
  adv = fn(r)
  np.testing.assert_array_equal(adv[:2], 0.0)
  assert np.all(np.abs(np.asarray(adv[2])) > 0.1)


def test_rloo_hand_computed():
  # Hand computation: [1, 0, 0, 1]: A_0 = 1 - (0 + 0 + 1) / 3 = 2/3; A_1 = 0 - (1 + 0 + 1) / 3
  # = -2/3,
  # which equals G / (G - 1) (r - mean) = 4/3 * ±0.5.
  np.testing.assert_allclose(advantages.rloo(jnp.array([[1.0, 0.0, 0.0, 1.0]])),
                             [[2 / 3, -2 / 3, -2 / 3, 2 / 3]], rtol=1e-6)


def test_estimators_jit_and_zero_mean():
  rewards = jax.random.normal(jax.random.key(0), (4, 8))
  for name in ("grpo", "drgrpo", "rloo"):
    adv = jax.jit(advantages.get(name))(rewards)
    chex.assert_shape(adv, (4, 8))
    # Every group baseline removes the group mean: the advantages sum to 0 per group.
    np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-5)


def test_to_groups_roundtrip_and_errors():
  x = jnp.arange(12.0)
  x_pg = advantages.to_groups(x, group_size=4)
  chex.assert_shape(x_pg, (3, 4))
  np.testing.assert_array_equal(x_pg[1], [4.0, 5.0, 6.0, 7.0])
  np.testing.assert_array_equal(advantages.from_groups(x_pg), x)
  with pytest.raises(ValueError, match="whole number of groups"):
    advantages.to_groups(x, group_size=5)
  with pytest.raises(ValueError, match=r"\[P, G\]"):
    advantages.grpo(x)


def test_registry():
  assert advantages.names() == ["alpha_dpg", "drgrpo", "grpo", "rloo"]
  with pytest.raises(ValueError, match="valid estimators: alpha_dpg, drgrpo, grpo, rloo"):
    advantages.get("ppo")
  with pytest.raises(ValueError, match="accepts: eps"):
    advantages.get("grpo", alpha=1.0)
  fn = advantages.get("grpo", eps=1.0)
  # Hand computation: [0, 2]: mean 1, unbiased std sqrt(2) -> A = ±1 / (sqrt(2) + 1).
  a = 1 / (math.sqrt(2) + 1)
  np.testing.assert_allclose(fn(jnp.array([[0.0, 2.0]])), [[-a, a]], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# alpha-DPG
# ------------------------------------------------------------------------------------------------


def test_alpha_dpg_hand_computed():
  # Hand computation, one group: policy [-3, -4, -5], ref -4 each, R [1, 0, 1], alpha 0.25.
  # IS weights p/pi: e^(-4+3) = e^-1, 0, e^(-4+5) = e^1 -> mean (0.3679 + 2.7183) / 3 = 1.029 ->
  # Z = min(1.029, 1) = 1. log t = policy - ref + log Z = [1, -, -1].
  # pseudo = expm1(-0.75 * log t) = [expm1(-0.75), -1, expm1(0.75)] = [-0.52763, -1, 1.11700].
  policy, ref = jnp.array([[-3.0, -4.0, -5.0]]), jnp.full((1, 3), -4.0)
  r = jnp.array([[1.0, 0.0, 1.0]])
  pseudo = advantages.alpha_dpg_pseudo_reward(policy, ref, r, alpha=0.25)
  np.testing.assert_allclose(pseudo, [[math.expm1(-0.75), -1.0, math.expm1(0.75)]], rtol=1e-6)
  # Leave-one-out: A_0 = -0.52763 - (-1 + 1.11700) / 2 = -0.58613,
  # A_1 = -1 - (-0.52763 + 1.11700) / 2 = -1.29468.
  adv = advantages.alpha_dpg(policy, ref, r, alpha=0.25)
  p = [math.expm1(-0.75), -1.0, math.expm1(0.75)]
  np.testing.assert_allclose(adv, [[p[0] - (p[1] + p[2]) / 2, p[1] - (p[0] + p[2]) / 2,
                                    p[2] - (p[0] + p[1]) / 2]], rtol=1e-5)


def test_alpha_dpg_correct_sample_formula_with_z_below_one():
  # Z < 1: policy puts mass on wrong answers. policy [-1, -1], ref [-3, -1], R [1, 0]:
  # IS weights [e^-2, 0] -> Z = e^-2 / 2. Correct sample: (pi_ref / (Z pi))^(1 - alpha) - 1
  # = (e^-3 / (e^-2 / 2 * e^-1))^(0.5) - 1 = sqrt(2) - 1 for alpha 0.5.
  pseudo = advantages.alpha_dpg_pseudo_reward(jnp.array([[-1.0, -1.0]]), jnp.array([[-3.0, -1.0]]),
                                              jnp.array([[1.0, 0.0]]), alpha=0.5)
  np.testing.assert_allclose(pseudo, [[math.sqrt(2) - 1, -1.0]], rtol=1e-6)


def test_alpha_dpg_matches_reference_code():
  rng = np.random.default_rng(1)
  policy = rng.normal(-20.0, 3.0, size=(6, 4))
  ref = policy + rng.normal(0.0, 1.0, size=(6, 4))
  rewards = (rng.uniform(size=(6, 4)) < 0.5).astype(np.float64)
  rewards[0] = 0.0  # no correct sample: Z = z_default
  rewards[1] = 1.0  # all correct
  for alpha in (0.0, 0.25, 0.5, 0.9):
    adv = advantages.alpha_dpg(jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(rewards),
                               alpha=alpha)
    pseudo = advantages.alpha_dpg_pseudo_reward(jnp.asarray(policy), jnp.asarray(ref),
                                                jnp.asarray(rewards), alpha=alpha)
    for p in range(6):
      want_pseudo, want_adv = _alpha_dpg_reference(policy[p], ref[p], rewards[p], alpha=alpha)
      np.testing.assert_allclose(pseudo[p], want_pseudo, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(adv[p], want_adv, rtol=1e-4, atol=1e-5)


def test_alpha_dpg_incorrect_is_minus_one_and_clip():
  # Incorrect samples: t = +inf -> t^(alpha - 1) - 1 = -1 exactly.
  # Correct with pi << pi_ref: log t = -30 -> expm1(0.75 * 30) ~ 5.9e9 -> clipped at 10.
  pseudo = advantages.alpha_dpg_pseudo_reward(jnp.array([[-40.0, -5.0, -5.0]]),
                                              jnp.array([[-10.0, -5.0, -5.0]]),
                                              jnp.array([[1.0, 0.0, 0.0]]), alpha=0.25)
  np.testing.assert_array_equal(pseudo, [[10.0, -1.0, -1.0]])
  # All incorrect: pseudo -1 everywhere, so the leave-one-out advantage is exactly 0.
  adv = advantages.alpha_dpg(jnp.zeros((1, 4)), jnp.zeros((1, 4)), jnp.zeros((1, 4)))
  np.testing.assert_array_equal(adv, 0.0)


def test_alpha_dpg_limits_are_continuous_and_finite():
  policy = jnp.array([[-3.0, -4.0, -5.0, -1e4]])
  ref = jnp.array([[-4.0, -4.0, -4.0, 1e4]])
  r = jnp.array([[1.0, 0.0, 1.0, 1.0]])
  at = {a: advantages.alpha_dpg_pseudo_reward(policy, ref, r, alpha=a)
        for a in (0.0, 1e-7, 1.0 - 1e-7, 1.0)}
  for v in at.values():
    assert np.all(np.isfinite(np.asarray(v)))
  # Continuity is pointwise in log t: the last sample (log t = -2e4) moves by 1e-7 * 2e4 = 2e-3.
  np.testing.assert_allclose(at[1e-7][:, :3], at[0.0][:, :3], atol=1e-5)
  np.testing.assert_allclose(at[1.0 - 1e-7][:, :3], at[1.0][:, :3], atol=1e-5)
  # alpha -> 1: t^(alpha-1) - 1 -> 0 on correct samples, -1 on incorrect ones.
  np.testing.assert_array_equal(at[1.0], [[0.0, -1.0, 0.0, 0.0]])
  with pytest.raises(ValueError, match="0 <= alpha <= 1"):
    advantages.alpha_dpg(policy, ref, r, alpha=1.5)


# ------------------------------------------------------------------------------------------------
# DAPO filter and refill
# ------------------------------------------------------------------------------------------------


def test_group_keep_mask_hand_and_numpy_parity():
  acc = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0]], np.float32)
  keep = advantages.group_keep_mask(acc)
  assert isinstance(keep, np.ndarray)
  np.testing.assert_array_equal(keep, [False, True, False])
  np.testing.assert_array_equal(jax.jit(advantages.group_keep_mask)(jnp.asarray(acc)), keep)
  # G == 1: DAPO keeps single-sample groups.
  np.testing.assert_array_equal(advantages.group_keep_mask(np.zeros((3, 1))), [True] * 3)
  # DAPO's own rule is np.std(metric) > 0 per uid (§3).
  rng = np.random.default_rng(0)
  acc = (rng.uniform(size=(64, 4)) < 0.3).astype(np.float64)
  np.testing.assert_array_equal(advantages.group_keep_mask(acc), np.std(acc, axis=1) > 0)


def test_select_and_concat_groups():
  g = 2
  batch = {"tokens": np.arange(12).reshape(6, 2), "acc": np.array([1, 1, 0, 1, 0, 0])}
  keep = advantages.group_keep_mask(advantages.to_groups(batch["acc"], group_size=g))
  np.testing.assert_array_equal(keep, [False, True, False])
  kept = advantages.select_groups(batch, keep, group_size=g)
  np.testing.assert_array_equal(kept["acc"], [0, 1])
  np.testing.assert_array_equal(kept["tokens"], [[4, 5], [6, 7]])
  # Refill: 1 + 3 groups available, truncated to 3 (the first rounds' groups first).
  second = {"tokens": 100 + np.arange(12).reshape(6, 2), "acc": np.array([0, 1, 1, 0, 0, 1])}
  merged, available = advantages.concat_groups([kept, second], group_size=g, num_groups=3)
  assert available == 4
  np.testing.assert_array_equal(merged["acc"], [0, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(merged["tokens"][:2], [[4, 5], [6, 7]])
  with pytest.raises(ValueError, match="one flag per group"):
    advantages.select_groups(batch, keep[:2], group_size=g)
  with pytest.raises(ValueError, match="same leading"):
    advantages.select_groups({"a": np.zeros(6), "b": np.zeros(3)}, keep, group_size=g)
