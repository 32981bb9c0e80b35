"""Whether one RL step of a config fits its accelerators, proven by compiling, not by running.

Every jitted program of a step (DESIGN §4: the sampler's prefill and decode loop, the
old / reference log-prob scoring of the whole rollout batch, the train step on one mini-batch)
is built by the same builders the loop uses (`components`, `train`, `scoring`, `Sampler`),
lowered on *abstract* inputs (`jax.ShapeDtypeStruct`s with their real shardings: no weights
are loaded or allocated) over a mesh of simulated devices, and compiled ahead of time; XLA's
buffer assignment (`compiled.memory_analysis()`) then gives each program's per-device
arguments, outputs, temporaries and peak. Beside a program, the state that outlives it stays
resident (optimizer moments and master weights while sampling, the reference model, the rollout
batch); the device peak of a program is its own peak plus that.

  plan = memory_plan.build_plan(config, device_memory_gb=80)   # 8 simulated devices: XLA_FLAGS
  print(memory_plan.report(plan))                              # table, advice, last line

Caveat: the programs are compiled by XLA:CPU (SPMD-partitioned exactly as on GPUs, but fusion
and buffer reuse differ by backend), so temporaries are an estimate of the GPU's; resident
state (parameters, moments, cache) is exact. Sizes are GiB (2^30 bytes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from lad_jax import components
from lad_jax import config_utils
from lad_jax import continuous
from lad_jax import rl
from lad_jax import scoring
from lad_jax import sharding
from lad_jax import train as train_lib
from lad_jax.models import params as params_lib
from lad_jax.models import shapes
from lad_jax.models.config import ModelConfig

GIB = float(2 ** 30)
ConfigError = config_utils.ConfigError


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """Per-device bytes of one compiled program (`compiled.memory_analysis()`).

  Attributes:
    name: prefill, decode, score_logp, train_step.
    shape: rows x columns of the program's batch, for the table.
    rows: the rows its activations scale with (what a knob would shrink).
    arguments, outputs, alias, temps, code: XLA's sizes; alias = outputs written in place of a
      donated argument.
    peak: arguments + outputs - alias + temporaries (an upper bound of the program's peak).
    resident_other: bytes other state keeps on the device while it runs (not its arguments).
  """

  name: str
  shape: str
  rows: int
  arguments: int
  outputs: int
  alias: int
  temps: int
  code: int
  peak: int
  resident_other: int

  @property
  def device_peak(self) -> int:
    return self.peak + self.resident_other


@dataclasses.dataclass(frozen=True)
class Resident:
  """Per-device bytes of the state that lives across programs (exact, from shardings)."""

  params: int
  master: int  # fp32 master copy (bf16 parameters), 0 otherwise
  moments: int  # the optimizer's moments (and scalars)
  ref_params: int  # the frozen reference model, 0 when nothing needs it
  kv_cache: int  # one sampler call's cache (rows_per_call rows)
  batch: int  # the whole rollout TrainBatch
  grad_accum: int  # fp32 gradient accumulator: inside the train step's temporaries

  @property
  def total(self) -> int:
    return self.params + self.master + self.moments + self.ref_params


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static sizes of one step, from the config."""

  group_size: int
  prompts: int  # prompts per step (P): the rollout batch has N = P x G rows
  prompt_len: int  # the prompt bucket of data.max_prompt_tokens
  response_len: int  # sampling.max_new_tokens
  per_call: int  # prompts per sampler call (rows_per_call / G)
  mini_batches: int
  micro_batches: int
  batch_devices: int

  @property
  def length(self) -> int:
    return self.prompt_len + self.response_len

  @property
  def rows(self) -> int:
    return self.prompts * self.group_size


@dataclasses.dataclass(frozen=True)
class Plan:
  config: Any
  model_cfg: ModelConfig
  layout: Layout
  programs: tuple[ProgramMemory, ...]
  resident: Resident
  budget: int
  device_memory: int
  memory_fraction: float
  num_devices: int
  full_depth_resident: Optional[int]  # resident state at the published depth, when cut

  @property
  def worst(self) -> ProgramMemory:
    return max(self.programs, key=lambda p: p.device_peak)

  @property
  def fits(self) -> bool:
    return all(p.device_peak <= self.budget for p in self.programs)


# ------------------------------------------------------------------------------------------------
# The model, abstractly
# ------------------------------------------------------------------------------------------------


def model_config(config, *, model_shape: Optional[str] = None,
                 num_layers: Optional[int] = None) -> ModelConfig:
  """The ModelConfig the run would build (components.load_model's overrides applied): from
  config.json at model.path when it exists, else the published shape `model_shape` (default: the
  one named by model.path's directory, `shapes.infer`), else model.random."""
  overrides = components.model_overrides(config)
  path = os.path.expanduser(config.model.path or "")
  if model_shape is None and config.model.source == "hf" and path and os.path.isfile(
      os.path.join(path, "config.json")):
    cfg = ModelConfig.from_hf(path, **overrides)
  elif model_shape is not None or shapes.infer(config.model.path):
    cfg = ModelConfig.from_hf(shapes.get(model_shape or shapes.infer(config.model.path)),
                              **overrides)
  elif config.model.source == "random":
    cfg = ModelConfig(**dict(config.model.random), **overrides)
  else:
    raise ConfigError(f"No config.json at config.model.path={config.model.path!r} and no known "
                      f"shape in its name: pass --model_shape=<one of {shapes.names()}>.")
  return cfg if num_layers is None else cfg.replace(num_layers=int(num_layers))


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying their shardings (what `.lower` places arguments by)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def abstract_train_state(model_cfg: ModelConfig, tx: Any, mesh: Any, *, with_logz_head: bool
                         ) -> tuple[train_lib.TrainState, train_lib.TrainState]:
  """(abstract TrainState with shardings, its shardings): the shape half of
  `train.create_train_state` (same helpers: parameter shardings by the logical rules, moments and
  master copy sharded like their parameters), without its initialising jit."""
  params = {"model": params_lib.abstract_params(model_cfg)[0]}
  param_sh = {"model": params_lib.param_shardings(model_cfg, mesh)}
  if with_logz_head:
    params["logz_head"] = jax.eval_shape(
        lambda k: scoring.init_logz_head(k, model_cfg.hidden_size), jax.random.key(0))
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh["logz_head"] = jax.tree.map(lambda _: replicated, params["logz_head"])
  master = train_lib._is_low_precision(params)  # pylint: disable=protected-access
  abstract = jax.eval_shape(lambda p: train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=p,
      opt_state=train_lib.init_opt_state(tx, p, master_weights=master),
      key=jax.random.key_data(jax.random.key(0))), params)
  shardings = train_lib._state_shardings(tx, abstract, param_sh, mesh)  # pylint: disable=protected-access
  return with_shardings(abstract, shardings), shardings


def bytes_per_device(abstract: Any) -> int:
  """Largest per-device bytes of a tree of sharded ShapeDtypeStructs."""
  leaves = jax.tree.leaves(abstract)
  return sharding.per_device_bytes(leaves, [x.sharding for x in leaves]) if leaves else 0


# ------------------------------------------------------------------------------------------------
# Lowering the programs of one step
# ------------------------------------------------------------------------------------------------


def _layout(config, mesh, sampler) -> Layout:
  s, t = config.sampling, config.train
  prompt_len = min(b for b in s.prompt_buckets if b >= config.data.max_prompt_tokens)
  if _is_continuous(sampler):  # the slots decoded at a time, as prompts x G
    per_call = max(1, sampler.decode_slots // s.group_size)
  else:
    per_call, _ = sampler._chunking(t.prompts_per_step, s.group_size)  # pylint: disable=protected-access
  return Layout(group_size=s.group_size, prompts=t.prompts_per_step, prompt_len=prompt_len,
                response_len=s.max_new_tokens, per_call=per_call, mini_batches=t.mini_batches,
                micro_batches=t.micro_batches, batch_devices=train_lib.batch_devices(mesh))


def _sd(shape, dtype, sh=None) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sh)


def abstract_batch(rows: int, layout: Layout, mesh: Any, *, with_ref: bool,
                   with_prompt_mask: bool) -> train_lib.TrainBatch:
  """The TrainBatch `rollout.to_train_batch` makes (and the BEHAVIOUR stage fills), abstractly."""
  sh = train_lib.batch_sharding(mesh)
  shape = (rows, layout.length)
  return train_lib.TrainBatch(
      tokens=_sd(shape, jnp.int32, sh), mask=_sd(shape, bool, sh),
      loss_mask=_sd(shape, bool, sh), old_logp=_sd(shape, jnp.float32, sh),
      advantages=_sd((rows,), jnp.float32, sh),
      ref_logp=_sd(shape, jnp.float32, sh) if with_ref else None,
      prompt_mask=_sd(shape, bool, sh) if with_prompt_mask else None,
      prompt_length=layout.prompt_len)


def make_sampler(config, model_cfg: ModelConfig, mesh: Any, platform: str) -> Any:
  """`components.make_sampler` as the run builds it, for the target platform (the cache layout
  and compiler options the sampler picks for a GPU, not for the CPU that compiles here)."""
  tokenizer = types.SimpleNamespace()  # special_ids falls back to the model's EOS / pad ids
  sampler = components.make_sampler(config, model_cfg, tokenizer, mesh)
  sampler.platform = platform
  sampler.per_layer_cache = platform == "cpu"
  return sampler


def _is_continuous(sampler: Any) -> bool:
  return isinstance(sampler, continuous.ContinuousSampler)


def lower_sampler(sampler: Any, params: Any, layout: Layout, config) -> tuple[Any, Any]:
  """(prefill, decode) of one sampler call, lowered: per_call prompts x prompt bucket, a cache
  of per_call x G rows x (bucket + max_new_tokens) slots. A continuous-batching sampler's
  (insert of refill_rows rows, decode of the slots) instead."""
  s = config.sampling
  if _is_continuous(sampler):
    return _lower_continuous(sampler, params, layout, s)
  prefill, decode = sampler._compiled_fns(  # pylint: disable=protected-access
      prompt_len=layout.prompt_len, response_len=layout.response_len,
      num_prompts=layout.per_call, group_size=layout.group_size,
      temperature=float(s.temperature), top_p=float(s.top_p), top_k=int(s.top_k))
  tokens = _sd((layout.per_call, layout.prompt_len), jnp.int32)
  params = with_shardings(params, sampler.param_shardings)  # the decode layout, as `sample`
  with sharding.use_mesh(sampler.mesh):
    lowered_prefill = prefill.lower(params, tokens, _sd(tokens.shape, bool))
    cache, logits = lowered_prefill.out_info
    scalar = _sd((), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    limits = _sd((layout.per_call * layout.group_size,), jnp.int32)
    lowered_decode = decode.lower(params, cache, logits, key, scalar, scalar, limits)
  return lowered_prefill, lowered_decode


def _lower_continuous(sampler: Any, params: Any, layout: Layout, s: Any) -> tuple[Any, Any]:
  """(insert, decode) of `continuous.ContinuousSampler` on abstract slots."""
  fns = sampler._fns_for(  # pylint: disable=protected-access
      layout.prompt_len, layout.response_len,
      continuous.Sampling(float(s.temperature), float(s.top_p), int(s.top_k)))
  k, u = sampler.refill_rows, sampler.refill_prompts(layout.group_size)
  ints = _sd((k,), jnp.int32)
  refill = continuous.Refill(slot_K=ints, tokens_UT=_sd((u, layout.prompt_len), jnp.int32),
                             mask_UT=_sd((u, layout.prompt_len), bool), prompt_K=ints,
                             row_K=ints, limit_K=ints)
  params = with_shardings(params, sampler.param_shardings)
  key = jax.eval_shape(lambda: jax.random.key(0))
  with sharding.use_mesh(sampler.mesh):
    slots = fns.empty.eval_shape()
    return (fns.insert.lower(params, slots, refill, key),
            fns.decode.lower(params, slots, key, _sd((), jnp.int32)))


def lower_score(config, model_cfg: ModelConfig, mesh: Any, params: Any, layout: Layout) -> Any:
  """The loop's behaviour-scoring program (`components.make_logp_fn`: row chunks of the
  trainer's micro size) on the whole rollout batch, unpacked: N rows x (bucket + R), every
  response at its longest (packing only ever shortens the rows)."""
  logp_fn = components.make_logp_fn(config, model_cfg, mesh)
  batch = abstract_batch(layout.rows, layout, mesh, with_ref=False, with_prompt_mask=False)
  return logp_fn.lower(params, batch.tokens, batch.mask, prompt_length=layout.prompt_len)


def lower_train_step(spec: train_lib.StepSpec, mesh: Any, state: Any, state_shardings: Any,
                     batch: train_lib.TrainBatch) -> Any:
  """train.jit_train_step on one mini-batch, the state donated."""
  step = train_lib.jit_train_step(spec, mesh=mesh, state_shardings=state_shardings)
  return step.lower(state, batch)


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def measure(name: str, lowered: Any, *, shape: str, rows: int, resident_other: int
            ) -> ProgramMemory:
  """Compiles `lowered` and reads XLA's per-device buffer sizes."""
  m = lowered.compile().memory_analysis()
  # XLA:CPU's peak_memory_in_bytes leaves out most temporaries (it reports ~ the arguments for
  # a program with GiBs of them), so the peak is the bound all backends agree on.
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)
  return ProgramMemory(
      name=name, shape=shape, rows=rows, arguments=int(m.argument_size_in_bytes),
      outputs=int(m.output_size_in_bytes), alias=int(m.alias_size_in_bytes),
      temps=int(m.temp_size_in_bytes), code=int(m.generated_code_size_in_bytes), peak=peak,
      resident_other=int(resident_other))


def _resident(state: Any, ref_needed: bool, cache_bytes: int, batch: Any) -> Resident:
  opt = state.opt_state
  master = bytes_per_device(opt.master) if isinstance(opt, train_lib.MasterWeightsState) else 0
  params = bytes_per_device(state.params)
  grad = jax.tree.map(lambda x: _sd(x.shape, jnp.float32, x.sharding), state.params)
  return Resident(params=params, master=master, moments=bytes_per_device(opt) - master,
                  ref_params=bytes_per_device(state.params["model"]) if ref_needed else 0,
                  kv_cache=cache_bytes, batch=bytes_per_device(batch),
                  grad_accum=bytes_per_device(grad))


def _full_depth_resident(config, model_cfg: ModelConfig, tx: Any, mesh: Any, model_shape,
                         ref_needed: bool, with_logz_head: bool) -> int:
  full = model_config(config, model_shape=model_shape)
  if full.num_layers == model_cfg.num_layers:
    return 0
  state, _ = abstract_train_state(full, tx, mesh, with_logz_head=with_logz_head)
  r = _resident(state, ref_needed, 0, [])
  return r.total


class _Step(NamedTuple):
  """What the loop's builders make for one step, abstractly."""

  mesh: Any
  model_cfg: ModelConfig
  objective: Any
  tx: Any
  ref_needed: bool
  state: Any  # abstract TrainState with shardings
  state_shardings: Any
  sampler: Any
  layout: Layout


def _setup(config, *, model_shape: Optional[str], num_layers: Optional[int], platform: str
           ) -> _Step:
  mesh = components.make_mesh(config)
  model_cfg = model_config(config, model_shape=model_shape, num_layers=num_layers)
  objective, estimator = components.make_objective(config)
  tx = components.make_optimizer(config)
  state, state_sh = abstract_train_state(model_cfg, tx, mesh,
                                         with_logz_head=objective.needs_log_z)
  sampler = make_sampler(config, model_cfg, mesh, platform)
  return _Step(mesh=mesh, model_cfg=model_cfg, objective=objective, tx=tx,
               ref_needed=components.needs_ref(objective, estimator), state=state,
               state_shardings=state_sh, sampler=sampler, layout=_layout(config, mesh, sampler))


def _batch(s: _Step, rows: int) -> train_lib.TrainBatch:
  return abstract_batch(rows, s.layout, s.mesh, with_ref=s.ref_needed,
                        with_prompt_mask=s.objective.needs_log_z)


def _resident_of(s: _Step) -> Resident:
  lay = s.layout
  rows = lay.per_call * lay.group_size
  cache = with_shardings(
      jax.eval_shape(lambda: s.sampler._empty_cache(rows, lay.length)),  # pylint: disable=protected-access
      s.sampler._cache_shardings(rows, lay.length))  # pylint: disable=protected-access
  return _resident(s.state, s.ref_needed, bytes_per_device(cache), _batch(s, lay.rows))


def _programs(config, s: _Step, res: Resident, log: Callable[[str], None]
              ) -> tuple[ProgramMemory, ...]:
  """prefill, decode, score_logp, train_step: compiled, with what stays resident beside each."""
  lay, params = s.layout, s.state.params["model"]
  # While sampling and scoring: the optimizer state, the reference model (and a log Z head).
  beside = res.master + res.moments + res.ref_params + res.params - bytes_per_device(params)
  rows = lay.per_call * lay.group_size
  log(f"compiling prefill + decode ({rows} rows x {lay.length})")
  prefill, decode = lower_sampler(s.sampler, params, lay, config)
  out = [measure(name, lowered, shape=f"{rows}x{lay.length}", rows=rows, resident_other=beside)
         for name, lowered in (("prefill", prefill), ("decode", decode))]
  log(f"compiling score_logp ({lay.rows} rows x {lay.length})")
  out.append(measure("score_logp", lower_score(config, s.model_cfg, s.mesh, params, lay),
                     shape=f"{lay.rows}x{lay.length}", rows=lay.rows,
                     resident_other=beside + res.batch))
  rows = lay.rows // lay.mini_batches
  log(f"compiling train_step ({rows} rows x {lay.length}, {lay.micro_batches} micro-batches)")
  spec = components.step_spec(config, s.model_cfg, s.objective, s.tx)
  out.append(measure(
      "train_step", lower_train_step(spec, s.mesh, s.state, s.state_shardings, _batch(s, rows)),
      shape=f"{rows}x{lay.length}/{lay.micro_batches}", rows=rows // lay.micro_batches,
      resident_other=res.ref_params + res.batch))
  return tuple(out)


def build_plan(config, *, device_memory_gb: float, model_shape: Optional[str] = None,
               num_layers: Optional[int] = None, platform: str = "gpu",
               log: Callable[[str], None] = lambda s: None) -> Plan:
  """Lowers and compiles every program of one RL step of `config` and collects their memory.

  Args:
    config: a run config (configs/*.py); validated here.
    device_memory_gb: memory of one accelerator, GiB; the budget is this x the memory fraction
      (config.runtime.memory_fraction, or XLA_PYTHON_CLIENT_MEM_FRACTION if set: rl.memory_fraction).
    model_shape, num_layers: see `model_config`; num_layers cuts the depth (faster compiles).
    platform: the accelerator the run targets (the sampler's cache layout depends on it).
    log: progress lines (each compile can take minutes at 7B scale on CPU).
  """
  config_utils.validate(config)
  s = _setup(config, model_shape=model_shape, num_layers=num_layers, platform=platform)
  res = _resident_of(s)
  programs = _programs(config, s, res, log)
  full = 0
  if num_layers:
    full = _full_depth_resident(config, s.model_cfg, s.tx, s.mesh, model_shape, s.ref_needed,
                                s.objective.needs_log_z)
  fraction = rl.memory_fraction(config)
  device_memory = int(device_memory_gb * GIB)
  return Plan(config=config, model_cfg=s.model_cfg, layout=s.layout, programs=programs,
              resident=res, budget=int(device_memory * fraction), device_memory=device_memory,
              memory_fraction=fraction, num_devices=s.mesh.devices.size,
              full_depth_resident=full or None)


# ------------------------------------------------------------------------------------------------
# Advice and report
# ------------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def _fixed(p: ProgramMemory) -> int:
  """Bytes of a program's device peak that do not scale with its rows (an estimate: everything
  but the temporaries; the temporaries are assumed proportional to rows)."""
  return p.device_peak - p.temps


def _smallest_divisor_at_least(total: int, need: float, step: int = 1) -> Optional[int]:
  """The smallest d >= need with total % (d * step) == 0, if any."""
  for d in range(max(1, math.ceil(need)), total // step + 1):
    if total % (d * step) == 0:
      return d
  return None


def _advice_train(plan: Plan, p: ProgramMemory) -> str:
  room = plan.budget - _fixed(p)
  lay, cfg = plan.layout, plan.model_cfg
  tips = []
  if room > 0 and p.temps:
    mb_rows = lay.rows // lay.mini_batches
    need = lay.micro_batches * p.temps / room
    mb = _smallest_divisor_at_least(mb_rows, need, lay.batch_devices)
    tips.append(f"train.micro_batches={mb}" if mb else
                f"train.micro_batches>{mb_rows // lay.batch_devices} (more than the rows allow)")
  else:
    tips.append("no micro_batches fits: the state alone is over budget; more fsdp devices "
                "(mesh) or a smaller model")
  if cfg.remat_policy == "none":
    tips.append("model.remat_policy=full")
  tips.append(f"train.chunk_size (now {plan.config.train.chunk_size}) for the LM head")
  return ", ".join(tips)


def _advice_sampler(plan: Plan, p: ProgramMemory) -> str:
  per_row = (p.temps + plan.resident.kv_cache) / max(p.rows, 1)
  room = plan.budget - (p.device_peak - p.temps - plan.resident.kv_cache)
  g = plan.layout.group_size
  rows = int(room // per_row) // g * g if room > 0 else 0
  knob = ("decode_slots" if plan.config.sampling.get("decode_slots", 0) else "rows_per_call")
  if rows >= g:
    return (f"sampling.{knob}={rows} (now {plan.config.sampling[knob]}; cache + "
            f"temporaries {_gib(per_row * 1024)} GiB per 1024 rows)")
  return "sampling.rows_per_call=G does not fit either: more devices (mesh) or a smaller model"


def _advice_score(plan: Plan, p: ProgramMemory) -> str:
  room = plan.budget - _fixed(p)
  if room <= 0:
    return "the state alone is over budget: more fsdp devices (mesh)"
  step = plan.layout.batch_devices
  rows = (int(p.rows * room / p.temps) if p.temps else p.rows) // step * step
  return (f"score in micro-batches of <= {rows} rows (now all {p.rows} at once; needs the "
          f"micro-batched scoring), or train.chunk_size (now {plan.config.train.chunk_size})")


def advice(plan: Plan) -> list[str]:
  """One line per over-budget program: the knob to turn and, where it can be computed, the
  value that would fit (activations assumed to scale with rows)."""
  out = []
  for p in plan.programs:
    if p.device_peak <= plan.budget:
      continue
    tip = {"train_step": _advice_train, "score_logp": _advice_score}.get(p.name, _advice_sampler)
    out.append(f"over_budget={p.name} device_peak_gib={_gib(p.device_peak)}: {tip(plan, p)}")
  return out


def table(plan: Plan) -> str:
  """The per-device table of programs (GiB) and the resident state."""
  head = (f"{'program':<11} {'rows x len':>16} {'args':>7} {'outputs':>8} {'alias':>7} "
          f"{'temps':>8} {'code':>6} {'peak':>8} {'+other':>7} {'device':>8}")
  lines = [head]
  for p in plan.programs:
    lines.append(f"{p.name:<11} {p.shape:>16} {_gib(p.arguments):>7} {_gib(p.outputs):>8} "
                 f"{_gib(p.alias):>7} {_gib(p.temps):>8} {_gib(p.code):>6} {_gib(p.peak):>8} "
                 f"{_gib(p.resident_other):>7} {_gib(p.device_peak):>8}")
  r = plan.resident
  lines.append("resident per device (GiB): " + " ".join(
      f"{k}={_gib(v)}" for k, v in dataclasses.asdict(r).items()) + f" total={_gib(r.total)}")
  if plan.full_depth_resident:
    lines.append(f"resident at the published depth (not {plan.model_cfg.num_layers} layers): "
                 f"{_gib(plan.full_depth_resident)} GiB")
  return "\n".join(lines)


def report(plan: Plan) -> str:
  """Header, table, advice and the last line `fits=... worst=... peak_gib=... budget_gib=...`."""
  c, lay = plan.model_cfg, plan.layout
  header = (f"model: {c.num_layers} layers, D={c.hidden_size}, V={c.vocab_size}, "
            f"{c.param_dtype} params, remat={c.remat_policy}, attention={c.attention_impl}; "
            f"{plan.num_devices} devices; budget {_gib(plan.device_memory)} GiB x "
            f"{plan.memory_fraction:g} = {_gib(plan.budget)} GiB; step: {lay.prompts} prompts x "
            f"{lay.group_size}, bucket {lay.prompt_len} + {lay.response_len} tokens")
  w = plan.worst
  last = (f"fits={plan.fits} worst={w.name} peak_gib={_gib(w.device_peak)} "
          f"budget_gib={_gib(plan.budget)}")
  return "\n".join([header, table(plan), *advice(plan), last])
