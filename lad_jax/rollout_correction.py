"""The sampler-trainer mismatch: its metrics and an optional importance-sampling correction.

The sampler draws responses from pi_beh (its own numerics: cache layout, dtype, kernels), while
every objective is an expectation under pi_old, the trainer's scoring of the same parameters
(`train.recompute_old_logp`). With rho = pi_old / pi_beh per token,

  E_{y ~ pi_old}[g(y)] = E_{y ~ pi_beh}[rho(y) g(y)],

so a per-token loss term g is corrected by multiplying it by a stop-gradiented weight w
(verl's rollout correction, TRL's `vllm_importance_sampling_correction`, tunix's token TIS):

  level "token":     rho_t = exp(old_logp_t - beh_logp_t)
  level "sequence":  rho = exp(sum_t mask_t (old_logp_t - beh_logp_t)), the same for every token
  mode "truncate":   w = min(rho, cap)                          (TIS: bias for bounded variance)
  mode "mask":       w = rho on tokens / sequences with rho in [1 / cap, cap], and those outside
                     leave the loss mask (MIS: they get no gradient and no share of the
                     aggregation's denominator, as verl's mask mode)

For LAD the weight multiplies the Eq. 8 term e^u f(x) (and so the Eq. 9 gradient): LAD's ratio
r = pi_theta / pi_old and its target pi_old e^(A/eta) are unchanged; only the sampling
distribution of the expectation is corrected from pi_beh to pi_old. The same holds for every
objective: the weight multiplies its per-token loss before `losses.aggregate`.

  w_NL, mask_NL = weights(beh_logp_NL, old_logp_NL, mask_NL, level="token", mode="truncate",
                          cap=2.0)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

LEVELS = ("off", "token", "sequence")
MODES = ("truncate", "mask")
# exp of a log-ratio beyond this is clamped (e^20 ~ 4.9e8), as `losses.LOG_RATIO_CLIP`.
_LOG_RHO_CLIP = 20.0


class Correction(NamedTuple):
  """The IS weights [N, L] (f32, stop-gradiented, 0 off the mask) and the loss mask after
  rejection (mask mode; unchanged under truncate)."""

  weights: Array
  mask: Array


def _log_rho(beh_logp_NL: Array, old_logp_NL: Array, mask_NL: Array, level: str) -> Array:
  diff_NL = jnp.where(mask_NL, old_logp_NL.astype(jnp.float32)
                      - beh_logp_NL.astype(jnp.float32), 0.0)
  if level == "sequence":
    diff_NL = jnp.broadcast_to(jnp.sum(diff_NL, axis=1, keepdims=True), diff_NL.shape)
  return jnp.clip(diff_NL, -_LOG_RHO_CLIP, _LOG_RHO_CLIP)


def weights(beh_logp_NL: Array, old_logp_NL: Array, mask_NL: Array, *, level: str, mode: str,
            cap: float) -> Correction:
  """IS weights of the pi_beh -> pi_old correction (module docstring).

  Args:
    beh_logp_NL: [N, L] the sampler's log-probs of its tokens.
    old_logp_NL: [N, L] the trainer's (recomputed) log-probs of the same tokens.
    mask_NL: [N, L] bool, the response tokens in the loss.
    level: "off" (weights 1, mask unchanged), "token" or "sequence".
    mode: "truncate" or "mask".
    cap: C > 1: truncate at C, or keep rho in [1 / C, C].
  """
  if level not in LEVELS or mode not in MODES:
    raise ValueError(f"rollout correction level {level!r} / mode {mode!r}: valid levels "
                     f"{LEVELS}, modes {MODES}.")
  if not cap > 1.0:
    raise ValueError(f"rollout correction cap must be > 1, got {cap!r}.")
  mask_NL = mask_NL.astype(bool)
  if level == "off":
    return Correction(mask_NL.astype(jnp.float32), mask_NL)
  log_rho_NL = jax.lax.stop_gradient(_log_rho(beh_logp_NL, old_logp_NL, mask_NL, level))
  rho_NL = jnp.exp(log_rho_NL)
  if mode == "truncate":
    return Correction(jnp.where(mask_NL, jnp.minimum(rho_NL, cap), 0.0), mask_NL)
  log_cap = jnp.log(jnp.float32(cap))
  keep_NL = mask_NL & (jnp.abs(log_rho_NL) <= log_cap)
  return Correction(jnp.where(keep_NL, rho_NL, 0.0), keep_NL)


def mismatch_metrics(beh_logp_NL: Array, old_logp_NL: Array, mask_NL: Array
                     ) -> dict[str, Array]:
  """How far the sampler's log-probs are from the trainer's, over the masked tokens.

  rollout/logp_diff_abs_mean, rollout/logp_diff_max (of |old - beh|), and
  rollout/probs_pearson: the Pearson correlation of the two token probabilities (verl's
  `rollout_probs_diff` / `pearson` diagnostics use probabilities, which weight the tokens that
  carry the mass; log-probs would be dominated by rare tokens).
  """
  m_NL = mask_NL.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m_NL), 1.0)
  diff_NL = jnp.abs(old_logp_NL.astype(jnp.float32) - beh_logp_NL.astype(jnp.float32)) * m_NL
  p_old, p_beh = jnp.exp(old_logp_NL.astype(jnp.float32)), jnp.exp(beh_logp_NL.astype(jnp.float32))
  mean_old, mean_beh = jnp.sum(p_old * m_NL) / n, jnp.sum(p_beh * m_NL) / n
  d_old, d_beh = (p_old - mean_old) * m_NL, (p_beh - mean_beh) * m_NL
  denom = jnp.sqrt(jnp.sum(d_old ** 2) * jnp.sum(d_beh ** 2))
  pearson = jnp.where(denom > 0, jnp.sum(d_old * d_beh) / jnp.where(denom > 0, denom, 1.0), 1.0)
  return {"rollout/logp_diff_abs_mean": jnp.sum(diff_NL) / n,
          "rollout/logp_diff_max": jnp.max(diff_NL),
          "rollout/probs_pearson": pearson}


def weight_metrics(c: Correction, mask_NL: Array) -> dict[str, Array]:
  """rollout_corr/weight_mean (over the kept tokens) and rollout_corr/masked_fraction (of the
  original tokens that mask mode rejected)."""
  m = mask_NL.astype(jnp.float32)
  kept = c.mask.astype(jnp.float32)
  return {"rollout_corr/weight_mean": jnp.sum(c.weights * kept) / jnp.maximum(jnp.sum(kept), 1.0),
          "rollout_corr/masked_fraction": 1.0 - jnp.sum(kept) / jnp.maximum(jnp.sum(m), 1.0)}
