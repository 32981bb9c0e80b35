"""Procedural tasks: generation from a seed, gold answers score 1, strict mode, hung scoring."""

from __future__ import annotations

import pytest

from lad_jax.verifiers import procedural
from lad_jax.verifiers.procedural import ProceduralVerifier

DIFFICULTY = {
    "countdown": {"min_numbers": 3, "max_numbers": 4, "max_target": 300},
    "basic_arithmetic": {"min_terms": 3, "max_terms": 4, "max_digits": 2},
    "chain_sum": {"min_terms": 2, "max_terms": 5, "min_digits": 2, "max_digits": 3},
    "gsm_symbolic": {"difficulty": 1.0},
}


@pytest.fixture(scope="module")
def entries():
  return {name: procedural.generate(name, seed=7, size=12, **DIFFICULTY[name])
          for name in procedural.REASONING_GYM_TASKS}  # ours: tests/test_multi_answer.py


@pytest.fixture(scope="module")
def verifier():
  with ProceduralVerifier(workers=2, timeout_s=3.0, strict=True) as v:
    yield v


def test_generation_is_deterministic_and_respects_difficulty(entries):
  again = procedural.generate("countdown", seed=7, size=12, **DIFFICULTY["countdown"])
  assert again == entries["countdown"]
  other = procedural.generate("countdown", seed=8, size=12, **DIFFICULTY["countdown"])
  assert other != entries["countdown"]
  for e in entries["countdown"]:
    assert 3 <= len(e["metadata"]["numbers"]) <= 4
    assert e["metadata"]["target"] <= 300
  for e in entries["chain_sum"]:
    assert 2 <= e["metadata"]["num_terms"] <= 5


def test_gold_answers_score_one(entries, verifier):
  for name, es in entries.items():
    responses = [f"Let me think.\n<answer>{e['answer']}</answer>" for e in es]
    results = verifier.score(responses, es)
    assert all(r.correct and r.reward == 1.0 and r.reason == "correct" for r in results), (
        name, [r for r in results if not r.correct])
    boxed = verifier.score([f"\\boxed{{{e['answer']}}}" for e in es[:3]], es[:3])
    assert all(r.correct for r in boxed), (name, boxed)


def test_strict_mode_removes_partial_credit(entries, verifier):
  e = entries["countdown"][0]
  numbers = e["metadata"]["numbers"]
  # Uses every number once but (almost surely) misses the target: reasoning-gym gives 0.05.
  wrong = "<answer>" + " + ".join(str(n) for n in numbers) + "</answer>"
  assert sum(numbers) != e["metadata"]["target"]
  responses = [wrong, "<answer>nonsense</answer>", "no tags at all"]
  lenient_res = verifier.score(responses, [e] * 3, strict=False)
  strict_res = verifier.score(responses, [e] * 3)  # the verifier's default: strict
  # reasoning_gym/games/countdown.py score_answer: 0.05 right numbers, 0.01 otherwise; no answer
  # never reaches score_answer here (reason "no_answer", reward 0).
  assert [r.reward for r in lenient_res] == [0.05, 0.01, 0.0]
  assert [r.reward for r in strict_res] == [0.0, 0.0, 0.0]
  assert [r.reason for r in strict_res] == ["wrong", "wrong", "no_answer"]
  assert not any(r.correct for r in lenient_res)
  assert [r.details for r in strict_res[:2]] == ["raw_score=0.05", "raw_score=0.01"]


def test_hung_scoring_times_out(entries, verifier):
  e = entries["countdown"][0]
  # countdown's score_answer runs sympy.parse_expr, which evaluates this tower exactly.
  hung, ok = verifier.score(["<answer>9**9**9**9</answer>", f"<answer>{e['answer']}</answer>"],
                            [e, e])
  assert (hung.reason, hung.reward) == ("timeout", 0.0)
  assert ok.correct


def test_bad_arguments(entries, verifier):
  with pytest.raises(ValueError, match="valid ones"):
    procedural.generate("countdwn", seed=0, size=2)
  with pytest.raises(ValueError, match="min_numbers"):
    procedural.generate("countdown", seed=0, size=2, numbers=3)
  with pytest.raises(ValueError, match="rejected"):
    procedural.generate("gsm_symbolic", seed=0, size=2, difficulty=0.5)
  with pytest.raises(ValueError, match="one entry per response"):
    verifier.score(["<answer>1</answer>"], [])
  with pytest.raises(ValueError, match="not one of"):
    verifier.score(["<answer>1</answer>"], [{"question": "q", "answer": "1", "metadata": {}}])


def test_extract_modes(entries, verifier):
  e = entries["chain_sum"][0]
  gold = e["answer"]
  prose = f"{e['metadata']['expression']} = {gold}."
  responses = [prose, f"<answer>{gold}</answer>", f"<answer>x</answer> so {gold}", "no number"]
  # The shared verifier runs the default extractors, i.e. mode "tag".
  assert procedural.extractors_for("tag") == verifier.extractors
  tag = verifier.score(responses, [e] * 4)
  with ProceduralVerifier(workers=1,
                          extractors=procedural.extractors_for("tag_or_last_number")) as lenient:
    last = lenient.score(responses, [e] * 4)
  assert [r.reward for r in tag] == [0.0, 1.0, 0.0, 0.0]
  assert tag[0].reason == "no_answer"
  # The number is only a fallback: a (wrong) tagged answer still wins.
  assert [r.reward for r in last] == [1.0, 1.0, 0.0, 0.0]
  assert last[0].answer == gold and last[3].reason == "no_answer"
  with pytest.raises(ValueError, match="valid ones"):
    procedural.extractors_for("last")
