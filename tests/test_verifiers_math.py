"""Math verifier: answer extraction, equivalence verdicts, reward conventions, hung items."""

from __future__ import annotations

import time

import pytest

from lad_jax.verifiers import extraction
from lad_jax.verifiers import math as math_verifier
from lad_jax.verifiers import pool as pool_lib
from lad_jax.verifiers.math import MathVerifier

# --- extraction (pure functions, no workers) ------------------------------------------------------

EXTRACTION_CASES = [
    # (text, expected answer) for extract_answer with the default extractor order.
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("nested \\boxed{\\frac{\\sqrt{3}}{2}} ok", "\\frac{\\sqrt{3}}{2}"),
    ("set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literal
    ("first \\boxed{1} then \\boxed{2}", "2"),  # the last box counts
    ("\\fbox{7}", "7"),
    ("\\boxed 5 is it", "5"),  # MATH's "\boxed " form
    ("$\\boxed 12$", "12"),
    ("\\boxed{3} and finally \\fbox{4}", "4"),
    ("Answer: 17", "17"),  # DAPO
    ("blah\nanswer : $\\frac{3}{4}$.\n", "\\frac{3}{4}"),
    ("<answer>  9 </answer>", "9"),
    ("<answer>The result is \\boxed{10}</answer>", "10"),
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("#### 1,000.", "1,000"),
]

NO_ANSWER_CASES = [
    "The answer is 5.",  # no anchor: never guessed from free text
    "\\boxed{}",  # empty box
    "\\boxed{\\frac{1}{2}",  # truncated: braces never close
    "ok \\boxed{1} but then \\boxed{2",  # the last box is malformed: no fallback to an earlier one
    "\\boxedfoo{3}",  # not the \boxed command
    "<answer>5",  # unclosed tag
    "",
]


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES)
def test_extract_answer(text, expected):
  answer, _ = extraction.extract_answer(text)
  assert answer == expected


@pytest.mark.parametrize("text", NO_ANSWER_CASES)
def test_extract_answer_none(text):
  assert extraction.extract_answer(text) == (None, None)


def test_extractor_order_and_dapo_tail():
  text = "Answer: 3\nand \\boxed{4}"
  assert extraction.extract_answer(text) == ("4", "boxed")
  assert extraction.extract_answer(
      text, extractors=("answer_line", "boxed")) == ("3", "answer_line")
  # verl math_dapo only looks at the last 300 characters.
  assert extraction.answer_line("Answer: 1\n" + "x" * 400) is None
  assert extraction.answer_line("Answer: 1\n" + "x" * 400, tail_chars=None) == "1"


@pytest.mark.parametrize("text, expected", [
    ("0 - 4 = -4.", "-4"),           # a sign that touches the digits, sentence dot dropped
    ("4-1=3", "3"),
    ("4-1", "1"),                    # binary minus, not a sign
    ("The total is 1,234 apples", "1234"),
    ("3.5 and then 2.25.", "2.25"),
    ("x2 = 7\nso x = 7", "7"),
    ("no digits here", None),
])
def test_last_number(text, expected):
  assert extraction.last_number(text) == expected


def test_last_number_is_only_a_fallback():
  # Tags and boxes win over numbers written after them.
  assert extraction.extract_answer(
      "<answer>5</answer> because 2 + 3", extractors=("answer_tag", "boxed", "last_number")
  ) == ("5", "answer_tag")
  assert extraction.extract_answer(
      "2 + 3 = 5", extractors=("answer_tag", "boxed", "last_number")) == ("5", "last_number")
  assert "last_number" not in extraction.DEFAULT_EXTRACTORS


def test_unknown_extractor_is_a_clear_error():
  with pytest.raises(ValueError, match="valid ones"):
    extraction.extract_answer("x", extractors=("boxd",))


def test_normalize_gold():
  assert math_verifier.normalize_gold("$\\frac{1}{2}$") == "\\frac{1}{2}"
  assert math_verifier.normalize_gold("\\boxed{5}") == "5"
  assert math_verifier.normalize_gold("She has 3 + 4 = 7.\n#### 1,007") == "1007"
  assert math_verifier.normalize_gold(12) == "12"


# --- equivalence verdicts (worker pool) -----------------------------------------------------------

# (response, gold, expected correct). Verdicts are the mathematically right ones; each was also
# checked against math-verify 0.9 (which decides them) when this table was written.
VERDICTS = [
    # fractions and decimals
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", True),
    ("\\boxed{\\tfrac{1}{2}}", "1/2", True),
    ("\\boxed{0.51}", "\\frac{1}{2}", False),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{3}}", "0.3333333", True),
    ("\\boxed{3.0}", "3", True),
    ("\\boxed{12.0001}", "12", False),
    ("\\boxed{\\frac{7}{3}}", "2\\frac{1}{3}", True),  # mixed number
    ("\\boxed{1.5}", "\\frac{3}{2}", True),
    # roots, pi, powers
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
    ("\\boxed{\\frac{\\sqrt3}{2}}", "\\dfrac{\\sqrt{3}}{2}", True),
    ("\\boxed{1.414}", "\\sqrt{2}", False),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", True),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", False),
    ("\\boxed{1024}", "2^{10}", True),
    ("\\boxed{2\\pi}", "2\\pi", True),
    ("\\boxed{\\pi}", "2\\pi", False),
    # expressions
    ("\\boxed{1+x}", "x+1", True),
    ("\\boxed{(x-1)(x+1)}", "x^2-1", True),
    ("\\boxed{x^2+1}", "x^2-1", False),
    ("\\boxed{x=5}", "5", True),
    # intervals
    ("\\boxed{[0,1)}", "[0,1)", True),
    ("\\boxed{[0,1]}", "[0,1)", False),
    ("\\boxed{(-\\infty,2]}", "(-\\infty, 2]", True),
    ("\\boxed{(-\\infty,2)}", "(-\\infty, 2]", False),
    # sets and tuples
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", True),
    ("\\boxed{\\{1,3\\}}", "\\{1,2\\}", False),
    ("\\boxed{2, 1}", "1,2", True),
    ("\\boxed{(2,1)}", "(1,2)", False),
    # units, degrees, currency, text
    ("\\boxed{5\\text{ cm}}", "5", True),
    ("\\boxed{10^\\circ}", "10", True),
    ("\\boxed{\\$5}", "5", True),
    ("\\boxed{6\\text{ cm}}", "5", False),
    ("\\boxed{\\text{(B)}}", "B", True),
    ("\\boxed{C}", "B", False),
    # percentages (math-verify accepts both 10% == 10 and 10% == 0.1)
    ("\\boxed{10\\%}", "10", True),
    ("\\boxed{0.1}", "10\\%", True),
    ("\\boxed{20\\%}", "10\\%", False),
    # negative numbers
    ("\\boxed{-3}", "-3", True),
    ("\\boxed{3}", "-3", False),
    ("\\boxed{-3}", "3", False),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", True),
    # thousands separators, large numbers
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{1{,}000}", "1000", True),
    ("\\boxed{10000}", "1000", False),
    # multiple boxes: the last counts
    ("First \\boxed{4}, wait, actually \\boxed{5}", "5", True),
    ("First \\boxed{5}, wait, actually \\boxed{4}", "5", False),
    # malformed boxes and missing answers
    ("\\boxed{5", "5", False),
    ("the answer is 5", "5", False),
    ("\\boxed{}", "5", False),
    # answers that echo the question (no final answer, or the question's own expression)
    ("Find x if 2x = 10. We have 2x = 10.", "5", False),
    ("What is \\frac{1}{2} + \\frac{1}{3}? \\boxed{\\frac{1}{2} + \\frac{1}{2}}", "\\frac{5}{6}",
     False),
    ("Put your final answer within \\boxed{}.", "3", False),
    # other formats
    ("Answer: \\frac{3}{4}", "0.75", True),
    ("<answer>0.75</answer>", "\\frac34", True),
    ("She pays 18 dollars.\n#### 18", "18", True),
    ("#### 19", "18", False),
    # matrices
    ("\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\boxed{\\begin{pmatrix}2\\\\1\\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
     False),
]


@pytest.fixture(scope="module")
def verifier():
  with MathVerifier(workers=2, timeout_s=5.0, reward="binary") as v:
    yield v


def test_verdicts(verifier):
  assert len(VERDICTS) >= 50
  responses = [r for r, _, _ in VERDICTS]
  golds = [g for _, g, _ in VERDICTS]
  results = verifier.score(responses, golds)
  wrong = [(r, g, want, res) for (r, g, want), res in zip(VERDICTS, results)
           if res.correct != want]
  assert not wrong, "\n".join(map(str, wrong))
  for (_, _, want), res in zip(VERDICTS, results):
    assert res.reward == (1.0 if want else 0.0)
    assert res.reason in ("correct", "wrong", "no_answer")
    assert res.reason == "correct" if want else res.reason != "correct"


def test_result_carries_answer_and_reason(verifier):
  ok, bad, none = verifier.score(["\\boxed{0.5}", "\\boxed{2}", "no box"], ["1/2", "3", "3"])
  assert (ok.answer, ok.reason, ok.reward) == ("0.5", "correct", 1.0)
  assert (bad.answer, bad.reason, bad.reward) == ("2", "wrong", 0.0)
  assert (none.answer, none.reason, none.reward) == (None, "no_answer", 0.0)


def test_hung_item_times_out_and_pool_keeps_working(verifier):
  # sympy evaluates 9^(9^(9^9)) exactly and never returns (measured: > 10 s, killed).
  responses = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{\\frac{1}{2}}", "\\boxed{7}"]
  golds = ["5", "0.5", "7"]
  restarts = verifier.pool.restarts
  fast = MathVerifier(workers=2, timeout_s=1.0)
  try:
    # A worker's first parse loads math-verify's grammar (~0.5 s here, more on a loaded host):
    # warm both workers so that only the hung item can meet the 1 s deadline.
    assert all(r.correct for r in fast.score([f"\\boxed{{{i}}}" for i in range(4)],
                                        [str(i) for i in range(4)]))
    start = time.monotonic()
    hung, ok1, ok2 = fast.score(responses, golds)
    elapsed = time.monotonic() - start
  finally:
    fast.close()
  assert (hung.reason, hung.reward, hung.correct) == ("timeout", 0.0, False)
  assert hung.answer == "9^{9^{9^{9}}}"
  assert ok1.correct and ok2.correct
  # Deadline 1 s, + worker start-up (imports, which do not count against items) and the restart.
  assert elapsed < 30.0
  assert fast.pool.timeouts == 1 and fast.pool.restarts == 1
  assert verifier.pool.restarts == restarts  # the shared verifier was not involved


def test_dapo_and_format_rewards():
  with MathVerifier(workers=1, timeout_s=5.0, reward="dapo") as v:
    res = v.score(["Answer: 4", "Answer: 5", "I don't know"], ["4", "4", "4"])
    assert [r.reward for r in res] == [1.0, -1.0, -1.0]
  with MathVerifier(workers=1, timeout_s=5.0, reward="binary", format_reward=0.1) as v:
    res = v.score(["\\boxed{4}", "\\boxed{5}", "I don't know"], ["4", "4", "4"])
    assert [r.reward for r in res] == [1.0, 0.1, 0.0]


def test_bad_arguments():
  with pytest.raises(ValueError, match="binary"):
    MathVerifier(reward="dapo2")
  with MathVerifier(workers=1) as v:
    with pytest.raises(ValueError, match="one gold per response"):
      v.score(["\\boxed{1}"], [])
  with pytest.raises(ValueError, match="module-level"):
    pool_lib.WorkerPool(lambda x: x, workers=1)


def test_worker_crash_is_isolated():
  # os._exit in the worker function (a stand-in for a segfault) kills the worker mid-item.
  with pool_lib.WorkerPool(_exit_on_negative, workers=1, timeout_s=5.0) as pool:
    outcomes = pool.map([1, -1, 2])
  assert [o.status for o in outcomes] == ["ok", "crash", "ok"]
  assert [o.value for o in outcomes] == [2, None, 4]
  assert pool.crashes == 1


def _exit_on_negative(x: int) -> int:
  import os  # pylint: disable=g-import-not-at-top
  if x < 0:
    os._exit(3)
  return 2 * x
