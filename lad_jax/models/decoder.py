"""Flax (linen) decoder for the Llama / Qwen2 family, with a static-size KV cache.

  cfg = ModelConfig.from_hf(model_dir)
  model = Decoder(cfg)
  out = model.apply({"params": params}, tokens_BT, mask_BT=mask_BT)        # full forward
  logits_BTV, cache, hidden_BTD = out   # DecoderOutput; cache None here, hidden only with
                                        # return_hidden=True (FlowRL's last hidden state)

  cache = KVCache.init(cfg, batch_size=B, max_length=S)
  out = model.apply({"params": params}, prompt_BT, mask_BT=prompt_mask_BT, cache=cache)   # prefill
  out = model.apply({"params": params}, next_B1, cache=out.cache)                        # decode

Parameter names mirror the Hugging Face checkpoints (`embed_tokens`, `layers/self_attn/q_proj`,
...); the layers are one `nn.scan`, so every layer parameter has a leading [L] axis.

Masking: `mask_BT` is 0/False on padding; other values are segment ids, and a token attends to
earlier (causal) non-padding tokens of its own segment only. A bool mask is one segment per row.
Positions (for RoPE) default to the number of non-padding tokens before each token in its row
(continuing from the cache), which makes left- and right-padded prompts of different lengths
give the same result as the unpadded ones. Packed rows need explicit `positions_BT`.

KV cache (`kv_cache.KVCache`): tokens are written at slots [index, index + T), one index for all
rows ("lock step") or one per row (`per_row_index`: continuous batching, rows of different
lengths in one batch);
the layers only read the cache (attention over its S slots, empty / padding ones masked out, and
over the T new tokens, in one softmax) and the new keys / values of every layer are written in
one in-place update after the layer scan. A per-layer cache (`KVCache.init(per_layer=True)`)
runs the layers unrolled instead, each writing its new slots into its own buffer and then
reading it (no per-step copy of the layer's cache out of a stacked one; see
`Decoder._unrolled_layers`). With `cfg.decode_block_size` > 0 (the default) a cached step reads
only written slots (`decode_attention`: each row its own blocks, or the prefix window of the
longest row, `cfg.decode_attention`), and the stacked cache is a carry of the layer scan that
each layer writes, then reads (`Decoder._scanned_cached_layers`); 0 = the whole bucket, as
described above. The caller must keep index + T <= S (static shapes inside jit cannot raise).
`KVCache.repeat(G)` copies each prompt's cache to G samples. Without a cache (or with an empty
one), the tokens attend among themselves through `lad_jax.models.attention`
(`cfg.attention_impl`), by segment ids: no [T, T] mask.

Precision: parameters in `cfg.param_dtype`, matmuls in `cfg.dtype` with float32 accumulation
(the projections' results, forward and backward, rounded to `cfg.dtype`; attention scores and
logits kept in float32); RMSNorm, RoPE and softmax in float32.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lad_jax import sharding
from lad_jax.models import attention
from lad_jax.models import decode_attention
from lad_jax.models import kv_cache
from lad_jax.models import rope
from lad_jax.models.config import ModelConfig

Array = jax.Array

# Logical axes of activations at block edges.
ACT_BTD = ("activation_batch", "activation_length", "activation_embed")
ACT_BTNH = ("activation_batch", "activation_length", "activation_heads", None)
ACT_BKTH = ("activation_batch", "activation_kv_heads", "activation_length", None)
ACT_BTF = ("activation_batch", "activation_length", "activation_mlp")
ACT_BTV = ("activation_batch", "activation_length", "activation_vocab")
CACHE_BKSH = kv_cache.CACHE_BKSH
CACHE_BKHS = kv_cache.CACHE_BKHS
KVCache = kv_cache.KVCache
write_slots = kv_cache.write_slots


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderOutput(NamedTuple):
  """logits [B, T, V] (None if compute_logits=False), the updated cache (None without one),
  and the final-norm hidden states [B, T, D] (None unless return_hidden=True)."""

  logits: Optional[Array]
  cache: Optional[KVCache]
  hidden: Optional[Array]


class LogicalAxes(nn.LogicallyPartitioned):
  """Logical axis names of a parameter, read by `nn.get_partition_spec`.

  Unlike flax's `LogicallyPartitioned`, unboxing never adds a sharding constraint: flax's
  would use its rules without checking divisibility (9 heads on tensor=2 fail). Placement is
  done by jit in/out shardings from `sharding.logical_shardings`, which drops uneven axes.
  """

  def unbox(self, apply_constraint: bool = True) -> Any:
    del apply_constraint
    return self.value


def _init(cfg: ModelConfig, axes: tuple[Optional[str], ...], kind: str = "normal"):
  if kind == "normal":
    base = nn.initializers.normal(stddev=cfg.initializer_range)
  elif kind == "ones":
    base = nn.initializers.ones
  else:
    base = nn.initializers.zeros
  return lambda *args: LogicalAxes(base(*args), names=axes)


class RMSNorm(nn.Module):
  """y = x / rms(x) * scale, normalised in float32 (as HF does), scaled in the compute dtype."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.cfg
    scale_D = self.param("scale", _init(cfg, ("norm",), "ones"), (x_BTD.shape[-1],),
                         jnp.dtype(cfg.param_dtype))
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.rms_norm_eps)
    return x.astype(cfg.dtype) * scale_D.astype(cfg.dtype)[None, None, :]


def _contract_trailing(x: Array, kernel: Array, n_in: int, preferred: Any,
                       out_dtype: Any = None) -> Array:
  contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
  y = jax.lax.dot_general(x, kernel, (contract, ((), ())), preferred_element_type=preferred)
  return y if out_dtype is None else y.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def project(x: Array, kernel: Array, n_in: int, preferred: Any = None,
            out_dtype: Any = None) -> Array:
  """y[..., out] = x[..., in] . kernel[in, out] over the trailing n_in dims of x, accumulated in
  `preferred` (dot_general's preferred_element_type), then cast to out_dtype (None: keep).

  The same values and gradients as `jax.lax.dot_general` (+ astype), but the kernel gradient
  is computed as dot(x, dy) (contracting the token dims) instead of JAX's dot(dy, x) followed
  by a transpose, and the backward matmuls accumulate in `preferred` too. XLA:CPU's matmul
  library wants the contracting dim last on the left, so it materialises a transposed copy of
  the left operand: of the small layer input x here, instead of the gradient dy, which it
  fused with the gradient's elementwise producer (the SwiGLU derivative) into a strided loop
  that cost more than the matmul (timings: the README's train-step results). GPU and TPU
  backends fold operand transposes into their matmuls, so the order should not matter there.

  Remat policies see the forward dot_general (differentiation inlines the forward rule), so
  "dots" still saves its output.
  """
  return _contract_trailing(x, kernel, n_in, preferred, out_dtype)


def _project_fwd(x, kernel, n_in, preferred, out_dtype):
  return _contract_trailing(x, kernel, n_in, preferred, out_dtype), (x, kernel)


def _project_bwd(n_in, preferred, out_dtype, res, dy):
  del out_dtype  # dy comes in that dtype
  x, kernel = res
  batch = tuple(range(x.ndim - n_in))
  out = tuple(range(len(batch), dy.ndim))
  dx = jax.lax.dot_general(dy, kernel, ((out, tuple(range(n_in, kernel.ndim))), ((), ())),
                           preferred_element_type=preferred)
  dkernel = jax.lax.dot_general(x, dy, ((batch, batch), ((), ())),
                                preferred_element_type=preferred)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


project.defvjp(_project_fwd, _project_bwd)


class Linear(nn.Module):
  """y = x @ kernel (+ bias) contracting the trailing `len(in_shape)` dims of x.

  kernel has shape in_shape + out_shape with logical axes in_axes + out_axes (torch's [out, in]
  weight transposed, with heads split out), so head-sharded projections need no reshape. The
  product is `project` (a cheaper kernel gradient on CPU).
  """

  cfg: ModelConfig
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  in_axes: tuple[Optional[str], ...]
  out_axes: tuple[Optional[str], ...]
  use_bias: bool = False
  fp32_accumulation: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    pdt = jnp.dtype(cfg.param_dtype)
    kernel = self.param("kernel", _init(cfg, self.in_axes + self.out_axes),
                        self.in_shape + self.out_shape, pdt)
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    dtype = jnp.dtype(cfg.dtype)
    # Low-precision products accumulate in float32 and round once (XLA:CPU's bf16 matmul runs
    # natively only with a float32 result: 2x the float32 speed, vs converting both inputs).
    low = dtype.itemsize < 4
    preferred = jnp.float32 if (low or self.fp32_accumulation) else None
    out_dtype = dtype if (low and not self.fp32_accumulation) else None
    y = project(x.astype(dtype), kernel.astype(dtype), n_in, preferred, out_dtype)
    if self.use_bias:
      bias = self.param("bias", _init(cfg, self.out_axes, "zeros"), self.out_shape, pdt)
      y = y + bias.astype(cfg.dtype).reshape((1,) * (y.ndim - n_out) + self.out_shape)
    return y


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.cfg
    d, f = (cfg.hidden_size,), (cfg.intermediate_size,)
    gate = Linear(cfg, d, f, ("embed",), ("mlp",), name="gate_proj")(x_BTD)
    up = Linear(cfg, d, f, ("embed",), ("mlp",), name="up_proj")(x_BTD)
    h_BTF = sharding.constrain(nn.silu(gate) * up, ACT_BTF)
    return Linear(cfg, f, d, ("mlp",), ("embed",), name="down_proj")(h_BTF)


def _mask_bias(mask_BTS: Array) -> Array:
  """0 where attended, attention.MASK_VALUE elsewhere, float32, broadcast over [B, K, G, T, S] scores.

  An additive bias made once per [B, T, S] (not per head) fuses into the softmax far better
  than a select on the broadcast mask (~1.7x faster softmax on XLA:CPU).
  """
  return jnp.where(mask_BTS, 0.0, attention.MASK_VALUE).astype(jnp.float32)[:, None, None]


def _attend_einsum(q_BTNH: Array, k_BKSH: Array, v_BKSH: Array, mask_BTS: Array,
                   cfg: ModelConfig, keys_hs: bool = False) -> Array:
  """Grouped-query attention without repeating k/v: queries grouped [B, K, G, T, H].

  Head-major operands keep both einsums plain batched matmuls (batch b, k); XLA:CPU runs the
  token-major spelling ("btkgh,bskh->...") about 4x slower. keys_hs: keys come as [B, K, H, S]
  (the cache layout).
  """
  scores_BKGTS = jnp.einsum("bkgth,bkhs->bkgts" if keys_hs else "bkgth,bksh->bkgts",
                            attention.group_queries(q_BTNH, cfg.num_kv_heads), k_BKSH,
                            preferred_element_type=jnp.float32) + _mask_bias(mask_BTS)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BKSH.dtype)
  return attention.ungroup(jnp.einsum("bkgts,bksh->bkgth", probs_BKGTS, v_BKSH))


def _attend_cached_einsum(q_BTNH: Array, k_BKHS: Array, v_BKSH: Array, mask_BTS: Array,
                          kn_BKTH: Array, vn_BKTH: Array, mask_BTT: Array,
                          cfg: ModelConfig) -> Array:
  """Attention over a read-only cache (keys [B, K, H, S], values [B, K, S, H]) plus the T new
  keys and values [B, K, T, H].

  One softmax over both key sets, but the cache is never concatenated with (or updated before)
  the new keys: writing the new slots into each layer's cache inside the layer scan made XLA
  copy the whole cache every decode step, which cost 3x the model's matmuls on CPU.
  """
  s = k_BKHS.shape[3]
  q_BKGTH = attention.group_queries(q_BTNH, cfg.num_kv_heads)
  old_BKGTS = jnp.einsum("bkgth,bkhs->bkgts", q_BKGTH, k_BKHS,
                         preferred_element_type=jnp.float32) + _mask_bias(mask_BTS)
  new_BKGTT = jnp.einsum("bkgth,bkuh->bkgtu", q_BKGTH, kn_BKTH,
                         preferred_element_type=jnp.float32) + _mask_bias(mask_BTT)
  probs = jax.nn.softmax(jnp.concatenate([old_BKGTS, new_BKGTT], axis=-1), axis=-1)
  probs = probs.astype(v_BKSH.dtype)
  return attention.ungroup(jnp.einsum("bkgts,bksh->bkgth", probs[..., :s], v_BKSH)
                           + jnp.einsum("bkgtu,bkuh->bkgth", probs[..., s:], vn_BKTH))


def _attend_no_cache(q_BTNH: Array, k_BKTH: Array, v_BKTH: Array, seg_BT: Array,
                     cfg: ModelConfig) -> Array:
  """Attention of T tokens among themselves (no cache, or an empty one): [B, T, N, H].

  By segment ids [B, T] (0 = padding), never a [B, T, T] mask: `attention.attend` with
  `cfg.attention_impl` (blockwise / cuDNN / splash keep memory linear in T).
  """
  return attention.attend(q_BTNH, k_BKTH, v_BKTH, seg_BT, cfg)


def reads_prefix_window(cfg: ModelConfig, cache_slots: int) -> bool:
  """Whether a cached step reads only written slots (`decode_attention`: a prefix window or
  each row's blocks, `cfg.decode_attention`): with `cfg.decode_block_size` > 0 and a cache of
  more than two blocks. A cache of one or two blocks is read whole: there the window's switch
  and slot masks cost about what the unwritten slots it skips do (SmolLM2, 16 x 8 rows, a
  192-slot cache on CPU ran at 0.76x the whole-cache speed with the earlier block-loop
  reader)."""
  return cfg.decode_block_size > 0 and cache_slots > 2 * cfg.decode_block_size


def _attend_written_slots(q_BKGTH: Array, k: Array, v: Array, mask: decode_attention.SlotMask,
                          cfg: ModelConfig, **kwargs: Any) -> Array:
  """`decode_attention.attend_auto`, `attend_ragged` or `attend_prefix` (cfg.decode_attention)
  over a cache (k [(L,) B, K, H, S], v [(L,) B, K, S, H]); ragged rows are split by the mesh's
  batch shards."""
  if cfg.decode_attention in ("auto", "ragged"):
    attend = (decode_attention.attend_auto if cfg.decode_attention == "auto"
              else decode_attention.attend_ragged)
    return attend(q_BKGTH, k, v, mask, block_size=cfg.decode_block_size,
                  row_groups=_row_groups(q_BKGTH.shape[0]), **kwargs)
  return decode_attention.attend_prefix(q_BKGTH, k, v, mask, block_size=cfg.decode_block_size,
                                        **kwargs)


def _row_groups(batch: int) -> int:
  """Row groups of a ragged read: the mesh's shards of the cache rows (1 without a mesh)."""
  return sharding.num_shards("cache_batch", batch)


def _attend_written_cache(q_BTNH: Array, k_BKTH: Array, v_BKTH: Array,
                          layer_cache: tuple[Array, Array, Array],
                          mask: decode_attention.SlotMask, cfg: ModelConfig
                          ) -> tuple[Array, tuple[Array, Array]]:
  """Per-layer cache: writes the new keys / values [B, K, T, H] at slots [index, index + T) of
  the layer's own (k [B, K, H, S], v [B, K, S, H], index) (index [] or per row [B]), then
  attends over the cache alone (`mask` covers the new slots). Returns (out [B, T, N, H], the
  written (k, v)).

  Write first, then read: a write after the read made XLA copy each layer's buffer twice per
  step (see `Decoder._unrolled_layers`).
  """
  ck, cv, index = layer_cache
  ck = write_slots(ck, k_BKTH.transpose(0, 1, 3, 2), index, batch_axis=0, slot_axis=3)
  cv = write_slots(cv, v_BKTH, index, batch_axis=0, slot_axis=2)
  ck = sharding.constrain(ck, CACHE_BKHS)
  cv = sharding.constrain(cv, CACHE_BKSH)
  if reads_prefix_window(cfg, ck.shape[-1]):
    q_BKGTH = attention.group_queries(q_BTNH, cfg.num_kv_heads)
    out_BTNH = attention.ungroup(_attend_written_slots(q_BKGTH, ck, cv, mask, cfg))
  else:
    out_BTNH = _attend_einsum(q_BTNH, ck.astype(cfg.dtype), cv.astype(cfg.dtype), mask.full(),
                              cfg, keys_hs=True)
  return out_BTNH, (ck, cv)


def _attend_stacked_cache_window(q_BTNH: Array, k_BKTH: Array, v_BKTH: Array,
                                 layer_cache: decode_attention.StackedLayerCache,
                                 mask: decode_attention.SlotMask, mask_new_BTT: Array,
                                 cfg: ModelConfig) -> tuple[Array, tuple[Array, Array]]:
  """Stacked cache, read in a prefix window (`decode_attention`): writes the new keys /
  values [B, K, T, H] at slots [index, index + T) of the layer's part of the stacked [L, ...]
  cache, then attends over its written slots before index (`mask`) and the T new tokens
  (`mask_new_BTT`, from registers) in one softmax, so the work follows the index, not the
  bucket S. Returns (out [B, T, N, H], the written stacked (k, v)).

  Write first, then read the written buffer: the read depends on the write, so XLA updates
  the cache (a loop carry of the layer scan) in place instead of copying it.
  """
  kc, vc, layer, index = layer_cache
  kc = write_slots(kc, k_BKTH.transpose(0, 1, 3, 2), index, batch_axis=1, slot_axis=4,
                   layer=layer)
  vc = write_slots(vc, v_BKTH, index, batch_axis=1, slot_axis=3, layer=layer)
  # Rounded to the cache dtype, as when read back from the cache later.
  k_BKTH = k_BKTH.astype(kc.dtype).astype(k_BKTH.dtype)
  v_BKTH = v_BKTH.astype(vc.dtype).astype(v_BKTH.dtype)
  q_BKGTH = attention.group_queries(q_BTNH, cfg.num_kv_heads)
  out_BKGTH = _attend_written_slots(q_BKGTH, kc, vc, mask, cfg, layer=layer,
                                    new=(k_BKTH.transpose(0, 1, 3, 2), v_BKTH, mask_new_BTT))
  return attention.ungroup(out_BKGTH), (kc, vc)


def _attend_read_only_cache(q_BTNH: Array, k_BKTH: Array, v_BKTH: Array,
                            layer_cache: tuple[Array, Array], mask: decode_attention.SlotMask,
                            mask_new_BTT: Array, cfg: ModelConfig
                            ) -> tuple[Array, Array, Array]:
  """Stacked cache: attends over the layer's read-only cache (k [B, K, H, S], v [B, K, S, H],
  masked by `mask`) and the T new tokens (`mask_new_BTT`) in one softmax.

  Returns (out [B, T, N, H], k [B, K, T, H], v [B, K, T, H]): the new keys / values rounded
  to the cache dtype, which the decoder writes into the cache after the layer scan.
  """
  ck = sharding.constrain(layer_cache[0], CACHE_BKHS).astype(cfg.dtype)
  cv = sharding.constrain(layer_cache[1], CACHE_BKSH).astype(cfg.dtype)
  # Rounded to the cache dtype, so attending to a token now and later from the cache gives
  # the same result.
  k_BKTH = k_BKTH.astype(layer_cache[0].dtype).astype(k_BKTH.dtype)
  v_BKTH = v_BKTH.astype(layer_cache[1].dtype).astype(v_BKTH.dtype)
  out_BTNH = _attend_cached_einsum(q_BTNH, ck, cv, mask.full(), k_BKTH, v_BKTH, mask_new_BTT,
                                   cfg)
  return out_BTNH, k_BKTH, v_BKTH


class Attention(nn.Module):
  """GQA self-attention with RoPE, optional q/k/v (and o) bias, optional KV cache.

  return_kv: also return the new tokens' (k [B, K, H, T], v [B, K, T, H]) in the cache layout
  (set whenever the decoder has a cache, even an empty one it does not read).

  layer_cache is (k [B, K, H, S], v [B, K, S, H]) to read (the new tokens are attended
  separately, `mask_new_BTT`), or (k, v, index) of a per-layer cache: the new tokens are first
  written at slots [index, index + T), then attention reads the cache alone (`mask` covers
  the new slots) and the written (k, v) are returned instead of the new tokens'.
  """

  cfg: ModelConfig
  return_kv: bool = False

  @nn.compact
  def __call__(self, x_BTD: Array, sin_BTh: Array, cos_BTh: Array, mask: Any,
               mask_new_BTT: Optional[Array], layer_cache: Optional[tuple[Array, Array]]
               ) -> tuple[Array, Optional[tuple[Array, Array]]]:
    """With a cache, `mask` (a `decode_attention.SlotMask`) masks its S slots and
    `mask_new_BTT` the T new tokens; without one, `mask` is the new tokens' [B, T] segment ids
    (see `_Masks`)."""
    cfg = self.cfg
    q_BTNH, k_BKTH, v_BKTH = self._qkv(x_BTD, sin_BTh, cos_BTh)
    if isinstance(layer_cache, decode_attention.StackedLayerCache):  # write, then read
      out_BTNH, new_kv = _attend_stacked_cache_window(q_BTNH, k_BKTH, v_BKTH, layer_cache,
                                                      mask, mask_new_BTT, cfg)
    elif layer_cache is not None and len(layer_cache) == 3:  # per-layer: write, then read
      out_BTNH, new_kv = _attend_written_cache(q_BTNH, k_BKTH, v_BKTH, layer_cache, mask,
                                               cfg)
    else:
      if layer_cache is None:
        out_BTNH = _attend_no_cache(q_BTNH, k_BKTH, v_BKTH, mask, cfg)
      else:
        out_BTNH, k_BKTH, v_BKTH = _attend_read_only_cache(q_BTNH, k_BKTH, v_BKTH, layer_cache,
                                                           mask, mask_new_BTT, cfg)
      new_kv = (k_BKTH.transpose(0, 1, 3, 2), v_BKTH) if self.return_kv else None
    out_BTNH = sharding.constrain(out_BTNH, ACT_BTNH)
    out = Linear(cfg, (cfg.num_heads, cfg.head_dim), (cfg.hidden_size,), ("q_heads", "head_dim"),
                 ("embed",), cfg.o_bias, name="o_proj")(out_BTNH)
    return out, new_kv

  def _qkv(self, x_BTD: Array, sin_BTh: Array, cos_BTh: Array) -> tuple[Array, Array, Array]:
    """Projections with RoPE: q [B, T, N, H] (pre-scaled by H^-1/2), k and v [B, K, T, H]."""
    cfg = self.cfg
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = Linear(cfg, (d,), (n, h), ("embed",), ("q_heads", "head_dim"), cfg.qkv_bias,
               name="q_proj")(x_BTD)
    kk = Linear(cfg, (d,), (k, h), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias,
                name="k_proj")(x_BTD)
    v = Linear(cfg, (d,), (k, h), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias,
               name="v_proj")(x_BTD)
    # Scaling q (T*N*H values) is cheaper than scaling the scores (T*S*N).
    q_BTNH = sharding.constrain(
        rope.apply_rope(q * jnp.asarray(h ** -0.5, q.dtype), sin_BTh, cos_BTh), ACT_BTNH)
    k_BKTH = sharding.constrain(
        rope.apply_rope(kk, sin_BTh, cos_BTh).transpose(0, 2, 1, 3), ACT_BKTH)
    v_BKTH = sharding.constrain(v.transpose(0, 2, 1, 3), ACT_BKTH)
    return q_BTNH, k_BKTH, v_BKTH


class Block(nn.Module):
  """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x)). Scanned over layers."""

  cfg: ModelConfig
  return_kv: bool = False

  @nn.compact
  def __call__(self, x_BTD: Array, layer_cache: Optional[tuple[Array, Array]],
               sin_BTh: Array, cos_BTh: Array, mask: Any,
               mask_new_BTT: Optional[Array]) -> tuple[Array, Optional[tuple[Array, Array]]]:
    cfg = self.cfg
    h = RMSNorm(cfg, name="input_layernorm")(x_BTD)
    attention = Attention(cfg, self.return_kv, name="self_attn")
    a, new_kv = attention(h, sin_BTh, cos_BTh, mask, mask_new_BTT, layer_cache)
    x_BTD = sharding.constrain(x_BTD + a, ACT_BTD)
    h = RMSNorm(cfg, name="post_attention_layernorm")(x_BTD)
    x_BTD = sharding.constrain(x_BTD + Mlp(cfg, name="mlp")(h), ACT_BTD)
    return x_BTD, new_kv


class Embed(nn.Module):
  """Token embedding [V, D]; `attend` is the tied LM head (float32 accumulation)."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = self.param("embedding", _init(cfg, ("vocab", "embed")),
                                (cfg.vocab_size, cfg.hidden_size), jnp.dtype(cfg.param_dtype))

  def __call__(self, tokens_BT: Array) -> Array:
    return jnp.take(self.embedding, tokens_BT, axis=0).astype(self.cfg.dtype)

  def attend(self, hidden_BTD: Array) -> Array:
    return jnp.einsum("btd,vd->btv", hidden_BTD, self.embedding.astype(self.cfg.dtype),
                      preferred_element_type=jnp.float32)


def _segments(mask_BT: Optional[Array], shape: tuple[int, int]) -> Array:
  if mask_BT is None:
    return jnp.ones(shape, jnp.int32)
  if mask_BT.shape != shape:
    raise ValueError(f"mask_BT has shape {mask_BT.shape}, tokens have {shape}.")
  return mask_BT.astype(jnp.int32)


def default_positions(mask_BT: Array, start_B: Optional[Array] = None) -> Array:
  """RoPE positions [B, T]: non-padding tokens before each token (+ start), padding clipped."""
  valid = (mask_BT != 0).astype(jnp.int32)
  pos = jnp.cumsum(valid, axis=1) - 1
  if start_B is not None:
    pos = pos + start_B[:, None]
  return jnp.maximum(pos, 0)


def _check_cache(cache: KVCache, b: int, t: int) -> None:
  """Raises if [B, T] tokens do not fit `cache` (static shapes inside jit cannot raise)."""
  if cache.batch_size != b:
    raise ValueError(f"cache has batch size {cache.batch_size}, tokens have {b}.")
  if t > cache.max_length:
    raise ValueError(f"{t} tokens do not fit a cache of max_length {cache.max_length}.")


class _Masks(NamedTuple):
  """What the layers read, from `_attention_masks`.

  layer_caches: (cache.k, cache.v) for the layers to read, None when they read no cache (no
    cache, or an empty one). mask: a `decode_attention.SlotMask` over the cache's slots, or,
    when the layers read no cache, the new tokens' [B, T] segment ids (no [B, T, T] mask: the
    no-cache attention masks per block, `attention.attend`). mask_new_BTT: [B, T, T] over the
    new tokens when the layers read a stacked cache, else None. new_seg_BS: [B, S] segment ids
    of the cache's slots once the new tokens are in (the returned cache's); None without a
    cache.
  """

  layer_caches: Optional[tuple[Any, Any]]
  mask: Any
  mask_new_BTT: Optional[Array]
  new_seg_BS: Optional[Array]


def _attention_masks(seg_BT: Array, cache: Optional[KVCache], cache_is_empty: bool) -> _Masks:
  """Attention masks of [B, T] tokens with segment ids `seg_BT` (0 = padding): same segment,
  key not padding, key at or before the query; over the new tokens and / or the cache's slots,
  as the layers read them (see `_Masks`). Slot masks are built from segment ids over the window
  the cache is read in (`decode_attention.SlotMask`), so a step's cost follows the slots read.
  """
  b, t = seg_BT.shape
  if cache is None:
    return _Masks(None, seg_BT, None, None)
  _check_cache(cache, b, t)
  new_seg_BS = write_slots(cache.segment_ids, seg_BT, cache.index, batch_axis=0, slot_axis=1)
  if cache_is_empty:
    return _Masks(None, seg_BT, None, new_seg_BS)
  index_B = jnp.broadcast_to(cache.index, (b,))
  # Blocks up to the longest row that has a new token are read (finished rows are not waited
  # for: their queries are padding and attend nothing).
  last_B = jnp.where(jnp.any(seg_BT != 0, axis=1), index_B, 0)
  if cache.per_layer:
    # Each layer writes the new slots first, then reads its cache (_unrolled_layers): the
    # mask covers the written slots up to each query's own.
    limit_BT = index_B[:, None] + jnp.arange(1, t + 1, dtype=jnp.int32)[None, :]
    mask = decode_attention.SlotMask(seg_BT, new_seg_BS, limit_BT, jnp.max(last_B) + t)
    return _Masks((cache.k, cache.v), mask, None, new_seg_BS)
  # The cache's own slots (those before index) and the new tokens separately: the layers
  # read the cache and write only the new slots. The mask reads the updated segment ids
  # (the limit hides the new slots) so the old ones are dead and updated in place.
  limit_BT = jnp.broadcast_to(index_B[:, None], (b, t))
  mask = decode_attention.SlotMask(seg_BT, new_seg_BS, limit_BT, jnp.max(last_B))
  same_BTT = (seg_BT[:, :, None] == seg_BT[:, None, :]) & (seg_BT[:, None, :] != 0)
  mask_new_BTT = same_BTT & jnp.tril(jnp.ones((t, t), bool))[None]
  return _Masks((cache.k, cache.v), mask, mask_new_BTT, new_seg_BS)


def _with_ragged_pairs(masks: _Masks, cfg: ModelConfig, cache_slots: int) -> _Masks:
  """`masks` with the step's ragged (row, block) pairs computed once for every layer, when the
  layers read the cache that way (`decode_attention.attend_ragged`)."""
  if (masks.layer_caches is None or cfg.decode_attention == "window"
      or not reads_prefix_window(cfg, cache_slots)):
    return masks
  m = masks.mask
  pairs = decode_attention.ragged_pairs(m, block_size=cfg.decode_block_size,
                                        row_groups=_row_groups(m.slot_seg_BS.shape[0]))
  return masks._replace(mask=m._replace(pairs=pairs))


def _write_new_kv(cache: KVCache, new_kv: Any, layers_wrote: bool) -> tuple[Any, Any]:
  """The cache's (k, v) with every layer's T new slots written at [index, index + T).

  new_kv: the layers' (k, v): the cache as the layers wrote it when `layers_wrote` (per-layer
  buffers of the unrolled path, or the stacked buffers of `Decoder._scanned_cached_layers`),
  else the new slots stacked [L, B, K, H, T] / [L, B, K, T, H] (the scan). One in-place
  write (the cache buffer is donated / a loop carry, so XLA updates it without a copy).
  """
  index = cache.index
  if layers_wrote:  # written by the layers
    if cache.per_layer:
      return tuple(new_kv[0]), tuple(new_kv[1])
    return new_kv[0], new_kv[1]
  if cache.per_layer:  # a prefill: the scan's stacked [L, ...] new slots
    new_k = tuple(write_slots(ck, new_kv[0][i], index, batch_axis=0, slot_axis=3)
                  for i, ck in enumerate(cache.k))
    new_v = tuple(write_slots(cv, new_kv[1][i], index, batch_axis=0, slot_axis=2)
                  for i, cv in enumerate(cache.v))
    return new_k, new_v
  return (write_slots(cache.k, new_kv[0], index, batch_axis=1, slot_axis=4),
          write_slots(cache.v, new_kv[1], index, batch_axis=1, slot_axis=3))


def _updated_cache(cache: KVCache, masks: _Masks, new_kv: Any, seg_BT: Array,
                   positions_BT: Array, layers_wrote: bool) -> KVCache:
  """`cache` after the [B, T] new tokens: their keys / values and segment ids in slots
  [index, index + T), index + T (per row: only rows with a non-padding token advance), and
  each row's next RoPE position (unchanged for a row of padding only). layers_wrote: `new_kv`
  is the cache as the layers wrote it."""
  valid_BT = seg_BT != 0
  any_valid_B = jnp.any(valid_BT, axis=1)
  t = seg_BT.shape[1]
  last_pos_B = jnp.max(jnp.where(valid_BT, positions_BT, -1), axis=1)
  new_k, new_v = _write_new_kv(cache, new_kv, layers_wrote)
  index = (cache.index + t if cache.index.ndim == 0
           else cache.index + jnp.where(any_valid_B, t, 0).astype(cache.index.dtype))
  return KVCache(k=new_k, v=new_v, segment_ids=masks.new_seg_BS, index=index,
                 next_position=jnp.where(any_valid_B, last_pos_B + 1, cache.next_position))


class Decoder(nn.Module):
  """Llama / Qwen2 decoder-only LM. See the module docstring for the calling convention."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT: Array, *, positions_BT: Optional[Array] = None,
               mask_BT: Optional[Array] = None, cache: Optional[KVCache] = None,
               cache_is_empty: bool = False, return_hidden: bool = False,
               compute_logits: bool = True) -> DecoderOutput:
    """Runs the decoder on [B, T] tokens.

    Args:
      tokens_BT: int token ids.
      positions_BT: RoPE positions; default `default_positions(mask_BT, cache.next_position)`.
      mask_BT: 0 / False = padding; else segment id (bool -> one segment). Default: all valid.
      cache: a KVCache to read and extend (prefill or decode); None = no cache.
      cache_is_empty: the caller promises `cache` holds nothing yet (index 0, a prefill): the
        tokens attend only to each other, as without a cache (causal blocks for long prompts),
        instead of also to S empty slots; the cache is written the same way.
      return_hidden: also return the final-norm hidden states [B, T, D].
      compute_logits: False skips the LM head (use `logprobs.token_logprobs` on the hidden).

    Returns:
      DecoderOutput(logits [B, T, V] in cfg.logits_dtype, updated cache, hidden).
    """
    cfg = self.cfg
    seg_BT = _segments(mask_BT, tokens_BT.shape)
    if positions_BT is None:
      positions_BT = default_positions(seg_BT, None if cache is None else cache.next_position)
    sin_BTh, cos_BTh = rope.sin_cos(positions_BT, cfg)
    masks = _attention_masks(seg_BT, cache, cache_is_empty)
    if cache is not None:
      masks = _with_ragged_pairs(masks, cfg, cache.max_length)

    embed = Embed(cfg, name="embed_tokens")
    x_BTD = sharding.constrain(embed(tokens_BT), ACT_BTD)
    # Whether the layers write their new slots into the cache themselves (then read it).
    layers_wrote = masks.layer_caches is not None and (
        cache.per_layer or self._reads_stacked_window(cache.max_length))
    if layers_wrote and cache.per_layer:
      x_BTD, new_kv = self._unrolled_layers(x_BTD, masks.layer_caches, cache.index, sin_BTh,
                                            cos_BTh, masks.mask)
    elif layers_wrote:
      x_BTD, new_kv = self._scanned_cached_layers(x_BTD, masks, cache.index, sin_BTh, cos_BTh)
    else:
      x_BTD, new_kv = self._scanned_layers(x_BTD, masks, cache is not None, sin_BTh, cos_BTh)
    hidden_BTD = RMSNorm(cfg, name="norm")(x_BTD)

    logits = self._lm_head(embed, hidden_BTD) if compute_logits else None
    new_cache = None
    if cache is not None:
      new_cache = _updated_cache(cache, masks, new_kv, seg_BT, positions_BT, layers_wrote)
    return DecoderOutput(logits=logits, cache=new_cache,
                         hidden=hidden_BTD if return_hidden else None)

  def _scanned_layers(self, x_BTD: Array, masks: _Masks, return_kv: bool, sin_BTh: Array,
                      cos_BTh: Array) -> tuple[Array, Any]:
    """The layers as one `nn.scan` (remat per `cfg.remat_policy`): x [B, T, D] -> (x, the
    stacked new (k [L, B, K, H, T], v [L, B, K, T, H]) if return_kv, else None)."""
    cfg = self.cfg
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        unroll=min(cfg.scan_unroll, cfg.num_layers),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, return_kv, name="layers")
    return layers(x_BTD, masks.layer_caches, sin_BTh, cos_BTh, masks.mask,
                  masks.mask_new_BTT)

  def _reads_stacked_window(self, cache_slots: int) -> bool:
    """Whether a stacked cache is read in a prefix window (`_scanned_cached_layers`): see
    `reads_prefix_window`, and existing parameters (an init runs the `nn.scan`)."""
    return (reads_prefix_window(self.cfg, cache_slots)
            and "layers" in self.variables.get("params", {}))

  def _scanned_cached_layers(self, x_BTD: Array, masks: _Masks, index: Array, sin_BTh: Array,
                             cos_BTh: Array) -> tuple[Array, tuple[Array, Array]]:
    """The layers over a stacked cache as a `lax.scan` of `Block.apply` over the stacked
    parameters and the layer index, the same parameters and results as `_scanned_layers`:
    x [B, T, D] -> (x, the cache's (k [L, B, K, H, S], v [L, B, K, S, H]) with every layer's
    new slots written).

    The [L, ...] cache is a carry of the scan (not a scanned input): each layer writes its new
    slots into it in place and reads only the blocks it attends
    (`decode_attention.StackedLayerCache`); scanning over the cache made XLA copy every
    layer's whole cache out of the stack at every step.
    """
    cfg = self.cfg
    block = Block(cfg, True, parent=None)

    def layer(carry, inputs):
      x, k_L, v_L = carry
      params_l, l = inputs
      read = decode_attention.StackedLayerCache(k_L, v_L, l, index)
      x, (k_L, v_L) = block.apply({"params": params_l}, x, read, sin_BTh, cos_BTh,
                                  masks.mask, masks.mask_new_BTT)
      return (x, k_L, v_L), None

    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x_BTD, k_L, v_L), _ = jax.lax.scan(
        layer, (x_BTD,) + tuple(masks.layer_caches),
        (self.variables["params"]["layers"], layer_ids),
        unroll=min(cfg.scan_unroll, cfg.num_layers))
    return x_BTD, (k_L, v_L)

  def _lm_head(self, embed: Embed, hidden_BTD: Array) -> Array:
    """Logits [B, T, V] in cfg.logits_dtype: the tied embedding or `lm_head`, fp32 accumulation."""
    cfg = self.cfg
    if cfg.tie_word_embeddings:
      logits = embed.attend(hidden_BTD)
    else:
      logits = Linear(cfg, (cfg.hidden_size,), (cfg.vocab_size,), ("embed",), ("vocab",),
                      fp32_accumulation=True, name="lm_head")(hidden_BTD)
    return sharding.constrain(logits.astype(cfg.logits_dtype), ACT_BTV)

  def _unrolled_layers(self, x_BTD: Array, layer_caches: tuple[Any, Any], index: Array,
                       sin_BTh: Array, cos_BTh: Array, mask: decode_attention.SlotMask
                       ) -> tuple[Array, tuple[list[Array], list[Array]]]:
    """The scanned layers as a Python loop over a per-layer cache, with the same parameters.

    Each layer writes its new slots into its own cache buffer in place and then reads it: the
    scan has to slice layer l out of the stacked [L, ...] cache, a copy of the whole cache
    every decode step (a fifth of a SmolLM2 decode step on CPU). Writing before
    reading matters: a write after the read (as the scan path does) made XLA copy every
    layer's buffer twice per step to keep the read safe. Costs an L-times larger program
    (compile time).
    """
    cfg = self.cfg
    params = self.variables.get("params", {})
    if UNSTACKED_LAYERS in params:
      per_layer = [params[UNSTACKED_LAYERS][str(i)] for i in range(cfg.num_layers)]
    elif "layers" in params:
      per_layer = [jax.tree.map(lambda a, i=i: a[i], params["layers"])
                   for i in range(cfg.num_layers)]
    else:
      raise ValueError("A per-layer KVCache decodes with existing parameters; initialise the "
                       "model without a cache (or with a stacked one).")
    block = Block(cfg, True, parent=None)
    ks, vs = [], []
    for i in range(cfg.num_layers):
      x_BTD, (k, v) = block.apply({"params": per_layer[i]}, x_BTD,
                                  (layer_caches[0][i], layer_caches[1][i], index), sin_BTh,
                                  cos_BTh, mask, None)
      ks.append(k)
      vs.append(v)
    return x_BTD, (ks, vs)


UNSTACKED_LAYERS = "layers_unstacked"


def unstack_layer_params(params: Any, num_layers: int) -> Any:
  """params with the scanned layers' [L, ...] weights split into L per-layer trees.

  For a loop of per-layer-cache decode steps: slicing the layers once outside the loop avoids
  slicing every weight again at every step (XLA does not hoist those slices out of a
  while loop). Only the unrolled (per-layer cache) path reads this form.
  """
  params = dict(params)
  stacked = params.pop("layers")
  params[UNSTACKED_LAYERS] = {str(i): jax.tree.map(lambda a, i=i: a[i], stacked)
                              for i in range(num_layers)}
  return params
