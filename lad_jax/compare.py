"""Several objectives x seeds (x one swept hyperparameter) through the same RL loop, then one table.

  specs = compare.run_specs(["lad", "grpo"], seeds=3, sweep=compare.parse_sweep(
      "loss.hparams.lad.eta:0.5,1,2"))
  results = compare.run_all(config, specs, workdir="/tmp/cmp")   # finished runs are skipped
  compare.write_report(results, "/tmp/cmp")                      # table.md, table.json, figures

Every run is `rl.train_and_evaluate` on a copy of the base config that differs only in
loss.name, seed and the swept key, in its own workdir <workdir>/<method>[_<key>=<v>]_s<seed>, so
rollouts, evaluation prompts and budget are identical. A run is finished when its workdir holds
`summary.json` (written here after the loop returns, from its metrics.jsonl): rerunning the same
command skips finished runs and resumes an interrupted one from its checkpoint.

The table: mean +- std over seeds of each group's final evaluation (avg@k, pass@1/4/k, distinct
correct answers, H(pi+)), and of training statistics averaged over steps (token entropy, response
length, the update's ppo_kl = mean -log(pi/pi_old), which after the first mini-batch estimates
KL(pi_old || pi) and so measures how far one update moved the policy, and time per token).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from lad_jax import metrics as metrics_lib
from lad_jax.errors import ConfigError

SUMMARY_FILE = "summary.json"


class Sweep(NamedTuple):
  """One dotted config key and its values (`--sweep=loss.hparams.lad.eta:0.5,1,2`)."""

  key: str
  values: tuple[Any, ...]


class RunSpec(NamedTuple):
  """One run of the comparison: objective, seed and (optionally) a swept value."""

  method: str
  seed: int
  sweep_key: Optional[str] = None
  sweep_value: Any = None

  @property
  def group(self) -> str:
    """The table row: method, with the swept value when there is one."""
    if self.sweep_key is None:
      return self.method
    value = self.sweep_value
    shown = f"{value:g}" if isinstance(value, (int, float)) else str(value)
    return f"{self.method} {self.sweep_key.rsplit('.', 1)[-1]}={shown}"

  @property
  def name(self) -> str:
    return self.group.replace(" ", "_") + f"_s{self.seed}"


def parse_sweep(text: Optional[str]) -> Optional[Sweep]:
  """"key:v1,v2,..." -> Sweep (numbers as float, else names, e.g. the divergence classes of
  the paper's Fig. 4: loss.hparams.lad.divergence:kl,js,tv,hellinger); None for an empty flag."""
  if not text:
    return None
  key, sep, values = text.partition(":")
  names = tuple(v.strip() for v in values.split(",") if v.strip())
  try:
    parsed = tuple(float(v) for v in names)
  except ValueError:
    parsed = names
  if not sep or not key or not parsed:
    raise ConfigError(f"--sweep={text!r} is not valid; write key:v1,v2,... e.g. "
                      "--sweep=loss.hparams.lad.eta:0.5,1,2,4.")
  return Sweep(key, parsed)


def _swept(method: str, sweep: Optional[Sweep]) -> bool:
  """A sweep of loss.hparams.<m>.* applies to method m only; any other key to every method."""
  if sweep is None:
    return False
  parts = sweep.key.split(".")
  return not (parts[:2] == ["loss", "hparams"] and len(parts) > 2 and parts[2] != method)


def run_specs(methods: Sequence[str], *, seeds: int, sweep: Optional[Sweep] = None
              ) -> list[RunSpec]:
  """Every (method, swept value, seed) run, seeds 0..seeds-1, in a fixed order."""
  if not methods or seeds < 1:
    raise ConfigError(f"Need at least one method and one seed; got methods={list(methods)}, "
                      f"seeds={seeds}.")
  specs = []
  for method in methods:
    values = sweep.values if _swept(method, sweep) else (None,)
    for value in values:
      for seed in range(seeds):
        key = sweep.key if value is not None else None
        specs.append(RunSpec(method, seed, key, value))
  return specs


def run_config(base, spec: RunSpec, workdir: str):
  """A copy of `base` for one run: loss.name, seed, the swept key and its own workdir."""
  c = base.copy_and_resolve_references()
  c.loss.name = spec.method
  c.seed = int(spec.seed)
  c.workdir = os.path.join(workdir, spec.name)
  c.name = f"{base.name}_{spec.name}"
  if spec.sweep_key is not None:
    node = c
    *parents, leaf = spec.sweep_key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ConfigError(f"--sweep key {spec.sweep_key!r} is not in the config.")
    node[leaf] = type(node[leaf])(spec.sweep_value) if node[leaf] is not None else spec.sweep_value
  return c


def is_finished(run_workdir: str) -> bool:
  return os.path.exists(os.path.join(run_workdir, SUMMARY_FILE))


def run_all(base, specs: Sequence[RunSpec], *, workdir: str,
            train: Optional[Callable[[Any], Any]] = None,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs every spec not yet finished (in order), writes its summary.json; returns all summaries.

  `train` is `rl.train_and_evaluate` unless given (tests).
  """
  if train is None:
    from lad_jax import rl  # pylint: disable=g-import-not-at-top
    train = rl.train_and_evaluate
  out = []
  for i, spec in enumerate(specs):
    config = run_config(base, spec, workdir)
    if is_finished(config.workdir):
      log(f"[{i + 1}/{len(specs)}] {spec.name}: finished, skipped")
    else:
      log(f"[{i + 1}/{len(specs)}] {spec.name}: running in {config.workdir}")
      train(config)
      write_summary(config.workdir, spec)
    out.append(read_summary(config.workdir))
  return out


# ------------------------------------------------------------------------------------------------
# Summaries of one run
# ------------------------------------------------------------------------------------------------

# (table column, how it is computed from the rows: "final:<metric>" the last evaluation's value,
# "first:<metric>" the first evaluation's, "mean:<metric>" the mean over training steps).
TRAIN_MEANS = ("actor/entropy", "response_length/mean", "critic/acc/mean", "actor/ppo_kl",
               "actor/grad_norm", "timing_per_token_ms/gen", "timing_per_token_ms/update_actor",
               "timing_s/step")


def _eval_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  return [r for r in rows if any(k.startswith("val-core/") for k in r)]


def summarize_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """first / final evaluation metrics and means over training steps of a run's metrics.jsonl."""
  evals = _eval_rows(rows)
  steps = [r for r in rows if "critic/rewards/mean" in r]
  strip = lambda r: {k: v for k, v in r.items() if k.startswith(("val-core/", "val-aux/"))}
  out: dict[str, Any] = {"steps": len(steps),
                         "first_eval": strip(evals[0]) if evals else {},
                         "final_eval": strip(evals[-1]) if evals else {},
                         "first_eval_step": evals[0]["step"] if evals else None,
                         "final_eval_step": evals[-1]["step"] if evals else None,
                         "train_mean": {}}
  for key in TRAIN_MEANS:
    values = [r[key] for r in steps if key in r and np.isfinite(r[key])]
    if values:
      out["train_mean"][key] = float(np.mean(values))
  return out


def write_summary(run_workdir: str, spec: RunSpec) -> dict[str, Any]:
  rows = metrics_lib.read_jsonl(os.path.join(run_workdir, "metrics.jsonl"))
  summary = {"spec": spec._asdict(), "group": spec.group, **summarize_rows(rows)}
  tmp = os.path.join(run_workdir, SUMMARY_FILE + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  os.replace(tmp, os.path.join(run_workdir, SUMMARY_FILE))
  return summary


def read_summary(run_workdir: str) -> dict[str, Any]:
  with open(os.path.join(run_workdir, SUMMARY_FILE), encoding="utf-8") as f:
    out = json.load(f)
  out["workdir"] = run_workdir
  return out


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


class Column(NamedTuple):
  """A table column: title, where in a summary ("final_eval", "first_eval", "train_mean") and
  the metric (with <set> and <k> filled in from the runs)."""

  title: str
  section: str
  metric: str


COLUMNS = (
    Column("avg@k", "final_eval", "val-core/<set>/acc/mean@<k>"),
    Column("pass@1", "final_eval", "val-core/<set>/acc/pass@1"),
    Column("pass@4", "final_eval", "val-core/<set>/acc/pass@4"),
    Column("pass@k", "final_eval", "val-core/<set>/acc/pass@<k>"),
    Column("distinct correct", "final_eval", "val-aux/<set>/distinct_correct_answers"),
    Column("H(pi+)", "final_eval", "val-aux/<set>/answer_entropy"),
    Column("eval tok. entropy", "final_eval", "val-aux/<set>/token_entropy"),
    Column("eval length", "final_eval", "val-aux/<set>/response_length/mean"),
    Column("avg@k before", "first_eval", "val-core/<set>/acc/mean@<k>"),
    Column("distinct before", "first_eval", "val-aux/<set>/distinct_correct_answers"),
    Column("train entropy", "train_mean", "actor/entropy"),
    Column("train length", "train_mean", "response_length/mean"),
    Column("ppo_kl", "train_mean", "actor/ppo_kl"),
    Column("ms/token gen", "train_mean", "timing_per_token_ms/gen"),
    Column("ms/token update", "train_mean", "timing_per_token_ms/update_actor"),
)


def eval_set_and_k(summary: dict[str, Any]) -> tuple[Optional[str], Optional[int]]:
  """The (first) held-out set of a run and its k, read from its "val-core/<set>/acc/mean@<k>"."""
  for key in summary.get("final_eval", {}):
    parts = key.split("/")
    if len(parts) == 4 and parts[2] == "acc" and parts[3].startswith("mean@"):
      return parts[1], int(parts[3][5:])
  return None, None


def column_value(summary: dict[str, Any], col: Column) -> Optional[float]:
  name, k = eval_set_and_k(summary)
  metric = col.metric.replace("<set>", str(name)).replace("<k>", str(k))
  value = summary.get(col.section, {}).get(metric)
  return None if value is None else float(value)


def table(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """group -> {"runs": n, column title -> {"mean", "std", "n"}} over the group's seeds."""
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in results:
    groups.setdefault(r["group"], []).append(r)
  out = {}
  for group, runs in groups.items():
    row: dict[str, Any] = {"runs": len(runs), "steps": [r["steps"] for r in runs]}
    for col in COLUMNS:
      values = [v for v in (column_value(r, col) for r in runs) if v is not None]
      if values:
        row[col.title] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                          "n": len(values)}
    out[group] = row
  return out


def _fmt(x: float) -> str:
  return f"{x:.3f}" if x == 0 or abs(x) >= 0.01 else f"{x:.1e}"


def markdown(rows: dict[str, dict[str, Any]]) -> str:
  """The table as markdown: one row per group, "mean ± std" (std over seeds, 0 for one seed)."""
  titles = [c.title for c in COLUMNS if any(c.title in r for r in rows.values())]
  lines = ["| method | runs | " + " | ".join(titles) + " |",
           "|---" * (len(titles) + 2) + "|"]
  for group, row in rows.items():
    cells = []
    for t in titles:
      cell = row.get(t)
      cells.append("-" if cell is None else f"{_fmt(cell['mean'])} ± {_fmt(cell['std'])}")
    lines.append(f"| {group} | {row['runs']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_report(results: Sequence[dict[str, Any]], workdir: str, *,
                 figures: bool = True) -> str:
  """table.md / table.json (and figures/*.png) in `workdir`; returns the markdown."""
  rows = table(results)
  text = markdown(rows)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "table.md"), "w", encoding="utf-8") as f:
    f.write(text)
  with open(os.path.join(workdir, "table.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  if figures and results:
    from lad_jax import plots  # pylint: disable=g-import-not-at-top  (matplotlib only here)
    plots.compare_figures(results, rows, os.path.join(workdir, "figures"))
  return text


def finished_summaries(base, specs: Sequence[RunSpec], workdir: str) -> list[dict[str, Any]]:
  """The summaries of the specs' finished runs (others are left out)."""
  dirs = [run_config(base, s, workdir).workdir for s in specs]
  return [read_summary(d) for d in dirs if is_finished(d)]


def main(base, *, methods: Sequence[str], seeds: int, sweep: Optional[str], workdir: str,
         report_only: bool = False, log: Callable[[str], None] = print) -> str:
  """experiments/compare.py: runs what is left, then writes and returns the table."""
  specs = run_specs(methods, seeds=seeds, sweep=parse_sweep(sweep))
  if report_only:
    results = finished_summaries(base, specs, workdir)
  else:
    results = run_all(base, specs, workdir=workdir, log=log)
  text = write_report(results, workdir)
  log(text)
  return text
