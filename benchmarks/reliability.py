r"""Faults injected into real runs (configs/tiny.py, 3 steps, a checkpoint every step).

  python benchmarks/reliability.py [--out=/tmp/lad_reliability]

Each fault runs experiments/math_rl.py as a user would, then checks what a user relies on:
- kill -9 mid-compile, mid-step and mid-save, then the same command again: the final checkpoint's
  fingerprint (a checksum of every leaf: params, optimizer state, key, step) equals that of an
  uninterrupted run, i.e. bit-identical state;
- 400 bytes flipped / a file truncated in the latest checkpoint: the rerun warns in one line,
  falls back to the previous checkpoint, replays, and ends bit-identical;
- the disk fills during a save (RLIMIT_FSIZE lowered on the running process): one error line,
  exit 2, the previous checkpoint intact, and the rerun ends bit-identical;
- a learning rate of 1e30: one error line, exit 2, and no checkpoint with a non-finite value;
- a NaN learning rate, another objective in a used workdir: one error line, exit 2.

Prints one row per fault and a last line `key=value`. About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "math_rl.py")
STEPS = 3


def _argv(workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, SCRIPT, f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
          f"--config.workdir={workdir}", f"--config.train.num_steps={STEPS}",
          "--config.checkpoint.every=1", "--config.checkpoint.max_to_keep=3",
          f"--config.compile_cache_dir={os.path.join(os.path.dirname(workdir), 'jax_cache')}",
          *overrides]


def _run(workdir: str, *overrides: str) -> subprocess.CompletedProcess:
  return subprocess.run(_argv(workdir, *overrides), capture_output=True, text=True, timeout=900,
                        check=False)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
  return [ln for ln in result.stderr.splitlines() if ln.strip()]


def _fingerprint(workdir: str, step: int) -> Optional[dict]:
  path = os.path.join(workdir, "checkpoints", str(step), "fingerprint", "metadata")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _all_finite(workdir: str) -> bool:
  paths = glob.glob(os.path.join(workdir, "checkpoints", "*", "fingerprint", "metadata"))
  finite = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      finite += [leaf["finite"] for leaf in json.load(f)["leaves"].values()]
  return all(finite)


def _kill_when(workdir: str, ready: Callable[[], bool], *, delay_s: float = 0.0) -> int:
  """Starts a run, kill -9s it once `ready()` holds (after `delay_s`); returns its exit code."""
  proc = subprocess.Popen(_argv(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline and not ready():
    time.sleep(0.05)
  time.sleep(delay_s)
  proc.send_signal(signal.SIGKILL)
  return proc.wait()


def _steps_done(workdir: str) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    return sum('"critic/rewards/mean"' in line for line in f)


def _saving(workdir: str) -> bool:
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*")))


def _finished(workdir: str) -> bool:
  return os.path.isdir(os.path.join(workdir, "checkpoints", "1", "state"))


def _damage(workdir: str, step: int, how: str) -> str:
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "*"),
                    recursive=True)
  path = max((f for f in files if os.path.isfile(f)), key=os.path.getsize)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    if how == "truncate":
      f.truncate(size // 2)
    else:
      f.seek(size // 2)
      data = f.read(400)
      f.seek(size // 2)
      f.write(bytes(b ^ 0xFF for b in data))
  return os.path.relpath(path, workdir)


class Probe:
  """Collects one row per fault: (fault, what happened, ok)."""

  def __init__(self, base: str, reference: dict):
    self.base, self.reference, self.rows = base, reference, []

  def dir(self, name: str) -> str:
    path = os.path.join(self.base, name)
    shutil.rmtree(path, ignore_errors=True)
    return path

  def same_as_reference(self, workdir: str) -> bool:
    return _fingerprint(workdir, STEPS) == self.reference

  def row(self, fault: str, outcome: str, ok: bool) -> None:
    self.rows.append((fault, outcome, ok))
    print(f"{'ok ' if ok else 'BAD'} | {fault} | {outcome}", flush=True)


def kill_and_resume(p: Probe, name: str, ready: Callable[[str], bool], delay_s: float) -> None:
  wd = p.dir(name)
  rc = _kill_when(wd, lambda: ready(wd), delay_s=delay_s)
  before = _steps_done(wd)
  result = _run(wd)
  same = result.returncode == 0 and p.same_as_reference(wd)
  p.row(f"kill -9 {name.replace('_', ' ')} (rc {rc}, {before} step(s) logged)",
        f"rerun rc {result.returncode}, final state bit-identical: {same}", same)


def damaged_checkpoint(p: Probe, how: str) -> None:
  wd = p.dir(f"damaged_{how}")
  _run(wd, "--config.train.num_steps=2")
  path = _damage(wd, 2, how)
  result = _run(wd)
  warnings = [ln for ln in _error_lines(result) if "damaged" in ln]
  same = result.returncode == 0 and p.same_as_reference(wd)
  p.row(f"{'400 bytes flipped in' if how == 'flip' else 'truncated'} {path} (step 2)",
        f"rc {result.returncode}, {len(warnings)} warning line(s): "
        f"{warnings[0][:110] if warnings else '-'}...; replayed, bit-identical: {same}",
        same and len(warnings) == 1)


def failed_save(p: Probe) -> None:
  wd = p.dir("disk_full")
  proc = subprocess.Popen(_argv(wd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  while proc.poll() is None and not _finished(wd):
    time.sleep(0.05)
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # "disk full"
  stderr = proc.communicate()[1]
  lines = [ln for ln in stderr.splitlines() if ln.strip()]
  intact = _fingerprint(wd, 1) is not None
  result = _run(wd)
  same = result.returncode == 0 and p.same_as_reference(wd)
  p.row("file-size limit 64 KB set on the run after checkpoint 1 (a full disk)",
        f"rc {proc.returncode}, {len(lines)} line(s): {lines[-1][:140] if lines else '-'}...; "
        f"checkpoint 1 intact: {intact}; rerun bit-identical: {same}",
        proc.returncode == 2 and len(lines) == 1 and intact and same)


def one_line_error(p: Probe, fault: str, wd: str, *overrides: str, finite_check: bool = False
                   ) -> None:
  result = _run(wd, *overrides)
  lines = _error_lines(result)
  finite = _all_finite(wd)
  ok = result.returncode == 2 and len(lines) == 1 and (finite or not finite_check)
  extra = f"; every checkpoint finite: {finite}" if finite_check else ""
  p.row(fault, f"rc {result.returncode}, {len(lines)} line(s): "
               f"{lines[-1][:150] if lines else '-'}{extra}", ok)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/lad_reliability")
  base = os.path.abspath(parser.parse_args().out)
  os.makedirs(base, exist_ok=True)
  ref_dir = os.path.join(base, "uninterrupted")
  shutil.rmtree(ref_dir, ignore_errors=True)
  t0 = time.time()
  ref = _run(ref_dir)
  if ref.returncode or _fingerprint(ref_dir, STEPS) is None:
    sys.exit(f"the uninterrupted run failed:\n{ref.stderr[-2000:]}")
  p = Probe(base, _fingerprint(ref_dir, STEPS))
  kill_and_resume(p, "mid_compile", lambda wd: True, delay_s=3.0)
  kill_and_resume(p, "mid_step", lambda wd: _finished(wd) and _steps_done(wd) == 1, delay_s=0.0)
  kill_and_resume(p, "mid_save", _saving, delay_s=0.0)
  damaged_checkpoint(p, "flip")
  damaged_checkpoint(p, "truncate")
  failed_save(p)
  one_line_error(p, "--config.optim.lr=1e30 (every update non-finite)", p.dir("huge_lr"),
                 "--config.optim.lr=1e30", finite_check=True)
  one_line_error(p, "--config.optim.lr=nan", p.dir("nan_lr"), "--config.optim.lr=nan")
  one_line_error(p, "same workdir, --config.loss.name=grpo", ref_dir, "--config.loss.name=grpo")
  good = sum(ok for _, _, ok in p.rows)
  print(f"{len(p.rows)} faults, {good} handled as specified, {time.time() - t0:.0f} s")
  print(f"faults={len(p.rows)} handled={good} failed={len(p.rows) - good}")


if __name__ == "__main__":
  main()
