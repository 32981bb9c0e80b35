"""LAD: Learning Advantage Distributions (Li & Li 2026), practical and theoretical objectives.

Notation (per token of a response, DESIGN §2): `l = logp - old_logp`, `r = e^l`, `u = A / eta`,
`x = r e^(-u)`. The policy-induced distribution `P_pi ∝ pi_theta / pi_old` (Eq. 4) is matched to
the advantage distribution `P_A ∝ e^(A/eta)` (Eq. 5) with an f-divergence (Eq. 6):

  theoretical (Eq. 7): sum_y P_A(y) f(P_pi(y) / P_A(y))      needs every action y (bandit arms);
  practical   (Eq. 8): E_{y ~ pi_old}[e^u f(x)]               one term per sampled token;
  gradient    (Eq. 9): E_{y ~ pi_old}[f'(x) r grad log pi_theta(y)].

Both share the optimum pi* ∝ pi_old e^(A/eta) (Lemma 3.2) for strictly convex f. TV is not
strictly convex: its practical loss is minimised by every pi <= pi_old e^(A/eta) (elementwise)
whenever E_old[e^(A/eta)] >= 1, e.g. for advantages with zero mean under pi_old (DESIGN §2,
Correction); its theoretical loss keeps the unique optimum. The per-token
value is the Eq. 8 term and its gradient is exactly the Eq. 9 term, computed as the gradient of
the surrogate `-sg(a_hat) r` with `a_hat = -f'(x)` (see `lad_jax.divergences`), which is better
conditioned than differentiating `e^u f(x)`: at u = 10 the value is ~1e4 while the gradient is ~5.

`ratio_level` ("token" by default, "sequence", "sequence_mean") chooses whether the ratio is each
token's, the whole response's pi_theta(y) / pi_old(y) (Eq. 4 over responses: exact mode then has
the sequence-level optimum pi*(y) ∝ pi_old(y) e^(A(y)/eta)), or GSPO's length-normalised one; see
`practical`.

Usage:

  objective = objectives.get("lad", divergence="js", eta=0.25)
  per_token_BT, metrics = objective(inputs)
  loss = losses.aggregate(per_token_BT, inputs.mask, objective.agg_mode)
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from lad_jax import divergences
from lad_jax import losses

Array = jax.Array
sg = jax.lax.stop_gradient

# Logits of masked actions in the theoretical loss: exp(-1e9 - max) is exactly 0 in fp32, and unlike
# -inf it keeps a fully masked row finite (uniform) instead of NaN.
_MASKED_LOGIT = -1e9
# Which log-ratio practical LAD matches per token: its own, the response's sum (the sequence ratio
# pi_theta(y) / pi_old(y)), or the response's mean (GSPO's length-normalised ratio).
RATIO_LEVELS = ("token", "sequence", "sequence_mean")


def _compute_dtype(*arrays: Array) -> jnp.dtype:
  """float32 at least (bf16 inputs are upcast); float64 inputs stay float64."""
  return jnp.result_type(jnp.float32, *[a.dtype for a in arrays])


def _check_positive(name: str, value) -> None:
  # Hyperparameters may be traced (vmapped sweeps); only concrete Python numbers can be checked.
  if isinstance(value, (int, float)) and not value > 0:
    raise ValueError(f"LAD needs {name} > 0, got {value!r}.")


def _check_ratio_level(ratio_level: str) -> None:
  if ratio_level not in RATIO_LEVELS:
    raise ValueError(f"LAD's ratio_level must be one of {', '.join(RATIO_LEVELS)}; got "
                     f"{ratio_level!r}.")


def _lad_terms(l: Array, u: Array, div: divergences.Divergence) -> dict[str, Array]:
  """Value e^u f(x) (Eq. 8) and, as gradient, f'(x) r grad l (Eq. 9), from a differentiable
  clamped log-ratio l and a clamped constant u of broadcastable shapes."""
  l_const = sg(l)
  value = div.weighted(l_const, u)
  a_hat = sg(div.a_hat(l_const, u))
  r = jnp.exp(l)
  # d surrogate / d l = -a_hat r = f'(x) r, the Eq. 9 term; its forward value cancels exactly.
  surrogate = -a_hat * r
  loss = sg(value) + (surrogate - sg(surrogate))
  return dict(loss=loss, l=l_const, r=sg(r), a_hat=a_hat, value=sg(value))


def _sequence_advantage(advantages: Array, valid_BT: Array, dtype) -> Array:
  """[B, 1] sequence advantage: [B] as is, [B, T] by its mean over valid tokens (constant)."""
  if advantages.ndim == 1:
    chex.assert_shape(advantages, (valid_BT.shape[0],))
    return sg(advantages.astype(dtype))[:, None]
  chex.assert_equal_shape([advantages, valid_BT])
  total_B = jnp.where(valid_BT, advantages.astype(dtype), 0.0).sum(axis=1)
  return sg(total_B / jnp.maximum(valid_BT.sum(axis=1), 1).astype(dtype))[:, None]


def _sequence_parts(logp, old_logp, advantages, valid_BT, *, div, ratio_level, eta, log_ratio_clip,
                    clip_adv, dtype) -> dict[str, Array]:
  """Practical LAD with one ratio per response (l [B, 1]), broadcast to its valid tokens."""
  l_B1 = losses.sequence_log_ratio(
      logp, old_logp, valid_BT, length_normalise=ratio_level == "sequence_mean",
      clip=log_ratio_clip)[:, None]
  u_B1 = jnp.clip(_sequence_advantage(advantages, valid_BT, dtype) / eta, -clip_adv, clip_adv)
  parts = _lad_terms(l_B1, u_B1, div)
  return {k: jnp.where(valid_BT, jnp.broadcast_to(v, logp.shape), 0.0) for k, v in parts.items()}


def _practical_parts(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Optional[Array],
    *,
    divergence: divergences.DivergenceLike,
    eta,
    log_ratio_clip,
    clip_adv,
    ratio_level: str = "token",
) -> dict[str, Array]:
  """Pieces of practical LAD, all [B, T]: loss, l, r, a_hat, value (of the ratio each token's
  loss uses, per token or per response) and token_l (the per-token log-ratio, for ppo_kl)."""
  chex.assert_rank(logp, 2)
  chex.assert_equal_shape([logp, old_logp])
  _check_positive("eta", eta)
  _check_positive("log_ratio_clip", log_ratio_clip)
  _check_positive("clip_adv", clip_adv)
  _check_ratio_level(ratio_level)
  div = divergences.get(divergence)
  dtype = _compute_dtype(logp, old_logp, advantages)
  logp, old_logp = logp.astype(dtype), old_logp.astype(dtype)
  if mask is not None:
    # Padding may hold anything (even -inf log-probs): give it l = 0 so everything stays finite,
    # and a value and gradient of exactly 0 (below).
    valid_BT = mask > 0
    logp, old_logp = jnp.where(valid_BT, logp, 0.0), jnp.where(valid_BT, old_logp, 0.0)
  if ratio_level != "token":
    valid_BT = jnp.ones(logp.shape, bool) if mask is None else valid_BT
    parts = _sequence_parts(logp, old_logp, advantages, valid_BT, div=div, ratio_level=ratio_level,
                            eta=eta, log_ratio_clip=log_ratio_clip, clip_adv=clip_adv, dtype=dtype)
    return dict(parts, token_l=sg(losses.log_ratio(logp, old_logp, clip=log_ratio_clip)))
  if advantages.ndim == 1:
    # Sequence advantages stay [B, 1] and broadcast inside the divergence, so e^u and friends are
    # computed once per response rather than once per token.
    chex.assert_shape(advantages, (logp.shape[0],))
    u_BT = sg(advantages.astype(dtype))[:, None] / eta
  else:
    u_BT = sg(losses.token_advantages(advantages, logp.shape).astype(dtype)) / eta
  # Clamp before any exp (verl clamps l to +-20); u is clamped too because e^u appears in the value
  # and in a_hat: |A/eta| > 20 would mean a target weight e^20 ~ 5e8 times the old probability.
  l_BT = losses.log_ratio(logp, old_logp, clip=log_ratio_clip)
  u_BT = jnp.clip(u_BT, -clip_adv, clip_adv)
  parts = _lad_terms(l_BT, u_BT, div)
  if mask is not None:
    parts["loss"] = jnp.where(valid_BT, parts["loss"], 0.0)
  return dict(parts, token_l=parts["l"])


def practical_per_token(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    *,
    divergence: divergences.DivergenceLike = "js",
    eta=1.0,
    log_ratio_clip=losses.LOG_RATIO_CLIP,
    clip_adv=20.0,
    mask: Optional[Array] = None,
    ratio_level: str = "token",
) -> Array:
  """Practical LAD per token: value e^u f(x) (Eq. 8 term), gradient f'(x) r grad logp (Eq. 9).

  `l = clip(logp - old_logp, +-log_ratio_clip)` (`losses.log_ratio`) and
  `u = clip(A / eta, +-clip_adv)` before any exp; a clamped l has zero gradient, as in verl. Math
  runs in float32 at least, whatever the input dtype. old_logp and advantages are constants
  (stop_gradient).

  With `ratio_level` "sequence" or "sequence_mean" every valid token of a response carries that
  response's term, with l the response's clamped summed (or mean) log-ratio
  (`losses.sequence_log_ratio`) and u its sequence advantage; see `practical`.

  Args:
    logp: [B, T] log pi_theta of the sampled tokens (differentiable).
    old_logp: [B, T] log pi_old of the same tokens.
    advantages: [B] sequence advantages (broadcast to tokens) or [B, T] per-token advantages (at
      the sequence levels reduced to their mean over each response's valid tokens).
    divergence: a name ("js", "tv", "alpha:0.5", ...), a `divergences.Divergence`, or a convex
      callable f; see `divergences.get`.
    eta: temperature of the advantage distribution P_A ∝ e^(A/eta) (the authors' kappa = 1/eta).
    log_ratio_clip: clamp of l (`losses.LOG_RATIO_CLIP`, shared with every baseline).
    clip_adv: clamp of u = A / eta.
    mask: optional [B, T]; tokens with mask 0 get l = 0 and a value and gradient of exactly 0,
      which makes arbitrary padding values (even -inf) harmless. Reduction is still
      `losses.aggregate`'s. At the sequence levels it also says which tokens a response has
      (None: all T).
    ratio_level: one of `RATIO_LEVELS`: "token", "sequence" or "sequence_mean".

  Returns:
    [B, T] per-token loss (float32, or float64 for float64 inputs).
  """
  return _practical_parts(
      logp, old_logp, advantages, mask, divergence=divergence, eta=eta,
      log_ratio_clip=log_ratio_clip, clip_adv=clip_adv, ratio_level=ratio_level,
  )["loss"]


def practical(
    inputs: losses.LossInputs,
    *,
    key: Optional[Array] = None,
    divergence: divergences.DivergenceLike = "js",
    eta=1.0,
    log_ratio_clip=losses.LOG_RATIO_CLIP,
    clip_adv=20.0,
    ratio_level: str = "token",
) -> tuple[Array, dict[str, Array]]:
  """Registry adapter for practical LAD (paper Eq. 8 / Eq. 9); see `practical_per_token`.

  ratio_level picks the ratio r of x = r e^(-u), with l = log r clamped to +-log_ratio_clip:
    "token" (default): l_t = logp_t - old_logp_t per token; registry aggregation token-mean.
    "sequence": l = sum_t mask_t (logp_t - old_logp_t), so r = pi_theta(y) / pi_old(y), the ratio
      of Eq. 4 applied to whole responses, and u = A(y) / eta the sequence advantage.
    "sequence_mean": l = that sum / the response's valid tokens (GSPO's length-normalised ratio).
  At the sequence levels each valid token of a response holds the response's Eq. 8 term
  e^u f(x), and its gradient is the whole response's Eq. 9 term f'(x) r grad l. So with
  "seq-mean-token-mean" (which `objectives.get` picks for these levels, as verl's GSPO) each
  response contributes e^u f(x) once, and the gradient of the loss is the batch mean of
  f'(x) r grad log pi_theta(y) ("sequence"; "sequence_mean" has grad l = grad log pi_theta(y) / n).
  Other modes weight responses differently (token-mean by their length).

  In exact mode (every response y enumerated, weighted by pi_old(y)) sequence-level LAD with a
  strictly convex f is Lemma 3.2 over responses: its optimum is pi*(y) ∝ pi_old(y) e^(A(y)/eta).
  Token-level LAD matches each token's ratio instead and has a different optimum (for KL, per
  token pi_old e^(Q/eta) with Q the expected advantage of the token); "sequence_mean" has no such
  closed form.

  Args:
    inputs: `LossInputs` with logp, old_logp [B, T], advantages [B] or [B, T], mask [B, T].
    key: unused (LAD is deterministic).
    divergence, eta, log_ratio_clip, clip_adv, ratio_level: as in `practical_per_token`.

  Returns:
    (per_token [B, T], metrics) with masked means over valid tokens:
      ratio_mean: the r each token's loss uses (at the sequence levels its response's, so
      responses count by length); ppo_kl: -l_t per token (verl's definition, after the clamp, at
      every level); log_ratio_abs_mean: |l_t| per token (the policy's movement from pi_old,
      comparable with the baselines'); lad/a_hat_mean: the effective advantage -f'(x); lad/value: the Eq. 8 term
      e^u f(x).
  """
  del key
  parts = _practical_parts(
      inputs.logp, inputs.old_logp, inputs.advantages, inputs.mask, divergence=divergence,
      eta=eta, log_ratio_clip=log_ratio_clip, clip_adv=clip_adv, ratio_level=ratio_level,
  )
  mask_BT = inputs.mask
  metrics = {
      "ratio_mean": losses.masked_mean(parts["r"], mask_BT),
      "ppo_kl": losses.masked_mean(-parts["token_l"], mask_BT),
      "log_ratio_abs_mean": losses.masked_mean(jnp.abs(parts["token_l"]), mask_BT),
      "lad/a_hat_mean": losses.masked_mean(parts["a_hat"], mask_BT),
      "lad/value": losses.masked_mean(parts["value"], mask_BT),
  }
  return parts["loss"], metrics


def theoretical_terms(
    logp_K: Array,
    old_logp_K: Array,
    advantages_K: Array,
    *,
    divergence: divergences.DivergenceLike = "js",
    eta=1.0,
    mask_K: Optional[Array] = None,
    clip_log_prob=30.0,
) -> Array:
  """Per-action terms P_A(k) f(P_pi(k) / P_A(k)) of theoretical LAD (Eq. 7); sum over k = loss.

  P_pi = softmax(logp - old_logp) (Eq. 4) and P_A = softmax(A / eta) (Eq. 5) over the last axis,
  restricted to valid actions when mask_K is given. Each term is the log-space
  `weighted(log P_pi, log P_A)`, with value and gradient built as in `practical_per_token`
  (gradient f'(P_pi/P_A) grad P_pi). For the value and f' only, log P_pi and log P_A are clamped
  below at -clip_log_prob (probabilities under e^-30 ~ 1e-13), so e^(log P_A - log P_pi) stays
  finite; the gradient still flows to such actions, with f' saturated.

  Args:
    logp_K: [..., K] log pi_theta over all K actions (differentiable; need not be normalised).
    old_logp_K: [..., K] log pi_old.
    advantages_K: [..., K] advantage of every action.
    divergence: see `divergences.get`.
    eta: temperature of P_A.
    mask_K: optional [..., K]; 0 marks invalid actions, which get P = 0 and a 0 term. A fully
      masked row gives 0 (and zero gradient), not NaN.
    clip_log_prob: lower clamp of the log-probabilities.

  Returns:
    [..., K] per-action terms (0 on masked actions).
  """
  chex.assert_equal_shape([logp_K, old_logp_K, advantages_K])
  _check_positive("eta", eta)
  div = divergences.get(divergence)
  dtype = _compute_dtype(logp_K, old_logp_K, advantages_K)
  logits_K = logp_K.astype(dtype) - sg(old_logp_K.astype(dtype))
  adv_logits_K = sg(advantages_K.astype(dtype)) / eta
  if mask_K is None:
    valid_K = jnp.ones(logp_K.shape, bool)
  else:
    chex.assert_equal_shape([logp_K, mask_K])
    valid_K = mask_K > 0
    logits_K = jnp.where(valid_K, logits_K, _MASKED_LOGIT)
    adv_logits_K = jnp.where(valid_K, adv_logits_K, _MASKED_LOGIT)
  # Masked actions become a matched pair (l = u = 0): finite, and zero after the final `where`.
  l_K = jnp.where(valid_K, jax.nn.log_softmax(logits_K, axis=-1), 0.0)
  u_K = jnp.where(valid_K, jax.nn.log_softmax(adv_logits_K, axis=-1), 0.0)
  # Only the value and a_hat see the clamp; the surrogate multiplies by the unclamped
  # P_pi = e^l <= 1, so an action whose P_pi fell below e^-clip still gets pushed back up (with a
  # saturated weight) instead of losing its gradient.
  l_const_K = jnp.maximum(sg(l_K), -clip_log_prob)
  u_K = jnp.maximum(u_K, -clip_log_prob)
  value_K = div.weighted(l_const_K, u_K)
  a_hat_K = sg(div.a_hat(l_const_K, u_K))
  surrogate_K = -a_hat_K * jnp.exp(l_K)
  terms_K = sg(value_K) + (surrogate_K - sg(surrogate_K))
  return jnp.where(valid_K, terms_K, 0.0)


def theoretical(
    logp_K: Array,
    old_logp_K: Array,
    advantages_K: Array,
    *,
    divergence: divergences.DivergenceLike = "js",
    eta=1.0,
    mask_K: Optional[Array] = None,
    clip_log_prob=30.0,
) -> Array:
  """Theoretical LAD, paper Eq. 7: D_f(P_A || P_pi) = sum_k P_A(k) f(P_pi(k) / P_A(k)).

  Its unique optimum (for strictly convex f, TV included here because P_pi is normalised) is
  P_pi = P_A, i.e. pi* ∝ pi_old e^(A/eta). See `theoretical_terms` for arguments.

  Returns:
    [...] the divergence for every leading index (the last axis K is summed).
  """
  return theoretical_terms(
      logp_K, old_logp_K, advantages_K, divergence=divergence, eta=eta, mask_K=mask_K,
      clip_log_prob=clip_log_prob,
  ).sum(axis=-1)


def theoretical_objective(
    inputs: losses.LossInputs,
    *,
    key: Optional[Array] = None,
    divergence: divergences.DivergenceLike = "js",
    eta=1.0,
    clip_log_prob=30.0,
) -> tuple[Array, dict[str, Array]]:
  """Registry adapter for theoretical LAD (Eq. 7) over a full action axis.

  Interpretation of `LossInputs` (differs from the per-token objectives): each of the B rows is one
  state, and the second axis is the K actions, not time:
    logp, old_logp: [B, K] log pi_theta / log pi_old of every action;
    advantages: [B, K] advantage of every action ([B] is rejected);
    mask: [B, K], 0 on invalid actions.
  The per-"token" output [B, K] holds the per-action terms P_A f(P_pi / P_A), so each row sums to
  that row's Eq. 7 value and the registered aggregation "seq-mean-token-sum" (sum / B) gives the
  mean over rows of Eq. 7. Fully masked rows count as rows with loss 0. Other aggregation modes
  give other (not meaningful) normalisations.

  There is no `ratio_level` here: the second axis enumerates actions, not the tokens of one
  response, so there is no per-token ratio to replace. Sequence-level theoretical LAD is this
  function with the K actions being whole responses: pass each response's summed log-probs
  (log pi_theta(y), log pi_old(y)) and A(y) as the [B, K] inputs.

  Returns:
    (per_action [B, K], metrics): lad/value is the mean over rows of Eq. 7; lad/tv_to_target the
    mean total variation between P_pi and P_A.
  """
  del key
  if inputs.advantages.ndim != 2:
    raise ValueError(
        "lad_theoretical needs advantages of every action, shaped [B, K] like logp; got shape"
        f" {inputs.advantages.shape}. Use 'lad' for sequence advantages of sampled responses."
    )
  per_action_BK = theoretical_terms(
      inputs.logp, inputs.old_logp, inputs.advantages, divergence=divergence, eta=eta,
      mask_K=inputs.mask, clip_log_prob=clip_log_prob,
  )
  dtype = per_action_BK.dtype
  valid_BK = inputs.mask > 0
  p_pi_BK = jax.nn.softmax(
      jnp.where(valid_BK, sg(inputs.logp - inputs.old_logp).astype(dtype), _MASKED_LOGIT), axis=-1)
  p_a_BK = jax.nn.softmax(
      jnp.where(valid_BK, sg(inputs.advantages).astype(dtype) / eta, _MASKED_LOGIT), axis=-1)
  tv_B = 0.5 * jnp.where(valid_BK, jnp.abs(p_pi_BK - p_a_BK), 0.0).sum(axis=-1)
  metrics = {
      "lad/value": sg(per_action_BK).sum(axis=-1).mean(),
      "lad/tv_to_target": tv_B.mean(),
  }
  return per_action_BK, metrics

