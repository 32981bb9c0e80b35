"""Procedural tasks with many correct answers per prompt: does RL keep several of them alive?

    entries = generate("number_between", seed=0, size=100, min_gap=6, max_gap=20)
    score(" 12 ", entries[0])        # 1.0 if 12 is a valid answer to entries[0], else 0.0
    canonical_answer("<the> 12.0")  # "12": the final answer as the diversity metrics count it

Each task asks for ONE whole number satisfying a condition that many numbers satisfy, so the
fraction of a prompt's samples that are right (avg@k) and the number of DIFFERENT right answers
(distinct correct, the entropy of the correct answers H(pi+)) measure separately: a policy that
collapses onto one right answer keeps its accuracy but loses the others (the LAD paper's
mode-collapse argument, Sec. 1).

  number_between:   "Name a whole number greater than A and less than B."  (B - A - 1 answers)
  even_between:     "Name an even number greater than A and less than B."
  multiple_between: "Name a number greater than A and less than B that is divisible by k."

Entries have reasoning-gym's shape ({"question", "answer", "metadata": {"source_dataset", ...}};
"answer" is one valid answer, the smallest) so the procedural dataset builder and
`ProceduralVerifier` treat them like reasoning-gym's. Generation is deterministic in the seed.
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable, Mapping, Optional

_INT_RE = re.compile(r"-?\d+(?:\.0+)?(?!\d)")


def _valid(n: int, meta: Mapping[str, Any]) -> bool:
  if not meta["low"] < n < meta["high"]:
    return False
  return n % int(meta.get("k", 1)) == 0


def _number_between(rng: random.Random, low: int, gap: int) -> dict[str, Any]:
  high = low + gap
  return {"question": f"Name a whole number greater than {low} and less than {high}.",
          "metadata": {"low": low, "high": high, "k": 1}}


def _even_between(rng: random.Random, low: int, gap: int) -> dict[str, Any]:
  high = low + gap
  return {"question": f"Name an even number greater than {low} and less than {high}.",
          "metadata": {"low": low, "high": high, "k": 2}}


def _multiple_between(rng: random.Random, low: int, gap: int) -> dict[str, Any]:
  k = rng.choice((3, 4, 5))
  high = low + gap * k // 2  # about gap / 2 multiples of k in range
  return {"question": (f"Name a number greater than {low} and less than {high} that is "
                       f"divisible by {k}."),
          "metadata": {"low": low, "high": high, "k": k}}


_MAKERS: dict[str, Callable[[random.Random, int, int], dict[str, Any]]] = {
    "number_between": _number_between,
    "even_between": _even_between,
    "multiple_between": _multiple_between,
}
TASKS = tuple(_MAKERS)
SETTINGS = {"min_low": 1, "max_low": 80, "min_gap": 6, "max_gap": 20}


def validate_settings(name: str, difficulty: Mapping[str, Any]) -> None:
  """ValueError for an unknown task or setting, naming the valid ones."""
  if name not in _MAKERS:
    raise ValueError(f"Unknown multi-answer task {name!r}; valid ones: {list(TASKS)}.")
  unknown = sorted(set(difficulty) - set(SETTINGS))
  if unknown:
    raise ValueError(f"Unknown setting(s) {unknown} for task {name!r}; valid ones: "
                     f"{sorted(SETTINGS)}.")


def generate(name: str, *, seed: int, size: int, **difficulty: Any) -> list[dict[str, Any]]:
  """`size` entries of task `name`, deterministic in (name, seed, difficulty).

  difficulty: min_low / max_low (range of A), min_gap / max_gap (B - A for number_between and
  even_between; multiple_between widens the range by k / 2 so about gap / 2 multiples fit).
  """
  validate_settings(name, difficulty)
  s = {**SETTINGS, **difficulty}
  if not (s["min_low"] <= s["max_low"] and 3 <= s["min_gap"] <= s["max_gap"]):
    raise ValueError(f"Need min_low <= max_low and 3 <= min_gap <= max_gap; got {s}.")
  rng = random.Random(f"{name}-{seed}")
  entries = []
  for _ in range(size):
    low = rng.randint(s["min_low"], s["max_low"])
    entry = _MAKERS[name](rng, low, rng.randint(s["min_gap"], s["max_gap"]))
    meta = entry["metadata"]
    answers = [n for n in range(meta["low"] + 1, meta["high"]) if _valid(n, meta)]
    if not answers:  # cannot happen for gaps >= 3, but never emit an unanswerable prompt
      raise AssertionError(f"no valid answer for {entry}")
    meta.update(source_dataset=name, num_answers=len(answers))
    entry["answer"] = str(answers[0])
    entries.append(entry)
  return entries


def canonical_answer(answer: Optional[str]) -> Optional[str]:
  """The final answer as an integer string ("12" from "12", "12.0", "x = 12."); None if the
  text holds no integer. The last integer counts, as in the extraction's last-number rule."""
  if answer is None:
    return None
  found = _INT_RE.findall(answer.replace(",", ""))
  if not found:
    return None
  return str(int(float(found[-1])))


def score(answer: str, entry: Mapping[str, Any]) -> float:
  """1.0 when the canonical answer satisfies the entry's condition, else 0.0."""
  value = canonical_answer(answer)
  if value is None:
    return 0.0
  return 1.0 if _valid(int(value), entry["metadata"]) else 0.0
