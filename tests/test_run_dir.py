"""The run-dir guard: a workdir resumes only with a config that does not change its run."""

from __future__ import annotations

import json
import os

import pytest

from lad_jax import config_utils
from lad_jax import run_dir


@pytest.fixture(scope="module")
def base():
  return config_utils.base_config()


def _copy(config):
  return config.copy_and_resolve_references()


def _started(tmp_path, config, step=0):
  workdir = str(tmp_path / "run")
  run_dir.record_config(workdir, config, start_step=step)
  return workdir


def test_identical_config_resumes(tmp_path, base):
  workdir = _started(tmp_path, base)
  run_dir.check_resume(workdir, _copy(base))


def test_no_saved_config_resumes(tmp_path, base):
  run_dir.check_resume(str(tmp_path / "fresh"), base)


@pytest.mark.parametrize("change, named", [
    (lambda c: setattr(c, "seed", 1), "seed: 0 -> 1"),
    (lambda c: setattr(c.loss, "name", "grpo"), 'loss.name: "lad" -> "grpo"'),
    (lambda c: setattr(c.loss.hparams.lad, "eta", 0.5), "loss.hparams.lad.eta: 0.25 -> 0.5"),
    (lambda c: setattr(c.sampling, "group_size", 8), "sampling.group_size: 4 -> 8"),
    (lambda c: setattr(c.train, "prompts_per_step", 2), "train.prompts_per_step: 4 -> 2"),
    (lambda c: setattr(c.train, "micro_batches", 2), "train.micro_batches: 1 -> 2"),
    (lambda c: setattr(c.optim, "lr", 2e-6), "optim.lr: 1e-06 -> 2e-06"),
    (lambda c: setattr(c.model, "source", "random"), 'model.source: "gguf" -> "random"'),
    (lambda c: setattr(c.data, "train", "basic_arithmetic"), "data.train:"),
])
def test_run_changing_key_is_refused_naming_it(tmp_path, base, change, named):
  workdir = _started(tmp_path, base)
  new = _copy(base)
  change(new)
  with pytest.raises(config_utils.ConfigError) as err:
    run_dir.check_resume(workdir, new)
  message = str(err.value)
  assert named in message and "\n" not in message
  assert "resume=False" in message and "workdir" in message


def test_every_difference_is_named(tmp_path, base):
  workdir = _started(tmp_path, base)
  new = _copy(base)
  new.seed, new.loss.name, new.sampling.max_new_tokens = 3, "grpo", 128
  with pytest.raises(config_utils.ConfigError) as err:
    run_dir.check_resume(workdir, new)
  for key in ("seed:", "loss.name:", "sampling.max_new_tokens: 64 -> 128"):
    assert key in str(err.value)


def test_keys_that_do_not_change_the_run_may_differ(tmp_path, base):
  workdir = _started(tmp_path, base)
  new = _copy(base)
  new.train.num_steps = 100  # continues the run
  new.log.progress_bar = False
  new.log.samples = 0
  new.eval.every = 5
  new.checkpoint.every = 2
  new.checkpoint.max_to_keep = 9
  new.verifier.workers = 8
  new.compile_cache_dir = "/tmp/cache"
  new.workdir = "/elsewhere"
  new.name = "renamed"
  new.distributed = True
  new.mesh.fsdp = 2
  run_dir.check_resume(workdir, new)


def test_unused_objectives_hparams_may_differ(tmp_path, base):
  workdir = _started(tmp_path, base)
  new = _copy(base)
  new.loss.hparams.grpo.eps_high = 0.5  # the run uses lad
  run_dir.check_resume(workdir, new)
  new.loss.name = "grpo"
  with pytest.raises(config_utils.ConfigError, match="loss.hparams.grpo.eps_high"):
    run_dir.check_resume(workdir, new)


def test_resume_false_is_not_compared(tmp_path, base):
  workdir = _started(tmp_path, base)
  new = _copy(base)
  new.seed = 5
  new.checkpoint.resume = False
  run_dir.check_resume(workdir, new)


def test_schema_change_counts_as_a_difference(tmp_path, base):
  workdir = _started(tmp_path, base)
  with open(run_dir.config_path(workdir)) as f:
    saved = json.load(f)
  saved["optim"]["new_knob"] = 1
  with open(run_dir.config_path(workdir), "w") as f:
    json.dump(saved, f)
  with pytest.raises(config_utils.ConfigError, match="optim.new_knob: 1 -> <absent>"):
    run_dir.check_resume(workdir, base)


def test_unreadable_saved_config_is_a_config_error(tmp_path, base):
  workdir = _started(tmp_path, base)
  with open(run_dir.config_path(workdir), "w") as f:
    f.write('{"seed": ')
  with pytest.raises(config_utils.ConfigError, match="cannot read"):
    run_dir.check_resume(workdir, base)


def test_each_start_keeps_its_config(tmp_path, base):
  workdir = str(tmp_path / "run")
  first = run_dir.record_config(workdir, base, start_step=0)
  longer = _copy(base)
  longer.train.num_steps = 10
  second = run_dir.record_config(workdir, longer, start_step=3)
  again = run_dir.record_config(workdir, longer, start_step=3)
  assert [os.path.basename(p) for p in (first, second, again)] == [
      "start_0.json", "start_3.json", "start_3.1.json"]
  assert sorted(os.listdir(os.path.join(workdir, "configs"))) == [
      "start_0.json", "start_3.1.json", "start_3.json"]
  with open(first) as f:
    assert json.load(f)["train"]["num_steps"] == base.train.num_steps
  with open(run_dir.config_path(workdir)) as f:
    assert json.load(f)["train"]["num_steps"] == 10
  assert not [n for n in os.listdir(workdir) if ".tmp" in n]


def test_archive_previous_moves_the_old_run_aside(tmp_path, base):
  workdir = _started(tmp_path, base)
  os.makedirs(os.path.join(workdir, "checkpoints", "3"))
  dest = run_dir.archive_previous(workdir)
  assert sorted(os.listdir(dest)) == ["checkpoints", "config.json", "configs"]
  assert sorted(os.listdir(workdir)) == ["previous"]
  assert run_dir.archive_previous(workdir) is None
  run_dir.check_resume(workdir, _copy(base))  # nothing left to compare


def test_key_new_to_the_schema_at_its_default_resumes(tmp_path, base):
  """A run saved before a key existed resumes when the key keeps its default, not otherwise."""
  workdir = _started(tmp_path, base)
  with open(run_dir.config_path(workdir)) as f:
    saved = json.load(f)
  del saved["loss"]["hparams"]["lad"]["ratio_level"]  # as saved by an older version
  with open(run_dir.config_path(workdir), "w") as f:
    json.dump(saved, f)
  run_dir.check_resume(workdir, base)
  changed = _copy(base)
  changed.loss.hparams.lad.ratio_level = "sequence"
  with pytest.raises(config_utils.ConfigError, match="ratio_level: <absent> -> \"sequence\""):
    run_dir.check_resume(workdir, changed)
