"""Objectives: shared inputs, aggregation, KL-to-reference estimators, and the registry.

Every objective is a pure per-token function (see `lad_jax.lad` for LAD, `lad_jax.baselines` for
GRPO/DAPO, Dr.GRPO, FlowRL, KL-Cov, Clip-Cov, EntAdv, alpha-DPG). Masking and reduction happen once,
in `aggregate`, so every objective is reduced the same way, exactly as verl's `agg_loss` does.

The trainer and the bandit use objectives through the registry:

  objective = losses.get("lad", divergence="js", eta=0.25)
  per_token_BT, metrics = objective(inputs, key=key)
  loss = losses.aggregate(per_token_BT, inputs.mask, objective.agg_mode)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Optional

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")


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
  log_ratio = ref_logp - logp
  if estimator == "k1":
    return -log_ratio
  if estimator == "k2":
    return 0.5 * jnp.square(log_ratio)
  if estimator in ("k3", "low_var_kl"):
    log_ratio = jnp.clip(log_ratio, -20.0, 20.0)
    return jnp.clip(jnp.expm1(log_ratio) - log_ratio, -clip, clip)
  raise ValueError(f"Unknown KL estimator {estimator!r}; valid estimators: {', '.join(KL_ESTIMATORS)}.")


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

ObjectiveFn = Callable[..., tuple[Array, dict[str, Array]]]


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """How the trainer should run one registered objective.

  Attributes:
    name: registry name.
    fn: `fn(inputs: LossInputs, *, key, **hparams) -> (per_token [B, T], metrics)`; the metrics are
      scalars (clip fractions, ratio stats, ...), already masked.
    agg_mode: the aggregation its authors use.
    advantage_estimator: the advantage estimator its authors use (see `lad_jax.advantages`).
    needs: which optional `LossInputs` fields it reads ("ref_logp", "entropy", "log_z").
    doc: one line for listings.
  """

  name: str
  fn: ObjectiveFn
  agg_mode: str = "token-mean"
  advantage_estimator: str = "grpo"
  needs: tuple[str, ...] = ()
  doc: str = ""


@dataclasses.dataclass(frozen=True)
class Objective:
  """A registered objective bound to its hyperparameters: `objective(inputs, key=key)`."""

  spec: ObjectiveSpec
  hparams: Mapping[str, Any]
  agg_mode: str

  @property
  def name(self) -> str:
    return self.spec.name

  def __call__(self, inputs: LossInputs, *, key: Optional[Array] = None):
    for field in self.spec.needs:
      if getattr(inputs, field) is None:
        raise ValueError(f"Objective {self.spec.name!r} needs LossInputs.{field}, which is None.")
    return self.spec.fn(inputs, key=key, **self.hparams)

  def loss(self, inputs: LossInputs, *, key: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
    """Scalar loss (aggregated with `agg_mode`) and metrics."""
    per_token, metrics = self(inputs, key=key)
    return aggregate(per_token, inputs.mask, self.agg_mode), metrics


def _registry() -> dict[str, ObjectiveSpec]:
  # Imported here so lad.py / baselines.py can import the helpers above without a cycle.
  from lad_jax import baselines, lad  # pylint: disable=g-import-not-at-top

  specs: dict[str, ObjectiveSpec] = {}
  for module in (lad, baselines):
    for spec in module.OBJECTIVES:
      if spec.name in specs:
        raise RuntimeError(f"Objective {spec.name!r} registered twice.")
      specs[spec.name] = spec
  return specs


def names() -> list[str]:
  """Names of all registered objectives, sorted."""
  return sorted(_registry())


def get(name: str, *, agg_mode: Optional[str] = None, **hparams) -> Objective:
  """Looks up a registered objective and binds its keyword-only hyperparameters.

  Raises:
    ValueError: unknown name (listing the valid ones), unknown hyperparameter (listing the
      accepted ones), or unknown aggregation mode.
  """
  specs = _registry()
  if name not in specs:
    raise ValueError(f"Unknown objective {name!r}; valid objectives: {', '.join(sorted(specs))}.")
  spec = specs[name]
  params = inspect.signature(spec.fn).parameters
  accepted = [p for p, v in params.items() if v.kind == inspect.Parameter.KEYWORD_ONLY and p != "key"]
  unknown = sorted(set(hparams) - set(accepted))
  if unknown:
    raise ValueError(
        f"Objective {name!r} got unknown hyperparameter(s) {unknown}; it accepts: {', '.join(accepted)}."
    )
  mode = spec.agg_mode if agg_mode is None else agg_mode
  if mode not in AGG_MODES:
    raise ValueError(f"Unknown aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}.")
  return Objective(spec=spec, hparams=dict(hparams), agg_mode=mode)
