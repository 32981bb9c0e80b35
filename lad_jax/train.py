"""Train state, optimizer and the sharded, jitted policy-update step (DESIGN §4).

  tx = train.make_optimizer(lr=1e-6, warmup_steps=10, weight_decay=0.01, grad_clip=1.0)
  state, state_shardings = train.create_train_state(model, tx, key, mesh=mesh, params=params)
  objective = losses.get("lad", divergence="js", eta=0.25)
  train_step = train.make_train_step(model, objective, tx, mesh=mesh,
                                     state_shardings=state_shardings, micro_batches=4)
  state, metrics = train_step(state, batch)      # batch: see `BATCH_KEYS`
  state, metrics = train_step(state, batch, prompt_length=P)  # no LM head on P prompt columns

The step is one `jax.jit` with in/out shardings and the state donated. The batch loss is
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

import functools
import math
from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lad_jax import baselines
from lad_jax import losses
from lad_jax import sharding
from lad_jax.models import logprobs
from lad_jax.models import params as params_lib
from lad_jax.models.decoder import Decoder

Array = jax.Array

SCHEDULES = ("constant", "cosine")
# Keys a batch may carry; any other key is dropped before the jitted step.
REQUIRED_BATCH_KEYS = ("tokens", "mask", "loss_mask", "old_logp", "advantages")
OPTIONAL_BATCH_KEYS = ("ref_logp", "prompt_mask")
BATCH_KEYS = REQUIRED_BATCH_KEYS + OPTIONAL_BATCH_KEYS
_NEEDS = ("ref_logp", "entropy", "log_z")


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


def _key_data(key: Array) -> Array:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return jnp.asarray(key, jnp.uint32)


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
  per step); the multiply fuses into Adam's moment updates (SmolLM2-135M step on 2 CPU cores,
  in-process A/B: 2.668 -> 2.637 s). The state is optax's (empty).
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
    return optax.chain(clip_by_global_norm(grad_clip), adamw)
  return adamw


# ------------------------------------------------------------------------------------------------
# Creating the state
# ------------------------------------------------------------------------------------------------


def _logz_head() -> nn.Module:
  # The FlowRL authors' ProjZModule: 3 layers, dropout 0.1, width = model width.
  return baselines.LogZHead()


def _init_logz_head(key: Array, hidden_size: int) -> Any:
  hidden = jnp.zeros((1, 1, hidden_size), jnp.float32)
  return _logz_head().init(key, hidden, jnp.ones((1, 1), bool))["params"]


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
    compiler_options: XLA options for the initialising jit (see `make_train_step`).

  Returns:
    (state, state_shardings), the second a TrainState of NamedShardings for `make_train_step`.
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
        p["logz_head"] = _init_logz_head(head_key, cfg.hidden_size)
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


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over the batch mesh axes (data, fsdp), the rest replicated; a prefix for any rank."""
  return NamedSharding(mesh, PartitionSpec(tuple(a for a in sharding.BATCH_AXES
                                                 if a in mesh.axis_names)))


def _batch_devices(mesh: Mesh) -> int:
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  return math.prod(sizes.get(a, 1) for a in sharding.BATCH_AXES)


def _check_batch(batch: Mapping[str, Any], *, needs: tuple[str, ...], with_logz_head: bool,
                 micro_batches: int, batch_devices: int) -> dict[str, Any]:
  """Static checks with clear errors; returns the batch restricted to `BATCH_KEYS`."""
  missing = [k for k in REQUIRED_BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"Batch is missing {missing}; a batch needs {list(REQUIRED_BATCH_KEYS)} "
                     f"(optional: {list(OPTIONAL_BATCH_KEYS)}), got {sorted(batch)}.")
  if "ref_logp" in needs and "ref_logp" not in batch:
    raise ValueError("The objective needs ref_logp: add batch['ref_logp'] ([N, L] log pi_ref, "
                     "from make_logp_fn on the reference params).")
  if "log_z" in needs:
    if "prompt_mask" not in batch:
      raise ValueError("The objective needs log Z: add batch['prompt_mask'] ([N, L] bool, True "
                       "on prompt tokens) for the log Z head.")
    if not with_logz_head:
      raise ValueError("The objective needs log Z but the state has no log Z head: create it "
                       "with create_train_state(..., with_logz_head=True).")
  out = {k: batch[k] for k in BATCH_KEYS if k in batch}
  shape = tuple(out["tokens"].shape)
  if len(shape) != 2:
    raise ValueError(f"batch['tokens'] must be [N, L], got shape {shape}.")
  for k, v in out.items():
    if k == "advantages":
      if tuple(v.shape) not in (shape[:1], shape):
        raise ValueError(f"batch['advantages'] must be [N] or [N, L] = {shape}, got {v.shape}.")
    elif tuple(v.shape) != shape:
      raise ValueError(f"batch[{k!r}] has shape {tuple(v.shape)}, tokens have {shape}.")
  n = shape[0]
  if n % (micro_batches * batch_devices):
    raise ValueError(
        f"{n} rows cannot be split into {micro_batches} micro-batches spread over the "
        f"{batch_devices} devices of the batch mesh axes; make N a multiple of "
        f"micro_batches * data * fsdp = {micro_batches * batch_devices}.")
  return out


def _check_prompt_length(prompt_length: int, batch: Mapping[str, Any]) -> int:
  """prompt_length as a static int in [0, L); host masks must not score a prompt column."""
  length = batch["tokens"].shape[1]
  if isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer)) or (
      not 0 <= prompt_length < length):
    raise ValueError(f"prompt_length must be an int in [0, {length}) (the number of prompt "
                     f"columns of the [N, {length}] batch), got {prompt_length!r}.")
  loss_mask = batch["loss_mask"]
  if isinstance(loss_mask, np.ndarray) and prompt_length and np.any(loss_mask[:, :prompt_length]):
    raise ValueError(f"loss_mask is True in a column < prompt_length={prompt_length}; those "
                     "columns get no log-probability. Pass the prompt width of the batch (or 0).")
  return int(prompt_length)


def make_train_step(model: Decoder, objective: losses.Objective,
                    tx: optax.GradientTransformation, *, mesh: Mesh, state_shardings: TrainState,
                    micro_batches: int = 1, logp_temperature: float = 1.0,
                    chunk_size: Optional[int] = None, norm_length: Optional[float] = None,
                    rules: Optional[sharding.Rules] = None, remat_policy: Optional[str] = None,
                    compute_entropy: bool = True, logz_dropout: bool = True,
                    compiler_options: Optional[Mapping[str, Any]] = None
                    ) -> Callable[[TrainState, Mapping[str, Array]], tuple[TrainState, dict]]:
  """The jitted policy update: `train_step(state, batch) -> (state, metrics)`.

  Batch (all rows N, the G rows of a prompt adjacent; L = P + R):
    tokens [N, L] int32, mask [N, L] bool (non-padding), loss_mask [N, L] bool (response tokens;
    column t scores token t, as `forward_logprobs`), old_logp [N, L] f32, advantages [N] (or
    [N, L] per token) f32; optional ref_logp [N, L] f32 and prompt_mask [N, L] bool (log Z head).
    N must be a multiple of micro_batches * data * fsdp. Other keys are ignored.

  Per micro-batch: one forward pass gives logp (and the entropy, passed stop-gradiented), the
  log Z head runs on the last hidden states over the prompt when the objective needs it,
  `objective(inputs, key=k)` gives the per-token loss, reduced by `losses.aggregate_parts`. The
  step key is `fold_in(state.key, state.step)`, split once per micro-batch and again per use.
  Objectives with batch-wide statistics (KL-Cov / Clip-Cov token selection) compute them per
  micro-batch, as verl does.

  Args:
    model: the decoder (its cfg sets param/compute dtype and remat).
    objective: from `losses.get(name, **hparams)`.
    tx: the optimizer the state was built with.
    mesh, state_shardings: from `create_train_state`.
    micro_batches: gradient accumulation steps (a `lax.scan`); exact, see the module docstring.
    logp_temperature: logits are divided by it (use the sampler's temperature).
    chunk_size: positions per LM-head chunk (`token_logprobs`); None = one chunk.
    norm_length: the constant length of "seq-mean-token-sum-norm" (Dr.GRPO); default L, the
      padded length. verl uses max_response_length: pass the response bucket R for that.
    rules: logical -> mesh axis rules.
    remat_policy: overrides `model.cfg.remat_policy` ("none", "full", "dots", ...).
    compute_entropy: compute the entropy metric (always on when the objective needs it).
    logz_dropout: train-mode dropout in the log Z head, as the FlowRL authors.
    compiler_options: XLA options for the jit (tests pass
      {"xla_backend_optimization_level": 0}, which compiles tiny models ~3x faster on CPU).

  Returns:
    train_step(state, batch, *, prompt_length=0) -> (new state, metrics). prompt_length P (a
    static int, one compile per value): columns < P are prompt, never in loss_mask, and get no
    LM head (logp 0), which saves P / L of the head's FLOPs; the rollout layout [prompt P |
    response R] passes its P. Metrics: loss, grad_norm (before clipping), lr,
    entropy (masked mean over loss_mask), tokens (number of loss tokens), and the objective's
    metrics (means over micro-batches). `train_step.num_traces()` counts traces (recompiles);
    `train_step.jitted_for(P)` is the underlying `jax.jit` function for prompt_length P
    (`train_step.jitted` for P = 0; call them under `sharding.use_mesh`).
  """
  if micro_batches < 1:
    raise ValueError(f"micro_batches must be >= 1, got {micro_batches}.")
  if not isinstance(objective, losses.Objective):
    raise ValueError(f"objective must be a losses.Objective (from losses.get(name, ...)), got "
                     f"{type(objective).__name__}; valid names: {', '.join(losses.names())}.")
  needs = tuple(objective.spec.needs)
  unknown = sorted(set(needs) - set(_NEEDS))
  if unknown:
    raise ValueError(f"Objective {objective.name!r} needs {unknown}, which the train step cannot "
                     f"provide; it provides {list(_NEEDS)}.")
  rules = tuple(rules or sharding.DEFAULT_RULES)
  cfg = model.cfg if remat_policy is None else model.cfg.replace(remat_policy=remat_policy)
  model = Decoder(cfg)
  with_entropy = compute_entropy or "entropy" in needs
  with_logz_head = isinstance(state_shardings.params, Mapping) and (
      "logz_head" in state_shardings.params)
  batch_sh = batch_sharding(mesh)
  batch_axes = batch_sh.spec[0]
  replicated = _replicated(mesh)
  mb_sharding = NamedSharding(mesh, PartitionSpec(None, batch_axes))
  traces = [0]

  def loss_fn(params, mb, key, denominator, prompt_length):
    obj_key, dropout_key = jax.random.split(key)
    tokens_BT, mask_BT, loss_mask_BT = mb["tokens"], mb["mask"], mb["loss_mask"]
    out = model.apply({"params": params["model"]}, tokens_BT, mask_BT=mask_BT,
                      return_hidden=True, compute_logits=False)
    # Column t is scored from the hidden state at t - 1; columns before `first` get logp 0
    # (column 0 has no prefix, prompt columns are never in loss_mask) and no LM head.
    first = max(prompt_length, 1)
    res = logprobs.token_logprobs(params["model"], cfg, out.hidden[:, first - 1:-1],
                                  tokens_BT[:, first:], temperature=logp_temperature,
                                  chunk_size=chunk_size, return_entropy=with_entropy)
    logp_BT, ent_BT = res if with_entropy else (res, None)
    pad = lambda x: jnp.pad(x, ((0, 0), (first, 0)))
    logp_BT = pad(logp_BT)
    ent_BT = None if ent_BT is None else jax.lax.stop_gradient(pad(ent_BT))
    log_z_B = None
    if "log_z" in needs:
      log_z_B = _logz_head().apply({"params": params["logz_head"]}, out.hidden,
                                   mb["prompt_mask"], deterministic=not logz_dropout,
                                   rngs={"dropout": dropout_key})
    inputs = losses.LossInputs(
        logp=logp_BT, old_logp=mb["old_logp"].astype(jnp.float32),
        advantages=mb["advantages"].astype(jnp.float32), mask=loss_mask_BT,
        ref_logp=None if "ref_logp" not in mb else mb["ref_logp"].astype(jnp.float32),
        entropy=ent_BT, log_z=log_z_B)
    per_token_BT, obj_metrics = objective(inputs, key=obj_key)
    total, _ = losses.aggregate_parts(per_token_BT, loss_mask_BT, objective.agg_mode,
                                      norm_length=norm_length)
    ent_sum = (jnp.zeros((), jnp.float32) if ent_BT is None
               else jnp.sum(jnp.where(loss_mask_BT, ent_BT, 0.0)))
    return losses.safe_divide(total, denominator), (jax.lax.stop_gradient(obj_metrics), ent_sum)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict[str, Array], prompt_length: int
           ) -> tuple[TrainState, dict[str, Array]]:
    traces[0] += 1
    params = state.params
    loss_mask = batch["loss_mask"]
    # The denominators depend on the mask only: sum them first, then every micro-batch adds
    # grad(s_i) / D, so the accumulation is the gradient of the whole batch's loss.
    _, denominator = losses.aggregate_parts(jnp.zeros(loss_mask.shape, jnp.float32), loss_mask,
                                            objective.agg_mode, norm_length=norm_length)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    mb_keys = jax.random.split(step_key, micro_batches)
    if micro_batches == 1:
      (loss, (obj_metrics, ent_sum)), grads = grad_fn(params, batch, mb_keys[0], denominator,
                                                       prompt_length)
      grads = _to_f32(grads)
    else:
      n = loss_mask.shape[0]

      def split(x):
        # Micro-batch m takes rows m, m + M, m + 2M, ...: every device keeps an equal share.
        x = x.reshape((n // micro_batches, micro_batches) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, mb_sharding)

      mbs = jax.tree.map(split, batch)
      zeros = jax.lax.with_sharding_constraint(
          jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
          state_shardings.params)

      def body(carry, xs):
        acc, loss_acc = carry
        mb, k = xs
        (loss_i, aux), g = grad_fn(params, mb, k, denominator, prompt_length)
        acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
        return (acc, loss_acc + loss_i), aux

      (grads, loss), (obj_metrics, ent_sums) = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32)), (mbs, mb_keys))
      obj_metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), obj_metrics)
      ent_sum = jnp.sum(ent_sums)
    grad_norm = optax.global_norm(grads)
    new_params, new_opt_state = apply_gradients(tx, params, state.opt_state, grads)
    num_tokens = jnp.sum(loss_mask.astype(jnp.float32))
    metrics = dict(obj_metrics)
    metrics.update(
        loss=loss, grad_norm=grad_norm, lr=learning_rate(new_opt_state),
        tokens=num_tokens)
    if with_entropy:
      metrics["entropy"] = losses.safe_divide(ent_sum, num_tokens)
    metrics = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state)
    return new_state, metrics

  jitted_by_prompt_length = {}

  def jitted_for(prompt_length: int):
    if prompt_length not in jitted_by_prompt_length:
      jitted_by_prompt_length[prompt_length] = jax.jit(
          functools.partial(step, prompt_length=prompt_length),
          in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, replicated),
          donate_argnums=(0,),
          compiler_options=None if compiler_options is None else dict(compiler_options))
    return jitted_by_prompt_length[prompt_length]

  batch_devices = _batch_devices(mesh)

  def train_step(state: TrainState, batch: Mapping[str, Any], *, prompt_length: int = 0
                 ) -> tuple[TrainState, dict]:
    batch = _check_batch(batch, needs=needs, with_logz_head=with_logz_head,
                         micro_batches=micro_batches, batch_devices=batch_devices)
    prompt_length = _check_prompt_length(prompt_length, batch)
    with sharding.use_mesh(mesh, rules):
      return jitted_for(prompt_length)(state, batch)

  train_step.jitted = jitted_for(0)
  train_step.jitted_for = jitted_for
  train_step.num_traces = lambda: traces[0]
  return train_step


def make_logp_fn(model: Decoder, *, mesh: Mesh, temperature: float = 1.0,
                 chunk_size: Optional[int] = None, rules: Optional[sharding.Rules] = None
                 ) -> Callable[[Any, Mapping[str, Array]], Array]:
  """Jitted `logp_fn(params_model, batch) -> [N, L]` f32 log-probs (old_logp / ref_logp).

  Reads batch["tokens"] and batch["mask"]; column t scores token t (column 0 is 0), exactly the
  logp the train step computes, so old_logp recomputed with the current params gives ratio 1.
  `logp_fn(params, batch, prompt_length=P)` leaves the P prompt columns 0 and skips their LM head,
  as `train_step(..., prompt_length=P)`.
  """
  rules = tuple(rules or sharding.DEFAULT_RULES)

  def fn(params, tokens_BT, mask_BT, prompt_length):
    return logprobs.forward_logprobs(model, params, tokens_BT, mask_BT=mask_BT,
                                     temperature=temperature, chunk_size=chunk_size,
                                     prompt_length=prompt_length)

  jitted = jax.jit(fn, static_argnames="prompt_length")

  def logp_fn(params_model: Any, batch: Mapping[str, Array], *, prompt_length: int = 0
              ) -> Array:
    if isinstance(params_model, Mapping) and "model" in params_model:
      params_model = params_model["model"]
    tokens, mask = batch["tokens"], batch["mask"]
    prompt_length = _check_prompt_length(prompt_length, {"tokens": tokens, "loss_mask": None})
    with sharding.use_mesh(mesh, rules):
      spec = sharding.logical_to_spec(("batch", None), tokens.shape, mesh, rules)
      sh = NamedSharding(mesh, spec)
      return jitted(params_model, jax.device_put(tokens, sh), jax.device_put(mask, sh),
                    prompt_length=prompt_length)

  return logp_fn
