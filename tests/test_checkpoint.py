"""Checkpoint round trips: values, dtypes, shardings, metadata, retention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lad_jax import checkpoint


def _state(key):
  k1, k2 = jax.random.split(key)
  params = {"w": jax.random.normal(k1, (8, 4)), "b": jax.random.normal(k2, (4,)).astype(jnp.bfloat16)}
  opt_state = optax.adamw(1e-3).init(params)
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(7), "key": jax.random.key_data(key)}


def test_round_trip_exact_with_meta(tmp_path):
  state = _state(jax.random.key(0))
  with checkpoint.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    assert ckpt.latest_step() is None
    ckpt.save(7, state, {"data_position": 123, "config": {"lr": 1e-6}})
    ckpt.wait()
    restored, meta = ckpt.restore(jax.eval_shape(lambda: state))
  assert meta == {"data_position": 123, "config": {"lr": 1e-6}}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_restore_into_sharding(tmp_path):
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
  sharding = NamedSharding(mesh, P("fsdp", "tensor"))
  x = jax.device_put(jnp.arange(64.0).reshape(8, 8), sharding)
  with checkpoint.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    ckpt.save(1, {"x": x})
    ckpt.wait()
    target = {"x": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sharding)}
    restored, _ = ckpt.restore(target)
  assert restored["x"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(restored["x"]), np.asarray(x))


def test_keeps_latest_and_missing_raises(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, {"x": jnp.full((2,), float(step))})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    restored, _ = ckpt.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(restored["x"]), [3.0, 3.0])
  with checkpoint.Checkpointer(str(tmp_path / "empty")) as empty:
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
      empty.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
