"""The verdict every verifier returns for one response."""

from __future__ import annotations

import dataclasses
from typing import Optional

# Reasons shared by all verifiers. Verifier-specific ones are documented where they are produced.
CORRECT = "correct"
WRONG = "wrong"
NO_ANSWER = "no_answer"
TIMEOUT = "timeout"
CRASH = "crash"  # the worker process died (segfault, OOM kill) while scoring this item
ERROR = "error"  # the checker raised; `details` holds the message


@dataclasses.dataclass(frozen=True)
class Result:
  """One verdict.

  Attributes:
    reward: the scalar reward the trainer uses (convention chosen by the verifier, e.g. 1/0, +-1).
    correct: whether the response solved the task (accuracy metrics use this, not `reward`).
    reason: why, one of the reason strings above or a verifier-specific one ("output_limit", ...).
    answer: what was extracted from the response (final answer, or program source); None if nothing.
    details: free text for debugging (exception message, stderr tail, partial score).
  """

  reward: float
  correct: bool
  reason: str
  answer: Optional[str] = None
  details: str = ""
