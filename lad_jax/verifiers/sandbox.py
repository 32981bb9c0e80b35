"""Runs one untrusted Python program in a sandboxed subprocess and collects its (capped) output.

What is guaranteed depends on what the host allows; `Sandbox.isolation` says which level is active
and `Sandbox.memory_bound` how memory is bounded (both probed once per interpreter, by actually
running a program through the full machinery):

"namespaces+uid" (running as root with util-linux `unshare`; this machine and typical GPU
containers):
  - The child runs in fresh network, PID, IPC and mount namespaces
    (`unshare --net --pid --ipc --fork --kill-child --mount-proc`): no network interface but a down
    loopback, so no connection of any kind; it sees and can signal only its own processes, and when
    the sandbox's init process dies the kernel kills every process left in the namespace; SysV
    shared memory, semaphores and message queues it creates live in its own IPC namespace and are
    destroyed with it (nothing stays pinned on the host).
  - Mount view: the harness pivots into a new root (tmpfs) that holds only /usr, /bin, /lib*,
    /sbin (read-only), the interpreter's standard-library prefix, a few /etc files (ld.so cache,
    passwd, group, localtime, nsswitch.conf), /dev/{null,zero,full,random,urandom}, a fresh /proc,
    size-capped private tmpfs at /tmp, /var/tmp and /dev/shm, and the scratch directory. The host's
    /work, /root, /home, the project, virtual environments (their site-packages ship datasets such
    as HumanEval's) and data directories do not exist in it; the old root is detached.
  - Before the program runs, the harness drops to a random unprivileged uid/gid
    (2e9 + random, no supplementary groups): files are writable only if world-writable (the
    private tmpfs) or owned by that uid (the scratch directory). RLIMIT_NPROC is per uid, so a
    random uid gives each run its own process budget.
"namespaces" (not root, unprivileged user namespaces allowed): as above, inside a user namespace
  (`unshare --user --map-root-user`), but no uid drop: the program keeps uid 0 of the user
  namespace with every capability cleared and SECBIT_NOROOT locked. RLIMIT_NPROC is set to the
  user's current task count plus `max_processes`.
"uid" (root without `unshare`): uid drop and rlimits; sockets blocked by an audit hook only; the
  host file system is visible (readable where permissions allow); SysV objects owned by the run's
  uids are removed after the run.
"rlimits" (neither): rlimits, process-group kill, and audit hooks that refuse sockets, process
  creation and signals. Files are readable and writable as the calling user, SysV objects are not
  cleaned up. Audit hooks are NOT a security boundary (ctypes bypasses them); use this level only
  for trusted-ish code.

Function tests (HumanEval style) at every level: the program runs in one process (the candidate,
its own uid where uids are dropped) and the tests in another (the checker, another uid, made
non-dumpable so that the candidate cannot ptrace it or read its memory). The candidate answers
calls of the entry point with plain data only (exact builtin types: a value whose __eq__ is rigged
is refused), the checker compares builtin values decoded by trusted code, and writes a per-run
token on a pipe that only it holds; the program never sees the tests, the token or that pipe, and
cannot patch the checker's builtins. stdin reads raise in the candidate, as in HumanEval. Where
there is no uid drop ("namespaces", "rlimits") the checker shares the program's uid and is
protected by being non-dumpable (and, in a user namespace, by the program's cleared capabilities).

Memory (`memory_bound`): "cgroup2" / "cgroup1": each run gets a memory cgroup, a child of the
caller's own cgroup, limited to `memory_mb` + 64 MiB (headroom for the harness's own processes,
so that one process meets its RLIMIT_AS MemoryError first), swap off; it bounds the whole process
tree, the private tmpfs files and IPC objects included; the kernel OOM-kills inside it when it is
exceeded. "rlimit": no writable memory cgroup (cgroup v2 needs the memory controller delegated to
the caller's cgroup; v1 a writable memory hierarchy): only RLIMIT_AS per process, so the tree can
use up to `max_processes` x `memory_mb`.

Always:
  - rlimits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE),
    processes/threads (RLIMIT_NPROC), open files (RLIMIT_NOFILE), no core dumps.
  - a wall-clock deadline, after which the whole process group (start_new_session=True) is
    SIGKILLed; the process group, the run's uids and its cgroup are killed after every run.
  - stdout is read up to `max_output_bytes` (then the run is killed: "output_limit"); only the last
    8 KiB of stderr are kept.
  - cwd and HOME/TMPDIR are a fresh scratch directory, removed afterwards; the environment is
    replaced by a minimal one (PATH, HOME, TMPDIR, LANG, single-threaded BLAS); the interpreter
    runs in isolated mode (-I: no PYTHON* variables, no user site-packages).

Not guaranteed: at the "uid" and "rlimits" levels, files the program creates in world-writable
directories outside its scratch directory are not cleaned up (each is capped by RLIMIT_FSIZE); a
fork bomb can use `max_processes` processes' worth of CPU until the deadline (no CPU cgroup).
"""

from __future__ import annotations

import dataclasses
import functools
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
_UNSHARE_FLAGS = ("--net", "--pid", "--ipc", "--fork", "--kill-child", "--mount-proc")
_UID_BASE = 2_000_000_000  # far above login users and typical subuid ranges
_UID_SPAN = 100_000_000
_STDERR_KEEP = 8192
_CGROUP_HEADROOM_MB = 64
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
    memory_mb: address-space limit per process (RLIMIT_AS), MiB; with a memory cgroup also the
      bound of the whole process tree (+ 64 MiB for the harness), see `Sandbox.memory_bound`.
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
    verdict: what the function-test checker wrote on its private verdict pipe (b"" otherwise).
  """

  status: str
  returncode: Optional[int]
  stdout: bytes
  stderr: bytes
  elapsed_s: float
  verdict: bytes = b""


@dataclasses.dataclass(frozen=True)
class _CgroupParent:
  """The caller's own memory cgroup, under which each run gets a child (version 1 or 2)."""

  version: int
  path: str


@dataclasses.dataclass(frozen=True)
class _Mode:
  isolation: str
  prefix: tuple[str, ...]
  drop_uid: bool
  block_network_hook: bool
  python: str
  cgroup: Optional[_CgroupParent] = None


_MODE_CACHE: dict[tuple[str, tuple[str, ...]], _Mode] = {}
_MODE_LOCK = threading.Lock()


def _candidate_pythons(python: Optional[str]) -> list[str]:
  if python is not None:
    return [python]
  found = []
  # A system interpreter first: it starts faster than a virtual environment's, whose packages the
  # mount view hides anyway. After the uid drop the interpreter must still be able to read its
  # standard library: without the mount view, pyenv or venvs under /root (mode 0700) cannot.
  for p in ("/usr/bin/python3", sys.executable, shutil.which("python3")):
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
  if isolation != "auto":
    modes = [m for m in modes if m.isolation == isolation]
  cgroup = _memory_cgroup_parent()
  if cgroup is None:
    return modes
  # Each level with the whole-tree memory bound first, then without it.
  return [v for m in modes for v in (dataclasses.replace(m, cgroup=cgroup), m)]


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
    check = {"test": "def check(f):\n  assert f(2) == 4\n", "prompt": "", "entry_point": "f",
             "token": "t" * 32}
    # Strongest isolation first; for each level, the first interpreter that works under it.
    by_level = [[m for p in candidates for m in _modes_to_try(p, isolation) if m.isolation == level]
                for level in ISOLATION_LEVELS]
    for level_modes in by_level:
      for mode in level_modes:
        mode_python = mode.python
        outcome = _run(mode, Limits(timeout_s=20.0), "stdio", probe)
        if outcome.status == OK and outcome.returncode == 0 and b"sandbox-ok" in outcome.stdout:
          # Function mode too (two processes, two uids, the verdict pipe).
          outcome = _run(mode, Limits(timeout_s=20.0), "function", "def f(x):\n  return x * x\n",
                         check=check)
        if outcome.status == OK and outcome.verdict == b"t" * 32:
          _MODE_CACHE[key] = mode
          return mode
        failures.append(f"{mode.isolation} with {mode_python} (memory cgroup: "
                        f"{mode.cgroup is not None}): status={outcome.status} "
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


def _kill_uid(uid: int, uid_end: int, timeout_s: float = 2.0) -> None:
  """SIGKILLs every process of the (per-run, random) sandbox uids [uid, uid_end) until none is left.

  The namespace teardown already kills them; this waits for it, so that no process of a finished
  run outlives `run()` (and catches any that escaped the process group and namespace).
  """
  deadline = time.monotonic() + timeout_s
  while True:
    pids = sandbox_pids_alive(uid, uid_end)
    if not pids or time.monotonic() > deadline:
      return
    _sigkill(pids)
    time.sleep(0.005)


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _cgroup_dir(cg_path: str, want_v2: bool) -> Optional[str]:
  """Host directory of cgroup `cg_path` in the memory hierarchy (v2, or v1's memory one)."""
  with open("/proc/self/mountinfo", encoding="utf-8") as f:
    for line in f:
      pre, _, post = line.partition(" - ")
      fields, post_fields = pre.split(), post.split()
      if len(fields) < 5 or len(post_fields) < 3:
        continue
      fstype, options = post_fields[0], post_fields[2].split(",")
      if (fstype == "cgroup2") if want_v2 else (fstype == "cgroup" and "memory" in options):
        root, mount_point = fields[3], fields[4]
        rel = cg_path[len(root):] if cg_path.startswith(root) and root != "/" else cg_path
        return mount_point + rel.rstrip("/")
  return None


def _writable_memory_cgroup(version: int, path: str) -> bool:
  """Whether child cgroups with a memory limit can be made under `path` (tries one)."""
  if version == 2:
    with open(os.path.join(path, "cgroup.controllers"), encoding="utf-8") as f:
      if "memory" not in f.read().split():
        return False
    with open(os.path.join(path, "cgroup.subtree_control"), encoding="utf-8") as f:
      enabled = "memory" in f.read().split()
    if not enabled:
      _write_file(os.path.join(path, "cgroup.subtree_control"), "+memory")
  probe = _make_cgroup(_CgroupParent(version, path), 64 << 20)
  os.rmdir(probe)
  return True


@functools.lru_cache(maxsize=1)
def _memory_cgroup_parent() -> Optional[_CgroupParent]:
  """The caller's memory cgroup if runs can get child cgroups there (v2 preferred), else None."""
  try:
    with open("/proc/self/cgroup", encoding="utf-8") as f:
      lines = [line.rstrip("\n").split(":", 2) for line in f]
  except OSError:
    return None
  for version in (2, 1):
    for parts in lines:
      if len(parts) != 3 or (version == 2) != (parts[0] == "0" and parts[1] == ""):
        continue
      if version == 1 and "memory" not in parts[1].split(","):
        continue
      try:
        path = _cgroup_dir(parts[2], version == 2)
        if path and _writable_memory_cgroup(version, path):
          _remove_stale_cgroups(path)
          return _CgroupParent(version, path)
      except OSError:
        continue
  return None


def _remove_stale_cgroups(parent: str) -> None:
  """Removes run cgroups left by a process that died mid-run (empty ones only; best effort)."""
  for name in os.listdir(parent):
    pid = name.split("_")[2] if name.startswith("lad_sandbox_") and name.count("_") >= 3 else ""
    if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
      try:
        os.rmdir(os.path.join(parent, name))
      except OSError:
        pass


def _write_file(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def _make_cgroup(parent: _CgroupParent, limit_bytes: int) -> str:
  """A fresh child memory cgroup limited to `limit_bytes`, swap off; returns its directory."""
  path = os.path.join(parent.path, f"lad_sandbox_{os.getpid()}_{secrets.token_hex(6)}")
  os.mkdir(path)
  try:
    if parent.version == 2:
      _write_file(os.path.join(path, "memory.max"), str(limit_bytes))
      optional = [("memory.swap.max", "0")]
    else:
      _write_file(os.path.join(path, "memory.limit_in_bytes"), str(limit_bytes))
      optional = [("memory.memsw.limit_in_bytes", str(limit_bytes))]
    for name, value in optional:  # absent without swap accounting
      try:
        _write_file(os.path.join(path, name), value)
      except OSError:
        pass
  except BaseException:
    os.rmdir(path)
    raise
  return path


def _remove_cgroup(path: str, timeout_s: float = 2.0) -> None:
  """Kills whatever is left in the run's cgroup (escapees included) and removes it."""
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      os.rmdir(path)
      return
    except FileNotFoundError:
      return
    except OSError:
      if time.monotonic() > deadline:
        return
    try:
      with open(os.path.join(path, "cgroup.procs"), encoding="utf-8") as f:
        pids = [int(p) for p in f.read().split()]
    except OSError:
      pids = []
    _sigkill(pids)
    time.sleep(0.002)


_SYSV_KINDS = (("shm", "shmid", "shmctl"), ("msg", "msqid", "msgctl"), ("sem", "semid", "semctl"))


def _remove_sysv_objects(uid_min: int, uid_max: int) -> None:
  """Removes SysV shared memory, queues and semaphores owned or created by uids in the range.

  Used where the run had no IPC namespace of its own (which would have destroyed them)."""
  import ctypes  # pylint: disable=g-import-not-at-top
  libc = ctypes.CDLL(None, use_errno=True)
  for kind, id_col, ctl in _SYSV_KINDS:
    try:
      with open(f"/proc/sysvipc/{kind}", encoding="utf-8") as f:
        header, *rows = [line.split() for line in f]
    except (OSError, ValueError):
      continue
    cols = {name: k for k, name in enumerate(header)}
    for row in rows:
      try:
        uids = (int(row[cols["uid"]]), int(row[cols["cuid"]]))
        ident = int(row[cols[id_col]])
      except (KeyError, IndexError, ValueError):
        continue
      if any(uid_min <= u < uid_max for u in uids):
        if kind == "sem":
          libc.semctl(ident, 0, 0)  # IPC_RMID
        else:
          getattr(libc, ctl)(ident, 0, None)


def _write_private(path: str, data: bytes) -> None:
  """Writes a file only its owner (root, or the calling user) can read."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  with os.fdopen(fd, "wb") as f:
    f.write(data)


def _read_verdict(fd: int) -> bytes:
  os.set_blocking(fd, False)
  try:
    return os.read(fd, 4096)
  except BlockingIOError:
    return b""


def _spec(mode: _Mode, limits: Limits, run_mode: str, program: str, rundir: str, scratch: str,
          uid: Optional[int]) -> dict:
  """The harness's spec: no tests and no token (those go to the check file, function mode)."""
  return {
      "mode": run_mode, "program": program, "cwd": scratch, "uid": uid, "gid": uid,
      "checker_uid": None if uid is None else uid + 1,
      "rlimits": _rlimits(limits, mode.drop_uid), "block_network": mode.block_network_hook,
      "block_processes": mode.isolation == "rlimits",
      "private_tmp_mb": limits.file_size_mb * 4,
      "view_root": os.path.join(rundir, "root") if mode.prefix else None,
  }


def _run(mode: _Mode, limits: Limits, run_mode: str, program: str, *,
         check: Optional[dict] = None, stdin: Optional[bytes] = None) -> RunOutcome:
  """One sandboxed run (`check`: tests, prompt, entry point, token; function mode only).

  Never raises for anything the program does."""
  start = time.monotonic()
  rundir = tempfile.mkdtemp(prefix="lad_sandbox_")
  proc = cgroup = verdict_r = verdict_w = None
  uid = None
  try:
    scratch = os.path.join(rundir, "work")
    os.mkdir(scratch, 0o700)
    if mode.drop_uid:
      uid = _UID_BASE + 2 * secrets.randbelow(_UID_SPAN // 2)  # uid: program, uid + 1: checker
      os.chown(scratch, uid, uid)
      os.chmod(rundir, 0o711)  # traversable, not listable, by the sandbox uids
    spec = _spec(mode, limits, run_mode, program, rundir, scratch, uid)
    if spec["view_root"]:
      os.mkdir(spec["view_root"], 0o755)
    if check is not None:
      verdict_r, verdict_w = os.pipe()
      spec["check_path"] = os.path.join(rundir, "check.json")
      spec["verdict_fd"] = verdict_w
      spec["entry_point"] = check["entry_point"]
      _write_private(spec["check_path"], json.dumps(check).encode())
    if mode.cgroup is not None:
      cgroup = _make_cgroup(mode.cgroup, (limits.memory_mb + _CGROUP_HEADROOM_MB) << 20)
      spec["cgroup_procs"] = os.path.join(cgroup, "cgroup.procs")
    spec_path = os.path.join(rundir, "spec.json")
    _write_private(spec_path, json.dumps(spec).encode())
    try:
      proc = _launch(mode, rundir, spec_path, scratch, stdin, verdict_w)
    finally:
      if verdict_w is not None:
        os.close(verdict_w)
        verdict_w = None
    outcome = _collect(proc, limits, start)
    if verdict_r is not None:
      outcome = dataclasses.replace(outcome, verdict=_read_verdict(verdict_r))
    return outcome
  except Exception as e:  # pylint: disable=broad-except
    return RunOutcome(SANDBOX_ERROR, None, b"", f"{type(e).__name__}: {e}".encode(),
                      time.monotonic() - start)
  finally:
    _cleanup(proc, uid, cgroup, mode, rundir, (verdict_r, verdict_w))


def _launch(mode: _Mode, rundir: str, spec_path: str, scratch: str, stdin: Optional[bytes],
            verdict_w: Optional[int]) -> subprocess.Popen:
  """Starts the harness in its own session with a minimal environment."""
  stdin_file = None
  if stdin is not None:
    stdin_path = os.path.join(rundir, "stdin")
    _write_private(stdin_path, stdin)
    stdin_file = open(stdin_path, "rb")  # pylint: disable=consider-using-with
  env = {
      "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch,
      "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
      "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
  }
  cmd = [*mode.prefix, mode.python, "-I", "-B", HARNESS_PATH, spec_path]
  try:
    return subprocess.Popen(
        cmd, stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=scratch, env=env,
        start_new_session=True, close_fds=True,
        pass_fds=(verdict_w,) if verdict_w is not None else ())
  finally:
    if stdin_file is not None:
      stdin_file.close()


def _cleanup(proc: Optional[subprocess.Popen], uid: Optional[int], cgroup: Optional[str],
             mode: _Mode, rundir: str, fds: tuple[Optional[int], ...]) -> None:
  """Leaves nothing of the run on the host: processes, cgroup, SysV objects, files, fds."""
  if proc is not None:
    _kill_group(proc.pid)
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
      if stream is not None:
        stream.close()
  if uid is not None:
    _kill_uid(uid, uid + 2)
  if cgroup is not None:
    _remove_cgroup(cgroup)
  if uid is not None and "--ipc" not in mode.prefix:
    _remove_sysv_objects(uid, uid + 2)
  _remove_tree(rundir)
  for fd in fds:
    if fd is not None:
      os.close(fd)


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
    python: interpreter for the programs; default: the first of /usr/bin/python3, the current
      interpreter, `python3` on PATH that works at the chosen level.
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

  @property
  def memory_bound(self) -> str:
    """"cgroup2" / "cgroup1" (the whole process tree is bounded) or "rlimit" (per process only)."""
    return f"cgroup{self._mode.cgroup.version}" if self._mode.cgroup is not None else "rlimit"

  def run_function_tests(self, program: str, test: str, entry_point: str,
                         prompt: str = "") -> tuple[bool, RunOutcome]:
    """Runs `program` in one process and `check(entry_point)` of `test` in another; True iff
    `check` returned.

    `prompt` (trusted, e.g. HumanEval's prompt) is run before `test` in the checker, so tests can
    use the prompt's helpers (`poly`, `encode_cyclic`) from the dataset rather than from the
    candidate. The verdict is a fresh random token the checker writes on a pipe the program never
    holds, so printing a fake success line, exiting early, patching builtins or reading the
    harness's frames does not pass; results are compared as plain builtin data (see module
    docstring).
    """
    if not entry_point or not isinstance(entry_point, str):
      raise ValueError(f"run_function_tests needs the entry point's name, got {entry_point!r}.")
    token = secrets.token_hex(16)
    check = {"test": test, "prompt": prompt, "entry_point": entry_point, "token": token}
    outcome = _run(self._mode, self.limits, "function", program, check=check)
    passed = (outcome.status == OK and outcome.returncode == 0
              and outcome.verdict == token.encode())
    return passed, outcome


def _sigkill(pids) -> None:
  """SIGKILL each pid; one that already exited (or is not ours to signal) is skipped."""
  for pid in pids:
    try:
      os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass


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
