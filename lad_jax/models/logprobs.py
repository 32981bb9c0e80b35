"""Per-token log-probabilities (and entropies) of given tokens, without [B, T, V] float32 copies.

The trainer needs `logp_BT = log pi(y_t | y_<t)` of the sampled tokens, and often the entropy.
`token_logprobs` computes them from the final hidden states chunk by chunk along T: each chunk's
logits [B, c, V] exist only inside a rematerialised `lax.map` body, so neither the forward nor
the backward pass holds the full [B, T, V] logits.

  logp_BT = forward_logprobs(model, params, tokens_BT, mask_BT=mask_BT)   # aligned to tokens
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from lad_jax import sharding
from lad_jax.models import decoder
from lad_jax.models.config import ModelConfig
from lad_jax.models.decoder import Decoder

Array = jax.Array


def lm_head(params: Any, cfg: ModelConfig) -> tuple[Array, str]:
  """The LM head weight and its einsum spec: ([V, D], "vd") tied or ([D, V], "dv") untied."""
  if cfg.tie_word_embeddings:
    return params["embed_tokens"]["embedding"], "vd"
  return params["lm_head"]["kernel"], "dv"


def token_logprobs(params: Any, cfg: ModelConfig, hidden_BTD: Array, targets_BT: Array, *,
                   temperature: float = 1.0, chunk_size: Optional[int] = None,
                   return_entropy: bool = False) -> Union[Array, tuple[Array, Array]]:
  """log softmax(h W / temperature)[target] per position, float32.

  Args:
    params: decoder params (only the LM head is read).
    cfg: model config.
    hidden_BTD: final-norm hidden states (`Decoder(..., return_hidden=True).hidden`).
    targets_BT: int tokens whose log-probability to return.
    temperature: logits are divided by it (use the sampler's temperature for behaviour logp).
    chunk_size: positions per chunk along T (None = one chunk). Memory ~ B * chunk * V floats.
    return_entropy: also return the entropy of each position's distribution.

  Returns:
    logp [B, T] (and entropy [B, T]).
  """
  w, spec = lm_head(params, cfg)
  w = w.astype(cfg.dtype)
  b, t, d = hidden_BTD.shape
  inv_temp = 1.0 / temperature

  @jax.checkpoint
  def chunk_fn(h_BCD, y_BC):
    logits = jnp.einsum(f"bcd,{spec}->bcv", h_BCD.astype(cfg.dtype), w,
                        preferred_element_type=jnp.float32) * inv_temp
    logits = sharding.constrain(logits, decoder.ACT_BTV)  # keep the vocab split
    lse_BC = jax.nn.logsumexp(logits, axis=-1)
    logp_BC = jnp.take_along_axis(logits, y_BC[..., None], axis=-1)[..., 0] - lse_BC
    if not return_entropy:
      return logp_BC, jnp.zeros_like(logp_BC)
    probs = jax.nn.softmax(logits, axis=-1)
    ent_BC = lse_BC - jnp.sum(probs * logits, axis=-1)
    return logp_BC, ent_BC

  c = t if chunk_size is None or chunk_size >= t else int(chunk_size)
  n = -(-t // c)
  pad = n * c - t
  h = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
  y = jnp.pad(targets_BT, ((0, 0), (0, pad)))
  h_NBCD = h.reshape(b, n, c, d).swapaxes(0, 1)
  y_NBC = y.reshape(b, n, c).swapaxes(0, 1)
  if n == 1:
    logp, ent = chunk_fn(h_NBCD[0], y_NBC[0])
  else:
    logp, ent = jax.lax.map(lambda a: chunk_fn(*a), (h_NBCD, y_NBC))
    logp, ent = logp.swapaxes(0, 1).reshape(b, n * c), ent.swapaxes(0, 1).reshape(b, n * c)
  logp, ent = logp[:, :t], ent[:, :t]
  return (logp, ent) if return_entropy else logp


def score_columns(model: Decoder, params: Any, tokens_BT: Array, *,
                  mask_BT: Optional[Array] = None, positions_BT: Optional[Array] = None,
                  temperature: float = 1.0, chunk_size: Optional[int] = None,
                  return_entropy: bool = False, prompt_length: int = 0
                  ) -> tuple[Array, Optional[Array], Array]:
  """(logp [B, T], entropy [B, T] or None, final hidden states [B, T, D]) of one forward pass.

  The one place where column t scores token t: logp[:, t] = log pi(tokens[t] | tokens[<t]),
  read from the hidden state at t - 1. Column 0 has no prefix and is 0 (its entropy too); mask
  it out, as a response mask does. Columns < prompt_length (static) are 0 too and skip the LM
  head: pass the prompt width when only the response is scored.
  """
  out = model.apply({"params": params}, tokens_BT, mask_BT=mask_BT, positions_BT=positions_BT,
                    return_hidden=True, compute_logits=False)
  first = max(int(prompt_length), 1)
  res = token_logprobs(params, model.cfg, out.hidden[:, first - 1:-1], tokens_BT[:, first:],
                       temperature=temperature, chunk_size=chunk_size,
                       return_entropy=return_entropy)
  logp, ent = res if return_entropy else (res, None)
  pad = lambda x: jnp.pad(x, ((0, 0), (first, 0)))
  return pad(logp), None if ent is None else pad(ent), out.hidden


def forward_logprobs(model: Decoder, params: Any, tokens_BT: Array, *,
                     mask_BT: Optional[Array] = None, positions_BT: Optional[Array] = None,
                     temperature: float = 1.0, chunk_size: Optional[int] = None,
                     return_entropy: bool = False, prompt_length: int = 0
                     ) -> Union[Array, tuple[Array, Array]]:
  """`score_columns` without the hidden states: logp [B, T] (and entropy [B, T])."""
  logp, ent, _ = score_columns(model, params, tokens_BT, mask_BT=mask_BT,
                               positions_BT=positions_BT, temperature=temperature,
                               chunk_size=chunk_size, return_entropy=return_entropy,
                               prompt_length=prompt_length)
  return (logp, ent) if return_entropy else logp
