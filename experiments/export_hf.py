r"""Exports a run's checkpoint as a Hugging Face model directory (safetensors + config + tokenizer).

  python experiments/export_hf.py --workdir=/tmp/lad_runs/smollm2_135m --out=/tmp/smollm2_rl
  python experiments/export_hf.py --workdir=/tmp/lad_runs/tiny --step=2 --out=/tmp/tiny_hf

Restores the newest intact checkpoint (or --step) with the run's saved config.json and writes
config.json, generation_config.json, model.safetensors (sharded above 4 GiB) and the run's
tokenizer files, so `transformers.AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` load it (vLLM / SGLang serve it). The byte-level tokenizer
of random test models has no Hugging Face form: then only weights and config are written.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from lad_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (config.json, checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest intact one.")
_OUT = flags.DEFINE_string("out", None, "Output directory (created).")
_DTYPE = flags.DEFINE_string("dtype", None, "Stored dtype, e.g. bfloat16; default: the run's "
                             "parameter dtype.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("pass --workdir=<run workdir> and --out=<output directory>")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from lad_jax import policy  # pylint: disable=g-import-not-at-top
  print(policy.export_run(_WORKDIR.value, step=_STEP.value, out_dir=_OUT.value,
                          dtype=_DTYPE.value))


if __name__ == "__main__":
  cli.run_main(main, prog="export_hf")
