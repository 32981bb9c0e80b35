"""Grouped rollouts with a KV cache: prefill each prompt once, decode G samples per prompt.

  sampler = Sampler(model, eos_ids=cfg.eos_token_ids, pad_id=pad_id, mesh=mesh)
  out = sampler.sample(params, prompts, key, group_size=8, max_new_tokens=1024,
                       temperature=1.0)
  tokens_NL = jnp.concatenate([out.prompt_tokens, out.response_tokens], axis=1)
  mask_NL = jnp.concatenate([out.prompt_mask, out.response_mask], axis=1)

How a call runs (DESIGN §4):
  1. The P prompts are left-padded to a *prompt bucket* Tp (the smallest of `prompt_buckets`
     that fits the longest prompt) and prefilled once into a cache of Tp + R slots, where R is
     the *response bucket* (the smallest of `response_buckets` >= max_new_tokens).
  2. The cache and the last-position logits are repeated G times (`KVCache.repeat`), so the G
     samples of a prompt are adjacent rows: N = P * G.
  3. A jitted `lax.while_loop` samples one token per row and step, feeds it back through the
     cache, and exits as soon as every row has emitted an EOS or max_new_tokens is reached.
     Shapes are static, so a run compiles once per (Tp, R, P, G, sampling params) key; the
     compiled functions are cached on the sampler (`num_traces` counts traces, for tests).

Sampling (fp32): `logits / temperature`, then top-k, then top-p (HF's order), each masking
logits to -inf so the rest renormalise; a token is drawn from that distribution (by inverse CDF,
one uniform per row: `categorical`) and `logp` is its log-probability under exactly that
distribution. `temperature=0` means greedy decoding
(argmax, first index on ties); then `logp` is the log-probability under the *untempered*
(temperature 1) model distribution, since the point mass actually sampled from would give 0
everywhere and `forward_logprobs` cannot be evaluated at temperature 0.

Truncation and the importance ratio: top-p / top-k change the behaviour policy. With them off
(the default, and what training rollouts should use) `logp` equals
`forward_logprobs(..., temperature=T)` of the same tokens, so the trainer may recompute or reuse
it. With them on, `logp` is of the *truncated* distribution, which `forward_logprobs` does not
compute: a trainer that uses such rollouts must score the same truncated distribution, or the
ratio pi_theta / pi_old is biased.

Randomness: the token of row r at step i is drawn from the uniform of
`fold_in(fold_in(key, i), r)`, r the row's index in the whole call, so a key fixes the output
whether the rows are sharded or not and however they are split into `rows_per_call` chunks.

Per-layer cache (`per_layer_cache`, the default on CPU): the cache is one buffer per layer and
the decode step runs the layers unrolled, each writing its new slot in place and then reading
its own buffer; the layer scan instead slices every layer's weights out of the stacked arrays
at every step (and, with `decode_block_size=0`, every layer's whole cache too). Either way a
step reads only the written slots of the rows that have not ended, in blocks of
`ModelConfig.decode_block_size` (`ModelConfig.decode_attention`), so its cost follows the tokens
so far, not the response bucket. The per-layer path slices the layer weights once
per call before the loop (one extra copy of them while decoding), and its unrolled program
compiles ~2x longer; the rollouts are the same up to float rounding (speed: the README's
results, benchmarks/sampler_vs_hf.py and benchmarks/decode_scaling.py).

Lock step: a call (or chunk) decodes until its longest row ends, so rows that end early idle;
`continuous.ContinuousSampler` refills their slots instead (continuous batching), with the same
rows for a key. Rows can be given their own token limits (`row_limits`), and finished rows are
handed to `on_rows` (here all at the end) for verification.

Memory: the cache holds N = num_prompts * G rows of Tp + R slots. At paper scale (256 prompts x 8
x 8192 tokens) that exceeds any accelerator, so `rows_per_call` runs the prompts in chunks of
max(1, rows_per_call // G) prompts (each chunk one prefill and one decode loop with the same
compiled functions: the last chunk is padded with copies of a prompt, and every chunk uses the
prompt bucket of the longest prompt of the call) and concatenates the rows.

Decode layout: with a mesh, the parameters are placed for decoding once per `sample` call,
before the loops (`decode_param_rules`): their data / fsdp splits are gathered and their
tensor (model-axis) splits kept, so the decode loop never all-gathers a weight (with the
trainer's FSDP shardings it would gather every layer's weights at every step). The cost is
memory: while sampling, each device holds its tensor shard of the full weights next to the
trainer's shards, params / tensor per device (Qwen2.5-7B in bf16: 15.2 GB with tensor=1,
3.8 GB with tensor=4).

Stop strings are checked on the host after decoding (they need the tokenizer): a row is cut
after the first token whose decoded prefix contains a stop string (that token is kept, like an
EOS), the rest is masked, logp zeroed, tokens set to pad_id, and the row counts as stopped (not
truncated). The while loop does not know about them, so it may decode past a stop string.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lad_jax import sharding, xla_cpu
from lad_jax.models import logprobs as logprobs_lib
from lad_jax.models import params as params_lib
from lad_jax.models.decoder import Decoder, KVCache, unstack_layer_params

Array = jax.Array

DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048)


@flax.struct.dataclass
class SampleOutput:
  """Rollouts of N = num_prompts * G rows (the G rows of one prompt adjacent).

  Attributes:
    prompt_tokens: [N, P] int32 prompts, LEFT-padded with pad_id to the prompt bucket P.
    prompt_mask: [N, P] bool, True on prompt tokens.
    response_tokens: [N, R] int32, R = response bucket >= max_new_tokens; pad_id after the end.
    response_mask: [N, R] bool, True on generated tokens up to and including EOS / stop.
    logp: [N, R] float32 log-prob of each response token under the distribution it was sampled
      from (temperature, and top-p / top-k if on); 0 where response_mask is False.
    truncated: [N] bool, no EOS / stop string within max_new_tokens.
    lengths: [N] int32 response tokens per row (EOS included).
  """

  prompt_tokens: Array
  prompt_mask: Array
  response_tokens: Array
  response_mask: Array
  logp: Array
  truncated: Array
  lengths: Array


def decode_param_rules(cfg: Any, rules: sharding.Rules = sharding.DEFAULT_RULES
                       ) -> sharding.Rules:
  """`rules` with the parameters' data / fsdp splits dropped and their tensor splits kept:
  the decode layout of the weights (module docstring), gathered once per rollout instead of at
  every decode step. Activation and cache rules are unchanged."""
  _, axes = params_lib.abstract_params(cfg)
  names = {n for spec in jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
           for n in spec if n is not None}

  def model_axes_only(mesh_axes: Any) -> Any:
    kept = tuple(a for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ())
                 if a not in sharding.BATCH_AXES)
    return kept[0] if len(kept) == 1 else (kept or None)

  return tuple((name, model_axes_only(m) if name in names else m) for name, m in rules)


def _pick_bucket(length: int, buckets: Sequence[int], what: str, fix: str) -> int:
  i = bisect.bisect_left(buckets, length)
  if i == len(buckets):
    raise ValueError(f"{what} of {length} exceeds the largest bucket {buckets[-1]} "
                     f"(buckets: {list(buckets)}); {fix}.")
  return buckets[i]


def _check_buckets(buckets: Optional[Sequence[int]], name: str) -> Optional[tuple[int, ...]]:
  if buckets is None:
    return None
  out = tuple(sorted(int(b) for b in buckets))
  if not out or out[0] <= 0:
    raise ValueError(f"{name} must be a non-empty list of positive lengths, got {buckets!r}.")
  return out


def truncate_logits(logits_NV: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Top-k, then top-p (nucleus) truncation: dropped logits become -inf (fp32).

  top-k keeps the k largest logits (ties at the k-th are all kept); top-p keeps the smallest
  prefix of the descending-sorted distribution whose mass reaches top_p (the token that crosses
  top_p is kept, so at least one token survives; ties at the threshold are all kept).

  Args:
    logits_NV: [N, V] logits, already divided by the temperature.
    top_k: 0 (or >= V) disables it.
    top_p: 1.0 disables it.

  Returns:
    [N, V] float32 logits; softmax of them is the renormalised truncated distribution.
  """
  logits_NV = logits_NV.astype(jnp.float32)
  v = logits_NV.shape[-1]
  if 0 < top_k < v:
    kth_N1 = jax.lax.top_k(logits_NV, top_k)[0][:, -1:]
    logits_NV = jnp.where(logits_NV < kth_N1, -jnp.inf, logits_NV)
  if top_p < 1.0:
    sorted_NV = -jnp.sort(-logits_NV, axis=-1)
    probs_NV = jax.nn.softmax(sorted_NV, axis=-1)
    mass_before_NV = jnp.cumsum(probs_NV, axis=-1) - probs_NV
    keep_NV = mass_before_NV < top_p
    thresh_N1 = jnp.min(jnp.where(keep_NV, sorted_NV, jnp.inf), axis=-1, keepdims=True)
    logits_NV = jnp.where(logits_NV < thresh_N1, -jnp.inf, logits_NV)
  return logits_NV


_CDF_BLOCK = 512


def _first_above(cdf_NK: Array, x_N: Array, valid_NK: Array) -> Array:
  """Index of the first entry of the nondecreasing `cdf_NK` above `x_N`, among `valid_NK`.

  If rounding leaves every entry <= x (x at the very top), the last valid entry: an index with
  zero mass is never returned, since its cdf equals its predecessor's.
  """
  k = cdf_NK.shape[-1]
  first_N = jnp.sum(cdf_NK <= x_N[:, None], axis=-1, dtype=jnp.int32)
  last_valid_N = k - 1 - jnp.argmax(valid_NK[:, ::-1], axis=-1).astype(jnp.int32)
  return jnp.minimum(first_N, last_valid_N)


def categorical(key: Array, logits_NV: Array) -> Array:
  """One draw per row from softmax(logits_NV) by inverse CDF: [N] int32 (one key for all rows)."""
  u_N = jax.random.uniform(key, (logits_NV.shape[0],), jnp.float32)
  return categorical_from_uniform(u_N, logits_NV)


def categorical_from_uniform(u_N: Array, logits_NV: Array) -> Array:
  """Inverse-CDF draw of each row of softmax(logits_NV) at its uniform u_N in [0, 1): [N] int32.

  Same distribution as `jax.random.categorical`, from one uniform per row instead of N * V
  Gumbel variates, whose random bits cost more than the model's matmuls on CPU at N = 128,
  V = 49152. The CDF is taken in blocks of 512 ids (block totals, then within the chosen block)
  because a flat cumsum over V is slower on XLA:CPU. -inf logits
  have zero mass and are never drawn.
  """
  n, v = logits_NV.shape
  logits_NV = logits_NV.astype(jnp.float32)
  p_NV = jnp.exp(logits_NV - jnp.max(logits_NV, axis=-1, keepdims=True))  # unnormalised
  c = _CDF_BLOCK if v > _CDF_BLOCK else v
  pad = -v % c
  p_NBC = jnp.pad(p_NV, ((0, 0), (0, pad))).reshape(n, -1, c)
  mass_NB = jnp.sum(p_NBC, axis=-1)
  cdf_NB = jnp.cumsum(mass_NB, axis=-1)
  x_N = u_N.astype(jnp.float32) * cdf_NB[:, -1]
  b_N = _first_above(cdf_NB, x_N, mass_NB > 0)
  before_N = jnp.take_along_axis(cdf_NB - mass_NB, b_N[:, None], axis=-1)[:, 0]
  block_NC = jnp.take_along_axis(p_NBC, b_N[:, None, None], axis=1)[:, 0]
  j_N = _first_above(jnp.cumsum(block_NC, axis=-1), x_N - before_N, block_NC > 0)
  return b_N * c + j_N


def row_uniforms(key: Array, row_ids_N: Array) -> Array:
  """One uniform per row from `fold_in(key, row id)`: [N] float32.

  A row's draw depends only on its global id, not on the batch it was computed in, so the output
  is the same sharded or not and however the prompts are split into calls.
  """
  return jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), (), jnp.float32))(
      row_ids_N)


def sample_logits(logits_NV: Array, u_N: Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[Array, Array]:
  """Draws one token per row at its uniform u_N [N]; returns (tokens [N] int32, logp [N] f32).

  logp is log softmax(truncate(logits / temperature))[token]: the log-probability under the
  distribution actually sampled from. temperature == 0 is greedy (argmax) and returns the
  temperature-1 log-probability (see the module docstring).
  """
  logits_NV = logits_NV.astype(jnp.float32)
  if temperature == 0.0:
    tokens_N = jnp.argmax(logits_NV, axis=-1).astype(jnp.int32)
    logp_NV = jax.nn.log_softmax(logits_NV, axis=-1)
  else:
    logits_NV = truncate_logits(logits_NV / temperature, top_k=top_k, top_p=top_p)
    tokens_N = categorical_from_uniform(u_N, logits_NV)
    logp_NV = jax.nn.log_softmax(logits_NV, axis=-1)
  logp_N = jnp.take_along_axis(logp_NV, tokens_N[:, None], axis=-1)[:, 0]
  return tokens_N, logp_N


def to_host(x: Any) -> np.ndarray:
  """A global array on the host, whole on every process (an all-gather on several hosts,
  where a process holds only its devices' shards)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def put_host(x: np.ndarray, sharding: jax.sharding.Sharding) -> Array:
  """A host array, the same on every process, as a global array with `sharding`.

  Unlike `jax.device_put` (and numpy arguments to a jit with in_shardings), this also works on
  several hosts, where some of the sharding's devices belong to other processes.
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def as_typed_key(key: Any) -> Array:
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype != jnp.uint32:
    raise ValueError(f"key must be a jax.random.key or uint32 key data, got dtype {key.dtype}.")
  return jax.random.wrap_key_data(key)


def is_eos(tokens: Array, eos_E: np.ndarray) -> Array:
  """Whether each token is one of the EOS ids `eos_E` [E] (all False when there are none)."""
  if not eos_E.size:
    return jnp.zeros(tokens.shape, bool)
  eos = jnp.asarray(eos_E, tokens.dtype).reshape((1,) * tokens.ndim + (-1,))
  return jnp.any(tokens[..., None] == eos, axis=-1)


def _sample_step(i: Any, logits_NV: Array, key: Array, row_ids_N: Array, limit_N: Array,
                 done_N: Array, tokens_NR: Array, logp_NR: Array, mask_NR: Array, *,
                 temperature: float, top_k: int, top_p: float, pad_id: int, eos_E: np.ndarray
                 ) -> tuple[Array, Array, Array, Array, Array]:
  """Decode step i's draw: samples token i of every row from logits [N, V] and writes it.

  Rows already done get pad_id, logp 0 and mask False; a row whose new token is one of
  `eos_E` [E], or its (i + 1)-th token with limit_N [N] = i + 1, is done from then on. Returns
  (tokens [N], done [N], tokens [N, R], logp [N, R], mask [N, R]) with column i written.
  """
  u_N = row_uniforms(jax.random.fold_in(key, i), row_ids_N)
  tok_N, lp_N = sample_logits(logits_NV, u_N, temperature=temperature, top_k=top_k,
                              top_p=top_p)
  active_N = ~done_N
  tok_N = jnp.where(active_N, tok_N, pad_id)
  lp_N = jnp.where(active_N, lp_N, 0.0)
  tokens_NR = jax.lax.dynamic_update_slice(tokens_NR, tok_N[:, None], (0, i))
  logp_NR = jax.lax.dynamic_update_slice(logp_NR, lp_N[:, None], (0, i))
  mask_NR = jax.lax.dynamic_update_slice(mask_NR, active_N[:, None], (0, i))
  done_N = done_N | (active_N & (is_eos(tok_N, eos_E) | (i + 1 >= limit_N)))
  return tok_N, done_N, tokens_NR, logp_NR, mask_NR


def check_sampling_args(group_size: int, max_new_tokens: int, temperature: float,
                         top_p: float, top_k: int) -> None:
  """Raises a clear error on a bad `Sampler.sample` argument."""
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  if not temperature >= 0.0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}.")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}.")


class Sampling(NamedTuple):
  """A call's sampling parameters (see `sample_logits`), a key of its compiled functions."""

  temperature: float
  top_p: float
  top_k: int


class FinishedRows(NamedTuple):
  """Rows whose response is final, on the host (for `Sampler.sample`'s on_rows).

  rows: [K] int the rows' indices in the call's output (prompt i's samples are i*G .. i*G+G-1).
  response_tokens: [K, R] int32, pad_id after the end.
  lengths: [K] int32 response tokens of each row (EOS / stop included).
  """

  rows: np.ndarray
  response_tokens: np.ndarray
  lengths: np.ndarray


def checked_row_limits(row_limits: Optional[Sequence[int]], num_rows: int,
                       max_new_tokens: int) -> np.ndarray:
  """[N] int32 per-row token limits (max_new_tokens everywhere when None); raises on a wrong
  count or a limit outside [1, max_new_tokens]."""
  if row_limits is None:
    return np.full((num_rows,), max_new_tokens, np.int32)
  limits = np.asarray(row_limits, np.int32).reshape(-1)
  if limits.shape != (num_rows,):
    raise ValueError(f"row_limits has {limits.size} entries; pass one per row "
                     f"(prompts x group_size = {num_rows}).")
  if limits.min() < 1 or limits.max() > max_new_tokens:
    raise ValueError(f"row_limits must lie in [1, max_new_tokens={max_new_tokens}], got "
                     f"[{limits.min()}, {limits.max()}].")
  return limits


def left_pad(prompts: list[list[int]], prompt_len: int, pad_id: int
              ) -> tuple[np.ndarray, np.ndarray]:
  """Prompts LEFT-padded with pad_id to prompt_len: (tokens [P, Tp] int32, mask [P, Tp] bool).

  Left padding puts every prompt's last token in the last column (where prefill reads it).
  """
  tokens_PT = np.full((len(prompts), prompt_len), pad_id, np.int32)
  mask_PT = np.zeros((len(prompts), prompt_len), bool)
  for i, p in enumerate(prompts):
    tokens_PT[i, prompt_len - len(p):] = p
    mask_PT[i, prompt_len - len(p):] = True
  return tokens_PT, mask_PT


class Sampler:
  """Batched, grouped sampling from a `Decoder` with a static-shape KV cache.

  Args:
    model: the decoder (its `cfg` fixes the cache shapes and dtype).
    eos_ids: token ids that end a response (any of them); may be empty (then only
      max_new_tokens and stop strings end one).
    pad_id: id written into prompt padding and into response slots after the end.
    mesh: a device mesh (`sharding.make_mesh`); rows are sharded over data/fsdp, the cache's kv
      heads by `sharding.DEFAULT_RULES`, parameters by `decode_param_rules` (gathered over
      data/fsdp, split over tensor; see the module docstring). None = one device.
    prompt_buckets: allowed padded prompt lengths.
    response_buckets: allowed response lengths R; None = R is exactly max_new_tokens.
    stop_strings: strings that end a response (checked on the host, see the module docstring).
    tokenizer: a transformers tokenizer; needed (only) for stop_strings.
    rows_per_call: the most rows (prompts x G) prefilled and decoded together (at least one
      prompt's G); None = all prompts of a `sample` call at once. Bounds the KV cache to
      rows_per_call x (Tp + R) slots; see the module docstring.
    per_layer_cache: decode with one cache buffer per layer and the layers unrolled (see the
      module docstring). None = on CPU only, where the per-step copies of the scan cost ~20%
      of a decode step; on GPU / TPU the scan's smaller program and memory win.
    length_bucket: > 0 trims the response columns of the output to the longest response
      rounded up to a multiple of this (at most R), so later stages skip the padding with
      few distinct shapes; 0 = keep all R columns.
  """

  def __init__(self, model: Decoder, *, eos_ids: Sequence[int], pad_id: int,
               mesh: Optional[Mesh] = None,
               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
               response_buckets: Optional[Sequence[int]] = None,
               stop_strings: Sequence[str] = (), tokenizer: Any = None,
               rows_per_call: Optional[int] = None,
               per_layer_cache: Optional[bool] = None, length_bucket: int = 0):
    self.model = model
    self.cfg = model.cfg
    self.eos_ids = tuple(int(e) for e in eos_ids)
    self.pad_id = int(pad_id)
    vocab = self.cfg.vocab_size
    for name, ids in (("eos_ids", self.eos_ids), ("pad_id", (self.pad_id,))):
      bad = [i for i in ids if not 0 <= i < vocab]
      if bad:
        raise ValueError(f"{name} {bad} outside the vocabulary [0, {vocab}).")
    self.mesh = mesh
    self.prompt_buckets = _check_buckets(prompt_buckets, "prompt_buckets")
    self.response_buckets = _check_buckets(response_buckets, "response_buckets")
    self.stop_strings = tuple(stop_strings)
    if self.stop_strings and tokenizer is None:
      raise ValueError("stop_strings need a tokenizer to decode responses; pass tokenizer=.")
    self.tokenizer = tokenizer
    if rows_per_call is not None and rows_per_call < 1:
      raise ValueError(f"rows_per_call must be >= 1 or None (all at once), got {rows_per_call}.")
    self.rows_per_call = rows_per_call
    if length_bucket < 0:
      raise ValueError(f"length_bucket must be >= 0 (0 = no trimming), got {length_bucket}.")
    self.length_bucket = int(length_bucket)
    self.platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    self.per_layer_cache = (self.platform == "cpu" if per_layer_cache is None
                            else bool(per_layer_cache))
    self.num_traces = 0  # python side effect of tracing: counts (re)compiles, for tests
    self._fns: dict[tuple[Any, ...], tuple[Any, Any]] = {}
    self._param_shardings = None if mesh is None else params_lib.param_shardings(
        self.cfg, mesh, decode_param_rules(self.cfg))

  @property
  def param_shardings(self) -> Any:
    """Where the parameters live while decoding (`decode_param_rules`); None without a mesh."""
    return self._param_shardings

  # ---------------------------------------------------------------- sharding helpers

  def _named(self, logical_axes: Sequence[Optional[str]], shape: Sequence[int]):
    return NamedSharding(self.mesh, sharding.logical_to_spec(tuple(logical_axes), shape,
                                                             self.mesh))

  def _cache_shardings(self, batch_size: int, max_length: int) -> Any:
    abstract = jax.eval_shape(lambda: self._empty_cache(batch_size, max_length))
    axes = KVCache.logical_axes(self.cfg.num_layers if self.per_layer_cache else None)
    return sharding.logical_shardings(abstract, axes, self.mesh)

  def _empty_cache(self, batch_size: int, max_length: int) -> KVCache:
    return KVCache.init(self.cfg, batch_size=batch_size, max_length=max_length,
                        per_layer=self.per_layer_cache)

  def _put(self, x: np.ndarray, logical_axes: Sequence[Optional[str]]) -> Any:
    """A host array for a jitted call: as is without a mesh, else placed in its shards."""
    if self.mesh is None:
      return x
    return put_host(x, self._named(logical_axes, x.shape))

  def _rows(self, x: Array) -> Array:
    """x placed with its rows over the mesh's batch axes (as the decode outputs are)."""
    if self.mesh is None:
      return x
    return jax.device_put(x, self._named(("batch",) + (None,) * (x.ndim - 1), x.shape))

  # ---------------------------------------------------------------- compiled functions

  def lm_logits(self, params: Any, hidden_ND: Array) -> Array:
    """fp32 logits of the last hidden states, computed as `logprobs.token_logprobs` does."""
    w, spec = logprobs_lib.lm_head(params, self.cfg)
    return jnp.einsum(f"nd,{spec}->nv", hidden_ND.astype(self.cfg.dtype),
                      w.astype(self.cfg.dtype), preferred_element_type=jnp.float32)

  def _build(self, *, prompt_len: int, response_len: int, num_prompts: int, group_size: int,
             temperature: float, top_p: float, top_k: int):
    """(prefill, decode) jitted for one bucket / batch / sampling-params key."""
    n = num_prompts * group_size
    max_length = prompt_len + response_len
    prefill = self._prefill_fn(num_prompts, group_size, max_length)
    sample_step = functools.partial(
        _sample_step, temperature=temperature, top_k=top_k, top_p=top_p, pad_id=self.pad_id,
        eos_E=np.asarray(self.eos_ids, np.int32))
    decode = self._decode_fn(n, response_len, sample_step)
    opts = xla_cpu.sampler_options(self.platform)
    if self.mesh is None:
      return (jax.jit(prefill, compiler_options=opts),
              jax.jit(decode, donate_argnums=(1,), compiler_options=opts))
    cache_sh = self._cache_shardings(n, max_length)
    rows_PT = self._named(("batch", None), (num_prompts, prompt_len))
    rows_NV = self._named(("batch", "activation_vocab"), (n, self.cfg.vocab_size))
    rows_NR = self._named(("batch", None), (n, response_len))
    rows_N = self._named(("batch",), (n,))
    rep = NamedSharding(self.mesh, PartitionSpec())
    prefill_fn = jax.jit(prefill, in_shardings=(self._param_shardings, rows_PT, rows_PT),
                         out_shardings=(cache_sh, rows_NV), compiler_options=opts)
    decode_fn = jax.jit(decode, in_shardings=(self._param_shardings, cache_sh, rows_NV, rep, rep,
                                              rep, rows_N),
                        out_shardings=(rows_NR, rows_NR, rows_NR, rows_N, cache_sh),
                        donate_argnums=(1,), compiler_options=opts)
    return prefill_fn, decode_fn

  def _prefill_fn(self, num_prompts: int, group_size: int, max_length: int):
    """The prefill to jit: (params, tokens [P, Tp], mask [P, Tp]) -> (the cache of the P
    prompts repeated G times (N = P * G rows of max_length slots), their next-token fp32
    logits [N, V])."""
    model = self.model

    def prefill(params, tokens_PT, mask_PT):
      self.num_traces += 1
      cache = self._empty_cache(num_prompts, max_length)
      out = model.apply({"params": params}, tokens_PT, mask_BT=mask_PT, cache=cache,
                        cache_is_empty=True, return_hidden=True, compute_logits=False)
      # Left padding puts every prompt's last token in the last column.
      logits_PV = self.lm_logits(params, out.hidden[:, -1])
      logits_NV = jnp.repeat(logits_PV, group_size, axis=0)
      logits_NV = sharding.constrain(logits_NV, ("activation_batch", "activation_vocab"))
      return out.cache.repeat(group_size), logits_NV

    return prefill

  def next_logits(self, params: Any, cache: KVCache, tok_N: Array, done_N: Array
                   ) -> tuple[Array, KVCache]:
    """One decode step of the model: feeds each row's last token [N] (padding for finished
    rows: never attended, leaves their positions alone) through the cache; returns the next
    fp32 logits [N, V] and the extended cache."""
    out = self.model.apply({"params": params}, tok_N[:, None], mask_BT=~done_N[:, None],
                           cache=cache, return_hidden=True, compute_logits=False)
    logits_NV = sharding.constrain(self.lm_logits(params, out.hidden[:, 0]),
                                   ("activation_batch", "activation_vocab"))
    return logits_NV, out.cache

  def _decode_fn(self, n: int, response_len: int, sample_step: Any):
    """The decode loop to jit: (params, cache, logits [N, V], key, max_new_tokens,
    row_offset, limit_N) -> (tokens [N, R], mask [N, R], logp [N, R], truncated [N], cache).

    A `lax.while_loop` of `sample_step` (a bound `_sample_step`) and `next_logits` that
    exits once every row is done (EOS or its limit_N [N] tokens) or max_new_tokens are drawn.
    """
    cfg, pad_id = self.cfg, self.pad_id
    eos_E = np.asarray(self.eos_ids, np.int32)

    def decode(params, cache, logits_NV, key, max_new_tokens, row_offset, limit_N):
      """Tokens 0 .. max_new_tokens-1; step i feeds token i-1, then samples token i."""
      self.num_traces += 1
      row_ids_N = sharding.constrain(row_offset + jnp.arange(n, dtype=jnp.int32),
                                     ("activation_batch",))
      tokens_NR = jnp.full((n, response_len), pad_id, jnp.int32)
      logp_NR = jnp.zeros((n, response_len), jnp.float32)
      mask_NR = jnp.zeros((n, response_len), bool)
      done_N = jnp.zeros((n,), bool)
      tok_N, done_N, tokens_NR, logp_NR, mask_NR = sample_step(
          0, logits_NV, key, row_ids_N, limit_N, done_N, tokens_NR, logp_NR, mask_NR)

      def cond(carry):
        i, _, _, done_N, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done_N)

      def body(carry):
        i, cache, tok_N, done_N, tokens_NR, logp_NR, mask_NR = carry
        logits_NV, cache = self.next_logits(params, cache, tok_N, done_N)
        tok_N, done_N, tokens_NR, logp_NR, mask_NR = sample_step(
            i, logits_NV, key, row_ids_N, limit_N, done_N, tokens_NR, logp_NR, mask_NR)
        return i + 1, cache, tok_N, done_N, tokens_NR, logp_NR, mask_NR

      if cache.per_layer:
        params = unstack_layer_params(params, cfg.num_layers)
      carry = (jnp.int32(1), cache, tok_N, done_N, tokens_NR, logp_NR, mask_NR)
      _, cache, _, done_N, tokens_NR, logp_NR, mask_NR = jax.lax.while_loop(cond, body, carry)
      truncated_N = ~jnp.any(mask_NR & is_eos(tokens_NR, eos_E), axis=1)  # no EOS drawn
      # The cache is returned so its donated input buffers can be reused in place.
      return tokens_NR, mask_NR, logp_NR, truncated_N, cache

    return decode

  # ---------------------------------------------------------------- public API

  def sample(self, params: Any, prompts: Sequence[Sequence[int]], key: Any, *, group_size: int,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, row_limits: Optional[Sequence[int]] = None,
             on_rows: Optional[Callable[[FinishedRows], None]] = None) -> SampleOutput:
    """G samples of each prompt; deterministic for a key.

    Args:
      params: decoder parameters (placed into the mesh's parameter shardings if one is set).
      prompts: host token id lists (no padding), at least one token each.
      key: a `jax.random.key` (or its uint32 key data).
      group_size: G, samples per prompt (rows i*G .. i*G+G-1 belong to prompt i).
      max_new_tokens: the most tokens generated per row (EOS included).
      temperature: > 0 samples from softmax(logits / temperature); 0 is greedy.
      top_p: nucleus mass in (0, 1]; 1 = off (keep it off for training rollouts).
      top_k: keep the k most likely tokens; 0 = off (keep it off for training rollouts).
      row_limits: [N] the most tokens of each row, each in [1, max_new_tokens] (a row that
        reaches its limit without EOS is truncated); None = max_new_tokens for every row.
      on_rows: called on the host with finished rows (`FinishedRows`, stop strings applied)
        as they become final, e.g. to verify them while others decode; here once, with every
        row, at the end (`continuous.ContinuousSampler` calls it as rows finish).

    Returns:
      SampleOutput with N = len(prompts) * group_size rows (device arrays).
    """
    prompts, limits_N, prompt_len, response_len, sampling = self._setup(
        prompts, group_size, max_new_tokens, temperature, top_p, top_k, row_limits)
    num_prompts = len(prompts)
    per_call, num_calls = self._chunking(num_prompts, group_size)
    # The last chunk is padded with copies of the first prompt (rows dropped below), so every
    # chunk runs the same compiled functions.
    prompts = prompts + [prompts[0]] * (num_calls * per_call - num_prompts)
    limits_N = np.pad(limits_N, (0, (num_calls * per_call - num_prompts) * group_size),
                      constant_values=1)
    fns = self._compiled_fns(prompt_len=prompt_len, response_len=response_len,
                             num_prompts=per_call, group_size=int(group_size),
                             **sampling._asdict())
    tokens_PT, mask_PT = left_pad(prompts, prompt_len, self.pad_id)
    tokens_NR, mask_NR, logp_NR, truncated_N = self._run_chunks(
        params, fns, tokens_PT, mask_PT, as_typed_key(key), max_new_tokens, limits_N,
        per_call=per_call, num_calls=num_calls, num_rows=num_prompts * group_size,
        group_size=group_size)

    rows = tokens_NR.sharding  # the prompt side goes where the response rows are
    take = lambda x: np.repeat(x[:num_prompts], group_size, axis=0)
    out = SampleOutput(
        prompt_tokens=put_host(take(tokens_PT), rows),
        prompt_mask=put_host(take(mask_PT), rows),
        response_tokens=tokens_NR, response_mask=mask_NR, logp=logp_NR,
        truncated=truncated_N, lengths=jnp.sum(mask_NR, axis=1, dtype=jnp.int32))
    if self.stop_strings:
      out = apply_stop_strings(out, stop_strings=self.stop_strings, tokenizer=self.tokenizer,
                               pad_id=self.pad_id)
    out = self.trimmed(out)
    if on_rows is not None:
      on_rows(FinishedRows(rows=np.arange(num_prompts * group_size),
                           response_tokens=to_host(out.response_tokens),
                           lengths=to_host(out.lengths)))
    return out

  def _setup(self, prompts: Sequence[Sequence[int]], group_size: int, max_new_tokens: int,
             temperature: float, top_p: float, top_k: int,
             row_limits: Optional[Sequence[int]]
             ) -> tuple[list[list[int]], np.ndarray, int, int, Sampling]:
    """A `sample` call's checked inputs: (prompts, row limits [N], prompt bucket Tp, response
    length R, sampling parameters); raises a clear error on a bad one."""
    prompts = self._checked_prompts(prompts)
    check_sampling_args(group_size, max_new_tokens, temperature, top_p, top_k)
    limits_N = checked_row_limits(row_limits, len(prompts) * group_size, max_new_tokens)
    prompt_len, response_len = self._bucket_lengths(prompts, max_new_tokens)
    if temperature == 0.0:  # greedy ignores truncation: the argmax survives any of it
      top_p, top_k = 1.0, 0
    return (prompts, limits_N, prompt_len, response_len,
            Sampling(float(temperature), float(top_p), int(top_k)))

  def trimmed_width(self, lengths_N: np.ndarray, response_len: int) -> int:
    """Response columns kept: the longest length rounded up to `length_bucket` (<= R)."""
    if not self.length_bucket:
      return response_len
    longest = max(1, int(np.max(lengths_N)))
    return min(response_len, -(-longest // self.length_bucket) * self.length_bucket)

  def trimmed(self, out: SampleOutput) -> SampleOutput:
    """`out` with its response columns cut to `trimmed_width` (nothing past a row's end is
    dropped: those columns are padding)."""
    r = out.response_tokens.shape[1]
    width = self.trimmed_width(to_host(out.lengths), r)
    if width == r:
      return out
    cut = lambda x: self._rows(x[:, :width])
    return out.replace(response_tokens=cut(out.response_tokens),
                       response_mask=cut(out.response_mask), logp=cut(out.logp))

  def _checked_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """The prompts as lists of Python ints; raises on none, an empty one, or ids outside the
    vocabulary."""
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
      raise ValueError("prompts is empty; pass at least one prompt.")
    if any(len(p) == 0 for p in prompts):
      raise ValueError("Every prompt needs at least one token (e.g. BOS) to condition on.")
    vocab = self.cfg.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"Prompt token ids {sorted(set(bad))[:5]} are outside [0, {vocab}).")
    return prompts

  def _bucket_lengths(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[int, int]:
    """(prompt bucket Tp fitting the longest prompt, response length R >= max_new_tokens)."""
    prompt_len = _pick_bucket(max(len(p) for p in prompts), self.prompt_buckets,
                              "A prompt length", "shorten the prompt or add a larger bucket to "
                              "prompt_buckets")
    if self.response_buckets is None:
      response_len = int(max_new_tokens)
    else:
      response_len = _pick_bucket(int(max_new_tokens), self.response_buckets, "max_new_tokens",
                                  "lower it or add a larger bucket to response_buckets")
    return prompt_len, response_len

  def _chunking(self, num_prompts: int, group_size: int) -> tuple[int, int]:
    """(prompts per prefill / decode call, number of calls) under `rows_per_call`."""
    per_call = num_prompts
    if self.rows_per_call is not None:
      per_call = min(max(1, self.rows_per_call // int(group_size)), num_prompts)
    return per_call, -(-num_prompts // per_call)

  def _compiled_fns(self, *, prompt_len: int, response_len: int, num_prompts: int,
                    group_size: int, temperature: float, top_p: float, top_k: int
                    ) -> tuple[Any, Any]:
    """(prefill, decode) of `_build`, built once per key of its arguments (then cached)."""
    fn_key = (prompt_len, response_len, num_prompts, group_size, temperature, top_p, top_k)
    if fn_key not in self._fns:
      self._fns[fn_key] = self._build(
          prompt_len=prompt_len, response_len=response_len, num_prompts=num_prompts,
          group_size=group_size, temperature=temperature, top_p=top_p, top_k=top_k)
    return self._fns[fn_key]

  def _run_chunks(self, params: Any, fns: tuple[Any, Any], tokens_PT: np.ndarray,
                  mask_PT: np.ndarray, key: Array, max_new_tokens: int, limits_N: np.ndarray,
                  *, per_call: int, num_calls: int, num_rows: int, group_size: int
                  ) -> tuple[Array, Array, Array, Array]:
    """Prefills and decodes the left-padded prompts [num_calls * per_call, Tp] in num_calls
    chunks of per_call prompts (row limits [num_calls * per_call * G]); returns the first
    num_rows rows of (tokens [N, R], mask [N, R], logp [N, R], truncated [N]), the chunks'
    rows concatenated."""
    prefill_fn, decode_fn = fns
    max_new = np.int32(max_new_tokens)
    rows_per_call = per_call * group_size
    if self.mesh is not None:
      params = jax.device_put(params, self._param_shardings)
    outs = []
    with sharding.use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      for c in range(num_calls):
        chunk = slice(c * per_call, (c + 1) * per_call)
        cache, logits_NV = prefill_fn(params, self._put(tokens_PT[chunk], ("batch", None)),
                                      self._put(mask_PT[chunk], ("batch", None)))
        rows = slice(c * rows_per_call, (c + 1) * rows_per_call)
        outs.append(decode_fn(params, cache, logits_NV, key, max_new,
                              np.int32(c * rows_per_call),
                              self._put(limits_N[rows], ("batch",)))[:4])
        del cache  # donated
    if num_calls == 1:
      return outs[0]
    return tuple(self._rows(jnp.concatenate(parts, axis=0)[:num_rows]) for parts in zip(*outs))


def _stop_index(ids: list[int], stop_strings: Sequence[str], tokenizer: Any) -> Optional[int]:
  """Tokens up to and including the one that completes the first stop string (None: no stop)."""
  def hit(k):
    text = tokenizer.decode(ids[:k], skip_special_tokens=False)
    return any(s in text for s in stop_strings)

  if not ids or not hit(len(ids)):
    return None
  lo, hi = 1, len(ids)  # smallest k with hit(k); containment only grows with the prefix
  while lo < hi:
    mid = (lo + hi) // 2
    if hit(mid):
      hi = mid
    else:
      lo = mid + 1
  return lo


def cut_at_stop_strings(tok_NR: np.ndarray, msk_NR: np.ndarray, lp_NR: np.ndarray,
                        trunc_N: np.ndarray, *, stop_strings: Sequence[str], tokenizer: Any,
                        pad_id: int) -> None:
  """Cuts each host row, in place, after the token that completes its first stop string.

  That token stays (like an EOS); later ones become pad_id with mask False and logp 0, and the
  row is no longer truncated. Binary search over decoded prefixes: O(log R) decodes per row.
  """
  for r in range(tok_NR.shape[0]):
    k = _stop_index(tok_NR[r, msk_NR[r]].tolist(), stop_strings, tokenizer)  # mask: a prefix
    if k is not None:
      msk_NR[r, k:] = False
      tok_NR[r, k:] = pad_id
      lp_NR[r, k:] = 0.0
      trunc_N[r] = False


def apply_stop_strings(out: SampleOutput, *, stop_strings: Sequence[str], tokenizer: Any,
                       pad_id: int) -> SampleOutput:
  """`cut_at_stop_strings` of a `SampleOutput` (host side; the arrays go back where they were)."""
  tok, msk = to_host(out.response_tokens).copy(), to_host(out.response_mask).copy()
  lp, trunc = to_host(out.logp).copy(), to_host(out.truncated).copy()
  cut_at_stop_strings(tok, msk, lp, trunc, stop_strings=stop_strings, tokenizer=tokenizer,
                      pad_id=pad_id)
  put = lambda new, old: put_host(new, old.sharding)
  return out.replace(response_tokens=put(tok, out.response_tokens),
                     response_mask=put(msk, out.response_mask), logp=put(lp, out.logp),
                     truncated=put(trunc, out.truncated),
                     lengths=put(msk.sum(axis=1).astype(np.int32), out.lengths))
