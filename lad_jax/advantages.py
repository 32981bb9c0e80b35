"""Group advantage estimators on rewards shaped [P, G], and DAPO's group filter.

P prompts, G sampled responses per prompt. Every estimator is a pure function of a static-shaped
[P, G] array (reshape a flat [P*G] batch with `to_groups` / `from_groups`), so group reductions are
plain axis reductions under `jit`. The sequence advantage they return is broadcast to tokens by
`lad_jax.losses.token_advantages`.

  grpo       (r - mean_G r) / (std_G r + eps), unbiased std (verl; shared/reference/baselines.md
             §2.1, cited below as "reference §N")
  drgrpo     r - mean_G r (Dr.GRPO, verl `norm_adv_by_std_in_grpo=False`, §2.1)
  rloo       r - mean of the other G-1 rewards (leave-one-out baseline)
  alpha_dpg  alpha-divergence pseudo-reward with a leave-one-out baseline (naver/alpha-dpg, §7)

DAPO dynamic sampling (§3) drops groups whose metric does not vary: `group_keep_mask` computes the
keep mask on device or host; `select_groups` / `concat_groups` compact and refill host-side.

  advantage_fn = advantages.get("grpo")
  adv_PG = advantage_fn(rewards_PG)
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------


def to_groups(x_N: Array, *, group_size: int) -> Array:
  """Reshapes a flat [P*G, ...] batch (the G samples of a prompt adjacent) to [P, G, ...]."""
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}.")
  n = x_N.shape[0]
  if n % group_size:
    raise ValueError(
        f"Batch of {n} samples is not a whole number of groups of {group_size}; keep the G samples "
        "of every prompt together and the batch a multiple of G."
    )
  return x_N.reshape((n // group_size, group_size) + tuple(x_N.shape[1:]))


def from_groups(x_PG: Array) -> Array:
  """Reshapes [P, G, ...] back to the flat [P*G, ...] batch order of `to_groups`."""
  return x_PG.reshape((x_PG.shape[0] * x_PG.shape[1],) + tuple(x_PG.shape[2:]))


def _check_groups(x_PG: Array, name: str) -> None:
  if x_PG.ndim != 2:
    raise ValueError(
        f"{name} must be shaped [P, G] (prompts, samples per prompt), got shape {x_PG.shape}; "
        "reshape a flat batch with advantages.to_groups(x, group_size=G)."
    )


def _all_equal(x_PG: Array) -> Array:
  # max == min is exact; a computed std of equal floats can come out as a few ulps instead of 0.
  return jnp.max(x_PG, axis=1, keepdims=True) == jnp.min(x_PG, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# Estimators
# ------------------------------------------------------------------------------------------------


def grpo(rewards_PG: Array, *, eps: float = 1e-6) -> Array:
  """GRPO advantage: A = (r - mean_G r) / (std_G r + eps), per prompt.

  verl `compute_grpo_outcome_advantage` (shared/reference/baselines.md §2.1): unbiased (N-1) std,
  eps added to the std (not inside the sqrt); a group of one sample gets mean 0 and std 1, i.e.
  A = r / (1 + eps). A group whose rewards all agree gets exactly 0 (verl: 0 / (0 + eps)).

  Args:
    rewards_PG: [P, G] scalar rewards.
    eps: added to the std.

  Returns:
    [P, G] fp32 advantages.
  """
  _check_groups(rewards_PG, "rewards_PG")
  r_PG = rewards_PG.astype(jnp.float32)
  if r_PG.shape[1] == 1:
    return r_PG / (1.0 + eps)
  mean_P1 = jnp.mean(r_PG, axis=1, keepdims=True)
  std_P1 = jnp.std(r_PG, axis=1, keepdims=True, ddof=1)
  return jnp.where(_all_equal(r_PG), 0.0, (r_PG - mean_P1) / (std_P1 + eps))


def drgrpo(rewards_PG: Array) -> Array:
  """Dr.GRPO advantage: A = r - mean_G r (no std division), per prompt.

  verl with `norm_adv_by_std_in_grpo=False` (shared/reference/baselines.md §2.1). As in verl a
  group of one sample has mean 0, so A = r there.

  Args:
    rewards_PG: [P, G] scalar rewards.

  Returns:
    [P, G] fp32 advantages.
  """
  _check_groups(rewards_PG, "rewards_PG")
  r_PG = rewards_PG.astype(jnp.float32)
  if r_PG.shape[1] == 1:
    return r_PG
  mean_P1 = jnp.mean(r_PG, axis=1, keepdims=True)
  return jnp.where(_all_equal(r_PG), 0.0, r_PG - mean_P1)


def _leave_one_out(x_PG: Array) -> Array:
  """x_i - mean_{j != i} x_j within each group; 0 for groups of one (no others to average)."""
  g = x_PG.shape[1]
  if g == 1:
    return jnp.zeros_like(x_PG)
  total_P1 = jnp.sum(x_PG, axis=1, keepdims=True)
  return jnp.where(_all_equal(x_PG), 0.0, x_PG - (total_P1 - x_PG) / (g - 1))


def rloo(rewards_PG: Array) -> Array:
  """RLOO advantage: A_i = r_i - (1 / (G-1)) sum_{j != i} r_j = G / (G-1) (r_i - mean_G r).

  A group of one sample has no other sample to form a baseline and gets A = 0 (verl's
  `compute_rloo_outcome_advantage` leaves the raw score there instead).

  Args:
    rewards_PG: [P, G] scalar rewards.

  Returns:
    [P, G] fp32 advantages.
  """
  _check_groups(rewards_PG, "rewards_PG")
  return _leave_one_out(rewards_PG.astype(jnp.float32))


def alpha_dpg_pseudo_reward(
    seq_old_logp_PG: Array,
    seq_ref_logp_PG: Array,
    rewards_PG: Array,
    *,
    alpha: float = 0.25,
    z_default: float = 1e-4,
    pseudo_reward_clip: Optional[float] = 10.0,
) -> Array:
  """alpha-DPG pseudo-reward -f'(t) = t^(alpha-1) - 1 before the baseline; see `alpha_dpg`."""
  for x, name in ((seq_old_logp_PG, "seq_old_logp_PG"), (seq_ref_logp_PG, "seq_ref_logp_PG"),
                  (rewards_PG, "rewards_PG")):
    _check_groups(x, name)
  if seq_old_logp_PG.shape != seq_ref_logp_PG.shape or seq_old_logp_PG.shape != rewards_PG.shape:
    raise ValueError(
        "alpha_dpg needs seq_old_logp_PG, seq_ref_logp_PG and rewards_PG of one shape [P, G], got "
        f"{seq_old_logp_PG.shape}, {seq_ref_logp_PG.shape}, {rewards_PG.shape}."
    )
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(
        f"alpha_dpg needs 0 <= alpha <= 1 (0: forward KL, 1: reverse KL limit), got alpha={alpha}."
    )
  if z_default <= 0.0:
    raise ValueError(f"z_default must be > 0 (it is log'ed), got {z_default}.")
  policy_PG = jax.lax.stop_gradient(seq_old_logp_PG.astype(jnp.float32))
  ref_PG = jax.lax.stop_gradient(seq_ref_logp_PG.astype(jnp.float32))
  r_PG = jax.lax.stop_gradient(rewards_PG.astype(jnp.float32))
  g = r_PG.shape[1]

  # Target p(y) ∝ pi_ref(y) R(y) (`exponential_ebm=false`): log p = seq_ref + log R, -inf at R = 0.
  # Only the correct samples (R > 0) are in the support; log R is taken there only, so no -inf is
  # ever formed and the incorrect samples get their exact limit below.
  correct_PG = r_PG > 0
  log_r_PG = jnp.log(jnp.where(correct_PG, r_PG, 1.0))
  log_w_PG = ref_PG + log_r_PG - policy_PG  # log of the IS weight p/pi of one sample

  # Z = clamp(mean_G exp(log_w), max=1), in log space (naver/alpha-dpg `compute_partition_function`
  # with reset_z); a group with no correct sample has Z = 0 and takes z_default.
  any_correct_P1 = jnp.any(correct_PG, axis=1, keepdims=True)
  lse_P1 = jax.nn.logsumexp(jnp.where(correct_PG, log_w_PG, -jnp.inf), axis=1, keepdims=True,
                            where=correct_PG)
  log_z_P1 = jnp.where(any_correct_P1, jnp.minimum(lse_P1 - np.log(g), 0.0), np.log(z_default))

  # log t = seq_policy - (seq_target - log Z): t = pi Z / (R pi_ref).
  log_t_PG = jnp.where(correct_PG, -log_w_PG + log_z_P1, 0.0)
  # -f'(t) = expm1((alpha - 1) log t) (`compute_fcdpg_advantage`). expm1 is continuous in alpha on
  # [0, 1]: alpha = 0 gives 1/t - 1 (forward KL), alpha -> 1 gives 0 on correct samples. The
  # exponent is capped where the clip would apply anyway, so nothing overflows.
  exponent_PG = (alpha - 1.0) * log_t_PG
  if pseudo_reward_clip is not None:
    exponent_PG = jnp.minimum(exponent_PG, np.log1p(pseudo_reward_clip) + 1.0)
  else:
    exponent_PG = jnp.minimum(exponent_PG, 80.0)  # exp(80) ~ 5.5e34 < fp32 max
  pseudo_PG = jnp.expm1(exponent_PG)
  # Incorrect samples have t = +inf: t^(alpha-1) - 1 = -1 exactly for alpha < 1, and the alpha -> 1
  # limit of that constant is -1 as well.
  pseudo_PG = jnp.where(correct_PG, pseudo_PG, -1.0)
  if pseudo_reward_clip is not None:
    pseudo_PG = jnp.minimum(pseudo_PG, pseudo_reward_clip)
  return pseudo_PG


def alpha_dpg(
    seq_old_logp_PG: Array,
    seq_ref_logp_PG: Array,
    rewards_PG: Array,
    *,
    alpha: float = 0.25,
    z_default: float = 1e-4,
    pseudo_reward_clip: Optional[float] = 10.0,
) -> Array:
  """alpha-DPG advantage ("Whatever Remains Must Be True", naver/alpha-dpg; reference §7).

  The target is pi_ref filtered to correct answers, p(y) ∝ pi_ref(y) R(y) with R in {0, 1}:
    log p(y)  = seq_ref + log R             (-inf for R = 0)
    Z         = min(1, mean_G exp(log p - seq_policy)), Z = 0 -> z_default   (IS acceptance rate)
    log t     = seq_policy - (log p - log Z)                                  (t = pi Z / p)
    pseudo    = -f'(t) = t^(alpha-1) - 1 = expm1((alpha-1) log t), clipped at pseudo_reward_clip
    A_i       = pseudo_i - mean_{j != i} pseudo_j   (leave-one-out within the group; 0 if G = 1)
  Incorrect samples get pseudo = -1 exactly; correct ones (pi_ref / (Z pi))^(1-alpha) - 1.

  The original special-cases alpha == 1 with f' = log t - 1, which gives -inf on incorrect samples;
  here alpha -> 1 is the continuous limit of the expm1 form (0 on correct, -1 on incorrect), and
  alpha == 0 is 1/t - 1, the same as the original's forward-KL branch.

  Args:
    seq_old_logp_PG: [P, G] sum over response tokens of log pi_old (the behaviour policy).
    seq_ref_logp_PG: [P, G] sum over response tokens of log pi_ref.
    rewards_PG: [P, G] rewards; R > 0 is in the target's support (log R is used), R <= 0 is not.
    alpha: alpha-divergence parameter in [0, 1] (paper's Lean runs: 0.25).
    z_default: Z for groups without a correct sample.
    pseudo_reward_clip: upper clip of the pseudo-reward (None: no clip).

  Returns:
    [P, G] fp32 advantages (constants: no gradient flows to any input).
  """
  pseudo_PG = alpha_dpg_pseudo_reward(
      seq_old_logp_PG, seq_ref_logp_PG, rewards_PG, alpha=alpha, z_default=z_default,
      pseudo_reward_clip=pseudo_reward_clip)
  return _leave_one_out(pseudo_PG)


# ------------------------------------------------------------------------------------------------
# DAPO dynamic sampling: group filter and host-side refill
# ------------------------------------------------------------------------------------------------


def group_keep_mask(metric_PG: Any) -> Any:
  """DAPO filter: keep the groups whose metric varies (population std > 0), or with G == 1.

  DAPO (`dapo_ray_trainer.py`, reference §3) keeps a prompt uid when `np.std(metric) > 0` or it has
  a single sample. max != min is the same condition without the rounding of a computed std.

  Args:
    metric_PG: [P, G] the filter metric (DAPO: accuracy). numpy in -> numpy out (host side); a jax
      array gives a jax array (jittable).

  Returns:
    [P] bool, True for groups to keep.
  """
  xp = np if isinstance(metric_PG, np.ndarray) else jnp
  if metric_PG.ndim != 2:
    raise ValueError(f"metric_PG must be shaped [P, G], got shape {metric_PG.shape}.")
  if metric_PG.shape[1] == 1:
    return xp.ones((metric_PG.shape[0],), dtype=bool)
  return xp.max(metric_PG, axis=1) != xp.min(metric_PG, axis=1)


def _leaves_with_groups(batch: Any, group_size: int) -> tuple[list[np.ndarray], Any, int]:
  leaves, treedef = jax.tree_util.tree_flatten(batch)
  if not leaves:
    raise ValueError("The batch has no arrays.")
  leaves = [np.asarray(x) for x in leaves]
  n = leaves[0].shape[0] if leaves[0].ndim else -1
  for x in leaves:
    if x.ndim == 0 or x.shape[0] != n:
      raise ValueError(
          "Every array of the batch must have the same leading (sample) axis of length P*G; got "
          f"shapes {[y.shape for y in leaves]}. Repeat per-prompt data G times first."
      )
  if group_size < 1 or n % group_size:
    raise ValueError(f"Batch of {n} samples is not a whole number of groups of {group_size}.")
  return leaves, treedef, n // group_size


def select_groups(batch: Any, keep_P: Any, *, group_size: int) -> Any:
  """Host-side: keeps the samples of the kept groups (order preserved).

  Args:
    batch: a pytree of arrays, each with leading axis P*G (the G samples of a prompt adjacent).
    keep_P: [P] bool, e.g. `group_keep_mask(to_groups(acc, group_size=G))`.
    group_size: G.

  Returns:
    The same pytree with numpy leaves of leading axis (number kept) * G.
  """
  leaves, treedef, num_groups = _leaves_with_groups(batch, group_size)
  keep_P = np.asarray(keep_P, dtype=bool)
  if keep_P.shape != (num_groups,):
    raise ValueError(
        f"keep_P must be shaped [{num_groups}] (one flag per group), got {keep_P.shape}.")
  keep_N = np.repeat(keep_P, group_size)
  return jax.tree_util.tree_unflatten(treedef, [x[keep_N] for x in leaves])


def concat_groups(batches: Sequence[Any], *, group_size: int,
                  num_groups: Optional[int] = None) -> tuple[Any, int]:
  """Host-side refill: concatenates filtered batches and truncates to `num_groups` groups.

  DAPO (reference §3) accumulates kept groups over generation rounds until it has at least
  `train_batch_size` prompts, then keeps the first `train_batch_size * n` trajectories.

  Args:
    batches: pytrees of one structure, leading axis a multiple of G (e.g. `select_groups` outputs).
    group_size: G.
    num_groups: groups to keep (None: all).

  Returns:
    (batch, available) with `available` the number of groups before truncation; the caller
    generates another round while `available < num_groups`.
  """
  if not batches:
    raise ValueError("concat_groups needs at least one batch.")
  flat = [_leaves_with_groups(b, group_size) for b in batches]
  treedef = flat[0][1]
  for _, other, _ in flat[1:]:
    if other != treedef:
      raise ValueError(f"All batches must have one structure; got {treedef} and {other}.")
  available = sum(g for _, _, g in flat)
  keep = available if num_groups is None else min(num_groups, available)
  leaves = [np.concatenate(parts, axis=0)[: keep * group_size]
            for parts in zip(*(leaves for leaves, _, _ in flat))]
  return jax.tree_util.tree_unflatten(treedef, leaves), available


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

ESTIMATORS: dict[str, Callable[..., Array]] = {
    "grpo": grpo,
    "drgrpo": drgrpo,
    "rloo": rloo,
    "alpha_dpg": alpha_dpg,
}


# What each estimator reads besides the [P, G] rewards: alpha-DPG also needs the summed response
# log-probs under pi_old and pi_ref, so a loop that uses it must score the reference model.
SEQ_LOGP_INPUTS = ("seq_old_logp", "seq_ref_logp")
INPUTS: dict[str, tuple[str, ...]] = {
    "grpo": ("rewards",),
    "drgrpo": ("rewards",),
    "rloo": ("rewards",),
    "alpha_dpg": SEQ_LOGP_INPUTS + ("rewards",),
}


def needs_seq_logp(name: str) -> bool:
  """Whether the estimator reads summed response log-probs (under pi_old and pi_ref)."""
  return INPUTS[name][0] == SEQ_LOGP_INPUTS[0]


def needs_ref(name: str) -> bool:
  """Whether the estimator reads pi_ref's log-probs (the loop then scores the reference)."""
  return "seq_ref_logp" in INPUTS[name]


@functools.lru_cache(maxsize=None)
def _jitted(name: str, hparams: tuple[tuple[str, Any], ...], group_size: int):
  """One compiled program per (estimator, hyperparameters, G): [N] inputs -> [N] advantages."""
  fn = get(name, **dict(hparams))
  groups = lambda x: to_groups(x, group_size=group_size)

  @jax.jit
  def compute_N(rewards_N, seq_old_N, seq_ref_N):
    if needs_seq_logp(name):
      return from_groups(fn(groups(seq_old_N), groups(seq_ref_N), groups(rewards_N)))
    return from_groups(fn(groups(rewards_N)))

  return compute_N


def compute(name: str, hparams: Mapping[str, Any], rewards_N: Any, *, group_size: int,
            seq_old_logp_N: Any = None, seq_ref_logp_N: Any = None) -> np.ndarray:
  """[N] advantages of the named estimator on the [P, G] groups of [N] rewards (host out).

  seq_old_logp_N / seq_ref_logp_N: summed response log-probs, for estimators whose `INPUTS`
  name them (alpha_dpg).
  """
  rewards_N = np.asarray(rewards_N, np.float32)
  zeros = np.zeros_like(rewards_N)
  seq_old = zeros if seq_old_logp_N is None else np.asarray(seq_old_logp_N, np.float32)
  seq_ref = zeros if seq_ref_logp_N is None else np.asarray(seq_ref_logp_N, np.float32)
  if needs_seq_logp(name) and (seq_old_logp_N is None or seq_ref_logp_N is None):
    raise ValueError(f"Advantage estimator {name!r} needs seq_old_logp_N and seq_ref_logp_N.")
  fn = _jitted(name, tuple(sorted(dict(hparams).items())), group_size)
  return np.asarray(fn(rewards_N, seq_old, seq_ref), np.float32)


def names() -> list[str]:
  """Names of the advantage estimators, sorted."""
  return sorted(ESTIMATORS)


def get(name: str, **hparams) -> Callable[..., Array]:
  """Looks up an advantage estimator and binds its keyword-only hyperparameters.

  `grpo`, `drgrpo`, `rloo` take `rewards_PG`; `alpha_dpg` takes
  `(seq_old_logp_PG, seq_ref_logp_PG, rewards_PG)`.

  Raises:
    ValueError: unknown name (listing the valid ones) or unknown hyperparameter.
  """
  if name not in ESTIMATORS:
    raise ValueError(
        f"Unknown advantage estimator {name!r}; valid estimators: {', '.join(names())}.")
  fn = ESTIMATORS[name]
  accepted = [p for p, v in inspect.signature(fn).parameters.items()
              if v.kind == inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(hparams) - set(accepted))
  if unknown:
    raise ValueError(
        f"Advantage estimator {name!r} got unknown hyperparameter(s) {unknown}; it accepts: "
        f"{', '.join(accepted) or 'none'}."
    )
  return functools.partial(fn, **hparams) if hparams else fn
