"""A workdir holds one run: resuming it with a config that would change the run is refused.

Rerunning a command resumes from the workdir's checkpoints. That is only right if the config is
the run's own: another objective, seed or batch shape would silently continue (or crash into) a
different experiment and overwrite its record. So before restoring, `check_resume` compares the
new config with the saved `config.json` and raises `ConfigError` naming every difference that
changes the run; keys that do not (how long to run, logging, evaluation, checkpoint cadence,
worker counts, paths of caches, the mesh) may differ. `record_config` then writes the config of
each start: `config.json` (the latest) and `configs/start_<step>.json` (one per start, kept).

  if config.checkpoint.resume and ckpt.latest_step() is not None:
    run_dir.check_resume(workdir, config)          # before restoring
  ...
  run_dir.record_config(workdir, config, start_step=start)   # on process 0

This module imports nothing heavy (no jax), so tools can call it before anything is compiled.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Iterable, Optional

from lad_jax import config_utils
from lad_jax.config_utils import ConfigError

CONFIG_FILE = "config.json"
STARTS_DIR = "configs"
# Keys (and key prefixes) that may change between starts of one run: they change how long it
# runs, what is logged or evaluated, how often it is saved, how fast it goes, or where caches
# live, but not one number the run computes (raising train.num_steps continues a run).
NON_RUN_KEYS = (
    "train.num_steps",
    "train.max_nonfinite_updates",
    "log",
    "eval",
    "checkpoint",
    "verifier.workers",
    "compile_cache_dir",
    "workdir",
    "name",
    "distributed",
    "mesh",
    "data.data_dir",
)
_MAX_VALUE = 60  # characters of a value shown in a message


def config_path(workdir: str) -> str:
  """Where the latest start's config lives."""
  return os.path.join(workdir, CONFIG_FILE)


def as_dict(config: Any) -> dict[str, Any]:
  """A ConfigDict (or a dict) as plain JSON data, the form `config.json` holds."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def load_saved_config(workdir: str) -> Optional[dict[str, Any]]:
  """The workdir's saved config as a dict; None if it has none.

  Raises:
    ConfigError: the file exists but is not a JSON object.
  """
  path = config_path(workdir)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"cannot read {path} ({e}); to start a new run use a new workdir or "
                      "--config.checkpoint.resume=False") from e
  if not isinstance(saved, dict):
    raise ConfigError(f"{path} is not a config (a JSON object); to start a new run use a new "
                      "workdir or --config.checkpoint.resume=False")
  return saved


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; an empty dict stays as one value."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _matches(key: str, prefixes: Iterable[str]) -> bool:
  return any(key == p or key.startswith(p + ".") for p in prefixes)


def _unused_hparams(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Prefixes of hyperparameter blocks neither config uses (another objective's, estimator's)."""
  unused = []
  losses = {old.get("loss.name"), new.get("loss.name")}
  for key in set(old) | set(new):
    parts = key.split(".")
    if key.startswith("loss.hparams.") and len(parts) > 3 and parts[2] not in losses:
      unused.append(".".join(parts[:3]))
  estimators = {old.get("advantage.estimator"), new.get("advantage.estimator")}
  if None not in estimators:  # None: the objective's default estimator, so any may be in use
    for key in set(old) | set(new):
      parts = key.split(".")
      if key.startswith("advantage.hparams.") and len(parts) > 3 and parts[2] not in estimators:
        unused.append(".".join(parts[:3]))
  return sorted(set(unused))


def config_differences(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
  """(key, old value, new value) of every difference between two configs that changes the run.

  Keys in `NON_RUN_KEYS` and the hyperparameters of objectives / estimators that neither config
  uses are left out. A key only one config has (a schema change) counts, with `<absent>`,
  unless it is new to the schema and set to the schema's default: a run saved before the key
  existed behaved as that default does, so resuming it under a newer version changes nothing.
  """
  old, new = _flatten(as_dict(old)), _flatten(as_dict(new))
  skip = NON_RUN_KEYS + tuple(_unused_hparams(old, new))
  defaults = _flatten(as_dict(config_utils.base_config()))
  diffs = []
  for key in sorted(set(old) | set(new)):
    if _matches(key, skip):
      continue
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if a == "<absent>" and key in defaults and b == defaults[key]:
      continue
    if a != b:
      diffs.append((key, a, b))
  return diffs


def _show(value: Any) -> str:
  text = value if value == "<absent>" else json.dumps(value)
  return text if len(text) <= _MAX_VALUE else text[:_MAX_VALUE] + "..."


def check_resume(workdir: str, config: Any) -> None:
  """Refuses to resume `workdir` with a config that would change its run.

  Does nothing when `config.checkpoint.resume` is False (the old run is not compared) or the
  workdir has no saved config. Call it before restoring a checkpoint.

  Raises:
    ConfigError: one line naming each difference (key: old -> new) and the fix.
  """
  if not as_dict(config).get("checkpoint", {}).get("resume", True):
    return
  saved = load_saved_config(workdir)
  if saved is None:
    return
  diffs = config_differences(saved, config)
  if diffs:
    listed = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in diffs)
    raise ConfigError(
        f"{workdir} holds a run with another config ({listed}); resuming would mix two runs: "
        "use a new --config.workdir, or --config.checkpoint.resume=False to start over there")


def _write_json(path: str, data: Any) -> None:
  """Writes JSON atomically (a crash leaves the old file or the new one, never half of one)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def record_config(workdir: str, config: Any, *, start_step: int) -> str:
  """Writes this start's config: `config.json` (latest) and `configs/start_<step>.json` (kept).

  A second start from the same step gets `start_<step>.1.json`, and so on, so no start's record
  is overwritten. Call on process 0 only. Returns the per-start file's path.
  """
  data = as_dict(config)
  starts = os.path.join(workdir, STARTS_DIR)
  os.makedirs(starts, exist_ok=True)
  path = os.path.join(starts, f"start_{int(start_step)}.json")
  n = 0
  while os.path.exists(path):
    n += 1
    path = os.path.join(starts, f"start_{int(start_step)}.{n}.json")
  _write_json(path, data)
  _write_json(config_path(workdir), data)
  return path


def archive_previous(workdir: str,
                     names: Iterable[str] = ("checkpoints", "checkpoints.damaged", CONFIG_FILE,
                                             STARTS_DIR)) -> Optional[str]:
  """Moves an earlier run's files out of the way into `<workdir>/previous/<UTC time>/`.

  For `--config.checkpoint.resume=False` in a used workdir: the new run starts clean while the old
  one is kept (pass the metric files' names too). Returns the archive folder, or None if none of
  `names` existed. Call on process 0 only.
  """
  present = [n for n in names if os.path.exists(os.path.join(workdir, n))]
  if not present:
    return None
  base = os.path.join(workdir, "previous", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
  dest, n = base, 0
  while os.path.exists(dest):
    n += 1
    dest = f"{base}-{n}"
  os.makedirs(dest)
  for name in present:
    shutil.move(os.path.join(workdir, name), os.path.join(dest, name))
  return dest
