"""Decode attention over the written slots of a KV cache: each row's own blocks, or a window.

A decode step's queries attend to the cache slots before the write index (one index shared by
all rows in lock step, or one per row with continuous batching) and to the new tokens.
Attending over the whole cache bucket and masking the empty slots costs work proportional to
the bucket; here a step reads only written slots, in one of two ways (C = `decode_block_size`):

  `attend_ragged` (`decode_attention="ragged"`): row b reads its own
    ceil(limit_b / C) blocks (none once it has ended), as (row, block) pairs gathered in one
    read; each query's softmax runs across its row's blocks. Work ~ the sum of the rows'
    written lengths: rows at different steps (continuous batching) or already ended (lock
    step) cost only what they have written. This is the portable form of a paged / ragged
    attention kernel (the Pallas paged-attention kernel on TPU reads each sequence's pages the
    same way).
  `attend_prefix` (`"window"`): every row reads the smallest of the prefix windows C, 2C,
    4C, ..., S that holds the longest row, picked at run time by a `lax.switch` over those
    static sizes: B x (at most twice the longest row), one softmax and two matmuls per layer,
    no gather; as cheap when all rows are at the same length.
  `attend_auto` (`"auto"`, the default): per step, the ragged read when its blocks hold at
    most 1 / RAGGED_SLOT_COST of the window's slots, else the window.

Scores are float32 (the probabilities are cast to the value dtype only as a matmul operand,
with float32 accumulation); slots in the window but not attended (unwritten, other segments,
padding) get a finite bias (-1e30, as the decoder's), so the result equals one softmax over
the full bucket up to rounding, and a query whose keys are all masked (padding) gets a uniform
average over the slots read (ragged: over nothing, 0), never NaN (its output is never used).

Two layouts are read: a per-layer buffer (k [B, K, H, S], v [B, K, S, H]) and the stacked
[L, ...] cache with a layer index (`StackedLayerCache`), sliced (or gathered) inside the
layer so the layer's cache is never copied out of the stack as a whole. Masks come from
segment ids, built only over the slots read (`SlotMask`).
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
  pairs: the (row, block) pairs of a ragged read (`ragged_pairs`), computed once per step for
    every layer; None = each layer computes them.
  """

  query_seg_BT: Array
  slot_seg_BS: Array
  limit_BT: Array
  num_slots: Array
  pairs: Optional["RaggedPairs"] = None

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


def _smallest_holding(sizes: tuple[int, ...], n: Array) -> Array:
  """[] int32 index of the first of the increasing static `sizes` that is >= n (the last if
  none is): the branch of a `lax.switch` over them."""
  return jnp.sum(jnp.asarray(sizes[:-1], jnp.int32) < n)


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
  return jax.lax.switch(_smallest_holding(sizes, mask.num_slots),
                        [functools.partial(read, w) for w in sizes])


# ------------------------------------------------------------------------------------------------
# Ragged reads: each row's own written blocks


def pair_budgets(rows: int, num_slots: int, block_size: int) -> tuple[int, ...]:
  """How many (row, block) pairs a ragged step may read: R x (1, 2, 3, 4, 6, 8, 12, 16, ...)
  (half octaves, so at most 1.5x the pairs needed are read) below every block of every row
  (R = rows), then that (R x ceil(S / C))."""
  c = max(1, min(block_size, num_slots))
  most = rows * (-(-num_slots // c))
  sizes, w = [], 1
  while rows * w < most:
    sizes.append(rows * w)
    w = w + 1 if w < 2 else (w * 3 // 2 if w & (w - 1) == 0 else w * 4 // 3)
  return tuple(sizes) + (most,)


class _Pairs(NamedTuple):
  """P (row, block) pairs of one row group, in row order: row_P int32 (clipped to the group),
  first_P int32 the block's first slot, start_P int32 where its C slots are read (first_P,
  moved left to fit a bucket S that C does not divide), valid_P bool (False: padding)."""

  row_P: Array
  first_P: Array
  start_P: Array
  valid_P: Array


class RaggedPairs(NamedTuple):
  """A step's (row, block) pairs, one list per row group in row order: the pairs of the budget
  read (the smallest of `pair_budgets` >= need), padded to the largest budget ([D, P] `_Pairs`
  fields, so every budget's branch slices the same arrays), and need: [] int32 the most pairs
  any group reads."""

  pairs: _Pairs
  need: Array


def ragged_pairs(mask: SlotMask, *, block_size: int, row_groups: int = 1) -> RaggedPairs:
  """The pairs `attend_ragged` reads for `mask` (the same in every layer of a step)."""
  b, s = mask.slot_seg_BS.shape
  c = max(1, min(block_size, s))
  if b % row_groups:
    raise ValueError(f"{b} rows do not split into {row_groups} row groups.")
  blocks_DR = _blocks_needed(mask, c).reshape(row_groups, b // row_groups)
  need = jnp.max(jnp.sum(blocks_DR, axis=1))
  budgets = pair_budgets(b // row_groups, s, c)

  def upto(num_pairs: int) -> _Pairs:  # the first num_pairs, padded: work ~ the budget read
    pairs = jax.vmap(lambda n_R: _pairs(n_R, num_pairs, c, s))(blocks_DR)
    return jax.tree.map(lambda x: jnp.pad(x, ((0, 0), (0, budgets[-1] - num_pairs))), pairs)

  pairs = jax.lax.switch(_smallest_holding(budgets, need),
                         [functools.partial(upto, p) for p in budgets])
  return RaggedPairs(pairs, need)


def _pairs(blocks_R: Array, num_pairs: int, block_size: int, num_slots: int) -> _Pairs:
  """The first `num_pairs` (row, block) pairs of rows needing blocks_R [R] blocks each."""
  ends_R = jnp.cumsum(blocks_R)
  p_P = jnp.arange(num_pairs, dtype=jnp.int32)
  row_P = jnp.minimum(jnp.searchsorted(ends_R, p_P, side="right"), blocks_R.shape[0] - 1)
  row_P = row_P.astype(jnp.int32)
  first_P = (p_P - (ends_R - blocks_R)[row_P]) * block_size
  return _Pairs(row_P, first_P, jnp.minimum(first_P, num_slots - block_size),
                p_P < ends_R[-1])


def _read_pairs(k: Array, v: Array, layer: Optional[Array], pairs: _Pairs,
                block_size: int) -> tuple[Array, Array]:
  """The C slots of each pair: (k [P, K, H, C], v [P, K, C, H]) of keys [(L,) R, K, H, S] and
  values [(L,) R, K, S, H] (of `layer` when stacked): one gather of P slices each."""
  return (_gather_blocks(k, layer, pairs, block_size, slot_axis=3),
          _gather_blocks(v, layer, pairs, block_size, slot_axis=2))


def _gather_blocks(x: Array, layer: Optional[Array], pairs: _Pairs, block_size: int, *,
                   slot_axis: int) -> Array:
  """x [(L,) R, a, b, c] -> [P, a, b, c]: C slots along slot_axis (of the unstacked shape)
  from each pair's row and start (of `layer` when stacked)."""
  lead = () if layer is None else (layer,)
  sizes = list(x.shape[len(lead):])
  sizes[0], sizes[slot_axis] = 1, block_size

  def read(row, start):
    starts = [jnp.int32(0)] * len(sizes)
    starts[0], starts[slot_axis] = row, start
    out = jax.lax.dynamic_slice(x, lead + tuple(starts), (1,) * len(lead) + tuple(sizes))
    return out.reshape(sizes[1:])

  return jax.vmap(read)(pairs.row_P, pairs.start_P)


def _ragged_group(q_RKGTH: Array, k: Array, v: Array, mask: SlotMask, layer: Optional[Array],
                  new: Optional[tuple[Array, Array, Array]], pairs: _Pairs, *,
                  block_size: int) -> Array:
  """Attention of one row group [R, ...] over its rows' own written blocks (the P `pairs`)
  and the new tokens, one softmax per query across its blocks (`attend_ragged`)."""
  rows, dtype = q_RKGTH.shape[0], q_RKGTH.dtype
  k_PKHC, v_PKCH = _read_pairs(k, v, layer, pairs, block_size)
  slot_PC = pairs.start_P[:, None] + jnp.arange(block_size, dtype=jnp.int32)[None]
  seg_PC = _gather_blocks(mask.slot_seg_BS, None, pairs, block_size, slot_axis=1)
  query_seg_PT, limit_PT = mask.query_seg_BT[pairs.row_P], mask.limit_BT[pairs.row_P]
  ok_PTC = ((query_seg_PT[:, :, None] == seg_PC[:, None, :]) & (seg_PC[:, None, :] != 0)
            & (slot_PC[:, None, :] < limit_PT[:, :, None])
            & (slot_PC[:, None, :] >= pairs.first_P[:, None, None])  # a moved block's overlap
            & pairs.valid_P[:, None, None])
  s_PKGTC = scores(q_RKGTH[pairs.row_P], k_PKHC, ok_PTC)
  segment = functools.partial(jax.ops.segment_max, segment_ids=pairs.row_P,
                              num_segments=rows, indices_are_sorted=True)
  m_RKGT = segment(jnp.max(s_PKGTC, axis=-1))
  if new is not None:
    s_new = scores(q_RKGTH, new[0], new[2])
    m_RKGT = jnp.maximum(m_RKGT, jnp.max(s_new, axis=-1))
  m_RKGT = jnp.where(jnp.isfinite(m_RKGT), m_RKGT, 0.0)  # rows with nothing to read
  e_PKGTC = jnp.exp(s_PKGTC - m_RKGT[pairs.row_P][..., None])
  total = functools.partial(jax.ops.segment_sum, segment_ids=pairs.row_P, num_segments=rows,
                            indices_are_sorted=True)
  l_RKGT = total(jnp.sum(e_PKGTC, axis=-1))
  o_RKGTH = total(jnp.einsum("pkgtc,pkch->pkgth", e_PKGTC.astype(dtype), v_PKCH.astype(dtype),
                             preferred_element_type=jnp.float32))
  if new is not None:
    e_new = jnp.exp(s_new - m_RKGT[..., None])
    l_RKGT = l_RKGT + jnp.sum(e_new, axis=-1)
    o_RKGTH = o_RKGTH + jnp.einsum("bkgtu,bkuh->bkgth", e_new.astype(dtype),
                                   new[1].astype(dtype), preferred_element_type=jnp.float32)
  return (o_RKGTH / jnp.where(l_RKGT > 0, l_RKGT, 1.0)[..., None]).astype(dtype)


def _blocks_needed(mask: SlotMask, block_size: int) -> Array:
  """[B] int32 blocks of C slots each row reads: up to its queries' furthest limit, none for
  a row whose queries are all padding (a finished row)."""
  limit_B = jnp.max(jnp.where(mask.query_seg_BT != 0, mask.limit_BT, 0), axis=1)
  return (limit_B + block_size - 1) // block_size


def attend_ragged(q_BKGTH: Array, k: Array, v: Array, mask: SlotMask, *, block_size: int,
                  layer: Optional[Array] = None,
                  new: Optional[tuple[Array, Array, Array]] = None,
                  row_groups: int = 1) -> Array:
  """`attend_prefix` where each row reads only its own written blocks of C slots.

  The B rows need n_b = ceil(limit_b / C) blocks each (0 for a finished row); the step reads
  the (row, block) pairs in one gather of P slices, P the smallest of `pair_budgets` that
  holds sum_b n_b (a `lax.switch`), and each query's softmax runs across its row's blocks
  (segment max / sum over the pairs). The work follows the sum of the rows' written lengths
  (1.5x it at most), not B x the longest row, the cost of a dense window when rows are at
  different steps (continuous batching) or have ended (lock step). The gather copies the
  blocks read once.

  Rows are split into `row_groups` equal groups (the batch shards of the mesh), each with its
  own pairs, so a row's blocks are read on the device that holds the row. The pairs come from
  mask.pairs when the caller computed them once for all layers (`ragged_pairs`).

  Args and result as `attend_prefix` (mask.num_slots is not used: each row's limit is).
  """
  b, s = mask.slot_seg_BS.shape
  c, d = max(1, min(block_size, s)), row_groups
  plan = ragged_pairs(mask, block_size=c, row_groups=d) if mask.pairs is None else mask.pairs
  budgets = pair_budgets(b // d, s, c)

  def read(num_pairs: int) -> Array:
    pairs = jax.tree.map(lambda x: x[:, :num_pairs], plan.pairs)
    fn = functools.partial(_ragged_group, layer=layer, block_size=c)
    if d == 1:  # no split: a [1, B, ..] view of a written cache made XLA copy it
      return fn(q_BKGTH, k, v, mask, new=new, pairs=jax.tree.map(lambda x: x[0], pairs))
    return _per_row_group(fn, d, q_BKGTH, k, v, mask, new, pairs, stacked=layer is not None)

  if len(budgets) == 1:
    return read(budgets[0])
  return jax.lax.switch(_smallest_holding(budgets, plan.need),
                        [functools.partial(read, p) for p in budgets])


def _per_row_group(fn: Any, d: int, q_BKGTH: Array, k: Array, v: Array, mask: SlotMask,
                   new: Optional[tuple[Array, Array, Array]], pairs_DP: _Pairs, *,
                   stacked: bool) -> Array:
  """fn (`_ragged_group`) vmapped over d row groups: the rows [B] viewed as [d, B / d] (after
  the layer axis of a stacked cache), one pair list each."""
  b = q_BKGTH.shape[0]
  split = lambda x, axis=0: x.reshape(x.shape[:axis] + (d, b // d) + x.shape[axis + 1:])
  axis = int(stacked)
  groups = (split(q_BKGTH), split(k, axis), split(v, axis),
            SlotMask(*(split(x) for x in mask[:3]), mask.num_slots),
            None if new is None else tuple(split(x) for x in new))
  axes = (0, axis, axis, SlotMask(0, 0, 0, None), None if new is None else (0, 0, 0), 0)
  out = jax.vmap(lambda q, kk, vv, m, nw, pr: fn(q, kk, vv, m, new=nw, pairs=pr),
                 axes)(*groups, pairs_DP)
  return out.reshape((b,) + out.shape[2:])


# ------------------------------------------------------------------------------------------------
# The cheaper of the two, per step

# What a ragged slot costs in window slots: its gather writes a copy that the matmuls read
# again, and the segment max / sum come on top. Chosen, not tuned: with every row at the same
# length ragged ran ~1.1-1.4x the window's time on CPU (benchmarks/decode_scaling.py,
# benchmarks/sampler_vs_hf.py); a GPU's copy costs ~3 slots (the README's qwen7b estimate).
RAGGED_SLOT_COST = 2


def prefers_ragged(mask: SlotMask, *, block_size: int, row_groups: int = 1) -> Array:
  """[] bool: whether `attend_auto` reads this step ragged (mask.pairs set)."""
  b, s = mask.slot_seg_BS.shape
  sizes = window_sizes(s, block_size)
  window = jnp.asarray(sizes, jnp.int32)[_smallest_holding(sizes, mask.num_slots)]
  slots = mask.pairs.need * max(1, min(block_size, s))
  return RAGGED_SLOT_COST * slots <= (b // row_groups) * window


def attend_auto(q_BKGTH: Array, k: Array, v: Array, mask: SlotMask, *, block_size: int,
                layer: Optional[Array] = None,
                new: Optional[tuple[Array, Array, Array]] = None,
                row_groups: int = 1) -> Array:
  """`attend_ragged` when its blocks hold at most 1 / RAGGED_SLOT_COST of the slots the
  prefix window would read for every row (rows at different lengths, or ended), else
  `attend_prefix` (rows at about the same length, as in lock step before any row ends); chosen
  per step by a `lax.cond`. Args and result as `attend_prefix`."""
  if mask.pairs is None:
    mask = mask._replace(pairs=ragged_pairs(mask, block_size=block_size, row_groups=row_groups))
  kw = dict(block_size=block_size, layer=layer, new=new)
  return jax.lax.cond(prefers_ragged(mask, block_size=block_size, row_groups=row_groups),
                      lambda: attend_ragged(q_BKGTH, k, v, mask, row_groups=row_groups, **kw),
                      lambda: attend_prefix(q_BKGTH, k, v, mask, **kw))
