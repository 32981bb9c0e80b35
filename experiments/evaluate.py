r"""Held-out evaluation of a checkpoint or of a config's initial model; the RL loop's own code.

  python experiments/evaluate.py --checkpoint=/tmp/lad_runs/tiny            # newest intact step
  python experiments/evaluate.py --checkpoint=/tmp/lad_runs/tiny/checkpoints/2 --out=/tmp/ev
  python experiments/evaluate.py --config=configs/qwen7b.py --config.model.path=/data/Qwen2.5-7B
  python experiments/evaluate.py --config=configs/tiny.py --config.eval.samples=8   # random model

Samples `eval.samples` = k responses for the first `eval.num_prompts` prompts of every held-out
set (config.data.eval) with the loop's sampler, settings and key (`policy.evaluate_policy`), and
reports Avg@k, unbiased Pass@k for every k from 1 to k, distinct-3/4 and distinct correct
solutions. Without --checkpoint the config's model (HF dir / GGUF / random init) is evaluated, as
the loop's step 0 (eval.before_train) does. With --checkpoint the run's saved config.json gives
the model, tokenizer and (without --config) the evaluation settings; with --config, that config's
data / eval / sampling settings are used. Writes <out>/results.json and <out>/results.md (default
<workdir>/eval/step_<N> or <workdir>/eval/initial) and prints the markdown tables.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from lad_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py); default with --checkpoint: the run's saved "
    "config.json.", lock_config=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A run's workdir (its newest intact checkpoint) or "
    "<workdir>/checkpoints/<step>; default: the config's initial model.")
_OUT = flags.DEFINE_string("out", None, "Output directory of results.json / results.md.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(  # tfds: once per procedural set built on first use
        lambda record: not record.getMessage().startswith("Using custom data configuration"))
  from lad_jax import policy  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if _CHECKPOINT.value is None and config is None:
    raise app.UsageError("pass --config=<configs/*.py> (its initial model) or "
                         "--checkpoint=<workdir>[/checkpoints/<step>]")
  result = policy.run_evaluation(config=config, checkpoint=_CHECKPOINT.value, out_dir=_OUT.value)
  if result is not None:
    print(result)


if __name__ == "__main__":
  cli.run_main(main, prog="evaluate")
