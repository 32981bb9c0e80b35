"""Runs one untrusted Python program in a sandboxed subprocess and collects its (capped) output.

What is guaranteed depends on what the host allows; `Sandbox.isolation` says which level is active
(probed once per interpreter, by actually running a program through the full machinery):

"namespaces+uid" (running as root with util-linux `unshare`; this machine and typical GPU
containers):
  - The child runs in fresh network, PID and mount namespaces
    (`unshare --net --pid --fork --kill-child --mount-proc`): no network interface but a down
    loopback, so no connection of any kind, to the internet or to local services; it sees and can
    signal only its own processes (its parent is not even visible), and when the sandbox's init
    process dies the kernel kills every process left in the namespace (fork-bomb children that
    called setsid included).
  - Before the program runs, the harness drops to a random unprivileged uid/gid
    (2e9 + random, no supplementary groups): files and directories are writable only if they are
    world-writable (/tmp, /dev/shm) or owned by that uid (the scratch directory). RLIMIT_NPROC is
    per uid, so a random uid gives each run its own process budget; root ignores RLIMIT_NPROC,
    which is why a fork bomb needs the uid drop to be contained.
"namespaces" (not root, unprivileged user namespaces allowed): as above, inside a user namespace
  (`unshare --user --map-root-user`), but no uid drop: the program can write wherever the calling
  user can. RLIMIT_NPROC is set to the user's current task count plus `max_processes`.
"uid" (root without `unshare`): uid drop and rlimits; sockets blocked by an audit hook only.
"rlimits" (neither): rlimits, process-group kill, and audit hooks that refuse sockets, process
  creation and signals (as root RLIMIT_NPROC does not apply, so nothing else would stop a fork
  bomb; without a PID namespace the parent could be signalled). Files are writable as the calling
  user. Audit hooks are NOT a security boundary (ctypes bypasses them); use this level only for
  trusted-ish code.

Always:
  - rlimits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE),
    processes/threads (RLIMIT_NPROC), open files (RLIMIT_NOFILE), no core dumps.
  - a wall-clock deadline, after which the whole process group (start_new_session=True) is
    SIGKILLed; the process group is killed after every run, finished or not.
  - stdout is read up to `max_output_bytes` (then the run is killed: "output_limit"); only the last
    8 KiB of stderr are kept.
  - cwd and HOME/TMPDIR are a fresh scratch directory, removed afterwards; the environment is
    replaced by a minimal one (PATH, HOME, TMPDIR, LANG, single-threaded BLAS); the interpreter
    runs in isolated mode (-I: no PYTHON* variables, no user site-packages).
  - the program never sees the spec file (tests' token): the harness reads and unlinks it, as
    root, before dropping privileges.

Not guaranteed: files the program creates in world-writable directories outside its scratch
directory are not cleaned up (each is capped by RLIMIT_FSIZE); CPU and memory use of the host are
bounded only per process by rlimits (no cgroup), and a fork bomb can use `max_processes`
processes' worth of CPU until the deadline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

HARNESS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_harness.py")
ISOLATION_LEVELS = ("namespaces+uid", "namespaces", "uid", "rlimits")
_UNSHARE_FLAGS = ("--net", "--pid", "--fork", "--kill-child", "--mount-proc")
_UID_BASE = 2_000_000_000  # far above login users and typical subuid ranges
_UID_SPAN = 100_000_000
_STDERR_KEEP = 8192
_READ_CHUNK = 65536

OK = "ok"
TIMEOUT = "timeout"
OUTPUT_LIMIT = "output_limit"
SANDBOX_ERROR = "sandbox_error"


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one sandboxed run.

  Attributes:
    timeout_s: wall-clock deadline, seconds.
    cpu_s: CPU-time limit per process (RLIMIT_CPU); None: ceil(timeout_s) + 1.
    memory_mb: address-space limit per process (RLIMIT_AS), MiB.
    max_output_bytes: stdout bytes read before the run is killed.
    file_size_mb: largest file the program may write (RLIMIT_FSIZE), MiB.
    max_processes: processes + threads the program's uid may have (RLIMIT_NPROC).
    max_open_files: RLIMIT_NOFILE.
  """

  timeout_s: float = 5.0
  cpu_s: Optional[float] = None
  memory_mb: int = 1024
  max_output_bytes: int = 1 << 20
  file_size_mb: int = 16
  max_processes: int = 32
  max_open_files: int = 64

  def __post_init__(self):
    for name in ("timeout_s", "memory_mb", "max_output_bytes", "file_size_mb", "max_processes",
                 "max_open_files"):
      if not getattr(self, name) > 0:
        raise ValueError(f"Limits.{name} must be > 0, got {getattr(self, name)}.")


@dataclasses.dataclass(frozen=True)
class RunOutcome:
  """What happened to one run.

  Attributes:
    status: "ok" (exited on its own before the deadline), "timeout", "output_limit" or
      "sandbox_error" (the sandbox itself failed; `stderr` says why).
    returncode: exit status (negative: killed by that signal); None if it never exited on its own.
    stdout: captured stdout, at most `max_output_bytes` (+ one read chunk) bytes.
    stderr: the last 8 KiB of stderr.
    elapsed_s: wall-clock seconds from start to the kill / exit.
  """

  status: str
  returncode: Optional[int]
  stdout: bytes
  stderr: bytes
  elapsed_s: float


@dataclasses.dataclass(frozen=True)
class _Mode:
  isolation: str
  prefix: tuple[str, ...]
  drop_uid: bool
  block_network_hook: bool
  python: str


_MODE_CACHE: dict[tuple[str, tuple[str, ...]], _Mode] = {}
_MODE_LOCK = threading.Lock()


def _candidate_pythons(python: Optional[str]) -> list[str]:
  if python is not None:
    return [python]
  found = []
  # After the uid drop the interpreter must still be able to read its standard library; pyenv or
  # venvs under /root (mode 0700) cannot, a system interpreter usually can.
  for p in (sys.executable, "/usr/bin/python3", shutil.which("python3")):
    if p and os.path.exists(p) and p not in found:
      found.append(p)
  return found


def _modes_to_try(python: str, isolation: str) -> list[_Mode]:
  unshare = shutil.which("unshare")
  root = os.geteuid() == 0
  modes = []
  if unshare and root:
    modes.append(_Mode("namespaces+uid", (unshare, *_UNSHARE_FLAGS, "--"), True, False, python))
  if unshare and not root:
    modes.append(_Mode("namespaces", (unshare, "--user", "--map-root-user", *_UNSHARE_FLAGS, "--"),
                       False, False, python))
  if root:
    modes.append(_Mode("uid", (), True, True, python))
  modes.append(_Mode("rlimits", (), False, True, python))
  if isolation == "auto":
    return modes
  return [m for m in modes if m.isolation == isolation]


def _resolve_mode(python: Optional[str], isolation: str) -> _Mode:
  """Picks the strongest isolation level that actually runs a program here (cached)."""
  if isolation != "auto" and isolation not in ISOLATION_LEVELS:
    raise ValueError(f"Unknown isolation {isolation!r}; valid: 'auto' or one of "
                     f"{list(ISOLATION_LEVELS)}.")
  candidates = tuple(_candidate_pythons(python))
  key = (isolation, candidates)
  with _MODE_LOCK:
    if key in _MODE_CACHE:
      return _MODE_CACHE[key]
    failures = []
    probe = "import collections, json, math, itertools, re\nprint('sandbox-ok')\n"
    # Strongest isolation first; for each level, the first interpreter that works under it.
    by_level = [[m for p in candidates for m in _modes_to_try(p, isolation) if m.isolation == level]
                for level in ISOLATION_LEVELS]
    for level_modes in by_level:
      for mode in level_modes:
        mode_python = mode.python
        outcome = _run(mode, Limits(timeout_s=20.0), "stdio", probe)
        if outcome.status == OK and outcome.returncode == 0 and b"sandbox-ok" in outcome.stdout:
          _MODE_CACHE[key] = mode
          return mode
        failures.append(f"{mode.isolation} with {mode_python}: status={outcome.status} "
                        f"rc={outcome.returncode} stderr={outcome.stderr[-300:]!r}")
    raise RuntimeError(
        f"No sandbox isolation level {isolation!r} works on this host with the interpreters "
        f"{list(candidates)}. Tried:\n  " + "\n  ".join(failures) + "\nIf the interpreter is "
        "unreadable after the uid drop (e.g. under /root), pass python= an interpreter installed "
        "world-readable (e.g. /usr/bin/python3); or choose a weaker isolation= explicitly.")


def _user_task_count(uid: int) -> int:
  """Tasks (processes + threads) of `uid`, which is what RLIMIT_NPROC counts."""
  count = 0
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/status", "rb") as f:
        uid_ok = threads = None
        for line in f:
          if line.startswith(b"Uid:"):
            uid_ok = int(line.split()[1]) == uid
          elif line.startswith(b"Threads:"):
            threads = int(line.split()[1])
        if uid_ok and threads:
          count += threads
    except (OSError, ValueError, IndexError):
      continue
  return count


def _rlimits(limits: Limits, drop_uid: bool) -> dict[str, tuple[int, int]]:
  cpu = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
  cpu = max(1, int(math.ceil(cpu)))
  nproc = limits.max_processes
  if not drop_uid:
    # RLIMIT_NPROC counts every task of the real uid, not just this run's.
    nproc += _user_task_count(os.getuid())
  mem = limits.memory_mb * 1024 * 1024
  fsize = limits.file_size_mb * 1024 * 1024
  return {
      "RLIMIT_CPU": (cpu, cpu + 1),
      "RLIMIT_AS": (mem, mem),
      "RLIMIT_FSIZE": (fsize, fsize),
      "RLIMIT_NPROC": (nproc, nproc),
      "RLIMIT_NOFILE": (limits.max_open_files, limits.max_open_files),
      "RLIMIT_CORE": (0, 0),
  }


def _remove_tree(path: str) -> None:
  def onerror(func, p, _):
    # A program may leave a directory without permissions; make it removable and retry.
    try:
      os.chmod(os.path.dirname(p), 0o700)
      os.chmod(p, 0o700)
    except OSError:
      pass
    try:
      func(p)
    except OSError:
      pass
  shutil.rmtree(path, onerror=onerror)


def _kill_uid(uid: int, timeout_s: float = 2.0) -> None:
  """SIGKILLs every process of the (per-run, random) sandbox uid until none is left.

  The namespace teardown already kills them; this waits for it, so that no process of a finished
  run outlives `run()` (and catches any that escaped the process group and namespace).
  """
  deadline = time.monotonic() + timeout_s
  while True:
    pids = sandbox_pids_alive(uid, uid + 1)
    if not pids or time.monotonic() > deadline:
      return
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    time.sleep(0.005)


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _run(mode: _Mode, limits: Limits, run_mode: str, program: str, *, test: str = "",
         entry_point: Optional[str] = None, token: Optional[str] = None,
         stdin: Optional[bytes] = None) -> RunOutcome:
  """One sandboxed run. Never raises for anything the program does."""
  start = time.monotonic()
  rundir = tempfile.mkdtemp(prefix="lad_sandbox_")
  proc = None
  uid = gid = None
  try:
    scratch = os.path.join(rundir, "work")
    os.mkdir(scratch, 0o700)
    uid = gid = None
    if mode.drop_uid:
      uid = gid = _UID_BASE + secrets.randbelow(_UID_SPAN)
      os.chown(scratch, uid, gid)
      os.chmod(rundir, 0o711)  # traversable, not listable, by the sandbox uid
    spec = {
        "mode": run_mode, "program": program, "test": test, "entry_point": entry_point,
        "token": token, "cwd": scratch, "uid": uid, "gid": gid,
        "rlimits": _rlimits(limits, mode.drop_uid), "block_network": mode.block_network_hook,
        "block_processes": mode.isolation == "rlimits",
        "private_tmp_mb": limits.file_size_mb * 4 if mode.prefix else None,
    }
    spec_path = os.path.join(rundir, "spec.json")
    fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(spec, f)
    stdin_file = None
    if stdin is not None:
      stdin_path = os.path.join(rundir, "stdin")
      fd = os.open(stdin_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
      with os.fdopen(fd, "wb") as f:
        f.write(stdin)
      stdin_file = open(stdin_path, "rb")  # pylint: disable=consider-using-with
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch,
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }
    cmd = [*mode.prefix, mode.python, "-I", "-B", HARNESS_PATH, spec_path]
    try:
      proc = subprocess.Popen(
          cmd, stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=scratch, env=env,
          start_new_session=True, close_fds=True)
    finally:
      if stdin_file is not None:
        stdin_file.close()
    return _collect(proc, limits, start)
  except Exception as e:  # pylint: disable=broad-except
    return RunOutcome(SANDBOX_ERROR, None, b"", f"{type(e).__name__}: {e}".encode(),
                      time.monotonic() - start)
  finally:
    if proc is not None:
      _kill_group(proc.pid)
      proc.wait()
      for stream in (proc.stdout, proc.stderr):
        if stream is not None:
          stream.close()
    if uid is not None:
      _kill_uid(uid)
    _remove_tree(rundir)


def _collect(proc: subprocess.Popen, limits: Limits, start: float) -> RunOutcome:
  """Reads stdout/stderr until the process exits, the deadline passes or stdout is too long.

  The process is not reaped here (a pidfd, or waitid with WNOWAIT, only observes the exit), so the
  caller can still kill its process group without racing against pid reuse.
  """
  deadline = start + limits.timeout_s
  out = bytearray()
  err = bytearray()
  sel = selectors.DefaultSelector()
  sel.register(proc.stdout, selectors.EVENT_READ, "out")
  sel.register(proc.stderr, selectors.EVENT_READ, "err")
  pidfd = None
  if hasattr(os, "pidfd_open"):
    try:
      pidfd = os.pidfd_open(proc.pid)
      sel.register(pidfd, selectors.EVENT_READ, "exit")
    except OSError:
      pidfd = None
  status = None
  exited = False
  try:
    while True:
      if exited and not sel.get_map():
        status = OK
        break
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        status = OK if exited else TIMEOUT
        break
      # Without a pidfd, poll for the exit every 20 ms.
      events = sel.select(timeout=remaining if pidfd is not None else min(remaining, 0.02))
      for key, _ in events:
        if key.data == "exit":
          exited = True
          sel.unregister(key.fileobj)
          # A background child may hold the pipes open after the program exited: drain briefly.
          deadline = min(deadline, time.monotonic() + 0.5)
          continue
        data = os.read(key.fd, _READ_CHUNK)
        if not data:
          sel.unregister(key.fileobj)
        elif key.data == "out":
          out += data
          if len(out) > limits.max_output_bytes:
            status = OUTPUT_LIMIT
        else:
          err += data
          del err[:-_STDERR_KEEP]
      if status is not None:
        break
      if pidfd is None and not exited:
        exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        if exited:
          deadline = min(deadline, time.monotonic() + 0.5)
  finally:
    sel.close()
    if pidfd is not None:
      os.close(pidfd)
  elapsed = time.monotonic() - start
  returncode = None
  if status == OK:
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is not None:
      returncode = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
  return RunOutcome(status, returncode, bytes(out), bytes(err), elapsed)


class Sandbox:
  """Runs untrusted programs under `limits`. Thread-safe: each `run_*` call is independent.

  Args:
    limits: resource limits of every run.
    isolation: "auto" (strongest that works here) or one of ISOLATION_LEVELS (error if it does
      not work here).
    python: interpreter for the programs; default: the first of the current interpreter,
      /usr/bin/python3, `python3` on PATH that works after the uid drop.
  """

  def __init__(self, *, limits: Limits = Limits(), isolation: str = "auto",
               python: Optional[str] = None):
    self.limits = limits
    self._mode = _resolve_mode(python, isolation)

  @property
  def isolation(self) -> str:
    """The active isolation level (see module docstring)."""
    return self._mode.isolation

  @property
  def python(self) -> str:
    return self._mode.python

  def run_stdio(self, program: str, stdin: bytes = b"") -> RunOutcome:
    """Runs `program` as __main__ with `stdin`; returns its outcome (stdout to compare)."""
    return _run(self._mode, self.limits, "stdio", program, stdin=stdin)

  def run_function_tests(self, program: str, test: str,
                         entry_point: Optional[str]) -> tuple[bool, RunOutcome]:
    """Runs program, then test code, then `check(entry_point)`; True iff all finished cleanly.

    Success is judged by a fresh random token the harness prints only after the tests ran
    without an exception, so printing a fake success line, `sys.exit(0)` or `os._exit(0)` before
    the asserts does not pass. (The token lives in the harness process, so code that deliberately
    introspects the harness's frames could find it; it defeats output forgery and early exits.)
    """
    token = secrets.token_hex(16)
    outcome = _run(self._mode, self.limits, "function", program, test=test,
                   entry_point=entry_point, token=token)
    passed = (outcome.status == OK and outcome.returncode == 0
              and ("\n" + token + "\n").encode() in outcome.stdout)
    return passed, outcome


def sandbox_pids_alive(uid_min: int = _UID_BASE, uid_max: int = _UID_BASE + _UID_SPAN) -> list[int]:
  """Pids of live processes whose real uid is in the sandbox range (for leak checks in tests)."""
  pids = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/status", "rb") as f:
        for line in f:
          if line.startswith(b"Uid:"):
            if uid_min <= int(line.split()[1]) < uid_max:
              pids.append(int(entry))
            break
    except (OSError, ValueError, IndexError):
      continue
  return pids
