"""Tests of lad_jax.divergences: log-space generators against plain float64 numpy references."""

from __future__ import annotations

import math

import chex
from hypothesis import given, settings
from hypothesis import strategies as st
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import divergences

import divergence_reference


# Plain f and hand-derived f' (tests/divergence_reference.py); `test_reference_derivatives` checks
# the f' against central differences of f.
REFERENCE = {
    **divergence_reference.TABLE5,
    **{f"alpha:{a:g}": divergence_reference.alpha(a) for a in (0.25, 0.5, 2.0, -1.0, 3.0)},
    # Limits of the alpha family: kl minus (x - 1) and rkl plus (x - 1).
    "alpha:1": (lambda x: x * np.log(x) - (x - 1.0), np.log),
    "alpha:0": (lambda x: -np.log(x) + (x - 1.0), lambda x: 1.0 - 1.0 / x),
    "custom:chi2": divergence_reference.CHI2,
}
SMOOTH = [n for n in REFERENCE if n != "tv"]
ALL_FUZZ = list(REFERENCE) + ["alpha:-3", "alpha:6", "alpha:1.0000001", "alpha:1e-9"]


def _get(name):
  if name == "custom:chi2":
    return divergences.custom(lambda x: (x - 1.0) ** 2, name="chi2")
  return divergences.get(name)


def _random_lu(seed, n=256, scale=3.0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-scale, scale, n), rng.uniform(-scale, scale, n)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_reference_derivatives(name):
  # Guards the references themselves: hand-derived f' against central differences of f.
  f, f_prime = REFERENCE[name]
  x = np.exp(np.random.default_rng(0).uniform(-3, 3, 64))
  x = x[np.abs(x - 1.0) > 1e-3]  # away from TV's kink
  h = 1e-6 * x
  np.testing.assert_allclose(f_prime(x), (f(x + h) - f(x - h)) / (2 * h), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_weighted_matches_naive_float64(name):
  # Reference: e^u f(e^(l-u)) evaluated directly in float64 numpy (the paper's Eq. 8 term).
  f, _ = REFERENCE[name]
  l, u = _random_lu(1)
  expected = np.exp(u) * f(np.exp(l - u))
  div = _get(name)
  with jax.enable_x64(True):
    got64 = np.asarray(div.weighted(jnp.asarray(l), jnp.asarray(u)))
  np.testing.assert_allclose(got64, expected, rtol=1e-5, atol=1e-12)
  # float32: terms like r (l - u) and (r + e^u) log(...) cancel near x = 1, so the error is relative
  # to the size of those terms, not to the (small) result.
  got32 = np.asarray(div.weighted(jnp.asarray(l, jnp.float32), jnp.asarray(u, jnp.float32)))
  scale = np.abs(expected) + np.exp(l) + np.exp(u)
  assert np.max(np.abs(got32 - expected) / scale) < 1e-5


@pytest.mark.parametrize("name", list(REFERENCE))
def test_a_hat_is_minus_f_prime(name):
  _, f_prime = REFERENCE[name]
  l, u = _random_lu(2)
  with jax.enable_x64(True):
    got = np.asarray(_get(name).a_hat(jnp.asarray(l), jnp.asarray(u)))
  np.testing.assert_allclose(got, -f_prime(np.exp(l - u)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_autodiff_of_weighted_is_eq9_weight(name):
  # d/dl e^u f(e^(l-u)) = f'(x) e^l = -a_hat e^l: the log-space forms must differentiate to Eq. 9.
  _, f_prime = REFERENCE[name]
  l, u = _random_lu(3)
  div = _get(name)
  with jax.enable_x64(True):
    grad = jax.grad(lambda l_: div.weighted(l_, jnp.asarray(u)).sum())(jnp.asarray(l))
  np.testing.assert_allclose(np.asarray(grad), f_prime(np.exp(l - u)) * np.exp(l), rtol=1e-8,
                             atol=1e-12)


@pytest.mark.parametrize("name", SMOOTH)
def test_check_grads_weighted(name):
  div = _get(name)
  l, u = _random_lu(4, n=16, scale=2.0)
  with jax.enable_x64(True):
    jax.test_util.check_grads(div.weighted, (jnp.asarray(l), jnp.asarray(u)), order=1,
                              modes=("rev",))


def test_alpha_half_is_four_hellinger_and_alpha_two_is_half_chi2():
  # f_0.5(x) = 2 (sqrt x - 1)^2 = 4 f_hellinger(x); f_2(x) = (x - 1)^2 / 2 (expand the definition).
  l, u = _random_lu(5)
  l, u = jnp.asarray(l, jnp.float32), jnp.asarray(u, jnp.float32)
  half, hel = divergences.get("alpha:0.5"), divergences.get("hellinger")
  np.testing.assert_allclose(half.weighted(l, u), 4 * hel.weighted(l, u), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(half.a_hat(l, u), 4 * hel.a_hat(l, u), rtol=2e-5, atol=1e-6)
  two, chi2 = divergences.get("alpha:2"), divergences.custom(lambda x: (x - 1.0) ** 2)
  np.testing.assert_allclose(2 * two.weighted(l, u), chi2.weighted(l, u), rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(2 * two.a_hat(l, u), chi2.a_hat(l, u), rtol=2e-5, atol=1e-5)


def test_alpha_limits_are_kl_and_rkl_up_to_a_linear_term():
  l, u = _random_lu(6)
  with jax.enable_x64(True):
    l, u = jnp.asarray(l), jnp.asarray(u)
    r, eu = jnp.exp(l), jnp.exp(u)
    kl, rkl = divergences.get("kl"), divergences.get("rkl")
    # a = 1 and a = 0 exactly: f_1 = kl - (x - 1), f_0 = rkl + (x - 1); the linear term c (x - 1)
    # has weighted form c (r - e^u) and shifts a_hat by the constant -c.
    one, zero = divergences.get("alpha:1"), divergences.get("alpha:0")
    np.testing.assert_allclose(one.weighted(l, u), kl.weighted(l, u) - (r - eu), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(zero.weighted(l, u), rkl.weighted(l, u) + (r - eu), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(one.a_hat(l, u) - kl.a_hat(l, u), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(zero.a_hat(l, u) - rkl.a_hat(l, u), -1.0, rtol=0, atol=1e-12)
    # a -> 1 and a -> 0: a_hat differences tend to the same constants. The deviation is
    # expm1(eps d)/eps - d ~ eps d^2 / 2 with |d| <= 6 here, so bound it by 20 eps.
    for eps in (1e-2, 1e-4, 1e-7):
      near_one, near_zero = divergences.alpha(1.0 + eps), divergences.alpha(eps)
      diff_one = np.asarray(near_one.a_hat(l, u) - kl.a_hat(l, u))
      diff_zero = np.asarray(near_zero.a_hat(l, u) - rkl.a_hat(l, u))
      assert np.max(np.abs(diff_one - 1.0)) < 20 * eps, eps
      # Near a = 0: a_hat = -(x^(eps-1) - 1)/(eps-1) vs e^(u-l); the gap is O(eps x^-1 log x).
      assert np.max(np.abs(diff_zero + 1.0) / (1.0 + np.exp(u - l))) < 20 * eps, eps
      np.testing.assert_allclose(near_one.weighted(l, u), one.weighted(l, u),
                                 rtol=200 * eps, atol=200 * eps)


_FUZZ = hnp.arrays(np.float32, (32,), elements=st.floats(-20, 20, width=32))


@settings(max_examples=25, deadline=None)
@given(l=_FUZZ, u=_FUZZ)
def test_finite_values_and_gradients_on_clamped_range(l, u):
  # Callers clamp l and u to +-20 (practical LAD) or to [-30, 0] (theoretical LAD, log-probs).
  l = jnp.asarray(l)
  u = jnp.asarray(u)
  weighted, grads, a_hat = _all_fuzz(l, u)
  for name, w, g, a in zip(ALL_FUZZ, weighted, grads, a_hat):
    assert np.all(np.isfinite(w)), name
    assert np.all(np.isfinite(g)), name
    assert np.all(np.isfinite(a)), name


@jax.jit
def _all_fuzz(l, u):
  # One compile for every divergence and both input ranges; the second half tests l == u (kinks,
  # sqrt at x = 1) and log-probabilities as the theoretical loss passes them.
  l_all = jnp.concatenate([l, u, jnp.clip(2.5 * l - 15.0, -30.0, 0.0)])
  u_all = jnp.concatenate([u, u, jnp.clip(2.5 * u - 15.0, -30.0, 0.0)])
  out_w, out_g, out_a = [], [], []
  for name in ALL_FUZZ:
    div = _get(name)
    w, g = jax.vmap(jax.value_and_grad(div.weighted, argnums=(0, 1)))(l_all, u_all)
    out_w.append(w)
    out_g.append(jnp.stack(g))
    out_a.append(div.a_hat(l_all, u_all))
  return out_w, out_g, out_a


def test_registry_names_and_lookup():
  assert divergences.names() == ["hellinger", "jeffreys", "js", "kl", "rkl", "tv"]
  js = divergences.get("js")
  assert divergences.get(js) is js
  assert divergences.get(" JS ").name == "js"
  assert divergences.get("alpha:0.5").name == "alpha:0.5"
  assert [divergences.get(n).strict for n in divergences.names()] == [
      True, False, True, False, False, True]
  assert divergences.get("alpha:0.5").strict and not divergences.get("alpha:2").strict

  def chi2(x):
    return (x - 1.0) ** 2

  div = divergences.get(chi2)
  assert div.name == "custom:chi2"
  chex.assert_trees_all_close(div.a_hat(jnp.zeros(3), jnp.asarray([0.0, math.log(2), -1.0])),
                              -2.0 * (jnp.exp(-jnp.asarray([0.0, math.log(2), -1.0])) - 1.0),
                              rtol=1e-6)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("kll", r"valid divergences: hellinger, jeffreys, js, kl, rkl, tv, 'alpha:<a>'"),
        ("alpha:half", r"'alpha:<a>' with a float a"),
        ("alpha:nan", r"finite a"),
        (3, r"pass a name"),
    ],
)
def test_registry_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    divergences.get(spec)


def test_exp_expm1_over_matches_float64_and_saturates():
  # e^b expm1(c d)/c against numpy float64, across the small/large branch switch and c -> 0.
  rng = np.random.default_rng(7)
  b, d = rng.uniform(-20, 20, 128), rng.uniform(-40, 40, 128)
  for c in (1.0, 0.5, -0.7, 1e-3, 1e-8, 0.0):
    z = c * d
    expected = np.exp(b) * (d if c == 0.0 else np.expm1(z) / c)
    got = np.asarray(divergences.exp_expm1_over(jnp.asarray(b, jnp.float32),
                                                jnp.asarray(d, jnp.float32), c))
    np.testing.assert_allclose(got, expected, rtol=2e-4, err_msg=str(c))
  # Saturation: finite where the plain product would overflow float32.
  big = divergences.exp_expm1_over(jnp.float32(-20.0), jnp.float32(100.0), 2.0)
  assert np.isfinite(big) and big > 1e25
