"""Decoder parity with transformers' PyTorch Llama / Qwen2, padding, KV cache, log-probs."""

from __future__ import annotations

import functools

import chex
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import models, sharding
from lad_jax.models import decoder, rope, testing, weights
from lad_jax.models.config import ModelConfig, RopeScaling

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Prompts of different lengths (ids < vocab 128), used padded on either side.
SEQS = [[5, 17, 99, 3, 42, 8, 77, 120, 64], [11, 2, 93, 50, 7, 31], [101, 13, 4]]

# name -> (architecture, transformers config overrides). Together they cover tied / untied
# embeddings, Qwen2's q/k/v bias, Llama's attention_bias (q/k/v/o), GQA, and the rope scalings.
CASES = {
    "qwen2_untied": ("qwen2", dict(tie_word_embeddings=False)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_bias_llama3rope": ("llama", dict(attention_bias=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=5000.0, factor=4.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64))),
    "qwen2_tied_yarn": ("qwen2", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32))),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (hf model, ModelConfig, params) for every case in CASES."""
  out = {}
  for name, (arch, overrides) in CASES.items():
    hf, d = testing.tiny_hf_checkpoint(tmp_path_factory.mktemp(name), arch, **overrides)
    cfg, params = models.load_hf(d)
    out[name] = (hf, cfg, params)
  return out


def _hf_logits(hf, seq):
  with torch.no_grad():
    return hf(torch.tensor([seq])).logits[0].numpy()


@functools.lru_cache(maxsize=None)
def _apply(cfg):
  """One jitted apply per config (jit re-traces per shape), shared by all tests."""
  return jax.jit(lambda p, t, m=None, q=None, c=None: models.Decoder(cfg).apply(
      {"params": p}, t, mask_BT=m, positions_BT=q, cache=c, return_hidden=True))


def _forward(cfg, params, tokens, mask=None, positions=None, cache=None):
  opt = lambda x: None if x is None else jnp.asarray(x)
  return _apply(cfg)(params, jnp.asarray(tokens), opt(mask), opt(positions), cache)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_with_padding(checkpoints, name):
  hf, cfg, params = checkpoints[name]
  refs = [_hf_logits(hf, s) for s in SEQS]
  scale = max(np.abs(r).max() for r in refs)
  assert scale > 1.0  # non-trivial logits, so 1e-4 is a real tolerance
  for side in ("left", "right"):
    tokens, mask = models.pad_batch(SEQS, pad_id=0, side=side)
    logits = np.asarray(_forward(cfg, params, tokens, mask).logits)
    for i, (seq, ref) in enumerate(zip(SEQS, refs)):
      got = logits[i, mask[i]]  # valid positions of the padded row == the unpadded sequence
      np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"{name} {side} row {i}")


def test_config_read_from_checkpoint(checkpoints):
  _, cfg, _ = checkpoints["llama_bias_llama3rope"]
  assert (cfg.architecture, cfg.qkv_bias, cfg.o_bias, cfg.tie_word_embeddings) == (
      "llama", True, True, False)
  assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_theta == 5000.0
  _, cfg, _ = checkpoints["qwen2_tied_yarn"]
  assert (cfg.architecture, cfg.qkv_bias, cfg.o_bias, cfg.tie_word_embeddings) == (
      "qwen2", True, False, True)
  assert cfg.rope_scaling.original_max_position_embeddings == 32


@pytest.mark.parametrize("rope_parameters", [
    dict(rope_type="default", rope_theta=1e6),
    dict(rope_type="linear", rope_theta=1e4, factor=2.5),
    dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
         high_freq_factor=4.0, original_max_position_embeddings=8192),
    dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32768),
    dict(rope_type="yarn", rope_theta=1e4, factor=8.0, original_max_position_embeddings=16384,
         beta_fast=16, beta_slow=2, mscale=1.0, mscale_all_dim=0.5),
])
def test_rope_frequencies_match_transformers(rope_parameters):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=g-import-not-at-top
  hc = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128,
                                max_position_embeddings=131072,
                                rope_parameters=dict(rope_parameters))
  if rope_parameters["rope_type"] == "default":
    inv_ref = 1.0 / (rope_parameters["rope_theta"] ** (
        torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
    factor_ref = 1.0
  else:
    inv_ref, factor_ref = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](hc, "cpu")
  cfg = ModelConfig.from_hf(hc.to_dict())
  inv, factor = rope.inverse_frequencies(cfg)
  np.testing.assert_allclose(inv, inv_ref.numpy(), rtol=2e-6)
  assert factor == pytest.approx(factor_ref, rel=1e-6)


@pytest.mark.parametrize("impl,empty,per_layer", [
    ("einsum", False, False), ("einsum", True, False), ("blockwise", True, False),
    ("einsum", False, True), ("einsum", True, True), ("blockwise", True, True)])
def test_cached_decoding_equals_full_forward(checkpoints, impl, empty, per_layer):
  """Prefill left-padded prompts, then 3 single-token steps and a 2-token chunk; the prefill
  reads the empty cache or not (`cache_is_empty`, einsum or blockwise attention then), into
  a stacked cache (layer scan) or a per-layer one (layers unrolled, written then read)."""
  _, cfg, params = checkpoints["qwen2_untied"]
  cfg = cfg.replace(attention_impl=impl)
  prompts, mask = models.pad_batch(SEQS, pad_id=0, side="left")
  cont = np.array([[7, 8, 9, 10, 11], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34]], np.int32)
  full = np.asarray(_forward(cfg, params, np.concatenate([prompts, cont], 1),
                             np.concatenate([mask, np.ones_like(cont, bool)], 1)).logits)

  cache = models.KVCache.init(cfg, batch_size=3, max_length=16, per_layer=per_layer)
  out = jax.jit(lambda p, t, m, c: models.Decoder(cfg).apply(
      {"params": p}, t, mask_BT=m, cache=c, cache_is_empty=empty))(
          params, jnp.asarray(prompts), jnp.asarray(mask), cache)
  got = [np.asarray(out.logits)]
  for t in range(3):
    out = _forward(cfg, params, cont[:, t:t + 1], cache=out.cache)
    got.append(np.asarray(out.logits))
  out = _forward(cfg, params, cont[:, 3:5], cache=out.cache)
  got.append(np.asarray(out.logits))
  got = np.concatenate(got, axis=1)
  valid = np.concatenate([mask, np.ones_like(cont, bool)], 1)
  np.testing.assert_allclose(got[valid], full[valid], atol=1e-5, rtol=0)
  assert int(out.cache.index) == prompts.shape[1] + 5
  np.testing.assert_array_equal(out.cache.next_position, [len(s) + 5 for s in SEQS])


def test_cached_decoding_right_padded_prompts_use_per_row_positions(checkpoints):
  """New tokens land after a short row's padding; its RoPE positions must continue its text."""
  hf, cfg, params = checkpoints["llama_tied"]
  prompts, mask = models.pad_batch(SEQS, pad_id=0, side="right")
  cont = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
  out = _forward(cfg, params, prompts, mask,
                 cache=models.KVCache.init(cfg, batch_size=3, max_length=12))
  out1 = _forward(cfg, params, cont[:, :1], cache=out.cache)
  out2 = _forward(cfg, params, cont[:, 1:], cache=out1.cache)
  for i, s in enumerate(SEQS):
    ref = _hf_logits(hf, s + cont[i].tolist())
    np.testing.assert_allclose(np.asarray(out1.logits)[i, 0], ref[len(s)], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out2.logits)[i, 0], ref[len(s) + 1], atol=1e-4, rtol=0)


def test_packed_segments_equal_separate_sequences(checkpoints):
  _, cfg, params = checkpoints["qwen2_untied"]
  a, b = SEQS[1], SEQS[2]  # 6 + 3 tokens: one row of 9, the batch shape used everywhere
  tokens = np.array([a + b] * 3, np.int32)
  seg = np.array([[1] * len(a) + [2] * len(b)] * 3, np.int32)
  pos = np.array([list(range(len(a))) + list(range(len(b)))] * 3, np.int32)
  packed = np.asarray(_forward(cfg, params, tokens, seg, pos).logits)[0]
  sep, mask = models.pad_batch(SEQS, pad_id=0, side="right")
  sep = np.asarray(_forward(cfg, params, sep, mask).logits)
  np.testing.assert_allclose(packed[:len(a)], sep[1, :len(a)], atol=1e-5, rtol=0)
  np.testing.assert_allclose(packed[len(a):], sep[2, :len(b)], atol=1e-5, rtol=0)


class _DictSource:
  """A weights.TensorSource over in-memory HF tensors (here: torch gradients)."""

  def __init__(self, tensors):
    self.tensors = tensors

  def shape(self, name):
    return tuple(self.tensors[name].shape) if name in self.tensors else None

  def read(self, name, slices):
    return self.tensors[name][slices]

  def where(self, name):
    return "memory"


def _weighted_logp_loss(params, cfg, tokens, mask, weights):
  """sum_t w_t log pi(token_t | <t), via forward_logprobs; aux = (logp, entropy)."""
  logp, ent = models.forward_logprobs(models.Decoder(cfg), params, tokens, mask_BT=mask,
                                      return_entropy=True)
  return jnp.sum(logp * weights), (logp, ent)


# One jitted value-and-grad for all configs (static), so the baseline compiles once.
_loss_grad = jax.jit(jax.value_and_grad(_weighted_logp_loss, has_aux=True), static_argnums=1)


def _batch(side="left", seed=0):
  tokens, mask = models.pad_batch(SEQS, pad_id=0, side=side)
  w = np.random.default_rng(seed).normal(size=tokens.shape).astype(np.float32)
  w = w * mask * np.roll(mask, 1, axis=1)  # a token and its predecessor are real
  w[:, 0] = 0.0
  return tokens, mask, w


def test_gradients_match_torch_autograd(checkpoints):
  """d/dparams of a weighted sum of next-token log-probs: jax.grad == torch autograd."""
  hf, cfg, params = checkpoints["llama_bias_llama3rope"]
  tokens, mask, w = _batch("left")
  (_, (logp, _)), grads = _loss_grad(params, cfg, jnp.asarray(tokens), jnp.asarray(mask),
                                     jnp.asarray(w))

  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  hf.zero_grad()
  logits_t = hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos)).logits
  logp_t = torch.log_softmax(logits_t[:, :-1], -1).gather(
      -1, torch.tensor(tokens[:, 1:], dtype=torch.long)[..., None])[..., 0]
  (logp_t * torch.tensor(w[:, 1:])).sum().backward()
  valid = w[:, 1:] != 0
  np.testing.assert_allclose(np.asarray(logp)[:, 1:][valid], logp_t.detach().numpy()[valid],
                             atol=1e-5)
  # Map torch's [out, in] gradients to our layout with the checkpoint loader itself.
  hf_grads = {n: p.grad.numpy() for n, p in hf.named_parameters()}
  ref = dict(jax.tree_util.tree_leaves_with_path(models.load_params(_DictSource(hf_grads), cfg)))
  for path, got in jax.tree_util.tree_leaves_with_path(grads):
    r = np.asarray(ref[path])
    assert np.abs(r).max() > 0, path
    np.testing.assert_allclose(np.asarray(got), r, atol=2e-5 * max(1.0, np.abs(r).max()),
                               rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("x_shape,kernel_shape,n_in,dtype,preferred,out_dtype", [
    ((2, 5, 6), (6, 3, 4), 1, jnp.float32, None, None),  # q / k / v: heads split out
    ((2, 5, 3, 4), (3, 4, 6), 2, jnp.float32, None, None),  # o_proj: heads contracted
    ((2, 5, 6), (6, 7), 1, jnp.bfloat16, jnp.float32, None),  # bf16 LM head, fp32 logits
    ((2, 5, 6), (6, 7), 1, jnp.bfloat16, jnp.float32, jnp.bfloat16),  # bf16 layers
])
def test_project_equals_dot_general_with_the_kernel_gradient_from_x(x_shape, kernel_shape, n_in,
                                                                     dtype, preferred, out_dtype):
  """Linear's custom-VJP product: dot_general's (+ astype's) values and gradients, the kernel
  gradient computed as dot(x, dy) with no transpose after it (JAX's own rule transposes
  dot(dy, x)). With a bf16 output the backward matmuls take bf16 dy and accumulate in fp32
  (JAX's rule would too: the cast's cotangent is bf16 widened to fp32, exactly)."""
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape).astype(dtype)
  kernel = jax.random.normal(kw, kernel_shape).astype(dtype)
  dims = ((tuple(range(len(x_shape) - n_in, len(x_shape))), tuple(range(n_in))), ((), ()))
  ref = lambda x, k: jax.lax.dot_general(x, k, dims, preferred_element_type=preferred).astype(
      out_dtype or (preferred or dtype))
  ours = lambda x, k: decoder.project(x, k, n_in, preferred, out_dtype)
  y, vjp = jax.vjp(ours, x, kernel)
  y_ref, vjp_ref = jax.vjp(ref, x, kernel)
  np.testing.assert_array_equal(y, y_ref)
  dy = jax.random.normal(kg, y.shape).astype(y.dtype)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-6, atol=1e-6)
  kernel_grad = lambda f: str(jax.make_jaxpr(lambda k: jax.vjp(f, x, k)[1](dy)[1])(kernel))
  assert "transpose[" in kernel_grad(ref)
  assert "transpose[" not in kernel_grad(ours)


def test_project_dot_is_saved_by_the_dots_remat_policy(capsys):
  """The custom VJP hides nothing from jax.checkpoint: "dots" keeps the product, so the
  forward matmul is not recomputed."""
  x, kernel = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
  f = lambda x, k: jnp.sum(jnp.sin(decoder.project(x, k, 1)))
  ad_checkpoint.print_saved_residuals(
      jax.checkpoint(f, policy=jax.checkpoint_policies.checkpoint_dots), x, kernel)
  assert "f32[2,3,5] output of dot_general" in capsys.readouterr().out


def test_token_logprobs_chunked_equals_log_softmax_and_grads(checkpoints):
  _, cfg, params = checkpoints["qwen2_tied_yarn"]
  tokens, mask, w = _batch("right")
  out = _forward(cfg, params, tokens, mask)
  targets = jnp.asarray(np.roll(tokens, -1, axis=1))
  ref_all = jax.nn.log_softmax(out.logits / 0.7)
  ref = jnp.take_along_axis(ref_all, targets[..., None], -1)[..., 0]
  ref_ent = -jnp.sum(jnp.exp(ref_all) * ref_all, -1)

  def loss(p, h, chunk):
    logp, ent = models.token_logprobs(p, cfg, h, targets, temperature=0.7, chunk_size=chunk,
                                      return_entropy=True)
    return jnp.sum(logp * w) + jnp.sum(ent * w), (logp, ent)

  vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
  (_, (logp, ent)), g_full = vg(params, out.hidden, None)
  (_, (logp4, ent4)), g_chunk = vg(params, out.hidden, 4)  # 9 positions -> 3 chunks, padded
  for lp, en in ((logp, ent), (logp4, ent4)):
    chex.assert_shape([lp, en], tokens.shape)
    np.testing.assert_allclose(lp, ref, atol=1e-5)
    np.testing.assert_allclose(en, ref_ent, atol=1e-5)
  chex.assert_trees_all_close(g_full, g_chunk, atol=1e-5)
  assert np.abs(np.asarray(g_full[1])).max() > 0


def test_forward_logprobs_aligns_scores_with_tokens(checkpoints):
  _, cfg, params = checkpoints["qwen2_untied"]
  tokens, mask, w = _batch("left")
  (_, (logp, ent)), _ = _loss_grad(params, cfg, jnp.asarray(tokens), jnp.asarray(mask),
                                   jnp.asarray(w))
  logits = _forward(cfg, params, tokens, mask).logits
  ref = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), jnp.asarray(tokens)[:, 1:, None],
                            -1)[..., 0]
  np.testing.assert_allclose(np.asarray(logp)[:, 1:], ref, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(logp)[:, 0], 0.0)
  np.testing.assert_array_equal(np.asarray(ent)[:, 0], 0.0)


@pytest.mark.parametrize("overrides", [
    dict(remat_policy="dots_with_no_batch_dims", scan_unroll=2, attention_block_size=4,
         attention_impl="einsum"),
    dict(remat_policy="full", attention_impl="blockwise", attention_block_size=4)])
def test_remat_unroll_and_attention_impl_do_not_change_results(checkpoints, overrides):
  _, cfg, params = checkpoints["qwen2_untied"]
  args = [jnp.asarray(x) for x in _batch("left")]
  (l0, (logp0, _)), g0 = _loss_grad(params, cfg, *args)
  (l1, (logp1, _)), g1 = _loss_grad(params, cfg.replace(**overrides), *args)
  assert np.isfinite(np.asarray(logp1)).all()  # padding queries included
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  valid = np.asarray(args[2]) != 0  # scores of padding tokens are arbitrary
  np.testing.assert_allclose(np.asarray(logp1)[valid], np.asarray(logp0)[valid], atol=1e-5)
  # Embedding gradients reach ~2 (1e-5 of that): blockwise's online softmax rounds differently.
  chex.assert_trees_all_close(g1, g0, atol=2e-5)


def test_bfloat16_params_keep_float32_logits_and_stay_close(checkpoints):
  _, cfg, params = checkpoints["qwen2_untied"]
  tokens, mask = models.pad_batch(SEQS, pad_id=0, side="left")
  ref = np.asarray(_forward(cfg, params, tokens, mask).logits)
  cfg16 = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out = _forward(cfg16, p16, tokens, mask)
  assert out.logits.dtype == jnp.float32
  got = np.asarray(out.logits)
  # bf16 has 8 mantissa bits: logits of magnitude ~5 move by a few 1e-2, not by O(1).
  err = np.abs(got - ref)[mask].max()
  assert err < 0.1 * np.abs(ref).max(), err


def test_return_hidden_is_lm_head_input(checkpoints):
  _, cfg, params = checkpoints["llama_tied"]
  tokens, mask = models.pad_batch(SEQS, pad_id=0)
  out = _forward(cfg, params, tokens, mask)
  chex.assert_shape(out.hidden, (3, len(SEQS[0]), cfg.hidden_size))
  np.testing.assert_allclose(out.hidden @ params["embed_tokens"]["embedding"].T, out.logits,
                             atol=1e-5)
  out = jax.eval_shape(lambda p, t: models.Decoder(cfg).apply(
      {"params": p}, t, compute_logits=False), params, tokens)
  assert out.logits is None and out.hidden is None and out.cache is None


def test_kv_cache_repeat_matches_per_row_prefill(checkpoints):
  _, cfg, params = checkpoints["qwen2_untied"]
  prompts, mask = models.pad_batch(SEQS, pad_id=0, side="left")
  out = _forward(cfg, params, prompts, mask,
                 cache=models.KVCache.init(cfg, batch_size=3, max_length=16))
  rep = out.cache.repeat(2)  # G = 2 samples per prompt, adjacent rows
  assert rep.k.shape == (cfg.num_layers, 6, cfg.num_kv_heads, 16, cfg.head_dim)
  nxt = np.arange(1, 7, dtype=np.int32)[:, None]
  got = np.asarray(_forward(cfg, params, nxt, cache=rep).logits)[:, 0]
  full, fmask = models.pad_batch([SEQS[r // 2] + [r + 1] for r in range(6)], pad_id=0)
  ref = np.asarray(_forward(cfg, params, full, fmask).logits)[:, -1]
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_config_errors_are_clear():
  base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8,
              intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
  with pytest.raises(ValueError, match="Unsupported architecture.*LlamaForCausalLM.*Qwen2"):
    ModelConfig.from_hf({**base, "architectures": ["GPT2LMHeadModel"]})
  with pytest.raises(ValueError, match="rope_scaling type 'longrope'.*supported"):
    ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
  with pytest.raises(ValueError, match="use_sliding_window"):
    ModelConfig.from_hf({**base, "architectures": ["Qwen2ForCausalLM"],
                         "use_sliding_window": True})
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    ModelConfig.from_hf({**base, "num_key_value_heads": 3})
  with pytest.raises(ValueError, match="remat_policy.*valid"):
    ModelConfig.from_hf(base, remat_policy="sometimes")
  with pytest.raises(FileNotFoundError, match="config.json"):
    ModelConfig.from_hf("/nonexistent/model")
  # transformers 4 spelling: rope_theta + rope_scaling with the old "type" key.
  cfg = ModelConfig.from_hf({**base, "rope_theta": 123.0,
                             "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert cfg.rope_theta == 123.0 and cfg.rope_scaling == RopeScaling("linear", 2.0)
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg  # round trip through config.json form


def test_init_params_in_shards_with_the_checkpoint_layout():
  cfg = testing.tiny_config("qwen2")
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  params = models.init_params(cfg, jax.random.key(0), mesh=mesh)
  shapes, _ = models.abstract_params(cfg)
  chex.assert_trees_all_equal_shapes_and_dtypes(params, shapes)
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x.sharding, params),
                              models.param_shardings(cfg, mesh))
  emb = np.asarray(params["embed_tokens"]["embedding"])
  assert abs(emb.std() - cfg.initializer_range) < 0.1 * cfg.initializer_range
  np.testing.assert_array_equal(params["norm"]["scale"], 1.0)
  np.testing.assert_array_equal(params["layers"]["self_attn"]["q_proj"]["bias"], 0.0)
  # Every parameter maps to exactly one HF tensor name per layer.
  assert {m.path for m in weights.param_map(cfg)} == set(
      tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params))
