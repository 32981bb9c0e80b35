"""Test helpers: the tiny config (configs/tiny.py) and a run's workdir written without training.

  config, params = save_tiny_run(tmp_path, steps=(1, 2))   # config.json + checkpoints/1, /2

`save_tiny_run` saves what the RL loop saves (a `train.create_train_state` state of the config,
with `Checkpointer`, and the config with `run_dir.record_config`), with random parameters that
differ per step, in a few seconds instead of a training run's compile.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np

from lad_jax import checkpoint
from lad_jax import components
from lad_jax import policy
from lad_jax import run_dir
from lad_jax import train
from lad_jax.models import Decoder
from lad_jax.models import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tmp_dir, name="lad", **changes):
  """configs/tiny.py with loss `name`, workdir `tmp_dir`, and dotted-key `changes`."""
  spec = importlib.util.spec_from_file_location("config_tiny",
                                                os.path.join(ROOT, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.loss.name = name
  c.workdir = str(tmp_dir)
  c.data.data_dir = str(os.path.join(tmp_dir, "data"))
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def save_tiny_run(workdir, *, name="lad", steps=(1,), **changes):
  """A workdir as the loop leaves it; returns (config, {step: host params of the decoder})."""
  config = tiny_config(workdir, name=name, **changes)
  mesh = components.make_mesh(config)
  cfg = policy.model_config(config)
  objective, _ = components.make_objective(config)
  saved = {}
  with checkpoint.Checkpointer(os.path.join(str(workdir), "checkpoints")) as ckpt:
    for step in steps:
      params = testing.random_params(cfg, seed=step)
      state, _ = train.create_train_state(
          Decoder(cfg), components.make_optimizer(config), jax.random.key(step), mesh=mesh,
          params=params, with_logz_head=objective.needs_log_z)
      ckpt.save(step, state, {"step": step, "data_position": 0, "name": config.name})
      saved[step] = jax.tree.map(np.asarray, params)
  run_dir.record_config(str(workdir), config, start_step=0)
  return config, saved


def fake_task(num_records=16):
  """Questions in memory, no verifier process; correct = a response at least 1/4 digits (so a
  random byte-level model gets some right and Pass@k varies with k)."""
  from lad_jax import tasks  # pylint: disable=g-import-not-at-top
  from lad_jax.verifiers import Result  # pylint: disable=g-import-not-at-top
  records = [{"question": f"What is {i} + {i % 7}?"} for i in range(num_records)]

  def score(responses, recs):
    assert len(responses) == len(recs)
    shares = [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in responses]
    return [Result(reward=s, correct=s >= 0.25, reason="fake") for s in shares]

  return tasks.Task(train=records, evals={"fake": records[:4]}, question=lambda r: r["question"],
                    score=score)
