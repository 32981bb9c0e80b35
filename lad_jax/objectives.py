"""The objective registry: a name -> the objective function, its defaults, and what it needs.

Every registry entry (`ObjectiveSpec`) declares what the RL loop must provide, so the loop never
branches on an objective's name:
  needs                the optional `LossInputs` fields the objective reads ("ref_logp",
                       "entropy", "log_z"): a reference model, the entropy, a log-Z head;
  kl_to_ref_coef       the hyperparameter that weights a KL-to-reference term, if any: with a
                       positive value the objective also reads ref_logp (GRPO's `kl_coef`;
                       KL-Cov's `kl_coef` weights |log pi - log pi_old| and is not one);
  advantage_estimator  the `lad_jax.advantages` estimator its authors use;
  agg_mode             the `losses.aggregate` reduction its authors use;
  agg_mode_by          a hyperparameter whose value picks the reduction (LAD's ratio_level: the
                       sequence levels reduce seq-mean-token-mean); its valid values;
  defaults             hyperparameter defaults over the function's own (DAPO is GRPO with
                       eps_high 0.28 and dual clip 10, not a second function).

`get` binds hyperparameters to an entry; the bound `Objective` answers `needs_ref`,
`needs_log_z`, `needs_entropy`, `advantage_estimator` for those hyperparameters:

  objective = objectives.get("lad", divergence="js", eta=0.25)
  per_token_BT, metrics = objective(inputs, key=key)
  loss = losses.aggregate(per_token_BT, inputs.mask, objective.agg_mode)
  ref_logp_BT = score(ref_params) if objective.needs_ref else None

The objectives themselves live in `lad_jax.lad` (LAD, paper Eq. 7-9) and `lad_jax.baselines`;
both build only on `lad_jax.losses`, and nothing below this module imports it.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np

from lad_jax import baselines
from lad_jax import lad
from lad_jax import losses

Array = jax.Array
ObjectiveFn = Callable[..., tuple[Array, dict[str, Array]]]

# The optional `LossInputs` fields an objective may declare in `ObjectiveSpec.needs`.
INPUT_FIELDS = ("ref_logp", "entropy", "log_z")


def hparam_names(fn: ObjectiveFn) -> tuple[str, ...]:
  """The hyperparameters of an objective function: its keyword-only parameters except `key`."""
  params = inspect.signature(fn).parameters.items()
  return tuple(p for p, v in params if v.kind == inspect.Parameter.KEYWORD_ONLY and p != "key")


def _signature_defaults(fn: ObjectiveFn) -> dict[str, Any]:
  params = inspect.signature(fn).parameters
  return {p: params[p].default for p in hparam_names(fn)
          if params[p].default is not inspect.Parameter.empty}


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """One registry entry: how the trainer runs an objective and what it must provide.

  Attributes:
    name: registry name.
    fn: `fn(inputs: LossInputs, *, key, **hparams) -> (per_token [B, T], metrics)`; the metrics are
      scalars (clip fractions, ratio stats, ...), already masked.
    agg_mode: the aggregation its authors use (one of `losses.AGG_MODES`).
    advantage_estimator: the advantage estimator its authors use (see `lad_jax.advantages`).
    needs: the optional `LossInputs` fields it always reads (a subset of `INPUT_FIELDS`).
    defaults: hyperparameter defaults applied over fn's own (user hyperparameters win).
    agg_mode_by: {hyperparameter: {value: agg_mode}}: the bound value picks the reduction (unless
      `get` is given one); the keys are its only valid values, so `get` rejects any other.
    kl_to_ref_coef: the hyperparameter weighting a KL(pi_theta || pi_ref) term, if any; a positive
      value makes the bound objective read ref_logp too.
    doc: one line for listings.
  """

  name: str
  fn: ObjectiveFn
  agg_mode: str = "token-mean"
  advantage_estimator: str = "grpo"
  needs: tuple[str, ...] = ()
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
  agg_mode_by: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict,
                                                                    hash=False)
  kl_to_ref_coef: Optional[str] = None
  doc: str = ""

  def __post_init__(self):
    unknown_needs = sorted(set(self.needs) - set(INPUT_FIELDS))
    if unknown_needs:
      raise ValueError(f"Objective {self.name!r} needs {unknown_needs}; LossInputs' optional "
                       f"fields are {', '.join(INPUT_FIELDS)}.")
    _check_agg_mode(self.agg_mode)
    for modes in self.agg_mode_by.values():
      for mode in modes.values():
        _check_agg_mode(mode)
    declared = [*self.defaults, *self.agg_mode_by] + (
        [self.kl_to_ref_coef] if self.kl_to_ref_coef else [])
    _check_hparams(self.name, declared, self.hparam_names)

  @property
  def hparam_names(self) -> tuple[str, ...]:
    """The hyperparameters `get` accepts for this entry, in fn's order."""
    return hparam_names(self.fn)

  def default_hparams(self) -> dict[str, Any]:
    """Every hyperparameter's default: fn's keyword defaults, then this entry's `defaults`."""
    return {**_signature_defaults(self.fn), **self.defaults}

  def agg_mode_for(self, hparams: Mapping[str, Any]) -> str:
    """The reduction for these bound hyperparameters (`agg_mode_by`, else `agg_mode`).

    Raises:
      ValueError: a hyperparameter of `agg_mode_by` has a value it does not list.
    """
    mode = self.agg_mode
    for name, modes in self.agg_mode_by.items():
      value = hparams.get(name, self.default_hparams().get(name))
      if value not in modes:
        raise ValueError(f"Objective {self.name!r} got {name}={value!r}; valid values: "
                         f"{', '.join(modes)}.")
      mode = modes[value]
    return mode


def _check_agg_mode(mode: str) -> None:
  if mode not in losses.AGG_MODES:
    raise ValueError(
        f"Unknown aggregation mode {mode!r}; valid modes: {', '.join(losses.AGG_MODES)}.")


def _check_hparams(name: str, given: Iterable[str], accepted: tuple[str, ...]) -> None:
  unknown = sorted(set(given) - set(accepted))
  if unknown:
    raise ValueError(
        f"Objective {name!r} got unknown hyperparameter(s) {unknown}; it accepts: "
        f"{', '.join(accepted)}.")


def _is_positive(value: Any) -> bool:
  """value > 0 for a concrete number; a traced value (a swept coefficient) counts as positive."""
  if value is None:
    return False
  try:
    return bool(np.all(np.asarray(value) > 0))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return True


@dataclasses.dataclass(frozen=True)
class Objective:
  """A registered objective bound to its hyperparameters: `objective(inputs, key=key)`.

  Attributes:
    spec: the registry entry.
    hparams: the bound hyperparameters (the entry's `defaults` under the user's); fn's own
      defaults fill the rest.
    agg_mode: the reduction `loss` uses (the entry's unless overridden in `get`).
  """

  spec: ObjectiveSpec
  hparams: Mapping[str, Any]
  agg_mode: str

  @property
  def name(self) -> str:
    return self.spec.name

  @property
  def advantage_estimator(self) -> str:
    """The advantage estimator the objective's authors use (a `lad_jax.advantages` name)."""
    return self.spec.advantage_estimator

  def hparam(self, name: str) -> Any:
    """The value the function will see for a hyperparameter (bound, else fn's default)."""
    if name in self.hparams:
      return self.hparams[name]
    return _signature_defaults(self.spec.fn).get(name)

  @property
  def needs(self) -> tuple[str, ...]:
    """The optional `LossInputs` fields this bound objective reads: the entry's `needs`, plus
    ref_logp when its KL-to-reference coefficient is positive."""
    coef = self.spec.kl_to_ref_coef
    if coef and "ref_logp" not in self.spec.needs and _is_positive(self.hparam(coef)):
      return (*self.spec.needs, "ref_logp")
    return tuple(self.spec.needs)

  @property
  def needs_ref(self) -> bool:
    """Whether the loop must score the reference policy (LossInputs.ref_logp)."""
    return "ref_logp" in self.needs

  @property
  def needs_log_z(self) -> bool:
    """Whether the loop must provide a learned log Z per prompt (LossInputs.log_z, FlowRL)."""
    return "log_z" in self.needs

  @property
  def needs_entropy(self) -> bool:
    """Whether the loop must provide the per-token entropy (LossInputs.entropy, EntAdv)."""
    return "entropy" in self.needs

  def __call__(self, inputs: losses.LossInputs, *, key: Optional[Array] = None):
    """(per_token [B, T], metrics) of the objective on `inputs`; see `ObjectiveSpec.fn`."""
    for field in self.needs:
      if getattr(inputs, field) is None:
        raise ValueError(f"Objective {self.name!r} needs LossInputs.{field}, which is None.")
    return self.spec.fn(inputs, key=key, **self.hparams)

  def loss(self, inputs: losses.LossInputs, *,
           key: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
    """Scalar loss (aggregated with `agg_mode`) and metrics."""
    per_token, metrics = self(inputs, key=key)
    return losses.aggregate(per_token, inputs.mask, self.agg_mode), metrics


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


# LAD's reduction by ratio_level: at the sequence levels every token holds its response's term,
# so the token mean of each response is that term once (verl's GSPO reduction).
_LAD_AGG_MODES = {level: "token-mean" if level == "token" else "seq-mean-token-mean"
                  for level in lad.RATIO_LEVELS}

_TABLE = (
    ObjectiveSpec(
        "lad", lad.practical, agg_mode="token-mean",
        agg_mode_by={"ratio_level": _LAD_AGG_MODES},
        doc="Practical LAD (Eq. 8): e^(A/eta) f(r e^(-A/eta)) per token (or per response with "
            "ratio_level); JS by default."),
    ObjectiveSpec(
        "lad_theoretical", lad.theoretical_objective, agg_mode="seq-mean-token-sum",
        doc="Theoretical LAD (Eq. 7) over a full action axis: [B, K] per-action inputs."),
    ObjectiveSpec(
        "grpo", baselines.grpo, agg_mode="token-mean", kl_to_ref_coef="kl_coef",
        doc="PPO-clip with clip-higher and dual clip, optional KL to ref (verl)."),
    ObjectiveSpec(
        "dapo", baselines.grpo, agg_mode="token-mean", kl_to_ref_coef="kl_coef",
        defaults={"eps_high": 0.28, "clip_ratio_c": 10.0},
        doc="DAPO: grpo with clip-higher 0.2/0.28, dual clip 10, token-mean."),
    ObjectiveSpec(
        "drgrpo", baselines.grpo, agg_mode="seq-mean-token-sum-norm",
        advantage_estimator="drgrpo", kl_to_ref_coef="kl_coef",
        doc="Dr.GRPO: grpo with no std in advantages, sum / (B * max length)."),
    ObjectiveSpec(
        "gspo", baselines.gspo, agg_mode="seq-mean-token-mean", kl_to_ref_coef="kl_coef",
        doc="GSPO: PPO-clip of the length-normalised sequence ratio, eps 3e-4/4e-4 (verl)."),
    ObjectiveSpec(
        "flowrl", baselines.flowrl, agg_mode="seq-mean-token-sum", needs=("ref_logp", "log_z"),
        doc="FlowRL trajectory balance with a learned log Z, beta 15."),
    ObjectiveSpec(
        "kl_cov", baselines.kl_cov, agg_mode="token-mean",
        doc="KL-Cov: unclipped -A r, |l| penalty on the top-cov tokens."),
    ObjectiveSpec(
        "clip_cov", baselines.clip_cov, agg_mode="token-mean",
        doc="Clip-Cov: zero gradient on random tokens with cov in (lb, ub); needs key."),
    ObjectiveSpec(
        "entadv", baselines.entadv, agg_mode="token-mean", needs=("entropy",),
        kl_to_ref_coef="kl_coef",
        doc="EntAdv: A + min(alpha H, |A| / kappa), then PPO-clip."),
    ObjectiveSpec(
        "alpha_dpg", baselines.reinforce, agg_mode="seq-mean-token-sum-norm",
        advantage_estimator="alpha_dpg",
        doc="alpha-DPG: REINFORCE on alpha-divergence pseudo-rewards, LOO baseline."),
    ObjectiveSpec(
        "pg", baselines.reinforce, agg_mode="token-mean",
        doc="Plain policy gradient -A logp (reference)."),
)


def _index(specs: Iterable[ObjectiveSpec]) -> Mapping[str, ObjectiveSpec]:
  table: dict[str, ObjectiveSpec] = {}
  for spec in specs:
    if spec.name in table:
      raise RuntimeError(f"Objective {spec.name!r} registered twice.")
    table[spec.name] = spec
  return types.MappingProxyType(table)


# name -> ObjectiveSpec, read-only.
SPECS: Mapping[str, ObjectiveSpec] = _index(_TABLE)


def names() -> list[str]:
  """Names of all registered objectives, sorted."""
  return sorted(SPECS)


def get(name: str, *, agg_mode: Optional[str] = None, **hparams) -> Objective:
  """Looks up a registered objective and binds its keyword-only hyperparameters.

  The entry's `defaults` are applied first and `hparams` over them, so
  `get("dapo", eps_high=0.3)` is DAPO with eps_high 0.3 and dual clip 10. The aggregation is the
  entry's (`ObjectiveSpec.agg_mode_for`: `get("lad", ratio_level="sequence")` reduces
  seq-mean-token-mean) unless agg_mode is given.

  Args:
    name: one of `names()`.
    agg_mode: overrides the entry's aggregation (one of `losses.AGG_MODES`).
    **hparams: keyword-only hyperparameters of the entry's function.

  Raises:
    ValueError: unknown name (listing the valid ones), unknown hyperparameter (listing the
      accepted ones), a value `agg_mode_by` does not list (e.g. LAD's ratio_level), or unknown
      aggregation mode.
  """
  if name not in SPECS:
    raise ValueError(f"Unknown objective {name!r}; valid objectives: {', '.join(names())}.")
  spec = SPECS[name]
  _check_hparams(name, hparams, spec.hparam_names)
  bound = {**spec.defaults, **hparams}
  own_mode = spec.agg_mode_for(bound)  # checks the agg_mode_by values even when overridden
  mode = own_mode if agg_mode is None else agg_mode
  _check_agg_mode(mode)
  return Objective(spec=spec, hparams=bound, agg_mode=mode)
