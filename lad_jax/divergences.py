"""f-divergence generators for LAD, written in log space.

LAD (Li & Li 2026) compares the policy-induced distribution with the advantage distribution through
an f-divergence. Per token it only ever needs two things of the generator f, both as functions of
`l = log pi_theta - log pi_old` and `u = A / eta` (so `x = e^(l - u)`):

  weighted(l, u) = e^u f(e^(l-u))       the paper's Eq. 8 term (Table 5, right column);
  a_hat(l, u)    = -f'(e^(l-u))         the effective advantage of the Eq. 9 gradient,
                                        d weighted / d l = -a_hat * e^l.

Both are written so that nothing is exponentiated that could overflow, `x log x` never becomes
`0 * (-inf)`, log(1 + x) is never formed from an exponentiated x, and the gradients of `weighted`
are finite wherever its value is:

  name       f(x)                                  weighted(l, u)             a_hat(l, u)
  kl         x log x                               r lx                       -lx - 1
  rkl        -log x                                -e^u lx                    e^u / r
  jeffreys   (x - 1) log x                         (r - e^u) lx               e^u / r - lx - 1
  tv         abs(x - 1)                            abs(r - e^u)               sign(-lx)
  hellinger  1/2 (sqrt x - 1)^2                    1/2 (e^(l/2) - e^(u/2))^2  1/2 expm1(-lx / 2)
  js         1/2 (x log x - (x+1) log((x+1)/2))    -(r + e^u) a_hat - e^u lx / 2
                                                                              1/2 (s - l - log 2)
  alpha:a    (x^a - 1 - a (x - 1)) / (a (a - 1))   see `alpha`                -expm1((a-1) lx)/(a-1)

with r = e^l, lx = l - u and, for JS, s = log(r + e^u) = u + softplus(lx). Callers clamp l and u
first (`lad.practical_per_token` clamps both to +-20), so the exponents above stay within float32
range; the alpha family additionally saturates its exponents at `MAX_EXP` so that every value
stays finite for any a.

`strict` marks the divergences the paper's Table 5 stars as "strict" (TV, Hellinger, JS: they
force exact matching at the minimum); these are exactly the bounded f-divergences (f(0) and
lim f(x)/x finite), which for the alpha family means 0 < a < 1 (alpha:0.5 is 4 x Hellinger).

Usage:

  div = divergences.get("js")            # or "alpha:0.5", or any convex callable f
  loss_BT = div.weighted(l_BT, u_BT)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Union

import jax
import jax.numpy as jnp

Array = jax.Array

# Largest exponent the alpha family evaluates (e^60 ~ 1e26, far from float32's e^88.7, leaving
# room for the 1/(a(a-1)) factor and for sums over many tokens). Only reached for a outside
# [-0.5, 2] with l, u clamped to +-20.
MAX_EXP = 60.0
_LOG2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Divergence:
  """An f-divergence generator with the two log-space quantities LAD needs.

  All functions are elementwise and broadcast `l` against `u` (same shapes in practice).

  Attributes:
    name: registry name ("js", "alpha:0.5", "custom:chi2", ...).
    f: the plain generator f(x), x > 0, for reference and naive checks only (it overflows).
    weighted: `weighted(l, u) = e^u f(e^(l-u))`, the paper's Eq. 8 / Table 5 term, in log space.
    a_hat: `a_hat(l, u) = -f'(e^(l-u))`, the effective advantage of the Eq. 9 gradient.
    strict: a "strict" divergence in the sense of the paper's Table 5 (TV, Hellinger, JS).
  """

  name: str
  f: Callable[[Array], Array]
  weighted: Callable[[Array, Array], Array]
  a_hat: Callable[[Array, Array], Array]
  strict: bool = False


# ------------------------------------------------------------------------------------------------
# Stable building blocks
# ------------------------------------------------------------------------------------------------


def _exprel(z: Array) -> Array:
  """(e^z - 1) / z, with its limit 1 at z = 0; meant for |z| <= 1."""
  taylor = 1.0 + z * (0.5 + z * (1.0 / 6.0 + z / 24.0))
  tiny = jnp.abs(z) < 1e-3
  # The division branch is evaluated everywhere, so feed it a safe z to keep its gradient finite.
  z_safe = jnp.where(tiny, 1.0, z)
  return jnp.where(tiny, taylor, jnp.expm1(z_safe) / z_safe)


def exp_expm1_over(b: Array, d: Array, c: float, *, max_exp: float = MAX_EXP) -> Array:
  """e^b (e^(c d) - 1) / c, stable for every static c (its c -> 0 limit is e^b d).

  For |c d| < 1 it is `e^b d exprel(c d)` (no cancellation); otherwise
  `(e^min(b + c d, max_exp) - e^min(b, max_exp)) / c`, so the product never overflows even when
  e^(c d) alone would. Both branches are finite with finite gradients, as `where` requires.

  Args:
    b: log of the prefactor.
    d: the exponent's variable.
    c: a static Python float.
    max_exp: exponents saturate here.

  Returns:
    Array with the broadcast shape of b and d.
  """
  b = jnp.minimum(b, max_exp)
  if c == 0.0:
    return jnp.exp(b) * d
  z = c * d
  small = jnp.abs(z) < 1.0
  via_exprel = jnp.exp(b) * d * _exprel(jnp.where(small, z, 0.0))
  if abs(c) < 1e-6:
    # |c d| >= 1 would need |d| >= 1e6, impossible for clamped inputs; skip the 1/c branch, which
    # could overflow for tiny c.
    return via_exprel
  via_exp = (jnp.exp(jnp.minimum(b + z, max_exp)) - jnp.exp(b)) / c
  return jnp.where(small, via_exprel, via_exp)


# ------------------------------------------------------------------------------------------------
# Built-in generators
# ------------------------------------------------------------------------------------------------


# The forms below are also written for cost: one exp(l) per token (XLA's CSE shares it between
# value, a_hat and the ratio r = e^l of the surrogate), e^u per response when advantages are [B, 1],
# and quotients like e^(u - l) = e^u / r instead of further exps. With l and u clamped to +-20 none
# of these products or quotients can overflow or underflow float32 (e^40 ~ 2e17, e^-40 ~ 4e-18).


def _kl() -> Divergence:
  # e^u x log x = e^l (l - u): uses lx = l - u, never log of an underflowed x.
  return Divergence(
      name="kl",
      f=lambda x: x * jnp.log(x),
      weighted=lambda l, u: jnp.exp(l) * (l - u),
      a_hat=lambda l, u: u - l - 1.0,
  )


def _rkl() -> Divergence:
  return Divergence(
      name="rkl",
      f=lambda x: -jnp.log(x),
      weighted=lambda l, u: -jnp.exp(u) * (l - u),
      a_hat=lambda l, u: jnp.exp(u) / jnp.exp(l),
  )


def _jeffreys() -> Divergence:
  return Divergence(
      name="jeffreys",
      f=lambda x: (x - 1.0) * jnp.log(x),
      weighted=lambda l, u: (jnp.exp(l) - jnp.exp(u)) * (l - u),
      a_hat=lambda l, u: jnp.exp(u) / jnp.exp(l) + u - l - 1.0,
  )


def _tv() -> Divergence:
  return Divergence(
      name="tv",
      f=lambda x: jnp.abs(x - 1.0),
      weighted=lambda l, u: jnp.abs(jnp.exp(l) - jnp.exp(u)),
      # sign(0) = 0: the subgradient at the kink that leaves a matched token alone.
      a_hat=lambda l, u: jnp.sign(u - l),
      strict=True,
  )


def _hellinger() -> Divergence:
  # With the paper's 1/2 (Table 5): f(x) = 1/2 (sqrt x - 1)^2, f'(x) = 1/2 (1 - x^(-1/2)).
  return Divergence(
      name="hellinger",
      f=lambda x: 0.5 * jnp.square(jnp.sqrt(x) - 1.0),
      # e^u f(x) = 1/2 (e^(l/2) - e^(u/2))^2, with no sqrt of x (sqrt's gradient at 0 is inf).
      weighted=lambda l, u: 0.5 * jnp.square(jnp.exp(0.5 * l) - jnp.exp(0.5 * u)),
      # expm1 keeps the small weights near the optimum x = 1 accurate.
      a_hat=lambda l, u: 0.5 * jnp.expm1(0.5 * (u - l)),
      strict=True,
  )


def _js() -> Divergence:
  # f(x) = 1/2 (x log x - (x+1) log((x+1)/2)), f'(x) = 1/2 (log 2 - softplus(-log x)).
  # Both softplus(lx) = log(1 + x) and softplus(-lx) come from one log per token, never from
  # adding exp(lx) to 1: with s = log(e^l + e^u) (finite for clamped l, u),
  #   softplus(l - u) = s - u,   softplus(u - l) = s - l,
  # so a_hat = 1/2 (s - l - log 2) and
  #   e^u f(x) = 1/2 [r (l - u) - (r + e^u)(s - u - log 2)] = -(r + e^u) a_hat - 1/2 e^u (l - u).
  # The absolute error of s - l is eps |l|, the resolution of l itself.
  def a_hat(l, u):
    return 0.5 * (jnp.log(jnp.exp(l) + jnp.exp(u)) - l - _LOG2)

  def weighted(l, u):
    eu = jnp.exp(u)
    return -(jnp.exp(l) + eu) * a_hat(l, u) - 0.5 * eu * (l - u)

  return Divergence(
      name="js",
      f=lambda x: 0.5 * (x * jnp.log(x) - (x + 1.0) * jnp.log((x + 1.0) / 2.0)),
      weighted=weighted,
      a_hat=a_hat,
      strict=True,
  )


def alpha(a: float) -> Divergence:
  """The alpha family f_a(x) = (x^a - 1 - a(x - 1)) / (a (a - 1)) (Amari; alpha-DPG's family).

  With d = l - u (= log x):
    f_a'(x)  = (x^(a-1) - 1) / (a - 1),  so  a_hat = -expm1((a-1) d) / (a-1);
    f_a(x)   = [d exprel(a d) - expm1(d)] / (a - 1)           (used when |a - 1| >= 1/2)
             = [e^d d exprel((a-1) d) - expm1(d)] / a         (used when |a - 1| <  1/2)
  where exprel(z) = expm1(z) / z. Multiplying by e^u, every term is an `exp_expm1_over`:
    weighted = [E(u, d, a) - E(u, d, 1)] / (a - 1) = [E(l, d, a-1) - E(u, d, 1)] / a.
  Both forms are exact for every a and continuous in it: exprel(z) -> 1 carries the limits, so
  an a within 1e-3 (or 1e-9) of 1 or 0 is neither divided by ~0 nor snapped to the limit (snapping
  would cost O(|a - 1|) relative error at |l - u| ~ 40). The limits themselves: a -> 1 gives
  f_1(x) = x log x - (x - 1), i.e. kl minus the linear term (x - 1); a -> 0 gives
  f_0(x) = -log x + (x - 1), i.e. rkl plus (x - 1). A linear term c (x - 1) changes neither an
  f-divergence between normalised distributions nor the LAD optimum (its weighted form is
  c (r - e^u), whose expectation under pi_old is constant in theta), but it does shift a_hat by
  the constant -c: a_hat(alpha:1) = a_hat(kl) + 1 and a_hat(alpha:0) = a_hat(rkl) - 1.

  Exponents saturate at `MAX_EXP` (only reachable for a outside [-0.5, 2] with l, u clamped to
  +-20), keeping values and gradients finite.

  Args:
    a: the alpha parameter, any finite float.

  Returns:
    The `Divergence` named "alpha:<a>".
  """
  a = float(a)
  if not math.isfinite(a):
    raise ValueError(f"alpha divergence needs a finite a, got {a!r}.")
  name = f"alpha:{a:.10g}"

  def f(x):
    if a == 1.0:
      return x * jnp.log(x) - (x - 1.0)
    if a == 0.0:
      return -jnp.log(x) + (x - 1.0)
    return (jnp.power(x, a) - 1.0 - a * (x - 1.0)) / (a * (a - 1.0))

  def weighted(l, u):
    d = l - u
    if abs(a - 1.0) >= 0.5:
      return (exp_expm1_over(u, d, a) - exp_expm1_over(u, d, 1.0)) / (a - 1.0)
    return (exp_expm1_over(l, d, a - 1.0) - exp_expm1_over(u, d, 1.0)) / a

  def a_hat(l, u):
    return -exp_expm1_over(jnp.zeros_like(l - u), l - u, a - 1.0)

  return Divergence(name=name, f=f, weighted=weighted, a_hat=a_hat, strict=0.0 < a < 1.0)


def custom(
    f: Callable[[Array], Array], *, name: str = "custom", strict: bool = False
) -> Divergence:
  """A Divergence from any user-supplied convex generator f (f(1) = 0), with f' by autodiff.

  `weighted(l, u) = e^u f(e^(l-u))` is evaluated directly and `a_hat = -f'(e^(l-u))` comes from
  `jax.grad(f)` mapped over elements, so numerical stability is the user's responsibility: with l
  and u clamped to +-20 (as `lad.practical_per_token` does) x lies in [e^-40, e^40], which f and f'
  must handle without overflow. Prefer adding a log-space built-in for anything used at scale.

  Args:
    f: elementwise scalar function of x > 0, convex, f(1) = 0.
    name: shown in the registry name, as "custom:<name>".
    strict: whether to flag it as a strict divergence.

  Returns:
    The `Divergence`.
  """
  if not callable(f):
    raise ValueError(f"custom divergence needs a callable f(x), got {type(f).__name__}.")
  f_prime = jnp.vectorize(jax.grad(lambda x: jnp.asarray(f(x)).reshape(())))

  def weighted(l, u):
    return jnp.exp(u) * f(jnp.exp(l - u))

  def a_hat(l, u):
    x = jnp.exp(l - u)
    return -f_prime(x)

  label = name if name.startswith("custom") else f"custom:{name}"
  return Divergence(name=label, f=f, weighted=weighted, a_hat=a_hat, strict=strict)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

_BUILTINS: dict[str, Callable[[], Divergence]] = {
    "kl": _kl,
    "rkl": _rkl,
    "jeffreys": _jeffreys,
    "tv": _tv,
    "hellinger": _hellinger,
    "js": _js,
}

DivergenceLike = Union[str, Divergence, Callable[[Array], Array]]


def names() -> list[str]:
  """Names of the built-in divergences (the alpha family is "alpha:<a>" for any float a)."""
  return sorted(_BUILTINS)


def get(spec: DivergenceLike) -> Divergence:
  """Resolves a divergence from a name, "alpha:<a>", a `Divergence`, or a convex callable f.

  Raises:
    ValueError: unknown name or malformed "alpha:<a>", listing what is valid.
  """
  if isinstance(spec, Divergence):
    return spec
  if isinstance(spec, str):
    key = spec.strip().lower()
    if key in _BUILTINS:
      return _BUILTINS[key]()
    if key.startswith("alpha:"):
      try:
        a = float(key[len("alpha:"):])
      except ValueError:
        raise ValueError(
            f"Malformed alpha divergence {spec!r}; write it as 'alpha:<a>' with a float a, e.g."
            " 'alpha:0.5'."
        ) from None
      return alpha(a)
    raise ValueError(
        f"Unknown divergence {spec!r}; valid divergences: {', '.join(names())}, 'alpha:<a>' for"
        " any finite float a (e.g. 'alpha:0.5'), or a convex callable f(x) (see"
        " divergences.custom)."
    )
  if callable(spec):
    return custom(spec, name=getattr(spec, "__name__", "custom"))
  raise ValueError(
      f"Cannot make a divergence from {type(spec).__name__}; pass a name ({', '.join(names())},"
      " 'alpha:<a>'), a Divergence, or a convex callable f(x)."
  )
