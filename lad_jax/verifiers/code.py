"""Code verifier: run generated programs against tests in the sandbox (see `sandbox.py`).

Two test formats:
  FunctionTests (HumanEval / HumanEval+ style): program = prompt + completion, run in one sandboxed
    process; the test code (which defines `check`) runs after the trusted prompt in another, and
    `check(candidate)` calls the program's `entry_point` across the process boundary with plain
    data (exact builtin types, compared by trusted code). A pass is judged by a per-run secret token
    the checker writes on a pipe the program never holds (see `sandbox.py`). stdin reads raise.
  StdioTests (LiveCodeBench / DeepCoder style): the program reads stdin and writes stdout, once per
    case, each case in a fresh sandbox; outputs are compared after stripping, line by line
    (LiveCodeBench `compare_strings`-style). Expected outputs never enter the sandbox. Runs stop at
    the first failing case.

Reward: `correct_reward` if every test passes, else `wrong_reward` (1 / 0 by default). Reasons:
"correct", "failed" (an assert or exception in the tests), "wrong_answer", "runtime_error"
(non-zero exit in a stdio case), "timeout", "output_limit", "no_code", "sandbox_error".

    with CodeVerifier(workers=2, timeout_s=5.0) as verifier:
      results = verifier.score(responses, tests)          # extracts ```python blocks
      results = verifier.score_programs(programs, tests)  # programs as they are
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
from typing import Optional, Sequence, Union

from lad_jax.verifiers import result as result_lib
from lad_jax.verifiers import sandbox as sandbox_lib
from lad_jax.verifiers.result import Result

FAILED = "failed"
WRONG_ANSWER = "wrong_answer"
RUNTIME_ERROR = "runtime_error"
NO_CODE = "no_code"

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class FunctionTests:
  """HumanEval-style tests: `test` defines `check(candidate)`; `prompt` precedes the completion."""

  test: str
  entry_point: str
  prompt: str = ""


@dataclasses.dataclass(frozen=True)
class StdioTests:
  """stdin/stdout cases: a sequence of (input, expected_output) strings."""

  cases: tuple[tuple[str, str], ...]

  def __post_init__(self):
    object.__setattr__(self, "cases", tuple((str(i), str(o)) for i, o in self.cases))
    if not self.cases:
      raise ValueError("StdioTests needs at least one (input, expected_output) case.")


Tests = Union[FunctionTests, StdioTests]


def extract_code(text: str) -> Optional[str]:
  """The last fenced code block tagged python/py/python3 or untagged, or None if there is none."""
  blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(text)]
  for lang, body in reversed(blocks):
    if lang in ("", "python", "py", "python3"):
      return body
  return None


def build_program(prompt: str, completion: str, entry_point: str) -> str:
  """HumanEval program: prompt + completion, or prompt then a full redefinition of the function.

  A completion that itself defines `entry_point` (chat models usually repeat the signature) follows
  the prompt as a new top-level block, so helpers and imports defined in the prompt stay available.
  """
  if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", completion, re.MULTILINE):
    return prompt + "\n\n" + completion
  return prompt + completion


def outputs_match(actual: str, expected: str) -> bool:
  """Line-by-line equality after stripping the whole output and each line."""
  a = [line.strip() for line in actual.strip().splitlines()]
  e = [line.strip() for line in expected.strip().splitlines()]
  return a == e


class CodeVerifier:
  """Scores programs against tests in parallel sandboxes.

  Args:
    workers: programs run at the same time (threads, each driving one sandboxed subprocess).
    timeout_s: wall-clock limit of one run (one stdio case, or a whole function-test program).
    memory_mb, max_output_bytes, max_processes, file_size_mb: see `sandbox.Limits`.
    isolation, python: see `sandbox.Sandbox`.
    correct_reward, wrong_reward: reward values.
  """

  def __init__(self, *, workers: int = 2, timeout_s: float = 5.0, memory_mb: int = 1024,
               max_output_bytes: int = 1 << 20, max_processes: int = 32, file_size_mb: int = 16,
               isolation: str = "auto", python: Optional[str] = None,
               correct_reward: float = 1.0, wrong_reward: float = 0.0):
    if workers < 1:
      raise ValueError(f"workers must be >= 1, got {workers}.")
    limits = sandbox_lib.Limits(timeout_s=timeout_s, memory_mb=memory_mb,
                                max_output_bytes=max_output_bytes, max_processes=max_processes,
                                file_size_mb=file_size_mb)
    self.sandbox = sandbox_lib.Sandbox(limits=limits, isolation=isolation, python=python)
    self.correct_reward = float(correct_reward)
    self.wrong_reward = float(wrong_reward)
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                           thread_name_prefix="code-verifier")

  def close(self) -> None:
    self._executor.shutdown(wait=True)

  def __enter__(self) -> "CodeVerifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _result(self, correct: bool, reason: str, program: Optional[str],
              details: str = "") -> Result:
    return Result(reward=self.correct_reward if correct else self.wrong_reward, correct=correct,
                  reason=reason, answer=program, details=details)

  def score(self, responses: Sequence[str], tests: Sequence[Tests]) -> list[Result]:
    """Extracts the last ```python block of each response and scores it (no block: "no_code")."""
    programs = [extract_code(r) for r in responses]
    return self.score_programs(programs, tests)

  def score_programs(self, programs: Sequence[Optional[str]],
                     tests: Sequence[Tests]) -> list[Result]:
    """Scores `programs[i]` (completion for FunctionTests, full program for StdioTests)."""
    if len(programs) != len(tests):
      raise ValueError(f"Got {len(programs)} programs but {len(tests)} test sets; pass one test "
                       "set per program.")
    for t in tests:
      if not isinstance(t, (FunctionTests, StdioTests)):
        raise ValueError(f"Unknown test spec {type(t).__name__}; use FunctionTests or StdioTests.")
    futures = [self._executor.submit(self._score_one, p, t) for p, t in zip(programs, tests)]
    return [f.result() for f in futures]

  def _score_one(self, program: Optional[str], tests: Tests) -> Result:
    if program is None or not program.strip():
      return self._result(False, NO_CODE, program)
    try:
      if isinstance(tests, FunctionTests):
        return self._score_function(program, tests)
      return self._score_stdio(program, tests)
    except Exception as e:  # pylint: disable=broad-except
      # Whatever happens, one program never takes the verifier down.
      return self._result(False, sandbox_lib.SANDBOX_ERROR, program, f"{type(e).__name__}: {e}")

  def _score_function(self, completion: str, tests: FunctionTests) -> Result:
    program = build_program(tests.prompt, completion, tests.entry_point)
    passed, outcome = self.sandbox.run_function_tests(program, tests.test, tests.entry_point,
                                                      prompt=tests.prompt)
    if passed:
      return self._result(True, result_lib.CORRECT, program)
    if outcome.status != sandbox_lib.OK:
      return self._result(False, outcome.status, program, _tail(outcome.stderr))
    return self._result(False, FAILED, program, _tail(outcome.stderr))

  def _score_stdio(self, program: str, tests: StdioTests) -> Result:
    for k, (stdin, expected) in enumerate(tests.cases):
      outcome = self.sandbox.run_stdio(program, stdin.encode())
      if outcome.status != sandbox_lib.OK:
        return self._result(False, outcome.status, program, f"case {k}: {_tail(outcome.stderr)}")
      if outcome.returncode != 0:
        return self._result(False, RUNTIME_ERROR, program,
                            f"case {k}: exit {outcome.returncode}: {_tail(outcome.stderr)}")
      actual = outcome.stdout.decode("utf-8", errors="replace")
      if not outputs_match(actual, expected):
        return self._result(False, WRONG_ANSWER, program, f"case {k}: got {actual[:200]!r}")
    return self._result(True, result_lib.CORRECT, program)


def _tail(stderr: bytes, n: int = 600) -> str:
  return stderr[-n:].decode("utf-8", errors="replace")
