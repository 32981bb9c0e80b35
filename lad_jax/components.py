"""Component builders: the model, tokenizer, objective, optimizer, sampler and mesh of a config.

These (and `rl.train_and_evaluate`) are the only functions that read the ConfigDict; what they
build takes plain arguments. DESIGN §1.

  mesh = components.make_mesh(config)
  model_cfg, params = components.load_model(config, mesh)
  objective, estimator = components.make_objective(config)
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax

from lad_jax import advantages as advantages_lib
from lad_jax import config_utils
from lad_jax import objectives
from lad_jax import scoring
from lad_jax import sharding
from lad_jax import train as train_lib
from lad_jax.models.tokenizer import CharTokenizer

ConfigError = config_utils.ConfigError
# Independent key streams derived from the run key: fold_in(fold_in(run_key, stream), step).
STATE_KEY, ROLLOUT_KEY, EVAL_KEY, MODEL_KEY = 1, 2, 3, 4


def model_overrides(config) -> dict[str, Any]:
  """The ModelConfig fields config.model sets over a checkpoint's own (dtypes, remat,
  attention): the loop's and `policy.model_config`'s."""
  m = config.model
  return dict(param_dtype=m.param_dtype, dtype=m.dtype, remat_policy=m.remat_policy,
              attention_impl=m.attention_impl, attention_max_segments=m.attention_max_segments,
              decode_block_size=m.decode_block_size, decode_attention=m.decode_attention)


def load_model(config, mesh) -> tuple[Any, Any]:
  """(ModelConfig, params placed into the mesh) from config.model; deterministic for a config."""
  from lad_jax import models  # pylint: disable=g-import-not-at-top
  src = config.model.source
  if src == "gguf":
    path = config.model.path or models.find_smollm2_gguf()
    return models.load_gguf(os.path.expanduser(path), mesh=mesh, **model_overrides(config))
  if src == "hf":
    return models.load_hf(os.path.expanduser(config.model.path), mesh=mesh,
                          **model_overrides(config))
  cfg = models.ModelConfig(**dict(config.model.random), **model_overrides(config))
  key = jax.random.fold_in(jax.random.key(config.seed), MODEL_KEY)
  return cfg, models.init_params(cfg, key, mesh=mesh)


def load_tokenizer(config, model_cfg) -> Any:
  if config.tokenizer.kind == "char":
    return CharTokenizer(model_cfg.vocab_size)
  from lad_jax import models  # pylint: disable=g-import-not-at-top
  path = config.tokenizer.path or config.model.path
  if path is None and config.model.source == "gguf":
    path = models.find_smollm2_gguf()
  return models.load_tokenizer(os.path.expanduser(path))


def special_ids(tokenizer: Any, model_cfg) -> tuple[list[int], int]:
  """(EOS ids, pad id): the model config's EOS ids plus the tokenizer's, pad falls back to EOS."""
  eos = [int(e) for e in (model_cfg.eos_token_ids or ())]
  tok_eos = getattr(tokenizer, "eos_token_id", None)
  if tok_eos is not None and int(tok_eos) not in eos:
    eos.append(int(tok_eos))
  if not eos:
    raise ConfigError("Neither the model config nor the tokenizer defines an EOS token.")
  pad = getattr(tokenizer, "pad_token_id", None)
  if pad is None:
    pad = model_cfg.pad_token_id if model_cfg.pad_token_id is not None else eos[0]
  return eos, int(pad)


def maybe_initialize_distributed(config) -> None:
  """jax.distributed.initialize() when config.distributed is set (before any device use).

  The cluster comes from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID when they
  are set (jax itself reads only the first), else from jax's auto-detection (SLURM, Open MPI,
  TPU pods, ...). `jax.process_count()` must not be asked first: it would start the backend.
  """
  if config.distributed and not jax.distributed.is_initialized():
    env = os.environ
    kwargs = {}
    if "JAX_NUM_PROCESSES" in env or "JAX_PROCESS_ID" in env:
      missing = [v for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
                 if v not in env]
      if missing:
        raise ConfigError(f"config.distributed with JAX_NUM_PROCESSES / JAX_PROCESS_ID set "
                          f"also needs {missing} in the environment of every process.")
      kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                    num_processes=int(env["JAX_NUM_PROCESSES"]),
                    process_id=int(env["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)


def make_mesh(config) -> Any:
  """The (data, fsdp, tensor) mesh of config.mesh; a mini-batch must split over its batch axes."""
  mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp,
                            tensor=config.mesh.tensor)
  rows_per_update = (config.train.prompts_per_step * config.sampling.group_size
                     // config.train.mini_batches)
  if rows_per_update % train_lib.batch_devices(mesh):
    raise ConfigError(f"A mini-batch of {rows_per_update} rows does not split over the "
                      f"{train_lib.batch_devices(mesh)} data/fsdp devices; change "
                      "train.prompts_per_step, sampling.group_size, train.mini_batches or "
                      "config.mesh.")
  return mesh


class Estimator(NamedTuple):
  """The advantage estimator (`lad_jax.advantages`) and its hyperparameters."""

  name: str
  hparams: dict[str, Any]


def make_objective(config) -> tuple[objectives.Objective, Estimator]:
  """The objective of config.loss and its advantage estimator (config.advantage or its own)."""
  objective = objectives.get(config.loss.name, agg_mode=config.loss.agg_mode,
                             **config_utils.loss_kwargs(config))
  name = config.advantage.estimator or objective.advantage_estimator
  return objective, Estimator(name, config_utils.estimator_kwargs(config, name))


def needs_ref(objective: objectives.Objective, estimator: Estimator) -> bool:
  """Whether the loop scores the reference model (the objective's or the estimator's need)."""
  return objective.needs_ref or advantages_lib.needs_ref(estimator.name)


def make_optimizer(config) -> Any:
  """AdamW of config.optim, scheduled over every optimizer step of the run."""
  o, t = config.optim, config.train
  return train_lib.make_optimizer(
      lr=o.lr, warmup_steps=o.warmup_steps, weight_decay=o.weight_decay, grad_clip=o.grad_clip,
      b1=o.b1, b2=o.b2, eps=o.eps, schedule=o.schedule,
      total_steps=max(1, t.num_steps * t.mini_batches * t.epochs))


def make_sampler(config, model_cfg, tokenizer, mesh) -> Any:
  """The rollout sampler (prompt buckets, stop strings, rows per call of config.sampling):
  lock step, or continuous batching with `sampling.decode_slots` > 0."""
  from lad_jax import continuous  # pylint: disable=g-import-not-at-top
  from lad_jax.models import Decoder  # pylint: disable=g-import-not-at-top
  from lad_jax.sampler import Sampler  # pylint: disable=g-import-not-at-top
  s = config.sampling
  eos_ids, pad_id = special_ids(tokenizer, model_cfg)
  kw = dict(eos_ids=eos_ids, pad_id=pad_id, mesh=mesh, prompt_buckets=tuple(s.prompt_buckets),
            stop_strings=tuple(s.stop_strings),
            tokenizer=tokenizer if s.stop_strings else None,
            length_bucket=config.train.get("pack_length_bucket", 0))
  if s.get("decode_slots", 0):
    return continuous.ContinuousSampler(
        Decoder(model_cfg), decode_slots=s.decode_slots,
        refill_rows=s.get("refill_rows", 0) or None,
        min_decode_slots=s.get("min_decode_slots", 0) or None, **kw)
  return Sampler(Decoder(model_cfg), rows_per_call=s.rows_per_call, **kw)


def step_spec(config, model_cfg, objective: objectives.Objective, tx: Any) -> train_lib.StepSpec:
  """What one policy update computes (`train.StepSpec`), from the config: the loop's and the
  memory plan's, so both compile the same program."""
  return train_lib.StepSpec(
      model_cfg=model_cfg, objective=objective, tx=tx, micro_batches=config.train.micro_batches,
      logp_temperature=config.sampling.temperature, chunk_size=config.train.chunk_size,
      norm_length=config.sampling.max_new_tokens)


def make_logp_fn(config, model_cfg, mesh) -> Any:
  """Behaviour scoring (old / ref logp) in the trainer's micro-batch size: one rollout's rows in
  mini_batches x micro_batches chunks (`scoring.make_logp_fn`)."""
  t = config.train
  return scoring.make_logp_fn(model_cfg, mesh=mesh, temperature=config.sampling.temperature,
                              chunk_size=t.chunk_size, row_chunks=t.mini_batches * t.micro_batches)
