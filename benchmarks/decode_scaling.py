"""Decode cost vs the cache bucket: the same decoded tokens should cost the same in any bucket.

  python benchmarks/decode_scaling.py [--rows 64] [--new_tokens 32] [--repeats 5] [--block 128]
      [--clock wall|cpu]

A tiny random Qwen2 (`lad_jax.models.testing.tiny_config`), `rows` rows (16 prompts of 32
tokens x G), decoding exactly `new_tokens` tokens (no EOS) into caches of 96, 576 and 2112
slots (prompt bucket 32 + response bucket 64, 544, 2080). For each bucket, the stacked cache
(the GPU / TPU layout: layer scan) and the per-layer cache (CPU's default: layers unrolled),
with attention over the whole bucket (`decode_block_size=0`, the old path) and over the written
slots only (`lad_jax.models.decode_attention`, blocks of the default `decode_block_size`):
"window" reads the prefix window that holds the longest row, "ragged" each row's own written
blocks, "auto" (the default) per step whichever reads less.

Timed: the jitted decode loop alone (the prefill of each call is done and waited for first),
the best of `repeats` calls after a warm-up, the buckets timed in turns; ms per step = (time
of new_tokens tokens - time of 1 token) / (new_tokens - 1), so the per-call cost outside the
loop is left out (each step feeds a token through the model and samples the next). Other load
on the machine makes single numbers noisy: compare within a run (`--clock cpu` is steadier).
Prints a table and ratios; the last line is `bucket_cost_ratio=<ms at 2112 / ms at 96>` of the
default ("auto") on the stacked cache.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lad_jax import sampler as sampler_lib
from lad_jax.models import Decoder, testing
from lad_jax.models.config import ModelConfig

PROMPT_LEN = 32
BUCKETS = (96, 576, 2112)
NEW_BLOCK = ModelConfig.decode_block_size  # the default


def _decode_fns(cfg, prompts, *, per_layer: bool, slots: int, group: int):
  """(prefill, decode, tokens, mask) of a sampler with a cache of `slots` slots."""
  smp = sampler_lib.Sampler(Decoder(cfg), eos_ids=(), pad_id=0, prompt_buckets=(PROMPT_LEN,),
                            response_buckets=(slots - PROMPT_LEN,), per_layer_cache=per_layer)
  prefill, decode = smp._compiled_fns(  # pylint: disable=protected-access
      prompt_len=PROMPT_LEN, response_len=slots - PROMPT_LEN, num_prompts=len(prompts),
      group_size=group, temperature=1.0, top_p=1.0, top_k=0)
  tokens, mask = sampler_lib.left_pad(prompts, PROMPT_LEN, 0)
  return prefill, decode, tokens, mask


def _seconds(fns, params, num_tokens: int, clock) -> float:
  """One timed decode call of num_tokens tokens (after an untimed prefill)."""
  prefill, decode, tokens, mask = fns
  cache, logits = jax.block_until_ready(prefill(params, tokens, mask))
  t0 = clock()
  limits = np.full((logits.shape[0],), num_tokens, np.int32)
  jax.block_until_ready(decode(params, cache, logits, jax.random.key(0), np.int32(num_tokens),
                               np.int32(0), limits))
  return clock() - t0


def _ms_per_step(cfg, params, prompts, *, per_layer: bool, group: int, new_tokens: int,
                 repeats: int, clock) -> list[float]:
  """ms per decode step at each of BUCKETS: the buckets are timed in turns (so a burst of
  other load hits all of them), min over `repeats` turns after a warm-up."""
  fns = [_decode_fns(cfg, prompts, per_layer=per_layer, slots=s, group=group) for s in BUCKETS]
  best = {(b, n): float("inf") for b in range(len(BUCKETS)) for n in (1, new_tokens)}
  for i in range(repeats + 1):
    for b, n in best:
      t = _seconds(fns[b], params, n, clock)
      if i:  # the first turn compiles
        best[b, n] = min(best[b, n], t)
  return [1e3 * (best[b, new_tokens] - best[b, 1]) / (new_tokens - 1)
          for b in range(len(BUCKETS))]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--block", type=int, default=NEW_BLOCK,
                  help="decode_block_size of window and ragged")
  ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                  help="cpu: this process's CPU time, steadier on a machine shared with other "
                       "jobs")
  args = ap.parse_args()
  clock = time.perf_counter if args.clock == "wall" else time.process_time
  group = 4
  base = testing.tiny_config("qwen2")
  params = jax.tree.map(jnp.asarray, testing.random_params(base))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, base.vocab_size, PROMPT_LEN).tolist()
             for _ in range(args.rows // group)]
  print(f"device={jax.devices()[0].platform} rows={args.rows} new_tokens={args.new_tokens} "
        f"prompt={PROMPT_LEN} clock={args.clock} decode_block_size {args.block}; "
        "ms per decode step")
  print(f"{'cache':>9} {'attention':>10} " + " ".join(f"{s:>8}" for s in BUCKETS)
        + "  2112/96")
  ms = {}
  for per_layer in (False, True):
    for name, block in (("old", 0), ("window", args.block), ("ragged", args.block),
                        ("auto", args.block)):
      cfg = base.replace(decode_block_size=block,
                         decode_attention="auto" if name == "old" else name)
      row = _ms_per_step(cfg, params, prompts, per_layer=per_layer, group=group,
                         new_tokens=args.new_tokens, repeats=args.repeats, clock=clock)
      ms[per_layer, name] = row
      layout = "per-layer" if per_layer else "stacked"
      print(f"{layout:>9} {name:>10} " + " ".join(f"{m:8.2f}" for m in row)
            + f"  {row[-1] / row[0]:7.2f}")
  for per_layer in (False, True):
    old, window, auto = (ms[per_layer, n] for n in ("old", "window", "auto"))
    layout = "per-layer" if per_layer else "stacked"
    print(f"{layout}: at {BUCKETS[-1]} slots old/auto = {old[-1] / auto[-1]:.2f}, "
          f"window/auto = {window[-1] / auto[-1]:.2f}")
  auto = ms[False, "auto"]
  print(f"bucket_cost_ratio={auto[-1] / auto[0]:.3f}")


if __name__ == "__main__":
  main()
