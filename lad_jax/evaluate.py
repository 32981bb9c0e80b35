"""Held-out evaluation: Avg@k, the unbiased Pass@k curve, distinct-n, distinct correct
answers and their entropy, token entropy.

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
  validation metrics: val-core/<set>/acc/mean@k (Avg@k) and acc/pass@j (unbiased Pass@j) for
  every j = 1..k (the whole curve) and those in `pass_k`; val-aux/<set>/... for diversity
  (`diversity_metrics`) and the response length."""
  correct = r.correct.reshape(-1, k)
  core, aux = f"val-core/{name}/acc", f"val-aux/{name}"
  out = {f"{core}/mean@{k}": metrics_lib.avg_at_k(correct.tolist())}
  curve = metrics_lib.pass_at_k_curve(correct.tolist())
  for kk in sorted(set(pass_k) | set(curve)):
    out[f"{core}/pass@{kk}"] = curve.get(kk, metrics_lib.pass_at_k_mean(correct.tolist(), kk))
  out.update({f"{aux}/{key}": v for key, v in diversity_metrics(r, k=k).items()})
  out[f"{aux}/response_length/mean"] = float(r.lengths.mean())
  return out


def diversity_metrics(r: Rollout, *, k: int) -> dict[str, float]:
  """Per-prompt diversity of k samples, averaged over prompts.

  distinct_3 / distinct_4: distinct n-grams of all responses (token ids). distinct_correct:
  distinct correct response texts. distinct_correct_answers: distinct correct FINAL answers
  (the verifier's extraction). answer_entropy: H(pi+), the entropy (nats) of the empirical
  distribution of correct final answers, over prompts with a correct sample (0 when none has).
  token_entropy: -mean log pi(y_t) of the sampled response tokens, a Monte-Carlo estimate of the
  per-token entropy of the sampling distribution (the logits are not kept).
  """
  correct = r.correct.reshape(-1, k)
  texts, answers = list(r.texts), list(r.answers)
  responses = [r.response_tokens[n, :r.lengths[n]].tolist() for n in range(len(texts))]
  groups = [slice(p * k, (p + 1) * k) for p in range(correct.shape[0])]
  out = {f"distinct_{n}": metrics_lib.distinct_n(responses, n) for n in (3, 4)}
  out["distinct_correct"] = float(np.mean([
      metrics_lib.distinct_correct(texts[g], correct[p].tolist()) for p, g in enumerate(groups)]))
  out["distinct_correct_answers"] = float(np.mean([
      metrics_lib.distinct_correct_answers(answers[g], correct[p].tolist())
      for p, g in enumerate(groups)]))
  entropies = [metrics_lib.correct_answer_entropy(answers[g], correct[p].tolist())
               for p, g in enumerate(groups)]
  defined = [h for h in entropies if h is not None]
  out["answer_entropy"] = float(np.mean(defined)) if defined else 0.0
  mask = np.asarray(r.response_mask, bool)
  out["token_entropy"] = float(-np.asarray(r.logp)[mask].sum() / max(mask.sum(), 1))
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
