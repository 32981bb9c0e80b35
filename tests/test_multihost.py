"""Several hosts: experiments/math_rl.py as 2 processes x 4 CPU devices (gloo collectives, the
same `jax.distributed.initialize()` path a GPU / TPU cluster takes) equals 1 process x 8 devices.

Runs the tiny config end to end (rollouts, verification, updates, evaluation, checkpoints) in
subprocesses, because a process can join only one distributed cluster and must not have started
its backend first.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "math_rl.py")
CONFIG = os.path.join(ROOT, "configs", "tiny.py")
# 16 rollout rows per step decoded in 2 calls of 8 (rows over the 8 devices of both processes).
FLAGS = [f"--config={CONFIG}", "--config.sampling.rows_per_call=8"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  env.update(extra)
  return env


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _comparable(row: dict) -> dict:
  """Every numeric metric except wall-clock ones."""
  return {k: v for k, v in row.items() if isinstance(v, (int, float))
          and k != "time" and not k.startswith(("timing_s/", "timing_per_token_ms/", "perf/"))}


@pytest.mark.parametrize("batching", ["lock_step", "continuous"])
def test_two_processes_equal_one(tmp_path, batching):
  flags = FLAGS + (["--config.sampling.decode_slots=8", "--config.sampling.refill_rows=4"]
                   if batching == "continuous" else [])
  single = str(tmp_path / "single")
  subprocess.run([sys.executable, SCRIPT, *flags, f"--config.workdir={single}"],
                 env=_env(8), check=True, capture_output=True, timeout=600)

  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [
      subprocess.Popen(
          [sys.executable, SCRIPT, *flags, f"--config.workdir={multi}",
           "--config.distributed=True"],
          env=_env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i)),
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} failed:\n{log[-3000:]}"

  want, got = _metrics(single), _metrics(multi)  # only process 0 writes metrics
  assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
  for w, g in zip(want, got):
    w, g = _comparable(w), _comparable(g)
    assert set(w) == set(g)
    assert {"actor/pg_loss", "actor/grad_norm", "critic/rewards/mean"} <= set(w), sorted(w)
    for k in w:
      assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), k
  # Both processes wrote one checkpoint set (orbax coordinates the hosts).
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == sorted(
      os.listdir(os.path.join(single, "checkpoints")))
