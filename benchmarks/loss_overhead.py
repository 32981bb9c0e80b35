"""Cost of every registered objective: jitted value + gradient on one [B, T] batch, side by side.

  python benchmarks/loss_overhead.py [--batch 64] [--length 2048] [--rounds 15] [--iters 10]

The paper claims LAD costs what GRPO costs. Every objective in `objectives.names()` (LAD with its
default JS divergence, plus one extra row per other built-in divergence) gets the same fp32 inputs:
old log-probs of a peaked policy, a current policy a little away from it, GRPO advantages of
groups of 8 binary rewards, ragged response lengths (mask), entropies, reference log-probs, log Z
and a PRNG key, i.e. every `LossInputs` field any objective may read. `lad_theoretical` reads the
same arrays as [B, K] per-action inputs (K = length) with per-action advantages.

What is timed: `jax.jit(jax.value_and_grad(objective.loss, has_aux=True))` with respect to logp
(metrics included, as a train step would compute them), after a warm-up call. Rounds interleave
the objectives so that background load hits them alike; each round times `iters` back-to-back
calls (block_until_ready), and the reported time is the fastest round's mean (the least disturbed
one; the median is printed too). Prints a markdown table (objective, ms, ratio to grpo) and, last,
`lad_js_over_grpo=<ratio>`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lad_jax import divergences
from lad_jax import losses
from lad_jax import objectives


def make_inputs(batch: int, length: int, *, seed: int = 0, group: int = 8):
  """Realistic fp32 inputs for B responses of up to T tokens: (inputs, per-action inputs)."""
  rng = np.random.default_rng(seed)
  # Token log-probs of a sampled response are mostly near 0 with a heavy tail.
  old_logp = -rng.exponential(0.5, (batch, length))
  logp = old_logp + rng.normal(0.0, 0.05, (batch, length))
  ref_logp = old_logp + rng.normal(0.0, 0.1, (batch, length))
  rewards = (rng.uniform(size=(batch // group, group)) < 0.4).astype(np.float64)
  std = rewards.std(-1, ddof=1, keepdims=True)
  adv = (rewards - rewards.mean(-1, keepdims=True)) / (std + 1e-6)  # GRPO, unbiased std
  lengths = rng.integers(length // 8, length + 1, batch)
  mask = np.arange(length)[None, :] < lengths[:, None]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  inputs = losses.LossInputs(
      logp=f32(logp), old_logp=f32(old_logp), advantages=f32(adv.reshape(-1)), mask=f32(mask),
      ref_logp=f32(ref_logp), entropy=f32(rng.uniform(0.0, 2.0, (batch, length))),
      log_z=f32(rng.normal(size=batch)))
  per_action = inputs.replace(advantages=f32(rng.normal(size=(batch, length))))
  return inputs, per_action


def _timed_fn(objective: objectives.Objective):
  def loss(logp, inputs, key):
    return objective.loss(inputs.replace(logp=logp), key=key)

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--only", default="",
                      help="comma-separated row labels to time (grpo and lad are always timed)")
  args = parser.parse_args()

  inputs, per_action = make_inputs(args.batch, args.length)
  key = jax.random.key(0)
  rows = []  # (label, objective, inputs)
  for name in objectives.names():
    rows.append((name, objectives.get(name), per_action if name == "lad_theoretical" else inputs))
    if name == "lad":
      for div in divergences.names() + ["alpha:0.5"]:
        if div != "js":
          rows.append((f"lad[{div}]", objectives.get("lad", divergence=div), inputs))
  if args.only:
    keep = set(args.only.split(",")) | {"grpo", "lad"}
    rows = [row for row in rows if row[0] in keep]
  fns = {label: _timed_fn(objective) for label, objective, _ in rows}
  for label, _, batch in rows:  # warm-up: compile
    jax.block_until_ready(fns[label](batch.logp, batch, key))

  times = {label: [] for label, _, _ in rows}
  for _ in range(args.rounds):
    for label, _, batch in rows:
      fn = fns[label]
      start = time.perf_counter()
      for _ in range(args.iters):
        out = fn(batch.logp, batch, key)
      jax.block_until_ready(out)
      times[label].append((time.perf_counter() - start) / args.iters * 1e3)

  best = {label: min(t) for label, t in times.items()}
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, logp [{args.batch},"
        f" {args.length}] fp32, value+grad, best of {args.rounds} rounds x {args.iters} calls")
  print()
  print("| objective | ms (best round) | ms (median round) | ratio to grpo |")
  print("|---|---:|---:|---:|")
  for label, _, _ in rows:
    print(f"| {label} | {best[label]:.3f} | {statistics.median(times[label]):.3f} |"
          f" {best[label] / best['grpo']:.3f} |")
  print()
  print(f"lad_js_over_grpo={best['lad'] / best['grpo']:.3f}")


if __name__ == "__main__":
  main()
