r"""The controlled 50-arm bandit of LAD Sec. 4.1 (paper Figures 1 and 2).

  python experiments/bandit.py                       # the paper's setting, sampled + exact mode
  python experiments/bandit.py --mode=exact --methods=lad_js,lad_tv,grpo --refreshes=0
  python experiments/bandit.py --eta=0.5,1,2 --seeds=10 --out=runs/bandit_eta

Writes fig1*.png, fig2*.png, results.json and results.md to --out. All logic is in
`lad_jax.bandit`; see its docstring for the methods, modes and metrics. A bad flag value is one
line on stderr (`bandit: error: ...`, exit status 2; --verbose or LAD_VERBOSE=1: the traceback).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from lad_jax import bandit
from lad_jax import cli

_STEPS = flags.DEFINE_integer("steps", 4000, "Adam steps per run.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds per method (runs 0..seeds-1, vmapped).")
_METHODS = flags.DEFINE_list("methods", list(bandit.DEFAULT_METHODS),
                             "Methods: pg, grpo, grpo_noclip, flowrl, flowrl_authors, lad_<div>, "
                             "lad_theoretical_<div>.")
_ETA = flags.DEFINE_list("eta", ["1.0"], "LAD temperature(s); several values are vmapped.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.5, "Sampling temperature of pi_old (sampled).")
_EXACT_TEMPERATURE = flags.DEFINE_float(
    "exact_temperature", 1.0, "Exact mode weights arms by softmax(old_logits / this).")
_MODE = flags.DEFINE_enum("mode", "both", ["sampled", "exact", "both"], "Which mode(s) to run.")
_REFRESHES = flags.DEFINE_integer("refreshes", 2, "pi_old refreshes, evenly spaced.")
_LR = flags.DEFINE_float("lr", 5e-3, "Adam learning rate.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Arms drawn per step (sampled mode).")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Keep the logits every this many steps.")
_OUT = flags.DEFINE_string("out", "runs/bandit", "Output directory.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Flag values out of range (eta=0, nan, ...) stop here, one line, before anything runs.
  etas = bandit.validate(
      eta=_ETA.value, methods=_METHODS.value, steps=_STEPS.value, seeds=_SEEDS.value,
      lr=_LR.value, batch_size=_BATCH_SIZE.value, temperature=_TEMPERATURE.value,
      exact_temperature=_EXACT_TEMPERATURE.value, refreshes=_REFRESHES.value,
      log_every=_LOG_EVERY.value)
  config = bandit.BanditConfig(
      steps=_STEPS.value, lr=_LR.value, batch_size=_BATCH_SIZE.value,
      temperature=_TEMPERATURE.value, exact_temperature=_EXACT_TEMPERATURE.value,
      refreshes=_REFRESHES.value, log_every=_LOG_EVERY.value)
  modes = bandit.MODES if _MODE.value == "both" else (_MODE.value,)
  bandit.main(config, methods=_METHODS.value, modes=modes, etas=etas,
              num_seeds=_SEEDS.value, out_dir=_OUT.value,
              command=" ".join(["python", "experiments/bandit.py", *sys.argv[1:]]))


if __name__ == "__main__":
  cli.run_main(main, prog="bandit")
