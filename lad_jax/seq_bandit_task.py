"""The sequence bandit's task and base policy: "pick a number" prompts with enumerable answers.

Vocabulary (V = 12 + P): digits 0-9 (ids 0-9), EOS (10), one token per prompt type (11 .. 10+P),
PAD (11+P). A prompt is its type token alone; a response is two digits and EOS, so each prompt
has exactly Y = 100 well-formed responses y = 10 a + b (tokens [a, b, EOS]). Everything else the
decoder can emit (EOS early, a digit where EOS belongs, ...) is "outside": it is never correct and
its mass, 1 - sum_y pi(y|x), is reported.

Each prompt type x has its own correct set C_x (NUM_CORRECT numbers) and its own target
distribution p0(y|x) for the supervised pre-training that makes pi_0. The target is a fixed
random softmax, and C_x is picked across it on purpose: two of the most likely answers, three
from the middle, three of the least likely, so some correct answers are rare under pi_0 and many
incorrect ones are common (the setting where RLVR's mode collapse shows).

The exact distribution pi(y|x) comes from teacher-forcing all P * Y responses in one batch
(`enumerated_tokens`) and summing the three token log-probs (EOS included): `exact_seq_logp`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lad_jax import scoring
from lad_jax.models import testing
from lad_jax.models.config import ModelConfig
from lad_jax.models.decoder import Decoder

Array = jax.Array

NUM_DIGITS = 10
EOS = 10
NUM_RESPONSES = 100  # Y: two digits
RESPONSE_LEN = 3  # two digits + EOS
NUM_CORRECT = 8
TASK_SEED = 1234  # fixes the target distributions and correct sets (not a run seed)
TARGET_SHARPNESS = 1.5  # p0(.|x) = softmax(TARGET_SHARPNESS * normal draws)


@dataclasses.dataclass(frozen=True)
class Task:
  """The synthetic task (host numpy; fixed by TASK_SEED).

  Attributes:
    num_prompts: P prompt types.
    target_PY: [P, Y] the pre-training target p0(y|x).
    correct_PY: [P, Y] bool, y in C_x.
  """

  num_prompts: int
  target_PY: np.ndarray
  correct_PY: np.ndarray

  @property
  def pad_id(self) -> int:
    return NUM_DIGITS + 1 + self.num_prompts

  @property
  def vocab_size(self) -> int:
    return self.pad_id + 1

  def prompt_token(self, x: int) -> int:
    return NUM_DIGITS + 1 + x

  @property
  def prompts(self) -> list[list[int]]:
    """The P prompts as token lists (for the sampler)."""
    return [[self.prompt_token(x)] for x in range(self.num_prompts)]


def make_task(num_prompts: int = 4, *, seed: int = TASK_SEED) -> Task:
  """P prompt types, each with a softmax target and 8 correct answers spread over its ranks."""
  if num_prompts < 1:
    raise ValueError(f"num_prompts must be >= 1, got {num_prompts}.")
  rng = np.random.default_rng(seed)
  logits_PY = TARGET_SHARPNESS * rng.normal(size=(num_prompts, NUM_RESPONSES))
  target_PY = np.exp(logits_PY - logits_PY.max(-1, keepdims=True))
  target_PY /= target_PY.sum(-1, keepdims=True)
  correct_PY = np.zeros((num_prompts, NUM_RESPONSES), bool)
  for x in range(num_prompts):
    ranks = np.argsort(-target_PY[x])  # most likely first
    picks = np.concatenate([rng.choice(ranks[:10], 2, replace=False),
                            rng.choice(ranks[40:60], 3, replace=False),
                            rng.choice(ranks[-15:], 3, replace=False)])
    correct_PY[x, picks] = True
  return Task(num_prompts, target_PY, correct_PY)


def model_config(task: Task, *, hidden: int = 48, layers: int = 2) -> ModelConfig:
  """The tiny decoder: `layers` layers of width `hidden`, 2 heads of 16, the task's vocabulary."""
  return testing.tiny_config(
      "llama", vocab_size=task.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
      num_layers=layers, num_heads=2, num_kv_heads=2, head_dim=16, eos_token_ids=(EOS,),
      pad_token_id=task.pad_id, initializer_range=0.1)


# ------------------------------------------------------------------------------------------------
# Enumeration and the exact distribution
# ------------------------------------------------------------------------------------------------


class Enumerated(NamedTuple):
  """All P * Y responses as one teacher-forced batch (row x * Y + y), prompt width 1.

  Attributes:
    tokens_NL: [P*Y, 4] int32, [prompt type, a, b, EOS].
    mask_NL: [P*Y, 4] bool, all True.
    loss_mask_NL: [P*Y, 4] bool, the three response columns.
    prompt_mask_NL: [P*Y, 4] bool, column 0.
  """

  tokens_NL: np.ndarray
  mask_NL: np.ndarray
  loss_mask_NL: np.ndarray
  prompt_mask_NL: np.ndarray


def enumerated_tokens(task: Task) -> Enumerated:
  """The [P*Y, 1 + 3] teacher-forcing batch of every well-formed response of every prompt."""
  y = np.arange(NUM_RESPONSES)
  resp_YR = np.stack([y // NUM_DIGITS, y % NUM_DIGITS, np.full_like(y, EOS)], axis=1)
  rows = [np.concatenate([np.full((NUM_RESPONSES, 1), task.prompt_token(x)), resp_YR], axis=1)
          for x in range(task.num_prompts)]
  tokens = np.concatenate(rows).astype(np.int32)
  cols = np.arange(1 + RESPONSE_LEN)[None, :]
  shape = tokens.shape
  return Enumerated(tokens, np.ones(shape, bool), np.broadcast_to(cols >= 1, shape).copy(),
                    np.broadcast_to(cols == 0, shape).copy())


def token_logp(params_model: Any, cfg: ModelConfig, enum: Enumerated) -> Array:
  """[P*Y, 4] log pi of each enumerated token (column 0, the prompt, is 0)."""
  return scoring.score({"model": params_model}, jnp.asarray(enum.tokens_NL),
                       jnp.asarray(enum.mask_NL), cfg=cfg, prompt_length=1).logp


def exact_seq_logp(params_model: Any, cfg: ModelConfig, enum: Enumerated,
                   num_prompts: int) -> Array:
  """[P, Y] log pi(y|x) = sum of the three token log-probs (EOS included); differentiable."""
  return token_logp(params_model, cfg, enum).sum(axis=1).reshape(num_prompts, NUM_RESPONSES)


# ------------------------------------------------------------------------------------------------
# pi_0: supervised pre-training
# ------------------------------------------------------------------------------------------------


def init_model_params(cfg: ModelConfig, key: Array) -> Any:
  """Fresh decoder parameters (unboxed)."""
  return nn.meta.unbox(Decoder(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"])


def pretrain(key: Array, *, task: Task, cfg: ModelConfig, steps: int = 300,
             lr: float = 1e-2) -> Any:
  """pi_0 for one seed: `steps` Adam steps on the exact cross-entropy to p0, from a fresh init.

  loss = -(1/P) sum_x sum_y p0(y|x) log pi(y|x) over the enumerated responses: minimised at
  pi = p0, which also drives the mass outside the 100 responses to 0. Pure; vmap over keys.
  """
  enum = enumerated_tokens(task)
  target_PY = jnp.asarray(task.target_PY, jnp.float32)
  tx = optax.adam(lr)
  params = init_model_params(cfg, key)

  def loss_fn(p):
    return -jnp.sum(target_PY * exact_seq_logp(p, cfg, enum, task.num_prompts)) / task.num_prompts

  def step(carry, _):
    p, opt = carry
    grads = jax.grad(loss_fn)(p)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return params
