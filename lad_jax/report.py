"""What a run leaves for a reader: its workdir, metrics, decoded samples, the config of each start,
a progress bar, and the end-of-run summary.

  print(report.summary(config))   # per-step table of the key metrics, evaluations, output paths
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np

from lad_jax import metrics as metrics_lib
from lad_jax import run_dir
from lad_jax.rollout import Rollout


def sample_rows(step: int, r: Rollout, advantages: np.ndarray, tokenizer: Any, *, count: int
                ) -> list[dict[str, Any]]:
  """The first `count` rollouts of a step (-1: all) as JSON rows: prompt id, prompt, response,
  reward, verdict and its reason, extracted answer, advantage, length, truncation, summed
  behaviour log-prob."""
  n = len(r.texts) if count < 0 else min(count, len(r.texts))
  rows = []
  for i in range(n):
    prompt = tokenizer.decode(r.prompt_tokens[i][r.prompt_mask[i]].tolist(),
                              skip_special_tokens=False)
    answer = r.answers[i]
    rows.append({
        "step": step, "prompt_id": int(r.prompt_index[i]), "prompt": prompt,
        "response": str(r.texts[i]), "reward": float(r.rewards[i]),
        "correct": bool(r.correct[i]), "reason": str(r.reasons[i]),
        "answer": None if answer is None else str(answer),
        "advantage": float(advantages[i]), "response_length": int(r.lengths[i]),
        "truncated": bool(r.truncated[i]),
        "logp_sum": float(np.where(r.response_mask[i], r.logp[i], 0.0).sum())})
  return rows


def write_samples(path: str, rows: list[dict[str, Any]]) -> None:
  """Appends JSON rows to <workdir>/samples.jsonl."""
  with open(path, "a", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def set_compile_cache(directory: Optional[str]) -> dict[str, Any]:
  """Points jax's persistent compilation cache at `directory`; returns the previous settings."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {n: getattr(jax.config, n) for n in names}
  if directory:
    values = (os.path.expanduser(directory), 0.0, 0)
    for n, v in zip(names, values):
      jax.config.update(n, v)
  return previous


def workdir(config) -> str:
  return os.path.expanduser(config.workdir or os.path.join("/tmp/lad_runs", config.name))


# (column title, metric, format) of the end-of-run table.
_SUMMARY_COLUMNS = (
    ("step", "step", "{:>4.0f}"), ("reward", "critic/rewards/mean", "{:>6.3f}"),
    ("acc", "critic/acc/mean", "{:>5.2f}"), ("len", "response_length/mean", "{:>5.1f}"),
    ("pg_loss", "actor/pg_loss", "{:>8.4f}"), ("entropy", "actor/entropy", "{:>7.3f}"),
    ("gen_s", "timing_s/gen", "{:>5.0f}"), ("update_s", "timing_s/update_actor", "{:>8.0f}"),
    ("eval_s", "timing_s/testing", "{:>6.0f}"), ("step_s", "timing_s/step", "{:>6.0f}"),
)


def _eval_scores(row: dict[str, Any]) -> dict[str, float]:
  """{"<set>/avg@k": ..., "<set>/pass@k": ...} from a row's val-core/<set>/acc/... metrics."""
  out = {}
  for key, value in row.items():
    parts = key.split("/")
    if len(parts) == 4 and parts[0] == "val-core" and parts[2] == "acc":
      label = parts[3].replace("mean@", "avg@")
      out[f"{parts[1]}/{label}"] = value
  return out


def summary(config, *, wall_s: Optional[float] = None) -> str:
  """The end-of-run report: key metrics of every step, the last evaluation, where outputs are.

  Reads <workdir>/metrics.jsonl, so it also covers steps run before a resume.
  """
  wd = workdir(config)
  path = os.path.join(wd, "metrics.jsonl")
  rows = metrics_lib.read_jsonl(path) if os.path.exists(path) else []
  steps = sum("critic/rewards/mean" in row for row in rows)
  head = f"{config.name}: {steps} step(s)"
  if wall_s is not None:
    head += f", {wall_s / 60:.1f} min wall (this process)"
  lines = [head]
  widths = [len(fmt.format(0.0)) for _, _, fmt in _SUMMARY_COLUMNS]
  if steps:
    lines.append("  ".join(t.rjust(w) for (t, _, _), w in zip(_SUMMARY_COLUMNS, widths)))
  for row in rows:
    if "critic/rewards/mean" not in row:  # the step-0 evaluation row
      continue
    cells = []
    for (_, name, fmt), w in zip(_SUMMARY_COLUMNS, widths):
      value = row.get(name)
      cells.append(fmt.format(value) if value is not None else "-".rjust(w))
    lines.append("  ".join(cells))
  for row in rows:
    scores = ", ".join(f"{label}={v:.3f}" for label, v in sorted(_eval_scores(row).items()))
    if scores:
      when = "before training" if row["step"] == 0 else f"after step {row['step']:.0f}"
      lines.append(f"eval {when}: {scores}")
  lines.append(f"outputs in {wd}: metrics.jsonl (every metric, one line per step), "
               "samples.jsonl (decoded rollouts), TensorBoard events "
               f"(tensorboard --logdir {wd}), checkpoints/ (rerunning the command resumes)")
  return "\n".join(lines)


class RunOutputs:
  """The run's files (metrics, samples, config) and terminal progress; process 0 writes."""

  def __init__(self, config, workdir: str, start: int):
    # Steps after the checkpoint are replayed, so their rows from before a kill are dropped; a
    # fresh run (which may begin with the step-0 evaluation) starts the files over.
    first_step = start + 1 if start else 0
    self.writer = metrics_lib.MetricWriter(workdir, tensorboard=config.log.tensorboard,
                                           first_step=first_step,
                                           wandb=metrics_lib.wandb_options(config))
    self.samples_path = os.path.join(workdir, "samples.jsonl")
    self.samples = config.log.samples
    self.lead = jax.process_index() == 0
    self.bar = None
    if self.lead:
      metrics_lib.truncate_jsonl(self.samples_path, first_step)
      run_dir.record_config(workdir, config, start_step=start)  # config.json + one per start
      if config.log.progress_bar:
        self.bar = _progress_bar(config, workdir, start)

  def step(self, step: int, metrics: dict[str, float], *, rollout: Optional[Rollout] = None,
           advantages: Optional[np.ndarray] = None, tokenizer: Any = None) -> None:
    """Writes a step's metrics, its sample rows (with a rollout) and advances the bar."""
    self.writer.write(step, metrics)
    if self.lead and rollout is not None and self.samples:
      write_samples(self.samples_path, sample_rows(step, rollout, advantages, tokenizer,
                                                   count=self.samples))
    if self.bar is not None and rollout is not None:
      self.bar.update(1)
      self.bar.set_postfix({
          "reward": f"{metrics['critic/rewards/mean']:.3f}",
          "acc": f"{metrics['critic/acc/mean']:.2f}",
          "loss": f"{metrics.get('actor/pg_loss', float('nan')):.4f}",
          "ent": f"{metrics.get('actor/entropy', float('nan')):.3f}",
          "len": f"{metrics['response_length/mean']:.0f}",
          "s/step": f"{metrics['timing_s/step']:.0f}"})

  def close(self):
    if self.bar is not None:
      self.bar.close()
    self.writer.close()


def _progress_bar(config, workdir: str, start: int):
  import tqdm  # pylint: disable=g-import-not-at-top
  n = config.train.num_steps
  resumed = f", resuming after step {start}" if start else ""
  print(f"{config.name}: {n} steps of {config.train.prompts_per_step} prompts x "
        f"{config.sampling.group_size} samples{resumed}; outputs -> {workdir}", flush=True)
  if start and start >= n:
    print(f"{config.name}: the checkpoint of step {start} completes this run; nothing left to "
          f"do (raise --config.train.num_steps to continue, or delete {workdir} to start "
          "over).", flush=True)
  return tqdm.tqdm(total=n, initial=start, desc=config.name, dynamic_ncols=True)
