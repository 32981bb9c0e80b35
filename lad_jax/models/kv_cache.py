"""The decoder's static-size KV cache and its slot writes (lock step or one index per row)."""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from lad_jax.models.config import ModelConfig

Array = jax.Array

CACHE_BKSH = ("cache_batch", "cache_kv_heads", "cache_sequence", None)
CACHE_BKHS = ("cache_batch", "cache_kv_heads", None, "cache_sequence")


@flax.struct.dataclass
class KVCache:
  """Static-size key/value cache for all layers.

  Attributes:
    k: [L, B, K, H, S] keys (after RoPE), v: [L, B, K, S, H] values: both plain matmul
      operands of attention (q @ k and probs @ v) without a transpose; XLA:CPU transposes a
      [.., S, H] key operand on every decode step, which doubled the score cost. A *per-layer*
      cache (`init(..., per_layer=True)`) holds tuples of L arrays [B, K, H, S] / [B, K, S, H]
      instead, and the decoder then runs its layers unrolled (see `Decoder`).
    segment_ids: [B, S] int32 segment id of each slot; 0 = empty or padding (never attended).
    index: the next slot to write: [] int32 shared by all rows (lock step: every call writes
      T slots of every row), or [B] int32 one per row (continuous batching, rows at different
      lengths: a call writes the T slots of the rows that have a non-padding token and only
      those rows' index advances). `KVCache.init(per_row_index=True)` makes the second.
    next_position: [B] int32 RoPE position of the next non-padding token of each row.
  """

  k: Any
  v: Any
  segment_ids: Array
  index: Array
  next_position: Array

  @classmethod
  def init(cls, cfg: ModelConfig, *, batch_size: int, max_length: int,
           dtype: Any = None, per_layer: bool = False, per_row_index: bool = False
           ) -> KVCache:
    """An empty cache; `dtype` defaults to `cfg.dtype`; per_layer: one buffer per layer;
    per_row_index: one write index per row."""
    v_shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
    k_shape = v_shape[:2] + (cfg.head_dim, max_length)
    dtype = cfg.dtype if dtype is None else dtype
    if per_layer:
      k = tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers))
      v = tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers))
    else:
      k = jnp.zeros((cfg.num_layers,) + k_shape, dtype)
      v = jnp.zeros((cfg.num_layers,) + v_shape, dtype)
    return cls(k=k, v=v, segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
               index=jnp.zeros((batch_size,) if per_row_index else (), jnp.int32),
               next_position=jnp.zeros((batch_size,), jnp.int32))

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, (tuple, list))

  @property
  def max_length(self) -> int:
    return self.segment_ids.shape[1]

  @property
  def batch_size(self) -> int:
    return self.segment_ids.shape[0]

  def repeat(self, n: int) -> KVCache:
    """Each row repeated n times ([B] -> [B * n], rows of one prompt adjacent): G samples."""
    return self._map_rows(lambda x, axis: jnp.repeat(x, n, axis=axis))

  def take_rows(self, rows_M: Array) -> KVCache:
    """Rows rows_M [M] of the cache, in that order ([B] -> [M])."""
    return self._map_rows(lambda x, axis: jnp.take(x, rows_M, axis=axis))

  def _map_rows(self, fn: Any) -> KVCache:
    """fn(x, row_axis) applied to every per-row field (a shared [] index is kept)."""
    axis = 0 if self.per_layer else 1
    return KVCache(
        k=jax.tree.map(lambda x: fn(x, axis), self.k),
        v=jax.tree.map(lambda x: fn(x, axis), self.v),
        segment_ids=fn(self.segment_ids, 0),
        index=self.index if self.index.ndim == 0 else fn(self.index, 0),
        next_position=fn(self.next_position, 0))

  @staticmethod
  def logical_axes(num_layers: Optional[int] = None, per_row_index: bool = False) -> KVCache:
    """Logical axis names of every field, for `sharding.logical_shardings`; pass num_layers
    for a per-layer cache, per_row_index for a [B] index."""
    if num_layers is None:
      k, v = ("cache_layers",) + CACHE_BKHS, ("cache_layers",) + CACHE_BKSH
    else:
      k, v = (CACHE_BKHS,) * num_layers, (CACHE_BKSH,) * num_layers
    return KVCache(k=k, v=v, segment_ids=("cache_batch", "cache_sequence"),
                   index=("cache_batch",) if per_row_index else (),
                   next_position=("cache_batch",))


def write_slots(buf: Array, new: Array, index: Array, *, batch_axis: int, slot_axis: int,
                layer: Optional[Array] = None) -> Array:
  """`buf` with `new` written at slots [index, index + T) along `slot_axis`.

  buf: a cache buffer ([(L,) B, ..., S, ...]); new: the T new slots, the same shape with T for
  S (and without the L axis when `layer` is given: then only that layer is written). index: []
  (one start for every row: a dynamic_update_slice) or [B] (one start per row: one scatter;
  slots past S are dropped). Both update a donated / loop-carried buffer in place.
  """
  new = new.astype(buf.dtype)
  if layer is not None:
    new = new[None]
  if jnp.ndim(index) == 0:
    starts: list[Any] = [0] * buf.ndim
    starts[slot_axis] = index
    if layer is not None:
      starts[0] = layer
    return jax.lax.dynamic_update_slice(buf, new, starts)
  return _scatter_rows(buf, new, index, batch_axis, slot_axis, layer)


def _scatter_rows(buf: Array, new: Array, index_B: Array, batch_axis: int, slot_axis: int,
                  layer: Optional[Array]) -> Array:
  """write_slots with one start per row, as one scatter over (row, slot[, layer]) indices.

  Not a vmap of dynamic_update_slice: XLA:CPU turned that into a transpose of the whole
  buffer (batch axis first), the scatter, and a transpose back, every decode step.
  """
  b, t = buf.shape[batch_axis], new.shape[slot_axis]
  axes = (batch_axis, slot_axis) + (() if layer is None else (0,))
  updates = jnp.moveaxis(new, axes, tuple(range(len(axes))))  # [B, T, (1,) window...]
  if layer is not None:
    updates = updates[:, :, 0]
  rows_BT = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
  slots_BT = index_B.astype(jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  parts = [rows_BT, slots_BT]
  if layer is not None:
    parts.append(jnp.broadcast_to(jnp.asarray(layer, jnp.int32), (b, t)))
  window = tuple(d for d in range(buf.ndim) if d not in axes)
  dnums = jax.lax.ScatterDimensionNumbers(
      update_window_dims=tuple(range(2, 2 + len(window))), inserted_window_dims=tuple(sorted(axes)),
      scatter_dims_to_operand_dims=axes)
  return jax.lax.scatter(buf, jnp.stack(parts, axis=-1), updates, dnums, unique_indices=True,
                         mode=jax.lax.GatherScatterMode.FILL_OR_DROP)
