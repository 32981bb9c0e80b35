"""Procedural reasoning tasks from reasoning-gym, scored by each task's own `score_answer`.

    entries = generate("countdown", seed=0, size=1000, min_numbers=3, max_numbers=4)
    with ProceduralVerifier(workers=2, strict=True) as verifier:
      results = verifier.score(responses, entries)

An entry is reasoning-gym's dict `{"question", "answer", "metadata"}` (JSON-serialisable; the
dataset builders in `lad_jax.data` store it as JSON). The model's answer is taken from its output
with the math extractors; `EXTRACT_MODES` names the two choices (config `verifier.extract`):

  "tag" (default): the last `<answer>...</answer>` pair, else the last `\\boxed{}`; a response
    without either scores 0 (reason "no_answer"), as the prompt asks for the tags.
  "tag_or_last_number": the same, else the last number anywhere in the response (verl gsm8k's
    "flexible" mode). For small models that answer in prose ("0 - 4 = -4.") and would otherwise
    get reward 0 on every sample, leaving GRPO-style groups without signal. The reward then
    measures arithmetic, not the format.

reasoning-gym grants partial credit by default (countdown: 0.05 for a wrong expression that uses
the right numbers, 0.01 for anything else; gsm_symbolic: 0.01 for a wrong number). In `strict`
mode (the default) any score below 1 is 0: RL on partial credit teaches the format, not the task.

Scoring runs in a `WorkerPool` with a per-item deadline: countdown evaluates the model's
expression with sympy, and `9**9**9**9` would otherwise hang the trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping, Optional, Sequence

from lad_jax.verifiers import extraction
from lad_jax.verifiers import multi_answer
from lad_jax.verifiers import pool as pool_lib
from lad_jax.verifiers import result as result_lib
from lad_jax.verifiers.result import Result

REASONING_GYM_TASKS = ("countdown", "basic_arithmetic", "chain_sum", "gsm_symbolic")
# Ours, with many correct answers per prompt (lad_jax/verifiers/multi_answer.py).
TASKS = REASONING_GYM_TASKS + multi_answer.TASKS
PROCEDURAL_EXTRACTORS = ("answer_tag", "boxed")
EXTRACT_MODES = {
    "tag": PROCEDURAL_EXTRACTORS,
    "tag_or_last_number": PROCEDURAL_EXTRACTORS + ("last_number",),
}


def extractors_for(mode: str) -> tuple[str, ...]:
  """The extractor names of an `EXTRACT_MODES` mode; ValueError naming the valid modes."""
  if mode not in EXTRACT_MODES:
    raise ValueError(f"Unknown answer extraction mode {mode!r}; valid ones: "
                     f"{list(EXTRACT_MODES)}.")
  return EXTRACT_MODES[mode]


def _config_fields(name: str) -> list[str]:
  from reasoning_gym.factory import DATASETS  # pylint: disable=g-import-not-at-top
  _, config_cls = DATASETS[name]
  return [f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size")]


def validate_task(name: str, difficulty: Mapping[str, Any]) -> None:
  """Raises ValueError for an unknown task or difficulty setting, naming the valid ones."""
  if name not in TASKS:
    raise ValueError(f"Unknown procedural task {name!r}; valid ones: {list(TASKS)}.")
  if name in multi_answer.TASKS:
    multi_answer.validate_settings(name, difficulty)
    return
  fields = _config_fields(name)
  unknown = sorted(set(difficulty) - set(fields))
  if unknown:
    raise ValueError(f"Unknown setting(s) {unknown} for task {name!r}; valid ones: {fields}.")


def generate(name: str, *, seed: int, size: int, **difficulty: Any) -> list[dict[str, Any]]:
  """Generates `size` entries of task `name` from `seed` (deterministic), as JSON-safe dicts.

  `difficulty` goes to the task's reasoning-gym config (e.g. countdown: min_numbers, max_numbers,
  min_target, max_target; basic_arithmetic / chain_sum: min_terms, max_terms, min_digits,
  max_digits; gsm_symbolic: difficulty, which reasoning-gym currently only accepts at 1.0).
  """
  validate_task(name, difficulty)
  if size < 1:
    raise ValueError(f"size must be >= 1, got {size}.")
  if name in multi_answer.TASKS:
    return multi_answer.generate(name, seed=seed, size=size, **difficulty)
  import reasoning_gym  # pylint: disable=g-import-not-at-top
  try:
    dataset = reasoning_gym.create_dataset(name, seed=seed, size=size, **difficulty)
  except (AssertionError, TypeError, ValueError) as e:
    raise ValueError(f"reasoning-gym rejected the settings {difficulty} for {name!r}: "
                     f"{type(e).__name__}: {e}") from e
  # The JSON round trip makes entries identical to what a dataset builder reads back.
  return [json.loads(json.dumps(dataset[i], default=_json_default)) for i in range(size)]


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (set, frozenset, tuple)):
    return list(obj)
  if hasattr(obj, "item"):  # numpy scalars
    return obj.item()
  return str(obj)


# --- worker side ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _score_fn(name: str):
  import reasoning_gym  # pylint: disable=g-import-not-at-top
  return reasoning_gym.get_score_answer_fn(name)


def score_entry(item: tuple[str, str]) -> float:
  """Worker function: `(answer, entry_json) -> reasoning-gym score in [0, 1]`."""
  answer, entry_json = item
  entry = json.loads(entry_json)
  name = entry["metadata"]["source_dataset"]
  if name in multi_answer.TASKS:
    return multi_answer.score(answer, entry)
  return float(_score_fn(name)(answer, entry))


def warm_up() -> None:
  """Worker initializer: reasoning-gym's import takes seconds; keep it out of the deadlines."""
  for name in REASONING_GYM_TASKS:
    _score_fn(name)


# --- caller side ----------------------------------------------------------------------------------


class ProceduralVerifier:
  """Scores responses to reasoning-gym entries. See the module docstring.

  Args:
    workers: worker processes running `score_answer`.
    timeout_s: per-item deadline, seconds.
    strict: scores below 1 count as 0 (no partial credit).
    extractors: answer extractors, in order (default: <answer> tags, then the last box).
    correct_reward, wrong_reward: reward for a full-credit answer and for anything else in strict
      mode; in non-strict mode the reward is wrong_reward + score * (correct_reward - wrong_reward).
  """

  def __init__(self, *, workers: int = 2, timeout_s: float = 5.0, strict: bool = True,
               extractors: Sequence[str] = PROCEDURAL_EXTRACTORS, correct_reward: float = 1.0,
               wrong_reward: float = 0.0, max_answer_chars: int = 1000):
    self.strict = strict
    self.extractors = extraction.validate_extractors(extractors)
    self.correct_reward = float(correct_reward)
    self.wrong_reward = float(wrong_reward)
    self.max_answer_chars = max_answer_chars
    self._pool = pool_lib.WorkerPool(score_entry, workers=workers, timeout_s=timeout_s,
                                     initializer=warm_up)

  def close(self) -> None:
    self._pool.close()

  def __enter__(self) -> "ProceduralVerifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _reward(self, score: float, strict: bool) -> float:
    if strict:
      score = 1.0 if score >= 1.0 else 0.0
    return self.wrong_reward + score * (self.correct_reward - self.wrong_reward)

  def score(self, responses: Sequence[str], entries: Sequence[Mapping[str, Any]], *,
            strict: Optional[bool] = None) -> list[Result]:
    """Scores `responses[i]` against `entries[i]`; one Result per response, in order.

    `strict` overrides the verifier's default for this call. `details` holds reasoning-gym's raw
    score, e.g. "raw_score=0.05".
    """
    strict = self.strict if strict is None else strict
    if len(responses) != len(entries):
      raise ValueError(f"Got {len(responses)} responses but {len(entries)} entries; pass one "
                       "entry per response.")
    answers = []
    items = []
    slots = []
    results: list[Optional[Result]] = [None] * len(responses)
    for i, (response, entry) in enumerate(zip(responses, entries)):
      source = entry.get("metadata", {}).get("source_dataset")
      if source not in TASKS:
        raise ValueError(f"Entry {i} comes from {source!r}, not one of {list(TASKS)}; pass "
                         "entries made by `generate` (or read back from the procedural builder).")
      answer, _ = extraction.extract_answer(response, extractors=self.extractors)
      if source in multi_answer.TASKS and multi_answer.canonical_answer(answer) is not None:
        answer = multi_answer.canonical_answer(answer)  # distinct answers count "12" == "12.0"
      answers.append(answer)
      if answer is None:
        results[i] = Result(self._reward(0.0, strict), False, result_lib.NO_ANSWER, None)
      elif len(answer) > self.max_answer_chars:
        results[i] = Result(self._reward(0.0, strict), False, "answer_too_long", answer)
      else:
        items.append((answer, json.dumps(entry)))
        slots.append(i)
    outcomes = self._pool.map(items) if items else []
    for i, outcome in zip(slots, outcomes):
      if outcome.status == pool_lib.OK:
        raw = float(outcome.value)
        correct = raw >= 1.0
        reason = result_lib.CORRECT if correct else result_lib.WRONG
        results[i] = Result(self._reward(raw, strict), correct, reason, answers[i],
                            f"raw_score={raw:g}")
      else:
        reason = {pool_lib.TIMEOUT: result_lib.TIMEOUT, pool_lib.CRASH: result_lib.CRASH}.get(
            outcome.status, result_lib.ERROR)
        results[i] = Result(self._reward(0.0, strict), False, reason, answers[i], outcome.error)
    return results  # type: ignore[return-value]
