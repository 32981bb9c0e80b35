"""Train state, optimizer and the pure policy-update step (DESIGN §4).

  tx = train.make_optimizer(lr=1e-6, warmup_steps=10, weight_decay=0.01, grad_clip=1.0)
  state, state_shardings = train.create_train_state(model, tx, key, mesh=mesh, params=params)
  spec = train.StepSpec(model_cfg=cfg, objective=objectives.get("lad", eta=0.25), tx=tx,
                        micro_batches=4)
  state, metrics = train.train_step(state, batch, spec=spec)    # pure; batch: a TrainBatch
  step = train.jit_train_step(spec, mesh=mesh, state_shardings=state_shardings)
  state, metrics = step(state, batch)                            # jitted, sharded, donated

`jit_train_step` is the one `jax.jit` of the step, with in/out shardings and the state donated.
The batch loss is
`sum_i s_i / sum_i d_i` over micro-batches i, with `(s_i, d_i) = losses.aggregate_parts(...)`; the
denominators depend on the masks only, so they are summed first and each micro-batch contributes
`grad(s_i) / D`: the accumulated gradient equals the gradient of the one large batch exactly (up to
float summation order), for every aggregation mode.

Mixed precision: with bf16 parameters (`cfg.param_dtype="bfloat16"`) the optimizer keeps an fp32
*master copy* of the parameters (`MasterWeightsState`) and fp32 Adam moments; each step updates the
master copy in fp32 and re-casts the bf16 parameters from it. We chose a master copy over fp32
moments alone because RL learning rates (~1e-6) give updates far below bf16's resolution (2^-8
relative): applied to bf16 weights directly they would round to no change. Cost: 4 extra bytes per
parameter (bf16 params + fp32 master + fp32 mu, nu = 14 bytes vs 12 for pure fp32).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lad_jax import losses
from lad_jax import objectives
from lad_jax import packing
from lad_jax import scoring
from lad_jax import sharding
from lad_jax.models import params as params_lib
from lad_jax.models.config import ModelConfig
from lad_jax.models.decoder import Decoder

Array = jax.Array

SCHEDULES = ("constant", "cosine")
_NEVER_GIVE_UP = int(np.iinfo(np.int32).max)  # optax.apply_if_finite applies nothing non-finite


# ------------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything a policy update reads and writes; a pytree orbax can save as is.

  Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: {"model": decoder params, "logz_head": FlowRL head params (only with one)}.
    opt_state: optax state (a `MasterWeightsState` around it with bf16 parameters).
    key: uint32 key data (`jax.random.key_data`); `jax.random.wrap_key_data(key)` gives the key.
  """

  step: Array
  params: Any
  opt_state: Any
  key: Array


@flax.struct.dataclass
class MasterWeightsState:
  """Optimizer state for low-precision parameters: fp32 master copy + the inner optax state.

  The inner transformation runs on `master` (so its moments are fp32); parameters are
  `master.astype(param dtype)` after each step.
  """

  master: Any
  inner: Any


def _wrap_key(key: Array) -> Array:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


def _is_low_precision(tree: Any) -> bool:
  return any(jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize < 4
             for x in jax.tree.leaves(tree))


def _to_f32(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def init_opt_state(tx: optax.GradientTransformation, params: Any, *,
                   master_weights: bool) -> Any:
  """`tx.init(params)`, or a `MasterWeightsState` (fp32 copy + fp32 moments) if master_weights."""
  if master_weights:
    master = _to_f32(params)
    return MasterWeightsState(master=master, inner=tx.init(master))
  return tx.init(params)


def apply_gradients(tx: optax.GradientTransformation, params: Any, opt_state: Any,
                    grads: Any) -> tuple[Any, Any]:
  """One optimizer update; grads may be fp32 for any parameter dtype. Returns (params, state)."""
  if isinstance(opt_state, MasterWeightsState):
    grads = _to_f32(grads)
    updates, inner = tx.update(grads, opt_state.inner, opt_state.master)
    master = optax.apply_updates(opt_state.master, updates)
    new_params = jax.tree.map(lambda m, p: m.astype(p.dtype), master, params)
    return new_params, MasterWeightsState(master=master, inner=inner)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def learning_rate(opt_state: Any) -> Array:
  """The learning rate of the last update, read from an `inject_hyperparams` state (else NaN)."""
  found = []

  def visit(x):
    if hasattr(x, "hyperparams") and "learning_rate" in getattr(x, "hyperparams", {}):
      found.append(x.hyperparams["learning_rate"])
    return x

  jax.tree.map(visit, opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
  if not found:
    return jnp.asarray(jnp.nan, jnp.float32)
  return jnp.asarray(found[0], jnp.float32)


# ------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------


def make_schedule(*, lr: float, warmup_steps: int = 0, schedule: str = "constant",
                  total_steps: Optional[int] = None, final_lr_ratio: float = 0.0
                  ) -> optax.Schedule:
  """Learning rate per optimizer step k (0-based).

  Warmup: lr * (k + 1) / warmup_steps for k < warmup_steps (linear, and the first step is not
  wasted at lr 0). Then "constant": lr; "cosine": half a cosine from lr down to
  final_lr_ratio * lr at total_steps, held there after.

  Raises:
    ValueError: unknown schedule, negative warmup, or cosine without total_steps > warmup_steps.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"Unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}.")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}.")
  if schedule == "cosine" and (total_steps is None or total_steps <= warmup_steps):
    raise ValueError(
        f"The cosine schedule needs total_steps > warmup_steps ({warmup_steps}), got "
        f"total_steps={total_steps}; pass total_steps= the number of optimizer steps.")

  def fn(count):
    k = jnp.asarray(count, jnp.float32)
    warm = jnp.minimum(1.0, (k + 1.0) / max(warmup_steps, 1)) if warmup_steps else 1.0
    if schedule == "constant":
      return lr * warm
    frac = jnp.clip((k - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    cosine = final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return lr * jnp.where(k < warmup_steps, warm, cosine)

  return fn


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` as one scalar factor: g * min(1, max_norm / ||g||).

  optax divides every element by the norm. XLA:CPU does not duplicate a division into several
  consumers, so it wrote the clipped gradients out (one more read and write of every gradient
  per step); the multiply fuses into Adam's moment updates. The state is optax's (empty).
  """
  def update(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / optax.global_norm(updates))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(*, lr: float, warmup_steps: int = 0, weight_decay: float = 0.0,
                   grad_clip: Optional[float] = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, schedule: str = "constant",
                   total_steps: Optional[int] = None, final_lr_ratio: float = 0.0
                   ) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay on every parameter, as verl's torch AdamW) after global-norm
  clipping, with the learning rate of `make_schedule`.

  The AdamW hyperparameters sit in an `optax.inject_hyperparams` state, so the step can report
  the learning rate it used (`learning_rate(opt_state)`). grad_clip None or <= 0 disables clipping.
  """
  if lr < 0:
    raise ValueError(f"lr must be >= 0, got {lr}.")
  sched = make_schedule(lr=lr, warmup_steps=warmup_steps, schedule=schedule,
                        total_steps=total_steps, final_lr_ratio=final_lr_ratio)
  adamw = optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.float32)(
      learning_rate=sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if grad_clip is not None and grad_clip > 0:
    adamw = optax.chain(clip_by_global_norm(grad_clip), adamw)
  # A non-finite gradient (or loss: `train_step` poisons the gradient then) skips the update;
  # the loop, not the optimizer, decides when too many skips in a row end the run.
  return optax.apply_if_finite(adamw, max_consecutive_errors=_NEVER_GIVE_UP)


def _find_state(opt_state: Any, kind: type) -> Optional[Any]:
  found = []
  jax.tree.map(lambda x: found.append(x) if isinstance(x, kind) else None, opt_state,
               is_leaf=lambda x: isinstance(x, kind))
  return found[0] if found else None


def nonfinite_metrics(opt_state: Any) -> dict[str, Array]:
  """skipped (1 if the last update was dropped as non-finite) and nonfinite_streak (updates
  dropped in a row), from the `optax.apply_if_finite` state; {} for an optimizer without one."""
  state = _find_state(opt_state, optax.ApplyIfFiniteState)
  if state is None:
    return {}
  return {"skipped": 1.0 - state.last_finite.astype(jnp.float32),
          "nonfinite_streak": state.notfinite_count.astype(jnp.float32)}


# ------------------------------------------------------------------------------------------------
# Creating the state
# ------------------------------------------------------------------------------------------------


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _state_shardings(tx: optax.GradientTransformation, abstract_state: TrainState,
                     param_shardings: Any, mesh: Mesh) -> TrainState:
  """Optimizer moments (and a master copy) sharded like their parameters; scalars replicated."""
  replicated = _replicated(mesh)
  opt = abstract_state.opt_state

  def like_params(inner_state):
    return optax.tree_map_params(tx, lambda _, s: s, inner_state, param_shardings,
                                 transform_non_params=lambda _: replicated)

  if isinstance(opt, MasterWeightsState):
    opt_shardings = MasterWeightsState(master=param_shardings, inner=like_params(opt.inner))
  else:
    opt_shardings = like_params(opt)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                    key=replicated)


def create_train_state(model: Decoder, tx: optax.GradientTransformation, key: Array, *,
                       mesh: Mesh, rules: Optional[sharding.Rules] = None,
                       params: Any = None, with_logz_head: bool = False,
                       master_weights: Optional[bool] = None,
                       compiler_options: Optional[Mapping[str, Any]] = None
                       ) -> tuple[TrainState, TrainState]:
  """A sharded train state and its shardings.

  Built from shapes: `jax.eval_shape` gives the abstract state, the partition rules give its
  shardings, and one jit with those out_shardings creates every array directly in its shards
  (no full copy on one device). Given `params` (e.g. loaded weights) are placed into their
  shardings and only the optimizer state (and a fresh log Z head) is created.

  Args:
    model: the decoder.
    tx: optimizer (`make_optimizer`).
    key: PRNG key (typed or raw); split for initialisation, the rest becomes `state.key`.
    mesh: device mesh (`sharding.make_mesh`).
    rules: logical -> mesh axis rules (default `sharding.DEFAULT_RULES`).
    params: decoder params, or {"model": ..., "logz_head": ...}; None = random init.
    with_logz_head: add FlowRL's log Z head (`baselines.LogZHead`, replicated: it is small).
    master_weights: keep an fp32 master copy in the optimizer state; default: exactly when some
      parameter is stored in less than 32 bits (see the module docstring).
    compiler_options: XLA options for the initialising jit (see `jit_train_step`).

  Returns:
    (state, state_shardings), the second a TrainState of NamedShardings for `jit_train_step`.
  """
  cfg = model.cfg
  rules = tuple(rules or sharding.DEFAULT_RULES)
  key = _wrap_key(key)
  model_key, head_key, state_key = jax.random.split(key, 3)
  given_model = given_head = None
  if params is not None:
    if isinstance(params, Mapping) and "model" in params:
      given_model, given_head = params["model"], params.get("logz_head")
    else:
      given_model = params
  if given_head is not None and not with_logz_head:
    with_logz_head = True

  given = {}
  if given_model is not None:
    given["model"] = given_model
  if given_head is not None:
    given["logz_head"] = given_head

  def init_state(model_key, head_key, state_key, given):
    p = {"model": given.get("model")}
    if p["model"] is None:
      p["model"] = nn.meta.unbox(
          Decoder(cfg).init(model_key, jnp.zeros((1, 1), jnp.int32))["params"])
    if with_logz_head:
      p["logz_head"] = given.get("logz_head")
      if p["logz_head"] is None:
        p["logz_head"] = scoring.init_logz_head(head_key, cfg.hidden_size)
    use_master = _is_low_precision(p) if master_weights is None else master_weights
    return TrainState(step=jnp.zeros((), jnp.int32), params=p,
                      opt_state=init_opt_state(tx, p, master_weights=use_master),
                      key=jax.random.key_data(state_key))

  replicated = _replicated(mesh)
  with sharding.use_mesh(mesh, rules):
    abstract = jax.eval_shape(init_state, model_key, head_key, state_key, given)
    param_sh = {"model": params_lib.param_shardings(cfg, mesh, rules)}
    if with_logz_head:
      param_sh["logz_head"] = jax.tree.map(lambda _: replicated, abstract.params["logz_head"])
    shardings = _state_shardings(tx, abstract, param_sh, mesh)
    given_sh = {k: param_sh[k] for k in given}
    # Loaded weights go straight into their shards; jit then only builds the optimizer state.
    given = jax.device_put(given, given_sh)
    state = jax.jit(init_state, in_shardings=(replicated, replicated, replicated, given_sh),
                    out_shardings=shardings,
                    compiler_options=None if compiler_options is None else dict(compiler_options)
                    )(model_key, head_key, state_key, given)
  return state, shardings


# ------------------------------------------------------------------------------------------------
# The train step
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainBatch:
  """One policy-update batch: N rows (the G rows of a prompt adjacent), L = P + R columns.

  Attributes:
    tokens: [N, L] int32, prompt (left-padded to P) then response.
    mask: [N, L] bool, non-padding tokens.
    loss_mask: [N, L] bool, the response tokens that are scored (column t scores token t).
    old_logp: [N, L] f32 log pi_old of each token (0 off loss_mask).
    advantages: [N] f32 sequence advantages, or [N, L] per token.
    ref_logp: [N, L] f32 log pi_ref, for objectives that need it; else None.
    prompt_mask: [N, L] bool, True on prompt tokens, for the log Z head; else None.
    prompt_length: P, static (one compile per value): columns < P are prompt, never in
      loss_mask, and get no LM head (which saves P / L of its FLOPs).
    packed: the same tokens packed into rows (`packing.Packed`, built with this step's
      micro_batches): the model runs on those and the scores are gathered back to [N, L]; the
      loss tensors above keep their [N, L] layout. None = the model runs on `tokens`.
    is_weights: [N, L] f32 importance weights pi_old / pi_sampler that multiply every
      objective's per-token loss (`rollout_correction`); None = 1.
  """

  tokens: Array
  mask: Array
  loss_mask: Array
  old_logp: Array
  advantages: Array
  ref_logp: Optional[Array] = None
  prompt_mask: Optional[Array] = None
  prompt_length: int = flax.struct.field(pytree_node=False, default=0)
  packed: Optional[packing.Packed] = None
  is_weights: Optional[Array] = None


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What one policy update computes (static; bound into the jitted step, never traced).

  Attributes:
    model_cfg: the decoder's config (dtype, remat policy).
    objective: from `objectives.get(name, **hparams)`.
    tx: the optimizer the state was built with (`make_optimizer`).
    micro_batches: gradient accumulation steps (a `lax.scan`), exact (module docstring).
    logp_temperature: logits are divided by it (the sampler's temperature).
    chunk_size: positions per LM-head chunk; None = one chunk.
    norm_length: the constant length of "seq-mean-token-sum-norm" (Dr.GRPO); None = L. verl
      uses max_response_length.
    compute_entropy: report the entropy metric (always on when the objective needs it).
    logz_dropout: train-mode dropout in the log Z head, as the FlowRL authors.
    param_shardings: shardings of `state.params`, to lay out the gradient accumulator; None
      leaves it to the compiler.
  """

  model_cfg: ModelConfig
  objective: objectives.Objective
  tx: optax.GradientTransformation
  micro_batches: int = 1
  logp_temperature: float = 1.0
  chunk_size: Optional[int] = None
  norm_length: Optional[float] = None
  compute_entropy: bool = True
  logz_dropout: bool = True
  param_shardings: Any = None

  @property
  def with_entropy(self) -> bool:
    return self.compute_entropy or self.objective.needs_entropy


def check_batch(batch: TrainBatch, spec: StepSpec, *, has_logz_head: bool,
                batch_devices: int = 1) -> None:
  """Shape and content checks with clear errors (static: runs at trace time too)."""
  shape = tuple(batch.tokens.shape)
  if len(shape) != 2:
    raise ValueError(f"TrainBatch.tokens must be [N, L], got shape {shape}.")
  for name in ("mask", "loss_mask", "old_logp", "ref_logp", "prompt_mask", "is_weights"):
    value = getattr(batch, name)
    if value is not None and tuple(value.shape) != shape:
      raise ValueError(f"TrainBatch.{name} has shape {tuple(value.shape)}, tokens have {shape}.")
  if tuple(batch.advantages.shape) not in (shape[:1], shape):
    raise ValueError(f"TrainBatch.advantages must be [N] or [N, L] = {shape}, got "
                     f"{tuple(batch.advantages.shape)}.")
  p = batch.prompt_length
  if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= p < shape[1]:
    raise ValueError(f"TrainBatch.prompt_length must be an int in [0, {shape[1]}), got {p!r}.")
  objective = spec.objective
  if "ref_logp" in objective.needs and batch.ref_logp is None:
    raise ValueError(f"Objective {objective.name!r} needs TrainBatch.ref_logp (log pi_ref).")
  if objective.needs_log_z and (batch.prompt_mask is None or not has_logz_head):
    raise ValueError(f"Objective {objective.name!r} needs log Z: a TrainBatch.prompt_mask and a "
                     "state made by create_train_state(..., with_logz_head=True).")
  if shape[0] % (spec.micro_batches * batch_devices):
    raise ValueError(
        f"{shape[0]} rows cannot be split into {spec.micro_batches} micro-batches spread over "
        f"{batch_devices} batch devices; make N a multiple of micro_batches * data * fsdp = "
        f"{spec.micro_batches * batch_devices}.")
  if isinstance(batch.loss_mask, np.ndarray) and p and np.any(batch.loss_mask[:, :p]):
    raise ValueError(f"loss_mask is True in a column < prompt_length={p}; those columns get no "
                     "log-probability. Pass the prompt width of the batch (or 0).")
  if batch.packed is not None:
    _check_packed(batch.packed, shape, spec.micro_batches)


def _check_packed(packed: packing.Packed, shape: tuple[int, ...], micro_batches: int) -> None:
  """A packed batch was built for this step's micro-batches and this (mini-)batch's rows."""
  if tuple(packed.index_NL.shape) != shape:
    raise ValueError(f"TrainBatch.packed.index_NL has shape {tuple(packed.index_NL.shape)}, "
                     f"tokens have {shape}.")
  rows = packed.micro_batches * packed.unit_rows
  if packed.micro_batches != micro_batches or packed.tokens_RC.shape[0] != rows:
    raise ValueError(
        f"TrainBatch.packed holds {packed.tokens_RC.shape[0]} packed rows for "
        f"{packed.micro_batches} micro-batches of {packed.unit_rows}; this step takes one "
        f"mini-batch of {micro_batches} micro-batches: pack with PackSettings(micro_batches="
        f"{micro_batches}) and slice mini-batches with `take_mini_batch`.")


def _loss_fn(params: Any, mb: TrainBatch, key: Array, denominator: Array, spec: StepSpec
             ) -> tuple[Array, tuple[dict[str, Array], Array]]:
  """One micro-batch: (its share of the batch loss, (objective metrics, entropy sum))."""
  obj_key, dropout_key = jax.random.split(key)
  common = dict(cfg=spec.model_cfg, prompt_length=mb.prompt_length,
                temperature=spec.logp_temperature, chunk_size=spec.chunk_size,
                with_entropy=spec.with_entropy,
                prompt_mask_NL=mb.prompt_mask if spec.objective.needs_log_z else None,
                dropout_key=dropout_key if spec.logz_dropout else None)
  if mb.packed is None:
    scores = scoring.score(params, mb.tokens, mb.mask, **common)
  else:
    scores = scoring.score_packed(params, mb.packed, **common)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  inputs = losses.LossInputs(
      logp=scores.logp, old_logp=f32(mb.old_logp), advantages=f32(mb.advantages),
      mask=mb.loss_mask, ref_logp=f32(mb.ref_logp), entropy=scores.entropy, log_z=scores.log_z)
  per_token_NL, obj_metrics = spec.objective(inputs, key=obj_key)
  if mb.is_weights is not None:  # E_old[g] = E_sampler[(pi_old / pi_sampler) g]
    per_token_NL = per_token_NL * mb.is_weights.astype(per_token_NL.dtype)
  total, _ = losses.aggregate_parts(per_token_NL, mb.loss_mask, spec.objective.agg_mode,
                                    norm_length=spec.norm_length)
  ent_sum = (jnp.zeros((), jnp.float32) if scores.entropy is None
             else jnp.sum(jnp.where(mb.loss_mask, scores.entropy, 0.0)))
  return losses.safe_divide(total, denominator), (jax.lax.stop_gradient(obj_metrics), ent_sum)


def _split_micro_batches(batch: TrainBatch, m: int) -> TrainBatch:
  """[N, ...] -> [m, N / m, ...]; micro-batch i takes rows i, i + m, ...: every device keeps an
  equal share of every micro-batch. Packed rows [m * r, C] split the same way (their layout,
  `packing`), so micro-batch i gets its own r packed rows."""
  def split(x):
    x = x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def accumulate_gradients(params: Any, batch: TrainBatch, key: Array, *, spec: StepSpec
                         ) -> tuple[Any, Array, dict[str, Array], Array]:
  """(fp32 gradient of the batch loss, loss, objective metrics, entropy sum) over micro-batches.

  The denominators of the aggregation depend on the mask only: they are summed first, then every
  micro-batch adds grad(s_i) / D, so the sum is the gradient of the whole batch's loss.
  """
  _, denominator = losses.aggregate_parts(
      jnp.zeros(batch.loss_mask.shape, jnp.float32), batch.loss_mask, spec.objective.agg_mode,
      norm_length=spec.norm_length)
  grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)
  keys = jax.random.split(key, spec.micro_batches)
  if spec.micro_batches == 1:
    (loss, (obj_metrics, ent_sum)), grads = grad_fn(params, batch, keys[0], denominator, spec)
    return _to_f32(grads), loss, obj_metrics, ent_sum
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  if spec.param_shardings is not None:
    zeros = jax.lax.with_sharding_constraint(zeros, spec.param_shardings)

  def body(carry, xs):
    acc, loss_acc = carry
    mb, k = xs
    (loss_i, aux), g = grad_fn(params, mb, k, denominator, spec)
    acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
    return (acc, loss_acc + loss_i), aux

  (grads, loss), (obj_metrics, ent_sums) = jax.lax.scan(
      body, (zeros, jnp.zeros((), jnp.float32)),
      (_split_micro_batches(batch, spec.micro_batches), keys))
  return grads, loss, jax.tree.map(lambda x: jnp.mean(x, axis=0), obj_metrics), jnp.sum(ent_sums)


def train_step(state: TrainState, batch: TrainBatch, *, spec: StepSpec
               ) -> tuple[TrainState, dict[str, Array]]:
  """One policy update: gradient of the objective on `batch`, one optimizer step.

  Pure: jit it with `jit_train_step` (shardings, donation) or call it directly. The step key is
  `fold_in(state.key, state.step)`, split once per micro-batch and again per use. A non-finite
  loss or gradient leaves the parameters and moments unchanged (`optax.apply_if_finite` in
  `make_optimizer`); the metric `skipped` is 1 for such an update.

  Returns:
    (new state, metrics): loss, grad_norm (before clipping), lr, tokens (loss tokens), entropy
    (masked mean; with compute_entropy), skipped, nonfinite_streak, and the objective's metrics
    (means over micro-batches).
  """
  check_batch(batch, spec, has_logz_head="logz_head" in state.params)
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
  grads, loss, obj_metrics, ent_sum = accumulate_gradients(state.params, batch, step_key,
                                                           spec=spec)
  # A non-finite loss with finite gradients must not pass either: poison the gradients.
  grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
  grad_norm = optax.global_norm(grads)
  params, opt_state = apply_gradients(spec.tx, state.params, state.opt_state, grads)
  num_tokens = jnp.sum(batch.loss_mask.astype(jnp.float32))
  metrics = dict(obj_metrics, loss=loss, grad_norm=grad_norm, lr=learning_rate(opt_state),
                 tokens=num_tokens, **nonfinite_metrics(opt_state))
  if spec.with_entropy:
    metrics["entropy"] = losses.safe_divide(ent_sum, num_tokens)
  metrics = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def take_mini_batch(batch: TrainBatch, index: Array, mini_batches: int) -> TrainBatch:
  """Mini-batch `index` (traced) of `mini_batches`: a contiguous block of every leaf's leading
  axis (rows of the [N, ...] tensors, packed rows of `batch.packed`): whole groups."""
  def take(x):
    size = x.shape[0] // mini_batches
    return jax.lax.dynamic_slice_in_dim(x, index * size, size)
  return jax.tree.map(take, batch)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over the batch mesh axes (data, fsdp), the rest replicated; a prefix for any rank."""
  return NamedSharding(mesh, PartitionSpec(tuple(a for a in sharding.BATCH_AXES
                                                 if a in mesh.axis_names)))


def batch_devices(mesh: Mesh) -> int:
  """Devices the batch rows are split over (data * fsdp)."""
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  return math.prod(sizes.get(a, 1) for a in sharding.BATCH_AXES)


def jit_train_step(spec: StepSpec, *, mesh: Mesh, state_shardings: TrainState,
                   rules: Optional[sharding.Rules] = None,
                   compiler_options: Optional[Mapping[str, Any]] = None,
                   max_traces: Optional[int] = None
                   ) -> Callable[[TrainState, TrainBatch], tuple[TrainState, dict[str, Array]]]:
  """`train_step` jitted once: state in and out in its shardings (donated), batch rows over
  the batch axes, metrics replicated; called under the mesh and its logical rules.

  Args:
    spec: what the step computes; its param_shardings default to state_shardings.params.
    mesh, state_shardings: from `create_train_state`.
    rules: logical -> mesh axis rules (default `sharding.DEFAULT_RULES`).
    compiler_options: XLA options (tests pass {"xla_backend_optimization_level": 0}, which
      compiles tiny models ~3x faster on CPU; same numerics).
    max_traces: fail on more traces than this (`chex.assert_max_traces`, whose counter is keyed
      on where the step was built: tests call `chex.clear_trace_counter()` between cases); each
      prompt_length is one trace.
  """
  rules = tuple(rules or sharding.DEFAULT_RULES)
  if spec.param_shardings is None:
    spec = dataclasses.replace(spec, param_shardings=state_shardings.params)
  n_devices = batch_devices(mesh)
  has_head = isinstance(state_shardings.params, Mapping) and "logz_head" in state_shardings.params

  def step(state, batch):
    return train_step(state, batch, spec=spec)

  if max_traces is not None:
    step = chex.assert_max_traces(step, n=max_traces)
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, _replicated(mesh)), donate_argnums=(0,),
                   compiler_options=None if compiler_options is None else dict(compiler_options))

  def run(state: TrainState, batch: TrainBatch) -> tuple[TrainState, dict[str, Array]]:
    check_batch(batch, spec, has_logz_head=has_head, batch_devices=n_devices)
    with sharding.use_mesh(mesh, rules):
      return jitted(state, batch)

  def lower(state: Any, batch: TrainBatch) -> Any:
    """The step lowered for these (abstract) arguments, as `run` compiles it (memory plans)."""
    with sharding.use_mesh(mesh, rules):
      return jitted.lower(state, batch)

  run.lower = lower
  return run
