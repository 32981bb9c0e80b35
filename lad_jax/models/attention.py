"""Attention of T tokens among themselves (training forward / backward, prefill), by segment ids.

  out_BTNH = attention.attend(q_BTNH, k_BKTH, v_BKTH, seg_BT, cfg)

q [B, T, N, H] is pre-scaled by H^-1/2 (the decoder's `_qkv`); k, v [B, K, T, H] (K kv heads,
N = K * G query heads, grouped-query attention). seg_BT [B, T] int: 0 = padding, else a segment
id; a query attends to the keys of its own nonzero segment at or before its slot (causal), so
left / right padding and packed rows are one rule. No [B, T, T] mask is ever built.

`cfg.attention_impl` picks the implementation (`IMPLS`):
  einsum     the reference: per block of `cfg.attention_block_size` queries, scores against the
             keys up to the block's end (causal block skipping), fp32 softmax. Its scores (and
             the probabilities autodiff saves for the backward pass) grow with T^2.
  blockwise  flash-attention-2 style (Dao 2023, arXiv:2307.08691, Alg. 1 and 2), portable JAX:
             q blocks x k blocks with an fp32 running max / sum, key blocks above the causal
             diagonal skipped; a custom VJP keeps only the output and the logsumexp and
             recomputes the block scores in the backward pass, so memory is O(T * block) in
             both directions.
  cudnn      cuDNN fused flash attention (GPU only, bfloat16 / float16), segments given as
             packed-sequence offsets and lengths.
  splash     the Pallas TPU splash-attention kernel (TPU only), segment ids + causal mask.
  auto       by `jax.default_backend()` at trace time: gpu -> cudnn, tpu -> splash, else
             blockwise, but einsum for T <= 2 blocks: on CPU blockwise's loops cost more than
             they save there (benchmarks/attention.py), and the scores are small.

A query with no key (a padding slot) gets output 0 from blockwise and a zero gradient; einsum
gives it a uniform average of the values (finite either way; padding outputs are never used).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lad_jax.errors import ConfigError
from lad_jax.models.config import ATTENTION_IMPLS, ModelConfig

Array = jax.Array

IMPLS = ATTENTION_IMPLS
# Finite, so a row with every key masked (a padding query) gives finite values, never NaN; far
# below any score, far from float32's -max so adding a score cannot overflow. Shared by the
# decoder's cached attention and `decode_attention`.
MASK_VALUE = -1e30
_BACKENDS = {"cudnn": "gpu", "splash": "tpu"}
# "auto" off GPU / TPU: the einsum reference up to this many blocks of tokens.
_EINSUM_BLOCKS = 2


def resolve_impl(impl: str, t: int, cfg: ModelConfig) -> str:
  """The implementation `impl` stands for at T tokens on this backend ("auto" resolved)."""
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if backend == "gpu":
    return "cudnn"
  if backend == "tpu":
    return "splash"
  return "einsum" if t <= _EINSUM_BLOCKS * _block(cfg, t) else "blockwise"


def attend(q_BTNH: Array, k_BKTH: Array, v_BKTH: Array, seg_BT: Array,
           cfg: ModelConfig) -> Array:
  """Causal, segment-masked grouped-query attention: out [B, T, N, H] (see the module doc)."""
  b, t, n, h = q_BTNH.shape
  if k_BKTH.shape != (b, cfg.num_kv_heads, t, h) or v_BKTH.shape != k_BKTH.shape:
    raise ValueError(f"k {k_BKTH.shape} / v {v_BKTH.shape} do not match q {q_BTNH.shape}.")
  if seg_BT.shape != (b, t) or n != cfg.num_heads:
    raise ValueError(f"seg_BT {seg_BT.shape} / {n} heads do not match q {q_BTNH.shape}.")
  impl = resolve_impl(cfg.attention_impl, t, cfg)
  _require_backend(impl)
  seg_BT = seg_BT.astype(jnp.int32)
  if impl == "einsum":
    return attend_einsum(q_BTNH, k_BKTH, v_BKTH, seg_BT, cfg)
  if impl == "blockwise":
    return attend_blockwise(q_BTNH, k_BKTH, v_BKTH, seg_BT, cfg)
  if impl == "cudnn":
    return attend_cudnn(q_BTNH, k_BKTH, v_BKTH, seg_BT, cfg)
  if impl == "splash":
    return attend_splash(q_BTNH, k_BKTH, v_BKTH, seg_BT, cfg)
  raise ValueError(f"Unknown attention_impl {impl!r}; valid: {list(IMPLS)}.")


def _require_backend(impl: str) -> None:
  """A clear error (at trace time) for a kernel that this backend cannot run."""
  need, have = _BACKENDS.get(impl), jax.default_backend()
  if need is not None and have != need:
    raise ConfigError(
        f"model.attention_impl={impl!r} runs only on {need.upper()} (this backend is {have}); "
        "set --config.model.attention_impl=auto (or blockwise).")


def _block(cfg: ModelConfig, t: int) -> int:
  """Queries / keys per block: cfg.attention_block_size, or all T when that is 0 or larger."""
  c = cfg.attention_block_size
  return t if c <= 0 or c >= t else c


def group_queries(q_BTNH: Array, num_kv_heads: int) -> Array:
  """[B, T, N, H] -> [B, K, G, T, H]: head-major, grouped by kv head (plain batched matmuls)."""
  b, t, n, h = q_BTNH.shape
  return q_BTNH.reshape(b, t, num_kv_heads, n // num_kv_heads, h).transpose(0, 2, 3, 1, 4)


def ungroup(out_BKGTH: Array) -> Array:
  """The inverse of `group_queries`: [B, K, G, T, H] -> [B, T, N, H]."""
  b, k, g, t, h = out_BKGTH.shape
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def _block_mask(seg_q_BC: Array, seg_k_BD: Array, q_start: Array, k_start: Array) -> Array:
  """[B, C, D] bool: key d is attended by query c (same nonzero segment, key slot <= query
  slot); the blocks start at slots q_start / k_start (traced or static)."""
  c, d = seg_q_BC.shape[1], seg_k_BD.shape[1]
  causal_CD = (q_start + jnp.arange(c))[:, None] >= (k_start + jnp.arange(d))[None, :]
  same_BCD = (seg_q_BC[:, :, None] == seg_k_BD[:, None, :]) & (seg_k_BD[:, None, :] != 0)
  return same_BCD & causal_CD[None]


# ----------------------------------------------------------------------------------------------
# einsum: the reference


def attend_einsum(q_BTNH: Array, k_BKTH: Array, v_BKTH: Array, seg_BT: Array,
                  cfg: ModelConfig) -> Array:
  """Reference: each block of queries against the keys up to its end, one fp32 softmax each
  (the decoder's former `_attend_causal_blocks`; the mask built per block from seg_BT)."""
  t = q_BTNH.shape[1]
  c = _block(cfg, t)
  q_BKGTH = group_queries(q_BTNH, cfg.num_kv_heads)
  outs = []
  for start in range(0, t, c):
    end = min(start + c, t)
    mask_BCS = _block_mask(seg_BT[:, start:end], seg_BT[:, :end], start, 0)
    bias = jnp.where(mask_BCS, 0.0, MASK_VALUE).astype(jnp.float32)[:, None, None]
    scores = jnp.einsum("bkgth,bksh->bkgts", q_BKGTH[:, :, :, start:end], k_BKTH[:, :, :end],
                        preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BKTH.dtype)
    outs.append(jnp.einsum("bkgts,bksh->bkgth", probs, v_BKTH[:, :, :end]))
  return ungroup(jnp.concatenate(outs, axis=3))


# ----------------------------------------------------------------------------------------------
# blockwise: flash-attention-2 in plain JAX


def attend_blockwise(q_BTNH: Array, k_BKTH: Array, v_BKTH: Array, seg_BT: Array,
                     cfg: ModelConfig) -> Array:
  """Flash-style attention in blocks of `cfg.attention_block_size` (see `_flash`)."""
  t = q_BTNH.shape[1]
  c = _block(cfg, t)
  pad = -t % c
  q = group_queries(q_BTNH, cfg.num_kv_heads)
  q = jnp.pad(q, ((0, 0),) * 3 + ((0, pad), (0, 0)))
  k = jnp.pad(k_BKTH, ((0, 0), (0, 0), (0, pad), (0, 0)))
  v = jnp.pad(v_BKTH, ((0, 0), (0, 0), (0, pad), (0, 0)))
  seg = jnp.pad(seg_BT, ((0, 0), (0, pad)))  # padded slots are padding (segment 0)
  out_BKGTH = _flash(_q_blocks(q, c), _kv_blocks(k, c), _kv_blocks(v, c), _seg_blocks(seg, c))
  return ungroup(_from_q_blocks(out_BKGTH)[:, :, :, :t])


def _q_blocks(x_BKGTH: Array, c: int) -> Array:
  b, k, g, t, h = x_BKGTH.shape
  return x_BKGTH.reshape(b, k, g, t // c, c, h).transpose(3, 0, 1, 2, 4, 5)


def _from_q_blocks(x_nBKGCH: Array) -> Array:
  n, b, k, g, c, h = x_nBKGCH.shape
  return x_nBKGCH.transpose(1, 2, 3, 0, 4, 5).reshape(b, k, g, n * c, h)


def _kv_blocks(x_BKTH: Array, c: int) -> Array:
  b, k, t, h = x_BKTH.shape
  return x_BKTH.reshape(b, k, t // c, c, h).transpose(2, 0, 1, 3, 4)


def _seg_blocks(seg_BT: Array, c: int) -> Array:
  b, t = seg_BT.shape
  return seg_BT.reshape(b, t // c, c).transpose(1, 0, 2)


def _probs(q_BKGCH: Array, k_BKDH: Array, mask_BCD: Array, lse_BKGC: Array) -> Array:
  """Block probabilities exp(q.k - logsumexp) [B, K, G, C, D] fp32, 0 where masked."""
  s = jnp.einsum("bkgch,bkdh->bkgcd", q_BKGCH, k_BKDH, preferred_element_type=jnp.float32)
  return jnp.where(mask_BCD[:, None, None], jnp.exp(s - lse_BKGC[..., None]), 0.0)


@jax.custom_vjp
def _flash(q_nBKGCH: Array, k_nBKCH: Array, v_nBKCH: Array, seg_nBC: Array) -> Array:
  """Blocked causal attention: out [n, B, K, G, C, H] (blocks of C slots, n blocks)."""
  return _flash_forward(q_nBKGCH, k_nBKCH, v_nBKCH, seg_nBC)[0]


def _flash_forward(q, k, v, seg) -> tuple[Array, Array]:
  """(out [n, B, K, G, C, H] in q's dtype, logsumexp [n, B, K, G, C] fp32).

  Query block i visits key blocks 0..i only (those above the causal diagonal are all masked):
  a running max m, sum l and fp32 accumulator, rescaled by exp(m_old - m_new) per key block
  (FlashAttention-2, Alg. 1). A row with no attended key keeps l = 0: output 0, lse 0.
  """
  n, c = q.shape[0], q.shape[4]

  def query_block(args):
    i, q_i, seg_i = args

    def key_block(j, carry):
      m, l, acc = carry
      mask = _block_mask(seg_i, seg[j], i * c, j * c)[:, None, None]
      s = jnp.einsum("bkgch,bkdh->bkgcd", q_i, k[j], preferred_element_type=jnp.float32)
      s = jnp.where(mask, s, MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum("bkgcd,bkdh->bkgch", p.astype(v.dtype), v[j],
                      preferred_element_type=jnp.float32)
      return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

    shape = q_i.shape[:-1]
    init = (jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_i.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
    has_key = l > 0
    out = acc / jnp.where(has_key, l, 1.0)[..., None]
    lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, l, 1.0)), 0.0)
    return out.astype(q.dtype), lse

  return jax.lax.map(query_block, (jnp.arange(n), q, seg))


def _flash_fwd(q, k, v, seg):
  out, lse = _flash_forward(q, k, v, seg)
  return out, (q, k, v, seg, out, lse)


def _flash_bwd(res, dout):
  """FlashAttention-2's backward (Alg. 2): per key block j, the query blocks i >= j recompute
  P = exp(S - lse); dV_j += P^T dO, dS = P * (dO V^T - D) with D = rowsum(dO * O),
  dK_j += dS^T Q, dQ_i += dS K_j (dQ accumulated in fp32 across key blocks)."""
  q, k, v, seg, out, lse = res
  n, c = q.shape[0], q.shape[4]
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

  def key_block(dq, args):
    j, k_j, v_j, seg_j = args

    def query_block(i, carry):
      dq, dk, dv = carry
      mask = _block_mask(seg[i], seg_j, i * c, j * c)
      p = _probs(q[i], k_j, mask, lse[i])
      dv = dv + jnp.einsum("bkgcd,bkgch->bkdh", p.astype(dout.dtype), dout[i],
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkgch,bkdh->bkgcd", dout[i], v_j, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[i][..., None])).astype(q.dtype)
      dk = dk + jnp.einsum("bkgcd,bkgch->bkdh", ds, q[i], preferred_element_type=jnp.float32)
      dq_i = jnp.einsum("bkgcd,bkdh->bkgch", ds, k_j, preferred_element_type=jnp.float32)
      return dq.at[i].add(dq_i), dk, dv

    zeros = jnp.zeros(k_j.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(j, n, query_block, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32),
                              (jnp.arange(n), k, v, seg))
  seg_ct = np.zeros(seg.shape, jax.dtypes.float0)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), seg_ct


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# cuDNN (GPU) and splash (TPU) kernels


def segment_runs(seg_BT: Array, max_segments: int) -> tuple[Array, Array]:
  """Each row's nonzero segments as runs: (starts [B, M + 1], lengths [B, M]) int32, -1 past a
  row's last run (cuDNN's packed-sequence form). A run is a maximal stretch of one nonzero id;
  runs past the M-th are dropped (static shapes), so M must bound the runs per row."""
  valid = seg_BT != 0
  prev = jnp.pad(seg_BT, ((0, 0), (1, 0)))[:, :-1]
  nxt = jnp.pad(seg_BT, ((0, 0), (0, 1)))[:, 1:]
  first = functools.partial(jnp.nonzero, size=max_segments, fill_value=-1)
  starts_BM = jax.vmap(lambda r: first(r)[0])(valid & (seg_BT != prev))
  ends_BM = jax.vmap(lambda r: first(r)[0])(valid & (seg_BT != nxt))
  lengths_BM = jnp.where(starts_BM >= 0, ends_BM - starts_BM + 1, -1)
  starts = jnp.pad(starts_BM, ((0, 0), (0, 1)), constant_values=-1)
  return starts.astype(jnp.int32), lengths_BM.astype(jnp.int32)


def attend_cudnn(q_BTNH: Array, k_BKTH: Array, v_BKTH: Array, seg_BT: Array,
                 cfg: ModelConfig) -> Array:
  """cuDNN flash attention over packed sequences: each run of a segment id (`segment_runs`,
  at most `cfg.attention_max_segments` per row) is its own causal sequence, padding skipped.

  jax 0.10's public `jax.nn.dot_product_attention` takes only right-padding lengths, so this
  calls its cuDNN layer (`jax._src.cudnn.fused_attention_stablehlo`) with per-row segment
  offsets; cuDNN needs bfloat16 / float16 and a GPU with its flash kernels (Ampere or later).
  """
  if jnp.dtype(q_BTNH.dtype).itemsize != 2:
    raise ConfigError(f"model.attention_impl='cudnn' needs model.dtype bfloat16 or float16, "
                      f"got {q_BTNH.dtype}; set --config.model.dtype=bfloat16 or "
                      "--config.model.attention_impl=blockwise.")
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top
  # cuDNN applies the offsets only in its packed form, which jax selects for M >= 2.
  starts, lengths = segment_runs(seg_BT, max(2, cfg.attention_max_segments))
  k_BTKH, v_BTKH = k_BKTH.transpose(0, 2, 1, 3), v_BKTH.transpose(0, 2, 1, 3)
  return cudnn.dot_product_attention(
      q_BTNH, k_BTKH, v_BTKH, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=starts,
      kv_offsets=starts, scale=1.0, mask_type=cudnn.MaskType.PADDING_CAUSAL,
      qkv_layout="BTNH")


def attend_splash(q_BTNH: Array, k_BKTH: Array, v_BKTH: Array, seg_BT: Array,
                  cfg: ModelConfig, interpret: bool = False) -> Array:
  """The Pallas TPU splash-attention kernel: per example and kv head, its MQA form over the G
  query heads of that kv head (no repeated k / v), a causal mask and the segment ids. T is
  padded to a multiple of 128 (the kernel's block) with padding slots. interpret: run the
  kernel in the Pallas interpreter (tests off TPU)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  t, g = q_BTNH.shape[1], cfg.num_groups
  tp = -(-t // 128) * 128
  q = group_queries(jnp.pad(q_BTNH, ((0, 0), (0, tp - t), (0, 0), (0, 0))), cfg.num_kv_heads)
  k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, tp - t), (0, 0))) for x in (k_BKTH, v_BKTH))
  seg = jnp.pad(seg_BT, ((0, 0), (0, tp - t)))
  mask = splash.MultiHeadMask([splash.CausalMask((tp, tp))] * g)
  kernel = splash.make_splash_mqa_single_device(mask, interpret=interpret)

  def one(q_GTH, k_TH, v_TH, seg_T):
    return kernel(q_GTH, k_TH, v_TH, segment_ids=splash.SegmentIds(q=seg_T, kv=seg_T))

  out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(q, k, v, seg)
  return ungroup(out[:, :, :, :t].astype(q_BTNH.dtype))
