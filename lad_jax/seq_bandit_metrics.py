"""Exact metrics of the sequence bandit, from the [P, Y] response distribution (numpy, float64).

The decoder's distribution over the Y = 100 well-formed responses may miss a little mass (the
"outside" responses, `lad_jax.seq_bandit_task`). Convention: accuracy counts that mass as
incorrect (it is the unnormalised mass on correct answers); every other metric compares
distributions over the 100 responses, so it uses pi renormalised on them.

Targets (per prompt type x):
  pi*(y|x)       ∝ pi_old(y|x) e^(A(y|x)/eta), A the exact advantage of the method's estimator
                 under the current phase's pi_old (`seq_target`): LAD's sequence-level optimum.
  filtered(y|x)  ∝ pi_0(y|x) 1[y correct]: the base policy filtered to correct answers (the target
                 of alpha-DPG, and what keeps every correct mode of pi_0).

The total variation and entropy are the 50-arm bandit's (`lad_jax.bandit`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lad_jax import bandit

MODE_FLOOR = 0.01  # a correct answer is "kept" with >= 1% of the correct mass
DROP_FACTOR = 0.1  # a correct answer is "dropped" in a phase when pi < 0.1 pi_old
DISTINCT_K = 16


def probabilities(seq_logp_PY) -> tuple[np.ndarray, np.ndarray]:
  """(pi [..., P, Y] renormalised over the 100 responses, outside mass [..., P])."""
  pi = np.exp(np.asarray(seq_logp_PY, np.float64))
  total = pi.sum(axis=-1, keepdims=True)
  return pi / total, 1.0 - total[..., 0]


def seq_target(old_PY, adv_PY, eta: float) -> np.ndarray:
  """pi* ∝ pi_old e^(A/eta) over the last axis (pi_old: probabilities)."""
  log = np.log(np.maximum(np.asarray(old_PY, np.float64), 1e-300)) + np.asarray(adv_PY) / eta
  log -= log.max(axis=-1, keepdims=True)
  p = np.exp(log)
  return p / p.sum(axis=-1, keepdims=True)


def filtered_target(pi0_PY, correct_PY) -> np.ndarray:
  """pi_0 1[correct] / Z over the last axis."""
  p = np.asarray(pi0_PY, np.float64) * np.asarray(correct_PY)
  return p / p.sum(axis=-1, keepdims=True)


def correct_part(pi_PY, correct_PY) -> np.ndarray:
  """pi+ = pi restricted to the correct answers and renormalised (0 elsewhere)."""
  p = np.asarray(pi_PY, np.float64) * np.asarray(correct_PY)
  return p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-300)


def h_correct(pi_PY, correct_PY) -> np.ndarray:
  """H(pi+), nats, [..., P]."""
  return bandit.entropy(correct_part(pi_PY, correct_PY))


def modes_kept(pi_PY, correct_PY, *, floor: float = MODE_FLOOR) -> np.ndarray:
  """Correct answers holding >= floor of the correct mass, [..., P] (as float)."""
  return (correct_part(pi_PY, correct_PY) >= floor).sum(axis=-1).astype(np.float64)


def modes_dropped(pi_PY, old_PY, correct_PY, *, floor: float = MODE_FLOOR,
                  factor: float = DROP_FACTOR) -> np.ndarray:
  """Modes of pi_old (correct answers with >= floor of its correct mass) that lost most of their
  probability within a phase, pi(y) < factor pi_old(y); [..., P] (as float). pi* never drops one
  here: a binary reward gives every correct answer the top advantage, so pi*/pi_old is the same
  for all of them, and >= 1."""
  mode = correct_part(old_PY, correct_PY) >= floor
  lost = np.asarray(pi_PY, np.float64) < factor * np.asarray(old_PY, np.float64)
  return (lost & mode).sum(axis=-1).astype(np.float64)


def distinct_correct(pi_PY, correct_PY, *, k: int = DISTINCT_K) -> np.ndarray:
  """Expected number of distinct correct answers among k i.i.d. samples, exactly:
  sum_{y correct} 1 - (1 - pi(y))^k, [..., P]."""
  pi = np.asarray(pi_PY, np.float64)
  return ((1.0 - np.power(1.0 - pi, k)) * np.asarray(correct_PY)).sum(axis=-1)


class Snapshot(NamedTuple):
  """Metrics of one policy at one point, each averaged over prompt types (modes_kept summed)."""

  accuracy: float
  tv_target: float
  tv_filtered: float
  h_correct: float
  modes_kept: float
  distinct_correct_k: float
  outside: float


def snapshot(seq_logp_PY, *, target_PY, filtered_PY, correct_PY) -> Snapshot:
  """The metrics of a policy given its [P, Y] log pi(y|x) and the two targets."""
  pi, outside = probabilities(seq_logp_PY)
  raw = np.exp(np.asarray(seq_logp_PY, np.float64))
  return Snapshot(
      accuracy=float((raw * correct_PY).sum(-1).mean()),
      tv_target=float(bandit.total_variation(pi, target_PY).mean()),
      tv_filtered=float(bandit.total_variation(pi, filtered_PY).mean()),
      h_correct=float(h_correct(pi, correct_PY).mean()),
      modes_kept=float(modes_kept(pi, correct_PY).sum()),
      distinct_correct_k=float(distinct_correct(pi, correct_PY).mean()),
      outside=float(outside.mean()))
