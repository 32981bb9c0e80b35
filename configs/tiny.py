"""A tiny random model on chain_sum with a byte-level tokenizer: the RL loop in seconds (tests).

  python experiments/math_rl.py --config=configs/tiny.py --config.workdir=/tmp/lad_tiny

Nothing is learnt (the model is random and 2 layers deep); every stage of the loop runs: rollouts,
reasoning-gym verification, advantages, mini-batch updates, evaluation and checkpoints.
"""

from __future__ import annotations

from lad_jax import config_utils


def get_config(arg=None):
  c = config_utils.base_config()
  c.name = "tiny"
  c.model.source = "random"
  # lad_jax.models.testing.TINY, with EOS = the byte tokenizer's id 1.
  c.model.random = dict(architecture="qwen2", vocab_size=128, hidden_size=64,
                        intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, qkv_bias=True, initializer_range=0.2, eos_token_ids=(1,),
                        pad_token_id=0)
  c.tokenizer.kind = "char"
  c.data.task = "procedural"
  c.data.train = "chain_sum"
  c.data.eval = "chain_sum"
  c.data.template = "procedural"
  c.data.difficulty = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)
  c.data.procedural_size = 64
  c.data.procedural_eval_size = 8
  c.data.max_prompt_tokens = 256
  c.sampling.group_size = 4
  c.sampling.max_new_tokens = 8
  c.sampling.prompt_buckets = (256,)
  c.train.num_steps = 2
  c.train.prompts_per_step = 4
  c.train.mini_batches = 2
  c.optim.lr = 1e-3  # large, so two steps visibly move a random model
  c.eval.every = 2
  c.eval.num_prompts = 4  # the rollout shape (4 prompts x 4), so eval reuses its compiled sampler
  c.eval.samples = 4
  c.eval.pass_k = (1, 2)
  c.verifier.workers = 1
  c.log.progress_bar = False
  return config_utils.finalize(c, arg)
