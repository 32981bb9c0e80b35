"""Thinkless-DeepScaleR-1.5B with the math protocol of qwen7b.py, max length 4096 (Table 3).

  python experiments/math_rl.py --config=configs/deepscaler1p5b.py \
      --config.model.path=~/models/Thinkless-DeepScaleR-1.5B --config.data.source_dir=~/lad_sources
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qwen7b  # pylint: disable=g-import-not-at-top,wrong-import-position

from lad_jax import config_utils  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  c = config_utils.base_config()
  c.name = "deepscaler1p5b_math_lad"
  c = qwen7b.math_protocol(c)
  c.model.path = "~/models/Thinkless-DeepScaleR-1.5B"
  c.sampling.max_new_tokens = 4096
  c.train.micro_batches = 8
  c.train.num_steps = 300
  return config_utils.finalize(c, arg)
