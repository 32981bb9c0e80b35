r"""The sequence bandit (issue 17): a tiny decoder on "pick a number" prompts whose 100 responses
per prompt are enumerated, so pi(y|x), LAD's sequence-level pi* and every metric are exact.

  python experiments/seq_bandit.py                               # all methods, both modes, 5 seeds
  python experiments/seq_bandit.py --mode=exact --methods=lad_js,lad_seq_js,grpo --seeds=3

Writes results.json, results.md and fig_<method>.png to --out. All logic is in
`lad_jax.seq_bandit` (runs), `lad_jax.seq_bandit_methods` (methods), `lad_jax.seq_bandit_metrics`
and `lad_jax.seq_bandit_report` (the sweep and its outputs). A bad flag value is one line on stderr
(`seq_bandit: error: ...`, exit status 2).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from lad_jax import cli
from lad_jax import seq_bandit
from lad_jax import seq_bandit_methods
from lad_jax import seq_bandit_report
from lad_jax.errors import ConfigError

_D = seq_bandit.SeqBanditConfig()
_METHODS = flags.DEFINE_list("methods", list(seq_bandit_methods.DEFAULT_METHODS),
                             "Methods: lad_<div>, lad_seq_<div>, lad_seqmean_<div>, "
                             "lad_theoretical_<div>, grpo, grpo_kl, drgrpo, gspo, flowrl, "
                             "alpha_dpg, pg.")
_MODE = flags.DEFINE_enum("mode", "both", ["exact", "sampled", "both"], "Which mode(s) to run.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds 0..seeds-1 (each its own pi_0; vmapped).")
_ETA = flags.DEFINE_float("eta", _D.eta, "LAD temperature (flowrl: beta = 1/eta).")
_PHASES = flags.DEFINE_integer("phases", _D.phases, "pi_old refreshes + 1.")
_STEPS = flags.DEFINE_integer("steps_per_phase", _D.steps_per_phase, "Updates per pi_old (K).")
_LOG_EVERY = flags.DEFINE_integer("log_every", _D.log_every, "Evaluate every this many updates.")
_LR = flags.DEFINE_float("lr", _D.lr, "AdamW learning rate of the RL updates.")
_GROUP = flags.DEFINE_integer("group_size", _D.group_size, "G samples per prompt per update.")
_PRETRAIN = flags.DEFINE_integer("pretrain_steps", _D.pretrain_steps, "Adam steps making pi_0.")
_OUT = flags.DEFINE_string("out", "runs/seq_bandit", "Output directory.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for name, flag in (("seeds", _SEEDS), ("phases", _PHASES), ("steps_per_phase", _STEPS),
                     ("log_every", _LOG_EVERY), ("group_size", _GROUP),
                     ("pretrain_steps", _PRETRAIN)):
    if flag.value < 1:
      raise ConfigError(f"--{name}={flag.value} must be >= 1.")
  if not _ETA.value > 0 or not _LR.value > 0:
    raise ConfigError(f"--eta={_ETA.value} and --lr={_LR.value} must be > 0.")
  for name in _METHODS.value:
    why = seq_bandit_methods.available(name, eta=_ETA.value)
    if why:
      raise ConfigError(f"--methods: {why}")
  try:
    config = seq_bandit.SeqBanditConfig(
        eta=_ETA.value, phases=_PHASES.value, steps_per_phase=_STEPS.value,
        log_every=_LOG_EVERY.value, lr=_LR.value, group_size=_GROUP.value,
        pretrain_steps=_PRETRAIN.value)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  modes = seq_bandit.MODES if _MODE.value == "both" else (_MODE.value,)
  seq_bandit_report.main(config, methods=_METHODS.value, modes=modes, seeds=range(_SEEDS.value),
                         out_dir=_OUT.value,
                         command=" ".join(["python", "experiments/seq_bandit.py", *sys.argv[1:]]))


if __name__ == "__main__":
  cli.run_main(main, prog="seq_bandit")
