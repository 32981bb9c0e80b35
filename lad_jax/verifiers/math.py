"""Math answer verifier: extract the final answer, check equivalence with math-verify in workers.

    with MathVerifier(workers=2, timeout_s=5.0, reward="binary") as verifier:
      results = verifier.score(responses, golds)   # list[Result], one per response
      rewards = [r.reward for r in results]

Extraction (see `extraction.py`) runs here, in the caller's process: it is linear-time string work.
Equivalence runs `math_verify.verify(parse(gold), parse(answer))` in a `WorkerPool` of spawned
processes. math-verify's own timeouts use `signal.alarm`, which only works in a main thread, so we
call it with `parsing_timeout=None, timeout_seconds=None` and enforce the deadline at the process
level instead: an item that runs past `timeout_s` (sympy expanding `9^{9^{9^{9}}}` never returns)
has its worker killed and is scored as wrong with reason "timeout"; the pool keeps working.

Only extracted answers are compared: a response without a box / `Answer:` line / `<answer>` tag /
`####` scores as wrong with reason "no_answer", never by matching some number in its text (which
would reward responses that merely echo the question).

Reward conventions (`reward=`):
  "binary": 1 if correct else 0.
  "dapo":   +1 if correct else -1 (verl `math_dapo.compute_score`).
`format_reward` is added to a wrong response whose answer could be extracted, so that e.g.
`reward="binary", format_reward=0.1` gives 1 / 0.1 / 0 for correct / wrong but well-formed /
no answer.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

from lad_jax.verifiers import extraction
from lad_jax.verifiers import pool as pool_lib
from lad_jax.verifiers import result as result_lib
from lad_jax.verifiers.result import Result

REWARD_CONVENTIONS = {"binary": (1.0, 0.0), "dapo": (1.0, -1.0)}


def normalize_gold(gold: str) -> str:
  """Strips `$...$`, a surrounding `\\boxed{}` and GSM8K's `#### x` from a gold answer."""
  if not isinstance(gold, str):
    gold = str(gold)
  gold = gold.strip()
  if "####" in gold:
    gold = extraction.strip_gsm8k_gold(gold)
  boxed = extraction.last_boxed(gold)
  if boxed is not None:
    gold = boxed
  return _strip_dollars(gold)


def _strip_dollars(s: str) -> str:
  s = s.strip()
  if s.startswith("$$") and s.endswith("$$") and len(s) >= 4:
    s = s[2:-2]
  elif s.startswith("$") and s.endswith("$") and len(s) >= 2:
    s = s[1:-1]
  elif s.startswith("\\(") and s.endswith("\\)"):
    s = s[2:-2]
  return s.strip()


# --- worker side ----------------------------------------------------------------------------------


def _parse(expr: str):
  from math_verify import parse  # pylint: disable=g-import-not-at-top
  # Wrapping in \boxed{} makes math-verify's LaTeX extractor take the whole string (with its unit,
  # percent and \text normalisation) rather than searching it for some sub-expression.
  return parse("\\boxed{" + expr + "}", parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
  return _parse(gold)


def check_equivalence(item: tuple[str, str]) -> tuple[bool, str]:
  """Worker function: `(gold, answer) -> (equivalent, note)`; note is "" or "gold_unparseable".

  Runs without math-verify's signal-based timeouts (parsing_timeout=None, timeout_seconds=None);
  the WorkerPool's per-item deadline bounds it.
  """
  from math_verify import verify  # pylint: disable=g-import-not-at-top
  gold, answer = item
  gold_parsed = _parse_gold(gold)
  if not gold_parsed:
    return False, "gold_unparseable"
  answer_parsed = _parse(answer)
  if not answer_parsed:
    return False, "answer_unparseable"
  return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None)), ""


def warm_up() -> None:
  """Worker initializer: imports sympy/math-verify, fills lazy caches before the first deadline."""
  import logging  # pylint: disable=g-import-not-at-top
  # math-verify warns once per process that its timeouts are disabled; that is intended here.
  logging.getLogger("math_verify").setLevel(logging.ERROR)
  check_equivalence(("\\frac{1}{2}", "0.5"))


# --- caller side ----------------------------------------------------------------------------------


class MathVerifier:
  """Scores math responses against gold answers. See the module docstring.

  Args:
    workers: number of worker processes running math-verify.
    timeout_s: per-item deadline for the equivalence check, in seconds.
    reward: "binary" (1/0) or "dapo" (+1/-1).
    format_reward: added to the reward of a wrong response whose answer was extracted.
    extractors: answer extractors to try, in order (see `extraction.EXTRACTORS`).
    max_answer_chars: longer extracted answers are scored wrong without parsing (reason
      "answer_too_long"); sympy on huge strings only burns the deadline.
    max_tasks_per_worker: recycle a worker after this many checks.
  """

  def __init__(self, *, workers: int = 2, timeout_s: float = 5.0, reward: str = "binary",
               format_reward: float = 0.0,
               extractors: Sequence[str] = extraction.DEFAULT_EXTRACTORS,
               max_answer_chars: int = 1000, max_tasks_per_worker: Optional[int] = 2000):
    if reward not in REWARD_CONVENTIONS:
      raise ValueError(f"Unknown reward convention {reward!r}; valid ones: "
                       f"{sorted(REWARD_CONVENTIONS)}.")
    self.correct_reward, self.wrong_reward = REWARD_CONVENTIONS[reward]
    self.format_reward = float(format_reward)
    self.extractors = extraction.validate_extractors(extractors)
    self.max_answer_chars = max_answer_chars
    self._pool = pool_lib.WorkerPool(check_equivalence, workers=workers, timeout_s=timeout_s,
                                     max_tasks_per_worker=max_tasks_per_worker,
                                     initializer=warm_up)

  @property
  def pool(self) -> pool_lib.WorkerPool:
    return self._pool

  def close(self) -> None:
    self._pool.close()

  def __enter__(self) -> "MathVerifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _result(self, correct: bool, reason: str, answer: Optional[str], details: str = "") -> Result:
    if correct:
      reward = self.correct_reward
    else:
      reward = self.wrong_reward + (self.format_reward if answer is not None else 0.0)
    return Result(reward=reward, correct=correct, reason=reason, answer=answer, details=details)

  def score(self, responses: Sequence[str], golds: Sequence[str]) -> list[Result]:
    """Scores `responses[i]` against `golds[i]`; returns one Result per response, in order.

    Results carry the extracted answer and a reason: "correct", "wrong", "no_answer",
    "answer_too_long", "timeout", "crash" (the worker died), or "error" (details has the message).
    """
    if len(responses) != len(golds):
      raise ValueError(f"Got {len(responses)} responses but {len(golds)} gold answers; pass one "
                       "gold per response (repeat each prompt's gold G times for a group).")
    results: list[Optional[Result]] = [None] * len(responses)
    answers: list[Optional[str]] = [None] * len(responses)
    pair_to_slots: dict[tuple[str, str], list[int]] = {}
    for i, (response, gold) in enumerate(zip(responses, golds)):
      answer, _ = extraction.extract_answer(response, extractors=self.extractors)
      answers[i] = answer
      if answer is None:
        results[i] = self._result(False, result_lib.NO_ANSWER, None)
        continue
      if len(answer) > self.max_answer_chars:
        results[i] = self._result(False, "answer_too_long", answer)
        continue
      gold_n = normalize_gold(gold)
      if _strip_dollars(answer) == gold_n:
        results[i] = self._result(True, result_lib.CORRECT, answer)
        continue
      # Groups of G samples often share answers: check each distinct (gold, answer) once.
      pair_to_slots.setdefault((gold_n, _strip_dollars(answer)), []).append(i)
    pairs = list(pair_to_slots)
    outcomes = self._pool.map(pairs) if pairs else []
    for pair, outcome in zip(pairs, outcomes):
      for i in pair_to_slots[pair]:
        answer = answers[i]
        if outcome.status == pool_lib.OK:
          correct, note = outcome.value
          reason = result_lib.CORRECT if correct else result_lib.WRONG
          results[i] = self._result(correct, reason, answer, note)
        elif outcome.status == pool_lib.TIMEOUT:
          results[i] = self._result(False, result_lib.TIMEOUT, answer, outcome.error)
        elif outcome.status == pool_lib.CRASH:
          results[i] = self._result(False, result_lib.CRASH, answer, outcome.error)
        else:
          results[i] = self._result(False, result_lib.ERROR, answer, outcome.error)
    return results  # type: ignore[return-value]
