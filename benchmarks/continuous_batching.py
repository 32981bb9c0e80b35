"""Continuous batching vs lock-step batching at the same slot count, on long-tailed lengths.

  python benchmarks/continuous_batching.py [--rows 256] [--slots 64] [--max_new 1024]
      [--repeats 2] [--per_layer] [--clock wall|cpu] [--model tiny|small]
      [--attention auto|ragged|window] [--block 32] [--prompt_len 32] [--group 4]

A tiny random Qwen2 (`lad_jax.models.testing.tiny_config`: 2 layers, hidden 64, vocab 128, so a
decode step is nearly all KV-cache reads), or with `--model small` one whose weights weigh about
what a step's KV reads do, as in a 7B model at thousands of tokens (4 layers, hidden 256, 4
heads over 1 kv head of 64, MLP 768, vocab 8192: 5M parameters, 2 KB of cache per token),
`rows` rows (prompts of `prompt_len` tokens x G `group`), no EOS: every row's length is forced
(`row_limits`) and drawn once from a lognormal with mean 0.3 x max_new (sigma 1, clipped to
[1, max_new]), the long tail of RLVR responses.
Both samplers decode `slots` rows at a time and produce the same rows (tests/test_continuous.py):
  lock step   `Sampler(rows_per_call=slots)`: chunks of `slots` rows, each decoded until its
              longest row ends;
  continuous  `ContinuousSampler(decode_slots=slots)`: a slot takes the next row as soon as its
              row ends (refills of slots // 8), its slots halving in the tail (down to
              slots // 8) once no row waits.
Both read the cache with `--attention` (`model.decode_attention`; ragged reads also spare lock
step the attention of rows that ended, so compare `--attention window` for batching alone).
Useful tokens = the sum of the lengths (the same work on both sides); tokens/s = that over the
wall time of one `sample` call (after a compiling warm-up, best of `repeats`, the two timed in
turns). Also printed: decode steps x slots each side runs (lock step: the sum of its chunks'
longest rows x slots) and the share of them that produce a useful token.
Last line: `refill_speedup=<continuous tokens/s / lock-step tokens/s>`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lad_jax import continuous, sampler as sampler_lib
from lad_jax.models import Decoder, testing
from lad_jax.models.config import ModelConfig

MODELS = {"tiny": {}, "small": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=1,
                                     head_dim=64, intermediate_size=768, vocab_size=8192)}


def _lengths(rows: int, max_new: int, seed: int = 0) -> np.ndarray:
  """Lognormal lengths with mean 0.3 x max_new (sigma 1), clipped to [1, max_new]."""
  sigma = 1.0
  mu = np.log(0.3 * max_new) - sigma ** 2 / 2
  draw = np.random.default_rng(seed).lognormal(mu, sigma, rows)
  return np.clip(np.round(draw), 1, max_new).astype(np.int32)


def _samplers(cfg, *, slots: int, max_new: int, per_layer: bool, prompt_len: int = 32):
  kw = dict(eos_ids=(), pad_id=0, prompt_buckets=(prompt_len,), response_buckets=(max_new,),
            per_layer_cache=per_layer)
  return {"lock step": sampler_lib.Sampler(Decoder(cfg), rows_per_call=slots, **kw),
          "continuous": continuous.ContinuousSampler(Decoder(cfg), decode_slots=slots, **kw)}


def _seconds(smp, params, prompts, limits, max_new: int, clock, group: int) -> float:
  t0 = clock()
  out = smp.sample(params, prompts, jax.random.key(0), group_size=group, max_new_tokens=max_new,
                   row_limits=limits)
  jax.block_until_ready(out.response_tokens)
  seconds = clock() - t0
  np.testing.assert_array_equal(np.asarray(out.lengths), limits)  # the forced work was done
  return seconds


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", type=int, default=256)
  ap.add_argument("--slots", type=int, default=64)
  ap.add_argument("--max_new", type=int, default=1024)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--per_layer", action="store_true", help="the per-layer cache (CPU default)")
  ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
  ap.add_argument("--model", choices=tuple(MODELS), default="tiny")
  ap.add_argument("--attention", choices=("auto", "ragged", "window"), default="auto",
                  help="decode_attention of both samplers")
  ap.add_argument("--block", type=int, default=ModelConfig.decode_block_size,
                  help="decode_block_size of both samplers")
  ap.add_argument("--prompt_len", type=int, default=32, help="tokens per prompt")
  ap.add_argument("--group", type=int, default=4, help="samples per prompt (G)")
  args = ap.parse_args()
  clock = time.perf_counter if args.clock == "wall" else time.process_time
  cfg = testing.tiny_config("qwen2", decode_attention=args.attention,
                            decode_block_size=args.block, **MODELS[args.model])
  params = jax.tree.map(jnp.asarray, testing.random_params(cfg))
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, cfg.vocab_size, args.prompt_len).tolist()
             for _ in range(args.rows // args.group)]
  limits = _lengths(len(prompts) * args.group, args.max_new)
  useful = int(limits.sum())
  chunks = limits.reshape(-1, args.slots) if len(limits) % args.slots == 0 else None
  lock_steps = (int(chunks.max(axis=1).sum()) * args.slots if chunks is not None else None)
  samplers = _samplers(cfg, slots=args.slots, max_new=args.max_new, per_layer=args.per_layer,
                       prompt_len=args.prompt_len)
  best = {name: float("inf") for name in samplers}
  for i in range(args.repeats + 1):
    for name, smp in samplers.items():
      t = _seconds(smp, params, prompts, limits, args.max_new, clock, args.group)
      if i:  # the first turn compiles
        best[name] = min(best[name], t)
  print(f"device={jax.devices()[0].platform} rows={len(limits)} slots={args.slots} "
        f"max_new={args.max_new} lengths: mean {limits.mean():.0f} median "
        f"{np.median(limits):.0f} max {limits.max()} (lognormal, mean 0.3 x max) "
        f"cache={'per-layer' if args.per_layer else 'stacked'} clock={args.clock} "
        f"model={args.model} decode_attention={args.attention} block={args.block} "
        f"prompt_len={args.prompt_len} G={args.group}")
  print(f"{'batching':>11} {'seconds':>8} {'useful tok/s':>13}")
  rate = {}
  for name in samplers:
    rate[name] = useful / best[name]
    print(f"{name:>11} {best[name]:8.2f} {rate[name]:13.0f}")
  if lock_steps:
    print(f"lock step: {lock_steps} slot-steps for {useful} useful tokens "
          f"({useful / lock_steps:.0%} useful)")
  print(f"refill_speedup={rate['continuous'] / rate['lock step']:.3f}")


if __name__ == "__main__":
  main()
