"""Decode attention over the written part of a KV cache, block by block (online softmax).

A decode step's queries attend to the cache slots before the write index (the same index for
every row: "lock step") and to the new tokens. Attending over the whole cache bucket and
masking the empty slots costs work proportional to the bucket; here the cache is read in
blocks of C slots up to the index only, so a step costs work proportional to the tokens
written so far:

  m_0 = -1e30, l_0 = 0, o_0 = 0                       (per query: max, sum, output)
  for each key block b (scores s_b = q . k_b + mask bias, values v_b):
    m_b = max(m_{b-1}, max s_b);  a = exp(m_{b-1} - m_b)
    l_b = a l_{b-1} + sum exp(s_b - m_b);  o_b = a o_{b-1} + exp(s_b - m_b) . v_b
  out = o / l                                         (the softmax over all blocks at once)

All of it in float32 (the probabilities are cast to the value dtype only as a matmul operand,
with float32 accumulation), so it equals one softmax over the full bucket up to rounding.

Two layouts are read: a per-layer buffer (k [B, K, H, S], v [B, K, S, H]) and the stacked
[L, ...] cache with a layer index (`StackedLayerCache`), sliced block by block inside the loop
so the layer's cache is never copied out of the stack as a whole. Blocks start at multiples of
C, clamped to S - C so a block never runs past the bucket; slots a clamped block re-reads are
masked out (counted once).

Masked keys get a finite bias (-1e30, as the decoder's), so a query whose keys are all masked
(padding) gets a uniform average over the slots read, never NaN; its output is never used.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

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


class SoftmaxState(NamedTuple):
  """Running max [B, K, G, T], sum of exp [B, K, G, T] and unnormalised output
  [B, K, G, T, H] of an online softmax (float32)."""

  max_BKGT: Array
  sum_BKGT: Array
  out_BKGTH: Array


def init_state(q_BKGTH: Array) -> SoftmaxState:
  """The empty state (no key folded in yet) for grouped queries [B, K, G, T, H]."""
  shape = q_BKGTH.shape[:-1]
  return SoftmaxState(jnp.full(shape, _MASK_VALUE, jnp.float32),
                      jnp.zeros(shape, jnp.float32), jnp.zeros(q_BKGTH.shape, jnp.float32))


def fold(state: SoftmaxState, scores_BKGTS: Array, v_BKSH: Array) -> SoftmaxState:
  """Folds S more keys into the state: their biased fp32 scores [B, K, G, T, S] and values
  [B, K, S, H]."""
  new_max = jnp.maximum(state.max_BKGT, jnp.max(scores_BKGTS, axis=-1))
  scale = jnp.exp(state.max_BKGT - new_max)
  p_BKGTS = jnp.exp(scores_BKGTS - new_max[..., None])
  pv_BKGTH = jnp.einsum("bkgts,bksh->bkgth", p_BKGTS.astype(v_BKSH.dtype), v_BKSH,
                        preferred_element_type=jnp.float32)
  return SoftmaxState(new_max, state.sum_BKGT * scale + jnp.sum(p_BKGTS, axis=-1),
                      state.out_BKGTH * scale[..., None] + pv_BKGTH)


def finish(state: SoftmaxState, dtype: Any) -> Array:
  """The attention output [B, K, G, T, H] in `dtype`: the output over the sum of weights."""
  return (state.out_BKGTH / state.sum_BKGT[..., None]).astype(dtype)


def scores(q_BKGTH: Array, k_BKHS: Array, mask_BTS: Array) -> Array:
  """fp32 scores [B, K, G, T, S] of grouped queries and keys [B, K, H, S], masked keys biased
  by -1e30 (one bias per [B, T, S], broadcast over heads)."""
  bias_BTS = jnp.where(mask_BTS, 0.0, _MASK_VALUE).astype(jnp.float32)
  return jnp.einsum("bkgth,bkhs->bkgts", q_BKGTH, k_BKHS.astype(q_BKGTH.dtype),
                    preferred_element_type=jnp.float32) + bias_BTS[:, None, None]


def _read_block(k: Array, v: Array, layer: Optional[Array], start: Array, c: int
                ) -> tuple[Array, Array]:
  """Slots [start, start + c) of keys [(L,) B, K, H, S] and values [(L,) B, K, S, H] (of
  `layer` when stacked): (k [B, K, H, c], v [B, K, c, H])."""
  if layer is None:
    b, kh, h, _ = k.shape
    return (jax.lax.dynamic_slice(k, (0, 0, 0, start), (b, kh, h, c)),
            jax.lax.dynamic_slice(v, (0, 0, start, 0), (b, kh, c, h)))
  _, b, kh, h, _ = k.shape
  kb = jax.lax.dynamic_slice(k, (layer, 0, 0, 0, start), (1, b, kh, h, c))[0]
  vb = jax.lax.dynamic_slice(v, (layer, 0, 0, start, 0), (1, b, kh, c, h))[0]
  return kb, vb


def fold_cache_blocks(state: SoftmaxState, q_BKGTH: Array, k: Array, v: Array,
                      mask_BTS: Array, num_slots: Array, *, block_size: int,
                      layer: Optional[Array] = None) -> SoftmaxState:
  """Folds the cache slots [0, num_slots) into the state, `block_size` slots at a time.

  Args:
    state: the online softmax so far.
    q_BKGTH: grouped queries [B, K, G, T, H] in the compute dtype.
    k, v: keys [B, K, H, S] and values [B, K, S, H], or the stacked [L, ...] cache with
      `layer` its layer index.
    mask_BTS: [B, T, S] which slots each query attends (sliced per block).
    num_slots: [] int32, slots from 0 that may be attended (later ones are masked, and
      blocks after the one holding slot num_slots - 1 are never read).
    block_size: C, slots per block (min(C, S) is used).
  """
  s = mask_BTS.shape[-1]
  c = min(block_size, s)
  b, t = mask_BTS.shape[:2]
  dtype = q_BKGTH.dtype

  def body(j, st):
    start = jnp.minimum(j * c, s - c)
    kb_BKHC, vb_BKCH = _read_block(k, v, layer, start, c)
    slot_C = start + jnp.arange(c)
    # A clamped last block re-reads earlier slots; the last block may run past num_slots.
    read_C = (slot_C >= j * c) & (slot_C < num_slots)
    mask_BTC = jax.lax.dynamic_slice(mask_BTS, (0, 0, start), (b, t, c)) & read_C[None, None]
    return fold(st, scores(q_BKGTH, kb_BKHC, mask_BTC), vb_BKCH.astype(dtype))

  num_blocks = (num_slots + c - 1) // c
  return jax.lax.fori_loop(0, num_blocks, body, state)
