"""experiments/compare.py's library (lad_jax/compare.py) and the figures (lad_jax/plots.py), on
tiny fake metrics.jsonl files (no training), and one tiny end-to-end comparison."""

import json
import os

import pytest

from lad_jax import compare
from lad_jax import plots
from lad_jax.errors import ConfigError
from tests import saved_runs


def _rows(acc_end, distinct_end, steps=4, k=4):
  def ev(step, acc, distinct):
    return {"step": step, f"val-core/s/acc/mean@{k}": acc,
            **{f"val-core/s/acc/pass@{j}": min(1.0, acc * j) for j in range(1, k + 1)},
            "val-aux/s/distinct_correct_answers": distinct, "val-aux/s/answer_entropy": 0.5}
  rows = [ev(0, 0.25, 1.0)]
  for s in range(1, steps + 1):
    rows.append({"step": s, "critic/rewards/mean": 0.1 * s, "critic/acc/mean": 0.1 * s,
                 "actor/entropy": 1.0 / s, "response_length/mean": 10.0 + s,
                 "actor/ppo_kl": 0.01 * s, "critic/advantages/max": 1.0,
                 "critic/advantages/min": -1.0, "timing_per_token_ms/gen": 2.0})
  rows[-1].update(ev(steps, acc_end, distinct_end))
  return rows


def _fake_train(tables):
  """A `train` for run_all that writes the metrics.jsonl of tables[(method, seed)]."""
  calls = []

  def train(config):
    calls.append(config.workdir)
    os.makedirs(config.workdir, exist_ok=True)
    with open(os.path.join(config.workdir, "metrics.jsonl"), "w") as f:
      for row in tables[(config.loss.name, config.seed)]:
        f.write(json.dumps(row) + "\n")
  return train, calls


def test_table_mean_std_over_seeds_and_resume_skips_finished(tmp_path):
  base = saved_runs.tiny_config(tmp_path)
  tables = {("lad", 0): _rows(0.5, 3.0), ("lad", 1): _rows(0.7, 1.0),
            ("grpo", 0): _rows(0.6, 1.0), ("grpo", 1): _rows(0.6, 1.0)}
  train, calls = _fake_train(tables)
  specs = compare.run_specs(["lad", "grpo"], seeds=2)
  results = compare.run_all(base, specs, workdir=str(tmp_path / "cmp"), train=train,
                            log=lambda _: None)
  assert len(calls) == 4
  compare.run_all(base, specs, workdir=str(tmp_path / "cmp"), train=train, log=lambda _: None)
  assert len(calls) == 4  # every run has summary.json: nothing runs again
  rows = compare.table(results)
  assert rows["lad"]["avg@k"] == pytest.approx({"mean": 0.6, "std": 0.1, "n": 2})
  assert rows["lad"]["distinct correct"]["mean"] == pytest.approx(2.0)
  assert rows["lad"]["avg@k before"]["mean"] == pytest.approx(0.25)
  assert rows["grpo"]["pass@4"] == pytest.approx({"mean": 1.0, "std": 0.0, "n": 2})
  # ppo_kl averaged over the 4 training steps: (0.01 + 0.02 + 0.03 + 0.04) / 4
  assert rows["grpo"]["ppo_kl"]["mean"] == pytest.approx(0.025)
  text = compare.write_report(results, str(tmp_path / "cmp"))
  assert "| lad | 2 | 0.600 ± 0.100 |" in text
  figures = sorted(os.listdir(tmp_path / "cmp" / "figures"))
  assert figures == ["final_eval.png", "pass_at_k.png", "time_per_token.png", "training.png"]


def test_sweep_applies_to_its_method_only_and_draws_eta(tmp_path):
  base = saved_runs.tiny_config(tmp_path)
  sweep = compare.parse_sweep("loss.hparams.lad.eta:0.5,2")
  specs = compare.run_specs(["lad", "grpo"], seeds=1, sweep=sweep)
  assert [s.group for s in specs] == ["lad eta=0.5", "lad eta=2", "grpo"]
  assert compare.run_config(base, specs[1], str(tmp_path)).loss.hparams.lad.eta == 2.0
  tables = {("lad", 0): _rows(0.5, 2.0), ("grpo", 0): _rows(0.4, 1.0)}
  train, _ = _fake_train(tables)
  results = compare.run_all(base, specs, workdir=str(tmp_path / "sw"), train=train,
                            log=lambda _: None)
  assert plots.eta_sensitivity(results, str(tmp_path / "fig")).endswith("eta.png")


def test_named_sweep_gives_divergence_classes(tmp_path):
  """Fig. 4: a sweep over LAD's divergence is one table row (and bar group) per class."""
  base = saved_runs.tiny_config(tmp_path)
  sweep = compare.parse_sweep("loss.hparams.lad.divergence:kl,js,tv")
  assert sweep.values == ("kl", "js", "tv")
  specs = compare.run_specs(["lad"], seeds=1, sweep=sweep)
  assert [s.group for s in specs] == ["lad divergence=kl", "lad divergence=js",
                                      "lad divergence=tv"]
  assert compare.run_config(base, specs[2], str(tmp_path)).loss.hparams.lad.divergence == "tv"
  assert plots.eta_sensitivity([{"spec": specs[0]._asdict()}], str(tmp_path)) is None


def test_bad_sweep_is_one_clear_error():
  with pytest.raises(ConfigError, match="key:v1,v2"):
    compare.parse_sweep("loss.hparams.lad.eta=1")


def test_plot_run_of_one_workdir(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for row in _rows(0.5, 2.0):
      f.write(json.dumps(row) + "\n")
  paths = plots.plot_workdir(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["training.png", "pass_at_k.png"]
  with pytest.raises(ConfigError, match="metrics.jsonl"):
    plots.plot_workdir(str(tmp_path / "missing"))


def test_smooth_is_a_trailing_mean():
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert plots.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]


@pytest.mark.slow  # two tiny RL runs with their compiles
def test_tiny_end_to_end_compare_through_the_rl_loop(tmp_path):
  """Two objectives x 1 seed of configs/tiny.py through rl.train_and_evaluate: a table row per
  objective, with the held-out evaluation before and after training; a rerun trains nothing."""
  base = saved_runs.tiny_config(tmp_path, **{"train.num_steps": 1, "eval.every": 1,
                                             "eval.before_train": True,
                                             "checkpoint.every": 0})
  workdir = str(tmp_path / "cmp")
  text = compare.main(base, methods=["lad", "grpo"], seeds=1, sweep=None, workdir=workdir,
                      log=lambda _: None)
  rows = json.load(open(os.path.join(workdir, "table.json")))
  assert sorted(rows) == ["grpo", "lad"] and "| lad | 1 |" in text
  assert all(r["steps"] == [1] and "avg@k before" in r for r in rows.values())
  logs = []
  compare.main(base, methods=["lad", "grpo"], seeds=1, sweep=None, workdir=workdir,
               log=logs.append)
  assert sum("finished, skipped" in line for line in logs) == 2
