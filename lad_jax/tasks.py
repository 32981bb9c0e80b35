"""Tasks: training records, held-out sets, prompts and rewards (DESIGN §4).

  task = tasks.build_task(config)                    # records + verifier (workers start here)
  encode = tasks.make_encoder(tokenizer, task, config)
  stream = tasks.PromptStream(task.train, encode, seed=0, shuffle=True, position=0)
  records, prompt_ids = stream.take(num_prompts)     # deterministic in (seed, position)

Only `build_task` and `make_encoder` read the ConfigDict; `PromptEncoder` and `PromptStream`
take plain arguments.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from lad_jax import config_utils
from lad_jax.data import prompts

ConfigError = config_utils.ConfigError


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


def _procedural_task(config) -> Task:
  from lad_jax import verifiers  # pylint: disable=g-import-not-at-top
  from lad_jax.data import builders  # pylint: disable=g-import-not-at-top
  from lad_jax.verifiers import procedural  # pylint: disable=g-import-not-at-top
  data, vcfg = config.data, config.verifier
  difficulty = dict(data.difficulty)
  train = builders.load_procedural(data.train, seed=config.seed, size=data.procedural_size,
                                   data_dir=data.data_dir, **difficulty)
  # A different seed gives held-out problems of the same distribution.
  evals = {name: builders.load_procedural(name, seed=config.seed + 1,
                                          size=data.procedural_eval_size,
                                          data_dir=data.data_dir, **difficulty)
           for name in config_utils.eval_sets(config)}
  verifier = verifiers.ProceduralVerifier(
      workers=vcfg.workers, timeout_s=vcfg.timeout_s,
      extractors=procedural.extractors_for(vcfg.extract))
  return Task(train=train, evals=evals, question=lambda r: r["question"],
              score=lambda resp, recs: verifier.score(resp, [r["entry"] for r in recs]),
              close=verifier.close)


def _math_task(config) -> Task:
  from lad_jax import verifiers  # pylint: disable=g-import-not-at-top
  from lad_jax.data import builders  # pylint: disable=g-import-not-at-top
  data, vcfg = config.data, config.verifier
  load = lambda name, split: builders.load(name, split, data_dir=data.data_dir,
                                           source_dir=data.source_dir)
  train = load(data.train, data.train_split)
  evals = {name: load(name, data.eval_split) for name in config_utils.eval_sets(config)}
  verifier = verifiers.MathVerifier(workers=vcfg.workers, timeout_s=vcfg.timeout_s,
                                    reward=vcfg.reward)
  return Task(train=train, evals=evals, question=lambda r: r["problem"],
              score=lambda resp, recs: verifier.score(resp, [r["answer"] for r in recs]),
              close=verifier.close)


def _code_task(config) -> Task:
  """stdio problems for training, HumanEval (function tests) for evaluation."""
  from lad_jax import verifiers  # pylint: disable=g-import-not-at-top
  from lad_jax.data import builders  # pylint: disable=g-import-not-at-top
  from lad_jax.data import code_records  # pylint: disable=g-import-not-at-top
  data = config.data
  train = code_records.read_code_records(
      os.path.join(os.path.expanduser(data.source_dir), f"{data.train}.jsonl"))
  evals = {}
  for name in config_utils.eval_sets(config):
    if name != "humaneval":
      raise ConfigError(f"Unknown code eval set {name!r}; valid: ['humaneval'].")
    evals[name] = [dict(r, problem=r["prompt"], template="code_function") for r in builders.load(
        "humaneval", "test", data_dir=data.data_dir)]
  verifier = verifiers.CodeVerifier(workers=config.verifier.workers,
                                    timeout_s=config.verifier.timeout_s)

  def tests(r):
    if "tests" in r:
      return verifiers.StdioTests(cases=tuple(r["tests"]))
    return verifiers.FunctionTests(test=r["test"], entry_point=r["entry_point"],
                                   prompt=r["prompt"])

  return Task(train=train, evals=evals, question=lambda r: r["problem"],
              score=lambda resp, recs: verifier.score(resp, [tests(r) for r in recs]),
              close=verifier.close)


_BUILDERS = {"procedural": _procedural_task, "math": _math_task, "code": _code_task}


def build_task(config) -> Task:
  """The task of `config.data` with its verifier (worker processes start here)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  return _BUILDERS[config.data.task](config)


class PromptEncoder:
  """record -> prompt token ids (few-shot turns + template + chat template); None if too long.

  A record's own "template" key (HumanEval: code_function) overrides `template`.
  """

  def __init__(self, tokenizer: Any, question: Callable[[Mapping[str, Any]], str], *,
               template: str, system_prompt: Optional[str], few_shot: Sequence[Any],
               chat_template: bool, max_tokens: int):
    self._tokenizer = tokenizer
    self._question = question
    self._template = template
    self._system = system_prompt
    self._examples = prompts.check_examples(few_shot)
    self._chat = bool(chat_template) and bool(getattr(tokenizer, "chat_template", None))
    self.max_tokens = int(max_tokens)

  def __call__(self, record: Mapping[str, Any]) -> Optional[list[int]]:
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
    return ids if 0 < len(ids) <= self.max_tokens else None


def make_encoder(tokenizer: Any, task: Task, config) -> PromptEncoder:
  """The `PromptEncoder` of config.data for this task's records."""
  data = config.data
  return PromptEncoder(tokenizer, task.question, template=data.template,
                       system_prompt=data.system_prompt, few_shot=data.few_shot,
                       chat_template=data.chat_template, max_tokens=data.max_prompt_tokens)


class PromptStream:
  """Deterministic prompt order: epoch e visits records in permutation(seed, e).

  The state is one integer, `position` (records consumed so far), so saving it in a checkpoint's
  meta resumes the exact order. Prompts longer than the limit are skipped (and counted).
  """

  def __init__(self, records: Any, encode: Callable[[Mapping[str, Any]], Optional[list[int]]],
               *, seed: int, shuffle: bool, position: int = 0):
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
    """The next `count` records that fit, and their prompt ids."""
    _, records, ids = self.take_indexed(count)
    return records, ids

  def take_indexed(self, count: int
                   ) -> tuple[list[int], list[dict[str, Any]], list[list[int]]]:
    """`take`, with each record's index in the training set (its prompt id in the logs)."""
    indices, records, ids = [], [], []
    misses = 0
    while len(records) < count:
      index = self._index(self.position)
      record = self._records[index]
      self.position += 1
      tokens = self._encode(record)
      if tokens is None:
        self.skipped += 1
        misses += 1
        if misses > 100 * count + len(self._records):
          limit = getattr(self._encode, "max_tokens", "?")
          raise ConfigError(f"Every prompt is longer than config.data.max_prompt_tokens="
                            f"{limit}; raise it.")
        continue
      indices.append(index)
      records.append(record)
      ids.append(tokens)
    return indices, records, ids
