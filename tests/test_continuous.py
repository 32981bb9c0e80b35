"""lad_jax/continuous.py: continuous batching gives the lock-step sampler's rows, whatever the
slot a row lands in.

Reference: `sampler.Sampler` (lock step) with the same key; both draw token i of row r from
fold_in(fold_in(key, i), r), so tokens must match exactly and log-probs up to float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import continuous, models, sampler as sampler_lib, sharding
from lad_jax.models import testing

PAD = 0
G = 3
MAX_NEW = 20
# 6 of the 128 ids end a response: rows end at very different lengths, some are truncated.
EOS_IDS = (3, 50, 77, 91, 104, 120)
LONG_TAIL = list(range(6, 21))  # per-row limits of 15 rows, the last the longest


def _prompts(n=5, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, 128, int(rng.integers(1, 14))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
  cfg = testing.tiny_config("qwen2", decode_block_size=5)  # several blocks, a clamped one
  return cfg, jax.tree.map(jnp.asarray, testing.random_params(cfg))


def _pair(cfg, *, per_layer, slots=4, refill=2, min_decode_slots=None, **kw):
  common = dict(eos_ids=EOS_IDS, pad_id=PAD, prompt_buckets=(16,), response_buckets=(24,),
                per_layer_cache=per_layer, **kw)
  lock = sampler_lib.Sampler(models.Decoder(cfg), **common)
  cont = continuous.ContinuousSampler(models.Decoder(cfg), decode_slots=slots,
                                      refill_rows=refill, min_decode_slots=min_decode_slots,
                                      **common)
  return lock, cont


def _assert_same(a, b):
  for f in ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask", "truncated",
            "lengths"):
    np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), f)
  np.testing.assert_allclose(np.asarray(a.logp), np.asarray(b.logp), atol=2e-5)


@pytest.mark.parametrize("per_layer,temperature", [(False, 1.0), (False, 0.0), (True, 1.0),
                                                   (True, 0.0)])
def test_equals_lock_step(tiny, per_layer, temperature):
  """15 rows through 4 slots (refilled 2 at a time): the lock-step rows, greedy and sampled,
  stacked and per-layer cache."""
  cfg, params = tiny
  lock, cont = _pair(cfg, per_layer=per_layer)
  key = jax.random.key(7)
  want = lock.sample(params, _prompts(), key, group_size=G, max_new_tokens=MAX_NEW,
                     temperature=temperature)
  got = cont.sample(params, _prompts(), key, group_size=G, max_new_tokens=MAX_NEW,
                    temperature=temperature)
  _assert_same(got, want)
  lengths = np.asarray(want.lengths)
  assert lengths.min() <= MAX_NEW // 2 and lengths.max() == MAX_NEW  # slots were refilled


def test_slot_count_does_not_change_rows(tiny):
  """1, 3 and 16 slots (more slots than rows), refill 1 or all: the same rows."""
  cfg, params = tiny
  outs = []
  for slots, refill in ((1, 1), (3, 1), (16, 16)):
    _, cont = _pair(cfg, per_layer=False, slots=slots, refill=refill)
    outs.append(cont.sample(params, _prompts(3, seed=1), jax.random.key(2), group_size=G,
                            max_new_tokens=MAX_NEW))
  _assert_same(outs[1], outs[0])
  _assert_same(outs[2], outs[0])


def test_row_limits_force_lengths(tiny):
  """Per-row limits end rows there (truncated unless the last token is an EOS), the same in
  both samplers."""
  cfg, params = tiny
  lock, cont = _pair(cfg, per_layer=False)
  limits = np.arange(15) % 7 + 1
  kw = dict(group_size=G, max_new_tokens=MAX_NEW, row_limits=limits)
  want = lock.sample(params, _prompts(), jax.random.key(3), **kw)
  got = cont.sample(params, _prompts(), jax.random.key(3), **kw)
  _assert_same(got, want)
  lengths, truncated = np.asarray(got.lengths), np.asarray(got.truncated)
  assert np.all(lengths <= limits)
  hit = lengths == limits
  last = np.asarray(got.response_tokens)[np.arange(15), lengths - 1]
  np.testing.assert_array_equal(truncated, hit & ~np.isin(last, EOS_IDS))
  with pytest.raises(ValueError, match="row_limits"):
    cont.sample(params, _prompts(), jax.random.key(3), group_size=G, max_new_tokens=MAX_NEW,
                row_limits=[MAX_NEW + 1] * 15)


def test_rows_stream_out_as_they_end(tiny):
  """on_rows sees every row once, with its final tokens, short rows before the longest."""
  cfg, params = tiny
  _, cont = _pair(cfg, per_layer=False)
  seen = []
  out = cont.sample(params, _prompts(), jax.random.key(7), group_size=G,
                    max_new_tokens=MAX_NEW, on_rows=seen.append)
  rows = np.concatenate([f.rows for f in seen])
  assert sorted(rows.tolist()) == list(range(15)) and len(seen) > 2
  tokens = np.asarray(out.response_tokens)
  for f in seen:
    np.testing.assert_array_equal(f.response_tokens, tokens[f.rows])
    np.testing.assert_array_equal(f.lengths, np.asarray(out.lengths)[f.rows])
  first, last = seen[0].lengths.max(), seen[-1].lengths.max()
  assert first < last


def test_stop_strings_equal_lock_step(tiny):
  """Stop strings are cut per row as rows end: the lock-step result."""

  class Letters:
    def decode(self, ids, skip_special_tokens=False):
      del skip_special_tokens
      return "".join(chr(97 + i % 26) for i in ids)

  cfg, params = tiny
  lock, cont = _pair(cfg, per_layer=False, stop_strings=("e", "q"), tokenizer=Letters())
  kw = dict(group_size=G, max_new_tokens=MAX_NEW)
  want = lock.sample(params, _prompts(), jax.random.key(4), **kw)
  got = cont.sample(params, _prompts(), jax.random.key(4), **kw)
  _assert_same(got, want)
  assert np.asarray(got.lengths).min() < MAX_NEW


def test_outputs_trimmed_to_the_length_bucket(tiny):
  """length_bucket=8: both samplers return the longest response rounded up to 8 columns, the
  untrimmed output's first columns (and no row loses a token)."""
  cfg, params = tiny
  full = _pair(cfg, per_layer=False)[1].sample(
      params, _prompts(2, seed=3), jax.random.key(1), group_size=G, max_new_tokens=MAX_NEW,
      row_limits=[3, 9, 5, 2, 1, 4])
  width = -(-int(np.max(full.lengths)) // 8) * 8
  assert width < 24 and full.response_tokens.shape == (6, 24)
  for smp in _pair(cfg, per_layer=False, length_bucket=8):
    got = smp.sample(params, _prompts(2, seed=3), jax.random.key(1), group_size=G,
                     max_new_tokens=MAX_NEW, row_limits=[3, 9, 5, 2, 1, 4])
    assert got.response_tokens.shape == (6, width)
    for f in ("response_tokens", "response_mask"):
      np.testing.assert_array_equal(getattr(got, f), np.asarray(getattr(full, f))[:, :width])
    # Lock step and continuous may read the cache differently (`decode_attention=auto`).
    np.testing.assert_allclose(got.logp, np.asarray(full.logp)[:, :width], atol=2e-5)
    np.testing.assert_array_equal(got.lengths, full.lengths)


@pytest.mark.parametrize("least,traces", [(None, 4), (4, 2)])
def test_compiles_once_per_bucket(tiny, least, traces):
  """One insert and one decode per slot count: 4, then 2 and 1 as the tail shrinks (the
  default), or 4 only (min_decode_slots = decode_slots); the second call compiles nothing."""
  cfg, params = tiny
  _, cont = _pair(cfg, per_layer=False, min_decode_slots=least)
  for seed in range(2):
    cont.sample(params, _prompts(seed=seed), jax.random.key(seed), group_size=G,
                max_new_tokens=MAX_NEW, row_limits=LONG_TAIL)
    assert cont.num_traces == traces


def test_tail_shrinks_to_the_active_rows(tiny):
  """16 slots, 15 rows, min 2: once no row waits, the slots halve whenever the active rows
  fit (16 -> 8 -> 4 -> 2), and the rows are the lock-step ones."""
  cfg, params = tiny
  lock, cont = _pair(cfg, per_layer=False, slots=16, refill=16, min_decode_slots=2)
  sizes = []
  fns_for = cont._fns_for  # pylint: disable=protected-access

  def spy(*args):
    fns = fns_for(*args)
    def decode(params, slots, *rest):
      sizes.append(slots.done_N.shape[0])
      return fns.decode(params, slots, *rest)
    return fns._replace(decode=decode)

  cont._fns_for = spy  # pylint: disable=protected-access
  kw = dict(group_size=G, max_new_tokens=MAX_NEW, row_limits=LONG_TAIL)
  _assert_same(cont.sample(params, _prompts(), jax.random.key(3), **kw),
               lock.sample(params, _prompts(), jax.random.key(3), **kw))
  assert sizes[0] == 16 and sizes[-1] < 16 and sizes == sorted(sizes, reverse=True)
  assert set(sizes) <= {16, 8, 4, 2}


@pytest.mark.parametrize("refill", range(1, 13))
def test_refill_prompts_holds_every_refill(refill):
  """refill_prompts(G) is the most prompts any refill_rows consecutive rows span, for every
  start row (brute force)."""
  cont = continuous.ContinuousSampler(models.Decoder(testing.tiny_config()), eos_ids=(),
                                      pad_id=0, decode_slots=12, refill_rows=refill)
  for g in range(1, 10):
    most = max(len({r // g for r in range(a, a + refill)}) for a in range(2 * g))
    assert cont.refill_prompts(g) == most, (refill, g)


def test_refills_prefill_each_prompt_once(tiny):
  """During a call every refill prefills refill_prompts(G) prompts, each of its rows pointing
  at its own prompt; a refill equals one that prefills every row's prompt on its own."""
  cfg, params = tiny
  _, cont = _pair(cfg, per_layer=False, slots=8, refill=5, min_decode_slots=8)  # one decode
  prompts, refills = _prompts(), []
  fns_for = cont._fns_for  # pylint: disable=protected-access

  def spy(*args):
    fns = fns_for(*args)
    def insert(params, slots, refill, key):
      refills.append(
          (jax.tree.map(np.asarray, refill), jax.tree.map(np.asarray, slots)))
      return fns.insert(params, slots, refill, key)
    return fns._replace(insert=insert)

  cont._fns_for = spy  # pylint: disable=protected-access
  cont.sample(params, prompts, jax.random.key(1), group_size=G, max_new_tokens=MAX_NEW)
  tokens_PT, _ = sampler_lib.left_pad(prompts, 16, PAD)
  for refill, _ in refills:
    assert refill.tokens_UT.shape == (cont.refill_prompts(G), 16)  # 5 rows, 3 prompts
    used = refill.slot_K < 8
    np.testing.assert_array_equal(refill.tokens_UT[refill.prompt_K[used]],
                                  tokens_PT[refill.row_K[used] // G])
  refill, before = refills[1]  # rows 5-9: prompts 1, 2, 3
  sampling = continuous.Sampling(1.0, 1.0, 0)
  shared = fns_for(16, 24, sampling).insert(params, jax.tree.map(jnp.asarray, before), refill,
                                            jax.random.key(1))
  _, one_by_one = _pair(cfg, per_layer=False, slots=8, refill=1)
  alone = jax.tree.map(jnp.asarray, before)
  for i in range(5):  # each row on its own: its prompt prefilled for it alone
    row = continuous.Refill(
        slot_K=refill.slot_K[i:i + 1], tokens_UT=refill.tokens_UT[refill.prompt_K[i:i + 1]],
        mask_UT=refill.mask_UT[refill.prompt_K[i:i + 1]], prompt_K=np.zeros(1, np.int32),
        row_K=refill.row_K[i:i + 1], limit_K=refill.limit_K[i:i + 1])
    alone = one_by_one._fns_for(16, 24, sampling).insert(  # pylint: disable=protected-access
        params, alone, row, jax.random.key(1))
  for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(alone)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_sharded_equals_unsharded(tiny):
  """8 simulated devices (data 2 x fsdp 2 x tensor 2): the single-device rows."""
  cfg, params = tiny
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  _, plain = _pair(cfg, per_layer=False, slots=8, refill=4)
  _, sharded = _pair(cfg, per_layer=False, slots=8, refill=4, mesh=mesh)
  kw = dict(group_size=G, max_new_tokens=MAX_NEW)
  _assert_same(sharded.sample(params, _prompts(), jax.random.key(5), **kw),
               plain.sample(params, _prompts(), jax.random.key(5), **kw))


def test_bad_arguments(tiny):
  cfg, _ = tiny
  with pytest.raises(ValueError, match="decode_slots"):
    continuous.ContinuousSampler(models.Decoder(cfg), eos_ids=(), pad_id=0, decode_slots=0)
  with pytest.raises(ValueError, match="refill_rows"):
    continuous.ContinuousSampler(models.Decoder(cfg), eos_ids=(), pad_id=0, decode_slots=2,
                                 refill_rows=3)
  for least in (0, 3):
    with pytest.raises(ValueError, match="min_decode_slots"):
      continuous.ContinuousSampler(models.Decoder(cfg), eos_ids=(), pad_id=0, decode_slots=2,
                                   min_decode_slots=least)
