"""What a policy says about a token batch: per-token log-probs, entropies and FlowRL's log Z.

One function, `score`, serves the train step (gradients flow through logp and log Z), the
behaviour scoring of the loop (old / reference log-probs, `make_logp_fn`) and the tests, so the
convention "column t scores token t" (`models.logprobs.score_columns`) and the prompt columns
that skip the LM head are defined once.

  scores = scoring.score(params, tokens_NL, mask_NL, cfg=cfg, prompt_length=P,
                         with_entropy=True)           # Scores(logp [N, L], entropy [N, L], None)
  logp_fn = scoring.make_logp_fn(cfg, mesh=mesh, temperature=1.0, row_chunks=4)
  old_logp_NL = logp_fn(params["model"], tokens_NL, mask_NL, prompt_length=P)   # on device
  old_logp_NL = logp_fn(params["model"], tokens_NL, mask_NL, packed=batch.packed)  # packed rows

A packed batch (`packing.Packed`) runs the decoder on its packed rows (segment ids, positions
restarting per sequence) and gathers the scores back to the [N, L] layout (`score_packed`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from lad_jax import baselines
from lad_jax import packing
from lad_jax import sharding
from lad_jax.models import logprobs
from lad_jax.models.config import ModelConfig
from lad_jax.models.decoder import Decoder

Array = jax.Array


class Scores(NamedTuple):
  """Per-row scores of a [N, L] token batch (float32).

  Attributes:
    logp: [N, L] log pi(token_t | tokens_<t); 0 in column 0 and in columns < prompt_length.
    entropy: [N, L] entropy of each column's next-token distribution, stop-gradiented (a metric
      and EntAdv's shaping input); None unless asked for.
    log_z: [N] FlowRL's learned log partition function of each row's prompt; None without a
      log Z head.
  """

  logp: Array
  entropy: Optional[Array]
  log_z: Optional[Array]


def init_logz_head(key: Array, hidden_size: int) -> Any:
  """Parameters of FlowRL's log Z head (`baselines.LogZHead`) for a model of this width."""
  hidden = jnp.zeros((1, 1, hidden_size), jnp.float32)
  return baselines.LogZHead().init(key, hidden, jnp.ones((1, 1), bool))["params"]


def score(params: Mapping[str, Any], tokens_NL: Array, mask_NL: Array, *, cfg: ModelConfig,
          prompt_length: int = 0, temperature: float = 1.0, chunk_size: Optional[int] = None,
          with_entropy: bool = False, prompt_mask_NL: Optional[Array] = None,
          dropout_key: Optional[Array] = None) -> Scores:
  """Scores a batch under `params` = {"model": decoder params[, "logz_head": head params]}.

  Args:
    tokens_NL, mask_NL: [N, L] tokens and their non-padding mask (prompt + response).
    cfg: the decoder's config (dtype, remat policy).
    prompt_length: P, static: columns < P get no LM head (logp 0).
    temperature: logits are divided by it (the sampler's temperature).
    chunk_size: positions per LM-head chunk (`token_logprobs`); None = one chunk.
    with_entropy: also return the (stop-gradiented) entropy per column.
    prompt_mask_NL: [N, L] True on prompt tokens; with a "logz_head" in params the head runs on
      the mean hidden state over them (FlowRL).
    dropout_key: train-mode dropout in the log Z head (as the FlowRL authors); None = off.
  """
  logp_NL, ent_NL, hidden_NLD = logprobs.score_columns(
      Decoder(cfg), params["model"], tokens_NL, mask_BT=mask_NL, temperature=temperature,
      chunk_size=chunk_size, return_entropy=with_entropy, prompt_length=prompt_length)
  ent_NL = None if ent_NL is None else jax.lax.stop_gradient(ent_NL)
  log_z_N = None
  if "logz_head" in params and prompt_mask_NL is not None:
    log_z_N = baselines.LogZHead().apply(
        {"params": params["logz_head"]}, hidden_NLD, prompt_mask_NL,
        deterministic=dropout_key is None,
        rngs=None if dropout_key is None else {"dropout": dropout_key})
  return Scores(logp=logp_NL, entropy=ent_NL, log_z=log_z_N)


def score_packed(params: Mapping[str, Any], packed: packing.Packed, *, cfg: ModelConfig,
                 prompt_length: int = 0, temperature: float = 1.0,
                 chunk_size: Optional[int] = None, with_entropy: bool = False,
                 prompt_mask_NL: Optional[Array] = None,
                 dropout_key: Optional[Array] = None) -> Scores:
  """`score` of ONE micro-batch's packed rows (`packed.tokens_RC` [r, C]), as [N_u, L] scores.

  The decoder runs on the packed rows with the segment ids as its mask and the per-sequence
  positions, so every token sees exactly its own sequence's prefix. Column c of a packed row
  scores token c from the hidden state at c - 1; at a sequence's first token that state belongs
  to the previous sequence, so those columns are zeroed (they are prompt tokens, never scored).
  `index_NL` gathers the columns back to [N_u, L]; log Z pools the gathered prompt hidden states
  (the first `prompt_length` columns, or all of them when 0).
  """
  logp_RC, ent_RC, hidden_RCD = logprobs.score_columns(
      Decoder(cfg), params["model"], packed.tokens_RC, mask_BT=packed.segment_ids_RC,
      positions_BT=packed.positions_RC, temperature=temperature, chunk_size=chunk_size,
      return_entropy=with_entropy)
  starts_RC = packed.positions_RC == 0
  index_NL = packed.index_NL
  scored_NL = jnp.arange(index_NL.shape[1])[None, :] >= int(prompt_length)

  def to_rows(x_RC):
    return jnp.where(scored_NL, packing.unpack(jnp.where(starts_RC, 0.0, x_RC), index_NL), 0.0)

  logp_NL = to_rows(logp_RC)
  ent_NL = None if ent_RC is None else jax.lax.stop_gradient(to_rows(ent_RC))
  log_z_N = None
  if "logz_head" in params and prompt_mask_NL is not None:
    width = int(prompt_length) or index_NL.shape[1]
    log_z_N = baselines.LogZHead().apply(
        {"params": params["logz_head"]}, packing.unpack(hidden_RCD, index_NL[:, :width]),
        prompt_mask_NL[:, :width], deterministic=dropout_key is None,
        rngs=None if dropout_key is None else {"dropout": dropout_key})
  return Scores(logp=logp_NL, entropy=ent_NL, log_z=log_z_N)


def make_logp_fn(cfg: ModelConfig, *, mesh: Mesh, temperature: float = 1.0,
                 chunk_size: Optional[int] = None, rules: Optional[sharding.Rules] = None,
                 row_chunks: int = 1) -> Callable[..., Array]:
  """Jitted `logp_fn(params_model, tokens_NL, mask_NL, *, prompt_length=0, packed=None)`
  -> [N, L] f32.

  Behaviour scoring (old_logp, ref_logp): exactly the logp the train step computes, so old_logp
  recomputed with the current params gives ratio 1. The rows are scored in `row_chunks` chunks
  (a `lax.map` inside the one program: the trainer's micro-batch size bounds the activations),
  chunk i taking rows i, i + k, ... (every device keeps its share of every chunk). A packed
  batch (`packed`, a `packing.Packed`) is scored one micro-batch unit of packed rows at a time
  instead (`score_packed`), whatever `row_chunks` says. The result stays on device, sharded over
  the batch axes; one compile per shape and prompt length.
  """
  rules = tuple(rules or sharding.DEFAULT_RULES)
  if isinstance(row_chunks, bool) or int(row_chunks) < 1:
    raise ValueError(f"row_chunks must be an int >= 1, got {row_chunks!r}.")

  def fn(params_model, tokens_NL, mask_NL, packed, prompt_length):
    if packed is not None:
      return _packed_logp(params_model, packed, cfg=cfg, prompt_length=prompt_length,
                          temperature=temperature, chunk_size=chunk_size)
    k = int(row_chunks) if tokens_NL.shape[0] % int(row_chunks) == 0 else 1

    def one(xs):
      return score({"model": params_model}, xs[0], xs[1], cfg=cfg, prompt_length=prompt_length,
                   temperature=temperature, chunk_size=chunk_size).logp

    if k == 1:
      return one((tokens_NL, mask_NL))
    chunks = [sharding.constrain(packing.to_units(x, k, k), (None, "batch", None))
              for x in (tokens_NL, mask_NL)]
    return packing.from_units(jax.lax.map(one, tuple(chunks)), k)

  jitted = jax.jit(fn, static_argnames="prompt_length")

  def logp_fn(params_model: Any, tokens_NL: Any, mask_NL: Any, *, prompt_length: int = 0,
              packed: Optional[packing.Packed] = None) -> Array:
    length = tokens_NL.shape[1]
    if isinstance(prompt_length, bool) or not 0 <= int(prompt_length) < length:
      raise ValueError(f"prompt_length must be an int in [0, {length}), got {prompt_length!r}.")
    with sharding.use_mesh(mesh, rules):
      spec = sharding.logical_to_spec(("batch", None), tokens_NL.shape, mesh, rules)
      sh = NamedSharding(mesh, spec)
      return jitted(params_model, jax.device_put(tokens_NL, sh), jax.device_put(mask_NL, sh),
                    packed, prompt_length=int(prompt_length))

  def lower(params_model: Any, tokens_NL: Any, mask_NL: Any, *, prompt_length: int = 0,
            packed: Optional[packing.Packed] = None) -> Any:
    """The program lowered for these (abstract, placed) arguments, as `logp_fn` compiles it."""
    with sharding.use_mesh(mesh, rules):
      return jitted.lower(params_model, tokens_NL, mask_NL, packed,
                          prompt_length=int(prompt_length))

  logp_fn.lower = lower
  return logp_fn


def _packed_logp(params_model: Any, packed: packing.Packed, *, cfg: ModelConfig,
                 prompt_length: int, temperature: float, chunk_size: Optional[int]) -> Array:
  """[N, L] logp of a packed batch, one micro-batch unit (r packed rows) per `lax.map` step."""
  m, r = packed.micro_batches, packed.unit_rows
  units = packed.tokens_RC.shape[0] // r
  rows = lambda x: sharding.constrain(packing.to_units(x, m, units), (None, "batch", None))
  unit_arrays = jax.tree.map(rows, packed)

  def one(unit):
    return score_packed({"model": params_model}, unit, cfg=cfg, prompt_length=prompt_length,
                        temperature=temperature, chunk_size=chunk_size).logp

  if units == 1:
    return one(packed)
  return packing.from_units(jax.lax.map(one, unit_arrays), m)
