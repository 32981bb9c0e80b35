"""Train-step time and padding of padded vs trimmed + packed batches (lad_jax/packing.py).

  python benchmarks/packing.py [--rows 32] [--max_length 1024] [--prompt 64] [--micro 2]
      [--reps 5] [--hidden 128] [--layers 2] [--vocab 1024] [--mean_frac 0.3] [--capacity 0]

Rollouts of `--rows` responses whose lengths are lognormal (sigma 0.8) with mean
mean_frac * max_length, cut at max_length (those are truncated), after prompts of 1/2 to all of
`--prompt` tokens (left-padded). The same rows, the same objective (GRPO, token-mean) and the
same micro-batches, trained two ways on one device, tiny random model (fp32):
  padded: [N, P + max_length], as without train.pack;
  packed: responses trimmed to the longest one (rounded up to --bucket), every micro-batch's
          sequences packed into rows of C = P + that width tokens (`rollout.to_train_batch(...,
          pack=...)`).
Each is compiled and warmed up, then both are timed in turn, rep by rep (median reported).
Padding fraction: slots the model runs on that hold no token.

Last line: `padding_fraction=<packed> speedup=<padded median / packed median>`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from lad_jax import objectives
from lad_jax import packing
from lad_jax import rollout
from lad_jax import sharding
from lad_jax import train
from lad_jax.models import Decoder
from lad_jax.models import testing


def make_rollout(*, rows: int, prompt: int, max_length: int, vocab: int, mean_frac: float,
                 seed: int = 0) -> rollout.Rollout:
  """Random rollout rows with lognormal response lengths (mean mean_frac * max_length)."""
  rng = np.random.default_rng(seed)
  sigma = 0.8
  mu = np.log(mean_frac * max_length) - sigma ** 2 / 2
  lengths = np.clip(rng.lognormal(mu, sigma, rows).astype(int), 1, max_length)
  prompt_len = rng.integers(prompt // 2, prompt + 1, rows)
  prompt_mask = np.arange(prompt)[None] >= prompt - prompt_len[:, None]
  response_mask = np.arange(max_length)[None] < lengths[:, None]
  objects = np.empty(rows, dtype=object)
  return rollout.Rollout(
      prompt_tokens=np.where(prompt_mask, rng.integers(1, vocab, (rows, prompt)), 0
                             ).astype(np.int32),
      prompt_mask=prompt_mask,
      response_tokens=np.where(response_mask, rng.integers(1, vocab, (rows, max_length)), 0
                               ).astype(np.int32),
      response_mask=response_mask,
      logp=np.where(response_mask, -np.log(vocab), 0.0).astype(np.float32),
      truncated=lengths >= max_length, lengths=lengths.astype(np.int32),
      rewards=rng.normal(size=rows).astype(np.float32), correct=np.zeros(rows, bool),
      texts=objects, reasons=objects, answers=objects, prompt_index=np.arange(rows))


def make_step(cfg, mesh, micro: int, chunk_size: int):
  """A jitted GRPO train step and a fresh state; returns run(batch) -> seconds."""
  tx = train.make_optimizer(lr=1e-6)
  state, shardings = train.create_train_state(Decoder(cfg), tx, jax.random.key(0), mesh=mesh)
  spec = train.StepSpec(model_cfg=cfg, objective=objectives.get("grpo"), tx=tx,
                        micro_batches=micro, chunk_size=chunk_size)
  step = train.jit_train_step(spec, mesh=mesh, state_shardings=shardings)
  holder = [state]

  def run(batch) -> float:
    t0 = time.perf_counter()
    holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=32)
  parser.add_argument("--max_length", type=int, default=1024)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--micro", type=int, default=2)
  parser.add_argument("--bucket", type=int, default=128)
  parser.add_argument("--capacity", type=int, default=0, help="tokens per packed row (0: P + R')")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--vocab", type=int, default=1024)
  parser.add_argument("--mean_frac", type=float, default=0.3)
  args = parser.parse_args()

  cfg = testing.tiny_config("llama", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                            num_layers=args.layers, num_heads=4, num_kv_heads=2,
                            head_dim=args.hidden // 4, vocab_size=args.vocab)
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  r = make_rollout(rows=args.rows, prompt=args.prompt, max_length=args.max_length,
                   vocab=args.vocab, mean_frac=args.mean_frac)
  settings = packing.PackSettings(micro_batches=args.micro, length_bucket=args.bucket,
                                  capacity=args.capacity)
  batches = {"padded": rollout.to_train_batch(r, mesh=mesh),
             "packed": rollout.to_train_batch(r, mesh=mesh, pack=settings)}
  plan = packing.plan(r.prompt_mask, r.response_mask, settings)
  tokens = int(r.prompt_mask.sum() + r.response_mask.sum())
  slots = {"padded": r.prompt_mask.size + r.response_mask.size,
           "packed": plan.segment_ids_RC.size}
  shapes = {"padded": f"{args.rows} x {args.prompt + args.max_length}",
            "packed": f"{plan.segment_ids_RC.shape[0]} x {plan.capacity}"}
  steps = {name: make_step(cfg, mesh, args.micro, chunk_size=256) for name in batches}
  for name, batch in batches.items():  # compile + warm up
    steps[name](batch)
    steps[name](batch)
  times = {name: [] for name in batches}
  for _ in range(args.reps):
    for name, batch in batches.items():
      times[name].append(steps[name](batch))
  print(f"{args.rows} rows, prompt {args.prompt}, max response {args.max_length}, mean "
        f"response {r.lengths.mean():.0f}, {tokens} tokens; model {args.layers} x {args.hidden}, "
        f"vocab {args.vocab}; micro_batches {args.micro}; {jax.devices()[0].platform}")
  print(f"{'batch':8s} {'model rows x cols':>18s} {'slots':>8s} {'padding':>8s} "
        f"{'step median s':>14s}")
  median = {name: statistics.median(t) for name, t in times.items()}
  for name in batches:
    pad = 1.0 - tokens / slots[name]
    print(f"{name:8s} {shapes[name]:>18s} {slots[name]:8d} {pad:8.3f} {median[name]:14.3f}")
  print(f"padding_fraction={1.0 - tokens / slots['packed']:.3f} "
        f"speedup={median['padded'] / median['packed']:.2f}")


if __name__ == "__main__":
  main()
