"""Decode attention over a prefix window of the cache, or over each row's own written blocks
(ragged) == attention over the whole cache bucket.

Reference: one softmax over every slot with the unwritten / masked ones biased away (the
decoder's `decode_block_size=0` path, and a numpy softmax here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import models
from lad_jax import sampler as sampler_lib
from lad_jax.models import decode_attention, testing

B, K, G, T, H, S = 3, 2, 2, 2, 8, 20
ATTEND = {"window": decode_attention.attend_prefix, "ragged": decode_attention.attend_ragged,
          "auto": decode_attention.attend_auto}


def _numpy_attention(q, k_BKHS, v_BKSH, mask_BTS):
  """Softmax over the attended slots only (float64), [B, K, G, T, H]."""
  s = np.einsum("bkgth,bkhs->bkgts", q.astype(np.float64), k_BKHS.astype(np.float64))
  s = np.where(mask_BTS[:, None, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bkgts,bksh->bkgth", p, v_BKSH.astype(np.float64))


def _inputs(seed=0, num_slots=S):
  """Queries, keys, values and a `SlotMask` of random segments (0 = empty slot) and per-row,
  per-query limits <= num_slots, with its [B, T, S] numpy equivalent."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, K, G, T, H)).astype(np.float32)
  k = rng.normal(size=(B, K, H, S)).astype(np.float32)
  v = rng.normal(size=(B, K, S, H)).astype(np.float32)
  query_seg = rng.integers(1, 3, (B, T)).astype(np.int32)
  slot_seg = rng.integers(0, 3, (B, S)).astype(np.int32)
  limit = rng.integers(1, num_slots + 1, (B, T)).astype(np.int32)
  slot_seg[np.arange(B)[:, None], 0] = query_seg[:, :1]  # every query attends slot 0 ...
  query_seg[:] = query_seg[:, :1]
  mask = decode_attention.SlotMask(jnp.asarray(query_seg), jnp.asarray(slot_seg),
                                   jnp.asarray(limit), jnp.int32(num_slots))
  want = ((query_seg[:, :, None] == slot_seg[:, None, :]) & (slot_seg[:, None, :] != 0)
          & (np.arange(S)[None, None] < limit[:, :, None]))
  return q, k, v, mask, want


@pytest.mark.parametrize("reader", list(ATTEND))
@pytest.mark.parametrize("block_size", [1, 3, 6, 7, 20, 64])
@pytest.mark.parametrize("num_slots", [1, 13, 20])
def test_reads_equal_one_softmax_over_the_written_slots(reader, block_size, num_slots):
  """Windows (or blocks) of C up to S = 20 with C dividing S (blocks all aligned), not (the
  last block moved left, its overlap masked), and exceeding it; each query attends its own
  segment below its own limit (<= num_slots)."""
  q, k, v, mask, want = _inputs(num_slots=num_slots)
  got = ATTEND[reader](jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask,
                       block_size=block_size)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, want), atol=2e-6)


@pytest.mark.parametrize("row_groups", [1, 3])
def test_ragged_rows_read_only_their_own_blocks(row_groups):
  """Rows at very different limits (1, 20 and a finished row whose queries are padding), in
  one group or one group per row (the mesh's batch shards): the reference for the live rows,
  finite output for the finished one; the budgets read cover exactly the rows' blocks."""
  q, k, v, mask, want = _inputs(4)
  limit = np.array([[1, 1], [20, 20], [9, 9]], np.int32)
  query_seg = np.asarray(mask.query_seg_BT).copy()
  query_seg[2] = 0  # finished: attends nothing, reads no block
  mask = mask._replace(query_seg_BT=jnp.asarray(query_seg), limit_BT=jnp.asarray(limit))
  want = ((query_seg[:, :, None] == np.asarray(mask.slot_seg_BS)[:, None, :])
          & (np.asarray(mask.slot_seg_BS)[:, None, :] != 0)
          & (np.arange(S)[None, None] < limit[:, :, None]))
  got = np.asarray(decode_attention.attend_ragged(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, block_size=3,
      row_groups=row_groups))
  np.testing.assert_allclose(got[:2], _numpy_attention(q[:2], k[:2], v[:2], want[:2]),
                             atol=2e-6)
  assert np.isfinite(got).all()
  np.testing.assert_array_equal(decode_attention._blocks_needed(mask, 3), [1, 7, 0])  # pylint: disable=protected-access


def test_auto_reads_ragged_only_when_it_reads_less():
  """8 rows in a 64-slot cache, blocks of 4: all at 30 slots -> the window (32 slots a row,
  ragged 8 blocks a row: no saving); one at 30 and the rest at 4, or all but one ended -> the
  rows' own blocks (9 or 8 blocks vs 8 x 32 window slots)."""
  def prefers(limits, live=None):
    b = len(limits)
    live = np.ones(b, bool) if live is None else np.asarray(live)
    mask = decode_attention.SlotMask(
        jnp.asarray(live[:, None].astype(np.int32)), jnp.ones((b, 64), jnp.int32),
        jnp.asarray(np.asarray(limits, np.int32)[:, None]),
        jnp.int32(max(np.asarray(limits)[live])))
    mask = mask._replace(pairs=decode_attention.ragged_pairs(mask, block_size=4))
    return bool(decode_attention.prefers_ragged(mask, block_size=4))

  assert not prefers([30] * 8)
  assert prefers([30] + [4] * 7)
  assert prefers([30] * 8, live=[True] + [False] * 7)


def test_pair_budgets_grow_by_half_octaves_up_to_every_block():
  assert decode_attention.pair_budgets(64, 1056, 32) == (
      64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 2112)
  assert decode_attention.pair_budgets(3, 20, 3) == (3, 6, 9, 12, 18, 21)
  assert decode_attention.pair_budgets(2, 5, 64) == (2,)  # C > S: one block of S per row


def test_slot_mask_prefixes_are_the_full_masks_first_slots():
  q, k, v, mask, want = _inputs(3)
  del q, k, v
  np.testing.assert_array_equal(mask.full(), want)
  for w in (1, 7, S):
    np.testing.assert_array_equal(mask.prefix(w), want[..., :w])


@pytest.mark.parametrize("reader", list(ATTEND))
def test_stacked_layer_and_new_tokens_in_one_softmax(reader):
  """Layer 1 of a stacked [L, ...] cache read in a window (or blocks), plus new keys not in
  the cache."""
  q, k, v, mask, want = _inputs(1, num_slots=11)
  rng = np.random.default_rng(2)
  kn, vn = rng.normal(size=(B, K, H, T)).astype(np.float32), rng.normal(
      size=(B, K, T, H)).astype(np.float32)
  mask_new = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
  k_L = jnp.stack([jnp.zeros_like(k), jnp.asarray(k)])
  v_L = jnp.stack([jnp.zeros_like(v), jnp.asarray(v)])
  got = ATTEND[reader](jnp.asarray(q), k_L, v_L, mask, block_size=4, layer=jnp.int32(1),
                       new=(jnp.asarray(kn), jnp.asarray(vn), jnp.asarray(mask_new)))
  want = _numpy_attention(q, np.concatenate([k, kn], -1), np.concatenate([v, vn], 2),
                          np.concatenate([want, mask_new], -1))
  np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("reader", list(ATTEND))
@pytest.mark.parametrize("per_layer", [True, False])
def test_cached_decoder_steps_equal_the_whole_bucket(per_layer, reader):
  """Prefill, then a 3-token step (T > 1: causal among the new tokens) and a 1-token step:
  logits with decode blocks of 4 slots == with attention over the whole 24-slot bucket."""
  cfg = testing.tiny_config("qwen2", decode_attention=reader)
  params = jax.tree.map(jnp.asarray, testing.random_params(cfg))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  mask = jnp.asarray(np.arange(9)[None] >= np.array([[0], [4]]))  # row 1 left-padded

  def run(block):
    c = cfg.replace(decode_block_size=block)
    model = models.Decoder(c)
    cache = models.KVCache.init(c, batch_size=2, max_length=24, per_layer=per_layer)
    out = model.apply({"params": params}, tokens, mask_BT=mask, cache=cache,
                      cache_is_empty=True)
    out2 = model.apply({"params": params}, tokens[:, :3], cache=out.cache)
    out3 = model.apply({"params": params}, tokens[:, 3:4], cache=out2.cache)
    return out2.logits, out3.logits, out3.cache

  old, new = jax.jit(run, static_argnums=0)(0), jax.jit(run, static_argnums=0)(4)
  np.testing.assert_allclose(new[0], old[0], atol=1e-5)
  np.testing.assert_allclose(new[1], old[1], atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), new[2], old[2])


@pytest.mark.parametrize("per_layer,temperature,reader", [
    (True, 1.0, "auto"), (False, 1.0, "auto"), (False, 0.0, "ragged"), (True, 1.0, "ragged"),
    (False, 1.0, "window")])
def test_sampler_equals_whole_bucket_attention(per_layer, temperature, reader):
  """Same key: identical tokens and logp to ~1e-5, decode blocks of 5 slots (so several
  blocks and a clamped last one) vs the whole-bucket attention (`decode_block_size=0`)."""
  base = testing.tiny_config("qwen2", decode_attention=reader)
  params = jax.tree.map(jnp.asarray, testing.random_params(base))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, base.vocab_size, n).tolist() for n in (3, 7, 12, 1)]
  outs = []
  for block in (0, 5):
    smp = sampler_lib.Sampler(models.Decoder(base.replace(decode_block_size=block)),
                              eos_ids=(3, 50), pad_id=0, prompt_buckets=(16,),
                              response_buckets=(24,), per_layer_cache=per_layer)
    outs.append(smp.sample(params, prompts, jax.random.key(1), group_size=3,
                           max_new_tokens=20, temperature=temperature))
  old, new = outs
  np.testing.assert_array_equal(new.response_tokens, old.response_tokens)
  np.testing.assert_array_equal(new.response_mask, old.response_mask)
  np.testing.assert_allclose(new.logp, old.logp, atol=1e-5)
  assert np.asarray(old.lengths).max() > 10  # the cache fills several blocks


def test_window_sizes_double_up_to_the_bucket():
  assert decode_attention.window_sizes(20, 3) == (3, 6, 12, 20)
  assert decode_attention.window_sizes(16, 4) == (4, 8, 16)
  assert decode_attention.window_sizes(5, 64) == (5,)


def test_small_caches_are_read_whole():
  """One or two blocks are read whole (the loop would cost more than it skips); more in blocks;
  decode_block_size=0 never."""
  from lad_jax.models import decoder as decoder_lib
  cfg = testing.tiny_config("qwen2", decode_block_size=128)
  assert not decoder_lib.reads_prefix_window(cfg, 256)
  assert decoder_lib.reads_prefix_window(cfg, 257)
  assert not decoder_lib.reads_prefix_window(cfg.replace(decode_block_size=0), 10_000)
