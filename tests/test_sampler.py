"""lad_jax/sampler.py vs transformers' generate and warpers, and a teacher-forced forward."""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import models, sampler as sampler_lib, sharding
from lad_jax.models import testing

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Prompts of different lengths (ids < vocab 128), all in the 16-token bucket.
PROMPTS = [[5, 17, 99, 3, 42, 8, 77, 120, 64], [11, 2, 93, 50, 7, 31], [101, 13, 4],
           [9, 8, 7, 6, 5, 4, 3, 2, 1, 60, 61, 62]]
G = 4
MAX_NEW = 8
# 16 of the 128 ids end a response: most rows of 8 tokens stop early, some are truncated.
EOS_IDS = tuple(range(3, 128, 8))
PAD = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(hf model, cfg, params) of a random Qwen2 (q/k/v biases, untied head, GQA)."""
  hf, d = testing.tiny_hf_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")
  cfg, params = models.load_hf(d)
  return hf, cfg, params


@pytest.fixture(scope="module")
def sampler(tiny):
  """One sampler (so one compile per bucket key) shared by the sampling tests."""
  _, cfg, _ = tiny
  return sampler_lib.Sampler(models.Decoder(cfg), eos_ids=EOS_IDS, pad_id=PAD,
                             prompt_buckets=(16, 32), response_buckets=(MAX_NEW, 16))


@pytest.fixture(scope="module")
def samples(tiny, sampler):
  """temperature -> SampleOutput of PROMPTS x G with key 0."""
  _, _, params = tiny
  return {t: sampler.sample(params, PROMPTS, jax.random.key(0), group_size=G,
                            max_new_tokens=MAX_NEW, temperature=t) for t in (1.0, 0.7)}


@functools.partial(jax.jit, static_argnames=("cfg", "temperature"))
def _teacher_logp(params, tokens, mask, *, cfg, temperature=1.0):
  """forward_logprobs of full sequences (jitted: eager Flax scans are slow)."""
  return models.forward_logprobs(models.Decoder(cfg), params, tokens, mask_BT=mask,
                                 temperature=temperature)


def _full_sequence(out):
  tokens = np.concatenate([out.prompt_tokens, out.response_tokens], axis=1)
  mask = np.concatenate([out.prompt_mask, out.response_mask], axis=1)
  return tokens, mask


def _check_rows(out, eos_ids, max_new):
  """Structural invariants of every row of a SampleOutput."""
  tok, msk = np.asarray(out.response_tokens), np.asarray(out.response_mask)
  lp, trunc, lens = np.asarray(out.logp), np.asarray(out.truncated), np.asarray(out.lengths)
  for r in range(tok.shape[0]):
    n = lens[r]
    np.testing.assert_array_equal(msk[r], np.arange(tok.shape[1]) < n)
    assert np.all(tok[r, n:] == PAD) and np.all(lp[r, n:] == 0.0)
    is_eos = np.isin(tok[r, :n], eos_ids)
    if trunc[r]:
      assert n == max_new and not is_eos.any()
    else:
      assert 1 <= n <= max_new and is_eos[-1] and not is_eos[:-1].any()
    assert np.all(lp[r, :n] < 0.0)


def test_greedy_equals_transformers_generate(tiny):
  """temperature=0 is argmax decoding; HF generate(do_sample=False) per unpadded prompt."""
  hf, cfg, params = tiny
  with torch.no_grad():
    free = [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW,
                        min_new_tokens=MAX_NEW)[0, len(p):].tolist() for p in PROMPTS]
  eos = free[0][3]  # a token the greedy path of prompt 0 emits: that row must stop there
  refs, ref_logps = [], []
  with torch.no_grad():
    for p in PROMPTS:
      gen = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW,
                        eos_token_id=eos, pad_token_id=PAD, output_logits=True,
                        return_dict_in_generate=True)
      refs.append(gen.sequences[0, len(p):].tolist())
      ref_logps.append([torch.log_softmax(l[0], -1)[t].item()
                        for l, t in zip(gen.logits, refs[-1])])
  smp = sampler_lib.Sampler(models.Decoder(cfg), eos_ids=[eos], pad_id=PAD,
                            prompt_buckets=(16,))
  out = smp.sample(params, PROMPTS, jax.random.key(1), group_size=2, max_new_tokens=MAX_NEW,
                   temperature=0.0)
  tok, lens = np.asarray(out.response_tokens), np.asarray(out.lengths)
  assert lens[0] <= 4  # stopped at (or before) the chosen EOS
  for r in range(2 * len(PROMPTS)):
    ref = refs[r // 2]
    assert tok[r, :lens[r]].tolist() == ref, (r, tok[r], ref)
    assert bool(out.truncated[r]) == (eos not in ref)
    # Greedy logp is the temperature-1 log-probability of the chosen token.
    np.testing.assert_allclose(np.asarray(out.logp)[r, :lens[r]], ref_logps[r // 2], atol=1e-4)
  _check_rows(out, [eos], MAX_NEW)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logp_equals_teacher_forced_forward(tiny, samples, temperature):
  _, cfg, params = tiny
  out = samples[temperature]
  tokens, mask = _full_sequence(out)
  ref = _teacher_logp(params, tokens, mask, cfg=cfg, temperature=temperature)
  p = out.prompt_tokens.shape[1]
  resp_mask = np.asarray(out.response_mask)
  assert resp_mask.sum() > 2 * len(PROMPTS)  # enough scored tokens for the check to bite
  np.testing.assert_allclose(np.where(resp_mask, out.logp, 0.0),
                             np.where(resp_mask, ref[:, p:], 0.0), atol=1e-4, rtol=0)


def test_groups_eos_truncation_and_determinism(tiny, sampler, samples):
  _, _, params = tiny
  out = samples[1.0]
  n = len(PROMPTS) * G
  assert out.response_tokens.shape == (n, MAX_NEW) and out.prompt_tokens.shape == (n, 16)
  # Prompt side: left-padded, the G rows of a prompt adjacent.
  for r in range(n):
    p = PROMPTS[r // G]
    assert np.asarray(out.prompt_tokens)[r, 16 - len(p):].tolist() == p
    assert np.asarray(out.prompt_mask)[r].sum() == len(p)
  tok = np.asarray(out.response_tokens)
  for i in range(len(PROMPTS)):  # the G samples of a prompt are not copies of each other
    assert len({tuple(row) for row in tok[i * G:(i + 1) * G]}) > 1
  _check_rows(out, EOS_IDS, MAX_NEW)
  trunc = np.asarray(out.truncated)
  assert trunc.any() and not trunc.all()  # both kinds of rows occur, so both were checked
  again = sampler.sample(params, PROMPTS, jax.random.key(0), group_size=G,
                         max_new_tokens=MAX_NEW, temperature=1.0)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  other = sampler.sample(params, PROMPTS, jax.random.key(1), group_size=G,
                         max_new_tokens=MAX_NEW, temperature=1.0)
  assert not np.array_equal(other.response_tokens, out.response_tokens)


def test_same_bucket_does_not_recompile(tiny, sampler, samples):
  _, _, params = tiny
  del samples  # compiled the (16, 8, 4 prompts, G, temperature 1) functions
  before = sampler.num_traces
  prompts = [[1, 2], [3] * 16, [4, 5, 6], [7] * 10]  # other lengths, same 16-token bucket
  out = sampler.sample(params, prompts, jax.random.key(5), group_size=G, max_new_tokens=5,
                       temperature=1.0)  # 5 new tokens: still the 8-token response bucket
  assert sampler.num_traces == before
  assert out.response_tokens.shape == (len(prompts) * G, MAX_NEW)
  _check_rows(out, EOS_IDS, 5)
  assert not np.asarray(out.response_mask)[:, 5:].any()


@pytest.mark.parametrize("per_layer_cache", [True, False])
def test_sharded_equals_unsharded(tiny, samples, per_layer_cache):
  """On 8 devices, with the per-layer cache (CPU's default, as `samples`) or the stacked one
  (the layer scan, the default on GPU / TPU): the same rollouts."""
  _, cfg, params = tiny
  assert sampler_lib.Sampler(models.Decoder(cfg), eos_ids=EOS_IDS, pad_id=PAD).per_layer_cache
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  smp = sampler_lib.Sampler(models.Decoder(cfg), eos_ids=EOS_IDS, pad_id=PAD, mesh=mesh,
                            prompt_buckets=(16, 32), response_buckets=(MAX_NEW, 16),
                            per_layer_cache=per_layer_cache)
  out = smp.sample(params, PROMPTS, jax.random.key(0), group_size=G, max_new_tokens=MAX_NEW,
                   temperature=1.0)
  ref = samples[1.0]
  # Rows really are split over data x fsdp (4 ways).
  for x in (out.response_tokens, out.prompt_tokens, out.logp):
    assert x.sharding.shard_shape(x.shape)[0] == x.shape[0] // 4
  np.testing.assert_array_equal(out.prompt_tokens, ref.prompt_tokens)
  np.testing.assert_array_equal(out.response_tokens, ref.response_tokens)
  np.testing.assert_array_equal(out.response_mask, ref.response_mask)
  np.testing.assert_array_equal(out.truncated, ref.truncated)
  np.testing.assert_allclose(out.logp, ref.logp, atol=1e-5, rtol=0)


def test_truncation_matches_transformers_warpers():
  """top-k then top-p as HF's TopKLogitsWarper / TopPLogitsWarper (min_tokens_to_keep=1)."""
  rng = np.random.default_rng(0)
  logits = (3.0 * rng.standard_normal((6, 50))).astype(np.float32)
  for top_k, top_p in [(0, 0.9), (7, 1.0), (10, 0.5), (0, 0.05)]:
    ref = torch.from_numpy(logits.copy())
    if top_k:
      ref = transformers.TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
      ref = transformers.TopPLogitsWarper(top_p)(None, ref)
    got = np.asarray(sampler_lib.truncate_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref.numpy()), err_msg=(top_k,
                                                                                      top_p))
    np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])


def test_top_k_top_p_logp_is_of_the_truncated_distribution(tiny, sampler):
  hf, cfg, params = tiny
  top_k, top_p, temperature = 12, 0.8, 0.7
  out = sampler.sample(params, PROMPTS[:2], jax.random.key(3), group_size=G,
                       max_new_tokens=MAX_NEW, temperature=temperature, top_k=top_k,
                       top_p=top_p)
  tokens, mask = _full_sequence(out)
  p = out.prompt_tokens.shape[1]
  for r in range(tokens.shape[0]):
    keep = mask[r]
    with torch.no_grad():  # teacher-forced logits of the unpadded row, HF warpers applied
      logits = hf(torch.tensor(tokens[r, keep][None].astype(np.int64))).logits[0] / temperature
      warped = transformers.TopPLogitsWarper(top_p)(
          None, transformers.TopKLogitsWarper(top_k)(None, logits))
      ref_logp = torch.log_softmax(warped, -1).numpy()
    n_prompt = int(mask[r, :p].sum())
    for j in range(int(out.lengths[r])):
      t = tokens[r, p + j]
      lp = ref_logp[n_prompt + j - 1, t]
      assert np.isfinite(lp), (r, j)  # the sampled token survived truncation
      np.testing.assert_allclose(float(out.logp[r, j]), lp, atol=1e-4)


class _LetterTokenizer:
  """Stub tokenizer: id i decodes to the letter chr(97 + i % 26)."""

  def decode(self, ids, skip_special_tokens=False):
    del skip_special_tokens
    return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_cut_after_the_completing_token(samples):
  out = samples[1.0]
  tok, lens = np.asarray(out.response_tokens), np.asarray(out.lengths)
  r = int(np.argmax(lens))  # a row with >= 3 tokens
  assert lens[r] >= 3
  text = _LetterTokenizer().decode(tok[r, :lens[r]].tolist())
  stop = text[1:3]  # completed by token 2 (or earlier if it also occurs at 0..1)
  k = text.index(stop) + len(stop)
  cut = sampler_lib.apply_stop_strings(out, stop_strings=[stop, "#never#"],
                                       tokenizer=_LetterTokenizer(), pad_id=PAD)
  assert int(cut.lengths[r]) == k and not bool(cut.truncated[r])
  np.testing.assert_array_equal(np.asarray(cut.response_tokens)[r, :k], tok[r, :k])
  assert np.all(np.asarray(cut.response_tokens)[r, k:] == PAD)
  assert np.all(np.asarray(cut.logp)[r, k:] == 0.0)
  np.testing.assert_array_equal(np.asarray(cut.response_mask)[r], np.arange(MAX_NEW) < k)
  for q in range(tok.shape[0]):  # rows whose text never contains the stop are unchanged
    if stop not in _LetterTokenizer().decode(tok[q, :lens[q]].tolist()):
      np.testing.assert_array_equal(np.asarray(cut.response_tokens)[q], tok[q])
      assert bool(cut.truncated[q]) == bool(out.truncated[q])


def test_bad_arguments_are_clear_errors(tiny, sampler):
  _, cfg, params = tiny
  with pytest.raises(ValueError, match="exceeds the largest bucket 32.*prompt_buckets"):
    sampler.sample(params, [[1] * 40], jax.random.key(0), group_size=1, max_new_tokens=4)
  with pytest.raises(ValueError, match="max_new_tokens of 17.*response_buckets"):
    sampler.sample(params, [[1]], jax.random.key(0), group_size=1, max_new_tokens=17)
  with pytest.raises(ValueError, match="at least one token"):
    sampler.sample(params, [[]], jax.random.key(0), group_size=1, max_new_tokens=4)
  with pytest.raises(ValueError, match="top_p"):
    sampler.sample(params, [[1]], jax.random.key(0), group_size=1, max_new_tokens=4, top_p=0.0)
  with pytest.raises(ValueError, match="tokenizer"):
    sampler_lib.Sampler(models.Decoder(cfg), eos_ids=[1], pad_id=0, stop_strings=["\n\n"])
  with pytest.raises(ValueError, match="outside the vocabulary"):
    sampler_lib.Sampler(models.Decoder(cfg), eos_ids=[1000], pad_id=0)


@pytest.mark.parametrize("per_layer", [False, True])
def test_cache_is_in_the_model_dtype(per_layer):
  """A bf16 model samples with a bf16 cache (abstract evaluation only: no compile)."""
  cfg = testing.tiny_config("llama", dtype="bfloat16", param_dtype="bfloat16")
  smp = sampler_lib.Sampler(models.Decoder(cfg), eos_ids=[1], pad_id=0, prompt_buckets=(8,),
                            per_layer_cache=per_layer)
  build = smp._build  # pylint: disable=protected-access
  prefill, _ = build(prompt_len=8, response_len=4, num_prompts=2, group_size=3, temperature=1.0,
                     top_p=1.0, top_k=0)
  params, _ = models.abstract_params(cfg)
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  cache, logits = jax.eval_shape(prefill, params, tokens, jax.ShapeDtypeStruct((2, 8), bool))
  expected = jax.eval_shape(lambda: models.KVCache.init(cfg, batch_size=6, max_length=12,
                                                        per_layer=per_layer))
  assert cache.per_layer == per_layer
  leaves, want = jax.tree.leaves((cache.k, cache.v)), jax.tree.leaves((expected.k, expected.v))
  assert len(leaves) == (2 * cfg.num_layers if per_layer else 2)
  assert all(x.dtype == jnp.bfloat16 for x in leaves)
  # G copies of each prompt, prompt + response slots
  assert [x.shape for x in leaves] == [x.shape for x in want]
  assert logits.dtype == jnp.float32 and logits.shape == (6, cfg.vocab_size)


def test_categorical_draws_from_the_softmax():
  """Inverse-CDF draws over several 512-id blocks (V not a multiple of 512) match softmax:
  every frequency within 5.5 binomial standard deviations (a false alarm has probability
  < 1e-4 over all ids), and -inf ids are never drawn."""
  rng = np.random.default_rng(0)
  v, n = 1300, 100_000
  logits = (2.0 * rng.standard_normal(v)).astype(np.float32)
  logits[[5, 600, 1299]] += 6.0  # heavy ids in the first, a middle and the ragged last block
  masked = rng.choice(v, 200, replace=False)
  logits[masked] = -np.inf
  p = np.exp(logits - logits.max())
  p /= p.sum()
  draw = jax.jit(lambda key: sampler_lib.categorical(
      key, jnp.broadcast_to(jnp.asarray(logits), (n, v))))
  counts = np.bincount(np.asarray(draw(jax.random.key(1))), minlength=v)
  assert counts.shape == (v,) and counts[masked].sum() == 0
  sd = np.sqrt(n * p * (1 - p))
  z = np.abs(counts - n * p)[p > 0] / sd[p > 0]
  assert z.max() < 5.5, z.max()


def test_first_above_never_returns_a_zero_mass_index():
  # x at the top of the cdf (rounding): the last positive-mass index, not the padding after it.
  cdf = jnp.asarray([[0.0, 1.0, 1.0, 3.0, 3.0]] * 3)
  valid = jnp.asarray([[False, True, False, True, False]] * 3)
  got = sampler_lib._first_above(cdf, jnp.asarray([0.0, 1.0, 3.0]), valid)  # pylint: disable=protected-access
  np.testing.assert_array_equal(got, [1, 3, 3])


@pytest.mark.parametrize("rows", [1, 3 * G + 1])
def test_rows_per_call_chunks_equal_one_call(tiny, samples, rows):
  """Chunks of 1 or 3 prompts (the last one padded) give the rows of a single call: a row's
  draws depend on its global index only. One compile serves every chunk."""
  _, cfg, params = tiny
  smp = sampler_lib.Sampler(models.Decoder(cfg), eos_ids=EOS_IDS, pad_id=PAD,
                            prompt_buckets=(16, 32), response_buckets=(MAX_NEW, 16),
                            rows_per_call=rows)
  out = smp.sample(params, PROMPTS, jax.random.key(0), group_size=G, max_new_tokens=MAX_NEW,
                   temperature=1.0)
  assert smp.num_traces == 2  # prefill + decode, once
  ref = samples[1.0]
  for name in ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask",
               "truncated", "lengths"):
    np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)
  np.testing.assert_allclose(out.logp, ref.logp, atol=1e-5, rtol=0)


def _while_body_computations(hlo: str) -> set[str]:
  """Names of the computations run inside the while loops of the entry computation (their
  bodies and everything they call, transitively), from compiled HLO text."""
  calls, current, entry = {}, None, None
  for line in hlo.splitlines():
    head = re.match(r"^(ENTRY )?%([\w.-]+) ", line)
    if head:
      current = head.group(2)
      entry = current if head.group(1) else entry
      calls[current] = []
    elif current is not None:
      calls[current] += [(m.group(1), m.group(2)) for m in re.finditer(
          r"\b(body|condition|calls|to_apply|branch_computations)=\{?%([\w.-]+)", line)]
  todo = [c for kind, c in calls[entry] if kind == "body"]
  seen = set()
  while todo:
    c = todo.pop()
    if c not in seen:
      seen.add(c)
      todo += [callee for _, callee in calls.get(c, [])]
  return seen


def _weight_all_gathers(hlo: str, weight_shapes: set[tuple[int, ...]]) -> int:
  """all-gather ops inside the decode while loop whose operand is a weight shard (or a layer
  of one): the per-step weight gathers of FSDP."""
  inside = _while_body_computations(hlo)
  shapes, current, gathers = {}, None, []
  for line in hlo.splitlines():
    head = re.match(r"^(ENTRY )?%([\w.-]+) ", line)
    if head:
      current = head.group(2)
      continue
    ins = re.match(r"^\s*(?:ROOT )?%([\w.-]+) = \w+\[([\d,]*)\]\S* ([\w-]+)\(%([\w.-]+)",
                   line)
    if ins:
      shapes[ins.group(1)] = tuple(int(d) for d in ins.group(2).split(",") if d)
      if ins.group(3) == "all-gather" and current in inside:
        gathers.append(ins.group(4))
  return sum(shapes.get(operand) in weight_shapes for operand in gathers)


def _decode_weight_gathers(smp, cfg, mesh, train_shardings) -> int:
  """Compiles `smp`'s decode loop (abstract inputs) and counts its per-step weight gathers:
  all-gathers whose operand is a shard (or a layer of one) of a parameter in the trainer's
  `train_shardings`."""
  prefill, decode = smp._compiled_fns(prompt_len=16, response_len=8, num_prompts=4,
                                      group_size=G, temperature=1.0, top_p=1.0, top_k=0)
  params = jax.eval_shape(lambda: testing.random_params(cfg))
  tokens = jax.ShapeDtypeStruct((4, 16), jnp.int32)
  with sharding.use_mesh(mesh):
    cache, logits = jax.eval_shape(prefill, params, tokens, jax.ShapeDtypeStruct((4, 16), bool))
    hlo = decode.lower(params, cache, logits, jax.random.key(0), np.int32(8), np.int32(0),
                       jax.ShapeDtypeStruct((4 * G,), jnp.int32)).compile().as_text()
  weight_shapes = set()
  for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(train_shardings)):
    shard = tuple(s.shard_shape(p.shape))
    weight_shapes |= {shard, shard[1:]}  # a stacked layer weight, or one layer of it
  return _weight_all_gathers(hlo, weight_shapes)


@pytest.mark.parametrize("per_layer_cache", [True, False])
def test_decode_loop_does_not_all_gather_weights(per_layer_cache):
  """With the trainer's mesh (the default config: fsdp over all 8 simulated devices), the
  compiled decode loop gathers no weights per step: the sampler gathers the fsdp splits once
  per rollout, before the loop (`decode_param_rules`). With the trainer's parameter
  shardings instead, the layer scan gathers each of its 7 weight matrices at every step
  (the unrolled per-layer loop has them hoisted out of the loop by XLA)."""
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
  from lad_jax import components, config_utils  # pylint: disable=g-import-not-at-top
  mesh = components.make_mesh(config_utils.base_config())
  assert dict(mesh.shape)["fsdp"] == 8
  cfg = testing.tiny_config("qwen2", intermediate_size=128)
  train_shardings = models.param_shardings(cfg, mesh)
  smp = sampler_lib.Sampler(models.Decoder(cfg), eos_ids=EOS_IDS, pad_id=PAD, mesh=mesh,
                            prompt_buckets=(16,), per_layer_cache=per_layer_cache)
  assert _decode_weight_gathers(smp, cfg, mesh, train_shardings) == 0
  if not per_layer_cache:
    smp._param_shardings = train_shardings  # the trainer's layout: the count sees the gathers
    smp._fns.clear()
    assert _decode_weight_gathers(smp, cfg, mesh, train_shardings) == 7


def test_continuous_decode_loop_does_not_all_gather_weights():
  """The same count for the continuous-batching decode loop (`continuous.ContinuousSampler`,
  stacked cache): 0 weight gathers per step in its decode layout, 7 with the trainer's."""
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
  from lad_jax import components, config_utils, continuous  # pylint: disable=g-import-not-at-top
  mesh = components.make_mesh(config_utils.base_config())
  cfg = testing.tiny_config("qwen2", intermediate_size=128)
  train_shardings = models.param_shardings(cfg, mesh)
  smp = continuous.ContinuousSampler(models.Decoder(cfg), eos_ids=EOS_IDS, pad_id=PAD,
                                     mesh=mesh, prompt_buckets=(16,), per_layer_cache=False,
                                     decode_slots=16, refill_rows=8)

  def gathers():
    fns = smp._fns_for(16, 8, continuous.Sampling(1.0, 1.0, 0))  # pylint: disable=protected-access
    params = jax.eval_shape(lambda: testing.random_params(cfg))
    with sharding.use_mesh(mesh):
      hlo = fns.decode.lower(params, fns.empty.eval_shape(), jax.random.key(0),
                             np.int32(8)).compile().as_text()
    weight_shapes = set()
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(train_shardings)):
      shard = tuple(s.shard_shape(p.shape))
      weight_shapes |= {shard, shard[1:]}
    return _weight_all_gathers(hlo, weight_shapes)

  assert gathers() == 0
  smp._param_shardings = train_shardings  # pylint: disable=protected-access
  smp._continuous.clear()  # pylint: disable=protected-access
  assert gathers() == 7


def _loop_collectives(hlo: str) -> collections.Counter:
  """(collective, result shape) of every collective op inside the decode while loop."""
  inside = _while_body_computations(hlo)
  current, found = None, collections.Counter()
  for line in hlo.splitlines():
    head = re.match(r"^(ENTRY )?%([\w.-]+) ", line)
    if head:
      current = head.group(2)
      continue
    ins = re.match(r"^\s*(?:ROOT )?%[\w.-]+ = (\S+) (all-gather|all-reduce|all-to-all|"
                   r"collective-permute|reduce-scatter)[\w-]*\(", line)
    if ins and current in inside:
      found[ins.group(2), ins.group(1)] += 1
  return found


def test_ragged_decode_reads_each_rows_blocks_on_its_own_device():
  """Continuous decode on 8 simulated devices (data 2 x fsdp 2 x tensor 2: the 16 slots over
  4 batch shards, kv heads over 2): the ragged reads (one row group per batch shard,
  `decode_attention.attend_ragged`) add no collective to the loop over the window reads,
  which read every row's cache where it lives."""
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
  from lad_jax import continuous  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  found = {}
  for reader in ("window", "ragged"):
    cfg = testing.tiny_config("qwen2", intermediate_size=128, decode_block_size=8,
                              decode_attention=reader)
    smp = continuous.ContinuousSampler(models.Decoder(cfg), eos_ids=EOS_IDS, pad_id=PAD,
                                       mesh=mesh, prompt_buckets=(16,), per_layer_cache=False,
                                       decode_slots=16, refill_rows=8)
    fns = smp._fns_for(16, 112, continuous.Sampling(1.0, 1.0, 0))  # pylint: disable=protected-access
    params = jax.eval_shape(lambda: testing.random_params(cfg))  # pylint: disable=cell-var-from-loop
    with sharding.use_mesh(mesh):
      found[reader] = _loop_collectives(fns.decode.lower(
          params, fns.empty.eval_shape(), jax.random.key(0), np.int32(8)).compile().as_text())
  assert not found["ragged"] - found["window"], found["ragged"] - found["window"]
