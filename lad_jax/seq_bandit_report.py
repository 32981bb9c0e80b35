"""The sequence bandit's sweep and its outputs: results.json, results.md and one figure per method.

  results.json  {command, config, seeds, pretrain: {tv_target, outside}, total_s, cpu_s,
                 runs: [{mode, method, seed, metrics: {accuracy, tv_target, tv_filtered,
                 h_correct, h_correct_base, modes_kept, distinct_correct_k, outside,
                 modes_dropped},
                 trajectory: {update, accuracy, h_correct, tv_target}}]}
  results.md    mean ± std over seeds, one row per mode x method.
  fig_<method>.png  per prompt type the final distribution over the 100 responses (seed 0,
                    exact mode where it ran) against pi* and the filtered target; curves of
                    accuracy and H(pi+) over training (mean over seeds, each mode).

Metrics: `lad_jax.seq_bandit_metrics` (accuracy counts mass outside the 100 as incorrect; the
rest renormalise over the 100; distinct_correct_k is the exact expectation for k = 16 samples;
modes_kept is summed over the prompt types; modes_dropped counts, summed over the prompt types,
the modes of the last phase's pi_old whose probability fell below 0.1 x pi_old's in that phase).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from lad_jax import bandit
from lad_jax import seq_bandit
from lad_jax import seq_bandit_methods as methods_lib
from lad_jax import seq_bandit_metrics as metrics_lib

COLUMNS = (("accuracy", "accuracy"), ("tv_target", "TV(pi,pi*)"),
           ("tv_filtered", "TV(pi,filtered)"), ("h_correct", "H(pi+)"),
           ("h_ratio", "H(pi+)/H(pi0+)"), ("modes_kept", "modes kept"),
           ("distinct_correct_k", "distinct correct@16"), ("outside", "outside mass"),
           ("modes_dropped", "modes dropped, last phase"))


def plan(methods: Sequence[str], modes: Sequence[str], *, eta: float) -> list[tuple[list[str], str]]:
  """(method names of one program, mode) jobs: methods grouped by `group_key`, exact-only
  methods only in exact mode."""
  groups: dict[Any, list[str]] = {}
  for name in methods:
    groups.setdefault(methods_lib.group_key(methods_lib.method(name, eta=eta)), []).append(name)
  return [(names, mode) for mode in modes for key, names in groups.items()
          if mode == "exact" or not key[3]]


def run_records(setup: seq_bandit.Setup, r: seq_bandit.RunResult) -> list[dict[str, Any]]:
  """One results.json record per seed of a run."""
  c, correct = setup.config, setup.task.correct_PY
  pi0, _ = metrics_lib.probabilities(seq_bandit.seq_logp(setup.logp0_SNL))
  last_phase_start = (c.phases - 1) * c.steps_per_phase // c.log_every  # its pi_old's log point
  records = []
  for s, seed in enumerate(setup.seeds):
    filtered = metrics_lib.filtered_target(pi0[s], correct)
    snaps = [metrics_lib.snapshot(r.seq_logp[s, i], target_PY=r.target[s, i],
                                  filtered_PY=filtered, correct_PY=correct)
             for i in range(r.seq_logp.shape[1])]
    metrics = snaps[-1]._asdict()
    metrics["h_correct_base"] = float(metrics_lib.h_correct(pi0[s], correct).mean())
    metrics["h_ratio"] = metrics["h_correct"] / metrics["h_correct_base"]
    old, _ = metrics_lib.probabilities(r.seq_logp[s, last_phase_start])
    end, _ = metrics_lib.probabilities(r.seq_logp[s, -1])
    metrics["modes_dropped"] = float(metrics_lib.modes_dropped(end, old, correct).sum())
    records.append({
        "mode": r.mode, "method": r.method, "seed": seed, "metrics": metrics,
        "trajectory": {"update": [i * c.log_every for i in range(len(snaps))],
                       **{k: [getattr(x, k) for x in snaps]
                          for k in ("accuracy", "h_correct", "tv_target")}},
        "compile_s": r.compile_s, "run_s": r.run_s})
  return records


def results_markdown(records: Sequence[Mapping[str, Any]]) -> str:
  """One table, a row per (mode, method), mean ± std over seeds."""
  keys = list(dict.fromkeys((r["mode"], r["method"]) for r in records))
  lines = ["| mode | method | " + " | ".join(c for _, c in COLUMNS) + " |",
           "|---|---|" + "---|" * len(COLUMNS)]
  for mode, name in keys:
    rows = [r["metrics"] for r in records if (r["mode"], r["method"]) == (mode, name)]
    cells = [f"{np.mean([x[k] for x in rows]):.3f} ± {np.std([x[k] for x in rows]):.3f}"
             for k, _ in COLUMNS]
    lines.append(f"| {mode} | {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_method(setup: seq_bandit.Setup, runs: Mapping[str, seq_bandit.RunResult],
                path: str) -> None:
  """Final answer distributions (bars, seed 0) against pi* and the filtered target, per
  prompt type; accuracy and H(pi+) curves (mean over seeds) per mode."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  task, c = setup.task, setup.config
  shown = runs.get("exact", next(iter(runs.values())))
  pi, _ = metrics_lib.probabilities(shown.seq_logp[0, -1])
  pi0, _ = metrics_lib.probabilities(seq_bandit.seq_logp(setup.logp0_SNL[:1]))
  filtered = metrics_lib.filtered_target(pi0[0], task.correct_PY)
  fig, axes = plt.subplots(task.num_prompts + 1, 2, figsize=(12, 2.2 * (task.num_prompts + 1)))
  y = np.arange(pi.shape[-1])
  for x in range(task.num_prompts):
    ax = axes[x, 0]
    ax.bar(y, pi[x], color=np.where(task.correct_PY[x], "tab:green", "tab:gray"), width=0.9,
           label=f"pi_final ({shown.mode})")
    ax.plot(y, shown.target[0, -1, x], "r.", ms=4, label="pi* (last phase)")
    ax.plot(y, filtered[x], "bx", ms=4, label="pi_0 filtered")
    ax.set_title(f"prompt type {x}: green = correct", fontsize=8)
    ax.tick_params(labelsize=6)
    axes[x, 1].bar(y, pi0[0, x], color=np.where(task.correct_PY[x], "tab:green", "tab:gray"))
    axes[x, 1].set_title(f"pi_0, prompt type {x}", fontsize=8)
    axes[x, 1].tick_params(labelsize=6)
  axes[0, 0].legend(fontsize=6)
  correct = task.correct_PY
  for mode, r in runs.items():
    steps = np.arange(r.seq_logp.shape[1]) * c.log_every
    acc = (np.exp(r.seq_logp) * correct).sum(-1).mean((0, 2))
    p, _ = metrics_lib.probabilities(r.seq_logp)
    axes[-1, 0].plot(steps, acc, label=mode)
    axes[-1, 1].plot(steps, metrics_lib.h_correct(p, correct).mean((0, 2)), label=mode)
  for ax, title in zip(axes[-1], ("accuracy", "H(pi+) (nats)")):
    ax.set_title(f"{title} over updates (mean over seeds)", fontsize=8)
    ax.legend(fontsize=6)
  fig.suptitle(f"{shown.method}: final distribution (seed 0) and training curves", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _pretrain_summary(setup: seq_bandit.Setup) -> dict[str, list[float]]:
  pi0, outside = metrics_lib.probabilities(seq_bandit.seq_logp(setup.logp0_SNL))
  tv = bandit.total_variation(pi0, setup.task.target_PY)
  return {"tv_target_max_over_prompts": tv.max(-1).round(5).tolist(),
          "outside_max_over_prompts": outside.max(-1).round(6).tolist()}


def _write(out_dir: str, summary: Mapping[str, Any], records) -> None:
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)
  pre = summary["pretrain"]
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(f"# Sequence bandit results\n\nCommand: `{summary['command']}`  \n"
            f"Wall {summary['total_s']:.1f} s, CPU {summary['cpu_s']:.1f} s (all threads)  \n"
            f"pi_0: max TV to its target {max(pre['tv_target_max_over_prompts']):.4f}, "
            f"max mass outside the 100 {max(pre['outside_max_over_prompts']):.2e}  \n"
            f"Seeds: {summary['seeds']}\n\n")
    f.write(results_markdown(records))


def main(config: seq_bandit.SeqBanditConfig = seq_bandit.SeqBanditConfig(), *,
         methods: Sequence[str] = methods_lib.DEFAULT_METHODS,
         modes: Sequence[str] = seq_bandit.MODES, seeds: Sequence[int] = range(5),
         out_dir: str = "runs/seq_bandit", command: str = "", figures: bool = True
         ) -> list[dict[str, Any]]:
  """Runs the sweep (progress line per program), writes results.json/.md and figures."""
  jobs = plan(methods, modes, eta=config.eta)
  os.makedirs(out_dir, exist_ok=True)
  start, cpu = time.perf_counter(), time.process_time()
  setup = seq_bandit.make_setup(config, tuple(seeds))
  print(f"pi_0 pre-trained in {time.perf_counter() - start:.1f} s", flush=True)
  results: dict[str, dict[str, seq_bandit.RunResult]] = {}
  records = []
  for names, mode in jobs:
    runs = seq_bandit.run_group(setup, names, mode)
    print(f"[{mode}] {','.join(names)}: compile {runs[0].compile_s:.1f} s, "
          f"run {runs[0].run_s:.1f} s", flush=True)
    for r in runs:
      results.setdefault(r.method, {})[mode] = r
      records += run_records(setup, r)
  if figures:
    for name, runs in results.items():
      plot_method(setup, runs, os.path.join(out_dir, f"fig_{name.replace(':', '')}.png"))
  summary = {"command": command, "config": dataclasses.asdict(config), "seeds": list(seeds),
             "pretrain": _pretrain_summary(setup), "total_s": time.perf_counter() - start,
             "cpu_s": time.process_time() - cpu, "runs": records}
  _write(out_dir, summary, records)
  print(f"sweep finished in {summary['total_s']:.1f} s ({summary['cpu_s']:.1f} s CPU)")
  return records
