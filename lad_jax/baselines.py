"""LAD's baselines as per-token objectives: GRPO/DAPO, Dr.GRPO, GSPO, FlowRL, KL-Cov, Clip-Cov,
EntAdv, alpha-DPG and plain policy gradient.

Each objective is a pure function of [B, T] arrays that returns `(per_token_BT, metrics)`; masking
and reduction happen once, in `lad_jax.losses.aggregate`, with the aggregation mode its authors use
(recorded on its registry entry in `lad_jax.objectives`). Each has a registry adapter
`fn(inputs: LossInputs, *, key=None, **hparams)` so that `objectives.get("grpo")` etc. work; DAPO
and Dr.GRPO are `grpo` with other defaults / aggregation, set on their registry entries. Sources,
defaults and the exact behaviour of the public code are in shared/reference/baselines.md (cited
below as "ref §N").

Notation, per token: l = logp - old_logp (clamped to ±log_ratio_clip before any exp, as verl:
`losses.log_ratio`, default `losses.LOG_RATIO_CLIP`), r = exp(l), A = advantage (sequence
advantages are broadcast to tokens). All math is fp32, also for bf16 inputs; advantages, old/ref
log-probs and entropies are constants (stop_gradient).
"""

from __future__ import annotations

from typing import Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lad_jax import losses
from lad_jax.losses import LOG_RATIO_CLIP, LossInputs, log_ratio, masked_mean, ratio_metrics
from lad_jax.losses import token_advantages

Array = jax.Array
Metrics = dict[str, Array]


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------


def _f32(x: Array) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def _const(x: Array) -> Array:
  return jax.lax.stop_gradient(_f32(x))


def _valid(x_BT: Array, valid_BT: Array) -> Array:
  """fp32 x with padding set to 0, so padding may hold anything (even inf/NaN) without reaching a
  value or a gradient: `where` gives the padding a zero cotangent, never 0 * inf."""
  return jnp.where(valid_BT, _f32(x_BT), 0.0)


def _check_key(key: Optional[Array], name: str) -> Array:
  if key is None:
    raise ValueError(f"Objective {name!r} samples tokens at random: pass key=jax.random.key(...).")
  return key


def _require(x: Optional[Array], field: str, name: str) -> Array:
  if x is None:
    raise ValueError(f"Objective {name!r} needs LossInputs.{field}, which is None.")
  return x


def _centered_cov(adv_BT: Array, logp_BT: Array, mask_BT: Array) -> Array:
  """cov_t = (A_t - mean A)(logp_t - mean logp), means over valid tokens, detached (ref §4)."""
  adv_BT = _const(adv_BT)
  logp_BT = _const(logp_BT)
  return (adv_BT - masked_mean(adv_BT, mask_BT)) * (logp_BT - masked_mean(logp_BT, mask_BT))


def _token_count(ratio: float, n_valid: Array) -> Array:
  """max(1, int(ratio * n_valid)), as the entropy-mechanism code counts tokens (ref §4).

  Computed in fp32 under jit; it can differ from the Python float64 count by one only where
  ratio * n_valid is within an ulp of an integer.
  """
  return jnp.maximum(1, jnp.floor(ratio * n_valid).astype(jnp.int32))


def _top_rank_mask(score_BT: Array, eligible_BT: Array, count: Array, k_max: int) -> Array:
  """[B, T] bool: the `count` (dynamic, <= k_max) highest-scoring eligible tokens.

  Static shapes: `lax.top_k` takes the k_max = static upper bound best tokens; a token is kept when
  its rank is below the dynamic count and it is eligible. Ties go to the lower flat index.
  """
  eligible = _unsharded(eligible_BT).reshape(-1)
  flat_score = jnp.where(eligible, _unsharded(score_BT).reshape(-1), -jnp.inf)
  _, idx = jax.lax.top_k(flat_score, k_max)
  keep = (jnp.arange(k_max) < count) & eligible[idx]
  selected = jnp.zeros(flat_score.shape, bool).at[idx].set(keep).reshape(score_BT.shape)
  return _sharded_like(selected, eligible_BT)


def _explicit_sharding(x: Array):
  """x's sharding if its type carries an explicit one (`jax.make_mesh`'s default), else None."""
  sharding = jax.typeof(x).sharding
  spec = getattr(sharding, "spec", None)
  if spec is not None and any(axis is not None for axis in spec):
    return sharding
  return None


def _unsharded(x: Array) -> Array:
  """Replicates an explicitly sharded x (`top_k` needs its whole axis on every device); a no-op
  for unsharded or Auto-sharded arrays, where XLA inserts the gather itself."""
  sharding = _explicit_sharding(x)
  if sharding is None:
    return x
  return jax.sharding.reshard(x, sharding.update(spec=jax.sharding.PartitionSpec()))


def _sharded_like(x: Array, like: Array) -> Array:
  """Gives x the explicit sharding of `like` (explicit mode refuses mixed shardings in `where`)."""
  sharding = _explicit_sharding(like)
  return x if sharding is None else jax.sharding.reshard(x, sharding)


def _static_k_max(ratio: float, shape: tuple[int, ...]) -> int:
  return max(1, int(int(np.prod(shape)) * ratio))


# ------------------------------------------------------------------------------------------------
# PPO-clip (GRPO / DAPO / Dr.GRPO / EntAdv)
# ------------------------------------------------------------------------------------------------


def ppo_clip_loss(
    logp_BT: Array,
    old_logp_BT: Array,
    adv_BT: Array,
    mask_BT: Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: Optional[float] = 3.0,
    log_ratio_clip: float = LOG_RATIO_CLIP,
) -> tuple[Array, Metrics]:
  """PPO-clip with clip-higher and dual clip per token (verl `compute_policy_loss_vanilla`, §2.2).

    pg1 = -A r,  pg2 = -A clip(r, 1 - eps_low, 1 + eps_high),  clip1 = max(pg1, pg2)
    loss = min(-A c, clip1) if A < 0 else clip1                          (dual clip, c > 1)

  Args:
    logp_BT, old_logp_BT: [B, T] log pi_theta (differentiable) and log pi_old.
    adv_BT: [B, T] advantages.
    mask_BT: [B, T] validity mask (padding gets loss 0; metrics are over valid tokens).
    eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] (DAPO clip-higher: 0.2, 0.28).
    clip_ratio_c: dual-clip constant c > 1 for A < 0 (verl 3.0, DAPO 10.0); None turns it off.
    log_ratio_clip: clamp of l before exp.

  Returns:
    per-token loss [B, T] fp32; metrics pg_clipfrac (fraction with pg2 > pg1), pg_clipfrac_lower
    (fraction with A < 0 capped by the dual clip), ppo_kl, ratio_mean/max/min.
  """
  if clip_ratio_c is not None and clip_ratio_c <= 1.0:
    raise ValueError(
        f"The dual-clip constant must be > 1 (verl asserts it), got clip_ratio_c={clip_ratio_c}; "
        "pass None to turn the dual clip off.")
  chex.assert_equal_shape([logp_BT, old_logp_BT, adv_BT, mask_BT])
  valid_BT = mask_BT > 0
  adv_BT = _const(_valid(adv_BT, valid_BT))
  l_BT = log_ratio(_valid(logp_BT, valid_BT), _valid(old_logp_BT, valid_BT), clip=log_ratio_clip)
  r_BT = jnp.exp(l_BT)
  pg1_BT = -adv_BT * r_BT
  pg2_BT = -adv_BT * jnp.clip(r_BT, 1.0 - eps_low, 1.0 + eps_high)
  clip1_BT = jnp.maximum(pg1_BT, pg2_BT)
  metrics = {"pg_clipfrac": masked_mean(pg2_BT > pg1_BT, mask_BT)}
  if clip_ratio_c is None:
    loss_BT = clip1_BT
    metrics["pg_clipfrac_lower"] = jnp.zeros((), jnp.float32)
  else:
    pg3_BT = -adv_BT * clip_ratio_c
    negative_BT = adv_BT < 0
    loss_BT = jnp.where(negative_BT, jnp.minimum(pg3_BT, clip1_BT), clip1_BT)
    metrics["pg_clipfrac_lower"] = masked_mean((clip1_BT > pg3_BT) & negative_BT, mask_BT)
  metrics.update(ratio_metrics(l_BT, mask_BT))
  return loss_BT, jax.lax.stop_gradient(metrics)


def _check_kl_estimator(kl_estimator: str) -> None:
  if kl_estimator not in losses.KL_ESTIMATORS:
    raise ValueError(
        f"Unknown KL estimator {kl_estimator!r}; valid: {', '.join(losses.KL_ESTIMATORS)}.")


def _kl_term(
    inputs: LossInputs, kl_coef: float, kl_estimator: str, name: str
) -> tuple[Array, Metrics]:
  """kl_coef * KL(pi_theta || pi_ref) per token (verl `use_kl_loss`), 0 when kl_coef == 0."""
  if kl_coef == 0.0:
    return jnp.zeros(inputs.logp.shape, jnp.float32), {"kl_loss": jnp.zeros((), jnp.float32)}
  ref_logp = _require(inputs.ref_logp, "ref_logp", name)
  valid_BT = inputs.mask > 0
  kl_BT = losses.kl_penalty(_valid(inputs.logp, valid_BT), _valid(ref_logp, valid_BT),
                            estimator=kl_estimator)
  return kl_coef * kl_BT, {"kl_loss": jax.lax.stop_gradient(masked_mean(kl_BT, inputs.mask))}


def grpo(
    inputs: LossInputs,
    *,
    key: Optional[Array] = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: Optional[float] = 3.0,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    log_ratio_clip: float = LOG_RATIO_CLIP,
) -> tuple[Array, Metrics]:
  """GRPO / PPO-clip objective per token, plus an optional KL-to-reference term (ref §2.2).

  loss_t = ppo_clip_loss(...)_t + kl_coef * kl_estimator(logp_t, ref_logp_t), reduced token-mean
  (verl default). `ref_logp` is needed only when kl_coef > 0. Defaults are verl's (clip 0.2,
  dual clip 3.0, no KL). DAPO is this function with eps_high 0.28 and clip_ratio_c 10.0 (ref §3),
set as defaults on its registry entry (`objectives.get("dapo")`); its dynamic sampling is
`advantages.group_keep_mask`.

  Returns:
    per-token loss [B, T] fp32 and verl's metrics: pg_clipfrac, pg_clipfrac_lower, ppo_kl,
    ratio_mean/max/min, kl_loss.
  """
  del key  # deterministic
  _check_kl_estimator(kl_estimator)
  adv_BT = token_advantages(inputs.advantages, inputs.logp.shape)
  loss_BT, metrics = ppo_clip_loss(
      inputs.logp, inputs.old_logp, adv_BT, inputs.mask, eps_low=eps_low, eps_high=eps_high,
      clip_ratio_c=clip_ratio_c, log_ratio_clip=log_ratio_clip)
  kl_BT, kl_metrics = _kl_term(inputs, kl_coef, kl_estimator, "grpo")
  return loss_BT + kl_BT, {**metrics, **kl_metrics}


# ------------------------------------------------------------------------------------------------
# GSPO (Zheng et al. 2025, arXiv 2507.18071; verl `compute_policy_loss_gspo`, ref §2.4)
# ------------------------------------------------------------------------------------------------


def gspo_loss(
    logp_BT: Array,
    old_logp_BT: Array,
    adv_BT: Array,
    mask_BT: Array,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    log_ratio_clip: float = LOG_RATIO_CLIP,
) -> tuple[Array, Metrics]:
  """GSPO-token per token: PPO-clip of the sequence ratio (GSPO paper §4, verl "gspo").

    s_i     = exp(mean_t mask (logp - old_logp))        length-normalised sequence ratio
    s_{i,t} = sg(s_i) pi(y_t) / sg(pi(y_t))             value s_i, gradient s_i grad logp_t
    loss_t  = max(-A_t s_{i,t}, -A_t clip(s_{i,t}, 1 - eps_low, 1 + eps_high))   (no dual clip)

  With "seq-mean-token-mean" and a sequence advantage, a response's loss is
  -min(s_i A_i, clip(s_i) A_i) and its gradient -A_i s_i grad (1/|y_i|) log pi(y_i), GSPO's
  sequence form; with one token per response it is `ppo_clip_loss` without the dual clip. The log
  of s_{i,t} is clamped to +-log_ratio_clip after the stop-gradient sum, as verl (which clamps
  above at 10), so a clamped ratio has zero gradient.

  Args:
    logp_BT, old_logp_BT: [B, T] log pi_theta (differentiable) and log pi_old.
    adv_BT: [B, T] advantages (GRPO's sequence advantage broadcast to tokens, as verl).
    mask_BT: [B, T] validity mask (padding gets loss 0; metrics are over valid tokens).
    eps_low, eps_high: clip range of s [1 - eps_low, 1 + eps_high] (paper / verl recipe: 3e-4,
      4e-4).
    log_ratio_clip: clamp of log s_{i,t} before exp.

  Returns:
    per-token loss [B, T] fp32; metrics pg_clipfrac (fraction of valid tokens with pg2 > pg1),
    pg_clipfrac_lower (0: no dual clip, as verl logs it), ppo_kl (masked mean of -l_t, verl's),
    ratio_mean/max/min of s_i over valid tokens.
  """
  chex.assert_equal_shape([logp_BT, old_logp_BT, adv_BT, mask_BT])
  valid_BT = mask_BT > 0
  adv_BT = _const(_valid(adv_BT, valid_BT))
  logp_BT = _valid(logp_BT, valid_BT)
  old_BT = _valid(old_logp_BT, valid_BT)
  log_s_B = losses.sequence_log_ratio(logp_BT, old_BT, mask_BT, length_normalise=True,
                                      clip=jnp.inf)
  # log s_{i,t} = sg(log s_i) + logp_t - sg(logp_t): the value of log s_i, the gradient of logp_t.
  log_s_BT = jnp.clip(
      _const(log_s_B)[:, None] + (logp_BT - _const(logp_BT)), -log_ratio_clip, log_ratio_clip)
  s_BT = jnp.exp(log_s_BT)
  pg1_BT = -adv_BT * s_BT
  pg2_BT = -adv_BT * jnp.clip(s_BT, 1.0 - eps_low, 1.0 + eps_high)
  loss_BT = jnp.where(valid_BT, jnp.maximum(pg1_BT, pg2_BT), 0.0)
  metrics = {
      "pg_clipfrac": masked_mean(pg2_BT > pg1_BT, mask_BT),
      "pg_clipfrac_lower": jnp.zeros((), jnp.float32),
      # The masked token mean of the broadcast log s_i is verl's token ppo_kl (before clamps).
      **ratio_metrics(log_s_BT, mask_BT),
  }
  return loss_BT, jax.lax.stop_gradient(metrics)


def gspo(
    inputs: LossInputs,
    *,
    key: Optional[Array] = None,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    log_ratio_clip: float = LOG_RATIO_CLIP,
) -> tuple[Array, Metrics]:
  """GSPO objective per token (`gspo_loss`), plus an optional KL-to-reference term as `grpo`.

  Registered as "gspo" with verl's GSPO recipe: seq-mean-token-mean, GRPO's group advantages, no
  KL (kl_coef 0; ref_logp is needed only when kl_coef > 0).

  Returns:
    per-token loss [B, T] fp32; metrics as `gspo_loss`, plus kl_loss.
  """
  del key  # deterministic
  _check_kl_estimator(kl_estimator)
  adv_BT = token_advantages(inputs.advantages, inputs.logp.shape)
  loss_BT, metrics = gspo_loss(inputs.logp, inputs.old_logp, adv_BT, inputs.mask, eps_low=eps_low,
                               eps_high=eps_high, log_ratio_clip=log_ratio_clip)
  kl_BT, kl_metrics = _kl_term(inputs, kl_coef, kl_estimator, "gspo")
  return loss_BT + kl_BT, {**metrics, **kl_metrics}


def entadv_shaping(
    adv_BT: Array, entropy_BT: Array, *, alpha: float = 0.4, kappa: float = 2.0
) -> Array:
  """EntAdv advantage shaping: A_t + min(alpha sg(H_t), |A_t| / kappa) (arXiv 2506.14758, ref §6).

  The bonus is >= 0 and at most |A| / kappa, so for kappa > 1 it never flips (or zeroes) the sign
  of A (kappa = 1 can bring a negative A to 0); it is 0 where A = 0 (all-equal groups).

  Args:
    adv_BT: [B, T] advantages.
    entropy_BT: [B, T] entropy of pi_theta at each position (detached here).
    alpha, kappa: the paper's 0.4 and 2.0.

  Returns:
    [B, T] fp32 shaped advantages (constants).
  """
  if alpha < 0.0 or kappa < 1.0:
    raise ValueError(
        "EntAdv needs alpha >= 0 and kappa >= 1 (else the bonus can flip the sign of A); "
        f"got alpha={alpha}, kappa={kappa}.")
  chex.assert_equal_shape([adv_BT, entropy_BT])
  adv_BT = _const(adv_BT)
  # An entropy is >= 0; clamping guards against a slightly negative numerical estimate.
  bonus_BT = jnp.minimum(alpha * jnp.maximum(_const(entropy_BT), 0.0), jnp.abs(adv_BT) / kappa)
  return adv_BT + bonus_BT


def entadv(
    inputs: LossInputs,
    *,
    key: Optional[Array] = None,
    alpha: float = 0.4,
    kappa: float = 2.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: Optional[float] = 3.0,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    log_ratio_clip: float = LOG_RATIO_CLIP,
) -> tuple[Array, Metrics]:
  """EntAdv: `entadv_shaping` of the advantages, then the `grpo` loss with its hyperparameters.

  Needs `inputs.entropy` [B, T] (entropy of the current forward pass, ref §6). Extra metric:
  entadv_bonus (masked mean of the added bonus).
  """
  entropy = _require(inputs.entropy, "entropy", "entadv")
  adv_BT = token_advantages(inputs.advantages, inputs.logp.shape)
  valid_BT = inputs.mask > 0
  adv_BT = _valid(adv_BT, valid_BT)
  shaped_BT = entadv_shaping(adv_BT, _valid(entropy, valid_BT), alpha=alpha, kappa=kappa)
  loss_BT, metrics = grpo(
      inputs.replace(advantages=shaped_BT), key=key, eps_low=eps_low, eps_high=eps_high,
      clip_ratio_c=clip_ratio_c, kl_coef=kl_coef, kl_estimator=kl_estimator,
      log_ratio_clip=log_ratio_clip)
  metrics["entadv_bonus"] = masked_mean(shaped_BT - adv_BT, inputs.mask)
  return loss_BT, metrics


# ------------------------------------------------------------------------------------------------
# KL-Cov and Clip-Cov (entropy mechanism, ref §4)
# ------------------------------------------------------------------------------------------------


def kl_cov_loss(
    logp_BT: Array,
    old_logp_BT: Array,
    adv_BT: Array,
    mask_BT: Array,
    *,
    k_ratio: float = 2e-3,
    kl_coef: float = 1.0,
    log_ratio_clip: float = LOG_RATIO_CLIP,
) -> tuple[Array, Metrics]:
  """KL-Cov per token (PRIME-RL/Entropy-Mechanism-of-RL `compute_policy_loss_kl_cov`, ref §4.1).

    loss_t = -A_t r_t + kl_coef * |l_t| * [t in top-k by cov],  no PPO clip,
    cov_t = (A_t - mean A)(logp_t - mean logp) over valid tokens (detached),
    k = max(1, int(N_valid * k_ratio)).

  k_ratio is a fraction (the original's k_percent = 0.2 for 7B is 2e-3; verl's default 2e-4 = the
  32B setting). Static shapes under jit: `lax.top_k` takes k_max = max(1, int(B*T*k_ratio)) >= k
  tokens and those with rank < k (and valid) are penalised. |l| uses the unclamped log-ratio (no
  exp, so no overflow) so the penalty still pulls back tokens beyond the ±log_ratio_clip clamp.

  Returns:
    per-token loss [B, T] fp32; metrics ppo_kl_abs (masked mean |l|, what the original logs as
    ppo_kl), kl_cov_frac (fraction of valid tokens penalised), ppo_kl, ratio_mean/max/min.
  """
  if not 0.0 < k_ratio <= 1.0:
    raise ValueError(
        f"k_ratio is a fraction of tokens in (0, 1] (7B original: 2e-3), got {k_ratio}.")
  chex.assert_equal_shape([logp_BT, old_logp_BT, adv_BT, mask_BT])
  valid_BT = mask_BT > 0
  adv_BT = _const(_valid(adv_BT, valid_BT))
  logp_BT = _valid(logp_BT, valid_BT)
  old_logp_BT = _valid(old_logp_BT, valid_BT)
  raw_l_BT = logp_BT - _const(old_logp_BT)
  l_BT = log_ratio(logp_BT, old_logp_BT, clip=log_ratio_clip)
  pg_BT = -adv_BT * jnp.exp(l_BT)
  abs_l_BT = jnp.abs(raw_l_BT)

  cov_BT = _centered_cov(adv_BT, logp_BT, mask_BT)
  k = _token_count(k_ratio, jnp.sum(valid_BT))
  selected_BT = _top_rank_mask(cov_BT, valid_BT, k, _static_k_max(k_ratio, cov_BT.shape))
  loss_BT = jnp.where(selected_BT, pg_BT + kl_coef * abs_l_BT, pg_BT)
  metrics = {
      "ppo_kl_abs": masked_mean(abs_l_BT, mask_BT),
      "kl_cov_frac": masked_mean(selected_BT, mask_BT),
      **ratio_metrics(l_BT, mask_BT),
  }
  return loss_BT, jax.lax.stop_gradient(metrics)


def kl_cov(
    inputs: LossInputs,
    *,
    key: Optional[Array] = None,
    k_ratio: float = 2e-3,
    kl_coef: float = 1.0,
    log_ratio_clip: float = LOG_RATIO_CLIP,
) -> tuple[Array, Metrics]:
  """Registry adapter of `kl_cov_loss` (token-mean)."""
  del key  # deterministic
  adv_BT = token_advantages(inputs.advantages, inputs.logp.shape)
  return kl_cov_loss(inputs.logp, inputs.old_logp, adv_BT, inputs.mask, k_ratio=k_ratio,
                     kl_coef=kl_coef, log_ratio_clip=log_ratio_clip)


def clip_cov_loss(
    logp_BT: Array,
    old_logp_BT: Array,
    adv_BT: Array,
    mask_BT: Array,
    *,
    key: Array,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    eps_low: float = 1.0,
    eps_high: float = 1.0,
    log_ratio_clip: float = LOG_RATIO_CLIP,
) -> tuple[Array, Metrics]:
  """Clip-Cov per token (Entropy-Mechanism `compute_policy_loss_clip_cov`, ref §4.2).

    pg1 = -A r,  pg2 = -A clip(r, 1 - eps_low, 1 + eps_high)
    candidates: valid, not PPO-clipped (pg2 <= pg1), clip_cov_lb < cov < clip_cov_ub
    choose clip_num = max(1, int(clip_cov_ratio * N_valid)) candidates uniformly at random (all if
    fewer); their loss is 0 with zero gradient; loss = max(pg1, pg2) elsewhere.

  The original scripts set eps_low = eps_high = 1 (PPO clip effectively off), the default here;
  no dual clip. Static shapes: every token draws a uniform priority from `key`, candidates keep
  theirs, and the clip_num highest among the k_max = max(1, int(B*T*ratio)) best are chosen, a
  uniformly random subset as `torch.randperm` gives.

  Returns:
    per-token loss [B, T] fp32; metrics pg_clipfrac (fraction of valid tokens zeroed, as the
    original logs it), clip_cov_candidates (fraction of valid tokens that were candidates), ppo_kl,
    ratio_mean/max/min.
  """
  if not 0.0 < clip_cov_ratio <= 1.0:
    raise ValueError(f"clip_cov_ratio is a fraction of tokens in (0, 1], got {clip_cov_ratio}.")
  chex.assert_equal_shape([logp_BT, old_logp_BT, adv_BT, mask_BT])
  valid_BT = mask_BT > 0
  adv_BT = _const(_valid(adv_BT, valid_BT))
  logp_BT = _valid(logp_BT, valid_BT)
  l_BT = log_ratio(logp_BT, _valid(old_logp_BT, valid_BT), clip=log_ratio_clip)
  r_BT = jnp.exp(l_BT)
  pg1_BT = -adv_BT * r_BT
  pg2_BT = -adv_BT * jnp.clip(r_BT, 1.0 - eps_low, 1.0 + eps_high)
  cov_BT = _centered_cov(adv_BT, logp_BT, mask_BT)
  candidate_BT = valid_BT & (pg2_BT <= pg1_BT) & (cov_BT > clip_cov_lb) & (cov_BT < clip_cov_ub)
  candidate_BT = jax.lax.stop_gradient(candidate_BT)

  priority_BT = jax.random.uniform(key, cov_BT.shape)
  clip_num = _token_count(clip_cov_ratio, jnp.sum(valid_BT))
  selected_BT = _top_rank_mask(priority_BT, candidate_BT, clip_num,
                               _static_k_max(clip_cov_ratio, cov_BT.shape))
  # `where` (not a product with 0) so the gradient there is exactly 0 even if pg were inf.
  loss_BT = jnp.where(selected_BT, 0.0, jnp.maximum(pg1_BT, pg2_BT))
  metrics = {
      "pg_clipfrac": masked_mean(selected_BT, mask_BT),
      "clip_cov_candidates": masked_mean(candidate_BT, mask_BT),
      **ratio_metrics(l_BT, mask_BT),
  }
  return loss_BT, jax.lax.stop_gradient(metrics)


def clip_cov(
    inputs: LossInputs,
    *,
    key: Optional[Array] = None,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    eps_low: float = 1.0,
    eps_high: float = 1.0,
    log_ratio_clip: float = LOG_RATIO_CLIP,
) -> tuple[Array, Metrics]:
  """Registry adapter of `clip_cov_loss` (token-mean); `key` is required."""
  key = _check_key(key, "clip_cov")
  adv_BT = token_advantages(inputs.advantages, inputs.logp.shape)
  return clip_cov_loss(inputs.logp, inputs.old_logp, adv_BT, inputs.mask, key=key,
                       clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb,
                       clip_cov_ub=clip_cov_ub, eps_low=eps_low, eps_high=eps_high,
                       log_ratio_clip=log_ratio_clip)


# ------------------------------------------------------------------------------------------------
# FlowRL (ref §5)
# ------------------------------------------------------------------------------------------------


def flowrl_loss(
    logp_BT: Array,
    old_logp_BT: Array,
    ref_logp_BT: Array,
    adv_BT: Array,
    log_z_B: Array,
    mask_BT: Array,
    *,
    beta: float = 15.0,
    log_weight_clip: float = LOG_RATIO_CLIP,
    max_weight: Optional[float] = None,
) -> tuple[Array, Metrics]:
  """FlowRL trajectory-balance loss (Xuekai-Zhu/FlowRL `compute_flowrl_objective`, ref §5).

  Per sequence b, with n_b valid tokens and means over them:
    delta_b = log_z_b + mean_t logp - beta * mean_t A - mean_t ref_logp
    w_b     = sg(exp(clip(sum_t (logp - old_logp), ±log_weight_clip)))   (unclipped IS weight)
    loss_b  = w_b * delta_b^2
  returned per token as loss_b / n_b on each valid token, so that aggregation mode
  "seq-mean-token-sum" gives mean_b loss_b (the original's torch.mean). A fully masked row
  contributes 0 (the original would add log_z^2 for it). beta = 15 is hard-coded by the authors.
  The authors' weight is unclipped; its log is clamped here only so exp cannot overflow
  (e^20 ~ 4.9e8). verl's FlowRL recipe caps w at 10: pass max_weight=10.0 for that.

  Args:
    logp_BT: [B, T] log pi_theta (differentiable).
    old_logp_BT, ref_logp_BT: [B, T] log pi_old, log pi_ref.
    adv_BT: [B, T] advantages (the authors use GRPO's; "R = exp(A)").
    log_z_B: [B] learned log partition (differentiable; see `LogZHead`).
    mask_BT: [B, T] validity mask.

  Returns:
    per-token loss [B, T] fp32; metrics log_prob, old_log_prob, ref_log_prob, log_z, log_reward,
    tb_loss, importance_weight, ppo_kl, ref_kl (the original's names).
  """
  chex.assert_equal_shape([logp_BT, old_logp_BT, ref_logp_BT, adv_BT, mask_BT])
  chex.assert_shape(log_z_B, (logp_BT.shape[0],))
  valid_BT = mask_BT > 0
  logp_BT = _valid(logp_BT, valid_BT)
  old_BT, ref_BT, adv_BT = (_const(_valid(x, valid_BT)) for x in (old_logp_BT, ref_logp_BT, adv_BT))
  log_z_B = _f32(log_z_B)
  n_B = jnp.sum(valid_BT, axis=1).astype(jnp.float32)

  avg_logp_B = masked_mean(logp_BT, mask_BT, axis=1)
  avg_ref_B = masked_mean(ref_BT, mask_BT, axis=1)
  avg_adv_B = masked_mean(adv_BT, mask_BT, axis=1)
  delta_B = log_z_B + avg_logp_B - beta * avg_adv_B - avg_ref_B

  log_w_B = jnp.sum(jax.lax.stop_gradient(logp_BT) - old_BT, axis=1)  # padding is 0 - 0
  w_B = jnp.exp(jnp.clip(log_w_B, -log_weight_clip, log_weight_clip))
  if max_weight is not None:
    w_B = jnp.minimum(w_B, max_weight)
  loss_B = jax.lax.stop_gradient(w_B) * jnp.square(delta_B)
  per_token_BT = jnp.where(valid_BT, losses.safe_divide(loss_B, n_B)[:, None], 0.0)

  has_tokens_B = n_B > 0
  num_rows = jnp.asarray(logp_BT.shape[0], jnp.float32)
  metrics = {
      "log_prob": masked_mean(logp_BT, mask_BT),
      "old_log_prob": masked_mean(old_BT, mask_BT),
      "ref_log_prob": masked_mean(ref_BT, mask_BT),
      "log_z": jnp.mean(log_z_B),
      "log_reward": masked_mean(adv_BT, mask_BT),
      "tb_loss": jnp.sum(jnp.where(has_tokens_B, loss_B, 0.0)) / num_rows,
      "importance_weight": jnp.mean(w_B),
      "ppo_kl": masked_mean(old_BT - logp_BT, mask_BT),
      "ref_kl": masked_mean(ref_BT - logp_BT, mask_BT),
  }
  return per_token_BT, jax.lax.stop_gradient(metrics)


def flowrl(
    inputs: LossInputs,
    *,
    key: Optional[Array] = None,
    beta: float = 15.0,
    log_weight_clip: float = LOG_RATIO_CLIP,
    max_weight: Optional[float] = None,
) -> tuple[Array, Metrics]:
  """Registry adapter of `flowrl_loss` ("seq-mean-token-sum"); needs ref_logp and log_z."""
  del key  # deterministic
  ref_logp = _require(inputs.ref_logp, "ref_logp", "flowrl")
  log_z = _require(inputs.log_z, "log_z", "flowrl")
  adv_BT = token_advantages(inputs.advantages, inputs.logp.shape)
  return flowrl_loss(inputs.logp, inputs.old_logp, ref_logp, adv_BT, log_z, inputs.mask, beta=beta,
                     log_weight_clip=log_weight_clip, max_weight=max_weight)


def masked_mean_pool(hidden_BSH: Array, mask_BS: Array) -> Array:
  """[B, H] mean of hidden states over the positions where mask_BS is set (0 for empty rows)."""
  chex.assert_rank(hidden_BSH, 3)
  chex.assert_shape(mask_BS, hidden_BSH.shape[:2])
  weights_BS1 = (mask_BS > 0).astype(jnp.float32)[:, :, None]
  total_BH = jnp.sum(_f32(hidden_BSH) * weights_BS1, axis=1)
  return total_BH / jnp.maximum(jnp.sum(weights_BS1, axis=1), 1.0)


class LogZHead(nn.Module):
  """FlowRL's log-partition head (the authors' `ProjZModule`, ref §5).

  log Z(x) = MLP(masked mean over prompt tokens of the last hidden states), with the MLP
  [Dense(H) -> GELU (exact, as torch.nn.GELU) -> LayerNorm (eps 1e-5, as torch) -> Dropout] x
  (num_layers - 1), then Dense(1). The input is not detached: the authors let the TB-loss gradient
  flow into the LLM trunk through log Z.

  Attributes:
    num_layers: MLP depth (authors: 3).
    dropout_rate: dropout after each hidden block (authors: 0.1).
    hidden_dim: width of the hidden blocks (default: H of the input, as the authors).
  """

  num_layers: int = 3
  dropout_rate: float = 0.1
  hidden_dim: Optional[int] = None

  @nn.compact
  def __call__(
      self, hidden_BSH: Array, prompt_mask_BS: Array, *, deterministic: bool = True
  ) -> Array:
    """hidden_BSH [B, S, H] last-layer prompt states, prompt_mask_BS [B, S] -> log_z [B] fp32.

    With deterministic=False, pass `rngs={"dropout": key}` to `apply`.
    """
    if self.num_layers < 1:
      raise ValueError(f"LogZHead needs num_layers >= 1, got {self.num_layers}.")
    x_BH = masked_mean_pool(hidden_BSH, prompt_mask_BS)
    width = self.hidden_dim or hidden_BSH.shape[-1]
    for _ in range(self.num_layers - 1):
      x_BH = nn.Dense(width)(x_BH)
      x_BH = nn.gelu(x_BH, approximate=False)
      x_BH = nn.LayerNorm(epsilon=1e-5)(x_BH)
      x_BH = nn.Dropout(self.dropout_rate)(x_BH, deterministic=deterministic)
    return nn.Dense(1)(x_BH)[:, 0]


# ------------------------------------------------------------------------------------------------
# REINFORCE (alpha-DPG, plain policy gradient)
# ------------------------------------------------------------------------------------------------


def reinforce_loss(logp_BT: Array, adv_BT: Array, mask_BT: Array) -> tuple[Array, Metrics]:
  """Plain policy gradient per token: loss_t = -sg(A_t) * logp_t (no ratio, no clip).

  With aggregation "seq-mean-token-sum-norm" this is alpha-DPG's `compute_policy_loss_fcdpg`
  (ref §7: mean_seq(-A sum_t logp) / MAX_TOKENS); with "token-mean" the reference policy gradient.

  Returns:
    per-token loss [B, T] fp32; metrics log_prob (masked mean of logp).
  """
  chex.assert_equal_shape([logp_BT, adv_BT, mask_BT])
  valid_BT = mask_BT > 0
  logp_BT = _valid(logp_BT, valid_BT)
  loss_BT = -_const(_valid(adv_BT, valid_BT)) * logp_BT
  return loss_BT, {"log_prob": jax.lax.stop_gradient(masked_mean(logp_BT, mask_BT))}


def reinforce(inputs: LossInputs, *, key: Optional[Array] = None) -> tuple[Array, Metrics]:
  """Registry adapter of `reinforce_loss` ("pg" and "alpha_dpg"); old_logp is not used."""
  del key  # deterministic
  adv_BT = token_advantages(inputs.advantages, inputs.logp.shape)
  return reinforce_loss(inputs.logp, adv_BT, inputs.mask)
