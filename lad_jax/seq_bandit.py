"""The sequence bandit: the 50-arm bandit's exactness for a real autoregressive policy (issue 17).

A tiny `Decoder` answers "pick a number" prompts with two digits and EOS
(`lad_jax.seq_bandit_task`); its whole response space (100 responses per prompt type) is
enumerated, so the policy's exact distribution pi(y|x), the sequence-level LAD target
pi* ∝ pi_old e^(A/eta) and every metric (`lad_jax.seq_bandit_metrics`) are exact. pi_0 is made
in-process by supervised pre-training (one per seed, vmapped), then each method
(`lad_jax.seq_bandit_methods`) trains from it for `phases` phases of `steps_per_phase` updates;
pi_old is the policy at the start of each phase (RLVR's rollout loop: refreshed every K updates).

Modes:
  exact    each update is the real `train.train_step` on a TrainBatch of all P x 100 responses
           with pi_old's token log-probs, the exact advantages of the method's estimator
           (`seq_bandit_methods.exact_advantages`) and the per-row weight Y pi_old(y|x) folded
           into the objective (`combined_objective`): the loss is the expectation of the sampled
           loss under pi_old, over the 100 well-formed responses (pi_old renormalised on them;
           the mass outside them, ~1e-4 for pi_0, is not in the expectation, so a loss whose
           per-response gradient has a constant part, e.g. LAD-KL's f'(1) = 1, can move mass
           there: it is reported and counted as incorrect). Theoretical LAD takes the [P, 100]
           sequence log-probs directly.
  sampled  at each phase start the real `Sampler` draws K x G responses per prompt from pi_old
           (temperature 1, no truncation); update k trains on the k-th G of each prompt with the
           estimator's group advantages (`advantages.compute`), through the same `train_step`.

Methods that share an aggregation, estimator and log Z head (`seq_bandit_methods.group_key`) run
in one compiled program, vmapped over rows = methods x seeds (the method picked by a traced
index); each seed has its own pi_0 and sampling key, the same for every method.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lad_jax import advantages as advantages_lib
from lad_jax import objectives
from lad_jax import scoring
from lad_jax import seq_bandit_methods as methods_lib
from lad_jax import seq_bandit_metrics as metrics_lib
from lad_jax import seq_bandit_task as task_lib
from lad_jax import train
from lad_jax.models.config import ModelConfig
from lad_jax.models.decoder import Decoder
from lad_jax.sampler import Sampler

Array = jax.Array
MODES = ("exact", "sampled")
# Tiny programs: XLA:CPU compile time dominates; the bandit's options compile them faster.
_CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}


@dataclasses.dataclass(frozen=True)
class SeqBanditConfig:
  """One sweep's settings (defaults: the default run).

  Attributes:
    num_prompts: P prompt types.
    hidden, layers: decoder width and depth.
    pretrain_steps, pretrain_lr: Adam cross-entropy pre-training of pi_0.
    phases: pi_old refreshes + 1.
    steps_per_phase: K updates per pi_old.
    log_every: the trajectory keeps the exact distribution every this many updates.
    lr: AdamW learning rate of the RL updates (`train.make_optimizer`, grad clip 1).
    group_size: G samples per prompt per update (sampled mode).
    eta: LAD's temperature (also flowrl's 1/beta and the metrics' pi*).
  """

  num_prompts: int = 4
  hidden: int = 32
  layers: int = 2
  pretrain_steps: int = 300
  pretrain_lr: float = 1e-2
  phases: int = 3
  steps_per_phase: int = 40
  log_every: int = 20
  lr: float = 3e-3
  group_size: int = 16
  eta: float = 1.0

  def __post_init__(self):
    if self.steps_per_phase % self.log_every:
      raise ValueError(f"steps_per_phase ({self.steps_per_phase}) must be a multiple of "
                       f"log_every ({self.log_every}).")


class Setup(NamedTuple):
  """What every method shares: the task, model, enumeration, pi_0 per seed."""

  config: SeqBanditConfig
  task: task_lib.Task
  cfg: ModelConfig
  enum: task_lib.Enumerated
  params0_S: Any  # [S, ...] decoder params
  logp0_SNL: np.ndarray  # [S, P*Y, 4] pi_0 token log-probs of the enumerated responses
  seeds: tuple[int, ...]
  sampler: Sampler


def _jit(fn, *args):
  """jit + compile with the CPU options (plain compile elsewhere); returns the compiled fn."""
  lowered = jax.jit(fn).lower(*args)
  if jax.default_backend() == "cpu":
    return lowered.compile(compiler_options=_CPU_COMPILER_OPTIONS)
  return lowered.compile()


@functools.lru_cache(maxsize=None)
def _token_logp_fn(cfg: ModelConfig):
  """Jitted (params_model, tokens, mask) -> [N, L] token log-probs (prompt width 1)."""
  return jax.jit(lambda p, t, m: scoring.score({"model": p}, t, m, cfg=cfg, prompt_length=1).logp)


def make_setup(config: SeqBanditConfig, seeds) -> Setup:
  """Builds the task and pre-trains pi_0 for every seed (one vmapped program)."""
  task = task_lib.make_task(config.num_prompts)
  cfg = task_lib.model_config(task, hidden=config.hidden, layers=config.layers)
  enum = task_lib.enumerated_tokens(task)
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
  fn = jax.vmap(functools.partial(task_lib.pretrain, task=task, cfg=cfg,
                                  steps=config.pretrain_steps, lr=config.pretrain_lr))
  params0 = _jit(fn, keys)(keys)
  logp0 = jax.vmap(lambda p: task_lib.token_logp(p, cfg, enum))(params0)
  sampler = Sampler(Decoder(cfg), eos_ids=(task_lib.EOS,), pad_id=task.pad_id, prompt_buckets=(1,))
  return Setup(config, task, cfg, enum, params0, np.asarray(logp0), tuple(seeds), sampler)


def seq_logp(token_logp_RNL) -> np.ndarray:
  """[R, P*Y, L] token log-probs -> [R, P, Y] sequence log-probs (float64)."""
  x = np.asarray(token_logp_RNL, np.float64).sum(-1)
  return x.reshape(x.shape[0], -1, task_lib.NUM_RESPONSES)


# ------------------------------------------------------------------------------------------------
# State and steps
# ------------------------------------------------------------------------------------------------


def init_state(params_model: Any, key: Array, *, tx, cfg: ModelConfig, logz_head: bool
               ) -> train.TrainState:
  """A fresh train state around given decoder params (vmappable; `create_train_state` without
  the mesh)."""
  head_key, state_key = jax.random.split(key)
  params = {"model": params_model}
  if logz_head:
    params["logz_head"] = scoring.init_logz_head(head_key, cfg.hidden_size)
  return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=train.init_opt_state(tx, params, master_weights=False),
                          key=jax.random.key_data(state_key))


class ExactInputs(NamedTuple):
  """One phase's exact-mode inputs of one row (method x seed).

  Attributes:
    batch: the P*Y enumerated responses (old_logp = pi_old's, advantages [N] exact).
    scale_N: Y pi_old(y|x) (normalised over the 100).
    old_seq_PY: log pi_old(y|x) (theoretical LAD).
    adv_PY: exact advantages (theoretical LAD).
  """

  batch: train.TrainBatch
  scale_N: Array
  old_seq_PY: Array
  adv_PY: Array


class Group(NamedTuple):
  """Methods that share one program (`seq_bandit_methods.group_key`)."""

  methods: tuple[methods_lib.Method, ...]
  spec: train.StepSpec  # its objective: methods[0]'s (the step rebinds a combined one)

  @property
  def objectives(self) -> list[objectives.Objective]:
    return [m.get() for m in self.methods]


def _exact_step(state, inputs: ExactInputs, index, *, group: Group, setup: Setup):
  """One exact-mode update: the real train step on the weighted objective, or theoretical LAD."""
  if not group.methods[0].exact_only:
    objective = methods_lib.combined_objective(group.objectives, index, inputs.scale_N)
    spec = dataclasses.replace(group.spec, objective=objective)
    state, metrics = train.train_step(state, inputs.batch, spec=spec)
    return state, metrics["loss"]
  num_prompts = setup.task.num_prompts
  objective = methods_lib.combined_objective(group.objectives, index)

  def loss_fn(params):
    seq_PY = task_lib.exact_seq_logp(params["model"], setup.cfg, setup.enum, num_prompts)
    return methods_lib.theoretical_loss(objective, seq_PY, inputs.old_seq_PY, inputs.adv_PY)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  params, opt_state = train.apply_gradients(group.spec.tx, state.params, state.opt_state, grads)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss


def _eval(state, setup: Setup):
  return task_lib.token_logp(state.params["model"], setup.cfg, setup.enum)


def exact_chunk(state, index, inputs: ExactInputs, *, group: Group, setup: Setup, steps: int):
  """`steps` exact updates on one phase's inputs; (state, mean loss, token logp of the 100s)."""
  step = functools.partial(_exact_step, group=group, setup=setup)
  state, loss = jax.lax.scan(lambda s, _: step(s, inputs, index), state, None, length=steps)
  return state, loss.mean(), _eval(state, setup)


def sampled_chunk(state, index, batches_C: train.TrainBatch, *, group: Group, setup: Setup):
  """One update per leading row of batches_C; (state, mean loss, token logp of the 100s)."""
  spec = dataclasses.replace(
      group.spec, objective=methods_lib.combined_objective(group.objectives, index))
  state, metrics = jax.lax.scan(lambda s, b: train.train_step(s, b, spec=spec), state, batches_C)
  return state, metrics["loss"].mean(), _eval(state, setup)


# ------------------------------------------------------------------------------------------------
# Phase inputs (rows R = methods x seeds, seed-minor)
# ------------------------------------------------------------------------------------------------


def _seed_rows(setup: Setup, x, num_methods: int):
  """[S, ...] -> [M*S, ...] (every method gets every seed's copy)."""
  return np.concatenate([np.asarray(x)] * num_methods)


def phase_targets(setup: Setup, estimator: str, old_seq_RPY, logp0_RPY):
  """(pi_old probabilities, exact advantages, pi*) of a phase, each [R, P, Y]."""
  q, _ = metrics_lib.probabilities(old_seq_RPY)
  adv = np.stack([methods_lib.exact_advantages(estimator, q[r], setup.task.correct_PY,
                                               logp0_RPY[r]) for r in range(q.shape[0])])
  return q, adv, metrics_lib.seq_target(q, adv, setup.config.eta)


def exact_inputs(setup: Setup, old_token_RNL, ref_token_RNL, q_RPY, adv_RPY) -> ExactInputs:
  """The stacked [R, ...] exact-mode inputs of a phase."""
  e, r = setup.enum, q_RPY.shape[0]
  tile = lambda x: np.broadcast_to(x, (r,) + x.shape)
  old = np.where(e.loss_mask_NL, old_token_RNL, 0.0).astype(np.float32)
  batch = train.TrainBatch(
      tokens=tile(e.tokens_NL), mask=tile(e.mask_NL), loss_mask=tile(e.loss_mask_NL),
      old_logp=old, advantages=adv_RPY.reshape(r, -1).astype(np.float32),
      ref_logp=np.asarray(ref_token_RNL, np.float32), prompt_mask=tile(e.prompt_mask_NL),
      prompt_length=1)
  scale = (task_lib.NUM_RESPONSES * q_RPY).reshape(r, -1).astype(np.float32)
  old_seq = np.log(np.maximum(q_RPY, 1e-30)).astype(np.float32)
  return ExactInputs(batch, scale, old_seq, adv_RPY.astype(np.float32))


def rewards_of(task: task_lib.Task, prompt_ids_N: np.ndarray, response_NR: np.ndarray) -> np.ndarray:
  """1.0 where the response is [a, b, EOS] with 10a + b correct for its prompt, else 0."""
  a, b, end = response_NR[:, 0], response_NR[:, 1], response_NR[:, 2]
  well_formed = (a < task_lib.NUM_DIGITS) & (b < task_lib.NUM_DIGITS) & (end == task_lib.EOS)
  y = np.where(well_formed, a * task_lib.NUM_DIGITS + b, 0)
  return (well_formed & task.correct_PY[prompt_ids_N, y]).astype(np.float32)


def _rollout(setup: Setup, params_model, key, num: int):
  """num responses per prompt from the policy: host (tokens, mask, loss_mask, old_logp) [N, 4]."""
  out = jax.device_get(setup.sampler.sample(
      params_model, setup.task.prompts, key, group_size=num,
      max_new_tokens=task_lib.RESPONSE_LEN, temperature=1.0))
  tokens = np.concatenate([out.prompt_tokens, out.response_tokens], 1)
  mask = np.concatenate([out.prompt_mask, out.response_mask], 1)
  loss_mask = np.concatenate([np.zeros_like(out.prompt_mask), out.response_mask], 1)
  old = np.concatenate([np.zeros(out.prompt_mask.shape, np.float32), out.logp], 1)
  return tokens, mask, loss_mask, old


def sampled_batches(setup: Setup, params_model, params0_model, key, *, estimator: str
                    ) -> train.TrainBatch:
  """One row's phase: K x G responses per prompt from pi_old -> K TrainBatches [K, P*G, 4],
  update k taking the k-th G of every prompt, with the estimator's group advantages."""
  c, task = setup.config, setup.task
  k, g, p = c.steps_per_phase, c.group_size, task.num_prompts
  tokens, mask, loss_mask, old = _rollout(setup, params_model, key, k * g)
  ref = np.where(loss_mask, np.asarray(_token_logp_fn(setup.cfg)(params0_model, tokens, mask)), 0)
  rewards = rewards_of(task, np.repeat(np.arange(p), k * g), tokens[:, 1:])
  order = np.arange(p * k * g).reshape(p, k, g).transpose(1, 0, 2).reshape(-1)  # [K, P, G]
  fields = dict(tokens=tokens, mask=mask, loss_mask=loss_mask, old_logp=old.astype(np.float32),
                ref_logp=ref.astype(np.float32), prompt_mask=mask & (np.arange(4) == 0))
  fields = {n: v[order] for n, v in fields.items()}
  fields["advantages"] = advantages_lib.compute(
      estimator, {}, rewards[order], group_size=g, seq_old_logp_N=fields["old_logp"].sum(1),
      seq_ref_logp_N=fields["ref_logp"].sum(1))
  fields = {n: v.reshape((k, p * g) + v.shape[1:]) for n, v in fields.items()}
  return train.TrainBatch(prompt_length=1, **fields)


# ------------------------------------------------------------------------------------------------
# One group of methods in one mode
# ------------------------------------------------------------------------------------------------


class RunResult(NamedTuple):
  """A method's run in one mode over all seeds (numpy; L = phases * K / log_every + 1 points,
  the first is pi_0).

  Attributes:
    method, mode: what ran.
    seq_logp: [S, L, P, Y] log pi(y|x) at each log point.
    target: [S, L, P, Y] pi* of the phase in force at that point (the first point: phase 1's).
    loss: [S, L - 1] mean loss over each chunk of updates.
    compile_s, run_s: seconds of the group's compile and run (shared by its methods).
  """

  method: str
  mode: str
  seq_logp: np.ndarray
  target: np.ndarray
  loss: np.ndarray
  compile_s: float
  run_s: float


def make_group(setup: Setup, names) -> Group:
  """The methods of one `group_key` and their step spec; raises if the keys differ."""
  ms = tuple(methods_lib.method(n, eta=setup.config.eta) for n in names)
  if len({methods_lib.group_key(m) for m in ms}) != 1:
    raise ValueError(f"Methods {list(names)} do not share one program; split them with "
                     "seq_bandit_methods.group_key.")
  tx = train.make_optimizer(lr=setup.config.lr, grad_clip=1.0)
  return Group(ms, train.StepSpec(model_cfg=setup.cfg, objective=ms[0].get(), tx=tx,
                                  compute_entropy=False))


def _initial_states(setup: Setup, group: Group):
  """[R] train states from pi_0 (R = M * S), their method index and sampling keys."""
  m = len(group.methods)
  keys = jax.vmap(jax.random.key)(jnp.asarray(setup.seeds * m, jnp.uint32))
  init_keys, sample_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
  params0 = jax.tree.map(lambda x: _seed_rows(setup, x, m), setup.params0_S)
  fn = functools.partial(init_state, tx=group.spec.tx, cfg=setup.cfg,
                         logz_head=group.spec.objective.needs_log_z)
  index = np.repeat(np.arange(m, dtype=np.int32), len(setup.seeds))
  return jax.jit(jax.vmap(fn))(params0, init_keys), index, sample_keys


def _sampled_phase(setup: Setup, state, sample_keys, phase: int, estimator: str):
  """[R, K, ...] sampled batches of one phase (one Sampler call per row)."""
  rows = []
  for r in range(sample_keys.shape[0]):
    model = jax.tree.map(lambda x, r=r: x[r], state.params["model"])
    model0 = jax.tree.map(lambda x, r=r: x[r % len(setup.seeds)], setup.params0_S)
    rows.append(sampled_batches(setup, model, model0, jax.random.fold_in(sample_keys[r], phase),
                                estimator=estimator))
  return jax.tree.map(lambda *x: np.stack(x), *rows)


def _phase_chunks(setup: Setup, group: Group, mode: str, state, sample_keys, phase: int,
                  token_RNL, q, adv):
  """(chunk function body, per-chunk extra arguments) of one phase."""
  c = setup.config
  chunks, size = c.steps_per_phase // c.log_every, c.log_every
  if mode == "exact":
    ref = _seed_rows(setup, setup.logp0_SNL, len(group.methods))
    inputs = exact_inputs(setup, token_RNL, ref, q, adv)
    return (functools.partial(exact_chunk, group=group, setup=setup, steps=size),
            [inputs] * chunks)
  batches = _sampled_phase(setup, state, sample_keys, phase, group.methods[0].estimator)
  return (functools.partial(sampled_chunk, group=group, setup=setup),
          [jax.tree.map(lambda x, i=i: x[:, i * size:(i + 1) * size], batches)
           for i in range(chunks)])


def run_group(setup: Setup, names, mode: str) -> list[RunResult]:
  """Trains the methods of one program in one mode from every seed's pi_0 (module docstring)."""
  if mode not in MODES:
    raise ValueError(f"Unknown mode {mode!r}; valid: {', '.join(MODES)}.")
  group = make_group(setup, names)
  if group.methods[0].exact_only and mode != "exact":
    raise ValueError(f"{list(names)} need every response: exact mode only.")
  state, index, sample_keys = _initial_states(setup, group)
  m, s = len(group.methods), len(setup.seeds)
  token = _seed_rows(setup, setup.logp0_SNL, m)
  logp0 = seq_logp(token)
  logs, targets, losses, fn, compile_s = [logp0], [], [], None, 0.0
  start = time.perf_counter()
  for phase in range(setup.config.phases):
    q, adv, target = phase_targets(setup, group.methods[0].estimator, seq_logp(token), logp0)
    body, chunk_args = _phase_chunks(setup, group, mode, state, sample_keys, phase, token, q, adv)
    targets += [target] * (len(chunk_args) + (phase == 0))
    for args in chunk_args:
      if fn is None:
        t = time.perf_counter()
        fn = _jit(jax.vmap(body), state, index, args)
        compile_s = time.perf_counter() - t
      state, loss, token = fn(state, index, args)
      token = np.asarray(token)
      logs.append(seq_logp(token))
      losses.append(np.asarray(loss))
  run_s = time.perf_counter() - start - compile_s
  split = lambda x: np.stack(x, 1).reshape((m, s) + np.stack(x, 1).shape[1:])
  logs, targets, losses = split(logs), split(targets), split(losses)
  return [RunResult(g.name, mode, logs[i], targets[i], losses[i], compile_s, run_s)
          for i, g in enumerate(group.methods)]
