"""The RL loop of experiments/math_rl.py (DESIGN §4), as named stages with typed data between them.

One step (the paper's protocol, verl's metric names):

  COLLECT     rollout.collect          prompts -> G samples each -> verifier -> DAPO filter/refill
  TO DEVICE   rollout.to_train_batch   Rollout (host) -> TrainBatch (device): the one copy
  BEHAVIOUR   score_behaviour          old_logp (recomputed, or the sampler's), ref_logp
  ADVANTAGE   with_advantages          the estimator on [P, G] rewards (+ seq logp for alpha-DPG)
  UPDATE      update                   K mini-batches x epochs of the jitted `train.train_step`

then metrics, and at their cadence evaluation and a checkpoint. `train_and_evaluate(config)`
builds the components, restores, and runs the loop; only it and `components` read the config.

Randomness: every random draw of step s comes from `fold_in(fold_in(run_key, stream), s)`, and
the data order is a pure function of (seed, position), so a run killed after a checkpoint and
restarted resumes to the same result as an uninterrupted one (state, key and data position are
saved). Multi-host (`config.distributed`): every process runs this program on the same prompts;
device results are gathered with `process_allgather`, and only process 0 writes files.

  from lad_jax import rl, report
  rl.train_and_evaluate(config)    # config: lad_jax/config_utils.py and configs/*.py
  print(report.summary(config))
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lad_jax import advantages as advantages_lib
from lad_jax import checkpoint as checkpoint_lib
from lad_jax import components
from lad_jax import config_utils
from lad_jax import errors
from lad_jax import evaluate as evaluate_lib
from lad_jax import packing
from lad_jax import perf
from lad_jax import policy
from lad_jax import report
from lad_jax import rollout as rollout_lib
from lad_jax import rollout_correction
from lad_jax import run_dir
from lad_jax import tasks as tasks_lib
from lad_jax import train as train_lib
from lad_jax.models import Decoder
from lad_jax.rollout import Rollout, SampleSettings
from lad_jax.train import TrainBatch, TrainState

ConfigError = config_utils.ConfigError
NonFiniteError = errors.NonFiniteError


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def score_behaviour(batch: TrainBatch, *, logp_fn: Callable[..., jax.Array], params: Any,
                    ref_params: Any = None, recompute_old_logp: bool = False,
                    correction: Optional[Correction] = None
                    ) -> tuple[TrainBatch, dict[str, float]]:
  """BEHAVIOUR: old_logp recomputed under `params` (verl's old_log_prob), ref_logp under
  `ref_params` (when given). Both stay on device. With old_logp recomputed, the sampler's
  log-probs are compared with it (`rollout/logp_diff_*`) and, with a `correction` whose level
  is not "off", turned into IS weights (`rollout_correction`). Returns (batch, metrics: seconds
  per pass and the mismatch)."""
  metrics = {}
  p = batch.prompt_length
  if recompute_old_logp:
    t0 = time.perf_counter()
    old_logp = jax.block_until_ready(
        logp_fn(params, batch.tokens, batch.mask, prompt_length=p, packed=batch.packed))
    metrics["timing_s/old_log_prob"] = time.perf_counter() - t0
    batch, mismatch = _corrected(batch, old_logp, correction or Correction())
    metrics.update(mismatch)
  if ref_params is not None:
    t0 = time.perf_counter()
    batch = batch.replace(ref_logp=jax.block_until_ready(
        logp_fn(ref_params, batch.tokens, batch.mask, prompt_length=p, packed=batch.packed)))
    metrics["timing_s/ref"] = time.perf_counter() - t0
  return batch, metrics


class Correction(NamedTuple):
  """train.rollout_correction (see `rollout_correction`)."""

  level: str = "off"
  mode: str = "truncate"
  cap: float = 2.0


@functools.partial(jax.jit, static_argnames=("correction",))
def _correction_on_device(beh_logp_NL, old_logp_NL, loss_mask_NL, correction: Correction):
  metrics = rollout_correction.mismatch_metrics(beh_logp_NL, old_logp_NL, loss_mask_NL)
  c = rollout_correction.weights(beh_logp_NL, old_logp_NL, loss_mask_NL, level=correction.level,
                                 mode=correction.mode, cap=correction.cap)
  if correction.level != "off":
    metrics.update(rollout_correction.weight_metrics(c, loss_mask_NL))
  return c, metrics


def _corrected(batch: TrainBatch, old_logp_NL: jax.Array, correction: Correction
               ) -> tuple[TrainBatch, dict[str, float]]:
  """The batch with the recomputed old_logp (and IS weights / the rejection mask when the
  correction is on), and the mismatch metrics (one device -> host copy)."""
  c, metrics = _correction_on_device(batch.old_logp, old_logp_NL, batch.loss_mask, correction)
  batch = batch.replace(old_logp=old_logp_NL)
  if correction.level != "off":
    batch = batch.replace(is_weights=c.weights, loss_mask=c.mask)
  return batch, {k: float(v) for k, v in jax.device_get(metrics).items()}


@jax.jit
def _seq_sum(logp_NL: jax.Array, mask_NL: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask_NL, logp_NL, 0.0), axis=1)


def with_advantages(batch: TrainBatch, rewards_N: np.ndarray, *, estimator: str,
                    hparams: Optional[dict[str, Any]] = None, group_size: int, mesh
                    ) -> tuple[TrainBatch, np.ndarray]:
  """ADVANTAGE: [N] sequence advantages of `estimator` on the [P, G] reward groups, into the
  batch (rows over the batch axes). Returns (batch, advantages on the host, for metrics)."""
  seq = {}
  if advantages_lib.needs_seq_logp(estimator):  # alpha-DPG: summed response log-probs
    seq = dict(seq_old_logp_N=rollout_lib.to_host(_seq_sum(batch.old_logp, batch.loss_mask)),
               seq_ref_logp_N=rollout_lib.to_host(_seq_sum(batch.ref_logp, batch.loss_mask)))
  adv_N = advantages_lib.compute(estimator, hparams or {}, rewards_N, group_size=group_size,
                                 **seq)
  sh = train_lib.batch_sharding(mesh)
  return batch.replace(advantages=rollout_lib.global_array(adv_N, sh)), adv_N


@functools.lru_cache(maxsize=None)
def _row_slicer(sharding, mini_batches: int) -> Callable[[TrainBatch, int], TrainBatch]:
  """Jitted mini-batch i of `mini_batches` (`train.take_mini_batch`; traced i: one compile),
  rows over the batch axes."""
  def take(batch, index):
    return train_lib.take_mini_batch(batch, index, mini_batches)
  return jax.jit(take, out_shardings=sharding)


def update(state: TrainState, batch: TrainBatch, *, train_step: Callable, mini_batches: int,
           epochs: int = 1, mesh, max_nonfinite: int = 0) -> tuple[TrainState, dict[str, float]]:
  """UPDATE: `epochs` passes of `mini_batches` optimizer steps over the batch, in row order
  (whole groups per mini-batch). Returns the state and each metric's mean over the updates.

  Raises:
    NonFiniteError: `max_nonfinite` (> 0) updates in a row were skipped as non-finite.
  """
  take = _row_slicer(train_lib.batch_sharding(mesh), mini_batches)
  sums: dict[str, float] = {}
  for _ in range(epochs):
    for i in range(mini_batches):
      state, m = train_step(state, take(batch, i))
      m = {name: float(np.asarray(v)) for name, v in jax.device_get(m).items()}  # one copy
      for name, value in m.items():
        sums[name] = sums.get(name, 0.0) + value
      streak = m.get("nonfinite_streak", 0.0)
      if max_nonfinite and streak >= max_nonfinite:
        raise NonFiniteError(
            f"{streak:.0f} policy updates in a row had a non-finite loss or gradient and were "
            "skipped (parameters unchanged); lower optim.lr, check the rewards, or raise "
            "train.max_nonfinite_updates.")
  return state, {name: v / (epochs * mini_batches) for name, v in sums.items()}


def actor_metrics(update_metrics: dict[str, float]) -> dict[str, float]:
  """The train step's metric names as verl logs them (actor/pg_loss, actor/grad_norm, ...)."""
  renames = {"loss": "actor/pg_loss", "grad_norm": "actor/grad_norm", "lr": "actor/lr",
             "entropy": "actor/entropy"}
  return {renames.get(k, k if "/" in k else f"actor/{k}"): v for k, v in update_metrics.items()}


# ------------------------------------------------------------------------------------------------
# One step
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """The per-step knobs of the loop, as plain values (see config_utils.base_config)."""

  sample: SampleSettings
  num_groups: int
  dynamic_sampling: bool
  max_gen_batches: int
  on_shortfall: str
  recompute_old_logp: bool
  mini_batches: int
  epochs: int
  max_nonfinite: int
  correction: Correction = Correction()

  @classmethod
  def from_config(cls, config) -> "LoopSettings":
    s, d, t = config.sampling, config.dynamic_sampling, config.train
    return cls(sample=SampleSettings(group_size=int(s.group_size),
                                     max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                     top_p=s.top_p, top_k=s.top_k),
               num_groups=t.prompts_per_step, dynamic_sampling=d.enabled,
               max_gen_batches=d.max_gen_batches, on_shortfall=d.on_shortfall,
               recompute_old_logp=t.recompute_old_logp, mini_batches=t.mini_batches,
               epochs=t.epochs, max_nonfinite=t.max_nonfinite_updates,
               correction=Correction(**t.rollout_correction.to_dict()))


class Components(NamedTuple):
  """What the loop runs with, built once from the config (`build_components`)."""

  mesh: Any
  model_cfg: Any
  tokenizer: Any
  pad_id: int
  task: tasks_lib.Task
  encode: tasks_lib.PromptEncoder
  sampler: Any
  objective: Any
  estimator: components.Estimator
  train_step: Callable[[TrainState, TrainBatch], tuple[TrainState, dict]]
  logp_fn: Callable[..., jax.Array]
  ref_params: Any  # None unless the objective or the estimator needs pi_ref
  num_params: int  # of the policy model (for MFU)
  pack: Optional[packing.PackSettings] = None  # train.pack: trimmed, packed batches


class StepOutput(NamedTuple):
  """What one `rl_step` hands back: the new state, its metrics, and what the logs show."""

  state: TrainState
  metrics: dict[str, float]
  rollout: Rollout
  advantages: np.ndarray  # [N] sequence advantages, host


def rl_step(state: TrainState, stream: tasks_lib.PromptStream, key: jax.Array, *,
            c: Components, loop: LoopSettings) -> StepOutput:
  """COLLECT -> TO DEVICE -> BEHAVIOUR -> ADVANTAGE -> UPDATE, then the step's metrics."""
  t_step = time.perf_counter()
  params = state.params["model"]
  got = rollout_lib.collect(
      c.sampler, params, stream, c.task, c.tokenizer, key, settings=loop.sample,
      num_groups=loop.num_groups, pad_id=c.pad_id, dynamic_sampling=loop.dynamic_sampling,
      max_gen_batches=loop.max_gen_batches, on_shortfall=loop.on_shortfall)
  batch = rollout_lib.to_train_batch(got.rollout, mesh=c.mesh,
                                     with_prompt_mask=c.objective.needs_log_z, pack=c.pack)
  batch, timings = score_behaviour(batch, logp_fn=c.logp_fn, params=params,
                                   ref_params=c.ref_params,
                                   recompute_old_logp=loop.recompute_old_logp,
                                   correction=loop.correction)
  t0 = time.perf_counter()
  batch, adv_N = with_advantages(batch, got.rollout.rewards, estimator=c.estimator.name,
                                 hparams=c.estimator.hparams,
                                 group_size=loop.sample.group_size, mesh=c.mesh)
  timings["timing_s/adv"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, update_metrics = update(state, batch, train_step=c.train_step,
                                 mini_batches=loop.mini_batches, epochs=loop.epochs,
                                 mesh=c.mesh, max_nonfinite=loop.max_nonfinite)
  timings["timing_s/update_actor"] = time.perf_counter() - t0
  timings.update({"timing_s/gen": got.gen_s, "timing_s/reward": got.verify_s,
                  "timing_s/step": time.perf_counter() - t_step})
  metrics = rollout_lib.rollout_metrics(got.rollout, adv_N, group_size=loop.sample.group_size)
  metrics.update(actor_metrics(update_metrics))
  metrics.update({"train/num_gen_batches": float(got.rounds),
                  "batch/filled_zero_variance_groups": float(got.filled),
                  "batch/skipped_long_prompts": float(stream.skipped),
                  "data/position": float(stream.position), **timings})
  metrics.update(perf_metrics(got.rollout, timings, num_params=c.num_params,
                              epochs=loop.epochs, devices=c.mesh.devices.flat))
  return StepOutput(state, metrics, got.rollout, adv_N)


def perf_metrics(r: Rollout, timings: dict[str, float], *, num_params: int, epochs: int,
                 devices) -> dict[str, float]:
  """verl's throughput figures: tokens, time per token per stage, per-device throughput, MFU of
  the update and peak device memory (the last two where the hardware reports them)."""
  devices = list(devices)
  response = float(r.response_mask.sum())
  total = float(r.prompt_mask.sum()) + response
  out = {"perf/total_num_tokens": total, "perf/time_per_step": timings["timing_s/step"],
         "perf/throughput": total / (max(timings["timing_s/step"], 1e-9) * len(devices))}
  for stage in ("gen", "ref", "adv", "update_actor"):
    if f"timing_s/{stage}" in timings:
      tokens = response if stage == "gen" else total
      out[f"timing_per_token_ms/{stage}"] = 1e3 * timings[f"timing_s/{stage}"] / max(tokens, 1)
  flops = perf.update_flops(num_params=num_params, tokens=total * epochs)
  mfu = perf.mfu(flops, timings["timing_s/update_actor"], devices=devices)
  # Memory statistics exist only for this process's devices (the peak logged is process 0's).
  memory = perf.max_memory_allocated_gb(
      [d for d in devices if d.process_index == jax.process_index()])
  if mfu is not None:
    out["perf/mfu/actor"] = mfu
  if memory is not None:
    out["perf/max_memory_allocated_gb"] = memory
  return out


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def build_components(config, *, task: Optional[tasks_lib.Task] = None
                     ) -> tuple[Components, TrainState]:
  """Everything the loop needs, and the initial train state (weights loaded or initialised)."""
  mesh = components.make_mesh(config)
  model_cfg, init_params = components.load_model(config, mesh)
  tokenizer = components.load_tokenizer(config, model_cfg)
  _, pad_id = components.special_ids(tokenizer, model_cfg)
  task = tasks_lib.build_task(config) if task is None else task
  objective, estimator = components.make_objective(config)
  tx = components.make_optimizer(config)
  ref_params = (jax.tree.map(jnp.copy, init_params)
                if components.needs_ref(objective, estimator) else None)
  run_key = jax.random.key(config.seed)
  state, state_shardings = train_lib.create_train_state(
      Decoder(model_cfg), tx, jax.random.fold_in(run_key, components.STATE_KEY), mesh=mesh,
      params=init_params, with_logz_head=objective.needs_log_z)
  spec = components.step_spec(config, model_cfg, objective, tx)
  return Components(
      mesh=mesh, model_cfg=model_cfg, tokenizer=tokenizer, pad_id=pad_id, task=task,
      encode=tasks_lib.make_encoder(tokenizer, task, config),
      sampler=components.make_sampler(config, model_cfg, tokenizer, mesh),
      objective=objective, estimator=estimator,
      train_step=train_lib.jit_train_step(spec, mesh=mesh, state_shardings=state_shardings),
      logp_fn=components.make_logp_fn(config, model_cfg, mesh),
      ref_params=ref_params,
      num_params=sum(x.size for x in jax.tree.leaves(state.params["model"])),
      pack=pack_settings(config, mesh, model_cfg)), state


def pack_settings(config, mesh, model_cfg) -> Optional[packing.PackSettings]:
  """train.pack's settings (rows per micro-batch a multiple of the batch devices, at most the
  segments per row the attention handles), or None."""
  t = config.train
  if not t.pack:
    return None
  return packing.PackSettings(mini_batches=t.mini_batches, micro_batches=t.micro_batches,
                              length_bucket=t.pack_length_bucket, capacity=t.pack_capacity,
                              row_multiple=train_lib.batch_devices(mesh),
                              max_sequences=model_cfg.attention_max_segments)


def _evaluate(c: Components, state: TrainState, key: jax.Array, config) -> dict[str, float]:
  e = config.eval
  t0 = time.perf_counter()
  out = evaluate_lib.evaluate(
      c.sampler, state.params["model"], c.task, c.tokenizer, c.encode, key,
      num_prompts=e.num_prompts, pass_k=tuple(e.pass_k),
      settings=evaluate_lib.settings_from_config(config))
  out["timing_s/testing"] = time.perf_counter() - t0
  return out


def _loop(config, c: Components, state: TrainState, ckpt, start: int, position: int
          ) -> tuple[TrainState, dict[str, float]]:
  """Steps start+1 .. num_steps, with evaluation and checkpoints at their cadence."""
  run_key = jax.random.key(config.seed)
  # Every evaluation samples with the same key (common random numbers).
  eval_key = jax.random.fold_in(run_key, components.EVAL_KEY)
  rollout_key = jax.random.fold_in(run_key, components.ROLLOUT_KEY)
  loop = LoopSettings.from_config(config)
  stream = tasks_lib.PromptStream(c.task.train, c.encode, seed=config.seed,
                                  shuffle=config.data.shuffle, position=position)
  out = report.RunOutputs(config, report.workdir(config), start)
  n, last = config.train.num_steps, {}
  try:
    if config.eval.before_train and start == 0 and c.task.evals:
      last = _evaluate(c, state, eval_key, config)
      out.step(0, last)
    for step in range(start, n):
      done = step + 1
      ckpt.check()  # a failed asynchronous save stops the run here, with one line
      try:
        state, last, rollout, adv_N = rl_step(
            state, stream, jax.random.fold_in(rollout_key, step), c=c, loop=loop)
      except errors.NonFiniteError as e:
        last_good = ckpt.latest_step()
        saved = f"step {last_good}" if last_good is not None else "none (nothing was saved)"
        raise errors.NonFiniteError(f"step {done}: {e} The last checkpoint is {saved}.") from e
      if config.eval.every and (done % config.eval.every == 0 or done == n) and c.task.evals:
        last.update(_evaluate(c, state, eval_key, config))
      out.step(done, last, rollout=rollout, advantages=adv_N, tokenizer=c.tokenizer)
      if (config.checkpoint.every and done % config.checkpoint.every == 0) or done == n:
        ckpt.save(done, state, {"step": done, "data_position": stream.position,
                                "name": config.name})
  finally:
    out.close()
  return state, last


def train_and_evaluate(config, *, task: Optional[tasks_lib.Task] = None
                       ) -> tuple[TrainState, dict[str, float]]:
  """Runs (or resumes) the RL loop of `config`.

  Args:
    config: see lad_jax/config_utils.py and configs/*.py.
    task: a prebuilt task (tests share one verifier); None builds `config.data`'s.

  Returns:
    (final TrainState, metrics of the last step run; empty if nothing was left to run).

  Raises:
    ConfigError: unknown keys, bad values, or a missing model / data file (before compiling).
  """
  config_utils.validate(config)
  config_utils.check_files(config)
  export_memory_fraction(config)  # before anything starts the jax backend
  components.maybe_initialize_distributed(config)
  workdir = report.workdir(config)
  _prepare_workdir(config, workdir)
  previous_cache = report.set_compile_cache(config.compile_cache_dir)
  c = None
  try:
    c, state = build_components(config, task=task)
    # One process: saves overlap the next step and `ckpt.check()` raises a failed one at the
    # next step boundary. Several: each save is waited for, so every host fails together.
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.checkpoint.max_to_keep,
                                       wait=jax.process_count() > 1)
    try:
      start, position = 0, 0
      restored = ckpt.restore_latest_intact(state) if config.checkpoint.resume else None
      if restored is not None:  # damaged newer checkpoints were moved aside, with a warning
        state = restored.state
        start, position = int(restored.meta["step"]), int(restored.meta["data_position"])
      state, last = _loop(config, c, state, ckpt, start, position)
      if config.checkpoint.export_hf:  # a Hugging Face copy of the final policy: <workdir>/hf
        policy.export_hf(state.params["model"], c.model_cfg, tokenizer=c.tokenizer,
                         out_dir=os.path.join(workdir, "hf"))
      return state, last
    finally:
      ckpt.close()
  finally:
    if c is not None and task is None:
      c.task.close()
    if config.compile_cache_dir:
      for name, value in previous_cache.items():
        jax.config.update(name, value)


MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"


def memory_fraction(config) -> float:
  """The GPU memory share the run's allocator gets: XLA_PYTHON_CLIENT_MEM_FRACTION if the user
  set it, else config.runtime.memory_fraction (what `export_memory_fraction` exports)."""
  value = os.environ.get(MEM_FRACTION_ENV)
  return float(value) if value else float(config.runtime.memory_fraction)


def export_memory_fraction(config) -> None:
  """Sets XLA_PYTHON_CLIENT_MEM_FRACTION from config.runtime.memory_fraction unless already set.

  jax reads it once, when the GPU backend starts (the first device use), so this must run before
  `maybe_initialize_distributed` or any `jax.devices()`; later it has no effect.
  """
  os.environ.setdefault(MEM_FRACTION_ENV, f"{float(config.runtime.memory_fraction):g}")


def _prepare_workdir(config, workdir: str) -> None:
  """Resuming: refuses a workdir whose saved run has another config (run_dir.check_resume).
  Starting over (checkpoint.resume=False): moves an earlier run into <workdir>/previous/."""
  if config.checkpoint.resume:
    run_dir.check_resume(workdir, config)
  elif jax.process_index() == 0 and os.path.isdir(workdir):
    events = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")]
    run_dir.archive_previous(workdir, names=(
        "checkpoints", "checkpoints.damaged", run_dir.CONFIG_FILE, run_dir.STARTS_DIR,
        "metrics.jsonl", "samples.jsonl", *events))
