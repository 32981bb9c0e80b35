r"""RL post-training of an LLM with LAD or a baseline (DESIGN §4); all logic is in `lad_jax.rl`.

  python experiments/math_rl.py                                  # SmolLM2-135M on chain_sum (CPU)
  python experiments/math_rl.py --config=configs/qwen7b.py \
      --config.model.path=/data/Qwen2.5-7B --config.data.source_dir=/data/lad_sources
  python experiments/math_rl.py --config=configs/qwen7b.py:smoke   # same pipeline, CPU-sized
  python experiments/math_rl.py --config.loss.name=grpo --config.loss.hparams.grpo.eps_high=0.28

Every registered objective is one `--config.loss.name=` away (`lad_jax.objectives.names()`); its
hyperparameters are `--config.loss.hparams.<name>.<param>=`. A misspelt key, an unknown objective
or a missing model / data file stops the run before anything is compiled, with a message naming
the problem, and a non-zero exit status. A run restarted with the same workdir resumes from its
latest checkpoint. Such an error is one line on stderr (`math_rl: error: ...`, exit status 2);
--verbose or LAD_VERBOSE=1 shows its traceback. Multi-host: pass --config.distributed=True on
every host (calls jax.distributed.initialize(), which reads the cluster from SLURM / TPU metadata
or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID environment variables).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

# Runs from a checkout without `pip install -e .`: configs and lad_jax live next to this folder.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from lad_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from lad_jax import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from lad_jax import rl  # pylint: disable=g-import-not-at-top,wrong-import-position
from lad_jax import xla_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_ROOT, "configs", "smollm2_135m.py"),
    "Config file (configs/*.py), optionally with ':smoke'.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax / tfds INFO lines would bury the progress bar
    # tfds warns once per generated dataset that its builder config is ours, not a registered one.
    logging.get_absl_logger().addFilter(
        lambda record: not record.getMessage().startswith("Using custom data configuration"))
  if xla_cpu.cpu_only():  # before JAX starts its threads: ~10% faster CPU train steps
    xla_cpu.retain_freed_memory()
  config = _CONFIG.value
  t0 = time.perf_counter()
  rl.train_and_evaluate(config)
  if jax.process_index() == 0:
    print(report.summary(config, wall_s=time.perf_counter() - t0))


if __name__ == "__main__":
  # A config / flag / data-file problem is one line on stderr and exit status 2 (--verbose or
  # LAD_VERBOSE=1: the traceback).
  cli.run_main(main, prog="math_rl")
