"""Does one RL step of a config fit its accelerators? Compiles every program, runs nothing.

  python benchmarks/memory_plan.py --config=configs/qwen7b.py [--device_memory_gb=80]
      [--devices=8] [--model_shape=qwen2.5-7b] [--num_layers=2] [--config.sampling.rows_per_call=128]

Simulates --devices CPU devices (XLA_FLAGS, set before jax is imported), builds the config's mesh,
abstract parameters (the local config.json at model.path, else the published shape named by the
path or by --model_shape: lad_jax/models/shapes.py) and every jitted program of one step with its
real shapes and shardings, and prints XLA's per-device memory of each (lad_jax/memory_plan.py)
against device memory x config.runtime.memory_fraction. --device_memory_gb is in GiB (an
"80 GB" H100 reports 79.6). --num_layers cuts the depth for a quick run: resident state scales
with it exactly, one layer's temporaries do not.

Last line: `fits=<True|False> worst=<program> peak_gib=<x> budget_gib=<y>`; before it, one line
per over-budget program naming the knob (and the value that would fit, where computable).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_MEMORY = flags.DEFINE_float("device_memory_gb", 80.0, "Memory of one accelerator, GiB.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Accelerators (simulated as CPU devices).")
_SHAPE = flags.DEFINE_string("model_shape", None, "A published shape (lad_jax/models/shapes.py) "
                             "instead of model.path's config.json / name.")
_LAYERS = flags.DEFINE_integer("num_layers", None, "Override the depth (quick runs).")
_PLATFORM = flags.DEFINE_string("platform", "gpu", "The accelerator the run targets.")


def main(argv):
  del argv
  from lad_jax import memory_plan  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)
  plan = memory_plan.build_plan(
      _CONFIG.value, device_memory_gb=_MEMORY.value, model_shape=_SHAPE.value,
      num_layers=_LAYERS.value, platform=_PLATFORM.value,
      log=lambda s: print(s, file=sys.stderr, flush=True))
  print(memory_plan.report(plan))


def _set_device_count(argv: list[str]) -> None:
  """XLA_FLAGS' host device count from --devices, before anything imports jax."""
  n = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), "8")
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
  _set_device_count(sys.argv)
  from lad_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
  cli.run_main(main, prog="memory_plan")
