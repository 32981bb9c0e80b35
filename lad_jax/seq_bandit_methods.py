"""The sequence bandit's methods (registry objectives), exact advantages and combined objective.

Every method is a registered objective (`lad_jax.objectives.get`) with the advantage estimator
its registry entry names (`Objective.advantage_estimator`):

  lad_<div>             practical LAD, token-level ratio (the registry's "lad"), eta.
  lad_seq_<div>         practical LAD with ratio_level="sequence" (one ratio per response).
  lad_seqmean_<div>     practical LAD with ratio_level="sequence_mean" (length-normalised).
  lad_theoretical_<div> theoretical LAD (Eq. 7) over the 100 enumerated responses of each prompt
                        (exact mode only: it needs every response).
  grpo / grpo_kl        PPO-clip (verl defaults), without / with kl_coef=GRPO_KL_COEF to pi_0.
  drgrpo, gspo          registry defaults.
  flowrl                beta = 1 / eta, log Z from the learned head, pi_ref = pi_0.
  alpha_dpg             registry defaults (alpha 0.25, target pi_0 filtered to correct).
  pg                    plain -A log pi.

`exact_advantages` gives each estimator's advantage in expectation over a group drawn from
pi_old, from the exact pi_old(y|x): GRPO's (r - E r) / (std r + eps) with the exact mean and
(population) std, Dr.GRPO's r - E r, RLOO's r - E r (its G / (G-1) factor -> 1), alpha-DPG's
pseudo-reward with the exact partition Z = sum_{y correct} pi_0(y) (clamped at 1, as the
estimator) minus its exact mean (the leave-one-out baseline's limit).

`combined_objective` folds a per-row weight into an objective: per_token * scale_N[:, None]
before the aggregation (and lets one program run several methods), so with scale = Y pi_old(y|x) over the P*Y enumerated rows the train
step's loss is the expectation over y ~ pi_old of the sampled loss (exactly for the seq-sum
modes, and for token-mean as every enumerated response has 3 tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lad_jax import divergences
from lad_jax import losses
from lad_jax import objectives

Array = jax.Array

GRPO_KL_COEF = 0.04
LAD_DIVERGENCES = ("kl", "rkl", "jeffreys", "tv", "hellinger", "js", "alpha:0.5")
# ratio_level of the registry's "lad" (the seqratio branch); method prefix -> value.
RATIO_LEVELS = {"lad_seq_": "sequence", "lad_seqmean_": "sequence_mean"}
SEQUENCE_RATIO_METHODS = ("lad_seq_kl", "lad_seq_js", "lad_seqmean_js")
BASELINES = ("grpo", "grpo_kl", "drgrpo", "gspo", "flowrl", "alpha_dpg", "pg")
DEFAULT_METHODS = (*(f"lad_{d}" for d in LAD_DIVERGENCES), *SEQUENCE_RATIO_METHODS,
                   "lad_theoretical_js", *BASELINES)


@dataclasses.dataclass(frozen=True)
class Method:
  """A method: registry name and hyperparameters.

  Attributes:
    name: the method's name (e.g. "lad_seq_js").
    objective: registry name.
    hparams: for `objectives.get`.
    exact_only: needs every response (theoretical LAD): no sampled mode.
  """

  name: str
  objective: str
  hparams: Mapping[str, Any]
  exact_only: bool = False

  def get(self) -> objectives.Objective:
    return objectives.get(self.objective, **self.hparams)

  @property
  def estimator(self) -> str:
    return self.get().advantage_estimator


def _lad(name: str, prefix: str, eta: float) -> Optional[Method]:
  if not name.startswith(prefix) or len(name) == len(prefix):
    return None
  div = name[len(prefix):]
  divergences.get(div)  # a clear error for a bad divergence name
  if prefix == "lad_theoretical_":
    return Method(name, "lad_theoretical", {"divergence": div, "eta": eta}, exact_only=True)
  hparams = {"divergence": div, "eta": eta}
  if prefix in RATIO_LEVELS:
    hparams["ratio_level"] = RATIO_LEVELS[prefix]
  return Method(name, "lad", hparams)


def method(name: str, *, eta: float = 1.0) -> Method:
  """Parses a method name (module docstring); raises ValueError listing the valid forms."""
  fixed = {"grpo": ("grpo", {}), "grpo_kl": ("grpo", {"kl_coef": GRPO_KL_COEF}),
           "drgrpo": ("drgrpo", {}), "gspo": ("gspo", {}), "flowrl": ("flowrl", {"beta": 1 / eta}),
           "alpha_dpg": ("alpha_dpg", {}), "pg": ("pg", {})}
  if name in fixed:
    return Method(name, *fixed[name])
  for prefix in ("lad_theoretical_", *RATIO_LEVELS, "lad_"):
    m = _lad(name, prefix, eta)
    if m is not None:
      return m
  raise ValueError(f"Unknown method {name!r}; valid: {', '.join(fixed)}, lad_<div>, "
                   f"lad_seq_<div>, lad_seqmean_<div>, lad_theoretical_<div> with <div> one of "
                   f"{', '.join(LAD_DIVERGENCES)} (or any alpha:<a>).")


def available(name: str, *, eta: float = 1.0) -> Optional[str]:
  """None if the method's objective can be built here, else why not (e.g. a registry entry or
  hyperparameter this checkout does not have yet)."""
  try:
    method(name, eta=eta).get()
  except ValueError as e:
    return str(e)
  return None


# ------------------------------------------------------------------------------------------------
# Exact advantages
# ------------------------------------------------------------------------------------------------


def _alpha_dpg_exact(q_PY, logp0_PY, correct_PY, *, alpha: float = 0.25,
                     z_default: float = 1e-4, pseudo_reward_clip: Optional[float] = 10.0):
  """alpha-DPG's pseudo-reward (`advantages.alpha_dpg_pseudo_reward`) with the exact Z."""
  pi0 = np.exp(logp0_PY)
  z_P1 = np.minimum((pi0 * correct_PY).sum(-1, keepdims=True), 1.0)
  z_P1 = np.where(z_P1 > 0, z_P1, z_default)
  log_t = np.log(np.maximum(q_PY, 1e-300)) - logp0_PY + np.log(z_P1)  # t = pi Z / (R pi_ref)
  exponent = np.minimum((alpha - 1.0) * log_t, np.log1p(pseudo_reward_clip or np.inf) + 1.0)
  pseudo = np.where(correct_PY, np.expm1(exponent), -1.0)
  if pseudo_reward_clip is not None:
    pseudo = np.minimum(pseudo, pseudo_reward_clip)
  return pseudo


def exact_advantages(estimator: str, q_PY, correct_PY, logp0_PY, *, eps: float = 1e-6
                     ) -> np.ndarray:
  """[P, Y] advantage of every response in expectation under pi_old (q_PY: probabilities)."""
  q = np.asarray(q_PY, np.float64)
  if estimator == "alpha_dpg":
    r = _alpha_dpg_exact(q, np.asarray(logp0_PY, np.float64), np.asarray(correct_PY))
  else:
    r = np.asarray(correct_PY, np.float64)
  mean = (q * r).sum(-1, keepdims=True)
  if estimator in ("drgrpo", "rloo", "alpha_dpg"):
    return r - mean
  if estimator == "grpo":
    std = np.sqrt(np.maximum((q * np.square(r - mean)).sum(-1, keepdims=True), 0.0))
    return np.where(std > 0, (r - mean) / (std + eps), 0.0)
  raise ValueError(f"No exact form for advantage estimator {estimator!r}; "
                   "valid: grpo, drgrpo, rloo, alpha_dpg.")


# ------------------------------------------------------------------------------------------------
# One objective for a group of methods, with per-row weights (exact mode)
# ------------------------------------------------------------------------------------------------


def group_key(m: Method) -> tuple[str, str, bool, bool]:
  """Methods with equal keys run in one compiled program (`combined_objective`): same
  aggregation, advantage estimator, log Z head and exact-only-ness."""
  o = m.get()
  return (o.agg_mode, o.advantage_estimator, o.needs_log_z, m.exact_only)


def combined_objective(objs: Sequence[objectives.Objective], index: Array,
                       scale_N: Optional[Array] = None) -> objectives.Objective:
  """One objective standing for objs[index] (a traced int: `lax.switch`, a select under vmap),
  with the per-token loss of row i multiplied by scale_N[i] (a traced [N]) when given.

  Bound inside a jitted step (`train.train_step` takes the spec as a Python argument), so the
  method index and the weights are data: one compile serves every method of a `group_key`.
  Metrics are dropped (the objectives' differ). Needs: the union of theirs.
  """
  if len({(o.agg_mode, o.advantage_estimator) for o in objs}) != 1:
    raise ValueError("combined_objective needs one aggregation and one advantage estimator; "
                     f"got {[(o.name, o.agg_mode, o.advantage_estimator) for o in objs]}.")
  needs = tuple(sorted({n for o in objs for n in o.needs}))

  def fn(inputs: losses.LossInputs, *, key=None):
    branches = [lambda x, o=o: o(x, key=key)[0].astype(jnp.float32) for o in objs]
    if len(branches) == 1:
      per_token_NT = branches[0](inputs)
    else:
      per_token_NT = jax.lax.switch(index, branches, inputs)
    if scale_N is not None:
      per_token_NT = per_token_NT * scale_N.astype(jnp.float32)[:, None]
    return per_token_NT, {}

  spec = objectives.ObjectiveSpec(
      name="+".join(o.name for o in objs), fn=fn, agg_mode=objs[0].agg_mode,
      advantage_estimator=objs[0].advantage_estimator, needs=needs)
  return objectives.Objective(spec=spec, hparams={}, agg_mode=objs[0].agg_mode)


def theoretical_loss(objective: objectives.Objective, seq_logp_PY: Array, old_seq_PY: Array,
                     adv_PY: Array) -> Array:
  """Theoretical LAD over the enumerated responses: rows = prompts, "actions" = the 100."""
  inputs = losses.LossInputs(logp=seq_logp_PY, old_logp=old_seq_PY, advantages=adv_PY,
                             mask=jnp.ones_like(adv_PY))
  return objective.loss(inputs)[0]
