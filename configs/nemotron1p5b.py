"""OpenMath-Nemotron-1.5B with the math protocol of qwen7b.py, max length 4096 (App. C.2, Table 3).

  python experiments/math_rl.py --config=configs/nemotron1p5b.py \
      --config.model.path=~/models/OpenMath-Nemotron-1.5B --config.data.source_dir=~/lad_sources
"""

from __future__ import annotations

from lad_jax import config_presets
from lad_jax import config_utils


def get_config(arg=None):
  c = config_utils.base_config()
  c.name = "nemotron1p5b_math_lad"
  c = config_presets.math_protocol(c)
  c.model.path = "~/models/OpenMath-Nemotron-1.5B"
  c.sampling.max_new_tokens = 4096  # "For the two 1.5B models, we change the max lengths to 4096"
  c.train.micro_batches = 8
  c.train.num_steps = 300
  return config_utils.finalize(c, arg)
