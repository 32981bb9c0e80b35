"""Decode attention over the written prefix of a KV cache, in windows of doubling size.

A decode step's queries attend to the cache slots before the write index (one index shared by
all rows in lock step, or one per row with continuous batching) and to the new tokens.
Attending over the whole cache bucket and masking the empty slots costs work proportional to
the bucket; here a step reads only a prefix of the cache: the smallest of the windows C, 2C,
4C, ..., S (C = `decode_block_size`) that holds every written slot, picked at run time by a
`lax.switch` over those static sizes. A step costs at most twice the work of the slots written
so far (and at least one window of C), as one softmax and two matmuls per layer.

Scores are float32 (the probabilities are cast to the value dtype only as a matmul operand,
with float32 accumulation); slots in the window but not attended (unwritten, other segments,
padding) get a finite bias (-1e30, as the decoder's), so the result equals one softmax over
the full bucket up to rounding, and a query whose keys are all masked (padding) gets a uniform
average over the slots read, never NaN (its output is never used).

Two layouts are read: a per-layer buffer (k [B, K, H, S], v [B, K, S, H]) and the stacked
[L, ...] cache with a layer index (`StackedLayerCache`), sliced to the window inside the
layer so the layer's cache is never copied out of the stack as a whole. Masks come from
segment ids, built only over the window read (`SlotMask`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from lad_jax.models import attention

Array = jax.Array

_MASK_VALUE = attention.MASK_VALUE


class StackedLayerCache(NamedTuple):
  """What one layer of the layer scan reads of a stacked cache: the whole [L, ...] buffers
  (loop invariants of the scan, never sliced per layer), the layer's index and the write index.

  k: [L, B, K, H, S], v: [L, B, K, S, H], layer: [] int32, index: [] int32 (slots before it
  are written).
  """

  k: Array
  v: Array
  layer: Array
  index: Array


def scores(q_BKGTH: Array, k_BKHS: Array, mask_BTS: Array) -> Array:
  """fp32 scores [B, K, G, T, S] of grouped queries and keys [B, K, H, S], masked keys biased
  by -1e30 (one bias per [B, T, S], broadcast over heads)."""
  bias_BTS = jnp.where(mask_BTS, 0.0, _MASK_VALUE).astype(jnp.float32)
  return jnp.einsum("bkgth,bkhs->bkgts", q_BKGTH, k_BKHS.astype(q_BKGTH.dtype),
                    preferred_element_type=jnp.float32) + bias_BTS[:, None, None]


class SlotMask(NamedTuple):
  """Which cache slots each query attends, from segment ids, never a stored [B, T, S] mask.

  Query t of row b attends slot s iff slot_seg_BS[b, s] == query_seg_BT[b, t] != 0 and
  s < limit_BT[b, t]. A decode step builds the mask of the window it reads (`prefix`), so its
  cost follows the slots read, not the bucket; a whole-cache read builds it once (`full`).

  query_seg_BT: [B, T] int32 segment ids of the queries (0 = padding: attends nothing).
  slot_seg_BS: [B, S] int32 segment ids of the cache slots (0 = empty or padding).
  limit_BT: [B, T] int32, one past the last slot a query may attend (written slots, causal).
  num_slots: [] int32, slots from 0 that must be read (>= every row's limit; the window read
    is the smallest that covers them).
  """

  query_seg_BT: Array
  slot_seg_BS: Array
  limit_BT: Array
  num_slots: Array

  def prefix(self, size: int) -> Array:
    """[B, T, size] bool over slots [0, size)."""
    return self._over(self.slot_seg_BS[:, :size], jnp.arange(size, dtype=jnp.int32))

  def full(self) -> Array:
    """[B, T, S] bool over every slot."""
    s = self.slot_seg_BS.shape[1]
    return self._over(self.slot_seg_BS, jnp.arange(s, dtype=jnp.int32))

  def _over(self, seg_BC: Array, slot_C: Array) -> Array:
    same_BTC = (self.query_seg_BT[:, :, None] == seg_BC[:, None, :]) & (seg_BC[:, None, :] != 0)
    return same_BTC & (slot_C[None, None, :] < self.limit_BT[:, :, None])


def window_sizes(num_slots: int, block_size: int) -> tuple[int, ...]:
  """The prefixes a cached step may read: C, 2C, 4C, ... below S, then S (C = block_size)."""
  sizes, w = [], max(1, block_size)
  while w < num_slots:
    sizes.append(w)
    w *= 2
  return tuple(sizes) + (num_slots,)


def _read_prefix(k: Array, v: Array, layer: Optional[Array], w: int) -> tuple[Array, Array]:
  """Slots [0, w) of keys [(L,) B, K, H, S] and values [(L,) B, K, S, H] (of `layer` when
  stacked): (k [B, K, H, w], v [B, K, w, H])."""
  if layer is None:
    return k[..., :w], v[:, :, :w]
  _, b, kh, h, _ = k.shape
  kb = jax.lax.dynamic_slice(k, (layer, 0, 0, 0, 0), (1, b, kh, h, w))[0]
  vb = jax.lax.dynamic_slice(v, (layer, 0, 0, 0, 0), (1, b, kh, w, h))[0]
  return kb, vb


def attend_prefix(q_BKGTH: Array, k: Array, v: Array, mask: SlotMask, *, block_size: int,
                  layer: Optional[Array] = None,
                  new: Optional[tuple[Array, Array, Array]] = None) -> Array:
  """Attention of grouped queries over the cache slots [0, W) (and the new tokens), W the
  smallest of `window_sizes` that covers mask.num_slots, chosen by a `lax.switch`.

  Args:
    q_BKGTH: grouped queries [B, K, G, T, H] in the compute dtype.
    k, v: keys [B, K, H, S] and values [B, K, S, H], or the stacked [L, ...] cache with
      `layer` its layer index.
    mask: which slots each query attends; slots at or after mask.num_slots are read only when
      they share the window (then the limits mask them).
    block_size: C, the smallest window.
    new: (keys [B, K, H, T], values [B, K, T, H], mask [B, T, T]) of new tokens that are not
      in the cache yet, in the same softmax; None when the cache holds them already.

  Returns:
    [B, K, G, T, H] in the compute dtype.
  """
  sizes = window_sizes(mask.slot_seg_BS.shape[-1], block_size)
  dtype = q_BKGTH.dtype

  def read(w: int) -> Array:
    kb_BKHW, vb_BKWH = _read_prefix(k, v, layer, w)
    s_BKGTW = scores(q_BKGTH, kb_BKHW, mask.prefix(w))
    if new is None:
      p_BKGTW = jax.nn.softmax(s_BKGTW, axis=-1).astype(dtype)
      return jnp.einsum("bkgts,bksh->bkgth", p_BKGTW, vb_BKWH.astype(dtype))
    kn_BKHT, vn_BKTH, mask_new_BTT = new
    p = jax.nn.softmax(jnp.concatenate([s_BKGTW, scores(q_BKGTH, kn_BKHT, mask_new_BTT)], -1),
                       axis=-1).astype(dtype)
    return (jnp.einsum("bkgts,bksh->bkgth", p[..., :w], vb_BKWH.astype(dtype))
            + jnp.einsum("bkgtu,bkuh->bkgth", p[..., w:], vn_BKTH.astype(dtype)))

  if len(sizes) == 1:
    return read(sizes[0])
  branch = jnp.sum(jnp.asarray(sizes[:-1], jnp.int32) < mask.num_slots)
  return jax.lax.switch(branch, [functools.partial(read, w) for w in sizes])
