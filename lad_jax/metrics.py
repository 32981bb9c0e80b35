"""Evaluation metrics (pass@k, avg@k, distinct-n, entropy) and metric writers.

Pass@k is the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on
Code", Eq. 1): with n samples of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k), computed as a
numerically stable product. Avg@k is the mean accuracy over the k samples (the LAD paper's Avg@k).
Distinct-n (Li et al., 2016) is the number of distinct n-grams over the total number of n-grams.

`MetricWriter` writes each step's scalars to metrics.jsonl, TensorBoard and, optionally, Weights &
Biases (`WandbOptions`; `wandb_options(config)` reads config.log.wandb*; the package is the
optional extra `pip install 'lad-jax[wandb]'`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import netrc
import os
import re
import secrets
import time
from typing import Any, Iterable, Mapping, Optional, Sequence
import urllib.parse

import jax
import jax.numpy as jnp
import numpy as np

from lad_jax.errors import ConfigError


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
  """Unbiased pass@k for one problem: 1 - C(n - c, k) / C(n, k) (Chen et al. 2021, Eq. 1).

  Raises:
    ValueError: if k > n, c > n or any argument is negative.
  """
  n, c = int(num_samples), int(num_correct)
  if k < 1 or n < 0 or c < 0 or c > n:
    raise ValueError(f"pass_at_k needs 1 <= k, 0 <= c <= n; got n={n}, c={c}, k={k}.")
  if k > n:
    raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}.")
  if n - c < k:
    return 1.0
  # prod_{i=n-c+1}^{n} (1 - k / i) = C(n-c, k) / C(n, k), without huge binomials.
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_mean(correct: Sequence[Sequence[bool]], k: int) -> float:
  """Mean unbiased pass@k over problems; `correct[i]` lists the verdicts of problem i's samples."""
  if not correct:
    raise ValueError("pass_at_k_mean needs at least one problem.")
  return float(np.mean([pass_at_k(len(c), int(np.sum(c)), k) for c in correct]))


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
  """Avg@k: mean accuracy over all samples of all problems (each problem weighted equally)."""
  if not correct:
    raise ValueError("avg_at_k needs at least one problem.")
  return float(np.mean([np.mean(np.asarray(c, np.float64)) for c in correct]))


def ngrams(tokens: Sequence[Any], n: int) -> list[tuple]:
  """All contiguous n-grams of a token sequence."""
  return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(sequences: Iterable[Sequence[Any]], n: int) -> float:
  """Distinct-n over a set of responses: |unique n-grams| / |n-grams| (0 when there are none).

  `sequences` are token lists (ids or words); for text, pass `text.split()`.
  """
  total, unique = 0, set()
  for seq in sequences:
    grams = ngrams(list(seq), n)
    total += len(grams)
    unique.update(grams)
  return len(unique) / total if total else 0.0


def distinct_correct(responses: Sequence[str], correct: Sequence[bool]) -> int:
  """Number of distinct correct solutions (after whitespace normalisation) among a group."""
  if len(responses) != len(correct):
    raise ValueError(f"{len(responses)} responses but {len(correct)} verdicts.")
  return len({" ".join(r.split()) for r, ok in zip(responses, correct) if ok})


def _correct_answers(answers: Sequence[Optional[str]], correct: Sequence[bool]) -> list[str]:
  if len(answers) != len(correct):
    raise ValueError(f"{len(answers)} answers but {len(correct)} verdicts.")
  return [" ".join(str(a).split()) for a, ok in zip(answers, correct) if ok and a is not None]


def distinct_correct_answers(answers: Sequence[Optional[str]], correct: Sequence[bool]) -> int:
  """Number of distinct correct FINAL answers among a prompt's samples (the verifier's extracted
  answers, whitespace-normalised): how many of a prompt's right answers the policy still gives."""
  return len(set(_correct_answers(answers, correct)))


def correct_answer_entropy(answers: Sequence[Optional[str]], correct: Sequence[bool]
                           ) -> Optional[float]:
  """H(pi+): entropy (nats) of the empirical distribution of a prompt's correct final answers,
  -sum_a p(a) log p(a) with p(a) = count(a) / #correct; None when no sample is correct.

  0 when every correct sample gives the same answer; log m for m equally frequent answers.
  """
  found = _correct_answers(answers, correct)
  if not found:
    return None
  _, counts = np.unique(np.asarray(found, dtype=object).astype(str), return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


def pass_at_k_curve(correct: Sequence[Sequence[bool]]) -> dict[int, float]:
  """Mean unbiased pass@j for every j = 1..n (n samples per problem, the same for all)."""
  n = min(len(c) for c in correct)
  return {j: pass_at_k_mean(correct, j) for j in range(1, n + 1)}


def entropy_from_logits(logits: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """Per-position entropy H = logsumexp(z) - sum softmax(z) z of softmax(logits / temperature).

  Args:
    logits: [..., V] (any float dtype; computed in fp32).
    temperature: the sampling temperature the logits are divided by (verl does the same).

  Returns:
    [...] entropy in nats, fp32.
  """
  z = logits.astype(jnp.float32) / temperature
  logz = jax.nn.logsumexp(z, axis=-1)
  return logz - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)


def truncate_jsonl(path: str, first_step: int) -> int:
  """Drops the rows of a JSON-lines file whose "step" is >= first_step; returns how many.

  A run resumed from the checkpoint of step s writes steps s+1, s+2, ... again; rows of those
  steps from before the restart would otherwise stay next to the new ones. Rewrites the file
  atomically (a missing file is fine); unparsable lines (a write cut off by the kill) go too.
  """
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        step = json.loads(line).get("step")
      except json.JSONDecodeError:
        dropped += 1
        continue
      if step is not None and step >= first_step:
        dropped += 1
      else:
        kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_run_id"  # in the workdir: the W&B run a resumed run continues
WANDB_INSTALL = "pip install 'lad-jax[wandb]'"
_WANDB_HOST = "https://api.wandb.ai"


@dataclasses.dataclass(frozen=True)
class WandbOptions:
  """A Weights & Biases run for `MetricWriter`.

  project: the W&B project. name: the run's display name (None: W&B's generated one). mode:
  one of WANDB_MODES, or None for `wandb_mode`'s choice. config: the run's config as plain data
  (JSON-like dicts), shown and searchable in W&B.
  """
  project: str = "lad-jax"
  name: Optional[str] = None
  mode: Optional[str] = None
  config: Optional[Mapping[str, Any]] = None


def _import_wandb():
  """The wandb module, or a one-line ConfigError saying how to install it."""
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f"config.log.wandb=True needs the wandb package, which is not "
                      f"installed: {WANDB_INSTALL} (or pip install wandb), or set "
                      "config.log.wandb=False.") from e
  return wandb


def wandb_options(config: Any) -> Optional[WandbOptions]:
  """The W&B settings of an RL config (config.log.wandb*); None when config.log.wandb is off.

  Raises:
    ConfigError: log.wandb is on but wandb is not installed, or log.wandb_mode is not valid.
  """
  log = config.log
  if not log.get("wandb", False):
    return None
  if log.wandb_mode is not None and log.wandb_mode not in WANDB_MODES:
    raise ConfigError(f"config.log.wandb_mode={log.wandb_mode!r} is not valid; choose one of "
                      f"{list(WANDB_MODES)} or None (WANDB_MODE, else online with an API key, "
                      "else offline).")
  _import_wandb()
  plain = (json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort")
           else dict(config))
  return WandbOptions(project=log.wandb_project, name=log.wandb_run or config.name,
                      mode=log.wandb_mode, config=plain)


def _wandb_login_exists() -> bool:
  """Whether `wandb login` stored an API key: a netrc entry for the W&B host (WANDB_BASE_URL)."""
  host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or _WANDB_HOST).hostname
  path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
  try:
    return netrc.netrc(path).authenticators(host) is not None
  except (OSError, netrc.NetrcParseError):
    return False


def wandb_mode(mode: Optional[str] = None) -> Optional[str]:
  """The mode W&B starts in: `mode` when given; else None (wandb's own choice) when WANDB_MODE
  is set or an API key is available (WANDB_API_KEY, or `wandb login`'s netrc entry); else
  "offline".

  Without a key, online wandb.init asks for one (or fails where nothing can be typed, as on a
  cluster node without network); offline keeps the run under <workdir>/wandb/ for a later
  `wandb sync <workdir>/wandb/offline-run-*`.
  """
  if mode is not None:
    return mode
  if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY") or _wandb_login_exists():
    return None
  return "offline"


def wandb_run_id(logdir: str, *, fresh: bool) -> str:
  """The W&B run id of the run in `logdir`, kept in <logdir>/wandb_run_id.

  A resumed run (fresh=False) reads it back, so it continues its W&B run; a fresh start gets a
  new one: the workdir's name plus a random suffix. A hash of the path alone would be shared by
  every run in the default workdir /tmp/lad_runs/<name> (other machines, restarts with
  checkpoint.resume=False), which would then be appended to one old W&B run.
  """
  path = os.path.join(logdir, WANDB_ID_FILE)
  if not fresh and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      run_id = f.read().strip()
    if run_id:
      return run_id
  name = re.sub(r"[^A-Za-z0-9_-]+", "-", os.path.basename(os.path.abspath(logdir)))[:48]
  run_id = f"{name.strip('-') or 'run'}-{secrets.token_hex(4)}"
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(run_id + "\n")
  os.replace(tmp, path)
  return run_id


def _start_wandb(logdir: str, options: WandbOptions, first_step: Optional[int]):
  """Starts the workdir's W&B run, or continues it after a resume (first_step > 0).

  Its files go to <logdir>/wandb/ unless WANDB_DIR says otherwise. Returns the run and the first
  step it still takes: a resumed online run has the steps its killed attempt logged, and W&B
  cannot rewrite them (under exact resume their values are the replay's; metrics.jsonl and
  TensorBoard hold the replayed rows).
  """
  wandb = _import_wandb()
  run = wandb.init(project=options.project, name=options.name,
                   id=wandb_run_id(logdir, fresh=first_step == 0), resume="allow",
                   mode=wandb_mode(options.mode),
                   dir=None if os.environ.get("WANDB_DIR") else logdir,
                   config=dict(options.config or {}))
  return run, int(getattr(run, "starting_step", 0) or 0)


class MetricWriter:
  """Writes scalar metrics as JSON lines and, if tensorboardX is importable, TensorBoard events,
  and to Weights & Biases when asked.

  Only process 0 writes on multi-host runs.

  Args:
    logdir: where metrics.jsonl and the event files go.
    tensorboard: also write TensorBoard events.
    first_step: the first step this run writes (s + 1 after resuming from the checkpoint of
      step s; 0 for a fresh run). Rows of this and later steps left by an earlier attempt are
      removed from metrics.jsonl, and TensorBoard hides their events (`purge_step`), so every
      step appears once. None keeps everything (plain appending).
    wandb: also log to this W&B run (None: no W&B). One run per workdir: a fresh start
      (first_step=0) begins a new one, a resumed run continues it (`wandb_run_id`). Each step
      is committed when written (one write per step; a repeated step is not sent again);
      `close` finishes the run.
  """

  def __init__(self, logdir: str, *, tensorboard: bool = True,
               first_step: Optional[int] = None, wandb: Optional[WandbOptions] = None):
    self.logdir = logdir
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._wandb = None
    self._wandb_next = 0  # the first step W&B still takes
    if not self._active:
      return
    os.makedirs(logdir, exist_ok=True)
    if wandb is not None:  # first: nothing is left open if it fails
      self._wandb, self._wandb_next = _start_wandb(logdir, wandb, first_step)
    path = os.path.join(logdir, "metrics.jsonl")
    if first_step is not None:
      truncate_jsonl(path, first_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(logdir, purge_step=first_step)
        # A skipped non-finite update logs NaN on purpose (actor/pg_loss, ...); tensorboardX
        # would warn once per such scalar and bury the run's own message about it.
        logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
      except ImportError:
        self._tb = None

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes one step's scalars (arrays of one element, numbers) to every output."""
    if not self._active:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    record = {"step": int(step), "time": time.time(), **scalars}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
    if self._wandb is not None and int(step) >= self._wandb_next:
      self._wandb.log(scalars, step=int(step), commit=True)
      self._wandb_next = int(step) + 1

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file back (for tests and plots)."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def summarize(values: Sequence[float]) -> Optional[dict[str, float]]:
  """mean / std / min / max of a list (None when empty)."""
  if len(values) == 0:  # pylint: disable=g-explicit-length-test
    return None
  a = np.asarray(values, np.float64)
  return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}
