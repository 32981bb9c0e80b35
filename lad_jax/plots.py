"""Figures of RL runs (matplotlib, Agg): one run's curves, and a comparison of several runs.

  plots.run_figures(metrics_lib.read_jsonl("<workdir>/metrics.jsonl"), "<workdir>/figures")
  plots.compare_figures(summaries, compare.table(summaries), "<cmp>/figures")

Training curves (the LAD paper's Fig. 6): reward, accuracy, token entropy, response length, the
update's ppo_kl (mean -log(pi / pi_old), the policy's move per update) and the advantages' range,
over steps. Evaluation: pass@k against k (first and last evaluation). Comparisons add one bar
chart per group of the final avg@k / pass@k and distinct correct answers (Fig. 4 when the groups
are LAD divergences), eta sensitivity when a sweep was run (Fig. 3), and time per token (Fig. 5).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np

from lad_jax import metrics as metrics_lib

# (panel title, metrics drawn in it) of the training curves.
TRAIN_PANELS = (
    ("reward", ("critic/rewards/mean",)),
    ("accuracy", ("critic/acc/mean",)),
    ("token entropy", ("actor/entropy",)),
    ("response length", ("response_length/mean",)),
    ("ppo_kl (policy move per update)", ("actor/ppo_kl",)),
    ("advantage max / min", ("critic/advantages/max", "critic/advantages/min")),
)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def curve(rows: Sequence[dict[str, Any]], metric: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `metric` over the rows that have it (finite values only)."""
  pts = [(r["step"], r[metric]) for r in rows if metric in r and np.isfinite(r[metric])]
  if not pts:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*pts)
  return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average over up to `window` points (the first points average fewer)."""
  if window <= 1 or len(values) == 0:
    return values
  c = np.cumsum(np.insert(values, 0, 0.0))
  idx = np.arange(1, len(values) + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def pass_curve(eval_metrics: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
  """(k, pass@k) from one evaluation's val-core/<set>/acc/pass@k (the first set)."""
  pts = {}
  for key, value in eval_metrics.items():
    parts = key.split("/")
    if len(parts) == 4 and parts[2] == "acc" and parts[3].startswith("pass@"):
      pts.setdefault(parts[1], {})[int(parts[3][5:])] = value
  if not pts:
    return np.zeros(0), np.zeros(0)
  first = pts[sorted(pts)[0]]
  ks = np.asarray(sorted(first), np.float64)
  return ks, np.asarray([first[int(k)] for k in ks])


def eval_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  return [r for r in rows if any(k.startswith("val-core/") for k in r)]


def _save(fig, out_dir: str, name: str) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches="tight")
  _pyplot().close(fig)
  return path


def _train_axes(plt):
  fig, axes = plt.subplots(2, 3, figsize=(13, 7))
  for ax, (title, _) in zip(axes.flat, TRAIN_PANELS):
    ax.set_title(title)
    ax.set_xlabel("step")
  return fig, axes


def run_figures(rows: Sequence[dict[str, Any]], out_dir: str, *, window: int = 5) -> list[str]:
  """training.png (the curves, raw and smoothed over `window` steps) and pass_at_k.png of one
  run's metrics.jsonl rows; returns the paths written."""
  plt = _pyplot()
  fig, axes = _train_axes(plt)
  for ax, (_, names) in zip(axes.flat, TRAIN_PANELS):
    for name in names:
      steps, values = curve(rows, name)
      if len(steps):
        line, = ax.plot(steps, values, alpha=0.3)
        ax.plot(steps, smooth(values, window), color=line.get_color(), label=name)
    ax.legend(fontsize=7)
  paths = [_save(fig, out_dir, "training.png")]
  evals = eval_rows(rows)
  if evals:
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in (evals[0], evals[-1]) if len(evals) > 1 else evals:
      ks, values = pass_curve(r)
      ax.plot(ks, values, marker="o", label=f"step {r['step']:.0f}")
    ax.set(xlabel="k", ylabel="pass@k", xscale="log", title="pass@k")
    ax.legend()
    paths.append(_save(fig, out_dir, "pass_at_k.png"))
  return paths


def _group_rows(results: Sequence[dict[str, Any]]) -> dict[str, list[list[dict[str, Any]]]]:
  """group -> the metrics.jsonl rows of each of its runs."""
  out: dict[str, list[list[dict[str, Any]]]] = {}
  for r in results:
    path = os.path.join(r["workdir"], "metrics.jsonl")
    if os.path.exists(path):
      out.setdefault(r["group"], []).append(metrics_lib.read_jsonl(path))
  return out


def _mean_curve(runs: Sequence[Sequence[dict[str, Any]]], metric: str
                ) -> tuple[np.ndarray, np.ndarray]:
  """Mean over runs of `metric` at the steps all runs have."""
  curves = [dict(zip(*curve(rows, metric))) for rows in runs]
  common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
  return (np.asarray(common, np.float64),
          np.asarray([np.mean([c[s] for c in curves]) for s in common], np.float64))


def compare_training(groups: dict[str, list], out_dir: str, *, window: int = 5) -> str:
  """training.png: each group's curves (mean over seeds, smoothed) in the TRAIN_PANELS."""
  plt = _pyplot()
  fig, axes = _train_axes(plt)
  for ax, (_, names) in zip(axes.flat, TRAIN_PANELS):
    for group, runs in groups.items():
      for name in names:
        steps, values = _mean_curve(runs, name)
        if len(steps):
          label = group if len(names) == 1 else f"{group} {name.rsplit('/', 1)[-1]}"
          ax.plot(steps, smooth(values, window), label=label)
    ax.legend(fontsize=7)
  return _save(fig, out_dir, "training.png")


def compare_pass_at_k(results: Sequence[dict[str, Any]], out_dir: str) -> Optional[str]:
  """pass_at_k.png: final pass@k against k per group (mean over seeds), and before training."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 4))
  drawn = False
  for section, style in (("first_eval", ":"), ("final_eval", "-")):
    by_group: dict[str, list[np.ndarray]] = {}
    for r in results:
      ks, values = pass_curve(r.get(section, {}))
      if len(ks):
        by_group.setdefault(r["group"], []).append((ks, values))
    for group, curves in by_group.items():
      n = min(len(v) for _, v in curves)
      ax.plot(curves[0][0][:n], np.mean([v[:n] for _, v in curves], axis=0), style, marker=".",
              label=f"{group} ({'before' if section == 'first_eval' else 'after'})")
      drawn = True
  ax.set(xlabel="k", ylabel="pass@k", xscale="log", title="pass@k (held-out)")
  ax.legend(fontsize=7)
  return _save(fig, out_dir, "pass_at_k.png") if drawn else None


def _bars(rows: dict[str, dict[str, Any]], titles: Sequence[str], out_dir: str, name: str,
          ylabel: str) -> Optional[str]:
  """Grouped bars (mean, std over seeds as error bars) of table columns `titles`."""
  groups = [g for g in rows if any(t in rows[g] for t in titles)]
  if not groups:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(groups) * len(titles)), 4))
  width = 0.8 / len(titles)
  for i, t in enumerate(titles):
    cells = [rows[g].get(t, {"mean": np.nan, "std": 0.0}) for g in groups]
    ax.bar(np.arange(len(groups)) + i * width, [c["mean"] for c in cells], width,
           yerr=[c["std"] for c in cells], label=t)
  ax.set_xticks(np.arange(len(groups)) + width * (len(titles) - 1) / 2, groups, rotation=20)
  ax.set(ylabel=ylabel)
  ax.legend(fontsize=7)
  return _save(fig, out_dir, name)


def _final_avg_and_pass(summary: dict[str, Any]) -> dict[str, float]:
  """{"avg@k", "pass@k"} of a run's final evaluation (k = the largest pass@ logged)."""
  ks, values = pass_curve(summary.get("final_eval", {}))
  out = {"pass@k": float(values[-1])} if len(ks) else {}
  for key, value in summary.get("final_eval", {}).items():
    if "/acc/mean@" in key:
      out["avg@k"] = float(value)
  return out


def eta_sensitivity(results: Sequence[dict[str, Any]], out_dir: str) -> Optional[str]:
  """eta.png (Fig. 3): final avg@k and pass@k against the swept value, per method."""
  swept = [r for r in results if r["spec"].get("sweep_key")
           and isinstance(r["spec"].get("sweep_value"), (int, float))]
  if not swept:  # none, or named values (divergence classes: the final_eval bars are Fig. 4)
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 4))
  for title in ("avg@k", "pass@k"):
    for method in sorted({r["spec"]["method"] for r in swept}):
      pts: dict[float, list[float]] = {}
      for r in swept:
        value = _final_avg_and_pass(r).get(title)
        if r["spec"]["method"] == method and value is not None:
          pts.setdefault(float(r["spec"]["sweep_value"]), []).append(value)
      xs = sorted(pts)
      ax.plot(xs, [np.mean(pts[x]) for x in xs], marker="o", label=f"{method} {title}")
  ax.set(xlabel=swept[0]["spec"]["sweep_key"], xscale="log", title="sensitivity")
  ax.legend(fontsize=7)
  return _save(fig, out_dir, "eta.png")


def compare_figures(results: Sequence[dict[str, Any]], rows: dict[str, dict[str, Any]],
                    out_dir: str) -> list[str]:
  """Every comparison figure that the results allow; returns the paths written.

  results: the runs' summaries (lad_jax.compare.run_all); rows: their table (compare.table).
  """
  paths = [compare_training(_group_rows(results), out_dir),
           compare_pass_at_k(results, out_dir),
           _bars(rows, ("avg@k", "pass@k", "distinct correct", "H(pi+)"), out_dir,
                 "final_eval.png", "held-out, end of training"),
           _bars(rows, ("ms/token gen", "ms/token update"), out_dir, "time_per_token.png",
                 "ms per token"),
           eta_sensitivity(results, out_dir)]
  return [p for p in paths if p]


def plot_workdir(workdir: str, *, out_dir: Optional[str] = None, window: int = 5) -> list[str]:
  """run_figures of <workdir>/metrics.jsonl into out_dir (default <workdir>/figures).

  Raises:
    ConfigError: the workdir has no metrics.jsonl (names the path).
  """
  from lad_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise ConfigError(f"{path} does not exist; pass the workdir of a run (--workdir=...).")
  return run_figures(metrics_lib.read_jsonl(path), out_dir or os.path.join(workdir, "figures"),
                     window=window)
