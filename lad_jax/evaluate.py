"""Held-out evaluation: Avg@k, unbiased Pass@k, distinct-n and distinct correct solutions.

  scores = evaluate.evaluate(sampler, params, task, tokenizer, encode, key, num_prompts=32,
                             settings=SampleSettings(group_size=8, max_new_tokens=1024),
                             pass_k=(1, 4, 8))
  # {"val-core/<set>/acc/mean@8": ..., "val-core/<set>/acc/pass@4": ...,
  #  "val-aux/<set>/distinct_3": ...}

Every call with the same key samples with the same random draws (common random numbers), so
the difference between two checkpoints' scores comes from the policy, not the noise.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from lad_jax import metrics as metrics_lib
from lad_jax.rollout import Rollout, SampleSettings, sample_and_score


def first_prompts(records: Sequence[Any], encode: Callable[[Mapping[str, Any]], Optional[list]],
                  count: int) -> tuple[list[Any], list[list[int]]]:
  """The first `count` records whose prompt fits, in order, with their prompt ids."""
  chosen, ids = [], []
  for j in range(len(records)):  # random access: records may be an array_record data source
    if len(chosen) == count:
      break
    record = records[j]
    tokens = encode(record)
    if tokens is not None:
      chosen.append(record)
      ids.append(tokens)
  return chosen, ids


def set_metrics(r: Rollout, *, k: int, pass_k: Sequence[int], name: str) -> dict[str, float]:
  """The metrics of held-out set `name` from a rollout of k samples per prompt, named as verl's
  validation metrics: val-core/<set>/acc/mean@k (Avg@k) and acc/pass@j (unbiased Pass@j);
  val-aux/<set>/... for distinct-n, distinct correct responses and the response length."""
  correct = r.correct.reshape(-1, k)
  texts = list(r.texts)
  responses = [r.response_tokens[n, :r.lengths[n]].tolist() for n in range(len(texts))]
  core, aux = f"val-core/{name}/acc", f"val-aux/{name}"
  out = {f"{core}/mean@{k}": metrics_lib.avg_at_k(correct.tolist())}
  for kk in sorted(set(pass_k) | {k}):
    out[f"{core}/pass@{kk}"] = metrics_lib.pass_at_k_mean(correct.tolist(), kk)
  for n in (3, 4):
    out[f"{aux}/distinct_{n}"] = metrics_lib.distinct_n(responses, n)
  out[f"{aux}/distinct_correct"] = float(np.mean([
      metrics_lib.distinct_correct(texts[p * k:(p + 1) * k], correct[p].tolist())
      for p in range(correct.shape[0])]))
  out[f"{aux}/response_length/mean"] = float(r.lengths.mean())
  return out


def settings_from_config(config) -> SampleSettings:
  """The SampleSettings of the held-out evaluation (config.eval; the RL loop's and
  experiments/evaluate.py's): k = eval.samples responses per prompt."""
  e = config.eval
  return SampleSettings(group_size=int(e.samples),
                        max_new_tokens=e.max_new_tokens or config.sampling.max_new_tokens,
                        temperature=e.temperature, top_p=e.top_p)


def evaluate(sampler, params, task, tokenizer, encode, key, *, num_prompts: int,
             settings: SampleSettings, pass_k: Sequence[int] = ()) -> dict[str, float]:
  """Samples `settings.group_size` = k responses for the first `num_prompts` prompts of each
  held-out set (set i with `fold_in(key, i)`) and scores them."""
  out = {}
  for i, (name, records) in enumerate(sorted(task.evals.items())):
    chosen, ids = first_prompts(records, encode, num_prompts)
    if not chosen:
      continue
    r, _, _ = sample_and_score(sampler, params, task, tokenizer, chosen, ids,
                               jax.random.fold_in(key, i), settings=settings)
    out.update(set_metrics(r, k=settings.group_size, pass_k=pass_k, name=name))
  return out
