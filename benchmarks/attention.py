"""Attention forward + backward time: the einsum reference vs blockwise (flash-style), no cache.

  python benchmarks/attention.py [--batch 4] [--lengths 192,1024] [--reps 7] [--block 128]

The attention of SmolLM2-135M (9 query heads, 3 kv heads, head dim 64; `make run`'s model) at
B x T tokens, fp32, jitted: d/d(q, k, v) of sum(out * w), so one forward and one backward of
one layer's attention, nothing else. Both are built and warmed up first, then timed in turn
rep by rep (drift of this shared machine hits both alike); the median is reported.

Last line: `blockwise_over_einsum=<blockwise / einsum time at the shortest length>`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from lad_jax.models import attention
from lad_jax.models import testing

IMPLS = {"einsum": attention.attend_einsum, "blockwise": attention.attend_blockwise}


def _step(fn, cfg, b: int, t: int):
  """A jitted fwd + bwd of `fn` at [b, t] tokens, and its arguments."""
  kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  args = (jax.random.normal(kq, (b, t, n, h)) * h ** -0.5, jax.random.normal(kk, (b, k, t, h)),
          jax.random.normal(kv, (b, k, t, h)), jax.random.normal(kw, (b, t, n, h)),
          jnp.ones((b, t), jnp.int32))
  loss = lambda q, k, v, w, s: jnp.sum(fn(q, k, v, s, cfg) * w)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), args


def _time(steps: dict[str, tuple], reps: int) -> dict[str, float]:
  """Median seconds per call of each step, timed in turn rep by rep after a warm-up."""
  for fn, args in steps.values():
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in steps}
  for _ in range(reps):
    for name, (fn, args) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--lengths", default="192,1024")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--block", type=int, default=128)
  a = p.parse_args()
  cfg = testing.tiny_config("llama", num_heads=9, num_kv_heads=3, head_dim=64,
                            attention_block_size=a.block)
  lengths = [int(x) for x in a.lengths.split(",")]
  print(f"backend={jax.default_backend()} batch={a.batch} heads=9/3 head_dim=64 block={a.block}")
  print(f"{'T':>6} {'einsum ms':>10} {'blockwise ms':>13} {'ratio':>6}")
  ratios = []
  for t in lengths:
    med = _time({name: _step(fn, cfg, a.batch, t) for name, fn in IMPLS.items()}, a.reps)
    ratios.append(med["blockwise"] / med["einsum"])
    print(f"{t:>6} {med['einsum'] * 1e3:>10.2f} {med['blockwise'] * 1e3:>13.2f} "
          f"{ratios[-1]:>6.2f}")
  print(f"blockwise_over_einsum={ratios[0]:.3f}")


if __name__ == "__main__":
  main()
