"""The pieces every objective shares: inputs, aggregation, the log-ratio clamp (per token and per
response), ratio metrics, KL-to-reference estimators.

Every objective is a pure per-token function (see `lad_jax.lad` for LAD, `lad_jax.baselines` for
GRPO/DAPO, Dr.GRPO, FlowRL, KL-Cov, Clip-Cov, EntAdv, alpha-DPG). Masking and reduction happen once,
in `aggregate`, so every objective is reduced the same way, exactly as verl's `agg_loss` does.

This module imports nothing from lad_jax: `lad`, `baselines` and the registry
(`lad_jax.objectives`) build on it.

  objective = objectives.get("lad", divergence="js", eta=0.25)
  per_token_BT, metrics = objective(inputs, key=key)
  loss = losses.aggregate(per_token_BT, inputs.mask, objective.agg_mode)
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
# The clamp of l = logp - old_logp before any exp, shared by LAD and every baseline: verl's
# `compute_policy_loss_vanilla` clamps l to +-20 (e^20 ~ 4.9e8), shared/reference/baselines.md §2.2.
LOG_RATIO_CLIP = 20.0
_F32_MAX = float(np.finfo(np.float32).max)


@chex.dataclass(frozen=True)
class LossInputs:
  """Everything an objective may read, for a batch of B responses padded to T tokens.

  Attributes:
    logp: [B, T] log pi_theta(y_t | ...) of the sampled tokens; gradients flow through it.
    old_logp: [B, T] log pi_old of the same tokens (behaviour policy, recomputed or sampled).
    advantages: [B] sequence advantages, or [B, T] per-token advantages.
    mask: [B, T] 1 on response tokens that count, 0 on padding / prompt.
    ref_logp: [B, T] log pi_ref, for KL-to-reference terms and FlowRL. Optional.
    entropy: [B, T] per-token entropy of pi_theta (EntAdv shaping). Optional.
    log_z: [B] learned log partition per prompt (FlowRL); gradients flow through it. Optional.
  """

  logp: Array
  old_logp: Array
  advantages: Array
  mask: Array
  ref_logp: Optional[Array] = None
  entropy: Optional[Array] = None
  log_z: Optional[Array] = None


def token_advantages(advantages: Array, shape: tuple[int, int]) -> Array:
  """Broadcasts [B] sequence advantages to [B, T] (a [B, T] input is returned as is)."""
  if advantages.ndim == 1:
    chex.assert_shape(advantages, (shape[0],))
    return jnp.broadcast_to(advantages[:, None], shape)
  chex.assert_shape(advantages, shape)
  return advantages


def aggregate_parts(
    per_token: Array, mask: Array, mode: str, *, norm_length: Optional[float] = None
) -> tuple[Array, Array]:
  """Reduces a per-token loss to `(sum, denominator)` so micro-batches combine exactly.

  The loss of a batch is `sum / denominator`; for a batch split into micro-batches it is
  `sum_i(sum_i) / sum_i(denominator_i)`, identical to reducing the whole batch at once.

  Args:
    per_token: [B, T] loss per token.
    mask: [B, T] validity mask (bool or {0, 1}).
    mode: one of `AGG_MODES` (verl's `loss_agg_mode` names):
      token-mean: sum over valid tokens / number of valid tokens (DAPO).
      seq-mean-token-mean: mean over sequences of each sequence's token mean (GRPO paper).
      seq-mean-token-sum: mean over sequences of each sequence's token sum.
      seq-mean-token-sum-norm: sum over valid tokens / (B * norm_length) (Dr.GRPO); norm_length
        defaults to T, the padded response length, as verl's max_response_length.
    norm_length: the constant length of seq-mean-token-sum-norm.

  Returns:
    (sum, denominator), fp32 scalars. A fully masked batch gives (0, 0) for token-mean; divide
    with `safe_divide` to get 0 rather than NaN.
  """
  chex.assert_rank(per_token, 2)
  chex.assert_equal_shape([per_token, mask])
  mask = mask.astype(jnp.float32)
  # `where` rather than a product, so inf/NaN on padding can never leak into the sum.
  masked = jnp.where(mask > 0, per_token.astype(jnp.float32), 0.0)
  num_seqs = jnp.asarray(per_token.shape[0], jnp.float32)
  if mode == "token-mean":
    return masked.sum(), mask.sum()
  if mode == "seq-mean-token-mean":
    seq_len = mask.sum(axis=-1)
    seq_mean = masked.sum(axis=-1) / jnp.maximum(seq_len, 1.0)
    return seq_mean.sum(), num_seqs
  if mode == "seq-mean-token-sum":
    return masked.sum(), num_seqs
  if mode == "seq-mean-token-sum-norm":
    length = per_token.shape[1] if norm_length is None else norm_length
    return masked.sum(), num_seqs * jnp.asarray(length, jnp.float32)
  raise ValueError(f"Unknown aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}.")


def safe_divide(numerator: Array, denominator: Array) -> Array:
  """numerator / denominator, and 0 where the denominator is 0 (fully masked batches)."""
  safe = jnp.where(denominator > 0, denominator, 1.0)
  return jnp.where(denominator > 0, numerator / safe, 0.0)


def aggregate(
    per_token: Array, mask: Array, mode: str = "token-mean", *, norm_length: Optional[float] = None
) -> Array:
  """Masked reduction of a [B, T] per-token loss to a scalar; see `aggregate_parts`."""
  total, denominator = aggregate_parts(per_token, mask, mode, norm_length=norm_length)
  return safe_divide(total, denominator)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
  """Mean of x over entries where mask is set; 0 when nothing is set."""
  mask = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
  total = jnp.where(mask > 0, x.astype(jnp.float32), 0.0).sum(axis=axis)
  return safe_divide(total, mask.sum(axis=axis))


def kl_penalty(logp: Array, ref_logp: Array, *, estimator: str = "k3", clip: float = 10.0) -> Array:
  """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from pi_theta.

  Schulman's estimators with `l = ref_logp - logp` (verl's `kl_penalty`):
    k1 = -l;  k2 = l^2 / 2;  k3 (`low_var_kl`) = exp(l) - l - 1, clamped to [-clip, clip].

  Args:
    logp: [B, T] log pi_theta (differentiable).
    ref_logp: [B, T] log pi_ref (treated as a constant).
    estimator: one of `KL_ESTIMATORS`.
    clip: k3 clamp as in verl (and the log-ratio clamp before exp).

  Returns:
    [B, T] per-token KL estimate, fp32.
  """
  logp = logp.astype(jnp.float32)
  ref_logp = jax.lax.stop_gradient(ref_logp.astype(jnp.float32))
  l_ref = ref_logp - logp
  if estimator == "k1":
    return -l_ref
  if estimator == "k2":
    return 0.5 * jnp.square(l_ref)
  if estimator in ("k3", "low_var_kl"):
    l_ref = jnp.clip(l_ref, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    return jnp.clip(jnp.expm1(l_ref) - l_ref, -clip, clip)
  raise ValueError(f"Unknown KL estimator {estimator!r}; valid estimators: {', '.join(KL_ESTIMATORS)}.")


def log_ratio(logp: Array, old_logp: Array, *, clip=LOG_RATIO_CLIP) -> Array:
  """l = clip(logp - sg(old_logp), -clip, clip), the clamped log importance ratio (DESIGN §2).

  Every objective clamps l before any exp, as verl does; a clamped l has zero gradient.

  Args:
    logp: [...] log pi_theta (differentiable), e.g. [B, T].
    old_logp: log pi_old, the same shape (treated as a constant).
    clip: the clamp (LAD's and every baseline's `log_ratio_clip`); may be traced.

  Returns:
    l, the shape of logp, in float32 at least (bf16 is upcast, float64 stays float64).
  """
  chex.assert_equal_shape([logp, old_logp])
  dtype = jnp.result_type(jnp.float32, logp.dtype, old_logp.dtype)
  diff = logp.astype(dtype) - jax.lax.stop_gradient(old_logp.astype(dtype))
  return jnp.clip(diff, -clip, clip)


def sequence_log_ratio(
    logp: Array, old_logp: Array, mask: Array, *, length_normalise: bool = False,
    clip=LOG_RATIO_CLIP,
) -> Array:
  """[B] clamped log-ratio of whole responses: log pi_theta(y) / pi_old(y) (paper Eq. 4).

    l_seq = clip(sum_t mask_t (logp_t - sg(old_logp_t)), -clip, clip)
    length_normalise: clip(l_seq_unclamped / n) with n the valid tokens, GSPO's log s_i.

  The token differences are summed (not the two log-likelihoods, which are large and cancel), and
  padding may hold anything (even -inf): `where` keeps it out of the value and the gradient. As in
  `log_ratio`, a clamped l has zero gradient; a fully masked row gives 0.

  Args:
    logp: [B, T] log pi_theta (differentiable).
    old_logp: [B, T] log pi_old (treated as a constant).
    mask: [B, T] validity mask.
    length_normalise: divide by the number of valid tokens (GSPO) instead of summing.
    clip: the clamp (`LOG_RATIO_CLIP`); may be traced.

  Returns:
    [B] log-ratio per response, in float32 at least.
  """
  chex.assert_rank(logp, 2)
  chex.assert_equal_shape([logp, old_logp, mask])
  dtype = jnp.result_type(jnp.float32, logp.dtype, old_logp.dtype)
  valid = mask > 0
  diff = logp.astype(dtype) - jax.lax.stop_gradient(old_logp.astype(dtype))
  total = jnp.where(valid, diff, 0.0).sum(axis=-1)
  if length_normalise:
    total = total / jnp.maximum(valid.sum(axis=-1), 1).astype(dtype)
  return jnp.clip(total, -clip, clip)


def _masked_max_min(x: Array, mask: Array) -> tuple[Array, Array]:
  """(max, min) of x over entries where mask is set; (0, 0) when nothing is set."""
  valid = mask > 0
  any_valid = jnp.any(valid)
  x_max = jnp.max(jnp.where(valid, x, -_F32_MAX))
  x_min = jnp.min(jnp.where(valid, x, _F32_MAX))
  return jnp.where(any_valid, x_max, 0.0), jnp.where(any_valid, x_min, 0.0)


def ratio_metrics(l: Array, mask: Array) -> dict[str, Array]:
  """verl's ppo_kl (masked mean of -l) and the importance-ratio mean/max/min over valid tokens.

  Args:
    l: [B, T] (clamped) log-ratio, e.g. from `log_ratio`; detached here.
    mask: [B, T] validity mask.

  Returns:
    {"ppo_kl", "log_ratio_abs_mean", "ratio_mean", "ratio_max", "ratio_min"}, fp32 scalars (0
    for an empty mask). log_ratio_abs_mean = masked mean |l|: how far the policy has moved from
    pi_old, comparable across objectives (ppo_kl's signed terms cancel).
  """
  l = jax.lax.stop_gradient(l)
  r = jnp.exp(l)
  r_max, r_min = _masked_max_min(r, mask)
  return {
      "ppo_kl": masked_mean(-l, mask),
      "log_ratio_abs_mean": masked_mean(jnp.abs(l), mask),
      "ratio_mean": masked_mean(r, mask),
      "ratio_max": r_max,
      "ratio_min": r_min,
  }
