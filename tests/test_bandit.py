"""Tests of the controlled bandit (lad_jax/bandit.py; paper Sec. 4.1, DESIGN §3)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import bandit

# Exact mode, pi_old fixed at uniform: nothing is random, so one seed says it all. lr 0.05 rather
# than the paper's 5e-3 so that 400 steps converge (the optimum does not depend on lr).
_CONVERGE = bandit.BanditConfig(steps=400, lr=0.05, refreshes=0, log_every=400)


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _js_f(x):
  """JS generator, paper Table 5: f(x) = 1/2 (x log x - (x + 1) log((x + 1) / 2))."""
  return 0.5 * (x * np.log(x) - (x + 1.0) * np.log((x + 1.0) / 2.0))


def _js_f_prime(x):
  """d/dx of `_js_f`: 1/2 (log x - log((x + 1) / 2))."""
  return 0.5 * (np.log(x) - np.log((x + 1.0) / 2.0))


def test_reward_vector_is_the_three_gaussian_mixture():
  rewards = np.asarray(bandit.reward_vector())
  assert rewards.shape == (50,)
  # Hand values: centre 25 = 5 + 2 * 4 e^(-15^2 / 50); centre 10 = 4 + 5 e^(-4.5) + 4 e^(-18).
  np.testing.assert_allclose(rewards[25], 5 + 8 * math.exp(-4.5), rtol=1e-6)
  np.testing.assert_allclose(rewards[10], 4 + 5 * math.exp(-4.5) + 4 * math.exp(-18), rtol=1e-6)
  peaks = (rewards[1:-1] > rewards[:-2]) & (rewards[1:-1] > rewards[2:])
  assert set(np.flatnonzero(peaks) + 1) == {10, 25, 40}


def test_refresh_schedule_makes_equal_phases():
  flags = bandit.refresh_schedule(4000, 2)
  assert flags.sum() == 2 and list(np.flatnonzero(flags)) == [1333, 2667]
  assert not bandit.refresh_schedule(100, 0).any()
  assert bandit.refresh_schedule(10, 9).sum() == 9  # every step (the SEAL harness)


def test_exact_mode_lad_js_reaches_the_target():
  rewards = np.asarray(bandit.reward_vector())
  result = bandit.run_method("lad_js", "exact", _CONVERGE, seeds=[0], etas=[1.0, 0.5])
  for e, eta in enumerate(result.etas):
    logits, old = result.trajectory.logits[e, 0, -1], result.trajectory.old_logits[e, 0, -1]
    np.testing.assert_array_equal(old, 0.0)  # no refresh: pi_old stays uniform
    p_pi = bandit.policy_induced(logits, old)
    assert bandit.total_variation(p_pi, bandit.target_distribution(rewards, eta)) < 0.02


def test_exact_mode_lad_tv_lands_in_its_minimiser_set():
  """DESIGN Correction: practical LAD-TV minimisers are all pi <= pi_old e^(A/eta) (A centred under
  pi_old, so E_old[e^(A/eta)] >= 1); its value there is E_old[e^(A/eta)] - 1, and it need not be
  P_A."""
  rewards = np.asarray(bandit.reward_vector())
  result = bandit.run_method("lad_tv", "exact", _CONVERGE, seeds=[0], etas=[1.0])
  pi = _softmax(result.trajectory.logits[0, 0, -1])
  q = np.full(50, 1 / 50)
  bound = q * np.exp(rewards - q @ rewards)
  assert bound.sum() >= 1.0
  assert np.all(pi <= bound * 1.01), (pi / bound).max()
  # The exact loss sum_k q |r - e^u| equals sum_k (q e^u - pi) = E_old[e^u] - 1 on the set.
  final = jax.jit(bandit.exact_loss_fn("lad_tv", _CONVERGE, 1.0))(
      jnp.asarray(result.trajectory.logits[0, 0, -1]), jnp.zeros(50))
  np.testing.assert_allclose(final, bound.sum() - 1.0, rtol=1e-4)
  # ... and it is not the unique optimum P_A (JS gets there, TV stops ~0.2 away at lr 5e-3).
  assert bandit.total_variation(pi, bandit.target_distribution(rewards, 1.0)) > 0.05


def test_one_adam_step_matches_hand_computation():
  """LAD-JS, sampled mode, uniform pi_old, 6 hand-picked arms, one Adam step from zeros."""
  arms = np.array([3, 10, 25, 25, 40, 47])
  config = bandit.BanditConfig(steps=1, batch_size=len(arms), log_every=1, refreshes=0)
  # Inverse CDF of a uniform pi_old: the middle of arm a's bin is u = (a + 1/2) / K.
  noise = bandit.StepNoise(uniforms=jnp.asarray((arms + 0.5) / 50, jnp.float32)[None, :],
                           keys=jax.random.split(jax.random.key(0), 1))
  etas = jnp.asarray([1.0, 0.5])
  run = jax.jit(jax.vmap(functools.partial(bandit.train, m=bandit.method("lad_js"), mode="sampled",
                                           config=config), in_axes=(None, 0)))
  trajectory = run(noise, etas)
  rewards = np.asarray(bandit.reward_vector(), np.float64)
  for e, eta in enumerate(np.asarray(etas)):
    adv = rewards[arms] - rewards[arms].mean()
    x = np.exp(-adv / eta)  # r = 1 before the first step
    # Eq. 8 value e^u f(x) and Eq. 9 gradient f'(x) r d log pi(a) / d theta = f'(x) (e_a - 1/K).
    loss = np.mean(np.exp(adv / eta) * _js_f(x))
    grad = np.zeros(50)
    for a, fp in zip(arms, _js_f_prime(x)):
      grad += fp * (np.eye(50)[a] - 1 / 50) / len(arms)
    # Adam's first step: m_hat = g, v_hat = g^2, so theta_1 = -lr g / (|g| + eps).
    expected = -config.lr * grad / (np.abs(grad) + 1e-8)
    np.testing.assert_allclose(trajectory.loss[e, 0], loss, rtol=1e-5)
    np.testing.assert_allclose(trajectory.logits[e, 0], expected, rtol=1e-5, atol=1e-9)


def _exact_inputs(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  old = jax.random.normal(k1, (50,)) * 0.7
  return old, k2


def test_exact_mode_lad_js_is_the_pi_old_weighted_sum_and_its_gradient():
  old, key = _exact_inputs(1)
  logits = old + 0.5 * jax.random.normal(key, (50,))
  rewards = bandit.reward_vector()
  eta = 0.7
  batch = bandit.exact_batch(old, rewards, temperature=1.0)
  fn = lambda lg: bandit.bandit_loss(lg, old, batch, m=bandit.method("lad_js"), eta=eta,
                                     rewards_K=rewards, key=jax.random.key(0))[0]
  value, grad = jax.jit(jax.value_and_grad(fn))(logits)

  q = _softmax(old)
  u = (np.asarray(rewards, np.float64) - q @ np.asarray(rewards, np.float64)) / eta

  def hand(lg):  # sum_k pi_old(k) e^(u_k) f(r_k e^(-u_k)), float64
    r = _softmax(lg) / q
    return np.sum(q * np.exp(u) * _js_f(r * np.exp(-u)))

  lg = np.asarray(logits, np.float64)
  fd = np.array([(hand(lg + 1e-6 * np.eye(50)[k]) - hand(lg - 1e-6 * np.eye(50)[k])) / 2e-6
                 for k in range(50)])
  np.testing.assert_allclose(value, hand(lg), rtol=1e-5)
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-6)


def test_grpo_penalty_is_the_exact_kl_to_pi_old():
  old, key = _exact_inputs(2)
  logits = old + 0.02 * jax.random.normal(key, (50,))  # ratios well inside the 0.2 clip
  rewards = bandit.reward_vector()
  batch = bandit.exact_batch(old, rewards, temperature=1.0)
  q, pi = _softmax(old), _softmax(logits)
  adv = np.asarray(rewards, np.float64) - q @ np.asarray(rewards, np.float64)
  assert np.abs(np.log(pi / q)).max() < 0.15
  loss_fn = jax.jit(lambda eta: bandit.bandit_loss(
      logits, old, batch, m=bandit.method("grpo"), eta=eta, rewards_K=rewards,
      key=jax.random.key(0))[0])
  for eta in (1.0, 0.5):
    value = loss_fn(eta)
    # -E_old[A r] + eta KL(pi || pi_old): the PPO term is unclipped here.
    expected = -np.sum(pi * adv) + eta * np.sum(pi * np.log(pi / q))
    np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", bandit.MODES)
def test_flowrl_exact_log_z_vanishes_at_the_optimum_and_the_authors_does_not(mode):
  old, _ = _exact_inputs(3)
  rewards = bandit.reward_vector()
  eta = 1.0
  if mode == "exact":
    batch = bandit.exact_batch(old, rewards, temperature=1.0)
  else:
    batch = bandit.sample_batch(jax.random.uniform(jax.random.key(4), (32,)), old, rewards,
                                temperature=1.5)
  q = _softmax(old)
  r64 = np.asarray(rewards, np.float64)
  optimum = jnp.asarray(np.log(q) + r64 / eta, jnp.float32)  # pi* ∝ pi_old e^(A/eta)
  loss = jax.jit(lambda: {name: bandit.bandit_loss(
      optimum, old, batch, m=bandit.method(name), eta=eta, rewards_K=rewards,
      key=jax.random.key(0))[0] for name in ("flowrl", "flowrl_authors")})()
  assert abs(float(loss["flowrl"])) < 1e-6
  if mode == "exact":
    # delta is the constant c = log sum_k e^(reward_k / eta) - log sum_k pi_old e^(A_k / eta), and
    # the weights pi_old r = pi* sum to one, so the loss is c^2.
    adv = r64 - q @ r64
    c = np.log(np.sum(np.exp(r64 / eta))) - np.log(np.sum(q * np.exp(adv / eta)))
    np.testing.assert_allclose(loss["flowrl_authors"], c**2, rtol=1e-4)
  else:
    assert float(loss["flowrl_authors"]) > 1.0


def test_vmapped_seeds_equal_looped_seeds():
  config = bandit.BanditConfig(steps=60, log_every=20, refreshes=2)
  seeds = [0, 1, 2]
  batched = bandit.run_method("lad_js", "sampled", config, seeds=seeds, etas=[1.0])
  one = jax.jit(functools.partial(bandit.train, m=bandit.method("lad_js"), mode="sampled",
                                  config=config))
  noise_S = bandit.draw_noise_batch(bandit.run_keys(seeds), steps=config.steps,
                                    batch_size=config.batch_size)
  # The batched draw is the per-seed draw.
  own = bandit.draw_noise(jax.random.key(seeds[1]), steps=config.steps,
                          batch_size=config.batch_size)
  np.testing.assert_array_equal(noise_S.uniforms[1], own.uniforms)
  for s in range(len(seeds)):
    looped = one(jax.tree.map(lambda x, s=s: x[s], noise_S), 1.0)
    np.testing.assert_allclose(batched.trajectory.logits[0, s], looped.logits, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(batched.trajectory.old_logits[0, s], looped.old_logits,
                               rtol=1e-5, atol=1e-6)
  # Different seeds draw different arms.
  assert not np.allclose(batched.trajectory.logits[0, 0], batched.trajectory.logits[0, 1])


def test_metrics_on_known_distributions():
  rewards = np.asarray(bandit.reward_vector())
  p_a = bandit.target_distribution(rewards, 1.0)
  np.testing.assert_allclose(p_a, _softmax(rewards), rtol=1e-12)
  assert bandit.modes_recovered(p_a, p_a) == 3
  assert bandit.modes_recovered(np.eye(50)[25], p_a) == 1
  # A collapsed reference needs the floor, or every p "recovers" its empty side modes.
  assert bandit.modes_recovered(np.eye(50)[25], np.eye(50)[25]) == 3
  assert bandit.modes_recovered(np.eye(50)[25], np.eye(50)[25], floor=0.01) == 1
  assert bandit.total_variation(np.eye(50)[0], np.eye(50)[1]) == 1.0
  np.testing.assert_allclose(bandit.entropy(np.full(50, 0.02)), math.log(50))
  # P_pi divides out pi_old: pi = pi_old * P_A (normalised) gives P_pi = P_A.
  old = np.linspace(-1, 1, 50)
  logits = np.log(_softmax(old)) + rewards
  np.testing.assert_allclose(bandit.policy_induced(logits, old), p_a, atol=1e-12)
  np.testing.assert_allclose(bandit.optimal_policy(old, rewards, 1.0), _softmax(logits), atol=1e-12)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="valid: pg, pg_kl, grpo"):
    bandit.method("ppo")
  with pytest.raises(ValueError, match="valid divergences"):
    bandit.method("lad_foo")
  with pytest.raises(ValueError, match="valid modes"):
    bandit.main(methods=("pg",), modes=("online",))
  with pytest.raises(ValueError, match="multiple of log_every"):
    bandit.BanditConfig(steps=100, log_every=30)
  with pytest.raises(ValueError, match="refreshes"):
    bandit.BanditConfig(steps=10, log_every=1, refreshes=10)
