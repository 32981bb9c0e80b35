"""What a policy says about a token batch: per-token log-probs, entropies and FlowRL's log Z.

One function, `score`, serves the train step (gradients flow through logp and log Z), the
behaviour scoring of the loop (old / reference log-probs, `make_logp_fn`) and the tests, so the
convention "column t scores token t" (`models.logprobs.score_columns`) and the prompt columns
that skip the LM head are defined once.

  scores = scoring.score(params, tokens_NL, mask_NL, cfg=cfg, prompt_length=P,
                         with_entropy=True)           # Scores(logp [N, L], entropy [N, L], None)
  logp_fn = scoring.make_logp_fn(cfg, mesh=mesh, temperature=1.0)
  old_logp_NL = logp_fn(params["model"], tokens_NL, mask_NL, prompt_length=P)   # on device
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from lad_jax import baselines
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


def make_logp_fn(cfg: ModelConfig, *, mesh: Mesh, temperature: float = 1.0,
                 chunk_size: Optional[int] = None, rules: Optional[sharding.Rules] = None
                 ) -> Callable[..., Array]:
  """Jitted `logp_fn(params_model, tokens_NL, mask_NL, *, prompt_length=0) -> [N, L]` f32.

  Behaviour scoring (old_logp, ref_logp): exactly the logp the train step computes, so old_logp
  recomputed with the current params gives ratio 1. The result stays on device, sharded over the
  batch axes; one compile per prompt length.
  """
  rules = tuple(rules or sharding.DEFAULT_RULES)

  def fn(params_model, tokens_NL, mask_NL, prompt_length):
    return score({"model": params_model}, tokens_NL, mask_NL, cfg=cfg,
                 prompt_length=prompt_length, temperature=temperature,
                 chunk_size=chunk_size).logp

  jitted = jax.jit(fn, static_argnames="prompt_length")

  def logp_fn(params_model: Any, tokens_NL: Any, mask_NL: Any, *, prompt_length: int = 0
              ) -> Array:
    length = tokens_NL.shape[1]
    if isinstance(prompt_length, bool) or not 0 <= int(prompt_length) < length:
      raise ValueError(f"prompt_length must be an int in [0, {length}), got {prompt_length!r}.")
    with sharding.use_mesh(mesh, rules):
      spec = sharding.logical_to_spec(("batch", None), tokens_NL.shape, mesh, rules)
      sh = NamedSharding(mesh, spec)
      return jitted(params_model, jax.device_put(tokens_NL, sh), jax.device_put(mask_NL, sh),
                    prompt_length=int(prompt_length))

  return logp_fn
