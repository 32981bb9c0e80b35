"""Tests of lad_jax.metrics against hand values and brute-force enumeration."""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import metrics


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (10, 3, 5), (8, 0, 4), (8, 8, 8), (16, 1, 16), (7, 4, 3)])
def test_pass_at_k_equals_subset_enumeration(n, c, k):
  # Definition: probability that a uniformly random k-subset of the n samples contains a correct one.
  verdicts = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  expected = np.mean([any(verdicts[i] for i in s) for s in subsets])
  assert metrics.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_hand_values():
  # 1 - C(7,5)/C(10,5) = 1 - 21/252.
  assert metrics.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
  # pass@1 is the plain accuracy c/n.
  assert metrics.pass_at_k(32, 7, 1) == pytest.approx(7 / 32)
  # Large n stays finite and exact: 1 - C(900, 32)/C(1000, 32).
  expected = 1 - math.comb(900, 32) / math.comb(1000, 32)
  assert metrics.pass_at_k(1000, 100, 32) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_bad_input():
  with pytest.raises(ValueError, match="at least 8 samples"):
    metrics.pass_at_k(4, 1, 8)
  with pytest.raises(ValueError, match="0 <= c <= n"):
    metrics.pass_at_k(4, 5, 1)


def test_avg_and_mean_pass():
  correct = [[True, False, False, False], [True, True, True, True]]
  assert metrics.avg_at_k(correct) == pytest.approx((0.25 + 1.0) / 2)
  assert metrics.pass_at_k_mean(correct, 4) == pytest.approx(1.0)
  assert metrics.pass_at_k_mean(correct, 1) == pytest.approx((0.25 + 1.0) / 2)


def test_distinct_n_hand_values():
  # "a b a b" has bigrams (a,b), (b,a), (a,b): 2 distinct of 3.
  assert metrics.distinct_n([["a", "b", "a", "b"]], 2) == pytest.approx(2 / 3)
  # Across responses: trigrams (a,b,c), (b,c,d) and (a,b,c) again: 2 of 3.
  assert metrics.distinct_n([["a", "b", "c", "d"], ["a", "b", "c"]], 3) == pytest.approx(2 / 3)
  assert metrics.distinct_n([["a"]], 3) == 0.0
  assert metrics.distinct_correct(["x = 1", "x  =  1", "y"], [True, True, True]) == 2


def test_entropy_from_logits():
  # Uniform over V has entropy log V; a one-hot (very peaked) has ~0.
  v = 7
  assert float(metrics.entropy_from_logits(jnp.zeros((v,)))) == pytest.approx(math.log(v), rel=1e-6)
  peaked = jnp.array([100.0, 0.0, 0.0])
  assert float(metrics.entropy_from_logits(peaked)) == pytest.approx(0.0, abs=1e-6)
  # Temperature 2 on logits [2, 0] equals temperature 1 on [1, 0]: p = (e/(1+e), 1/(1+e)).
  p = math.e / (1 + math.e)
  expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
  got = metrics.entropy_from_logits(jnp.array([2.0, 0.0]), temperature=2.0)
  assert float(got) == pytest.approx(expected, rel=1e-6)


def test_metric_writer_round_trip(tmp_path):
  with metrics.MetricWriter(str(tmp_path), tensorboard=True) as writer:
    writer.write(1, {"reward/mean": jnp.float32(0.5), "pg_loss": 1.25})
    writer.write(2, {"reward/mean": 0.75})
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["reward/mean"] == 0.5 and rows[0]["pg_loss"] == 1.25
  assert rows[1]["reward/mean"] == 0.75


def test_metric_writer_drops_rows_of_replayed_steps(tmp_path):
  # A run writes steps 1-3, checkpoints at 2, is killed and resumes after step 2.
  with metrics.MetricWriter(str(tmp_path), tensorboard=False) as writer:
    for step in (1, 2, 3):
      writer.write(step, {"x": step})
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 4, "x": ')  # a line cut off by the kill
  with metrics.MetricWriter(str(tmp_path), tensorboard=True, first_step=3) as writer:
    writer.write(3, {"x": 30})
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["x"]) for r in rows] == [(1, 1), (2, 2), (3, 30)]
  # first_step=0 (a fresh run in an old workdir) starts the file over.
  assert metrics.truncate_jsonl(str(tmp_path / "metrics.jsonl"), 0) == 3
  assert metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) == []
  assert metrics.truncate_jsonl(str(tmp_path / "missing.jsonl"), 0) == 0
