"""In-sandbox harness: applies limits, builds the mount view, drops privileges, runs one program.

Executed by path (`python -I sandbox_harness.py SPEC`) by `sandbox.py`, possibly with an
interpreter other than the trainer's, so it imports only the standard library and keeps to
Python 3.8 syntax. It never imports lad_jax.

Order matters:
  1. read the JSON spec (root-only file, no secrets in it) and unlink it; in function mode open the
     separate root-only check file (tests, token) and unlink it, without reading it yet;
  2. join the per-run memory cgroup, if the spec names one (the whole process tree is then bounded);
  3. (in a fresh PID namespace) fork a minimal init that reaps and forwards the exit status;
     (in a fresh mount namespace) pivot into a new root that holds only the interpreter, /usr,
     a few /etc files, minimal /dev, fresh /proc, private tmpfs /tmp and the scratch directory;
  4. set rlimits, drop supplementary groups, gid, uid; optional audit hooks (see sandbox.py);
  5. "stdio" mode runs the program as __main__. "function" mode forks: the child (the candidate,
     its own uid) runs the program and then answers calls of `entry_point` over pipes, arguments
     and results encoded as plain data (exact builtin types only); the parent (the checker,
     another uid, never runs candidate code) reads the tests, runs the trusted prompt and the tests
     in a fresh interpreter state, with `candidate` a proxy that decodes the results into plain
     builtin values, and writes the per-run token to the verdict fd, which the candidate never
     holds, only if `check(candidate)` returned.
"""

import json
import os
import resource
import sys


_PROCESS_EVENTS = ("os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
                   "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg")
_MAX_DEPTH = 200
_MAX_MESSAGE = 64 << 20
_SEQ_TAGS = {list: "l", tuple: "t", set: "s", frozenset: "z"}
_SEQ_TYPES = {"l": list, "t": tuple, "s": set, "z": frozenset}


# -- plain data across the process boundary ------------------------------------------------------


def encode_plain(x, depth=0):
  """JSON-able encoding of a value made only of exact builtin data types; TypeError otherwise.

  Subclasses (an int whose __eq__ always returns True) and arbitrary objects are refused, so
  what crosses the boundary is data, never behaviour."""
  if depth > _MAX_DEPTH:
    raise ValueError("value nested deeper than %d levels" % _MAX_DEPTH)
  t = type(x)
  if x is None or t is bool or t is str:
    return x
  if t is int:
    return ["i", format(x, "x")]  # hex: no int/str digit limit
  if t is float:
    return ["f", repr(x)]
  if t is complex:
    return ["c", repr(x.real), repr(x.imag)]
  if t is bytes:
    return ["b", x.hex()]
  if t in _SEQ_TAGS:
    return [_SEQ_TAGS[t], [encode_plain(v, depth + 1) for v in x]]
  if t is dict:
    return ["d", [[encode_plain(k, depth + 1), encode_plain(v, depth + 1)] for k, v in x.items()]]
  raise TypeError("not plain data (only None, bool, int, float, complex, str, bytes, list, tuple, "
                  "set, frozenset, dict): got %s" % t.__name__)


def decode_plain(x, depth=0):
  """Inverse of `encode_plain`; builds only builtin values, so comparing them runs trusted code."""
  if depth > _MAX_DEPTH:
    raise ValueError("value nested deeper than %d levels" % _MAX_DEPTH)
  if x is None or type(x) is bool or type(x) is str:
    return x
  if type(x) is not list or len(x) not in (2, 3) or type(x[0]) is not str:
    raise ValueError("malformed plain-data encoding")
  tag, rest = x[0], x[1:]
  if any(type(r) is not (list if tag in _SEQ_TYPES or tag == "d" else str) for r in rest):
    raise ValueError("malformed plain-data encoding")
  if tag == "i":
    return int(rest[0], 16)
  if tag == "f":
    return float(rest[0])
  if tag == "c" and len(rest) == 2:
    return complex(float(rest[0]), float(rest[1]))
  if tag == "b":
    return bytes.fromhex(rest[0])
  if tag in _SEQ_TYPES:
    return _SEQ_TYPES[tag](decode_plain(v, depth + 1) for v in rest[0])
  if tag == "d":
    return {decode_plain(kv[0], depth + 1): decode_plain(kv[1], depth + 1)
            for kv in rest[0] if type(kv) is list and len(kv) == 2}
  raise ValueError("malformed plain-data encoding")


def _send(fd, obj):
  data = json.dumps(obj).encode()
  data = len(data).to_bytes(4, "big") + data
  while data:
    data = data[os.write(fd, data):]


def _read_exact(fd, n):
  chunks = []
  while n:
    chunk = os.read(fd, min(n, 1 << 20))
    if not chunk:
      return None
    chunks.append(chunk)
    n -= len(chunk)
  return b"".join(chunks)


def _recv(fd):
  """One length-prefixed JSON message, or None at end of file."""
  head = _read_exact(fd, 4)
  if head is None:
    return None
  n = int.from_bytes(head, "big")
  if n > _MAX_MESSAGE:
    raise ValueError("message of %d bytes is over the %d limit" % (n, _MAX_MESSAGE))
  body = _read_exact(fd, n)
  return None if body is None else json.loads(body)


# -- hooks, init -------------------------------------------------------------------------------


def _block_network_hook(event, args):
  if event.startswith("socket.") and event not in ("socket.gethostname", "socket.sethostname"):
    raise PermissionError("network access is disabled in the sandbox (" + event + ")")


def _block_processes_hook(event, args):
  # Without a per-run uid (and as root, which ignores RLIMIT_NPROC) nothing else caps a fork bomb,
  # and without a PID namespace the program could signal its parent.
  if event in _PROCESS_EVENTS:
    raise PermissionError(
        "creating or signalling processes is disabled in the sandbox (" + event + ")")


def _exit_code(status):
  if os.WIFEXITED(status):
    return os.WEXITSTATUS(status)
  if os.WIFSIGNALED(status):
    return 128 + os.WTERMSIG(status)
  return 1


def _become_init_if_pid1(private_fds):
  """In a fresh PID namespace we are pid 1, which ignores default-action signals (even SIGKILL
  sent from inside) and must reap orphans. So pid 1 stays a small root-owned init that reaps and
  exits with the runner's status (its exit makes the kernel kill whatever is left), and the
  runner continues in its child, with normal signal semantics. The init closes `private_fds`
  (check file, verdict pipe), so that no /proc/1/fd entry leads to them."""
  if os.getpid() != 1:
    return
  child = os.fork()
  if child == 0:
    return
  for fd in private_fds:
    os.close(fd)
  while True:
    try:
      pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
      os._exit(1)
    except InterruptedError:
      continue
    if pid == child:
      os._exit(_exit_code(status))


# -- mount view --------------------------------------------------------------------------------

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC = 32, 4096, 16384
_PIVOT_ROOT_SYSCALL = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}
_VIEW_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_VIEW_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
             "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/alternatives")
_VIEW_DEV = ("null", "zero", "full", "random", "urandom")


class _Mounter(object):
  """mount(2) / umount2(2) / pivot_root(2) through libc; raises OSError on failure."""

  def __init__(self):
    import ctypes  # pylint: disable=g-import-not-at-top
    self.ctypes = ctypes
    self.libc = ctypes.CDLL(None, use_errno=True)

  def _check(self, rc, what):
    if rc != 0:
      err = self.ctypes.get_errno()
      raise OSError(err, what + ": " + os.strerror(err))

  def mount(self, source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s else None
    self._check(self.libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
                "mount " + target)

  def bind(self, source, target, read_only):
    self.mount(source, target, None, _MS_BIND | _MS_REC)
    if read_only:
      try:  # best effort: flags locked by a user namespace cannot always be changed
        self.mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID)
      except OSError:
        pass

  def pivot(self, new_root):
    """Makes new_root the root and detaches the old one; chroot where pivot_root is unknown."""
    os.chdir(new_root)
    nr = _PIVOT_ROOT_SYSCALL.get(os.uname().machine)
    if nr is None:
      os.chroot(".")
    else:
      self._check(self.libc.syscall(nr, b".", b"."), "pivot_root")
      self._check(self.libc.umount2(b".", 2), "umount old root")  # MNT_DETACH
      os.chroot(".")
    os.chdir("/")


def _mirror(m, root, path, read_only=True):
  """Makes host `path` visible at the same place under `root` (symlinks stay symlinks)."""
  if not os.path.lexists(path):
    return
  target = root + path
  parent = os.path.dirname(target)
  if not os.path.isdir(parent):
    os.makedirs(parent)
  if os.path.islink(path):
    if not os.path.lexists(target):
      os.symlink(os.readlink(path), target)
    return
  if os.path.isdir(path):
    if not os.path.isdir(target):
      os.makedirs(target)
  elif not os.path.exists(target):
    open(target, "w").close()
  m.bind(path, target, read_only)


def _interpreter_dirs():
  """Prefixes the running interpreter loads its standard library from (not a venv's packages)."""
  dirs = []
  for p in (sys.base_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable))):
    p = os.path.realpath(p)
    if p != "/" and not any(p == d or p.startswith(d + "/") for d in _VIEW_DIRS + tuple(dirs)):
      dirs.append(p)
  return dirs


def _make_view(spec):
  """Builds the new root (tmpfs) with only what the interpreter needs, then pivots into it."""
  m = _Mounter()
  root = spec["view_root"]
  tmp_opts = "size=%dm,mode=1777" % spec["private_tmp_mb"]
  m.mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")
  for path in _VIEW_DIRS + tuple(_interpreter_dirs()) + _VIEW_ETC:
    _mirror(m, root, path)
  for d in ("/tmp", "/var/tmp", "/dev/shm"):
    os.makedirs(root + d)
    m.mount("tmpfs", root + d, "tmpfs", _MS_NOSUID | _MS_NODEV, tmp_opts)
  for name in _VIEW_DEV:
    _mirror(m, root, "/dev/" + name, read_only=False)
  for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                       ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
    os.symlink(target, root + "/dev/" + name)
  os.makedirs(root + "/proc")
  m.mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
  _mirror(m, root, spec["cwd"], read_only=False)
  m.pivot(root)


# -- privileges, stdin -------------------------------------------------------------------------


def _set_rlimits(spec):
  for name, (soft, hard) in spec["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))


def _drop_privileges(uid, gid):
  if gid is not None:
    os.setgroups([])
    os.setgid(gid)
  if uid is not None:
    os.setuid(uid)
    if os.getuid() == 0 or os.geteuid() == 0:
      os.write(2, b"sandbox: failed to drop root privileges\n")
      os._exit(125)


def _set_non_dumpable():
  """PR_SET_DUMPABLE 0: other processes of the same uid cannot ptrace this one or open its
  /proc/<pid>/mem and fd entries (the defence of the checker where there is no uid drop)."""
  import ctypes  # pylint: disable=g-import-not-at-top
  ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)


def _drop_capabilities():
  """Where the program keeps uid 0 (in a user namespace, or a forced weak level as root): lock
  out root's implicit capabilities (SECBIT_NOROOT, locked) and clear all capability sets, so it
  cannot ptrace the non-dumpable checker or override file permissions. Best effort."""
  import ctypes  # pylint: disable=g-import-not-at-top
  libc = ctypes.CDLL(None, use_errno=True)
  libc.prctl(28, 3, 0, 0, 0)  # PR_SET_SECUREBITS: SECBIT_NOROOT | SECBIT_NOROOT_LOCKED
  libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
  header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
  data = (ctypes.c_uint32 * 6)()
  libc.capset(header, data)


class _UnreadableStdin(object):
  """sys.stdin in function mode: reads raise, as in HumanEval's harness (and fd 0 is write-only)."""

  def _refuse(self, *args, **kwargs):
    raise OSError("stdin is not readable in function tests")

  read = readline = readlines = fileno = __iter__ = __next__ = _refuse
  buffer = property(_refuse)

  def isatty(self):
    return False


def _close_stdin():
  fd = os.open("/dev/null", os.O_WRONLY)
  os.dup2(fd, 0)
  os.close(fd)
  sys.stdin = sys.__stdin__ = _UnreadableStdin()


def _enter_program_state(spec, uid):
  """Common last steps before untrusted code: privileges, cwd, audit hooks, argv, sys.path."""
  _drop_privileges(uid, spec.get("gid") if uid is not None else None)
  if uid is None:
    _drop_capabilities()
  os.chdir(spec["cwd"])
  if spec.get("block_network"):
    sys.addaudithook(_block_network_hook)
  if spec.get("block_processes"):
    sys.addaudithook(_block_processes_hook)
  sys.argv = ["solution.py"]
  sys.path.insert(0, spec["cwd"])


# -- modes -------------------------------------------------------------------------------------


def _run_stdio(spec):
  program = spec.pop("program")
  _enter_program_state(spec, spec.get("uid"))
  del spec
  namespace = {"__name__": "__main__", "__builtins__": __builtins__}
  exec(compile(program, "solution.py", "exec"), namespace)  # pylint: disable=exec-used


def _serve_candidate(spec, call_r, reply_w):
  """Candidate process: runs the program, then answers calls until the checker hangs up."""
  program, entry_point = spec.pop("program"), spec["entry_point"]
  _close_stdin()
  _enter_program_state(spec, spec.get("uid"))
  del spec
  try:
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(program, "solution.py", "exec"), namespace)  # pylint: disable=exec-used
    fn = namespace[entry_point]
  except BaseException:  # pylint: disable=broad-except
    import traceback  # pylint: disable=g-import-not-at-top
    _send(reply_w, ["err", traceback.format_exc(limit=5)[-4000:]])
    return
  _send(reply_w, ["ready"])
  while True:
    msg = _recv(call_r)
    if msg is None:
      return
    try:
      result = fn(*decode_plain(msg[0]), **decode_plain(msg[1]))
      reply = ["ok", encode_plain(result)]
    except BaseException as e:  # pylint: disable=broad-except
      reply = ["err", "%s: %s" % (type(e).__name__, str(e)[:2000])]
    _send(reply_w, reply)


class CandidateError(Exception):
  """The candidate raised, returned something that is not plain data, or died."""


class _Candidate(object):
  """The checker's stand-in for the candidate function: each call crosses the process boundary
  as plain data, and what comes back is decoded into builtin values."""

  def __init__(self, call_w, reply_r, pid):
    self._call_w, self._reply_r, self._pid = call_w, reply_r, pid

  def _reply(self):
    try:
      msg = _recv(self._reply_r)
    except (OSError, ValueError) as e:
      raise CandidateError("unreadable reply from the candidate: %s" % e)
    if msg is None:
      raise CandidateError("the candidate process died (%s)" % self._death())
    if type(msg) is not list or not msg or msg[0] not in ("ok", "err", "ready"):
      raise CandidateError("malformed reply from the candidate")
    if msg[0] == "err":
      raise CandidateError(str(msg[1] if len(msg) > 1 else "")[:4000])
    return msg

  def _death(self):
    try:
      _, status = os.waitpid(self._pid, 0)
    except OSError:
      return "status unknown"
    if os.WIFSIGNALED(status):
      return "killed by signal %d; 9 is also the memory limit" % os.WTERMSIG(status)
    return "exit status %d" % _exit_code(status)

  def wait_ready(self):
    if self._reply() != ["ready"]:
      raise CandidateError("malformed reply from the candidate")

  def __call__(self, *args, **kwargs):
    try:
      _send(self._call_w, [encode_plain(list(args)), encode_plain(kwargs)])
    except BrokenPipeError:
      raise CandidateError("the candidate process died (%s)" % self._death())
    msg = self._reply()
    if msg[0] != "ok" or len(msg) != 2:
      raise CandidateError("malformed reply from the candidate")
    return decode_plain(msg[1])


def _flush_stdio():
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except BaseException:  # pylint: disable=broad-except
      pass


def _check(check, candidate):
  """Runs the trusted prompt (helpers such as HumanEval's `poly`) and tests in a fresh namespace;
  returns only if `check(candidate)` returned."""
  import builtins  # pylint: disable=g-import-not-at-top
  namespace = {"__name__": "__main__", "__builtins__": builtins}
  prompt = check.get("prompt") or ""
  # A prompt may end with a bare signature (no docstring): give it a body.
  for source in (prompt, prompt.rstrip() + "\n    pass\n") if prompt.strip() else ():
    try:
      exec(compile(source, "prompt.py", "exec"), namespace)  # pylint: disable=exec-used
      break
    except Exception:  # pylint: disable=broad-except
      namespace = {"__name__": "__main__", "__builtins__": builtins}
  namespace[check["entry_point"]] = candidate
  exec(compile(check["test"], "tests.py", "exec"), namespace)  # pylint: disable=exec-used
  candidate.wait_ready()
  namespace["check"](candidate)


def _run_function(spec, check_fd):
  """Forks the candidate (program) and stays the checker (tests); see the module docstring."""
  call_r, call_w = os.pipe()
  reply_r, reply_w = os.pipe()
  verdict_fd = spec["verdict_fd"]
  pid = os.fork()
  if pid == 0:
    for fd in (check_fd, verdict_fd, call_w, reply_r):
      os.close(fd)
    try:
      _serve_candidate(spec, call_r, reply_w)
    finally:
      _flush_stdio()
      os._exit(0)
  for fd in (call_r, reply_w):
    os.close(fd)
  with os.fdopen(check_fd, "r", encoding="utf-8") as f:
    check = json.load(f)
  token = check.pop("token").encode()
  checker_uid = spec.get("checker_uid")
  _drop_privileges(checker_uid, checker_uid)
  os.chdir("/")
  del spec
  try:
    _check(check, _Candidate(call_w, reply_r, pid))
    os.write(verdict_fd, token)
  finally:
    os.close(call_w)
    _reap(pid)


def _reap(pid, timeout_s=0.2):
  """Waits briefly for the candidate, which exits when the call pipe closes: without a PID
  namespace an orphan would otherwise linger as a zombie of the host's init."""
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    try:
      if os.waitpid(pid, os.WNOHANG)[0]:
        return
    except ChildProcessError:
      return
    time.sleep(0.001)


def main():
  # Bind what the harness needs before the program can monkeypatch os / sys.
  _write = os.write
  _exit = os._exit
  spec_path = sys.argv[1]
  with open(spec_path, "r", encoding="utf-8") as f:
    spec = json.load(f)
  os.unlink(spec_path)
  check_fd = None
  if spec.get("check_path"):
    check_fd = os.open(spec["check_path"], os.O_RDONLY)
    os.unlink(spec["check_path"])
  try:
    if spec.get("cgroup_procs"):
      with open(spec["cgroup_procs"], "w") as f:
        f.write("0")
    _set_rlimits(spec)
    _set_non_dumpable()
    _become_init_if_pid1([fd for fd in (check_fd, spec.get("verdict_fd")) if fd is not None])
    if spec.get("view_root"):
      _make_view(spec)
  except OSError as e:
    _write(2, ("sandbox: cannot set up the sandbox: %s\n" % e).encode())
    _exit(125)
  if spec["mode"] == "stdio":
    _run_stdio(spec)
    return
  ok = False
  try:
    _run_function(spec, check_fd)
    ok = True
  except BaseException:  # pylint: disable=broad-except
    try:
      import traceback  # pylint: disable=g-import-not-at-top
      sys.stderr.write(traceback.format_exc(limit=5))
      sys.stderr.flush()
    except BaseException:  # pylint: disable=broad-except
      pass
  _exit(0 if ok else 1)


if __name__ == "__main__":
  main()
