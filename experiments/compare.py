r"""Several objectives x seeds (x one swept hyperparameter) through the same RL loop, one table.

  python experiments/compare.py --config=configs/multi_answer.py --methods=lad,grpo --seeds=3 \
      --workdir=/tmp/lad_runs/cmp
  python experiments/compare.py --config=configs/smollm2_135m.py --methods=lad --seeds=2 \
      --sweep=loss.hparams.lad.eta:0.5,1,2,4 --workdir=/tmp/lad_runs/eta

Each run gets <workdir>/<method>[_<key>=<value>]_s<seed>; rerunning the command skips finished
runs (those with summary.json) and resumes an interrupted one. The table (table.md, table.json:
mean +- std over seeds) and the figures (figures/*.png) go to <workdir>. --report_only makes them
from the finished runs without training (e.g. while runs of other methods go on elsewhere).
All logic is in `lad_jax.compare`.
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
from lad_jax import compare  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_ROOT, "configs", "smollm2_135m.py"), "Base config of every run.",
    lock_config=False)
_METHODS = flags.DEFINE_list("methods", ["lad", "grpo"], "Objectives (config loss.name).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds 0..seeds-1 per method (and swept value).")
_SWEEP = flags.DEFINE_string("sweep", None, "key:v1,v2,... e.g. loss.hparams.lad.eta:0.5,1,2")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/lad_runs/compare", "Where the runs go.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only the table and figures of the "
                                 "finished runs; trains nothing.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax / tfds INFO lines would bury the progress
  compare.main(_CONFIG.value, methods=_METHODS.value, seeds=_SEEDS.value,
               sweep=_SWEEP.value, workdir=os.path.expanduser(_WORKDIR.value),
               report_only=_REPORT_ONLY.value)


if __name__ == "__main__":
  cli.run_main(main, prog="compare")
