"""lad_jax.policy.load_policy: a run's checkpoint back as decoder parameters, and its errors."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from lad_jax import policy
from lad_jax import run_dir
from lad_jax.errors import ConfigError

from saved_runs import save_tiny_run, tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config, saved = save_tiny_run(workdir, steps=(1, 2))
  return str(workdir), config, saved


def test_parse_checkpoint_path(tmp_path):
  wd = str(tmp_path)
  assert policy.parse_checkpoint_path(wd) == (wd, None)
  assert policy.parse_checkpoint_path(wd + "/") == (wd, None)
  assert policy.parse_checkpoint_path(os.path.join(wd, "checkpoints")) == (wd, None)
  assert policy.parse_checkpoint_path(os.path.join(wd, "checkpoints", "12")) == (wd, 12)


def _assert_same(params, expected):
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), expected)


def test_load_policy_newest_and_given_step(run):
  workdir, _, saved = run
  config, model_cfg, params, step = policy.load_policy(workdir)
  assert step == 2 and config.name == "tiny" and model_cfg.hidden_size == 64
  _assert_same(params, saved[2])
  _, _, params, step = policy.load_policy(workdir, step=1)
  assert step == 1
  _assert_same(params, saved[1])
  # A given config (the run's own) instead of config.json.
  _, _, params, _ = policy.load_policy(workdir, step=1, config=tiny_config(workdir))
  _assert_same(params, saved[1])


def test_load_policy_with_a_log_z_head_and_master_weights(tmp_path):
  """FlowRL's state has a log Z head, a bf16 model an fp32 master copy in the optimizer state:
  the abstract state follows the run's objective and dtypes."""
  _, saved = save_tiny_run(tmp_path, name="flowrl", **{"model.param_dtype": "bfloat16"})
  config, _, params, step = policy.load_policy(str(tmp_path))
  assert config.loss.name == "flowrl" and step == 1
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
  _assert_same(params, saved[1])


def test_load_policy_errors(run, tmp_path):
  workdir, config, _ = run
  with pytest.raises(FileNotFoundError, match="does not exist"):
    policy.load_policy(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="config.json does not exist"):
    policy.load_policy(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="No checkpoint of step 7 .* steps \\[1, 2\\]"):
    policy.load_policy(workdir, step=7)
  empty = tmp_path / "empty"
  run_dir.record_config(str(empty), config, start_step=0)
  with pytest.raises(FileNotFoundError, match="No checkpoint in"):
    policy.load_policy(str(empty))
  assert not os.path.exists(empty / "checkpoints")  # nothing created by looking
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(ConfigError, match="is not a config"):
    policy.load_policy(str(tmp_path))
