"""Presets shared by several configs/*.py files (imported from the package, not via sys.path).

  c = config_presets.math_protocol(config_utils.base_config())   # the paper's math protocol
"""

from __future__ import annotations

from ml_collections import ConfigDict

MATH_EVALS = "math500,aime2024,aime2025,amc,olympiadbench,minerva"


def math_protocol(c: ConfigDict) -> ConfigDict:
  """The paper's math protocol (LAD Sec. 5, App. C.2; configs/qwen7b.py's docstring): Qwen2.5-7B
  setting of entropy-mechanism's DAPO-style scripts, shared by the 7B and 1.5B configs."""
  c.model.source = "hf"
  c.model.param_dtype = "bfloat16"
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "full"
  c.data.task = "math"
  c.data.train = "dapo_math_17k"
  c.data.eval = MATH_EVALS
  c.data.source_dir = "~/lad_sources"
  c.data.template = "dapo"
  c.data.max_prompt_tokens = 2048
  c.verifier.reward = "dapo"  # +1 / -1 (verl math_dapo)
  c.verifier.workers = 16
  c.sampling.group_size = 8
  c.sampling.max_new_tokens = 8192
  c.sampling.temperature = 1.0
  c.sampling.prompt_buckets = (256, 512, 1024, 2048)
  # 2048 rows at once would need a ~600 GB bf16 KV cache for a 7B model (57 KB per token slot x
  # (2048 + 8192) slots per row); 256 rows is ~150 GB, ~19 GB per device over 8 devices. The 7B
  # configs go down to 128 (`seven_b_layout`).
  c.sampling.rows_per_call = 256
  # Continuous batching over as many slots (lad_jax/continuous.py): RLVR response lengths are
  # long-tailed, and lock-step chunks would decode until their longest row ends.
  c.sampling.decode_slots = 256
  c.train.prompts_per_step = 256
  c.train.mini_batches = 8  # 8 policy updates per rollout
  c.train.micro_batches = 16
  c.train.chunk_size = 1024
  c.optim.lr = 1e-6
  c.optim.weight_decay = 0.1
  c.optim.warmup_steps = 10
  c.optim.grad_clip = 1.0
  c.dynamic_sampling.enabled = True
  c.dynamic_sampling.max_gen_batches = 10
  c.loss.name = "lad"
  c.loss.hparams.lad.divergence = "js"
  c.loss.hparams.lad.eta = 0.25
  # Clip-higher for every clipped baseline (DAPO); KL-Cov at the 7B k_ratio; Clip-Cov keeps its
  # authors' eps 1 / 1 (no PPO clip).
  for name in ("grpo", "drgrpo", "entadv"):
    c.loss.hparams[name].eps_low = 0.2
    c.loss.hparams[name].eps_high = 0.28
    c.loss.hparams[name].clip_ratio_c = 10.0
  c.loss.hparams.kl_cov.k_ratio = 2e-3
  c.eval.every = 10
  c.eval.num_prompts = 1000  # whole sets (the largest, MATH500 / OlympiadBench, are smaller)
  c.eval.samples = 32
  c.eval.pass_k = (1, 8, 16, 32)
  c.eval.temperature = 1.0
  c.eval.top_p = 0.7  # DAPO's validation top_p
  c.checkpoint.every = 10
  c.log.progress_bar = True
  return c


def seven_b_layout(c: ConfigDict) -> ConfigDict:
  """The layout a 7B model needs on 8 x 80 GB (`benchmarks/memory_plan.py`, README results):
  tensor parallelism 2 x FSDP 4, so that decoding (weights gathered over FSDP only, once per
  rollout) holds half the weights per device, and 128 rollout rows decoded at a time (a KV
  cache of ~9 GB per device). At 256 rows x tensor 1 the plan's decode peak was 104 GiB per device."""
  c.mesh.data = 1
  c.mesh.tensor = 2
  c.mesh.fsdp = -1
  c.sampling.rows_per_call = 128
  c.sampling.decode_slots = 128
  return c
