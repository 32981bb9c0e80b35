"""A pool of worker processes with a per-item deadline, for checkers that may hang or crash.

`concurrent.futures.ProcessPoolExecutor` cannot stop one hung task (sympy evaluating
`9^{9^{9^{9}}}` never returns) and a crashed worker breaks the whole executor. Here each worker runs
one item at a time; an item that exceeds its deadline gets its worker SIGKILLed and replaced, and is
reported as a timeout; a worker that dies mid-item is replaced and the item reported as a crash.
Workers are also recycled after `max_tasks_per_worker` items, which bounds memory growth of
long-lived sympy caches.

Workers are fresh interpreters (`subprocess`, like multiprocessing's "spawn"): the trainer process
runs JAX (multithreaded), and forking a multithreaded process can deadlock the child.

    with WorkerPool(my_module.check, workers=2, timeout_s=5.0) as pool:
      outcomes = pool.map([args0, args1, ...])   # list of Outcome(status, value, error)

`fn` must be a module-level function (spawned workers import it by name) taking one picklable
argument and returning a picklable value.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional, Sequence

OK = "ok"
TIMEOUT = "timeout"
CRASH = "crash"
ERROR = "error"

_READY = "__ready__"


@dataclasses.dataclass(frozen=True)
class Outcome:
  """Result of one item: status is "ok" (value set), "timeout", "crash" or "error" (error set)."""

  status: str
  value: Any = None
  error: str = ""


def _worker_main(fn: Callable[[Any], Any], conn: multiprocessing.connection.Connection,
                 initializer: Optional[Callable[[], None]]) -> None:
  """Worker loop: announce readiness (after slow imports), then answer one item at a time."""
  try:
    if initializer is not None:
      initializer()
  except BaseException:  # pylint: disable=broad-except
    conn.send((ERROR, None, "initializer failed:\n" + traceback.format_exc()))
    return
  conn.send((_READY, None, ""))
  while True:
    try:
      item = conn.recv()
    except (EOFError, OSError):
      return
    if item is None:
      return
    try:
      conn.send((OK, fn(item), ""))
    except BaseException as e:  # pylint: disable=broad-except
      msg = f"{type(e).__name__}: {e}"[:2000]
      try:
        conn.send((ERROR, None, msg))
      except Exception:  # pylint: disable=broad-except
        return


def _resolve(spec: str) -> Callable[..., Any]:
  module_name, _, qualname = spec.partition(":")
  obj: Any = importlib.import_module(module_name)
  for part in qualname.split("."):
    obj = getattr(obj, part)
  return obj


def _subprocess_main() -> None:
  """Entry point of a worker process: `python -c ... <fd> <fn spec> [<initializer spec>]`."""
  fd = int(sys.argv[1])
  fn = _resolve(sys.argv[2])
  initializer = _resolve(sys.argv[3]) if len(sys.argv) > 3 else None
  _worker_main(fn, multiprocessing.connection.Connection(fd), initializer)


def _function_spec(fn: Callable[..., Any], what: str) -> str:
  module = getattr(fn, "__module__", None)
  qualname = getattr(fn, "__qualname__", "")
  if not module or module == "__main__" or "<" in qualname:
    raise ValueError(f"{what} {fn!r} must be a module-level function of an importable module (not "
                     "__main__, a lambda or a closure): worker processes import it by name.")
  return f"{module}:{qualname}"


class _Worker:
  """One worker process plus its socket, busy with at most one item.

  Workers are plain `subprocess` children running `_subprocess_main` (a fresh interpreter, like
  multiprocessing's "spawn", but without re-running the caller's `__main__` module, so scripts
  need no `if __name__ == "__main__"` guard).
  """

  def __init__(self, fn_spec: str, init_spec: Optional[str]):
    parent_sock, child_sock = socket.socketpair()
    child_fd = child_sock.fileno()
    cmd = [sys.executable, "-c",
           "from lad_jax.verifiers.pool import _subprocess_main; _subprocess_main()",
           str(child_fd), fn_spec] + ([init_spec] if init_spec else [])
    env = dict(os.environ)
    # The worker must import the same modules as the caller (e.g. a test module's helpers).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
      self.process = subprocess.Popen(cmd, pass_fds=(child_fd,), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, env=env)
    finally:
      child_sock.close()
    self.conn = multiprocessing.connection.Connection(parent_sock.detach())
    self.ready = False
    self.item_index: Optional[int] = None
    self.deadline = float("inf")
    self.tasks_done = 0

  def kill(self) -> None:
    if self.process.poll() is None:
      self.process.kill()
    try:
      self.process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
      pass
    self.conn.close()


class WorkerPool:
  """Runs `fn(item)` for many items in `workers` processes, each item under `timeout_s` seconds.

  Args:
    fn: module-level function of one picklable argument.
    workers: number of worker processes.
    timeout_s: wall-clock seconds one item may take, counted from when a ready worker receives it
      (worker start-up and imports are not counted).
    max_tasks_per_worker: recycle a worker after this many items (None: never).
    initializer: optional module-level function each worker runs once before announcing ready
      (e.g. warm-up imports).
    start_timeout_s: how long a new worker may take to become ready before it is declared broken.
  """

  def __init__(self, fn: Callable[[Any], Any], *, workers: int = 2, timeout_s: float = 5.0,
               max_tasks_per_worker: Optional[int] = 2000,
               initializer: Optional[Callable[[], None]] = None,
               start_timeout_s: float = 120.0):
    if workers < 1:
      raise ValueError(f"workers must be >= 1, got {workers}.")
    if not timeout_s > 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s}.")
    if max_tasks_per_worker is not None and max_tasks_per_worker < 1:
      raise ValueError(f"max_tasks_per_worker must be >= 1 or None, got {max_tasks_per_worker}.")
    self._fn_spec = _function_spec(fn, "fn")
    self._init_spec = _function_spec(initializer, "initializer") if initializer else None
    self._num_workers = workers
    self.timeout_s = float(timeout_s)
    self._max_tasks = max_tasks_per_worker
    self._start_timeout_s = start_timeout_s
    self._lock = threading.Lock()
    self._workers: list[_Worker] = []
    self._closed = False
    # Counters, for tests and monitoring.
    self.restarts = 0
    self.timeouts = 0
    self.crashes = 0

  # -- lifecycle ---------------------------------------------------------------------------------

  def _start_worker(self) -> _Worker:
    w = _Worker(self._fn_spec, self._init_spec)
    w.deadline = time.monotonic() + self._start_timeout_s  # deadline for becoming ready
    return w

  def _ensure_workers(self) -> None:
    while len(self._workers) < self._num_workers:
      self._workers.append(self._start_worker())

  def _replace(self, w: _Worker) -> None:
    w.kill()
    self._workers.remove(w)
    self.restarts += 1
    if not self._closed:
      self._workers.append(self._start_worker())

  def close(self) -> None:
    """Stops all workers (politely, then by SIGKILL). Idempotent."""
    with self._lock:
      self._closed = True
      for w in self._workers:
        try:
          w.conn.send(None)
        except (OSError, ValueError):
          pass
      for w in self._workers:
        try:
          w.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
          pass
        w.kill()
      self._workers = []

  def __enter__(self) -> "WorkerPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  # -- work --------------------------------------------------------------------------------------

  def map(self, items: Sequence[Any]) -> list[Outcome]:
    """Scores all items; returns one Outcome per item, in order. Never raises for an item."""
    with self._lock:
      if self._closed:
        raise ValueError("WorkerPool is closed; create a new one.")
      return self._map_locked(list(items))

  def _map_locked(self, items: list[Any]) -> list[Outcome]:
    results: list[Optional[Outcome]] = [None] * len(items)
    pending = collections.deque(range(len(items)))
    self._ensure_workers()
    remaining = len(items)
    while remaining:
      now = time.monotonic()
      # Hand items to idle ready workers.
      for w in self._workers:
        if w.ready and w.item_index is None and pending:
          idx = pending.popleft()
          try:
            w.conn.send(items[idx])
          except (OSError, ValueError, BrokenPipeError):
            pending.appendleft(idx)
            self.crashes += 1
            self._replace(w)
            break
          w.item_index = idx
          w.deadline = now + self.timeout_s
      timeout = max(0.0, min(w.deadline for w in self._workers) - time.monotonic())
      conns = [w.conn for w in self._workers]
      ready_conns = multiprocessing.connection.wait(conns, timeout=min(timeout, 1.0))
      by_conn = {id(w.conn): w for w in self._workers}
      for conn in ready_conns:
        w = by_conn[id(conn)]
        try:
          status, value, error = w.conn.recv()
        except (EOFError, OSError):
          # The worker died: crash for its item (if any), then replace it.
          if w.item_index is not None:
            results[w.item_index] = Outcome(CRASH, error="worker process died")
            remaining -= 1
            self.crashes += 1
          elif not w.ready:
            self._fail_start(w, "worker died during start-up")
          self._replace(w)
          continue
        if status == _READY:
          w.ready = True
          w.deadline = float("inf")
          continue
        if w.item_index is None:  # initializer failure reported before ready
          self._fail_start(w, error)
          self._replace(w)
          continue
        results[w.item_index] = Outcome(status, value, error)
        remaining -= 1
        w.item_index = None
        w.deadline = float("inf")
        w.tasks_done += 1
        if self._max_tasks is not None and w.tasks_done >= self._max_tasks:
          self._replace(w)
      # Kill workers past their deadline.
      now = time.monotonic()
      for w in list(self._workers):
        if now < w.deadline:
          continue
        if w.item_index is not None:
          results[w.item_index] = Outcome(TIMEOUT, error=f"exceeded {self.timeout_s:g} s")
          remaining -= 1
          self.timeouts += 1
        elif not w.ready:
          self._fail_start(w, f"worker not ready after {self._start_timeout_s:g} s")
        self._replace(w)
    return results  # type: ignore[return-value]

  def _fail_start(self, w: _Worker, why: str) -> None:
    # A pool whose workers cannot even start would otherwise restart them forever.
    w.kill()
    self._workers.remove(w)
    raise RuntimeError(f"WorkerPool: a worker failed to start ({why}). Check that the worker "
                       "function's module imports cleanly in a fresh interpreter.")
