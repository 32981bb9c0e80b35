"""Mesh, logical-axis rules, sharded == unsharded, and the Qwen2.5-7B memory layout."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lad_jax import models, sharding
from lad_jax.models import testing

# Qwen2.5-7B's config.json (https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json).
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "max_position_embeddings": 131072,
    "use_sliding_window": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
}
# The parameter count published on the model card / safetensors index (7.61B).
QWEN25_7B_PARAMS = 7_615_616_512


def test_make_mesh_axes_and_errors():
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert dict(sharding.make_mesh(data=2, fsdp=1, tensor=-1).shape) == {
      "data": 2, "fsdp": 1, "tensor": 4}
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh(data=3, fsdp=1)
  with pytest.raises(ValueError, match="At most one"):
    sharding.make_mesh(data=-1, fsdp=-1)


def test_logical_to_spec_drops_axes_that_do_not_divide():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  spec = lambda axes, shape: sharding.logical_to_spec(axes, shape, mesh)
  assert spec(("embed", "q_heads", "head_dim"), (64, 4, 16)) == P("fsdp", "tensor", None)
  # SmolLM2: 9 heads and 3 kv heads cannot be split over tensor=2 -> replicated.
  assert spec(("embed", "q_heads", "head_dim"), (576, 9, 64)) == P("fsdp", None, None)
  # Batch over (data, fsdp): 4 rows use both, 2 rows keep the leading axis, 1 row neither.
  assert spec(("activation_batch", "activation_length"), (4, 7)) == P(("data", "fsdp"), None)
  assert spec(("activation_batch", "activation_length"), (2, 7)) == P("data", None)
  assert spec(("activation_batch", "activation_length"), (1, 7)) == P(None, None)
  # A mesh axis serves one dimension only: the first rule claims it.
  rules = (("a", "tensor"), ("b", "tensor"))
  assert sharding.logical_to_spec(("b", "a"), (4, 4), mesh, rules) == P(None, "tensor")
  with pytest.raises(ValueError, match="logical axes"):
    spec(("embed",), (4, 4))


def test_qwen25_7b_param_count_and_per_device_bytes():
  """eval_shape only: nothing of size 7B is allocated."""
  cfg = models.ModelConfig.from_hf(QWEN25_7B, param_dtype="bfloat16")
  shapes, _ = models.abstract_params(cfg)
  assert models.count_params(shapes) == QWEN25_7B_PARAMS
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  shardings = models.param_shardings(cfg, mesh)
  total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))
  per_device = sharding.per_device_bytes(shapes, shardings)
  assert total == 2 * QWEN25_7B_PARAMS
  # Only biases and norms (~0.1%) are not split 8 ways.
  assert total / 8 <= per_device <= 1.005 * total / 8, per_device / total
  q = shardings["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.spec == P(None, "fsdp", "tensor", None)
  assert shardings["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
  assert shardings["lm_head"]["kernel"].spec == P("fsdp", "tensor")


def test_constrain_is_noop_without_mesh_and_shards_with_one():
  x = jnp.ones((8, 4, 64))
  axes = ("activation_batch", "activation_length", "activation_embed")
  assert sharding.constrain(x, axes) is x
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  with sharding.use_mesh(mesh):
    y = jax.jit(lambda a: sharding.constrain(a * 2, axes))(x)
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", None, None)), 3)


def _loss(params, cfg, tokens, mask):
  out = models.Decoder(cfg).apply({"params": params}, tokens, mask_BT=mask)
  logp = jax.nn.log_softmax(out.logits)
  return jnp.sum(logp[:, :-1, :].max(-1) * mask[:, 1:]), out.logits


@pytest.mark.slow  # ~25 s of XLA compilation for 4 programs, two of them on 8 devices
def test_sharded_equals_unsharded_forward_grad_and_decode():
  """fsdp 4 x tensor 2 on 8 simulated devices vs one device: logits, grads, a cached step."""
  cfg = testing.tiny_config("qwen2", intermediate_size=128)
  params = jax.tree.map(jnp.asarray, testing.random_params(cfg))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 12)), jnp.int32)
  lengths = np.array([12, 9, 5, 12, 3, 11, 7, 1])
  mask = jnp.asarray(np.arange(12)[None, :] >= 12 - lengths[:, None])  # left padded
  vg = jax.value_and_grad(_loss, has_aux=True)
  (l0, logits0), g0 = jax.jit(vg, static_argnums=1)(params, cfg, tokens, mask)

  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  with sharding.use_mesh(mesh):
    shardings = models.param_shardings(cfg, mesh)
    p_sh = jax.device_put(params, shardings)
    q = p_sh["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 16)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    step = jax.jit(vg, static_argnums=1, in_shardings=(shardings, batch, batch),
                   out_shardings=((None, None), shardings))
    (l1, logits1), g1 = step(p_sh, cfg, jax.device_put(tokens, batch),
                             jax.device_put(mask, batch))
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  valid = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(logits1)[valid], np.asarray(logits0)[valid], atol=1e-5)
  # fp32 sums in another order: measured max |diff| 3.3e-5 on gradients of size ~7.
  chex.assert_trees_all_close(g1, g0, atol=1e-4, rtol=1e-5)
  assert g1["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")

  # Prefill + one decode step with a sharded cache.
  def prefill_and_step(p, t, m):
    model = models.Decoder(cfg)
    cache = models.KVCache.init(cfg, batch_size=8, max_length=16)
    out = model.apply({"params": p}, t, mask_BT=m, cache=cache)
    nxt = jnp.argmax(out.logits[:, -1], -1)[:, None]
    return model.apply({"params": p}, nxt, cache=out.cache).logits

  ref = jax.jit(prefill_and_step)(params, tokens, mask)
  with sharding.use_mesh(mesh):
    got = jax.jit(prefill_and_step)(p_sh, tokens, mask)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_kv_cache_shardings():
  cfg = testing.tiny_config("qwen2")
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  abstract = jax.eval_shape(lambda: models.KVCache.init(cfg, batch_size=8, max_length=32))
  shardings = sharding.logical_shardings(abstract, models.KVCache.logical_axes(), mesh)
  assert shardings.k.spec == P(None, "fsdp", "tensor", None, None)
  assert shardings.segment_ids.spec == P("fsdp", None)
  assert shardings.index.spec == P()
  cache = jax.jit(lambda: models.KVCache.init(cfg, batch_size=8, max_length=32),
                  out_shardings=shardings)()
  # keys [L, B, K, H, S], values [L, B, K, S, H]: rows over fsdp, kv heads over tensor.
  assert cache.k.addressable_shards[0].data.shape == (cfg.num_layers, 2, 1, cfg.head_dim, 32)
  assert cache.v.addressable_shards[0].data.shape == (cfg.num_layers, 2, 1, 32, cfg.head_dim)
  assert shardings.v.spec == P(None, "fsdp", "tensor", None, None)
