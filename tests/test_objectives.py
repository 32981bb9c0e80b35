"""Tests of lad_jax.objectives: the registry, its declared needs, and DAPO/Dr.GRPO as GRPO presets."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import baselines
from lad_jax import lad
from lad_jax import losses
from lad_jax import objectives

ALL = ("alpha_dpg", "clip_cov", "dapo", "drgrpo", "entadv", "flowrl", "grpo", "gspo", "kl_cov",
       "lad", "lad_theoretical", "pg")
# A 2 x 4 batch: row 0 has 3 valid tokens, row 1 has 1 (as test_losses.py).
PER_TOKEN = jnp.asarray([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
MASK = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]], jnp.float32)


def _random_inputs(seed, b=6, t=7, scale=1.5) -> losses.LossInputs:
  """Ragged [B, T] inputs with log-ratios large enough to hit every clip (|l| up to ~4)."""
  rng = np.random.default_rng(seed)
  logp = -np.abs(rng.normal(size=(b, t)))
  lengths = np.arange(b) % t + 2
  arrays = dict(
      logp=logp, old_logp=logp + scale * rng.normal(size=(b, t)), advantages=rng.normal(size=(b,)),
      mask=np.arange(t)[None, :] < lengths[:, None], ref_logp=logp + rng.normal(size=(b, t)),
      entropy=np.abs(rng.normal(size=(b, t))), log_z=rng.normal(size=(b,)))
  return losses.LossInputs(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})


def _value_and_grad(objective: objectives.Objective, inputs: losses.LossInputs):
  loss = lambda logp: objective.loss(inputs.replace(logp=logp))[0]
  return jax.jit(jax.value_and_grad(loss))(inputs.logp)


def test_names_list_every_objective():
  assert objectives.names() == sorted(ALL)
  assert set(objectives.SPECS) == set(ALL)
  for name in ALL:
    spec = objectives.SPECS[name]
    assert spec.name == name and spec.doc
    assert objectives.get(name).spec is spec
  # The functions come from lad.py / baselines.py; the table (and its presets) lives here.
  assert objectives.SPECS["lad"].fn is lad.practical
  assert objectives.SPECS["lad_theoretical"].fn is lad.theoretical_objective
  for name in ("grpo", "dapo", "drgrpo"):
    assert objectives.SPECS[name].fn is baselines.grpo
  assert objectives.SPECS["gspo"].fn is baselines.gspo
  assert not hasattr(baselines, "dapo") and not hasattr(baselines, "OBJECTIVES")
  assert not hasattr(lad, "OBJECTIVES")
  for gone in ("get", "names", "Objective", "ObjectiveSpec"):
    assert not hasattr(losses, gone), gone
  with pytest.raises(TypeError):
    objectives.SPECS["mine"] = objectives.SPECS["lad"]  # read-only


@pytest.mark.parametrize("name, agg_mode, estimator", [
    ("lad", "token-mean", "grpo"),
    ("lad_theoretical", "seq-mean-token-sum", "grpo"),
    ("grpo", "token-mean", "grpo"),
    # verl's GSPO recipe: seq-mean-token-mean, GRPO's group advantages (and no KL, NEEDS below).
    ("gspo", "seq-mean-token-mean", "grpo"),
    ("dapo", "token-mean", "grpo"),
    ("drgrpo", "seq-mean-token-sum-norm", "drgrpo"),
    ("flowrl", "seq-mean-token-sum", "grpo"),
    ("kl_cov", "token-mean", "grpo"),
    ("clip_cov", "token-mean", "grpo"),
    ("entadv", "token-mean", "grpo"),
    ("alpha_dpg", "seq-mean-token-sum-norm", "alpha_dpg"),
    ("pg", "token-mean", "grpo"),
])
def test_aggregation_and_advantage_estimator_as_the_authors_use(name, agg_mode, estimator):
  objective = objectives.get(name)
  assert objective.agg_mode == objective.spec.agg_mode == agg_mode
  assert objective.advantage_estimator == objective.spec.advantage_estimator == estimator
  assert objectives.get(name, agg_mode="token-mean").agg_mode == "token-mean"


def test_lookup_errors_name_the_valid_choices():
  with pytest.raises(ValueError, match="Unknown objective 'ladd'; valid objectives: alpha_dpg, "
                     "clip_cov, .*lad, lad_theoretical, pg."):
    objectives.get("ladd")
  with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['etaa'\]; it accepts: "
                     "divergence, eta, log_ratio_clip, clip_adv"):
    objectives.get("lad", etaa=1.0)
  # dapo accepts exactly grpo's hyperparameters.
  with pytest.raises(ValueError, match=r"'dapo' got unknown hyperparameter\(s\) \['clip_ratio'\]; "
                     "it accepts: eps_low, eps_high, clip_ratio_c, kl_coef, kl_estimator, "
                     "log_ratio_clip"):
    objectives.get("dapo", clip_ratio=0.2)
  with pytest.raises(ValueError, match="Unknown aggregation mode 'token-sum'; valid modes: "
                     "token-mean, seq-mean-token-mean"):
    objectives.get("lad", agg_mode="token-sum")
  # A bad ratio_level is refused by `get` (before any call), also with an explicit agg_mode.
  for agg_mode in (None, "token-mean"):
    with pytest.raises(ValueError, match=r"^Objective 'lad' got ratio_level='seq'; valid values: "
                       r"token, sequence, sequence_mean\.$"):
      objectives.get("lad", ratio_level="seq", agg_mode=agg_mode)


def test_lad_ratio_level_picks_its_aggregation():
  # The sequence levels hold each response's term on every token: seq-mean-token-mean counts it
  # once per response (lad.practical's docstring); the token level keeps token-mean.
  assert objectives.get("lad").agg_mode == "token-mean"
  assert objectives.get("lad", ratio_level="token").agg_mode == "token-mean"
  for level in ("sequence", "sequence_mean"):
    objective = objectives.get("lad", ratio_level=level, eta=0.5)
    assert objective.agg_mode == "seq-mean-token-mean"
    assert objective.hparams == {"ratio_level": level, "eta": 0.5}
    assert objectives.get("lad", ratio_level=level, agg_mode="token-mean").agg_mode == "token-mean"
  assert objectives.SPECS["lad"].default_hparams()["ratio_level"] == "token"
  # The bound level reaches the function, and `loss` reduces with the level's aggregation.
  inputs = _random_inputs(1)
  loss, _ = objectives.get("lad", ratio_level="sequence").loss(inputs)
  per_token = lad.practical_per_token(inputs.logp, inputs.old_logp, inputs.advantages,
                                      mask=inputs.mask, ratio_level="sequence")
  np.testing.assert_allclose(
      loss, losses.aggregate(per_token, inputs.mask, "seq-mean-token-mean"), rtol=1e-6)
  assert float(loss) != float(losses.aggregate(per_token, inputs.mask, "token-mean"))


def test_one_log_ratio_clamp_name_and_default_everywhere():
  for name in ALL:
    defaults = objectives.SPECS[name].default_hparams()
    assert [k for k in defaults if "log_ratio" in k] in ([], ["log_ratio_clip"]), name
    if "log_ratio_clip" in defaults:
      assert defaults["log_ratio_clip"] == losses.LOG_RATIO_CLIP == 20.0, name
  # FlowRL's sequence importance-weight clamp is another quantity with the same default.
  assert objectives.SPECS["flowrl"].default_hparams()["log_weight_clip"] == losses.LOG_RATIO_CLIP
  for name in ("lad", "grpo", "dapo", "drgrpo", "kl_cov", "clip_cov", "entadv"):
    assert "log_ratio_clip" in objectives.SPECS[name].hparam_names, name


def test_dapo_is_grpo_with_its_defaults():
  dapo = objectives.get("dapo")
  assert dapo.hparams == {"eps_high": 0.28, "clip_ratio_c": 10.0}
  assert dapo.spec.default_hparams() == {
      **objectives.SPECS["grpo"].default_hparams(), "eps_high": 0.28, "clip_ratio_c": 10.0}
  # User hyperparameters win over the entry's defaults, the other default stays.
  assert objectives.get("dapo", eps_high=0.3).hparams == {"eps_high": 0.3, "clip_ratio_c": 10.0}
  grpo_as_dapo = objectives.get("grpo", eps_high=0.28, clip_ratio_c=10.0)
  plain_grpo = objectives.get("grpo")
  for seed in range(3):
    inputs = _random_inputs(seed)
    value, grad = _value_and_grad(dapo, inputs)
    want_value, want_grad = _value_and_grad(grpo_as_dapo, inputs)
    np.testing.assert_array_equal(value, want_value)
    np.testing.assert_array_equal(grad, want_grad)
    chex.assert_trees_all_equal(dapo(inputs)[1], grpo_as_dapo(inputs)[1])
    # ... and the defaults matter: these inputs hit the clip-higher and dual-clip ranges.
    assert float(value) != float(_value_and_grad(plain_grpo, inputs)[0])


def test_drgrpo_is_grpo_with_its_aggregation_and_estimator():
  drgrpo = objectives.get("drgrpo")
  assert drgrpo.hparams == {}
  same = objectives.get("grpo", agg_mode="seq-mean-token-sum-norm")
  inputs = _random_inputs(4)
  for got, want in zip(_value_and_grad(drgrpo, inputs), _value_and_grad(same, inputs)):
    np.testing.assert_array_equal(got, want)


# (name, hparams, needs_ref, needs_log_z, needs_entropy)
NEEDS = [
    ("lad", {}, False, False, False),
    ("lad_theoretical", {}, False, False, False),
    ("grpo", {}, False, False, False),
    ("grpo", {"kl_coef": 0.0}, False, False, False),
    ("grpo", {"kl_coef": 1e-3}, True, False, False),
    ("gspo", {}, False, False, False),
    ("gspo", {"kl_coef": 1e-3}, True, False, False),
    ("lad", {"ratio_level": "sequence"}, False, False, False),
    ("dapo", {}, False, False, False),
    ("dapo", {"kl_coef": 0.1}, True, False, False),
    ("drgrpo", {"kl_coef": 0.1}, True, False, False),
    ("entadv", {}, False, False, True),
    ("entadv", {"kl_coef": 0.1}, True, False, True),
    # KL-Cov's kl_coef weights |log pi - log pi_old|, not a KL to the reference.
    ("kl_cov", {}, False, False, False),
    ("kl_cov", {"kl_coef": 1.0}, False, False, False),
    ("clip_cov", {}, False, False, False),
    ("flowrl", {}, True, True, False),
    ("alpha_dpg", {}, False, False, False),
    ("pg", {}, False, False, False),
]


@pytest.mark.parametrize("name, hparams, needs_ref, needs_log_z, needs_entropy", NEEDS)
def test_objectives_declare_what_they_need(name, hparams, needs_ref, needs_log_z, needs_entropy):
  objective = objectives.get(name, **hparams)
  assert objective.needs_ref is needs_ref
  assert objective.needs_log_z is needs_log_z
  assert objective.needs_entropy is needs_entropy
  assert set(objective.spec.needs) <= set(objective.needs)
  assert set(objective.needs) <= set(objectives.INPUT_FIELDS)


def test_every_objective_is_in_the_needs_table():
  assert {row[0] for row in NEEDS} == set(ALL)


def test_declared_needs_are_checked_before_the_call():
  inputs = _random_inputs(0)
  no_ref = inputs.replace(ref_logp=None)
  objectives.get("grpo")(no_ref)  # no KL term: ref_logp is not read
  objectives.get("kl_cov", kl_coef=1.0)(no_ref)
  with pytest.raises(ValueError, match="'grpo' needs LossInputs.ref_logp, which is None"):
    objectives.get("grpo", kl_coef=0.1)(no_ref)
  with pytest.raises(ValueError, match="'flowrl' needs LossInputs.ref_logp"):
    objectives.get("flowrl")(no_ref)
  with pytest.raises(ValueError, match="'flowrl' needs LossInputs.log_z"):
    objectives.get("flowrl")(inputs.replace(log_z=None))


def test_traced_kl_coef_counts_as_needing_the_reference():
  # A swept (vmapped / traced) coefficient cannot be compared with 0: keep the reference.
  seen = []
  jax.jit(lambda c: seen.append(objectives.get("grpo", kl_coef=c).needs_ref) or c)(0.1)
  assert seen == [True]
  assert objectives.get("grpo", kl_coef=jnp.float32(0.0)).needs_ref is False


def test_objective_binds_hparams_checks_needs_and_aggregates():
  seen = {}

  def fake(inputs, *, key=None, scale=1.0):
    seen["key"] = key
    return inputs.logp * scale, {"scale": jnp.float32(scale)}

  spec = objectives.ObjectiveSpec("fake", fake, agg_mode="seq-mean-token-sum", needs=("entropy",))
  objective = objectives.Objective(spec=spec, hparams={"scale": 2.0}, agg_mode=spec.agg_mode)
  assert objective.needs_entropy and not objective.needs_ref
  inputs = losses.LossInputs(logp=PER_TOKEN, old_logp=PER_TOKEN, advantages=jnp.zeros(2),
                             mask=MASK)
  with pytest.raises(ValueError, match="needs LossInputs.entropy"):
    objective(inputs)
  inputs = inputs.replace(entropy=jnp.zeros_like(PER_TOKEN))
  key = jax.random.key(0)
  loss, metrics = objective.loss(inputs, key=key)
  assert seen["key"] is key
  np.testing.assert_allclose(loss, 2 * ((1 + 2 + 3) + 5) / 2, rtol=1e-7)  # seq-mean-token-sum
  chex.assert_trees_all_close(metrics, {"scale": jnp.float32(2.0)})


def test_spec_rejects_inconsistent_entries():
  def fake(inputs, *, key=None, scale=1.0):
    return inputs.logp * scale, {}

  with pytest.raises(ValueError, match=r"needs \['ref'\]; LossInputs' optional fields are "
                     "ref_logp, entropy, log_z"):
    objectives.ObjectiveSpec("fake", fake, needs=("ref",))
  with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['eta'\]; it accepts: scale"):
    objectives.ObjectiveSpec("fake", fake, defaults={"eta": 1.0})
  with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['kl_coef'\]"):
    objectives.ObjectiveSpec("fake", fake, kl_to_ref_coef="kl_coef")
  with pytest.raises(ValueError, match="Unknown aggregation mode 'mean'"):
    objectives.ObjectiveSpec("fake", fake, agg_mode="mean")
  with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['level'\]"):
    objectives.ObjectiveSpec("fake", fake, agg_mode_by={"level": {"a": "token-mean"}})
  with pytest.raises(ValueError, match="Unknown aggregation mode 'mean'"):
    objectives.ObjectiveSpec("fake", fake, agg_mode_by={"scale": {1.0: "mean"}})
