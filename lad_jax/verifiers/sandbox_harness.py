"""In-sandbox harness: applies limits, drops privileges, then runs one untrusted program.

Executed by path (`python -I sandbox_harness.py SPEC`) by `sandbox.py`, possibly with an
interpreter other than the trainer's, so it imports only the standard library and keeps to
Python 3.8 syntax. It never imports lad_jax.

Order matters:
  1. read the JSON spec (root-only file) and unlink it, so the program cannot read the tests' token;
  2. (in a fresh PID namespace) fork a minimal init that reaps and forwards the exit status;
     (in a fresh mount namespace) mount private tmpfs over /tmp, /var/tmp, ...;
  3. set rlimits (while still allowed to), drop supplementary groups, gid, uid;
  4. optionally install audit hooks that refuse sockets (the fallback when no network namespace
     is available) and process creation (when no per-run uid caps a fork bomb); audit hooks are
     not a security boundary, see sandbox.py;
  5. run the program: "stdio" mode runs it as __main__ and lets it exit on its own; "function"
     mode runs program, then test code, then `check(entry_point)`, and writes the per-run token
     to fd 1 only if all of that finished without an exception.
"""

import json
import os
import resource
import sys


_PROCESS_EVENTS = ("os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
                   "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg")


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


def _become_init_if_pid1():
  """In a fresh PID namespace we are pid 1, which ignores default-action signals (even SIGKILL
  sent from inside) and must reap orphans. So pid 1 stays a small root-owned init that reaps and
  exits with the program's status (its exit makes the kernel kill whatever is left), and the
  program runs in its child, with normal signal semantics."""
  if os.getpid() != 1:
    return
  child = os.fork()
  if child == 0:
    return
  while True:
    try:
      pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
      os._exit(1)
    except InterruptedError:
      continue
    if pid == child:
      os._exit(_exit_code(status))


_SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def _private_tmp_dirs(scratch, size_mb):
  """Mounts a fresh, size-capped tmpfs over each world-writable temp directory of this mount
  namespace, then bind-mounts the scratch directory (hidden by the new /tmp) back at its path.
  Writes outside the scratch directory then land in tmpfs that vanish with the namespace."""
  import ctypes  # pylint: disable=g-import-not-at-top
  libc = ctypes.CDLL(None, use_errno=True)
  ms_nosuid, ms_nodev, ms_bind = 2, 4, 4096

  def mount(source, target, fstype, flags, data):
    if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                  data.encode() if data else None) != 0:
      raise OSError(ctypes.get_errno(), "mount " + target + ": " + os.strerror(ctypes.get_errno()))

  scratch_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
  for d in _SHARED_TMP_DIRS:
    try:
      st = os.stat(d)
    except OSError:
      continue
    if st.st_mode & 0o002:
      mount("tmpfs", d, "tmpfs", ms_nosuid | ms_nodev, "size=%dm,mode=1777" % size_mb)
  if not os.path.isdir(scratch):
    os.makedirs(scratch)
    mount("/proc/self/fd/%d" % scratch_fd, scratch, None, ms_bind, None)
  os.close(scratch_fd)


def main():
  # Bind what the harness needs before the program can monkeypatch os / sys.
  _write = os.write
  _exit = os._exit
  spec_path = sys.argv[1]
  with open(spec_path, "r", encoding="utf-8") as f:
    spec = json.load(f)
  os.unlink(spec_path)

  for name, (soft, hard) in spec["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
  _become_init_if_pid1()
  if spec.get("private_tmp_mb"):
    try:
      _private_tmp_dirs(spec["cwd"], spec["private_tmp_mb"])
    except OSError as e:
      _write(2, ("sandbox: cannot make private temp dirs: %s\n" % e).encode())
      _exit(125)
  if spec.get("gid") is not None:
    os.setgroups([])
    os.setgid(spec["gid"])
  if spec.get("uid") is not None:
    os.setuid(spec["uid"])
    if os.getuid() == 0 or os.geteuid() == 0:
      _write(2, b"sandbox: failed to drop root privileges\n")
      _exit(125)
  os.chdir(spec["cwd"])
  if spec.get("block_network"):
    sys.addaudithook(_block_network_hook)
  if spec.get("block_processes"):
    sys.addaudithook(_block_processes_hook)

  mode = spec["mode"]
  program = spec["program"]
  sys.argv = ["solution.py"]
  sys.path.insert(0, spec["cwd"])
  if mode == "stdio":
    del spec
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(program, "solution.py", "exec"), namespace)  # pylint: disable=exec-used
    return

  token = spec.pop("token").encode()
  test = spec["test"]
  entry_point = spec.get("entry_point")
  del spec
  ok = False
  try:
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(program, "solution.py", "exec"), namespace)  # pylint: disable=exec-used
    exec(compile(test, "tests.py", "exec"), namespace)  # pylint: disable=exec-used
    if entry_point:
      namespace["check"](namespace[entry_point])
    ok = True
  except BaseException:  # pylint: disable=broad-except
    # SystemExit included: `sys.exit(0)` before the asserts is not a pass.
    try:
      import traceback  # pylint: disable=g-import-not-at-top
      sys.stderr.write(traceback.format_exc(limit=5))
    except BaseException:  # pylint: disable=broad-except
      pass
  try:
    sys.stdout.flush()
  except BaseException:  # pylint: disable=broad-except
    pass
  if ok:
    _write(1, b"\n" + token + b"\n")
  _exit(0 if ok else 1)


if __name__ == "__main__":
  main()
