"""lad_jax/models/kv_cache.py: slot writes with one index for all rows or one per row."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lad_jax.models import kv_cache


def test_per_row_writes_land_at_each_rows_index():
  """[B, K, S, H] values: row b gets its T new slots at index[b]; a shared index equals the
  per-row write with every row at that index (reference: numpy slice assignment)."""
  rng = np.random.default_rng(0)
  buf = rng.normal(size=(3, 2, 10, 4)).astype(np.float32)
  new = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  index = np.array([0, 5, 8], np.int32)
  got = kv_cache.write_slots(jnp.asarray(buf), jnp.asarray(new), jnp.asarray(index),
                             batch_axis=0, slot_axis=2)
  want = buf.copy()
  for b, i in enumerate(index):
    want[b, :, i:i + 2] = new[b]
  np.testing.assert_array_equal(got, want)
  shared = kv_cache.write_slots(jnp.asarray(buf), jnp.asarray(new), jnp.int32(5),
                                batch_axis=0, slot_axis=2)
  same = kv_cache.write_slots(jnp.asarray(buf), jnp.asarray(new), jnp.full((3,), 5, jnp.int32),
                              batch_axis=0, slot_axis=2)
  np.testing.assert_array_equal(shared, same)


def test_stacked_layer_write_touches_only_that_layer():
  """[L, B, K, H, S] keys, layer 1, per-row index: the other layer is unchanged."""
  rng = np.random.default_rng(1)
  buf = rng.normal(size=(2, 3, 2, 4, 10)).astype(np.float32)
  new = rng.normal(size=(3, 2, 4, 1)).astype(np.float32)
  index = np.array([9, 0, 4], np.int32)
  got = np.asarray(kv_cache.write_slots(jnp.asarray(buf), jnp.asarray(new), jnp.asarray(index),
                                        batch_axis=1, slot_axis=4, layer=jnp.int32(1)))
  want = buf.copy()
  for b, i in enumerate(index):
    want[1, b, :, :, i] = new[b, :, :, 0]
  np.testing.assert_array_equal(got, want)


def test_per_row_index_advances_only_rows_with_tokens():
  """A decode step where row 1 is padding: its index and position stay, the others move on."""
  from lad_jax import models  # pylint: disable=g-import-not-at-top
  from lad_jax.models import testing  # pylint: disable=g-import-not-at-top
  cfg = testing.tiny_config("qwen2")
  params = testing.random_params(cfg)
  model = models.Decoder(cfg)
  cache = models.KVCache.init(cfg, batch_size=2, max_length=12, per_row_index=True)
  tokens = jnp.asarray([[5, 6, 7], [0, 8, 9]], jnp.int32)
  out = model.apply({"params": params}, tokens, mask_BT=tokens != 0, cache=cache,
                    cache_is_empty=True)
  np.testing.assert_array_equal(out.cache.index, [3, 3])
  step = model.apply({"params": params}, jnp.asarray([[4], [0]], jnp.int32),
                     mask_BT=jnp.asarray([[True], [False]]), cache=out.cache)
  np.testing.assert_array_equal(step.cache.index, [4, 3])
  np.testing.assert_array_equal(step.cache.next_position, [4, 2])
