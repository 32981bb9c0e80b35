"""Device mesh, logical-axis partition rules and sharding helpers.

The model annotates every parameter and the activations at block edges with *logical* axis names
("embed", "q_heads", "activation_batch", ...). Rules map them to the three *mesh* axes:

  data    pure data parallelism (parameters replicated),
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 / FSDP),
  tensor  Megatron-style tensor parallelism over heads, MLP features and the vocabulary.

A mesh axis that does not divide a dimension is dropped for that array (e.g. SmolLM2's 9 heads
on tensor=2 stay replicated), so the same code runs on 1 CPU, 8 GPUs or a TPU pod:

  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  with sharding.use_mesh(mesh):
    shardings = sharding.logical_shardings(abstract_params, logical_specs, mesh)
    ...jax.jit(step, in_shardings=..., out_shardings=...)...

Multi-host: call `jax.distributed.initialize()` first; `make_mesh` spans `jax.devices()`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lad_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]

# Logical axis -> mesh axis (or tuple of mesh axes, or None). Order matters only when two
# logical axes of one array want the same mesh axis: the first rule wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # KV cache
    ("cache_layers", None),
    ("cache_batch", BATCH_AXES),
    ("cache_sequence", None),
    ("cache_kv_heads", "tensor"),
    # generic
    ("batch", BATCH_AXES),
)


def make_mesh(*, data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all (or the given) devices.

  One size may be -1: it takes the devices the others leave (default: fsdp gets them all).
  Axes are `AxisType.Auto`, i.e. GSPMD propagates shardings between the annotated points.

  Raises:
    ConfigError (a ValueError): sizes that are not positive ints (or one -1) or that do not
      multiply to the number of devices; one line naming the sizes and the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  n = len(devices)
  if any(not isinstance(v, int) or isinstance(v, bool) or v == 0 or v < -1
         for v in sizes.values()):
    raise ConfigError(f"Mesh axis sizes must be positive ints (or -1 for 'the rest'), got {sizes} "
                      "(config.mesh).")
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ConfigError(f"At most one mesh axis may be -1, got {sizes} (config.mesh).")
  known = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if n % known:
      raise ConfigError(f"{n} device(s) cannot be split into {sizes}: {known} does not divide "
                        f"{n}; set config.mesh so that data * fsdp * tensor divides {n}.")
    sizes[free[0]] = n // known
  if math.prod(sizes.values()) != n:
    raise ConfigError(
        f"Mesh {sizes} needs {math.prod(sizes.values())} devices but {n} are available; make "
        "data * fsdp * tensor (config.mesh) equal the device count (or pass devices=).")
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def current_rules() -> tuple[tuple[str, Any], ...]:
  """The rules set by `use_mesh` / `nn.logical_axis_rules`, else `DEFAULT_RULES`."""
  rules = nn.get_logical_axis_rules()
  return tuple(rules) if rules else DEFAULT_RULES


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Optional[Rules] = None) -> Iterator[Mesh]:
  """Makes `mesh` and `rules` current: activation constraints in the model become active."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules or DEFAULT_RULES)):
    yield mesh


def _mesh_axis_sizes(mesh: Any) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes")
                  else mesh.devices.shape))


def logical_to_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Any,
                    rules: Optional[Rules] = None) -> PartitionSpec:
  """Maps logical axis names of an array to a PartitionSpec valid for `shape` on `mesh`.

  Each mesh axis is used at most once (the first logical axis in rule order claims it); mesh
  axes not in the mesh are ignored; trailing mesh axes of a dimension are dropped until their
  product divides the dimension size (so uneven dimensions fall back to replication).
  """
  if len(logical_axes) != len(shape):
    raise ValueError(f"{len(logical_axes)} logical axes {tuple(logical_axes)} for an array of "
                     f"shape {tuple(shape)}.")
  rules = tuple(current_rules() if rules is None else rules)
  sizes = _mesh_axis_sizes(mesh)
  used: set[str] = set()
  assigned: list[Any] = [None] * len(shape)
  done = [name is None for name in logical_axes]
  for rule_name, mesh_axes in rules:
    for i, name in enumerate(logical_axes):
      if done[i] or name != rule_name:
        continue
      done[i] = True
      if mesh_axes is None:
        continue
      axes = [mesh_axes] if isinstance(mesh_axes, str) else list(mesh_axes)
      axes = [a for a in axes if a in sizes and a not in used and sizes[a] > 1]
      while axes and shape[i] % math.prod(sizes[a] for a in axes):
        axes.pop()
      if axes:
        used.update(axes)
        assigned[i] = axes[0] if len(axes) == 1 else tuple(axes)
  return PartitionSpec(*assigned)


def _is_axes(x: Any) -> bool:
  return isinstance(x, PartitionSpec) or (
      isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def logical_shardings(abstract_tree: Any, logical_tree: Any, mesh: Mesh,
                      rules: Optional[Rules] = None) -> Any:
  """NamedShardings for a tree of (abstract) arrays given a matching tree of logical axes.

  Args:
    abstract_tree: arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
    logical_tree: same structure, each leaf a tuple / PartitionSpec of logical axis names
      (e.g. `nn.get_partition_spec(boxed_params)` or `models.logical_axes(cfg)`).
    mesh: the device mesh.
    rules: logical -> mesh rules (default: `current_rules()`).
  """
  return jax.tree.map(
      lambda axes, x: NamedSharding(mesh, logical_to_spec(tuple(axes), x.shape, mesh, rules)),
      logical_tree, abstract_tree, is_leaf=_is_axes)


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]],
              rules: Optional[Rules] = None) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op when no mesh is set (`use_mesh`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(tuple(logical_axes), x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, spec)


def num_shards(logical_axis: str, size: int, mesh: Any = None) -> int:
  """Into how many shards `mesh` (default: the current one, `use_mesh`) splits a dimension of
  `size` with this logical axis name; 1 without a mesh."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or mesh.empty:
    return 1
  axes = logical_to_spec((logical_axis,), (size,), mesh)[0]
  if axes is None:
    return 1
  sizes = _mesh_axis_sizes(mesh)
  return math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
  """Largest number of bytes any one device holds for a tree of (abstract) arrays."""
  totals: dict[Any, int] = {}
  for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
      shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))):
    nbytes = math.prod(s.shard_shape(x.shape)) * jax.numpy.dtype(x.dtype).itemsize
    for d in s.device_set:
      totals[d] = totals.get(d, 0) + nbytes
  return max(totals.values()) if totals else 0
