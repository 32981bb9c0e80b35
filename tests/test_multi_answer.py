"""Multi-answer procedural tasks (lad_jax/verifiers/multi_answer.py) and their diversity metrics."""

import numpy as np
import pytest

from lad_jax import evaluate
from lad_jax import metrics
from lad_jax.rollout import Rollout
from lad_jax.verifiers import multi_answer
from lad_jax.verifiers import procedural


@pytest.mark.parametrize("name", multi_answer.TASKS)
def test_generate_is_deterministic_and_every_listed_answer_scores(name):
  a = multi_answer.generate(name, seed=3, size=20)
  assert a == multi_answer.generate(name, seed=3, size=20)
  assert a != multi_answer.generate(name, seed=4, size=20)
  for e in a:
    meta = e["metadata"]
    right = [n for n in range(meta["low"] - 3, meta["high"] + 4)
             if multi_answer.score(str(n), e) == 1.0]
    # every right answer lies strictly inside the range and is a multiple of k
    assert right and all(meta["low"] < n < meta["high"] and n % meta["k"] == 0 for n in right)
    assert len(right) == meta["num_answers"] >= 2
    assert multi_answer.score(e["answer"], e) == 1.0


def test_score_hand_cases():
  e = {"metadata": {"low": 10, "high": 20, "k": 4, "source_dataset": "multiple_between"}}
  assert [multi_answer.score(s, e) for s in ("12", "16.0", "x = 16.", "10", "20", "14", "",
                                             "twelve")] == [1, 1, 1, 0, 0, 0, 0, 0]
  assert multi_answer.canonical_answer("between 2 and 9: 6") == "6"
  assert multi_answer.canonical_answer("1,200") == "1200"
  assert multi_answer.canonical_answer("none") is None


def test_bad_settings_name_the_valid_ones():
  with pytest.raises(ValueError, match="min_gap"):
    multi_answer.generate("number_between", seed=0, size=2, gap=3)
  with pytest.raises(ValueError, match="number_between"):
    procedural.validate_task("no_such_task", {})


def test_procedural_verifier_scores_and_canonicalises():
  entries = procedural.generate("number_between", seed=0, size=2)
  lo = entries[0]["metadata"]["low"]
  with procedural.ProceduralVerifier(workers=1, extractors=procedural.extractors_for(
      "tag_or_last_number")) as v:
    res = v.score([f"<answer>{lo + 1}.0</answer>", f"it is {lo}"], entries[:1] * 2)
  assert [r.correct for r in res] == [True, False]
  assert res[0].answer == str(lo + 1)


def test_answer_entropy_and_distinct_answers_hand_values():
  # correct answers 3, 3, 5 -> p = (2/3, 1/3): H = -(2/3 ln 2/3 + 1/3 ln 1/3) = 0.6365 nats
  answers, ok = ["3", "3", "5", "7"], [True, True, True, False]
  assert metrics.distinct_correct_answers(answers, ok) == 2
  assert metrics.correct_answer_entropy(answers, ok) == pytest.approx(0.636514, abs=1e-6)
  assert metrics.correct_answer_entropy(["1", "2", "3", "4"], [True] * 4) == pytest.approx(
      np.log(4))
  assert metrics.correct_answer_entropy(["1", None], [False, False]) is None


def test_pass_at_k_curve_matches_chen_formula():
  # n=4, c=1: pass@j = j / 4 (one correct among 4, choose j without replacement)
  curve = metrics.pass_at_k_curve([[True, False, False, False]])
  assert curve == pytest.approx({1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0})


def _rollout(correct, answers, logp_rows, lengths):
  n, r = len(correct), 3
  tokens = np.arange(n * r, dtype=np.int32).reshape(n, r)
  mask = np.arange(r)[None] < np.asarray(lengths)[:, None]
  return Rollout(prompt_tokens=np.zeros((n, 1), np.int32), prompt_mask=np.ones((n, 1), bool),
                 response_tokens=tokens, response_mask=mask,
                 logp=np.where(mask, np.asarray(logp_rows, np.float32), 0.0),
                 truncated=np.zeros(n, bool), lengths=np.asarray(lengths, np.int32),
                 rewards=np.asarray(correct, np.float32), correct=np.asarray(correct),
                 texts=np.asarray([f"t{a}" for a in answers], object),
                 reasons=np.asarray(["x"] * n, object), answers=np.asarray(answers, object),
                 prompt_index=np.zeros(n, np.int64))


def test_set_metrics_two_prompts_hand_values():
  # prompt 0: answers 3,3 right, 4 right -> 2 distinct, H(2/3,1/3); 9 wrong.
  # prompt 1: nothing right -> 0 distinct, left out of H.
  r = _rollout([True, True, True, False, False, False, False, False],
               ["3", "3", "4", "9", "1", None, "2", "2"],
               [[-1.0, -2.0, -3.0]] * 8, [2, 2, 2, 2, 1, 1, 1, 1])
  m = evaluate.set_metrics(r, k=4, pass_k=(1, 4), name="s")
  assert m["val-core/s/acc/mean@4"] == pytest.approx(3 / 8)
  assert sorted(k for k in m if "pass@" in k) == [f"val-core/s/acc/pass@{j}" for j in (1, 2, 3, 4)]
  assert m["val-core/s/acc/pass@4"] == pytest.approx(0.5)
  assert m["val-aux/s/distinct_correct_answers"] == pytest.approx(1.0)  # (2 + 0) / 2
  assert m["val-aux/s/answer_entropy"] == pytest.approx(0.636514, abs=1e-6)
  # 4 rows of tokens with logp -1, -2 and 4 rows with -1: (4 * 3 + 4 * 1) / 12
  assert m["val-aux/s/token_entropy"] == pytest.approx(16 / 12)
  assert m["val-aux/s/response_length/mean"] == pytest.approx(1.5)
