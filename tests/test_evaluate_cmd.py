"""experiments/evaluate.py (policy.run_evaluation): the RL loop's own evaluation, reproduced.

A one-step run with eval.before_train logs the loop's evaluations of the initial model (step 0)
and of step 1; evaluating the config's initial model and the step-1 checkpoint afterwards gives
the very same numbers (same sampler, settings and key), plus Pass@k for every k."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lad_jax import metrics as metrics_lib
from lad_jax import policy
from lad_jax import rl

from saved_runs import ROOT, fake_task, tiny_config


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(workdir, **{"train.num_steps": 1, "eval.before_train": True,
                                   "eval.every": 1})
  rl.train_and_evaluate(config, task=fake_task())
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [0, 1]
  return config, rows


def _results(out_dir):
  with open(os.path.join(out_dir, policy.RESULTS_JSON), encoding="utf-8") as f:
    return json.load(f)


def _assert_loop_numbers(metrics, row, k=4):
  logged = {name: v for name, v in row.items() if name.startswith(("val-core/", "val-aux/"))}
  core = "val-core/fake/acc"
  assert f"{core}/mean@4" in logged and f"{core}/pass@2" in logged
  assert {name: metrics[name] for name in logged} == logged  # identical, not close
  passes = [metrics[f"{core}/pass@{i}"] for i in range(1, k + 1)]
  assert passes == sorted(passes) and passes[0] == metrics[f"{core}/mean@4"]


def test_initial_model_equals_the_loops_step_0_evaluation(loop_run, tmp_path):
  config, rows = loop_run
  text = policy.run_evaluation(config=config, out_dir=str(tmp_path), task=fake_task())
  got = _results(tmp_path)
  assert got["config"] == "tiny" and got["model"]["source"] == "random"
  _assert_loop_numbers(got["metrics"], rows[0])
  assert "| pass@3 |" in text and text.endswith(f"{tmp_path}/results.md")


def test_checkpoint_equals_the_loops_evaluation_after_step_1(loop_run, tmp_path):
  config, rows = loop_run
  policy.run_evaluation(checkpoint=config.workdir, out_dir=str(tmp_path), task=fake_task())
  got = _results(tmp_path)
  assert got["step"] == 1 and got["checkpoint"] == os.path.join(config.workdir, "checkpoints", "1")
  _assert_loop_numbers(got["metrics"], rows[1])


def evaluate_cmd(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "evaluate.py"),
                         *args], capture_output=True, text=True, env=env, timeout=300)


def test_evaluate_command_on_a_checkpoint_writes_json_and_markdown(loop_run, tmp_path):
  config, _ = loop_run
  got = evaluate_cmd(f"--checkpoint={config.workdir}/checkpoints/1", f"--out={tmp_path}")
  assert got.returncode == 0, got.stderr
  results = _results(tmp_path)
  assert results["config"] == "tiny" and results["step"] == 1
  m = results["metrics"]  # the run's real task: chain_sum, scored by reasoning-gym
  passes = [m[f"val-core/chain_sum/acc/pass@{k}"] for k in (1, 2, 3, 4)]
  assert passes == sorted(passes) and "val-aux/chain_sum/distinct_correct" in m
  with open(tmp_path / policy.RESULTS_MD, encoding="utf-8") as f:
    md = f.read()
  assert md.startswith("# tiny: ") and "## chain_sum" in md and "| pass@4 |" in md
  assert md in got.stdout


def test_evaluate_command_errors_are_one_line(tmp_path):
  got = evaluate_cmd(f"--checkpoint={tmp_path}/nope")
  assert got.returncode == 2
  assert got.stderr.strip().splitlines() == [
      f"evaluate: error: Run directory '{tmp_path}/nope' does not exist; pass the workdir of a "
      "run (its config.workdir) or <workdir>/checkpoints/<step>."]
  got = evaluate_cmd()
  assert got.returncode == 2 and len(got.stderr.strip().splitlines()) == 1
  assert "pass --config=" in got.stderr
