"""The paper's math setting (LAD Sec. 5, App. C.2): Qwen2.5-7B on DAPO-Math-17k, LAD-JS.

Protocol of entropy-mechanism's DAPO-style 7B scripts (shared/reference/baselines.md §3): 256
prompts x 8 samples per rollout, responses up to 8192 tokens, temperature 1, 8 policy updates per
rollout (mini-batches of 32 prompts), lr 1e-6, dynamic sampling (accuracy filter, up to 10
generation rounds), clip-higher (eps 0.2 / 0.28, dual clip 10) for the clipped baselines, token-mean,
no KL, DAPO's +1/-1 reward. LAD: Jensen-Shannon, 1/eta = 4 (eta = 0.25). Evaluation: MATH500,
AIME 2024 / 2025, AMC, OlympiadBench, Minerva with Avg@32 / Pass@32.

Put the model (config.json, *.safetensors, tokenizer files) in --config.model.path and the dataset
files (lad_jax/data/sources.py names them) in --config.data.source_dir:

  python experiments/math_rl.py --config=configs/qwen7b.py \
      --config.model.path=~/models/Qwen2.5-7B --config.data.source_dir=~/lad_sources
  python experiments/math_rl.py --config=configs/qwen7b.py --config.loss.name=flowrl  # baselines
  python experiments/math_rl.py --config=configs/qwen7b.py:smoke   # same pipeline, SmolLM2, CPU
"""

from __future__ import annotations

from lad_jax import config_presets
from lad_jax import config_utils

def get_config(arg=None):
  c = config_utils.base_config()
  c.name = "qwen7b_math_lad"
  c = config_presets.seven_b_layout(config_presets.math_protocol(c))
  c.model.path = "~/models/Qwen2.5-7B"
  # The paper does not state the number of steps; entropy-mechanism's curves run ~300.
  c.train.num_steps = 300
  return config_utils.finalize(c, arg)
