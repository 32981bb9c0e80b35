"""benchmarks/rl_step_vs_trl.py: TRL's side gets our prompts, our rewards and our batch layout."""

from __future__ import annotations

import importlib.util
import os

import pytest

from lad_jax import tasks
from lad_jax.verifiers import procedural
from lad_jax.verifiers.procedural import ProceduralVerifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
  spec = importlib.util.spec_from_file_location(
      "rl_step_vs_trl", os.path.join(ROOT, "benchmarks", "rl_step_vs_trl.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench():
  return _bench()


@pytest.fixture(scope="module")
def config(bench):
  return bench.load_config(bench.DEFAULT_CONFIG, steps=5)


def test_reward_wrapper_scores_as_our_verifier(bench):
  entries = procedural.generate("chain_sum", seed=3, size=2, min_terms=2, max_terms=2,
                                min_digits=1, max_digits=1)
  records = [dict(question=e["question"], answer=e["answer"], entry=e) for e in entries]
  with ProceduralVerifier(workers=1, extractors=procedural.extractors_for("tag_or_last_number")
                          ) as verifier:
    task = tasks.Task(train=records, evals={}, question=lambda r: r["question"],
                      score=lambda resp, recs: verifier.score(resp, [r["entry"] for r in recs]))
    a, b = (e["answer"] for e in entries)
    completions = [f"<answer>{a}</answer>", f"so it is {b}", f"<answer>{int(b) + 1}</answer>",
                   "no idea", f"<answer>{b}</answer>"]
    index = [0, 1, 1, 0, 0]  # the last: b is the other record's answer
    # Called as TRL's GRPOTrainer calls a reward function (its keyword arguments).
    got = bench.VerifierReward(task, records)(
        prompts=["p"] * 5, completions=completions, completion_ids=[[1]] * 5,
        record_index=index, trainer_state=None, log_extra=None, log_metric=None)
    want = [r.reward for r in verifier.score(completions, [entries[i] for i in index])]
  assert got == want
  assert got == [1.0, 1.0, 0.0, 0.0, float(a == b)]  # tags, else the last number (the config's)


def test_prompt_text_tokenizes_to_our_prompt_ids(bench, config, gguf_path):
  from lad_jax import models  # pylint: disable=g-import-not-at-top
  tok = models.load_tokenizer(gguf_path)
  stub = tasks.Task(train=[], evals={}, question=lambda r: r["question"], score=None)
  encode = tasks.make_encoder(tok, stub, config)
  for q in ("State the final answer to the following arithmetic problem: 4 + 3 =", "1 - 9 ="):
    text = bench.prompt_text(tok, q, config)
    # TRL tokenizes a plain-text prompt as processing_class(text=...)["input_ids"].
    assert list(tok(text=[text])["input_ids"][0]) == encode({"question": q})
    assert text.count("<|im_start|>user") == 2  # the few-shot turn and the question


def test_trl_args_one_generation_two_optimizer_steps(bench, config, tmp_path):
  args = bench.trl_args(str(tmp_path), config=config, optimizer_steps=4)
  assert args.generation_batch_size == 16  # 4 prompts x G=4, one generation ...
  assert args.num_generations == 4
  assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 8
  assert args.steps_per_generation == 2  # ... reused by 2 optimizer steps of 8 rows
  assert args.num_iterations == 1
  assert (args.learning_rate, args.max_grad_norm, args.beta, args.epsilon) == (5e-6, 1.0, 0.0, 0.2)
  assert (args.temperature, args.top_p, args.top_k, args.max_completion_length) == (1.0, 1.0, 0,
                                                                                    64)
  assert not args.bf16 and not args.gradient_checkpointing
