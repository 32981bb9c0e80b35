"""Checkpoints: exact round trips, shardings, retention, and verification against real damage.

The damage tests flip or cut bytes in the files orbax wrote (as a bad disk or an interrupted copy
would), then check that restore notices, says which step and why, and falls back to an older one.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lad_jax import checkpoint

# Reading a damaged checkpoint makes orbax abandon read coroutines that Python reports when they
# are collected; checkpoint's hook sends them to the debug log, but pytest swaps in its own hook
# for each test, so here they would show up as warnings (test_damage_report_is_one_line checks
# the real stderr in a subprocess).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(key):
  k1, k2 = jax.random.split(key)
  params = {"w": jax.random.normal(k1, (8, 4)), "b": jax.random.normal(k2, (4,)).astype(jnp.bfloat16)}
  opt_state = optax.adamw(1e-3).init(params)
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(7), "key": jax.random.key_data(key)}


def _big_state(seed):
  """Random (incompressible) leaves large enough that each has its own data in the ocdbt files."""
  ks = jax.random.split(jax.random.key(seed), 3)
  return {"w": jax.random.normal(ks[0], (64, 64)), "mu": jax.random.normal(ks[1], (64, 64)),
          "h": jax.random.normal(ks[2], (128,)).astype(jnp.bfloat16), "step": jnp.int32(seed)}


def _assert_equal(a_tree, b_tree):
  for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _save_steps(directory, steps, make=_big_state):
  with checkpoint.Checkpointer(directory, max_to_keep=5) as ckpt:
    for step in steps:
      ckpt.save(step, make(step), {"step": step})
  return jax.eval_shape(lambda: make(0))


def _data_files(directory, step):
  """The ocdbt data files of a step's state, largest first."""
  files = glob.glob(os.path.join(directory, str(step), "state", "ocdbt.process_*", "d", "*"))
  return sorted(files, key=os.path.getsize, reverse=True)


def _flip(path, offset, count=400):
  data = bytearray(open(path, "rb").read())
  for i in range(offset, min(offset + count, len(data))):
    data[i] ^= 0xA5
  open(path, "wb").write(bytes(data))


def test_round_trip_exact_with_meta(tmp_path):
  state = _state(jax.random.key(0))
  with checkpoint.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.restore_latest_intact(jax.eval_shape(lambda: state)) is None
    ckpt.save(7, state, {"data_position": 123, "config": {"lr": 1e-6}})
    restored, meta = ckpt.restore(jax.eval_shape(lambda: state))
    latest = ckpt.restore_latest_intact(jax.eval_shape(lambda: state))
  assert meta == {"data_position": 123, "config": {"lr": 1e-6}}
  _assert_equal(state, restored)
  assert latest.step == 7 and latest.skipped == [] and latest.meta == meta
  _assert_equal(state, latest.state)
  assert os.path.isdir(tmp_path / "ckpt" / "7" / "fingerprint")


def test_restore_into_sharding(tmp_path):
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
  sharding = NamedSharding(mesh, P("fsdp", "tensor"))
  x = jax.device_put(jnp.arange(64.0).reshape(8, 8), sharding)
  with checkpoint.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    ckpt.save(1, {"x": x})
    ckpt.wait()
    target = {"x": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sharding)}
    restored, _ = ckpt.restore(target)
  assert restored["x"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(restored["x"]), np.asarray(x))


def test_fingerprint_of_sharded_state_is_verified_in_another_sharding(tmp_path):
  """Saved from 8-way shards, restored onto other shards: the checksum is of the global array."""
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
  saved_sharding = NamedSharding(mesh, P("fsdp", "tensor"))
  other = NamedSharding(mesh, P("tensor", None))
  state = {"w": jax.device_put(jax.random.normal(jax.random.key(1), (16, 8)), saved_sharding),
           "b": jax.device_put(jnp.arange(8, dtype=jnp.bfloat16), NamedSharding(mesh, P("fsdp")))}
  fp_sharded = checkpoint.fingerprint(state)
  assert fp_sharded == checkpoint.fingerprint(jax.device_get(state))
  with checkpoint.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    ckpt.save(3, state)
    target = {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=other),
              "b": jax.ShapeDtypeStruct((8,), jnp.bfloat16, sharding=NamedSharding(mesh, P()))}
    got = ckpt.restore_latest_intact(target)
  assert got.step == 3 and got.skipped == [] and got.state["w"].sharding == other
  _assert_equal(state, got.state)


def test_fingerprint_changes_with_any_flipped_bit_of_any_leaf():
  """One bit anywhere in any leaf (first, middle, last word; every dtype) changes only that leaf."""
  state = jax.device_get(_state(jax.random.key(3)))
  state["flag"] = np.array([True, False])
  base = checkpoint.fingerprint(state)["leaves"]
  flat, treedef = jax.tree_util.tree_flatten(state)
  for i, leaf in enumerate(flat):
    leaf = np.asarray(leaf)
    for pos in {0, leaf.size // 2, leaf.size - 1}:
      for bit in (0, 8 * leaf.dtype.itemsize - 1):
        if leaf.dtype == np.bool_ and bit:
          continue
        raw = leaf.copy().reshape(-1)
        words = raw.view(np.uint8)
        words[pos * leaf.dtype.itemsize + bit // 8] ^= np.uint8(1 << (bit % 8))
        changed = list(flat)
        changed[i] = raw.reshape(leaf.shape)
        now = checkpoint.fingerprint(jax.tree_util.tree_unflatten(treedef, changed))["leaves"]
        differ = [p for p in base if base[p]["checksum"] != now[p]["checksum"]]
        assert len(differ) == 1, (i, pos, bit, differ)


def test_fingerprint_sees_swapped_elements():
  x = np.arange(16, dtype=np.float32)
  y = x.copy()
  y[[3, 9]] = y[[9, 3]]
  assert checkpoint.fingerprint(x) != checkpoint.fingerprint(y)


def test_keeps_latest_and_missing_raises(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, {"x": jnp.full((2,), float(step))})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    restored, _ = ckpt.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(restored["x"]), [3.0, 3.0])
  with checkpoint.Checkpointer(str(tmp_path / "empty")) as empty:
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
      empty.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)})


@pytest.mark.parametrize("where", ["start", "quarter", "middle"])
def test_flipped_bytes_fall_back_to_previous_step(tmp_path, caplog, where):
  """400 bytes flipped in the latest step's largest data file (same size) -> step 2 restores."""
  directory = str(tmp_path / "ckpt")
  abstract = _save_steps(directory, (1, 2, 3))
  path = _data_files(directory, 3)[0]
  size = os.path.getsize(path)
  _flip(path, {"start": 0, "quarter": size // 4, "middle": size // 2}[where])
  assert os.path.getsize(path) == size
  with caplog.at_level(logging.WARNING, logger="lad_jax.checkpoint"):
    with checkpoint.Checkpointer(directory, max_to_keep=5) as ckpt:
      got = ckpt.restore_latest_intact(abstract)
      assert ckpt.all_steps() == [1, 2]  # step 3 moved aside, so it can be saved again
      assert ckpt.save(3, _big_state(3), {"step": 3}) and ckpt.all_steps() == [1, 2, 3]
  assert got.step == 2 and got.meta == {"step": 2}
  _assert_equal(_big_state(2), got.state)
  assert [s for s, _ in got.skipped] == [3]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "step 3" in warnings[0] and "damaged" in warnings[0]
  assert "\n" not in warnings[0]
  assert os.path.isdir(str(tmp_path / "ckpt.damaged" / "3"))


def test_flip_inside_a_stored_value_is_a_checksum_mismatch(tmp_path):
  """Flips the file format does not notice (inside raw zstd blocks) are caught by the checksum.

  Where a flip lands on a block or frame header, tensorstore itself fails the read; the flips
  that it reads without complaint are the ones only the fingerprint sees.
  """
  directory = str(tmp_path / "ckpt")
  abstract = _save_steps(directory, (1, 2))
  path = _data_files(directory, 2)[0]
  original, size = open(path, "rb").read(), os.path.getsize(path)
  seen = {}
  for offset in (size // 2, size // 3, 2 * size // 3, size // 4, 3 * size // 4):
    _flip(path, offset, count=16)
    with checkpoint.Checkpointer(directory) as ckpt:
      got = ckpt.restore_latest_intact(abstract, quarantine=False)
    open(path, "wb").write(original)
    assert got.step == 1 and got.skipped[0][0] == 2
    seen[offset] = got.skipped[0][1]
  assert any("checksum mismatch in " in reason for reason in seen.values()), seen


def test_every_data_file_flipped_is_detected(tmp_path):
  """Whichever data file (whichever leaf) is hit, the damaged step is never restored."""
  directory = str(tmp_path / "ckpt")
  abstract = _save_steps(directory, (1, 2))
  files = _data_files(directory, 2)
  assert len(files) >= 3
  for path in files:
    original = open(path, "rb").read()
    _flip(path, len(original) // 2, count=min(400, max(1, len(original) // 4)))
    with checkpoint.Checkpointer(directory) as ckpt:
      got = ckpt.restore_latest_intact(abstract, quarantine=False)
    open(path, "wb").write(original)
    # Either the damage is seen, or the bytes hit were not part of any value (same state).
    if got.step == 2:
      _assert_equal(_big_state(2), got.state)
    else:
      assert got.step == 1 and got.skipped[0][0] == 2


def test_truncated_file_falls_back(tmp_path, caplog):
  directory = str(tmp_path / "ckpt")
  abstract = _save_steps(directory, (1, 2))
  path = _data_files(directory, 2)[0]
  os.truncate(path, os.path.getsize(path) // 2)
  with caplog.at_level(logging.WARNING, logger="lad_jax.checkpoint"):
    with checkpoint.Checkpointer(directory) as ckpt:
      got = ckpt.restore_latest_intact(abstract)
  assert got.step == 1 and got.skipped[0][0] == 2
  assert "unreadable" in got.skipped[0][1]
  assert any("step 2" in r.getMessage() for r in caplog.records)


def test_damaged_meta_or_fingerprint_falls_back(tmp_path):
  directory = str(tmp_path / "ckpt")
  abstract = _save_steps(directory, (1, 2, 3))
  with open(os.path.join(directory, "3", "meta", "metadata"), "w") as f:
    f.write('{"step": ')
  with open(os.path.join(directory, "2", "fingerprint", "metadata"), "r+b") as f:
    f.truncate(10)
  with checkpoint.Checkpointer(directory) as ckpt:
    got = ckpt.restore_latest_intact(abstract)
  assert got.step == 1 and [s for s, _ in got.skipped] == [3, 2]


def test_all_damaged_is_one_clear_error(tmp_path):
  directory = str(tmp_path / "ckpt")
  abstract = _save_steps(directory, (1, 2))
  for step in (1, 2):
    path = _data_files(directory, step)[0]
    os.truncate(path, 100)
  with checkpoint.Checkpointer(directory) as ckpt:
    with pytest.raises(checkpoint.NoIntactCheckpointError) as err:
      ckpt.restore_latest_intact(abstract)
  message = str(err.value)
  assert "\n" not in message and "step 2:" in message and "step 1:" in message
  assert "resume=False" in message


def test_other_state_structure_is_a_mismatch_not_damage(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, (1, 2))
  other = {"w": jax.ShapeDtypeStruct((32, 64), jnp.float32)}
  with checkpoint.Checkpointer(directory) as ckpt:
    with pytest.raises(checkpoint.StateMismatchError, match="another state"):
      ckpt.restore_latest_intact(other)
    assert ckpt.all_steps() == [1, 2]  # nothing moved aside


def test_non_finite_state_is_refused_and_nothing_written(tmp_path):
  directory = str(tmp_path / "ckpt")
  state = _state(jax.random.key(0))
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(1, state)
    bad = jax.tree.map(lambda x: x, state)
    bad["params"]["w"] = bad["params"]["w"].at[0, 0].set(jnp.nan)
    bad["opt_state"][0].mu["b"] = bad["opt_state"][0].mu["b"].at[1].set(jnp.inf)
    with pytest.raises(checkpoint.NonFiniteStateError) as err:
      ckpt.save(2, bad)
    assert ckpt.all_steps() == [1]
  message = str(err.value)
  assert "\n" not in message and "params/w" in message and "opt_state/0/mu/b" in message
  assert "step 1" in message
  assert sorted(os.listdir(directory)) == ["1"]


_FAILING_SAVE = textwrap.dedent("""
  import resource, signal, sys
  import jax, jax.numpy as jnp
  from lad_jax import checkpoint
  ckpt = checkpoint.Checkpointer(sys.argv[1], max_to_keep=1, wait=sys.argv[2] == "wait")
  ckpt.save(1, {"x": jnp.arange(8.0)})
  ckpt.wait()
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
  resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
  big = {"x": jax.random.normal(jax.random.key(0), (8, 100_000))}
  try:
    ckpt.save(2, {"x": jnp.arange(8.0) + 1})  # small: fits
    ckpt.save(3, big)
    ckpt.close()
  except checkpoint.SaveError as e:
    print("SAVE_ERROR", e)
    sys.exit(3)
""")


@pytest.mark.parametrize("mode", ["wait", "async"])
def test_save_failure_is_one_line_and_last_good_checkpoint_restores(tmp_path, mode):
  """A write that fails (RLIMIT_FSIZE standing in for a full disk) stops with one SaveError line."""
  directory = str(tmp_path / "ckpt")
  env = dict(os.environ, PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _FAILING_SAVE, directory, mode], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 3, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("SAVE_ERROR")]
  assert len(lines) == 1
  assert "save of step 3" in lines[0] and "File too large" in lines[0]
  assert "last good checkpoint is step 2" in lines[0]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  with checkpoint.Checkpointer(directory) as ckpt:
    assert ckpt.all_steps() == [2]  # the tmp dir of step 3 is not a step; 2 was kept
    got = ckpt.restore_latest_intact({"x": jax.ShapeDtypeStruct((8,), jnp.float32)})
  assert got.step == 2 and got.skipped == []
  np.testing.assert_array_equal(np.asarray(got.state["x"]), np.arange(8.0) + 1)


def test_save_failure_in_orbax_raises_save_error(tmp_path, monkeypatch):
  """A writer that raises (monkeypatched) is reported against its step; the previous one stays."""
  directory = str(tmp_path / "ckpt")
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(1, {"x": jnp.ones(4)})

    def broken(*args, **kwargs):
      raise OSError("No space left on device")
    monkeypatch.setattr(ckpt._manager, "save", broken)  # pylint: disable=protected-access
    with pytest.raises(checkpoint.SaveError, match="step 2 .* No space left on device; the last "
                                                   "good checkpoint is step 1"):
      ckpt.save(2, {"x": jnp.ones(4)})
    monkeypatch.undo()
    assert ckpt.restore_latest_intact({"x": jax.ShapeDtypeStruct((4,), jnp.float32)}).step == 1


def test_async_save_round_trip(tmp_path):
  state = _big_state(5)
  with checkpoint.Checkpointer(str(tmp_path / "ckpt"), wait=False) as ckpt:
    assert ckpt.save(5, state, {"step": 5})
    ckpt.check()
    ckpt.wait()
    assert ckpt.last_good_step == 5
    got = ckpt.restore_latest_intact(jax.eval_shape(lambda: state))
  assert got.step == 5
  _assert_equal(state, got.state)


def test_checkpoint_without_fingerprint_restores_with_a_note(tmp_path, caplog):
  """Checkpoints written before fingerprints (no `fingerprint` item) still restore."""
  import shutil  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / "ckpt")
  abstract = _save_steps(directory, (1,))
  shutil.rmtree(os.path.join(directory, "1", "fingerprint"))
  with caplog.at_level(logging.WARNING, logger="lad_jax.checkpoint"):
    with checkpoint.Checkpointer(directory) as ckpt:
      got = ckpt.restore_latest_intact(abstract)
  assert got.step == 1
  assert any("no fingerprint" in r.getMessage() for r in caplog.records)


_RESTORE_DAMAGED = textwrap.dedent("""
  import os, sys
  import jax, jax.numpy as jnp
  from lad_jax import checkpoint
  d = sys.argv[1]
  state = {f"w{i}": jax.random.normal(jax.random.key(i), (64, 64)) for i in range(4)}
  with checkpoint.Checkpointer(d) as ckpt:
    ckpt.save(1, state)
    ckpt.save(2, state)
  step2 = os.path.join(d, "2", "state", "ocdbt.process_0", "d")
  for name in os.listdir(step2):  # every data file of step 2 cut short
    os.truncate(os.path.join(step2, name), 10)
  with checkpoint.Checkpointer(d) as ckpt:
    got = ckpt.restore_latest_intact(jax.eval_shape(lambda: state))
  print("RESTORED", got.step)
""")


def test_damage_report_is_one_line(tmp_path):
  """Outside pytest's hooks: falling back past a damaged step writes one warning line, no traces."""
  env = dict(os.environ, PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _RESTORE_DAMAGED, str(tmp_path / "ckpt")], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "RESTORED 1" in proc.stdout
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("WARNING") and "checkpoint step 2 " in lines[0]
  assert "damaged" in lines[0]


def test_restore_of_a_damaged_step_names_it(tmp_path):
  directory = str(tmp_path / "ckpt")
  abstract = _save_steps(directory, (1, 2))
  _flip(_data_files(directory, 2)[0], os.path.getsize(_data_files(directory, 2)[0]) // 2)
  with checkpoint.Checkpointer(directory) as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match="step 2 .* is damaged"):
      ckpt.restore(abstract)
    _assert_equal(_big_state(1), ckpt.restore(abstract, step=1)[0])


def test_late_orbax_callback_reports_go_to_the_debug_log(capsys):
  """tensorstore's 'Event loop is closed' report after an abandoned read is not printed."""
  import types  # pylint: disable=g-import-not-at-top

  def call_soon_threadsafe():
    raise RuntimeError("Event loop is closed")
  try:
    call_soon_threadsafe()
  except RuntimeError as e:
    report = types.SimpleNamespace(exc_type=RuntimeError, exc_value=e, exc_traceback=e.__traceback__,
                                   err_msg=None, object=None)
  checkpoint._orbax_unraisable(report)  # pylint: disable=protected-access
  assert capsys.readouterr().err == ""
