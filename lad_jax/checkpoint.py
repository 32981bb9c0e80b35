"""Verified orbax checkpoints with exact resume: the train state pytree plus JSON metadata.

The state (params, optimizer state, step, PRNG key) is saved with `StandardSave`, so each host
writes only its own shards and a restore places every array directly into the sharding of the
abstract target. Everything that is not an array (data-iterator position, config snapshot) goes
in `meta`.

Every checkpoint also carries a fingerprint (a third item, `fingerprint`, JSON): per leaf its
shape, dtype, a 64-bit checksum of its bytes and whether it is finite. The checksum is computed on
device in one jitted reduction (each leaf bitcast to uint32 words, each word mixed with its flat
position, summed mod 2^32 in two lanes), so sharded and multi-host arrays are never gathered.

  * `save` refuses a state with a non-finite floating leaf (`NonFiniteStateError`, nothing is
    written). With `wait=True` (the default; the RL loop's choice on several hosts) it waits for
    the write, so a failure (full disk, lost mount) raises one `SaveError` line from that call;
    with `wait=False` the write overlaps training and `check()`, called every step, raises it at
    the next step boundary. Either way the last good checkpoint stays untouched. Waiting costs
    the whole write time, which for a large state is seconds per checkpoint.
  * `restore_latest_intact` recomputes the fingerprint of what it read; a damaged checkpoint
    (checksum mismatch, non-finite values, unreadable or truncated files) is moved aside to
    `<directory>.damaged/` with a one-line warning and the next older one is tried.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lad_jax import errors

_FINGERPRINT_VERSION = 1
_MAX_REASON = 300  # characters of a cause kept in a one-line message


class CheckpointError(errors.RunError):
  """A checkpoint problem; the message is one line naming the problem and the fix."""


class NonFiniteStateError(CheckpointError):
  """`save` was given a state with NaN/inf in a floating leaf; nothing was written."""


class SaveError(CheckpointError):
  """Writing a checkpoint failed; the last good checkpoint is intact."""


class NoIntactCheckpointError(CheckpointError):
  """Checkpoints exist but every one is damaged."""


class StateMismatchError(CheckpointError):
  """The checkpoint holds a state of another structure (another model / optimizer / objective)."""


class Restored(NamedTuple):
  """What `restore_latest_intact` returns.

  state: the restored pytree, in the abstract target's shardings.
  meta: the JSON metadata saved with it.
  step: the checkpoint's step.
  skipped: (step, reason) of each newer checkpoint found damaged (moved aside), newest first.
  """
  state: Any
  meta: dict[str, Any]
  step: int
  skipped: list[tuple[int, str]]


# ------------------------------------------------------------------------------------------------
# Fingerprint


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijective avalanche mix of uint32 words."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The leaf's bytes as uint32 words (one per element; two for 8-byte elements)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = np.dtype(x.dtype).itemsize
  if size == 4 or size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: a trailing axis of 2
  if size in (1, 2):
    uint = jnp.uint8 if size == 1 else jnp.uint16
    return jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32)
  raise TypeError(f"cannot fingerprint dtype {x.dtype}")


def _positions(shape: tuple[int, ...]) -> jax.Array:
  """Each element's row-major flat index (mod 2^32), built from iotas so it shards like x."""
  idx = jnp.zeros(shape, jnp.uint32)
  for axis, n in enumerate(shape):
    idx = idx * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
  return idx


def _leaf_fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(lane-0 sum, lane-1 sum, all finite) of one leaf.

  Lane 0 sums fmix32(w + i * K) over each word w at flat position i: the term is a bijection of
  w, so any changed word changes the sum, and as the position enters nonlinearly, moved or
  swapped words change it too. Lane 1 sums w * (2i + 1): a word changed by d moves it by
  d * (an odd number) != 0 mod 2^32, so any single changed word shows in both lanes, and damage
  to several words escapes both with odds ~2^-64. Sums are order-free, so XLA reduces the
  shards wherever they live (lane 1 costs two integer ops a word; lane 0 about a dozen).
  """
  w = _words(x)
  pos = _positions(w.shape)
  lane0 = _fmix32(w + pos * jnp.uint32(0x9E3779B1))
  lane1 = w * (pos * jnp.uint32(2) + jnp.uint32(1))
  if jnp.issubdtype(x.dtype, jnp.inexact):
    finite = jnp.isfinite(x)
    finite = finite if finite.shape == w.shape else jnp.broadcast_to(finite[..., None], w.shape)
  else:
    finite = jnp.ones(w.shape, jnp.bool_)
  # One variadic reduction: a single pass over the leaf (three separate ones are ~5x slower).
  return jax.lax.reduce(
      (lane0, lane1, finite), (jnp.uint32(0), jnp.uint32(0), jnp.array(True)),
      lambda a, b: (a[0] + b[0], a[1] + b[1], jnp.logical_and(a[2], b[2])),
      tuple(range(w.ndim)))


_fingerprint_leaves = jax.jit(lambda leaves: [_leaf_fingerprint(x) for x in leaves])


def _path_str(path: tuple[Any, ...]) -> str:
  """'params/w', 'opt_state/0/mu/w': a leaf path as the messages and the fingerprint name it."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def fingerprint(state: Any) -> dict[str, Any]:
  """A state's JSON fingerprint: {"version", "leaves": {path: {shape, dtype, checksum, finite}}}.

  Computed on device in one jitted call; only 3 scalars per leaf come back to the host.
  """
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  values = jax.device_get(_fingerprint_leaves([x for _, x in flat]))
  leaves = {}
  for (path, x), (s0, s1, finite) in zip(flat, values):
    leaves[_path_str(path)] = {"shape": list(np.shape(x)), "dtype": _dtype_name(x.dtype),
                               "checksum": f"{int(s0):08x}{int(s1):08x}", "finite": bool(finite)}
  return {"version": _FINGERPRINT_VERSION, "leaves": leaves}


def non_finite_leaves(fp: dict[str, Any]) -> list[str]:
  """Paths of the leaves a fingerprint marks as holding NaN or inf."""
  return [path for path, leaf in fp["leaves"].items() if not leaf["finite"]]


def _abstract_signature(abstract_state: Any) -> dict[str, tuple[list[int], str]]:
  """{path: (shape, dtype)} of an abstract target, in the fingerprint's notation."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  return {_path_str(p): (list(x.shape), _dtype_name(x.dtype)) for p, x in flat}


def _dtype_name(dtype: Any) -> str:
  """'float32', 'bfloat16', 'key<fry>': a dtype as the fingerprint records it."""
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return str(dtype)
  return str(np.dtype(dtype))


def _structure_difference(saved: dict[str, Any], abstract_state: Any) -> Optional[str]:
  """None if the saved fingerprint has the target's leaves, shapes and dtypes; else what differs."""
  want = _abstract_signature(abstract_state)
  have = {p: (leaf["shape"], leaf["dtype"]) for p, leaf in saved["leaves"].items()}
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing or extra:
    return f"leaves missing from it: {_few(missing)}; leaves only in it: {_few(extra)}"
  for path in want:
    if tuple(want[path][0]) != tuple(have[path][0]) or want[path][1] != have[path][1]:
      return (f"{path} is {have[path][1]}{list(have[path][0])} there but "
              f"{want[path][1]}{list(want[path][0])} here")
  return None


def _verify(fp_saved: dict[str, Any], state: Any) -> Optional[str]:
  """None if `state` matches the saved fingerprint and is finite; else a one-line reason."""
  fp_now = fingerprint(state)
  bad = [p for p, leaf in fp_now["leaves"].items()
         if leaf["checksum"] != fp_saved["leaves"].get(p, {}).get("checksum")]
  if bad:
    return f"checksum mismatch in {_few(bad)}"
  non_finite = non_finite_leaves(fp_now)
  if non_finite:
    return f"non-finite values in {_few(non_finite)}"
  return None


def _few(items: list[str], n: int = 4) -> str:
  """'a, b, c, d and 5 more': a list short enough for a one-line message."""
  if not items:
    return "none"
  more = f" and {len(items) - n} more" if len(items) > n else ""
  return ", ".join(items[:n]) + more


def _one_line(e: BaseException) -> str:
  """An exception as one short line: the innermost cause's type and first message line.

  Orbax wraps tensorstore's precise error (e.g. "DATA_LOSS: ... ZSTD_decompressStream() failed")
  in a generic one whose message spans a whole spec, so the root cause is what names the problem;
  a long one keeps its start and its end, where tensorstore puts the OS error.
  """
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  lines = str(e).strip().splitlines()
  text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
  if len(text) <= _MAX_REASON:
    return text
  return text[:_MAX_REASON // 3] + " ... " + text[-2 * _MAX_REASON // 3:]  # the OS error is last


# ------------------------------------------------------------------------------------------------
# Orbax's own error logs


class _OrbaxErrorFilter(logging.Filter):
  """Drops orbax's ERROR records (each with a traceback) while we turn the failure into one line.

  The dropped records go to the `lad_jax.checkpoint` logger at DEBUG, so `--verbosity` still
  shows them.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
      _log.debug("orbax: %s", record.getMessage(), exc_info=record.exc_info)
      return False
    return True


_log = logging.getLogger(__name__)
_orbax_filter = _OrbaxErrorFilter()


def _orbax_unraisable(unraisable: Any) -> None:
  """Sends orbax's abandoned-read reports to the debug log; passes anything else on.

  When one read of a damaged checkpoint fails, orbax abandons its sibling reads: Python reports
  each abandoned coroutine ("Exception ignored in <coroutine ...>") when it is collected, and
  tensorstore reports each late completion callback that finds orbax's event loop closed. Both
  come after the failure has already become our one-line warning.
  """
  code = getattr(unraisable.object, "cr_code", None)
  orbax_coroutine = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
  late_callback = (isinstance(unraisable.exc_value, RuntimeError) and
                   str(unraisable.exc_value) == "Event loop is closed" and
                   _raised_in(unraisable.exc_traceback, "call_soon_threadsafe"))
  if orbax_coroutine or late_callback:
    _log.debug("orbax (abandoned read): %r", unraisable.exc_value)
    return
  (_previous_unraisable or sys.__unraisablehook__)(unraisable)


def _raised_in(tb: Any, function: str) -> bool:
  """Whether a traceback passes through a function of that name."""
  while tb is not None:
    if tb.tb_frame.f_code.co_name == function:
      return True
    tb = tb.tb_next
  return False


_open_checkpointers = 0
_previous_unraisable = None


def _quiet_orbax(on: bool) -> None:
  """While a Checkpointer is open, orbax's error logs give way to the one-line errors we raise.

  Orbax logs a failed asynchronous write from its background threads (hundreds of traceback
  lines) before the failure reaches us, so the log filter spans the Checkpointer's life. The
  abandoned-coroutine hook stays once installed: those reports come whenever the coroutines are
  collected, possibly after the Checkpointer is closed.
  """
  global _open_checkpointers, _previous_unraisable
  _open_checkpointers = max(0, _open_checkpointers + (1 if on else -1))
  logger = logging.getLogger("absl")
  if on and _open_checkpointers == 1:
    logger.addFilter(_orbax_filter)
  elif not on and _open_checkpointers == 0:
    logger.removeFilter(_orbax_filter)
  if on and sys.unraisablehook is not _orbax_unraisable:
    _previous_unraisable, sys.unraisablehook = sys.unraisablehook, _orbax_unraisable


# ------------------------------------------------------------------------------------------------
# Checkpointer


class Checkpointer:
  """Saves and restores verified `(state, meta)` checkpoints under `directory/<step>/`.

  Args:
    directory: where checkpoints live (created if missing; local path or a GCS/S3 URL orbax knows).
    max_to_keep: how many recent checkpoints to keep.
    save_interval_steps: `save` (without force) saves when `step % save_interval_steps == 0`.
    wait: True (default): `save` returns once the checkpoint is on disk, so a failed write raises
      `SaveError` from that very call. False: the write overlaps training; call `check()` each
      step (cheap) to raise a finished save's failure, else it surfaces at the next `save`/`wait`.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               wait: bool = True):
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = directory
    self._wait = wait
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        create=True,
    )
    self._manager = ocp.CheckpointManager(directory, options=options)
    _quiet_orbax(True)
    self._closed = False
    self._pending: Optional[int] = None  # the step of a save not yet confirmed on disk
    self._last_good = self._manager.latest_step()

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  @property
  def last_good_step(self) -> Optional[int]:
    """The newest checkpoint known to be completely written (None: none yet)."""
    return self._last_good

  # -- save ---------------------------------------------------------------------------------------

  def save(self, step: int, state: Any, meta: Optional[dict[str, Any]] = None, *,
           force: bool = False) -> bool:
    """Fingerprints and saves `(state, meta)` as `step`; returns whether a checkpoint was written.

    Raises:
      NonFiniteStateError: a floating leaf holds NaN/inf; nothing is written.
      SaveError: this write (or an earlier asynchronous one) failed; the last good checkpoint
        is intact.
    """
    step = int(step)
    self.wait()  # an earlier asynchronous save's failure is reported against its own step
    if not force and not self._manager.should_save(step):
      return False
    fp = fingerprint(state)
    bad = non_finite_leaves(fp)
    if bad:
      raise NonFiniteStateError(
          f"refusing to checkpoint step {step}: non-finite values in {_few(bad)}; nothing was "
          f"written, the last good checkpoint is step {self._last_good} in {self.directory} "
          "(the run diverged: lower optim.lr / check the loss, then resume from there)")
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(dict(meta or {})),
        fingerprint=ocp.args.JsonSave(fp),
    )
    self._pending = step
    try:
      saved = self._manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)
    if not saved:
      self._pending = None
    elif self._wait:
      self.wait()
    return saved

  def check(self) -> None:
    """Raises `SaveError` if an asynchronous save has finished and failed; never blocks."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until a pending save is on disk; raises `SaveError` if it failed."""
    if self._pending is None:
      return
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)
    self._confirm_written(self._pending)

  def _confirm_written(self, step: int) -> None:
    """Checks on disk that `step` was finalised (orbax logs, not raises, some finalise errors)."""
    self._manager.reload()
    if step not in self._manager.all_steps():
      self._fail(RuntimeError("the step directory was not finalised (see --verbosity=1 logs)"))
    self._pending = None
    self._last_good = step

  def _fail(self, cause: BaseException) -> None:
    """Raises the one-line SaveError for the pending step; the step's tmp dir is never restored."""
    step, self._pending = self._pending, None
    try:
      self._manager.reload()  # forget the failed step (its tmp dir is not a checkpoint)
    except Exception:  # pylint: disable=broad-except
      pass  # the directory itself may be gone; the SaveError below says what failed
    raise SaveError(
        f"checkpoint save of step {step} to {self.directory} failed: {_one_line(cause)}; the "
        f"last good checkpoint is step {self._last_good} (fix the disk / directory and rerun "
        "the same command to resume from it)") from cause

  # -- restore ------------------------------------------------------------------------------------

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict[str, Any]]:
    """Restores and verifies `(state, meta)` at `step` (default: latest); no fallback.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` (with `.sharding`) or of arrays, e.g. from
        `jax.eval_shape`; restored arrays get its shapes, dtypes and shardings.
      step: which checkpoint; None for the latest.

    Raises:
      FileNotFoundError: if there is no checkpoint to restore.
      StateMismatchError: the checkpoint holds another structure.
      CheckpointError: the checkpoint is damaged (the reason is in the message).
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"No checkpoint found in {self.directory}.")
    try:
      state, meta, _ = self._restore_checked(step, abstract_state)
    except StateMismatchError:
      raise
    except CheckpointError as e:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged ({e}); "
                            "restore_latest_intact falls back to an older one") from e
    return state, meta

  def restore_latest_intact(self, abstract_state: Any, *,
                            quarantine: bool = True) -> Optional[Restored]:
    """Restores the newest checkpoint that verifies, skipping (and moving aside) damaged ones.

    Each damaged checkpoint is logged as one warning line naming its step and why; with
    `quarantine` it is moved to `<directory>.damaged/<step>` so the resumed run can save that step
    again. Returns None when the directory holds no checkpoint.

    Raises:
      NoIntactCheckpointError: checkpoints exist but none verifies.
      StateMismatchError: the newest checkpoint holds another structure (another run's state).
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    skipped = []
    for step in steps:
      result, reason = self._attempt(step, abstract_state)
      if result is not None:
        return Restored(*result, step, skipped)
      gc.collect()  # orbax's abandoned reads are reported (to the debug log) now, not later
      skipped.append((step, reason))
      moved = self._quarantine(step) if quarantine else None
      _log.warning("checkpoint step %d in %s is damaged (%s); %sfalling back to an older one",
                   step, self.directory, reason, f"moved to {moved}; " if moved else "")
    detail = "; ".join(f"step {s}: {r}" for s, r in skipped)
    raise NoIntactCheckpointError(
        f"no intact checkpoint in {self.directory} ({detail}); start over with a new workdir or "
        "--config.checkpoint.resume=False")

  def _attempt(self, step: int, abstract_state: Any) -> tuple[Optional[tuple[Any, dict]], str]:
    """((state, meta), "") if `step` restores and verifies, else (None, why it is damaged)."""
    try:
      state, meta, note = self._restore_checked(step, abstract_state)
    except StateMismatchError:
      raise
    except CheckpointError as e:
      return None, str(e)
    if note:
      _log.warning("%s", note)
    return (state, meta), ""

  def _restore_checked(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], str]:
    """Restores `step` and verifies it; returns (state, meta, note) or raises CheckpointError."""
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    fp = self._read_fingerprint(step)
    if fp is not None:
      diff = _structure_difference(fp, abstract_state)
      if diff is not None:
        raise StateMismatchError(
            f"checkpoint step {step} in {self.directory} holds another state ({diff}); it "
            "belongs to another run: use a new workdir or --config.checkpoint.resume=False")
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      state = jax.block_until_ready(restored.state)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"unreadable: {_one_line(e)}") from e
    if fp is None:
      reason = _verify_finite(state)
      note = (f"checkpoint step {step} has no fingerprint (written before verified checkpoints): "
              "checked for non-finite values only")
    else:
      reason, note = _verify(fp, state), ""
    if reason:
      raise CheckpointError(reason)
    return state, dict(restored.meta), note

  def _read_fingerprint(self, step: int) -> Optional[dict[str, Any]]:
    """The step's saved fingerprint; None for a checkpoint written before fingerprints."""
    if not (epath.Path(self.directory) / str(step) / "fingerprint").exists():
      return None
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))
      fp = dict(restored.fingerprint)
      if fp.get("version") != _FINGERPRINT_VERSION or not isinstance(fp.get("leaves"), dict):
        raise ValueError(f"unknown fingerprint format (version {fp.get('version')})")
      return fp
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"unreadable fingerprint: {_one_line(e)}") from e

  def _quarantine(self, step: int) -> Optional[str]:
    """Moves a damaged step to `<directory>.damaged/<step>[-<time>]`; returns where (or None)."""
    dst = None
    if jax.process_index() == 0:
      src = epath.Path(self.directory) / str(step)
      root = epath.Path(self.directory.rstrip("/") + ".damaged")
      root.mkdir(parents=True, exist_ok=True)
      dst = root / str(step)
      if dst.exists():
        dst = root / f"{step}-{int(time.time())}"
      src.rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"lad_jax.checkpoint.quarantine.{step}")
    self._manager.reload()
    self._last_good = self._manager.latest_step()
    return str(dst) if dst is not None else None

  # -- lifetime -----------------------------------------------------------------------------------

  def close(self) -> None:
    """Waits for a pending save (raising `SaveError` if it failed) and releases orbax."""
    if self._closed:
      return
    try:
      self.wait()
    finally:
      self._closed = True
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # its failure was just raised (or logged) by wait()
      _quiet_orbax(False)

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _verify_finite(state: Any) -> Optional[str]:
  """None if every floating leaf is finite; else the one-line reason."""
  bad = non_finite_leaves(fingerprint(state))
  return f"non-finite values in {_few(bad)}" if bad else None
