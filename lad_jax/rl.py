"""The RL loop of experiments/math_rl.py (DESIGN §4): rollouts, rewards, updates, eval, resume.

One step (the paper's protocol, verl's names for the metrics):

  prompts (data stream, position tracked) -> sampler (G per prompt, behaviour logp)
  -> verifier (rewards) -> DAPO group filter + refill (optional) -> old_logp (recomputed or the
  sampler's) -> ref_logp (KL term / FlowRL / alpha-DPG) -> advantages (the objective's estimator)
  -> K mini-batch optimizer steps -> metrics -> every N steps: evaluation, checkpoint.

Randomness: every random draw of step s comes from `fold_in(run_key, s)`, and the data order is a
pure function of (seed, position), so a run killed after a checkpoint and restarted resumes to the
same result as an uninterrupted one (the train state, its key and the data position are saved).

Host / device split: token ids, rewards and the filter live on the host (numpy); the sampler,
log-prob passes and the train step are jitted over the mesh. Multi-host (`config.distributed`):
every process runs this same program on the same prompts (the data order is deterministic);
device results are gathered with `process_allgather`, and only process 0 writes metrics.

  from lad_jax import rl
  rl.main(config)      # config: see lad_jax/config_utils.py and configs/*.py
  print(rl.summary(config))   # per-step table of the key metrics, evaluations, output paths
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from lad_jax import advantages as advantages_lib
from lad_jax import checkpoint as checkpoint_lib
from lad_jax import config_utils
from lad_jax import losses
from lad_jax import metrics as metrics_lib
from lad_jax import sharding

ConfigError = config_utils.ConfigError
# Independent key streams derived from the run key: fold_in(fold_in(run_key, stream), step).
_STATE, _ROLLOUT, _EVAL, _MODEL = 1, 2, 3, 4
Batch = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------------
# Tokenizer for random test models
# ------------------------------------------------------------------------------------------------


class CharTokenizer:
  """Byte-level tokenizer for tiny random models: id = ord(c); 0 pad, 1 EOS, 2 unknown.

  Only what the loop needs from a transformers tokenizer: encode, decode, pad/eos ids.
  """

  pad_token_id = 0
  eos_token_id = 1
  unk_id = 2
  chat_template = None

  def __init__(self, vocab_size: int = 128):
    if vocab_size < 128:
      raise ValueError(f"CharTokenizer needs a vocabulary of >= 128 ids, got {vocab_size}.")
    self.vocab_size = vocab_size

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    del add_special_tokens
    return [ord(c) if 3 <= ord(c) < 128 else self.unk_id for c in text]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    del skip_special_tokens
    return "".join(chr(i) for i in ids if 3 <= int(i) < 128)


# ------------------------------------------------------------------------------------------------
# Tasks: prompts, golds and the verifier
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
  """Training records, held-out sets, and how to turn records into prompts and rewards.

  Attributes:
    train: random-access records (len / getitem).
    evals: name -> records of each held-out set.
    question: record -> problem text (goes into the prompt template).
    score: (responses, records) -> list of `verifiers.Result`, one per response.
    close: releases the verifier's workers.
  """

  train: Any
  evals: dict[str, Any]
  question: Callable[[Mapping[str, Any]], str]
  score: Callable[[Sequence[str], Sequence[Mapping[str, Any]]], list[Any]]
  close: Callable[[], None] = lambda: None


def _read_code_records(path: str) -> list[dict[str, Any]]:
  records = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      obj = json.loads(line)
      tests = obj.get("tests")
      if not isinstance(obj.get("problem"), str) or not isinstance(tests, list) or not tests:
        raise ConfigError(f"{path}:{line_no}: need \"problem\" (str) and \"tests\" (a non-empty "
                          "list of {\"input\", \"output\"}).")
      records.append({"problem": obj["problem"],
                      "tests": [(str(t["input"]), str(t["output"])) for t in tests]})
  return records


def build_task(config) -> Task:
  """The task of `config.data` with its verifier (worker processes start here)."""
  from lad_jax import verifiers  # pylint: disable=g-import-not-at-top
  from lad_jax.data import builders  # pylint: disable=g-import-not-at-top
  from lad_jax.verifiers import procedural  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  data, vcfg = config.data, config.verifier
  eval_names = config_utils.eval_sets(config)
  if data.task == "procedural":
    difficulty = dict(data.difficulty)
    train = builders.load_procedural(data.train, seed=config.seed, size=data.procedural_size,
                                     data_dir=data.data_dir, **difficulty)
    # A different seed gives held-out problems of the same distribution.
    evals = {name: builders.load_procedural(name, seed=config.seed + 1,
                                            size=data.procedural_eval_size,
                                            data_dir=data.data_dir, **difficulty)
             for name in eval_names}
    verifier = verifiers.ProceduralVerifier(
        workers=vcfg.workers, timeout_s=vcfg.timeout_s,
        extractors=procedural.extractors_for(vcfg.extract))
    return Task(train=train, evals=evals, question=lambda r: r["question"],
                score=lambda resp, recs: verifier.score(resp, [r["entry"] for r in recs]),
                close=verifier.close)
  if data.task == "math":
    load = lambda name, split: builders.load(name, split, data_dir=data.data_dir,
                                             source_dir=data.source_dir)
    train = load(data.train, data.train_split)
    evals = {name: load(name, data.eval_split) for name in eval_names}
    verifier = verifiers.MathVerifier(workers=vcfg.workers, timeout_s=vcfg.timeout_s,
                                      reward=vcfg.reward)
    return Task(train=train, evals=evals, question=lambda r: r["problem"],
                score=lambda resp, recs: verifier.score(resp, [r["answer"] for r in recs]),
                close=verifier.close)
  # code: stdio problems for training, HumanEval (function tests) for evaluation.
  train = _read_code_records(os.path.join(os.path.expanduser(data.source_dir),
                                          f"{data.train}.jsonl"))
  evals = {}
  for name in eval_names:
    if name != "humaneval":
      raise ConfigError(f"Unknown code eval set {name!r}; valid: ['humaneval'].")
    evals[name] = [dict(r, problem=r["prompt"], template="code_function") for r in builders.load(
        "humaneval", "test", data_dir=data.data_dir)]
  verifier = verifiers.CodeVerifier(workers=vcfg.workers, timeout_s=vcfg.timeout_s)

  def tests(r):
    if "tests" in r:
      return verifiers.StdioTests(cases=tuple(r["tests"]))
    return verifiers.FunctionTests(test=r["test"], entry_point=r["entry_point"],
                                   prompt=r["prompt"])

  return Task(train=train, evals=evals, question=lambda r: r["problem"],
              score=lambda resp, recs: verifier.score(resp, [tests(r) for r in recs]),
              close=verifier.close)


class PromptEncoder:
  """record -> prompt token ids (few-shot turns + template + chat template); None if too long.

  A record's own "template" key (HumanEval: code_function) overrides config.data.template.
  """

  def __init__(self, tokenizer: Any, task: Task, config):
    from lad_jax.data import prompts  # pylint: disable=g-import-not-at-top
    self._tokenizer = tokenizer
    self._question = task.question
    self._template = config.data.template
    self._system = config.data.system_prompt
    self._examples = prompts.check_examples(config.data.few_shot)
    self._chat = bool(config.data.chat_template) and bool(
        getattr(tokenizer, "chat_template", None))
    self._max = int(config.data.max_prompt_tokens)

  def __call__(self, record: Mapping[str, Any]) -> Optional[list[int]]:
    from lad_jax.data import prompts  # pylint: disable=g-import-not-at-top
    question = self._question(record)
    template = record.get("template", self._template)
    if self._chat:
      ids = prompts.apply_chat_template(self._tokenizer, question, template=template,
                                        system_prompt=self._system, tokenize=True,
                                        examples=self._examples)
    else:
      ids = self._tokenizer.encode(prompts.format_text_prompt(
          question, template=template, system_prompt=self._system, examples=self._examples))
    ids = [int(i) for i in ids]
    return ids if 0 < len(ids) <= self._max else None


class PromptStream:
  """Deterministic prompt order: epoch e visits records in permutation(seed, e).

  The state is one integer, `position` (records consumed so far), so saving it in a checkpoint's
  meta resumes the exact order. Prompts longer than the limit are skipped (and counted).
  """

  def __init__(self, records: Any, encode: PromptEncoder, *, seed: int, shuffle: bool,
               position: int = 0):
    self._records = records
    self._encode = encode
    self._seed = seed
    self._shuffle = shuffle
    self._perms: dict[int, np.ndarray] = {}
    self.position = int(position)
    self.skipped = 0
    if len(records) == 0:  # pylint: disable=g-explicit-length-test
      raise ConfigError("The training set is empty.")

  def _index(self, position: int) -> int:
    n = len(self._records)
    epoch, offset = divmod(position, n)
    if not self._shuffle:
      return offset
    if epoch not in self._perms:
      self._perms = {epoch: np.random.default_rng([self._seed, epoch]).permutation(n)}
    return int(self._perms[epoch][offset])

  def take(self, count: int) -> tuple[list[dict[str, Any]], list[list[int]]]:
    records, ids = [], []
    misses = 0
    while len(records) < count:
      record = self._records[self._index(self.position)]
      self.position += 1
      tokens = self._encode(record)
      if tokens is None:
        self.skipped += 1
        misses += 1
        if misses > 100 * count + len(self._records):
          raise ConfigError("Every prompt is longer than config.data.max_prompt_tokens="
                            f"{self._encode._max}; raise it.")  # pylint: disable=protected-access
        continue
      records.append(record)
      ids.append(tokens)
    return records, ids


# ------------------------------------------------------------------------------------------------
# Model, tokenizer, mesh
# ------------------------------------------------------------------------------------------------


def _model_overrides(config) -> dict[str, Any]:
  return dict(param_dtype=config.model.param_dtype, dtype=config.model.dtype,
              remat_policy=config.model.remat_policy)


def load_model(config, mesh) -> tuple[Any, Any]:
  """(ModelConfig, params placed into the mesh) from config.model; deterministic for a config."""
  from lad_jax import models  # pylint: disable=g-import-not-at-top
  src = config.model.source
  if src == "gguf":
    path = config.model.path or models.find_smollm2_gguf()
    return models.load_gguf(os.path.expanduser(path), mesh=mesh, **_model_overrides(config))
  if src == "hf":
    return models.load_hf(os.path.expanduser(config.model.path), mesh=mesh,
                          **_model_overrides(config))
  cfg = models.ModelConfig(**dict(config.model.random), **_model_overrides(config))
  key = jax.random.fold_in(jax.random.key(config.seed), _MODEL)
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


def _to_host(x: Any) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _to_device(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Global host arrays -> arrays sharded over the batch axes (same data on every host)."""
  out = {}
  for name, x in batch.items():
    spec = PartitionSpec(sharding.BATCH_AXES, *([None] * (x.ndim - 1)))
    s = NamedSharding(mesh, spec)
    out[name] = jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx])
  return out


# ------------------------------------------------------------------------------------------------
# Rollouts on the host
# ------------------------------------------------------------------------------------------------


def _pad_rollout(r: Batch, prompt_len: int, response_len: int, pad_id: int) -> Batch:
  """Pads a rollout to a wider prompt (left) / response (right) so rounds concatenate."""
  out = dict(r)
  dp = prompt_len - r["prompt_tokens"].shape[1]
  dr = response_len - r["response_tokens"].shape[1]
  if dp:
    out["prompt_tokens"] = np.pad(r["prompt_tokens"], ((0, 0), (dp, 0)),
                                  constant_values=pad_id)
    out["prompt_mask"] = np.pad(r["prompt_mask"], ((0, 0), (dp, 0)))
  if dr:
    for name in ("response_tokens", "response_mask", "logp"):
      value = pad_id if name == "response_tokens" else 0
      out[name] = np.pad(r[name], ((0, 0), (0, dr)), constant_values=value)
  return out


def concat_rollouts(rollouts: Sequence[Batch], *, group_size: int, pad_id: int,
                    num_groups: Optional[int] = None) -> tuple[Batch, int]:
  """`advantages.concat_groups` of rollouts whose prompt / response widths may differ."""
  p = max(r["prompt_tokens"].shape[1] for r in rollouts)
  t = max(r["response_tokens"].shape[1] for r in rollouts)
  padded = [_pad_rollout(r, p, t, pad_id) for r in rollouts]
  return advantages_lib.concat_groups(padded, group_size=group_size, num_groups=num_groups)


def gather_groups(generate: Callable[[int], Batch], *, num_groups: int, group_size: int,
                  pad_id: int, dynamic_sampling: bool, max_gen_batches: int,
                  on_shortfall: str = "fill") -> tuple[Batch, int, int]:
  """One step's rollout batch of exactly `num_groups` groups, with DAPO dynamic sampling.

  Without dynamic sampling this is `generate(0)`. With it (DAPO `filter_groups`, metric acc,
  shared/reference/baselines.md §3): groups whose `correct` flags all agree are dropped, and
  rounds `generate(1)`, `generate(2)`, ... refill until `num_groups` groups are kept or
  `max_gen_batches` rounds ran; the kept groups are truncated to `num_groups` in order. DAPO
  raises when still short (`on_shortfall="error"`); "fill" instead tops the batch up with dropped
  groups (advantage 0 under grpo / drgrpo / rloo), keeping the batch shape static.

  Args:
    generate: round index -> rollout batch (host arrays, leading axis num_groups * group_size,
      with "correct" [N] bool among them).

  Returns:
    (batch, generation rounds, groups filled with dropped ones).
  """
  if not dynamic_sampling:
    return generate(0), 1, 0
  kept, dropped, rounds, available = [], [], 0, 0
  while available < num_groups and rounds < max_gen_batches:
    r = generate(rounds)
    rounds += 1
    keep_P = advantages_lib.group_keep_mask(
        advantages_lib.to_groups(r["correct"], group_size=group_size))
    kept.append(advantages_lib.select_groups(r, keep_P, group_size=group_size))
    dropped.append(advantages_lib.select_groups(r, ~keep_P, group_size=group_size))
    available += int(keep_P.sum())
  batch, available = concat_rollouts(kept, group_size=group_size, pad_id=pad_id,
                                     num_groups=num_groups)
  if available >= num_groups:
    return batch, rounds, 0
  if on_shortfall == "error":
    raise RuntimeError(
        f"Dynamic sampling kept {available} of {num_groups} groups (accuracy varies in too few) "
        f"after {rounds} generation rounds; raise dynamic_sampling.max_gen_batches or set "
        "dynamic_sampling.on_shortfall='fill'.")
  batch, _ = concat_rollouts([batch] + dropped, group_size=group_size, pad_id=pad_id,
                             num_groups=num_groups)
  return batch, rounds, num_groups - available


def rollout(sampler, params, task: Task, tokenizer, records, prompt_ids, key, *, group_size: int,
            max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
            timings: Optional[dict[str, float]] = None) -> tuple[Batch, list[str]]:
  """Samples G responses per prompt and scores them; host arrays with N = len(records) * G rows.

  Adds the seconds spent sampling / scoring to timings["timing_s/gen"] / ["timing_s/verify"].
  """
  timings = {} if timings is None else timings
  t0 = time.perf_counter()
  out = sampler.sample(params, prompt_ids, key, group_size=group_size,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       top_k=top_k)
  r = {name: _to_host(getattr(out, name)) for name in
       ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask", "logp", "truncated",
        "lengths")}
  t1 = time.perf_counter()
  timings["timing_s/gen"] = timings.get("timing_s/gen", 0.0) + t1 - t0
  texts = [tokenizer.decode(r["response_tokens"][i, :r["lengths"][i]].tolist(),
                            skip_special_tokens=True) for i in range(len(r["lengths"]))]
  rows = [rec for rec in records for _ in range(group_size)]
  results = task.score(texts, rows)
  r["rewards"] = np.asarray([res.reward for res in results], np.float32)
  r["correct"] = np.asarray([res.correct for res in results], bool)
  r["text"] = np.asarray(texts, dtype=object)
  timings["timing_s/verify"] = timings.get("timing_s/verify", 0.0) + time.perf_counter() - t1
  return r, texts


def train_batch(r: Batch, old_logp_NL: Optional[np.ndarray] = None) -> Batch:
  """The trainer's batch layout: prompt + response along time, masks, behaviour logp."""
  n, p = r["prompt_tokens"].shape
  zeros = np.zeros((n, p), bool)
  batch = {
      "tokens": np.concatenate([r["prompt_tokens"], r["response_tokens"]], axis=1),
      "mask": np.concatenate([r["prompt_mask"], r["response_mask"]], axis=1),
      "loss_mask": np.concatenate([zeros, r["response_mask"]], axis=1),
      "prompt_mask": np.concatenate([r["prompt_mask"], np.zeros_like(r["response_mask"])],
                                    axis=1),
  }
  if old_logp_NL is None:
    old_logp_NL = np.concatenate([np.zeros((n, p), np.float32), r["logp"]], axis=1)
  batch["old_logp"] = old_logp_NL.astype(np.float32)
  return batch


@functools.lru_cache(maxsize=None)
def _jitted_estimator(estimator: str, hparams: tuple[tuple[str, Any], ...], group_size: int):
  """One compiled program per (estimator, hyperparameters): [N] inputs -> [N] advantages."""
  fn = advantages_lib.get(estimator, **dict(hparams))
  groups = lambda x: advantages_lib.to_groups(x, group_size=group_size)

  @jax.jit
  def compute(rewards_N, seq_old_N, seq_ref_N):
    if estimator == "alpha_dpg":
      adv_PG = fn(groups(seq_old_N), groups(seq_ref_N), groups(rewards_N))
    else:
      adv_PG = fn(groups(rewards_N))
    return advantages_lib.from_groups(adv_PG)

  return compute


def compute_advantages(estimator: str, hparams: Mapping[str, Any], rewards_N: np.ndarray, *,
                       group_size: int, batch: Optional[Batch] = None) -> np.ndarray:
  """[N] sequence advantages of the named estimator on [P, G] groups (host in, host out).

  alpha_dpg also reads batch["old_logp"] / batch["ref_logp"], summed over batch["loss_mask"].
  """
  rewards_N = np.asarray(rewards_N, np.float32)
  seq_old_N = seq_ref_N = np.zeros_like(rewards_N)
  if estimator == "alpha_dpg":
    mask = batch["loss_mask"]
    seq_old_N = np.where(mask, batch["old_logp"], 0.0).sum(axis=1).astype(np.float32)
    seq_ref_N = np.where(mask, batch["ref_logp"], 0.0).sum(axis=1).astype(np.float32)
  fn = _jitted_estimator(estimator, tuple(sorted(dict(hparams).items())), group_size)
  return np.asarray(fn(rewards_N, seq_old_N, seq_ref_N), np.float32)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def rollout_metrics(r: Batch, adv_N: np.ndarray, *, group_size: int) -> dict[str, float]:
  """verl-named statistics of a rollout batch."""
  lengths = r["lengths"].astype(np.float64)
  correct_PG = r["correct"].reshape(-1, group_size)
  rewards_PG = r["rewards"].reshape(-1, group_size)
  return {
      "critic/rewards/mean": float(r["rewards"].mean()),
      "critic/rewards/std": float(r["rewards"].std()),
      "critic/rewards/max": float(r["rewards"].max()),
      "critic/rewards/min": float(r["rewards"].min()),
      "critic/acc/mean": float(r["correct"].mean()),
      "critic/advantages/mean": float(adv_N.mean()),
      "critic/advantages/max": float(adv_N.max()),
      "critic/advantages/min": float(adv_N.min()),
      "batch/zero_variance_frac": float(np.mean(rewards_PG.max(1) == rewards_PG.min(1))),
      "batch/solve_all_frac": float(np.mean(correct_PG.all(1))),
      "batch/solve_none_frac": float(np.mean(~correct_PG.any(1))),
      "response_length/mean": float(lengths.mean()),
      "response_length/max": float(lengths.max()),
      "response_length/min": float(lengths.min()),
      "response_length/clip_ratio": float(r["truncated"].mean()),
      "prompt_length/mean": float(r["prompt_mask"].sum(1).mean()),
  }


def _actor_name(name: str) -> str:
  renames = {"loss": "actor/pg_loss", "grad_norm": "actor/grad_norm", "lr": "actor/lr",
             "entropy": "actor/entropy"}
  if name in renames:
    return renames[name]
  return name if "/" in name else f"actor/{name}"


def evaluate(sampler, params, task: Task, tokenizer, encoder: PromptEncoder, key, config
             ) -> dict[str, float]:
  """Avg@k, unbiased Pass@k, distinct-3/4 and distinct correct solutions on each held-out set."""
  ecfg = config.eval
  k = int(ecfg.samples)
  out = {}
  for i, (name, records) in enumerate(sorted(task.evals.items())):
    chosen, ids = [], []
    for j in range(len(records)):
      if len(chosen) == ecfg.num_prompts:
        break
      tokens = encoder(records[j])
      if tokens is not None:
        chosen.append(records[j])
        ids.append(tokens)
    if not chosen:
      continue
    r, texts = rollout(sampler, params, task, tokenizer, chosen, ids, jax.random.fold_in(key, i),
                       group_size=k,
                       max_new_tokens=ecfg.max_new_tokens or config.sampling.max_new_tokens,
                       temperature=ecfg.temperature, top_p=ecfg.top_p)
    correct = r["correct"].reshape(-1, k)
    responses = [r["response_tokens"][n, :r["lengths"][n]].tolist() for n in range(len(texts))]
    prefix = f"eval/{name}"
    out[f"{prefix}/avg@{k}"] = metrics_lib.avg_at_k(correct.tolist())
    for kk in sorted(set(ecfg.pass_k) | {k}):
      out[f"{prefix}/pass@{kk}"] = metrics_lib.pass_at_k_mean(correct.tolist(), kk)
    for n in (3, 4):
      out[f"{prefix}/distinct_{n}"] = metrics_lib.distinct_n(responses, n)
    out[f"{prefix}/distinct_correct"] = float(np.mean([
        metrics_lib.distinct_correct(texts[p * k:(p + 1) * k], correct[p].tolist())
        for p in range(len(chosen))]))
    out[f"{prefix}/response_length/mean"] = float(r["lengths"].mean())
  return out


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def _objective(config) -> tuple[losses.Objective, str, bool]:
  """(objective, advantage estimator, whether ref_logp is needed)."""
  objective = losses.get(config.loss.name, agg_mode=config.loss.agg_mode,
                         **config_utils.loss_kwargs(config))
  estimator = config.advantage.estimator or objective.spec.advantage_estimator
  # kl_coef is a KL-to-reference weight only next to kl_estimator (KL-Cov's kl_coef is not).
  kl_to_ref = ("kl_estimator" in objective.hparams
               and float(objective.hparams.get("kl_coef") or 0.0) > 0.0)
  needs_ref = "ref_logp" in objective.spec.needs or estimator == "alpha_dpg" or kl_to_ref
  return objective, estimator, needs_ref


def _write_samples(path: str, step: int, r: Batch, tokenizer: Any, *, count: int) -> None:
  """Appends the first `count` (prompt, response, reward) triples of a rollout, for reading."""
  with open(path, "a", encoding="utf-8") as f:
    for i in range(min(count, len(r["text"]))):
      prompt = tokenizer.decode(r["prompt_tokens"][i][r["prompt_mask"][i]].tolist(),
                                skip_special_tokens=False)
      f.write(json.dumps({"step": step, "prompt": prompt, "response": str(r["text"][i]),
                          "reward": float(r["rewards"][i]),
                          "correct": bool(r["correct"][i])}) + "\n")


def _set_compile_cache(directory: Optional[str]) -> dict[str, Any]:
  """Points jax's persistent compilation cache at `directory`; returns the previous settings."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {n: getattr(jax.config, n) for n in names}
  if directory:
    values = (os.path.expanduser(directory), 0.0, 0)
    for n, v in zip(names, values):
      jax.config.update(n, v)
  return previous


def _workdir(config) -> str:
  return os.path.expanduser(config.workdir or os.path.join("/tmp/lad_runs", config.name))


# (column title, metric, format) of the end-of-run table.
_SUMMARY_COLUMNS = (
    ("step", "step", "{:>4.0f}"), ("reward", "critic/rewards/mean", "{:>6.3f}"),
    ("acc", "critic/acc/mean", "{:>5.2f}"), ("len", "response_length/mean", "{:>5.1f}"),
    ("pg_loss", "actor/pg_loss", "{:>8.4f}"), ("entropy", "actor/entropy", "{:>7.3f}"),
    ("gen_s", "timing_s/gen", "{:>5.0f}"), ("update_s", "timing_s/update", "{:>8.0f}"),
    ("eval_s", "timing_s/eval", "{:>6.0f}"), ("step_s", "timing_s/step", "{:>6.0f}"),
)


def summary(config, *, wall_s: Optional[float] = None) -> str:
  """The end-of-run report: key metrics of every step, the last evaluation, where outputs are.

  Reads <workdir>/metrics.jsonl, so it also covers steps run before a resume.
  """
  wd = _workdir(config)
  path = os.path.join(wd, "metrics.jsonl")
  rows = metrics_lib.read_jsonl(path) if os.path.exists(path) else []
  steps = sum("critic/rewards/mean" in row for row in rows)
  head = f"{config.name}: {steps} step(s)"
  if wall_s is not None:
    head += f", {wall_s / 60:.1f} min wall (this process)"
  lines = [head]
  widths = [len(fmt.format(0.0)) for _, _, fmt in _SUMMARY_COLUMNS]
  if steps:
    lines.append("  ".join(t.rjust(w) for (t, _, _), w in zip(_SUMMARY_COLUMNS, widths)))
  for row in rows:
    if "critic/rewards/mean" not in row:  # the step-0 evaluation row
      continue
    cells = []
    for (_, name, fmt), w in zip(_SUMMARY_COLUMNS, widths):
      value = row.get(name)
      cells.append(fmt.format(value) if value is not None else "-".rjust(w))
    lines.append("  ".join(cells))
  for row in rows:
    scores = ", ".join(f"{k[len('eval/'):]}={v:.3f}" for k, v in sorted(row.items())
                       if k.startswith("eval/") and ("avg@" in k or "pass@" in k))
    if scores:
      when = "before training" if row["step"] == 0 else f"after step {row['step']:.0f}"
      lines.append(f"eval {when}: {scores}")
  lines.append(f"outputs in {wd}: metrics.jsonl (every metric, one line per step), "
               "samples.jsonl (decoded rollouts), TensorBoard events "
               f"(tensorboard --logdir {wd}), checkpoints/ (rerunning the command resumes)")
  return "\n".join(lines)


def prepare(config) -> None:
  """Validates the config and checks every file it needs; raises ConfigError before compiling."""
  config_utils.validate(config)
  config_utils.check_files(config)


def main(config) -> dict[str, float]:
  """Runs (or resumes) the RL loop of `config`; returns the last step's metrics.

  Raises:
    ConfigError: unknown keys, bad values, or a missing model / data file (before compiling).
  """
  return run(config)[1]


def run(config, *, task: Optional[Task] = None) -> tuple[Any, dict[str, float]]:
  """`main` that also returns the final train state; `task` lets tests share one verifier.

  Returns:
    (final TrainState, metrics of the last step run; empty if nothing was left to run).
  """
  prepare(config)
  maybe_initialize_distributed(config)
  previous_cache = _set_compile_cache(config.compile_cache_dir)
  try:
    return _run(config, task)
  finally:
    if config.compile_cache_dir:
      for name, value in previous_cache.items():
        jax.config.update(name, value)


def _run(config, task: Optional[Task]) -> tuple[Any, dict[str, float]]:
  """The body of `run`, after validation."""
  from lad_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from lad_jax.models import Decoder  # pylint: disable=g-import-not-at-top
  from lad_jax.sampler import Sampler  # pylint: disable=g-import-not-at-top

  objective, estimator, needs_ref = _objective(config)
  workdir = _workdir(config)
  mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp,
                            tensor=config.mesh.tensor)
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  g = int(config.sampling.group_size)
  rows = config.train.prompts_per_step * g
  rows_per_update = rows // config.train.mini_batches
  if rows_per_update % batch_devices:
    raise ConfigError(f"A mini-batch of {rows_per_update} rows does not split over the "
                      f"{batch_devices} data/fsdp devices; change train.prompts_per_step, "
                      "sampling.group_size, train.mini_batches or config.mesh.")

  model_cfg, init_params = load_model(config, mesh)
  tokenizer = load_tokenizer(config, model_cfg)
  eos_ids, pad_id = special_ids(tokenizer, model_cfg)
  model = Decoder(model_cfg)
  own_task = task is None
  task = build_task(config) if own_task else task
  encoder = PromptEncoder(tokenizer, task, config)

  ocfg = config.optim
  tx = train_lib.make_optimizer(lr=ocfg.lr, warmup_steps=ocfg.warmup_steps,
                                weight_decay=ocfg.weight_decay, grad_clip=ocfg.grad_clip,
                                b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, schedule=ocfg.schedule,
                                total_steps=max(1, config.train.num_steps
                                                * config.train.mini_batches * config.train.epochs))
  run_key = jax.random.key(config.seed)
  ref_params = jax.tree.map(jnp.copy, init_params) if needs_ref else None
  with_logz = "log_z" in objective.spec.needs
  state, state_shardings = train_lib.create_train_state(
      model, tx, jax.random.fold_in(run_key, _STATE), mesh=mesh, params=init_params,
      with_logz_head=with_logz)
  del init_params  # the state owns them now (and donates them to the train step)
  chunk = config.train.chunk_size
  train_step = train_lib.make_train_step(
      model, objective, tx, mesh=mesh, state_shardings=state_shardings,
      micro_batches=config.train.micro_batches, logp_temperature=config.sampling.temperature,
      chunk_size=chunk, norm_length=config.sampling.max_new_tokens)
  logp_fn = train_lib.make_logp_fn(model, mesh=mesh, temperature=config.sampling.temperature,
                                   chunk_size=chunk)
  sampler = Sampler(model, eos_ids=eos_ids, pad_id=pad_id, mesh=mesh,
                    prompt_buckets=tuple(config.sampling.prompt_buckets),
                    stop_strings=tuple(config.sampling.stop_strings),
                    tokenizer=tokenizer if config.sampling.stop_strings else None,
                    rows_per_call=config.sampling.rows_per_call)

  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     max_to_keep=config.checkpoint.max_to_keep)
  start, position = 0, 0
  if config.checkpoint.resume and ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    start, position = int(meta["step"]), int(meta["data_position"])
  stream = PromptStream(task.train, encoder, seed=config.seed, shuffle=config.data.shuffle,
                        position=position)
  # Steps after the checkpoint are replayed, so their rows from before a kill are dropped; a
  # fresh run (which may begin with the step-0 evaluation) starts the files over.
  first_step = start + 1 if start else 0
  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.log.tensorboard,
                                    first_step=first_step)
  if jax.process_index() == 0:
    metrics_lib.truncate_jsonl(os.path.join(workdir, "samples.jsonl"), first_step)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))

  scfg, dcfg = config.sampling, config.dynamic_sampling
  num_groups = config.train.prompts_per_step
  bar = None
  if config.log.progress_bar and jax.process_index() == 0:
    import tqdm  # pylint: disable=g-import-not-at-top
    resumed = f", resuming after step {start}" if start else ""
    print(f"{config.name}: {config.train.num_steps} steps of {num_groups} prompts x {g} samples"
          f"{resumed}; outputs -> {workdir}", flush=True)
    if start and start >= config.train.num_steps:
      print(f"{config.name}: the checkpoint of step {start} completes this run; nothing left to "
            f"do (raise --config.train.num_steps to continue, or delete {workdir} to start "
            "over).", flush=True)
    bar = tqdm.tqdm(total=config.train.num_steps, initial=start, desc=config.name,
                    dynamic_ncols=True)
  last: dict[str, float] = {}
  # Every evaluation samples with the same key (common random numbers): the same prompts and
  # the same random draws, so differences between steps come from the policy, not the noise.
  eval_key = jax.random.fold_in(run_key, _EVAL)
  try:
    if config.eval.before_train and start == 0 and task.evals:
      t0 = time.perf_counter()
      last = evaluate(sampler, state.params["model"], task, tokenizer, encoder, eval_key, config)
      last["timing_s/eval"] = time.perf_counter() - t0
      writer.write(0, last)
    for step in range(start, config.train.num_steps):
      t_step = time.perf_counter()
      step_key = jax.random.fold_in(jax.random.fold_in(run_key, _ROLLOUT), step)
      timings = {"timing_s/gen": 0.0, "timing_s/verify": 0.0}
      params_model = state.params["model"]

      def generate(round_index: int) -> Batch:
        records, ids = stream.take(num_groups)
        r, _ = rollout(sampler, params_model, task, tokenizer, records, ids,
                       jax.random.fold_in(step_key, round_index), group_size=g,
                       max_new_tokens=scfg.max_new_tokens, temperature=scfg.temperature,
                       top_p=scfg.top_p, top_k=scfg.top_k, timings=timings)
        return r

      r, rounds, filled = gather_groups(
          generate, num_groups=num_groups, group_size=g, pad_id=pad_id,
          dynamic_sampling=dcfg.enabled, max_gen_batches=dcfg.max_gen_batches,
          on_shortfall=dcfg.on_shortfall)

      # old / ref log-probs, advantages.
      t0 = time.perf_counter()
      batch = train_batch(r)
      # Only the response is scored: the prompt columns skip the LM head.
      prompt_len = r["prompt_tokens"].shape[1]
      device_batch = _to_device({k: batch[k] for k in ("tokens", "mask")}, mesh)
      if config.train.recompute_old_logp:
        batch["old_logp"] = _to_host(logp_fn(params_model, device_batch,
                                             prompt_length=prompt_len))
      timings["timing_s/old_log_prob"] = time.perf_counter() - t0
      if needs_ref:
        t0 = time.perf_counter()
        batch["ref_logp"] = _to_host(logp_fn(ref_params, device_batch, prompt_length=prompt_len))
        timings["timing_s/ref"] = time.perf_counter() - t0
      adv_N = compute_advantages(estimator, config_utils.estimator_kwargs(config, estimator),
                                 r["rewards"],
                                 group_size=g, batch=batch)
      batch["advantages"] = adv_N
      if not with_logz:
        batch.pop("prompt_mask")

      # K mini-batch optimizer steps over the rollout (groups stay whole).
      t0 = time.perf_counter()
      sums: dict[str, float] = {}
      updates = 0
      k = config.train.mini_batches
      for _ in range(config.train.epochs):
        for i in range(k):
          sl = slice(i * rows_per_update, (i + 1) * rows_per_update)
          mb = _to_device({name: x[sl] for name, x in batch.items()}, mesh)
          state, m = train_step(state, mb, prompt_length=prompt_len)
          for name, value in jax.device_get(m).items():
            sums[name] = sums.get(name, 0.0) + float(np.asarray(value))
          updates += 1
      timings["timing_s/update"] = time.perf_counter() - t0

      step_metrics = rollout_metrics(r, adv_N, group_size=g)
      step_metrics.update({_actor_name(n): v / updates for n, v in sums.items()})
      step_metrics["batch/num_gen_batches"] = float(rounds)
      step_metrics["batch/filled_zero_variance_groups"] = float(filled)
      step_metrics["batch/skipped_long_prompts"] = float(stream.skipped)
      timings["timing_s/step"] = time.perf_counter() - t_step
      step_metrics.update(timings)
      num_tokens = float(batch["mask"].sum())
      step_metrics["perf/total_num_tokens"] = num_tokens
      step_metrics["perf/throughput"] = num_tokens / max(timings["timing_s/step"], 1e-9)
      step_metrics["data/position"] = float(stream.position)
      done = step + 1

      if config.eval.every and (done % config.eval.every == 0 or
                                done == config.train.num_steps) and task.evals:
        t0 = time.perf_counter()
        step_metrics.update(evaluate(sampler, state.params["model"], task, tokenizer, encoder,
                                     eval_key, config))
        step_metrics["timing_s/eval"] = time.perf_counter() - t0
      writer.write(done, step_metrics)
      if jax.process_index() == 0:
        _write_samples(os.path.join(workdir, "samples.jsonl"), done, r, tokenizer,
                       count=config.log.samples)
      last = step_metrics
      if (config.checkpoint.every and done % config.checkpoint.every == 0) or (
          done == config.train.num_steps):
        ckpt.save(done, state, {"step": done, "data_position": stream.position,
                                "name": config.name})
      if bar is not None:
        bar.update(1)
        bar.set_postfix({
            "reward": f"{step_metrics['critic/rewards/mean']:.3f}",
            "acc": f"{step_metrics['critic/acc/mean']:.2f}",
            "loss": f"{step_metrics.get('actor/pg_loss', float('nan')):.4f}",
            "ent": f"{step_metrics.get('actor/entropy', float('nan')):.3f}",
            "len": f"{step_metrics['response_length/mean']:.0f}",
            "s/step": f"{step_metrics['timing_s/step']:.0f}",
        })
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.close()
    if own_task:
      task.close()
  return state, last
