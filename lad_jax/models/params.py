"""Abstract parameters, their logical axes and shardings, and fresh initialisation.

  shapes, axes = abstract_params(cfg)          # jax.ShapeDtypeStruct tree, logical-axis tree
  shardings = param_shardings(cfg, mesh)       # NamedSharding tree (uneven axes dropped)
  params = init_params(cfg, key, mesh=mesh)    # random init, created directly in its shards

Nothing here allocates a full model: shapes come from `jax.eval_shape`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lad_jax import sharding
from lad_jax.models.config import ModelConfig
from lad_jax.models.decoder import Decoder

Params = Any


def _boxed_abstract(cfg: ModelConfig) -> Any:
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda k, t: Decoder(cfg).init(k, t)["params"],
                        jax.random.key(0), tokens)


def abstract_params(cfg: ModelConfig) -> tuple[Params, Any]:
  """(ShapeDtypeStruct tree, tree of logical-axis tuples) of the parameters."""
  boxed = _boxed_abstract(cfg)
  axes = jax.tree.map(tuple, nn.get_partition_spec(boxed),
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return nn.meta.unbox(boxed), axes


def param_shardings(cfg: ModelConfig, mesh: Mesh,
                    rules: Optional[sharding.Rules] = None) -> Any:
  """NamedSharding for every parameter under the logical->mesh `rules`."""
  shapes, axes = abstract_params(cfg)
  return sharding.logical_shardings(shapes, axes, mesh, rules)


def count_params(tree: Params) -> int:
  """Number of scalars in a (possibly abstract) parameter tree."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def init_params(cfg: ModelConfig, key: jax.Array, *, mesh: Optional[Mesh] = None,
                rules: Optional[sharding.Rules] = None) -> Params:
  """Fresh parameters (normal(initializer_range) weights, unit norms, zero biases).

  With a mesh, the jitted init writes each parameter straight into its shards.
  """
  def init(k):
    return nn.meta.unbox(Decoder(cfg).init(k, jnp.zeros((1, 1), jnp.int32))["params"])

  if mesh is None:
    return jax.jit(init)(key)
  return jax.jit(init, out_shardings=param_shardings(cfg, mesh, rules))(key)
