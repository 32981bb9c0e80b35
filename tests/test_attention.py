"""lad_jax.models.attention: blockwise (flash-style) == the einsum reference in values and
gradients, by segment ids (causal, left / right padding, packed rows), GQA, ragged blocks;
padding rows finite; memory linear in T; the decoder with either; the config knob."""

from __future__ import annotations

import importlib.util
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import config_utils
from lad_jax import models
from lad_jax.errors import ConfigError
from lad_jax.models import attention
from lad_jax.models import testing

# Segment ids [B=3, T=13] (0 = padding): every row pattern the decoder sees.
SEGMENTS = {
    "causal": [[1] * 13] * 3,
    "left_padding": [[0] * 5 + [1] * 8, [0] * 2 + [1] * 11, [1] * 13],
    "right_padding": [[1] * 8 + [0] * 5, [1] * 13, [1] * 3 + [0] * 10],
    "packed": [[1] * 4 + [2] * 5 + [3] * 4, [0] * 2 + [1] * 6 + [2] * 3 + [0] * 2,
               [5] * 7 + [0] + [9] * 5],
}


def _cfg(num_kv_heads=2, num_heads=4, head_dim=8, block=4, impl="einsum"):
  return testing.tiny_config(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                             attention_block_size=block, attention_impl=impl)


def _qkv(cfg, b, t, seed=0):
  kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
  h, k = cfg.head_dim, cfg.num_kv_heads
  q = jax.random.normal(kq, (b, t, cfg.num_heads, h)) * h ** -0.5  # pre-scaled, as the decoder
  return (q, jax.random.normal(kk, (b, k, t, h)), jax.random.normal(kv, (b, k, t, h)),
          jax.random.normal(kw, (b, t, cfg.num_heads, h)))


def _values_and_grads(fn, cfg, q, k, v, w_BTNH, seg_BT):
  """fn's output and d/d(q, k, v) of sum(out * w) (a random projection of the output)."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg_BT, cfg) * w_BTNH)
  return jax.jit(lambda q, k, v: (fn(q, k, v, seg_BT, cfg),
                                  jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


@pytest.mark.parametrize("pattern,heads,block", [
    *[(p, (2, 4), 4) for p in sorted(SEGMENTS)],
    ("packed", (1, 3), 5), ("left_padding", (2, 2), 0), ("right_padding", (2, 4), 16)])
def test_blockwise_equals_einsum(pattern, heads, block):
  """Values on non-padding rows and gradients (padding rows' outputs weighted 0: the einsum
  reference gives them a uniform average, blockwise 0) to 1e-5; T=13 is no multiple of 4 or 5;
  (1, 3) is multi-query, (2, 2) plain multi-head; block 0 and 16 are one block."""
  cfg = _cfg(num_kv_heads=heads[0], num_heads=heads[1], block=block)
  seg = jnp.asarray(SEGMENTS[pattern], jnp.int32)
  q, k, v, w = _qkv(cfg, 3, 13)
  w = w * (seg != 0)[:, :, None, None]
  ref, ref_g = _values_and_grads(attention.attend_einsum, cfg, q, k, v, w, seg)
  got, got_g = _values_and_grads(attention.attend_blockwise, cfg, q, k, v, w, seg)
  valid = np.asarray(seg) != 0
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(ref)[valid], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got)[~valid], 0.0)
  chex.assert_trees_all_close(got_g, ref_g, atol=1e-5)


def test_packed_rows_equal_separate_rows():
  """A packed row (positions restart per segment) == its segments as rows of their own."""
  cfg = _cfg(block=3)
  q, k, v, _ = _qkv(cfg, 1, 10)
  attend = jax.jit(attention.attend_blockwise, static_argnums=4)
  packed = attend(q, k, v, jnp.asarray([[1] * 4 + [2] * 6]), cfg)
  for lo, hi in ((0, 4), (4, 10)):
    alone = attend(q[:, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], jnp.ones((1, hi - lo), jnp.int32),
                   cfg)
    np.testing.assert_allclose(packed[:, lo:hi], alone, atol=1e-6)


def test_fully_padded_row_gives_zero_output_and_finite_zero_grads():
  cfg = _cfg(block=4)
  seg = jnp.asarray([[0] * 9, [1] * 9], jnp.int32)
  q, k, v, w = _qkv(cfg, 2, 9)
  out, (dq, dk, dv) = _values_and_grads(attention.attend_blockwise, cfg, q, k, v, w, seg)
  np.testing.assert_array_equal(out[0], 0.0)
  for g in (dq, dk, dv):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(g[0], 0.0)  # nothing in row 0 is attended
  assert np.abs(np.asarray(dk[1])).max() > 0


def _temp_bytes(fn, cfg, t):
  """Compiled temp memory of fwd + bwd of fn at [1, t] tokens (one kv head, 2 query heads)."""
  q, k, v, w = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _qkv(cfg, 1, 16))
  shapes = [jax.ShapeDtypeStruct((1, t) + x.shape[2:], x.dtype) for x in (q, w)]
  kv = jax.ShapeDtypeStruct((1, cfg.num_kv_heads, t, cfg.head_dim), jnp.float32)
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
  loss = lambda q, k, v, w, s: jnp.sum(fn(q, k, v, s, cfg) * w)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return grad.lower(shapes[0], kv, kv, shapes[1], seg).compile().memory_analysis(
      ).temp_size_in_bytes


def test_blockwise_memory_grows_linearly_einsum_quadratically():
  cfg = _cfg(num_kv_heads=1, num_heads=2, head_dim=16, block=128)
  sizes = {name: [_temp_bytes(fn, cfg, t) for t in (1024, 2048)]
           for name, fn in (("einsum", attention.attend_einsum),
                            ("blockwise", attention.attend_blockwise))}
  for name, (small, large) in sizes.items():
    print(f"{name}: temp bytes T=1024 {small}, T=2048 {large}, ratio {large / small:.2f}")
  assert sizes["blockwise"][1] / sizes["blockwise"][0] < 2.5
  assert sizes["einsum"][1] / sizes["einsum"][0] > 3.0
  assert sizes["blockwise"][1] < sizes["einsum"][1] / 4


def _decoder_loss(params, cfg, tokens, seg, positions):
  """Mean log-likelihood of the next token over non-padding pairs, and the logits."""
  logits = models.Decoder(cfg).apply({"params": params}, tokens, mask_BT=seg,
                                     positions_BT=positions).logits
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
  pair = (seg[:, 1:] != 0) & (seg[:, 1:] == seg[:, :-1])
  return -jnp.sum(jnp.where(pair, logp, 0.0)) / jnp.sum(pair), logits


def test_decoder_blockwise_equals_einsum():
  """The whole decoder (2 layers, GQA) on packed + padded rows: logits on non-padding slots and
  parameter gradients of a masked loss agree to 1e-5."""
  cfg = testing.tiny_config("qwen2", attention_block_size=4)
  params = testing.random_params(cfg)
  seg = jnp.asarray(SEGMENTS["packed"], jnp.int32)
  tokens = jax.random.randint(jax.random.key(1), seg.shape, 0, cfg.vocab_size)
  starts = jnp.asarray([[0] * 4 + [4] * 5 + [9] * 4, [0] * 8 + [8] * 5, [0] * 8 + [8] * 5])
  positions = jnp.maximum(jnp.arange(13)[None, :] - starts, 0)
  run = lambda impl: jax.jit(jax.value_and_grad(_decoder_loss, has_aux=True), static_argnums=1)(
      params, cfg.replace(attention_impl=impl), tokens, seg, positions)
  (l0, logits0), g0 = run("einsum")
  (l1, logits1), g1 = run("blockwise")
  valid = np.asarray(seg) != 0
  np.testing.assert_allclose(np.asarray(logits1)[valid], np.asarray(logits0)[valid], atol=1e-5)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  chex.assert_trees_all_close(g1, g0, atol=1e-5)


def test_auto_resolves_by_backend_and_length():
  cfg = _cfg(block=128, impl="auto")
  assert jax.default_backend() == "cpu"
  assert attention.resolve_impl("auto", 256, cfg) == "einsum"  # short: the reference on CPU
  assert attention.resolve_impl("auto", 257, cfg) == "blockwise"
  assert attention.resolve_impl("blockwise", 16, cfg) == "blockwise"
  q, k, v, _ = _qkv(cfg, 1, 300)
  seg = jnp.ones((1, 300), jnp.int32)
  auto, ref = (jax.jit(fn, static_argnums=4) for fn in (attention.attend,
                                                      attention.attend_einsum))
  np.testing.assert_allclose(auto(q, k, v, seg, cfg), ref(q, k, v, seg, cfg), atol=1e-5)


@pytest.mark.parametrize("impl,device", [("cudnn", "GPU"), ("splash", "TPU")])
def test_accelerator_kernels_off_their_backend_raise_one_clear_error(impl, device):
  cfg = _cfg(impl=impl)
  q, k, v, _ = _qkv(cfg, 1, 8)
  with pytest.raises(ConfigError, match=f"attention_impl='{impl}' runs only on {device}.*auto"):
    attention.attend(q, k, v, jnp.ones((1, 8), jnp.int32), cfg)


def test_segment_runs_are_cudnn_packed_offsets_and_lengths():
  """Hand-worked: runs of nonzero ids, -1 past each row's last run (M = 3)."""
  seg = jnp.asarray([[0, 0, 1, 1, 1, 0], [1, 1, 2, 2, 2, 3], [7, 7, 0, 0, 7, 7]])
  starts, lengths = attention.segment_runs(seg, 3)
  np.testing.assert_array_equal(starts, [[2, -1, -1, -1], [0, 2, 5, -1], [0, 4, -1, -1]])
  np.testing.assert_array_equal(lengths, [[3, -1, -1], [2, 3, 1], [2, 2, -1]])


def test_splash_kernel_in_the_pallas_interpreter_equals_einsum():
  """The TPU kernel's wiring (MQA form per kv head, segment ids, causal mask, T padded to 128),
  run by the Pallas interpreter on CPU: forward values on non-padding rows."""
  cfg = _cfg(head_dim=128)
  seg = jnp.asarray(SEGMENTS["packed"][1:2], jnp.int32)  # padding both ends, two segments
  q, k, v, _ = _qkv(cfg, 1, 13)
  got = attention.attend_splash(q, k, v, seg, cfg, interpret=True)
  ref = attention.attend_einsum(q, k, v, seg, cfg)
  valid = np.asarray(seg) != 0
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(ref)[valid], atol=1e-5)


def _load_config(name):
  path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("name", ["tiny", "qwen7b"])
def test_config_knob_reaches_the_model_config(name):
  from lad_jax import policy  # pylint: disable=g-import-not-at-top
  c = _load_config(name)
  assert c.model.attention_impl == "auto"
  c.model.attention_impl = "blockwise"
  config_utils.validate(c)
  if c.model.source == "random":
    assert policy.model_config(c).attention_impl == "blockwise"
  c.model.attention_impl = "flash"
  with pytest.raises(ConfigError, match="model.attention_impl"):
    config_utils.validate(c)
