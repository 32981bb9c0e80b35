"""The controlled 50-arm bandit of LAD Sec. 4.1 (paper Figures 1 and 2; DESIGN §3).

The policy is a softmax over a 50-vector of logits (initialised to zeros, i.e. uniform), trained
with Adam. Each step builds a batch of arms, scores it with a registered objective
(`lad_jax.objectives.get`) as a batch of B one-token "sequences" (T = 1, mask of ones), and takes
one Adam step. The behaviour policy pi_old starts uniform and is refreshed to the current policy
`refreshes` times, evenly spaced (the paper: twice in 4000 steps, i.e. three equal phases).

Two modes:
  sampled  the paper's: B = 32 arms drawn from pi_old at temperature T (softmax(old_logits / T));
           importance ratios use the untempered pi_old (as the authors' harness does);
           A = reward - batch mean. The loss is therefore weighted by the *tempered* pi_old, which
           equals pi_old only while pi_old is uniform (the first phase).
  exact    all K = 50 arms, each weighted by q = softmax(old_logits / exact_temperature) (pi_old
           itself by default); A = reward - E_q[reward]. The weights are applied by scaling the
           per-token loss of arm k by K * q(k) before the token-mean, so the reduction is
           sum_k q(k) loss_k (not via the mask: `losses.aggregate` treats the mask as 0/1).
           Nothing is random, so this isolates the objective from sampling noise.

Objectives (all through the registry; never re-implemented here):
  lad_<div>               practical LAD (Eq. 8), registry "lad" with divergence=<div>, eta.
  lad_theoretical_<div>   theoretical LAD (Eq. 7) over the full action axis: logp, old_logp and
                          advantages are [1, K]; it reads the whole reward vector and never samples,
                          so one run serves both modes.
  grpo                    registry "grpo" with its defaults (PPO clip eps 0.2/0.2, dual clip 3, no
                          KL to a reference) plus eta * KL(pi || pi_old), so its *unclipped* optimum
                          is pi_old e^(A/eta) like LAD's (the paper's weight 1 at eta = 1). From
                          samples of pi_old the KL is estimated without bias by E_old[r * l]
                          (importance-weighted k1, l = log pi - log pi_old, r = e^l); with the
                          exact weights the same expression is the exact KL. The clip is on: once
                          r leaves [0.8, 1.2] in the direction A pushes, that arm's PPO gradient
                          is 0 and only the KL acts, so each phase moves pi by at most ~20% per arm.
  grpo_noclip             diagnostic: the same with the PPO clip and dual clip off.
  flowrl                  registry "flowrl" with beta = 1 / eta, pi_ref = pi_old and the exact
                          log Z = log sum_k pi_old(k) e^(beta A_k) (A with the batch's baseline),
                          the value for which delta = 0 is the normalised pi_old e^(beta A).
  flowrl_authors          the same with the authors' toy log Z = log sum_k e^(beta reward_k) (no
                          pi_ref weight, no baseline): a constant offset c in delta. With weights
                          exactly pi_theta (sg(r) times pi_old) the offset does not move the
                          stationary point; with tempered samples it biases it and adds noise.
  pg                      registry "pg", plain -A log pi, for reference.
  pg_kl                   "pg" plus eta * KL(pi || pi_old): the authors' toy-harness GRPO line
                          (-A log pi, no ratio, no clip) with the paper's KL term.

Metrics (paper Fig. 1): the target P_A = softmax(A / eta) over all arms (shift-invariant, so A =
reward) against the policy-induced P_pi = softmax(log pi_theta - log pi_old) with the current
pi_old, and pi_theta itself against pi* = normalised pi_old e^(A/eta), the optimum of the last
phase.
Modes (of 3, centres 10, 25, 40): "modes P_pi" counts the modes where P_pi puts at least half of
P_A's mass on the window |arm - c| <= 5 (the paper's Fig. 1 comparison); "modes pi" counts those
where pi_theta keeps at least half the window mass of softmax(phases * A / eta), the policy that
uniform pi_0 compounds to when every phase reaches its optimum (what theoretical LAD reaches), and
at least 1% (that ideal itself collapses when pi_old is refreshed every step), so a pi_theta that
collapsed onto one arm scores 1 even when P_pi = pi_theta / pi_old does not. Distance
to theory = mean over logged steps of TV(pi_theta, pi_theta of theoretical LAD-JS) for the same
seed.

Everything is pure JAX: `lax.scan` over steps, `vmap` over seeds and eta, one compile per method and
mode.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lad_jax import config_utils
from lad_jax import divergences
from lad_jax import losses
from lad_jax import objectives
from lad_jax.errors import ConfigError

Array = jax.Array

NUM_ARMS = 50
# The paper gives no numbers; these come from the authors' related bandit harness (SEAL,
# toy_example.py; see shared/reference/baselines.md §1.4).
MODE_CENTRES = (10.0, 25.0, 40.0)
MODE_SIGMA = 5.0
MODE_AMPLITUDES = (4.0, 5.0, 4.0)
MODE_HALF_WIDTH = 5
MODES = ("sampled", "exact")
DIVERGENCES = ("kl", "rkl", "jeffreys", "tv", "hellinger", "js", "alpha:0.5")
DEFAULT_METHODS = (
    "pg",
    "pg_kl",
    "grpo",
    "grpo_noclip",
    "flowrl",
    "flowrl_authors",
    *(f"lad_{d}" for d in DIVERGENCES),
    "lad_theoretical_js",
    "lad_theoretical_hellinger",
)
THEORY_REFERENCE = "lad_theoretical_js"


def reward_vector(
    num_arms: int = NUM_ARMS,
    *,
    centres: Sequence[float] = MODE_CENTRES,
    sigma: float = MODE_SIGMA,
    amplitudes: Sequence[float] = MODE_AMPLITUDES,
) -> Array:
  """Reward of each arm: a mixture of Gaussian bumps over the arm index. Returns [K] float32."""
  if len(centres) != len(amplitudes):
    raise ValueError(f"{len(centres)} centres but {len(amplitudes)} amplitudes; give one per mode.")
  arms_K = jnp.arange(num_arms, dtype=jnp.float32)
  bumps_MK = jnp.asarray(amplitudes, jnp.float32)[:, None] * jnp.exp(
      -0.5 * jnp.square((arms_K[None, :] - jnp.asarray(centres, jnp.float32)[:, None]) / sigma))
  return bumps_MK.sum(axis=0)


@dataclasses.dataclass(frozen=True)
class BanditConfig:
  """One bandit run (paper Sec. 4.1 defaults).

  Attributes:
    num_arms: K.
    batch_size: arms drawn per step in sampled mode (B).
    steps: Adam steps.
    lr: Adam learning rate.
    temperature: sampled mode draws arms from softmax(old_logits / temperature).
    exact_temperature: exact mode weights arm k by softmax(old_logits / exact_temperature)(k); 1.0
      weights by pi_old itself, the sampled mode's temperature reproduces its expected loss.
    refreshes: how many times pi_old is set to the current policy, evenly spaced (0: fixed uniform
      pi_old; steps - 1: every step, as in the authors' SEAL harness).
    log_every: the trajectory keeps the logits every `log_every` steps.
    log_ratio_clip: clamp of log pi - log pi_old before exp in the KL(pi || pi_old) penalty
      (`losses.LOG_RATIO_CLIP`, the objectives' own default).
  """

  num_arms: int = NUM_ARMS
  batch_size: int = 32
  steps: int = 4000
  lr: float = 5e-3
  temperature: float = 1.5
  exact_temperature: float = 1.0
  refreshes: int = 2
  log_every: int = 10
  log_ratio_clip: float = losses.LOG_RATIO_CLIP

  def __post_init__(self):
    if self.steps < 1 or self.log_every < 1 or self.steps % self.log_every:
      raise ValueError(
          f"steps ({self.steps}) must be a positive multiple of log_every ({self.log_every}); "
          "change one of them.")
    if not 0 <= self.refreshes < self.steps:
      raise ValueError(f"refreshes must be in [0, steps); got {self.refreshes}.")
    if self.temperature <= 0 or self.exact_temperature <= 0:
      raise ValueError("temperature and exact_temperature must be positive.")
    if self.num_arms < 2 or self.batch_size < 1:
      raise ValueError("num_arms must be >= 2 and batch_size >= 1.")


# ------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
  """A bandit method: a registered objective plus how the bandit feeds it.

  Attributes:
    name: bandit name (e.g. "lad_js").
    objective: registry name.
    hparams: eta -> hyperparameters for `objectives.get` (eta may be a tracer when eta is swept).
    kl_over_eta: weight of KL(pi || pi_old) in units of eta (GRPO: 1).
    log_z: "exact" (log sum_k pi_old e^(beta A)) or "authors" (log sum_k e^(beta reward)).
    full_action: the objective takes the whole action axis (theoretical LAD).
  """

  name: str
  objective: str
  hparams: Callable[[Any], dict[str, Any]]
  kl_over_eta: float = 0.0
  log_z: Optional[str] = None
  full_action: bool = False

  def get(self, eta) -> objectives.Objective:
    return objectives.get(self.objective, **self.hparams(eta))


def method(name: str) -> Method:
  """Parses a bandit method name; see the module docstring for the list."""
  if name == "pg":
    return Method(name, "pg", lambda eta: {})
  if name == "pg_kl":  # the authors' toy "GRPO" line (-A log pi) plus the paper's KL to pi_old
    return Method(name, "pg", lambda eta: {}, kl_over_eta=1.0)
  if name == "grpo":
    return Method(name, "grpo", lambda eta: {}, kl_over_eta=1.0)
  if name == "grpo_noclip":  # diagnostic: no PPO clip, no dual clip; optimum pi_old e^(A/eta)
    return Method(name, "grpo", lambda eta: {"eps_low": 1.0, "eps_high": float("inf"),
                                             "clip_ratio_c": None}, kl_over_eta=1.0)
  if name in ("flowrl", "flowrl_authors"):
    log_z = "exact" if name == "flowrl" else "authors"
    return Method(name, "flowrl", lambda eta: {"beta": 1.0 / eta}, log_z=log_z)
  for prefix, full in (("lad_theoretical_", True), ("lad_", False)):
    if name.startswith(prefix) and len(name) > len(prefix):
      divergence = name[len(prefix):]
      divergences.get(divergence)  # a clear ValueError (listing the valid ones) for a bad name
      objective = "lad_theoretical" if full else "lad"
      return Method(name, objective, lambda eta, d=divergence: {"divergence": d, "eta": eta},
                    full_action=full)
  raise ValueError(
      f"Unknown bandit method {name!r}; valid: pg, pg_kl, grpo, grpo_noclip, flowrl, "
      "flowrl_authors, lad_<div>, "
      f"lad_theoretical_<div> with <div> one of {', '.join(DIVERGENCES)} (or any alpha:<a>).")


def weighting(m: Method, mode: str, config: BanditConfig) -> str:
  """Which distribution weights the loss of a run (reported in the results table)."""
  if m.full_action:
    return "full distribution (no sampling; one run serves both modes)"
  if mode == "sampled":
    t = config.temperature
    base = "pi_old" if t == 1.0 else f"pi_old^(1/{t:g}) (T={t:g})"
    return f"{base} samples, B={config.batch_size}"
  t = config.exact_temperature
  return "pi_old, exact" if t == 1.0 else f"pi_old^(1/{t:g}) (T={t:g}), exact"


# ------------------------------------------------------------------------------------------------
# One step
# ------------------------------------------------------------------------------------------------


class Batch(NamedTuple):
  """The arms one step scores, as N one-token sequences.

  Attributes:
    arms_N: int32 arm indices.
    scale_N: per-arm loss scale (1 for samples; K * q(k) in exact mode).
    advantages_N: A of each arm (reward - baseline).
    baseline: the scalar baseline (batch mean, or E_q[reward] in exact mode).
  """

  arms_N: Array
  scale_N: Array
  advantages_N: Array
  baseline: Array


def sample_batch(uniform_N: Array, old_logits_K: Array, rewards_K: Array, *,
                 temperature: float) -> Batch:
  """Arms drawn from softmax(old_logits / temperature) by inverse CDF of uniforms [N] in [0, 1).

  Inverse-CDF sampling lets a run draw all its uniforms up front with one PRNG call, which is
  much cheaper to compile and run on CPU than a `categorical` inside every scanned step.
  A = reward - batch mean (the paper's baseline).
  """
  cdf_K = jnp.cumsum(jax.nn.softmax(old_logits_K / temperature))
  arms_N = jnp.searchsorted(cdf_K, uniform_N * cdf_K[-1], side="right", method="compare_all")
  arms_N = jnp.minimum(arms_N, old_logits_K.shape[0] - 1)
  rewards_N = rewards_K[arms_N]
  baseline = rewards_N.mean()
  return Batch(arms_N, jnp.ones_like(rewards_N), rewards_N - baseline, baseline)


def exact_batch(old_logits_K: Array, rewards_K: Array, *, temperature: float) -> Batch:
  """All K arms, scaled by K * q(k), q = softmax(old_logits / temperature); A = r - E_q[r]."""
  num_arms = rewards_K.shape[0]
  q_K = jax.nn.softmax(old_logits_K / temperature)
  baseline = q_K @ rewards_K
  return Batch(jnp.arange(num_arms), num_arms * q_K, rewards_K - baseline, baseline)


def bandit_loss(logits_K: Array, old_logits_K: Array, batch: Batch, *, m: Method, eta,
                rewards_K: Array, key: Array, log_ratio_clip: float = losses.LOG_RATIO_CLIP):
  """Scalar loss of one step (differentiable in logits_K) and the objective's metrics.

  Args:
    logits_K: [K] policy logits.
    old_logits_K: [K] pi_old logits (treated as constants).
    batch: the arms to score; ignored by full-action objectives, which read all of rewards_K.
    m: the method.
    eta: LAD temperature (float or tracer).
    rewards_K: [K] reward of every arm.
    key: PRNG key passed to the objective.
    log_ratio_clip: clamp of l before exp in the KL penalty.
  """
  objective = m.get(eta)
  old_logits_K = jax.lax.stop_gradient(old_logits_K)
  logp_K = jax.nn.log_softmax(logits_K)
  old_logp_K = jax.nn.log_softmax(old_logits_K)
  if m.full_action:
    # Eq. 7 needs the whole action distribution; P_A is shift-invariant, so the baseline is moot.
    adv_1K = (rewards_K - batch.baseline)[None, :]
    inputs = losses.LossInputs(logp=logp_K[None, :], old_logp=old_logp_K[None, :],
                               advantages=adv_1K, mask=jnp.ones_like(adv_1K))
    per_token, metrics = objective(inputs, key=key)
    return losses.aggregate(per_token, inputs.mask, objective.agg_mode), metrics

  logp_N1 = logp_K[batch.arms_N][:, None]
  old_logp_N1 = old_logp_K[batch.arms_N][:, None]
  mask_N1 = jnp.ones_like(logp_N1)
  log_z_N = None
  if m.log_z is not None:
    beta = 1.0 / eta
    if m.log_z == "exact":
      log_z = jax.nn.logsumexp(old_logp_K + beta * (rewards_K - batch.baseline))
    else:
      log_z = jax.nn.logsumexp(beta * rewards_K)
    log_z_N = jnp.broadcast_to(log_z, batch.arms_N.shape)
  inputs = losses.LossInputs(logp=logp_N1, old_logp=old_logp_N1, advantages=batch.advantages_N,
                             mask=mask_N1, ref_logp=old_logp_N1, log_z=log_z_N)
  per_token_N1, metrics = objective(inputs, key=key)
  loss = losses.aggregate(per_token_N1 * batch.scale_N[:, None], mask_N1, objective.agg_mode)
  if m.kl_over_eta:
    # E_old[r l] = KL(pi || pi_old) (importance-weighted k1): unbiased from samples of pi_old and
    # exact with the exact weights; with tempered samples (T != 1) it is E_q[r l] instead.
    l_N = losses.log_ratio(logp_N1[:, 0], old_logp_N1[:, 0], clip=log_ratio_clip)
    kl = jnp.mean(batch.scale_N * jnp.exp(l_N) * l_N)
    loss = loss + m.kl_over_eta * eta * kl
    metrics = {**metrics, "kl_old": kl}
  return loss, metrics


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


class Trajectory(NamedTuple):
  """Logged every `log_every` steps (L = steps / log_every points, after the step).

  Attributes:
    logits: [L, K] policy logits.
    old_logits: [L, K] pi_old logits in force at that step.
    loss: [L] mean loss over the chunk of steps.
  """

  logits: Array
  old_logits: Array
  loss: Array


def refresh_schedule(steps: int, refreshes: int) -> np.ndarray:
  """bool [steps]: True where pi_old is set to the current policy before the step (even phases)."""
  flags = np.zeros(steps, bool)
  phases = refreshes + 1
  flags[[round(i * steps / phases) for i in range(1, phases)]] = True
  return flags


class StepNoise(NamedTuple):
  """All the randomness of one run, drawn up front from its key.

  Attributes:
    uniforms: [steps, B] sampling uniforms (inverse CDF; unused in exact mode).
    keys: [steps] PRNG keys handed to the objective (unused by most objectives).
  """

  uniforms: Array
  keys: Array


def draw_noise(key: Array, *, steps: int, batch_size: int) -> StepNoise:
  """Splits a run's key into its sampling uniforms and per-step objective keys."""
  sample_key, loss_key = jax.random.split(key)
  return StepNoise(jax.random.uniform(sample_key, (steps, batch_size)),
                   jax.random.split(loss_key, steps))


@functools.partial(jax.jit, static_argnames=("steps", "batch_size"))
def draw_noise_batch(keys_R: Array, *, steps: int, batch_size: int) -> StepNoise:
  """`draw_noise` over runs [R]. Jitted on its own so that every method reuses one compile (the
  threefry kernels cost seconds of XLA compile time on CPU)."""
  return jax.vmap(functools.partial(draw_noise, steps=steps, batch_size=batch_size))(keys_R)


def make_step(m: Method, mode: str, config: BanditConfig, optimizer: optax.GradientTransformation):
  """One bandit step `(state, (uniform_N, key, refresh), eta) -> (state, loss)`.

  The state is (logits_K, old_logits_K, opt_state); uniform_N are the step's B sampling uniforms
  (unused in exact mode), key goes to the objective, refresh sets pi_old to the policy first.
  """
  if mode not in MODES:
    raise ValueError(f"Unknown bandit mode {mode!r}; valid modes: {', '.join(MODES)}.")
  rewards_K = reward_vector(config.num_arms)

  def step(state, xs, eta):
    logits_K, old_logits_K, opt_state = state
    uniform_N, loss_key, refresh = xs
    old_logits_K = jnp.where(refresh, logits_K, old_logits_K)
    if mode == "sampled":
      batch = sample_batch(uniform_N, old_logits_K, rewards_K, temperature=config.temperature)
    else:
      batch = exact_batch(old_logits_K, rewards_K, temperature=config.exact_temperature)
    loss_fn = lambda lg: bandit_loss(lg, old_logits_K, batch, m=m, eta=eta, rewards_K=rewards_K,
                                     key=loss_key, log_ratio_clip=config.log_ratio_clip)
    (loss, _), grad_K = jax.value_and_grad(loss_fn, has_aux=True)(logits_K)
    updates, opt_state = optimizer.update(grad_K, opt_state, logits_K)
    return (optax.apply_updates(logits_K, updates), old_logits_K, opt_state), loss

  return step


def train(noise: StepNoise, eta, *, m: Method, mode: str, config: BanditConfig) -> Trajectory:
  """One run from uniform pi_theta = pi_old (paper Sec. 4.1); pure and jittable, vmap over runs.

  Args:
    noise: the run's randomness (`draw_noise`), uniforms [steps, B] and keys [steps].
    eta: LAD temperature (float or tracer).
    m, mode, config: what to run.

  Returns:
    The logged trajectory, [L, K] logits (L = steps / log_every).
  """
  chex.assert_shape(noise.uniforms, (config.steps, config.batch_size))
  optimizer = optax.adam(config.lr)
  step = make_step(m, mode, config, optimizer)
  logits_K = jnp.zeros((config.num_arms,), jnp.float32)
  state = (logits_K, logits_K, optimizer.init(logits_K))
  num_logs = config.steps // config.log_every
  refresh = jnp.asarray(refresh_schedule(config.steps, config.refreshes))
  xs = jax.tree.map(lambda x: x.reshape(num_logs, config.log_every, *x.shape[1:]),
                    (noise.uniforms, noise.keys, refresh))

  def chunk(state, xs):
    state, loss = jax.lax.scan(lambda s, x: step(s, x, eta), state, xs)
    return state, Trajectory(state[0], state[1], loss.mean())

  _, trajectory = jax.lax.scan(chunk, state, xs)
  return trajectory


@dataclasses.dataclass
class RunResult:
  """Trajectories of one method in one mode, [E, S, L, K] (numpy), plus timings in seconds."""

  method: str
  mode: str
  etas: tuple[float, ...]
  trajectory: Trajectory
  compile_s: float
  run_s: float


def run_keys(seeds: Sequence[int]) -> Array:
  """One PRNG key per seed, [S]."""
  return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def _lower(name: str, mode: str, config: BanditConfig, seeds: Sequence[int],
           etas: Sequence[float]):
  """Traces one method's vmapped run over all (eta, seed) pairs; returns (lowered, args)."""
  m = method(name)
  num_e = len(etas)
  noise_S = draw_noise_batch(run_keys(seeds), steps=config.steps, batch_size=config.batch_size)
  # The same seed gets the same noise for every eta and method (common random numbers).
  noise_R = jax.tree.map(lambda x: jnp.tile(x, (num_e,) + (1,) * (x.ndim - 1)), noise_S)
  etas_R = jnp.repeat(jnp.asarray(etas, jnp.float32), len(seeds))
  run = jax.jit(jax.vmap(functools.partial(train, m=m, mode=mode, config=config)))
  return run.lower(noise_R, etas_R), (noise_R, etas_R)


# The bandit's programs are tiny, so XLA:CPU's compile time dominates the sweep; the legacy
# (non-fusion-emitter) CPU codegen at LLVM -O1 compiles them ~40% faster for the same results.
_CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}


def _compile(lowered) -> tuple[Any, float]:
  """Compiles, with `_CPU_COMPILER_OPTIONS` on CPU; returns (compiled, seconds)."""
  start = time.perf_counter()
  compiled = None
  if jax.default_backend() == "cpu":
    try:
      compiled = lowered.compile(compiler_options=_CPU_COMPILER_OPTIONS)
    except Exception as e:  # pylint: disable=broad-except
      if "compile option" not in str(e):  # an XLA without these options: plain compile
        raise
  if compiled is None:
    compiled = lowered.compile()
  return compiled, time.perf_counter() - start


def run_methods(jobs: Sequence[tuple[str, str]], config: BanditConfig, *, seeds: Sequence[int],
                etas: Sequence[float], workers: Optional[int] = None) -> Iterator[RunResult]:
  """Runs (method, mode) jobs, one compile each, vmapped over all (eta, seed) pairs.

  Tracing is Python (sequential); XLA compiles release the GIL, so they run on `workers` threads
  (default: one per CPU core) while the next job is traced. Each job runs as soon as it is
  compiled; results are yielded in job order. compile_s is each job's own compile time (with
  `workers` compiles overlapping).
  """
  workers = workers or os.cpu_count() or 1
  num_e, num_s = len(etas), len(seeds)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = []
    for name, mode in jobs:
      lowered, args = _lower(name, mode, config, seeds, etas)
      pending.append((name, mode, pool.submit(_compile, lowered), args))
    for name, mode, future, args in pending:
      compiled, compile_s = future.result()
      start = time.perf_counter()
      trajectory = jax.block_until_ready(compiled(*args))
      run_s = time.perf_counter() - start
      trajectory = jax.tree.map(lambda x: np.asarray(x).reshape(num_e, num_s, *x.shape[1:]),
                                trajectory)
      yield RunResult(name, mode, tuple(float(e) for e in etas), trajectory, compile_s, run_s)


def run_method(name: str, mode: str, config: BanditConfig, *, seeds: Sequence[int],
               etas: Sequence[float]) -> RunResult:
  """One method in one mode, all (eta, seed) pairs in one compiled, vmapped call; [E, S, ...]."""
  return next(run_methods([(name, mode)], config, seeds=seeds, etas=etas, workers=1))


# ------------------------------------------------------------------------------------------------
# Metrics (numpy, over any leading axes; the last axis is arms)
# ------------------------------------------------------------------------------------------------


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def target_distribution(rewards_K, eta: float) -> np.ndarray:
  """P_A = softmax(A / eta) (Eq. 5); shift-invariant, so A = reward."""
  return np.exp(_log_softmax(np.asarray(rewards_K) / eta))


def policy_induced(logits, old_logits) -> np.ndarray:
  """P_pi = softmax(log pi_theta - log pi_old) (Eq. 4)."""
  return np.exp(_log_softmax(_log_softmax(logits) - _log_softmax(old_logits)))


def optimal_policy(old_logits, rewards_K, eta: float) -> np.ndarray:
  """pi* = normalised pi_old e^(A / eta): the optimum of LAD (and unclipped GRPO + KL)."""
  return np.exp(_log_softmax(_log_softmax(old_logits) + np.asarray(rewards_K) / eta))


def compounded_optimum(rewards_K, eta: float, phases: int) -> np.ndarray:
  """softmax(phases * A / eta): where uniform pi_0 ends if every phase reaches its pi*."""
  return target_distribution(np.asarray(rewards_K) * phases, eta)


def total_variation(p, q) -> np.ndarray:
  return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(axis=-1)


def kl_divergence(p, q) -> np.ndarray:
  """KL(p || q) over the last axis; q is floored at 1e-300, so a collapsed q gives a finite KL."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  return np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))),
                  0.0).sum(axis=-1)


def entropy(p) -> np.ndarray:
  p = np.asarray(p, np.float64)
  return -np.where(p > 0, p * np.log(np.maximum(p, 1e-300)), 0.0).sum(axis=-1)


def mode_masses(p, *, centres: Sequence[float] = MODE_CENTRES,
                half_width: int = MODE_HALF_WIDTH) -> np.ndarray:
  """Mass of p on each window |arm - centre| <= half_width; [..., M]."""
  arms = np.arange(np.shape(p)[-1])
  windows_MK = np.abs(arms[None, :] - np.asarray(centres)[:, None]) <= half_width
  return np.asarray(p) @ windows_MK.T.astype(np.float64)


def modes_recovered(p, reference, *, floor: float = 0.0) -> np.ndarray:
  """Number of modes where p holds at least max(half the reference's mass, floor) on the window."""
  return (mode_masses(p) >= np.maximum(0.5 * mode_masses(reference), floor)).sum(axis=-1)


def summarize(result: RunResult, rewards_K, *, phases: int, theory: Optional[RunResult] = None
              ) -> dict[float, dict[str, np.ndarray]]:
  """Final-step metrics per eta, each an array over seeds [S]; see the module docstring."""
  out = {}
  for e, eta in enumerate(result.etas):
    logits_SLK = result.trajectory.logits[e]
    old_SLK = result.trajectory.old_logits[e]
    pi_SK = np.exp(_log_softmax(logits_SLK[:, -1]))
    p_pi_SK = policy_induced(logits_SLK[:, -1], old_SLK[:, -1])
    p_a_K = target_distribution(rewards_K, eta)
    metrics = {
        "tv_ppi_pa": total_variation(p_pi_SK, p_a_K),
        "kl_pa_ppi": kl_divergence(p_a_K, p_pi_SK),
        "tv_pi_opt": total_variation(pi_SK, optimal_policy(old_SLK[:, -1], rewards_K, eta)),
        "entropy": entropy(pi_SK),
        "max_prob": pi_SK.max(axis=-1),
        "modes": modes_recovered(p_pi_SK, p_a_K).astype(np.float64),
        "modes_pi": modes_recovered(pi_SK, compounded_optimum(rewards_K, eta, phases),
                                    floor=0.01).astype(np.float64),
        "final_loss": np.asarray(result.trajectory.loss[e][:, -1], np.float64),
    }
    if theory is not None:
      theory_pi_SLK = np.exp(_log_softmax(theory.trajectory.logits[theory.etas.index(eta)]))
      metrics["dist_theory"] = total_variation(np.exp(_log_softmax(logits_SLK)),
                                               theory_pi_SLK).mean(axis=-1)
    out[eta] = metrics
  return out


# ------------------------------------------------------------------------------------------------
# Loss landscape (Figure 2)
# ------------------------------------------------------------------------------------------------


def exact_loss_fn(name: str, config: BanditConfig, eta: float) -> Callable[[Array, Array], Array]:
  """`(logits_K, old_logits_K) -> scalar` exact-mode loss of a method (jittable, vmappable)."""
  m = method(name)
  rewards_K = reward_vector(config.num_arms)

  def fn(logits_K, old_logits_K):
    batch = exact_batch(old_logits_K, rewards_K, temperature=config.exact_temperature)
    loss, _ = bandit_loss(logits_K, old_logits_K, batch, m=m, eta=eta, rewards_K=rewards_K,
                          key=jax.random.key(0), log_ratio_clip=config.log_ratio_clip)
    return loss

  return fn


def pca_plane(trajectories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Centre of and top-2 principal directions [2, K] of centred logits from several runs [L, K]."""
  points = np.concatenate([t - t.mean(axis=-1, keepdims=True) for t in trajectories], axis=0)
  centre = points.mean(axis=0)
  centred = points - centre
  # Eigenvectors of the K x K covariance (cheaper than an SVD of the [points, K] matrix).
  _, vectors = np.linalg.eigh(centred.T @ centred)
  return centre, vectors[:, ::-1][:, :2].T


# ------------------------------------------------------------------------------------------------
# Plots and tables
# ------------------------------------------------------------------------------------------------


def plot_figure1(results: Mapping[str, RunResult], rewards_K, eta: float, path: str, *,
                 title: str) -> None:
  """Per method: P_A vs P_pi (top) and pi_theta vs pi* and pi_old (bottom), seed 0."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = list(results)
  cols = min(len(names), 5)
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(2 * rows, cols, figsize=(3.4 * cols, 4.0 * rows), squeeze=False)
  arms = np.arange(len(rewards_K))
  edges = np.arange(len(rewards_K) + 1) - 0.5
  p_a = target_distribution(rewards_K, eta)
  for i, name in enumerate(names):
    r = results[name]
    e = r.etas.index(eta)
    logits, old = r.trajectory.logits[e, 0, -1], r.trajectory.old_logits[e, 0, -1]
    top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
    # One `stairs` patch per histogram: ~50x cheaper to draw than 50 bars.
    top.stairs(policy_induced(logits, old), edges, fill=True, color="tab:blue", alpha=0.6,
               label="P_pi ∝ pi_theta / pi_old")
    top.plot(arms, p_a, color="tab:orange", lw=1.5, label="P_A ∝ e^(A/eta)")
    top.set_title(name, fontsize=9)
    bottom.stairs(np.exp(_log_softmax(logits)), edges, fill=True, color="tab:blue", alpha=0.6,
                  label="pi_theta")
    bottom.plot(arms, optimal_policy(old, rewards_K, eta), color="tab:orange", lw=1.2,
                label="pi* ∝ pi_old e^(A/eta)")
    bottom.plot(arms, np.exp(_log_softmax(old)), color="gray", lw=1, ls="--", label="pi_old")
    for ax in (top, bottom):
      ax.tick_params(labelsize=7)
    if i == 0:
      top.legend(fontsize=6)
      bottom.legend(fontsize=6)
  for j in range(len(names), rows * cols):
    axes[2 * (j // cols), j % cols].axis("off")
    axes[2 * (j // cols) + 1, j % cols].axis("off")
  fig.suptitle(title, fontsize=10)
  fig.subplots_adjust(left=0.04, right=0.99, bottom=0.03, top=0.95, wspace=0.25, hspace=0.35)
  fig.savefig(path, dpi=100)
  plt.close(fig)


@functools.lru_cache(maxsize=None)
def _landscape_fn(name: str, config: BanditConfig, eta: float):
  """Jitted exact loss over a batch of logits [G, K] for one pi_old (compiled once per method)."""
  return jax.jit(jax.vmap(exact_loss_fn(name, config, eta), in_axes=(0, None)))


_FIGURE2_COLORS = {"practical": "tab:blue", "theoretical": "tab:green", "grpo": "tab:red"}


def _figure2_phase_bounds(config: BanditConfig, max_phase_panels: int) -> list[int]:
  """Log indices bounding each loss panel: one panel per phase of pi_old, or one panel for all
  of them (over the landscape of the first pi_old) when there are over max_phase_panels."""
  num_logs = config.steps // config.log_every
  if config.refreshes + 1 <= max_phase_panels:
    starts = np.flatnonzero(refresh_schedule(config.steps, config.refreshes)) // config.log_every
    return [0, *starts.tolist(), num_logs]
  return [0, num_logs]


def _figure2_plane(runs: Mapping[str, RunResult], eta: float, grid: int):
  """Seed-0 trajectories of `runs` (uniform start prepended, [L + 1, K] each) on the top-2 PCA
  plane of their centred logits, and a grid x grid mesh over their extent (15% margin).

  Returns (projections {label: [L + 1, 2]}, mesh coordinates aa, bb [grid, grid], the mesh's
  points as logits [grid * grid, K]).
  """
  trajs = {}
  for label, r in runs.items():
    lg = r.trajectory.logits[r.etas.index(eta), 0]
    trajs[label] = np.concatenate([np.zeros_like(lg[:1]), lg], axis=0)  # prepend the start
  centre, pcs = pca_plane(list(trajs.values()))
  proj = {k: (v - v.mean(-1, keepdims=True) - centre) @ pcs.T for k, v in trajs.items()}
  allp = np.concatenate(list(proj.values()))
  lo, hi = allp.min(0), allp.max(0)
  pad = 0.15 * (hi - lo) + 1e-3
  a = np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid)
  b = np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid)
  aa, bb = np.meshgrid(a, b)
  plane_GK = centre + aa.reshape(-1, 1) * pcs[0] + bb.reshape(-1, 1) * pcs[1]
  return proj, aa, bb, plane_GK


def _plot_figure2_phase(fig, ax, proj: Mapping[str, np.ndarray], z_GG: np.ndarray, aa, bb,
                        start: int, end: int, first: bool) -> None:
  """One loss panel: the loss z [grid, grid] as filled contours under the trajectories' log
  points start .. end (their end marked; the uniform start too on the first panel)."""
  cs = ax.contourf(aa, bb, z_GG, levels=20, cmap="viridis")
  fig.colorbar(cs, ax=ax, fraction=0.046).ax.tick_params(labelsize=6)
  for label, xy in proj.items():
    seg = xy[start:end + 1]
    # Theoretical is drawn wide and pale underneath, so practical LAD stays visible on top.
    wide = label == "theoretical"
    ax.plot(seg[:, 0], seg[:, 1], color=_FIGURE2_COLORS[label], lw=4 if wide else 1.3,
            alpha=0.5 if wide else 1.0, label=label, zorder=2 if wide else 3)
    ax.plot(seg[-1, 0], seg[-1, 1], "o", color=_FIGURE2_COLORS[label], ms=3, zorder=4)
    if first:
      ax.plot(seg[0, 0], seg[0, 1], "kx", ms=5, zorder=4)  # uniform start


def _plot_figure2_tv(ax, results: Mapping[str, RunResult], div: str, eta: float,
                     config: BanditConfig) -> None:
  """TV of each method's seed-0 policy from THEORY_REFERENCE's over the steps (nothing drawn
  without the reference)."""
  steps = (np.arange(config.steps // config.log_every) + 1) * config.log_every
  theory = results.get(THEORY_REFERENCE)
  if theory is None:
    return
  t_pi = np.exp(_log_softmax(theory.trajectory.logits[theory.etas.index(eta), 0]))
  for name in (f"lad_{div}", f"lad_theoretical_{div}", "grpo", "flowrl", "pg"):
    if name in results and name != THEORY_REFERENCE:
      r = results[name]
      pi = np.exp(_log_softmax(r.trajectory.logits[r.etas.index(eta), 0]))
      ax.plot(steps, total_variation(pi, t_pi), lw=1, label=name)
  ax.set_title(f"TV(pi_theta, pi_theta of {THEORY_REFERENCE})", fontsize=8)
  ax.set_xlabel("step", fontsize=8)
  ax.legend(fontsize=6)
  ax.tick_params(labelsize=7)


def plot_figure2(results: Mapping[str, RunResult], config: BanditConfig, eta: float, path: str, *,
                 title: str, divergences: Sequence[str] = ("js", "hellinger"),
                 grid: int = 33, max_phase_panels: int = 4) -> None:
  """Per divergence (row): trajectories of practical LAD, theoretical LAD and GRPO (seed 0) on
  the top-2 PCA plane of their centred logits, over the practical LAD exact loss of each phase
  (pi_old = practical LAD's pi_old of that phase); last column: TV from theoretical LAD-JS."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  divergences = [d for d in divergences
                 if f"lad_{d}" in results and f"lad_theoretical_{d}" in results]
  phases = config.refreshes + 1
  bounds = _figure2_phase_bounds(config, max_phase_panels)
  panels = len(bounds) - 1
  fig, axes = plt.subplots(max(len(divergences), 1), panels + 1,
                           figsize=(3.6 * (panels + 1), 3.4 * max(len(divergences), 1)),
                           squeeze=False)
  for row, div in enumerate(divergences):
    runs = {"practical": results[f"lad_{div}"], "theoretical": results[f"lad_theoretical_{div}"]}
    if "grpo" in results:
      runs["grpo"] = results["grpo"]
    proj, aa, bb, plane_GK = _figure2_plane(runs, eta, grid)
    loss_fn = _landscape_fn(f"lad_{div}", config, eta)
    old_traj = runs["practical"].trajectory.old_logits[runs["practical"].etas.index(eta), 0]
    for p in range(panels):
      ax = axes[row, p]
      old_K = old_traj[bounds[p]]
      z = np.asarray(loss_fn(jnp.asarray(plane_GK, jnp.float32), jnp.asarray(old_K)))
      _plot_figure2_phase(fig, ax, proj, z.reshape(grid, grid), aa, bb, bounds[p],
                          bounds[p + 1], p == 0)
      ax.set_title(f"LAD-{div} loss, phase {p + 1}" if panels == phases else
                   f"LAD-{div} loss at the first pi_old ({phases} phases)", fontsize=9)
      ax.tick_params(labelsize=7)
      if p == 0:
        ax.legend(fontsize=6)
    _plot_figure2_tv(axes[row, panels], results, div, eta, config)
  fig.suptitle(title, fontsize=10)
  fig.subplots_adjust(left=0.04, right=0.98, bottom=0.08, top=0.88, wspace=0.3, hspace=0.35)
  fig.savefig(path, dpi=100)
  plt.close(fig)


_COLUMNS = (
    ("tv_ppi_pa", "TV(P_pi,P_A)"),
    ("kl_pa_ppi", "KL(P_A‖P_pi)"),
    ("tv_pi_opt", "TV(pi,pi*)"),
    ("entropy", "H(pi)"),
    ("max_prob", "max pi"),
    ("modes", "modes P_pi"),
    ("modes_pi", "modes pi"),
    ("dist_theory", "TV to theory"),
)


def results_markdown(records: Sequence[Mapping[str, Any]]) -> str:
  """Markdown table(s), one per (mode, eta), of mean ± std over seeds."""
  lines = []
  keys = sorted({(r["mode"], r["eta"]) for r in records}, key=lambda k: (MODES.index(k[0]), k[1]))
  for mode, eta in keys:
    rows = [r for r in records if r["mode"] == mode and r["eta"] == eta]
    num_seeds = len(rows[0]["metrics"]["entropy"]["values"])
    lines += [f"### mode={mode}, eta={eta:g} ({num_seeds} seeds)",
              "",
              "| method | loss weighting | " + " | ".join(c for _, c in _COLUMNS) + " |",
              "|---|---|" + "---|" * len(_COLUMNS)]
    for r in rows:
      cells = []
      for key, _ in _COLUMNS:
        stat = r["metrics"].get(key)
        cells.append("–" if stat is None else f"{stat['mean']:.3f} ± {stat['std']:.3f}")
      lines.append(f"| {r['method']} | {r['weighting']} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


# The valid values of experiments/bandit.py's flags (checked by `validate`).
FLAG_RANGES = {
    "steps": config_utils.COUNT, "seeds": config_utils.COUNT,
    "batch_size": config_utils.COUNT, "log_every": config_utils.COUNT,
    "refreshes": config_utils.NONNEG_INT, "lr": config_utils.POSITIVE,
    "temperature": config_utils.POSITIVE, "exact_temperature": config_utils.POSITIVE,
    "eta": config_utils.Range(0, lo_open=True, why="LAD's temperature: A/eta"),
}


def validate(*, eta: Sequence[Any], methods: Sequence[str] = DEFAULT_METHODS,
             **settings: Any) -> list[float]:
  """Checks the bandit's settings by flag name before anything runs; returns the etas as floats.

  A NaN or non-positive eta would otherwise run to the end and report `nan ± nan`. `settings` are
  the numeric flags of FLAG_RANGES (steps, seeds, lr, ...) by name.

  Raises:
    ConfigError: one line naming the flag, the bad value and the valid range.
  """
  etas = []
  for value in eta:
    try:
      etas.append(float(value))
    except (TypeError, ValueError):
      raise ConfigError(f"--eta={value!r} is not a number; pass e.g. --eta=0.5,1,2.") from None
  if not etas:
    raise ConfigError("--eta is empty; pass one or more values, e.g. --eta=0.5,1,2.")
  for value in etas:
    FLAG_RANGES["eta"].check("--eta", value)
  for name, value in settings.items():
    FLAG_RANGES[name].check(f"--{name}", value)
  steps, log_every = settings.get("steps", 1), settings.get("log_every", 1)
  if steps % log_every:
    raise ConfigError(f"--steps={steps} is not a multiple of --log_every={log_every}; change one.")
  if settings.get("refreshes", 0) >= steps:
    raise ConfigError(f"--refreshes={settings['refreshes']} must be below --steps={steps} "
                      "(steps - 1: refresh pi_old every step).")
  for name in methods:
    try:
      method(name)
    except ValueError as e:
      raise ConfigError(f"--methods: {e}") from None
  return etas


def main(config: BanditConfig = BanditConfig(), *, methods: Sequence[str] = DEFAULT_METHODS,
         modes: Sequence[str] = MODES, etas: Sequence[float] = (1.0,), num_seeds: int = 5,
         out_dir: str = "runs/bandit", command: str = "", figures: bool = True
         ) -> list[dict[str, Any]]:
  """Runs the sweep, prints a progress line per method, writes results.json/.md and figures."""
  for mode in modes:
    if mode not in MODES:
      raise ValueError(f"Unknown bandit mode {mode!r}; valid modes: {', '.join(MODES)}.")
  for name in methods:
    method(name)  # fail fast on a bad name
  if num_seeds < 1:
    raise ValueError(f"num_seeds must be >= 1, got {num_seeds}.")
  os.makedirs(out_dir, exist_ok=True)
  rewards_K = np.asarray(reward_vector(config.num_arms))
  seeds = list(range(num_seeds))
  # The theory reference comes first so its distances are ready; full-action (theoretical)
  # methods never sample, so they run once and serve every mode.
  order = sorted(methods, key=lambda n: n != THEORY_REFERENCE)
  jobs, full_action = [], set()
  for mode in modes:
    for name in order:
      if method(name).full_action:
        if name in full_action:
          continue
        full_action.add(name)
      jobs.append((name, mode))
  records, sweep_start, cpu_start = [], time.perf_counter(), time.process_time()
  results: dict[str, dict[str, RunResult]] = {mode: {} for mode in modes}
  for r in run_methods(jobs, config, seeds=seeds, etas=etas):
    print(f"[{r.mode}] {r.method:<26} {len(seeds)} seeds x {len(etas)} eta x {config.steps} steps:"
          f" compile {r.compile_s:5.2f} s, run {r.run_s:5.2f} s", flush=True)
    targets = modes if r.method in full_action else (r.mode,)
    for mode in targets:
      results[mode][r.method] = r
  for mode in modes:
    mode_results = {name: results[mode][name] for name in methods}
    theory = mode_results.get(THEORY_REFERENCE)
    for name, r in mode_results.items():
      for eta, metrics in summarize(r, rewards_K, phases=config.refreshes + 1,
                                    theory=theory).items():
        records.append({
            "mode": mode, "method": name, "eta": eta,
            "weighting": weighting(method(name), mode, config),
            "compile_s": r.compile_s, "run_s": r.run_s,
            "metrics": {k: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                            "values": [float(x) for x in v]} for k, v in metrics.items()},
            "final_pi_seed0": np.exp(_log_softmax(r.trajectory.logits[r.etas.index(eta), 0, -1])
                                     ).round(6).tolist(),
        })
    if figures:
      suffix = "" if mode == "sampled" else f"_{mode}"
      eta = etas[0]
      desc = f"mode={mode}, eta={eta:g}, {config.steps} steps, refreshes={config.refreshes}, seed 0"
      plot_figure1(mode_results, rewards_K, eta, os.path.join(out_dir, f"fig1{suffix}.png"),
                   title=f"Bandit Fig. 1 ({desc})")
      plot_figure2(mode_results, config, eta, os.path.join(out_dir, f"fig2{suffix}.png"),
                   title=f"Bandit Fig. 2 ({desc})")
  total_s, cpu_s = time.perf_counter() - sweep_start, time.process_time() - cpu_start
  print(f"sweep finished in {total_s:.1f} s ({cpu_s:.1f} s CPU, all threads)", flush=True)
  summary = {"command": command, "config": dataclasses.asdict(config), "modes": list(modes),
             "etas": list(etas), "seeds": seeds, "total_s": total_s, "cpu_s": cpu_s,
             "rewards": rewards_K.round(6).tolist(), "runs": records}
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(f"# Bandit results\n\nCommand: `{command}`  \n"
            f"Wall time: {total_s:.1f} s ({cpu_s:.1f} s CPU, all threads)\n\n")
    f.write(results_markdown(records))
  return records
