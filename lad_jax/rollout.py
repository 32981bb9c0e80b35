"""The COLLECT stage: sample G responses per prompt, score them, DAPO group filter and refill.

  collected = rollout.collect(sampler, params, stream, task, tokenizer, key,
                              settings=SampleSettings(group_size=4, max_new_tokens=64),
                              num_groups=8, pad_id=0)
  batch = rollout.to_train_batch(collected.rollout, mesh=mesh)   # the one host -> device copy

Everything here is host-side numpy except the sampler call; `Rollout` is the typed record the
later stages (behaviour scoring, advantages, update, metrics) read.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

from lad_jax import advantages as advantages_lib
from lad_jax import packing
from lad_jax import sampler as sampler_lib
from lad_jax import train as train_lib


class Rollout(NamedTuple):
  """N = prompts * G rows on the host, the G rows of one prompt adjacent.

  Attributes:
    prompt_tokens: [N, P] int32, left-padded with the pad id to the prompt bucket P.
    prompt_mask: [N, P] bool, True on prompt tokens.
    response_tokens: [N, R] int32, the pad id after the end.
    response_mask: [N, R] bool, generated tokens up to and including EOS / stop.
    logp: [N, R] float32 behaviour log-prob of each response token (0 off the mask).
    truncated: [N] bool, no EOS / stop within max_new_tokens.
    lengths: [N] int32 response tokens per row.
    rewards: [N] float32 verifier rewards.
    correct: [N] bool verifier verdicts (DAPO's filter metric, pass@k).
    texts: [N] object, the decoded responses.
    reasons: [N] object, the verifier's reason for each verdict ("correct", "wrong", ...).
    answers: [N] object, what the verifier extracted from each response (None: nothing).
    prompt_index: [N] int64, the prompt's index in its record set (the prompt id in the logs).
  """

  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  response_tokens: np.ndarray
  response_mask: np.ndarray
  logp: np.ndarray
  truncated: np.ndarray
  lengths: np.ndarray
  rewards: np.ndarray
  correct: np.ndarray
  texts: np.ndarray
  reasons: np.ndarray
  answers: np.ndarray
  prompt_index: np.ndarray


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How to sample: G responses per prompt, at most max_new_tokens, temperature / top-p / top-k."""

  group_size: int
  max_new_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0


class Collected(NamedTuple):
  """One step's rollouts and how they were gathered."""

  rollout: Rollout
  rounds: int  # generation rounds (1 without dynamic sampling)
  filled: int  # groups topped up with dropped (zero-variance) ones
  gen_s: float  # seconds sampling
  verify_s: float  # seconds in the verifier


to_host = sampler_lib.to_host


def _objects(values) -> np.ndarray:
  """[N] object array of Python values (strings, None), never split into more dimensions."""
  values = list(values)
  out = np.empty(len(values), dtype=object)
  out[:] = values
  return out


class _Verifying:
  """Decodes and verifies finished rows on a background thread while the sampler decodes the
  rest (a continuous-batching sampler hands rows over as they end; a lock-step one all at the
  end). One thread calls `task.score`, one batch of rows at a time, so the verifier sees the
  calls in order, as from the main thread."""

  def __init__(self, task, tokenizer, records: Sequence[Any], group_size: int):
    self._task, self._tokenizer = task, tokenizer
    self._records, self._g = records, group_size
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._batches: list[tuple[np.ndarray, Any]] = []

  def submit(self, rows) -> None:
    """Queues a `sampler.FinishedRows` for decoding and verification."""
    self._batches.append((rows.rows, self._pool.submit(self._score, rows)))

  def _score(self, rows) -> tuple[list[str], list[Any]]:
    texts = [self._tokenizer.decode(rows.response_tokens[i, :rows.lengths[i]].tolist(),
                                    skip_special_tokens=True) for i in range(len(rows.rows))]
    return texts, self._task.score(texts, [self._records[r // self._g] for r in rows.rows])

  def collect(self, num_rows: int) -> tuple[list[str], list[Any]]:
    """(texts, verdicts) of rows 0 .. num_rows-1, once every row has been scored."""
    texts, results = [None] * num_rows, [None] * num_rows
    try:
      for rows, future in self._batches:
        batch_texts, batch_results = future.result()
        for i, r in enumerate(rows):
          texts[r], results[r] = batch_texts[i], batch_results[i]
    finally:
      self._pool.shutdown(wait=True, cancel_futures=True)
    missing = [r for r in range(num_rows) if results[r] is None]
    if missing:
      raise RuntimeError(f"The sampler never handed over rows {missing[:5]} for verification.")
    return texts, results


def sample_and_score(sampler, params, task, tokenizer, records: Sequence[Any],
                     prompt_ids: Sequence[list[int]], key, *, settings: SampleSettings,
                     indices: Optional[Sequence[int]] = None) -> tuple[Rollout, float, float]:
  """G responses per prompt, decoded and verified: (rollout, seconds sampling, seconds from
  the end of sampling until every verdict is in).

  Rows are verified as the sampler hands them over (`_Verifying`), so with continuous
  batching most of the verification overlaps generation and the second number is only the
  part that does not.
  indices: each record's index in its set (default 0, 1, ...), logged as the prompt id.
  """
  g = settings.group_size
  verifying = _Verifying(task, tokenizer, records, g)
  t0 = time.perf_counter()
  out = sampler.sample(params, prompt_ids, key, group_size=g,
                       max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                       top_p=settings.top_p, top_k=settings.top_k, on_rows=verifying.submit)
  host = {name: to_host(getattr(out, name)) for name in
          ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask", "logp",
           "truncated", "lengths")}
  t1 = time.perf_counter()
  texts, results = verifying.collect(len(host["lengths"]))
  indices = range(len(records)) if indices is None else indices
  rollout = Rollout(**host, rewards=np.asarray([r.reward for r in results], np.float32),
                    correct=np.asarray([r.correct for r in results], bool),
                    texts=_objects(texts), reasons=_objects(r.reason for r in results),
                    answers=_objects(r.answer for r in results),
                    prompt_index=np.repeat(np.asarray(indices, np.int64), g))
  return rollout, t1 - t0, time.perf_counter() - t1


def _pad_rollout(r: Rollout, prompt_len: int, response_len: int, pad_id: int) -> Rollout:
  """Pads a rollout to a wider prompt (left) / response (right) so rounds concatenate."""
  dp = prompt_len - r.prompt_tokens.shape[1]
  dr = response_len - r.response_tokens.shape[1]
  if dp:
    r = r._replace(prompt_tokens=np.pad(r.prompt_tokens, ((0, 0), (dp, 0)),
                                        constant_values=pad_id),
                   prompt_mask=np.pad(r.prompt_mask, ((0, 0), (dp, 0))))
  if dr:
    right = lambda x, v=0: np.pad(x, ((0, 0), (0, dr)), constant_values=v)
    r = r._replace(response_tokens=right(r.response_tokens, pad_id),
                   response_mask=right(r.response_mask), logp=right(r.logp))
  return r


def concat_rollouts(rollouts: Sequence[Rollout], *, group_size: int, pad_id: int,
                    num_groups: Optional[int] = None) -> tuple[Rollout, int]:
  """`advantages.concat_groups` of rollouts whose prompt / response widths may differ."""
  p = max(r.prompt_tokens.shape[1] for r in rollouts)
  t = max(r.response_tokens.shape[1] for r in rollouts)
  padded = [_pad_rollout(r, p, t, pad_id) for r in rollouts]
  return advantages_lib.concat_groups(padded, group_size=group_size, num_groups=num_groups)


def gather_groups(generate: Callable[[int], Rollout], *, num_groups: int, group_size: int,
                  pad_id: int, dynamic_sampling: bool, max_gen_batches: int,
                  on_shortfall: str = "fill") -> tuple[Rollout, int, int]:
  """One step's rollout of exactly `num_groups` groups, with DAPO dynamic sampling.

  Without dynamic sampling this is `generate(0)`. With it (DAPO `filter_groups`, metric acc,
  shared/reference/baselines.md §3): groups whose `correct` flags all agree are dropped, and
  rounds `generate(1)`, `generate(2)`, ... refill until `num_groups` groups are kept or
  `max_gen_batches` rounds ran; the kept groups are truncated to `num_groups` in order. DAPO
  raises when still short (`on_shortfall="error"`); "fill" instead tops the batch up with dropped
  groups (advantage 0 under grpo / drgrpo / rloo), keeping the batch shape static.

  Returns:
    (rollout, generation rounds, groups filled with dropped ones).
  """
  if not dynamic_sampling:
    return generate(0), 1, 0
  kept, dropped, rounds, available = [], [], 0, 0
  while available < num_groups and rounds < max_gen_batches:
    r = generate(rounds)
    rounds += 1
    keep_P = advantages_lib.group_keep_mask(
        advantages_lib.to_groups(r.correct, group_size=group_size))
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


def collect(sampler, params, stream, task, tokenizer, key, *, settings: SampleSettings,
            num_groups: int, pad_id: int, dynamic_sampling: bool = False,
            max_gen_batches: int = 1, on_shortfall: str = "fill") -> Collected:
  """COLLECT: `num_groups` prompts from the stream, G samples each, verified, filtered.

  Round i of dynamic sampling samples with `fold_in(key, i)` and takes fresh prompts.
  """
  seconds = [0.0, 0.0]

  def generate(round_index: int) -> Rollout:
    indices, records, ids = stream.take_indexed(num_groups)
    r, gen_s, verify_s = sample_and_score(sampler, params, task, tokenizer, records, ids,
                                          jax.random.fold_in(key, round_index),
                                          settings=settings, indices=indices)
    seconds[0] += gen_s
    seconds[1] += verify_s
    return r

  rollout, rounds, filled = gather_groups(
      generate, num_groups=num_groups, group_size=settings.group_size, pad_id=pad_id,
      dynamic_sampling=dynamic_sampling, max_gen_batches=max_gen_batches,
      on_shortfall=on_shortfall)
  return Collected(rollout, rounds, filled, seconds[0], seconds[1])


def global_array(x: np.ndarray, sharding) -> jax.Array:
  """A global host array (the same on every host) as a device array in `sharding`."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_train_batch(r: Rollout, *, mesh, with_prompt_mask: bool = False,
                   pack: Optional[packing.PackSettings] = None) -> train_lib.TrainBatch:
  """The trainer's layout [prompt P | response R] on device, rows over the batch axes.

  old_logp starts as the sampler's behaviour logp (0 on the prompt); advantages start at 0 and
  are filled by the ADVANTAGE stage. prompt_mask is carried only for the log Z head. With `pack`
  the response columns are trimmed to the longest response (rounded up to its length bucket)
  and, where packing saves enough (`packing.Plan.worth_packing`), the batch carries the packed
  rows the model runs on (`packing`; TrainBatch.packed).
  """
  n, p = r.prompt_tokens.shape
  plan = None if pack is None else packing.plan(r.prompt_mask, r.response_mask, pack)
  width = r.response_tokens.shape[1] if plan is None else plan.response_width
  response_mask = r.response_mask[:, :width]
  host = dict(
      tokens=np.concatenate([r.prompt_tokens, r.response_tokens[:, :width]], axis=1),
      mask=np.concatenate([r.prompt_mask, response_mask], axis=1),
      loss_mask=np.concatenate([np.zeros((n, p), bool), response_mask], axis=1),
      old_logp=np.concatenate([np.zeros((n, p), np.float32), r.logp[:, :width]], axis=1
                              ).astype(np.float32),
      advantages=np.zeros((n,), np.float32))
  if with_prompt_mask:
    host["prompt_mask"] = np.concatenate([r.prompt_mask, np.zeros_like(response_mask)], axis=1)
  sh = train_lib.batch_sharding(mesh)
  packed = None
  if plan is not None and plan.worth_packing:
    packed = jax.tree.map(lambda x: global_array(x, sh), packing.pack_tokens(plan, host["tokens"]))
  return train_lib.TrainBatch(prompt_length=p, packed=packed,
                              **{k: global_array(v, sh) for k, v in host.items()})


def rollout_metrics(r: Rollout, adv_N: np.ndarray, *, group_size: int) -> dict[str, float]:
  """Statistics of a rollout under verl's names (`compute_data_metrics`), plus ours.

  verl's: critic/score (the verifier's reward), critic/rewards (the reward the advantages use:
  the same here, nothing is shaped), critic/advantages over response tokens, response_length and
  prompt_length with their clip ratios (response: no EOS within max_new_tokens; prompt: as long
  as the padded prompt width). Ours: critic/acc, the group statistics under batch/.
  """
  lengths = r.lengths.astype(np.float64)
  prompt_lengths = r.prompt_mask.sum(1).astype(np.float64)
  correct_PG = r.correct.reshape(-1, group_size)
  rewards_PG = r.rewards.reshape(-1, group_size)
  scored = lengths > 0  # advantages of response tokens, as verl's masked statistics
  adv_tokens = float((adv_N * lengths).sum() / max(lengths.sum(), 1.0))
  out = {}
  for name in ("score", "rewards"):
    out.update({f"critic/{name}/mean": float(r.rewards.mean()),
                f"critic/{name}/max": float(r.rewards.max()),
                f"critic/{name}/min": float(r.rewards.min())})
  out.update({
      "critic/score/std": float(r.rewards.std()),
      "critic/acc/mean": float(r.correct.mean()),
      "critic/advantages/mean": adv_tokens,
      "critic/advantages/max": float(adv_N[scored].max()) if scored.any() else 0.0,
      "critic/advantages/min": float(adv_N[scored].min()) if scored.any() else 0.0,
      "batch/zero_variance_frac": float(np.mean(rewards_PG.max(1) == rewards_PG.min(1))),
      "batch/solve_all_frac": float(np.mean(correct_PG.all(1))),
      "batch/solve_none_frac": float(np.mean(~correct_PG.any(1))),
      "response_length/mean": float(lengths.mean()),
      "response_length/max": float(lengths.max()),
      "response_length/min": float(lengths.min()),
      "response_length/clip_ratio": float(r.truncated.mean()),
      "prompt_length/mean": float(prompt_lengths.mean()),
      "prompt_length/max": float(prompt_lengths.max()),
      "prompt_length/min": float(prompt_lengths.min()),
      "prompt_length/clip_ratio": float(np.mean(prompt_lengths == r.prompt_mask.shape[1])),
  })
  return out
