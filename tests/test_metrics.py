"""Tests of lad_jax.metrics against hand values and brute-force enumeration."""

from __future__ import annotations

import glob
import itertools
import json
import math
import os
import struct
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import config_utils
from lad_jax import metrics


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (10, 3, 5), (8, 0, 4), (8, 8, 8), (16, 1, 16), (7, 4, 3)])
def test_pass_at_k_equals_subset_enumeration(n, c, k):
  # Definition: probability that a uniformly random k-subset of the n samples contains a correct one.
  verdicts = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  expected = np.mean([any(verdicts[i] for i in s) for s in subsets])
  assert metrics.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_hand_values():
  # 1 - C(7,5)/C(10,5) = 1 - 21/252.
  assert metrics.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
  # pass@1 is the plain accuracy c/n.
  assert metrics.pass_at_k(32, 7, 1) == pytest.approx(7 / 32)
  # Large n stays finite and exact: 1 - C(900, 32)/C(1000, 32).
  expected = 1 - math.comb(900, 32) / math.comb(1000, 32)
  assert metrics.pass_at_k(1000, 100, 32) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_bad_input():
  with pytest.raises(ValueError, match="at least 8 samples"):
    metrics.pass_at_k(4, 1, 8)
  with pytest.raises(ValueError, match="0 <= c <= n"):
    metrics.pass_at_k(4, 5, 1)


def test_avg_and_mean_pass():
  correct = [[True, False, False, False], [True, True, True, True]]
  assert metrics.avg_at_k(correct) == pytest.approx((0.25 + 1.0) / 2)
  assert metrics.pass_at_k_mean(correct, 4) == pytest.approx(1.0)
  assert metrics.pass_at_k_mean(correct, 1) == pytest.approx((0.25 + 1.0) / 2)


def test_distinct_n_hand_values():
  # "a b a b" has bigrams (a,b), (b,a), (a,b): 2 distinct of 3.
  assert metrics.distinct_n([["a", "b", "a", "b"]], 2) == pytest.approx(2 / 3)
  # Across responses: trigrams (a,b,c), (b,c,d) and (a,b,c) again: 2 of 3.
  assert metrics.distinct_n([["a", "b", "c", "d"], ["a", "b", "c"]], 3) == pytest.approx(2 / 3)
  assert metrics.distinct_n([["a"]], 3) == 0.0
  assert metrics.distinct_correct(["x = 1", "x  =  1", "y"], [True, True, True]) == 2


def test_entropy_from_logits():
  # Uniform over V has entropy log V; a one-hot (very peaked) has ~0.
  v = 7
  assert float(metrics.entropy_from_logits(jnp.zeros((v,)))) == pytest.approx(math.log(v), rel=1e-6)
  peaked = jnp.array([100.0, 0.0, 0.0])
  assert float(metrics.entropy_from_logits(peaked)) == pytest.approx(0.0, abs=1e-6)
  # Temperature 2 on logits [2, 0] equals temperature 1 on [1, 0]: p = (e/(1+e), 1/(1+e)).
  p = math.e / (1 + math.e)
  expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
  got = metrics.entropy_from_logits(jnp.array([2.0, 0.0]), temperature=2.0)
  assert float(got) == pytest.approx(expected, rel=1e-6)


def test_metric_writer_round_trip(tmp_path):
  with metrics.MetricWriter(str(tmp_path), tensorboard=True) as writer:
    writer.write(1, {"reward/mean": jnp.float32(0.5), "pg_loss": 1.25})
    writer.write(2, {"reward/mean": 0.75})
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["reward/mean"] == 0.5 and rows[0]["pg_loss"] == 1.25
  assert rows[1]["reward/mean"] == 0.75


def test_metric_writer_drops_rows_of_replayed_steps(tmp_path):
  # A run writes steps 1-3, checkpoints at 2, is killed and resumes after step 2.
  with metrics.MetricWriter(str(tmp_path), tensorboard=False) as writer:
    for step in (1, 2, 3):
      writer.write(step, {"x": step})
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 4, "x": ')  # a line cut off by the kill
  with metrics.MetricWriter(str(tmp_path), tensorboard=True, first_step=3) as writer:
    writer.write(3, {"x": 30})
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["x"]) for r in rows] == [(1, 1), (2, 2), (3, 30)]
  # first_step=0 (a fresh run in an old workdir) starts the file over.
  assert metrics.truncate_jsonl(str(tmp_path / "metrics.jsonl"), 0) == 3
  assert metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) == []
  assert metrics.truncate_jsonl(str(tmp_path / "missing.jsonl"), 0) == 0


# ------------------------------------------------------------------------------------------------
# Weights & Biases (optional: the tests that run wandb skip where it is not installed)
# ------------------------------------------------------------------------------------------------

_BLOCK = 32768  # the .wandb transaction log: LevelDB-log blocks after a 7-byte ":W&B" header


def _wandb_records(path):
  """The protobuf records of an offline run's run-<id>.wandb file, in order."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  data = open(path, "rb").read()
  assert data[:4] == b":W&B", data[:7]
  pos, chunks, out = 7, b"", []
  while pos + 7 <= len(data):
    room = _BLOCK - pos % _BLOCK
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if room < 7 or (length == 0 and kind == 0):  # the padded end of a block
      pos += room
      continue
    chunks += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # FULL, or LAST of a record split over blocks
      out.append(wandb_internal_pb2.Record.FromString(chunks))
      chunks = b""
  return out


def _finished_records(path, timeout_s=60.0):
  """The records of a run file once its "exit" record is there.

  wandb's finish() returns before its service has written everything of an offline run; the
  test waits for the end of the file rather than racing it.
  """
  deadline = time.monotonic() + timeout_s
  while True:
    records = _wandb_records(path) if os.path.exists(path) else []
    if any(r.WhichOneof("record_type") == "exit" for r in records):
      return records
    assert time.monotonic() < deadline, f"{path} has no exit record after {timeout_s} s"
    time.sleep(0.1)


def _wandb_run(path):
  """(run record, config {key: value}, history [{key: value}]) of a finished offline run file."""
  run, config, history = None, {}, []
  for record in _finished_records(path):
    kind = record.WhichOneof("record_type")
    if kind == "run":
      run = record.run
      items = record.run.config.update
    elif kind == "config":
      items = record.config.update
    elif kind == "history":
      history.append({i.key or ".".join(i.nested_key): json.loads(i.value_json)
                      for i in record.history.item})
      continue
    else:
      continue
    config.update({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in items})
  return run, config, history


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
  """wandb, offline, with every file it writes under tmp_path."""
  wandb = pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
  monkeypatch.delenv("WANDB_DIR", raising=False)
  yield wandb
  wandb.teardown()


def _offline_runs(root, run_id, count):
  """The run-<id>.wandb files of the `count` offline runs of `run_id` under root (one per start).

  Waits for them: wandb's service may still be creating the last one when finish() returns.
  """
  pattern = os.path.join(str(root), "**", f"offline-run-*-{run_id}*")
  deadline = time.monotonic() + 60.0
  while len(glob.glob(pattern, recursive=True)) < count and time.monotonic() < deadline:
    time.sleep(0.1)
  dirs = sorted(glob.glob(pattern, recursive=True))
  assert len(dirs) == count, dirs
  return [os.path.join(d, f"run-{run_id}.wandb") for d in dirs]


def test_wandb_offline_run_round_trip_and_resume(tmp_path, monkeypatch, wandb_env):
  del wandb_env
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
  workdir = tmp_path / "run"
  options = metrics.WandbOptions(project="lad-jax-test", name="tiny_lad",
                                 config={"optim": {"lr": 1e-3}, "name": "tiny_lad"})
  with metrics.MetricWriter(str(workdir), tensorboard=False, first_step=0,
                            wandb=options) as writer:
    writer.write(1, {"critic/rewards/mean": jnp.float32(0.5), "actor/pg_loss": 1.25})
    writer.write(2, {"critic/rewards/mean": 0.75, "actor/pg_loss": -2.0})
  run_id = (workdir / metrics.WANDB_ID_FILE).read_text().strip()
  assert run_id.startswith("run-")
  [path] = _offline_runs(tmp_path / "wandb_dir", run_id, 1)
  run, config, history = _wandb_run(path)
  assert (run.run_id, run.project, run.display_name) == (run_id, "lad-jax-test", "tiny_lad")
  assert config["optim"] == {"lr": 1e-3} and config["name"] == "tiny_lad"
  assert [(h["_step"], h["critic/rewards/mean"], h["actor/pg_loss"]) for h in history] == [
      (1, 0.5, 1.25), (2, 0.75, -2.0)]
  # Resumed after the checkpoint of step 2: the same W&B run (id) takes step 3.
  with metrics.MetricWriter(str(workdir), tensorboard=False, first_step=3,
                            wandb=options) as writer:
    writer.write(3, {"critic/rewards/mean": 1.0})
  assert (workdir / metrics.WANDB_ID_FILE).read_text().strip() == run_id
  # Offline, each start has its own directory; `wandb sync` sends both to the one run.
  paths = _offline_runs(tmp_path / "wandb_dir", run_id, 2)
  resumed = [_wandb_run(p) for p in paths if p != path][0]
  assert resumed[0].run_id == run_id
  assert [(h["_step"], h["critic/rewards/mean"]) for h in resumed[2]] == [(3, 1.0)]


def test_wandb_fresh_start_is_a_new_run_in_the_workdir(tmp_path, wandb_env):
  del wandb_env
  workdir = tmp_path / "run"
  ids = []
  for _ in range(2):  # e.g. checkpoint.resume=False in a used workdir
    with metrics.MetricWriter(str(workdir), tensorboard=False, first_step=0,
                              wandb=metrics.WandbOptions(project="lad-jax-test")) as writer:
      writer.write(0, {"eval/avg@4": 0.25})
    ids.append((workdir / metrics.WANDB_ID_FILE).read_text().strip())
  assert ids[0] != ids[1]
  # Without WANDB_DIR the run's files go under the workdir.
  [path] = _offline_runs(workdir / "wandb", ids[1], 1)
  assert [h["eval/avg@4"] for h in _wandb_run(path)[2]] == [0.25]


def test_wandb_options_from_config():
  pytest.importorskip("wandb")
  c = config_utils.base_config()
  assert metrics.wandb_options(c) is None  # off by default
  c.log.wandb = True
  options = metrics.wandb_options(c)
  assert (options.project, options.name, options.mode) == ("lad-jax", c.name, None)
  assert options.config["optim"]["lr"] == c.optim.lr and options.config["log"]["wandb"]
  c.log.wandb_run, c.log.wandb_mode = "lad_js_eta0.25", "offline"
  assert (metrics.wandb_options(c).name, metrics.wandb_options(c).mode) == (
      "lad_js_eta0.25", "offline")


def test_wandb_bad_mode_and_missing_package_are_one_line_errors(tmp_path, monkeypatch):
  c = config_utils.base_config()
  c.log.wandb = True
  c.log.wandb_mode = "cloud"
  with pytest.raises(config_utils.ConfigError, match=r"wandb_mode='cloud'.*'offline'"):
    metrics.wandb_options(c)
  c.log.wandb_mode = None
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
  for make in (lambda: metrics.wandb_options(c),
               lambda: metrics.MetricWriter(str(tmp_path), wandb=metrics.WandbOptions())):
    with pytest.raises(config_utils.ConfigError, match=r"pip install 'lad-jax\[wandb\]'") as e:
      make()
    assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "metrics.jsonl")  # nothing opened


def test_wandb_mode_offline_without_credentials(tmp_path, monkeypatch):
  for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
    monkeypatch.delenv(name, raising=False)
  netrc_path = tmp_path / "netrc"
  monkeypatch.setenv("NETRC", str(netrc_path))
  assert metrics.wandb_mode() == "offline"  # no netrc file
  netrc_path.write_text("machine example.com login user password secret\n")
  assert metrics.wandb_mode() == "offline"
  netrc_path.write_text("machine api.wandb.ai login user password secret\n")
  netrc_path.chmod(0o600)
  assert metrics.wandb_mode() is None  # `wandb login` was run: wandb's default (online)
  netrc_path.unlink()
  monkeypatch.setenv("WANDB_API_KEY", "secret")
  assert metrics.wandb_mode() is None
  monkeypatch.delenv("WANDB_API_KEY")
  monkeypatch.setenv("WANDB_MODE", "disabled")
  assert metrics.wandb_mode() is None  # wandb reads WANDB_MODE itself
  assert metrics.wandb_mode("online") == "online"  # config.log.wandb_mode wins
