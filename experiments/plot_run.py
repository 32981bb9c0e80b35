r"""Figures of one run: training curves and pass@k from its metrics.jsonl (e.g. after `make run`).

  python experiments/plot_run.py --workdir=/tmp/lad_runs/smollm2_135m
  # -> <workdir>/figures/training.png, pass_at_k.png

All logic is in `lad_jax.plots.run_figures`.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from lad_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from lad_jax import plots  # pylint: disable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/lad_runs/smollm2_135m", "The run's workdir.")
_OUT = flags.DEFINE_string("out", None, "Where the figures go (default <workdir>/figures).")
_WINDOW = flags.DEFINE_integer("window", 5, "Moving-average window of the curves, in steps.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = os.path.expanduser(_WORKDIR.value)
  for path in plots.plot_workdir(workdir, out_dir=_OUT.value, window=_WINDOW.value):
    print(path)


if __name__ == "__main__":
  cli.run_main(main, prog="plot_run")
