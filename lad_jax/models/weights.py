"""Weight I/O: Hugging Face safetensors directories -> sharded params -> safetensors again.

  cfg, params = load_hf("/models/Qwen2.5-7B", mesh=mesh, param_dtype="bfloat16")
  save_hf(params, cfg, "/tmp/export")          # config.json + model(-0000i-of-0000N).safetensors

Loading builds the abstract parameters with `jax.eval_shape`, computes each parameter's
NamedSharding, and fills every device's shard from the slices of the checkpoint tensors it
needs (`jax.make_array_from_callback`), so a model is never whole on one device; on a host only
the shards of one parameter are in memory at a time. torch `Linear` weights ([out, in]) are
transposed and their head axes split ([D, N*H] -> [D, N, H]) on the way in, and back on export.

Any source of HF-named, HF-shaped tensors can be loaded (`TensorSource`); `SafetensorsSource`
reads a directory and `lad_jax.models.gguf_io.GGUFSource` a GGUF file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
from typing import Any, Iterator, Optional, Protocol, Sequence

import flax.traverse_util
import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors needs)
import numpy as np
from jax.sharding import Mesh

from lad_jax import sharding
from lad_jax.errors import DataFormatError, read_json
from lad_jax.models.config import ModelConfig
from lad_jax.models.params import abstract_params

Path = tuple[str, ...]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_EXPECTED_LAYOUT = (
    "a Hugging Face model directory with config.json and either model.safetensors or sharded "
    "model-00001-of-0000N.safetensors files listed in model.safetensors.index.json")


@dataclasses.dataclass(frozen=True)
class Transform:
  """How an HF tensor maps to ours: `ours = transpose(reshape(hf, split), perm)`.

  `groups[j]` lists the split dims that make up HF dim j (e.g. q_proj's HF dim 0, N*H, splits
  into (N, H)); ours dim i is split dim `perm[i]`.
  """

  groups: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  def split_shape(self, ours: Sequence[int]) -> tuple[int, ...]:
    split = [0] * len(ours)
    for i, p in enumerate(self.perm):
      split[p] = ours[i]
    return tuple(split)

  def hf_shape(self, ours: Sequence[int]) -> tuple[int, ...]:
    split = self.split_shape(ours)
    return tuple(math.prod(split[s] for s in g) for g in self.groups)

  def read(self, source: TensorSource, name: str, ours_shape: Sequence[int],
           ours_slices: Sequence[slice]) -> np.ndarray:
    """Reads the block `ours[ours_slices]` touching only the HF rows/columns it needs."""
    split = self.split_shape(ours_shape)
    split_sl: list[slice] = [slice(None)] * len(split)
    for i, p in enumerate(self.perm):
      split_sl[p] = ours_slices[i]
    hf_sl, block_shape, inner_sl = [], [], []
    for g in self.groups:
      start, stop, _ = split_sl[g[0]].indices(split[g[0]])
      inner = math.prod(split[s] for s in g[1:])
      hf_sl.append(slice(start * inner, stop * inner))
      block_shape.append(stop - start)
      inner_sl.append(slice(None))
      for s in g[1:]:  # head_dim is never sharded, but stay correct if it is
        block_shape.append(split[s])
        inner_sl.append(split_sl[s])
    block = np.asarray(source.read(name, tuple(hf_sl))).reshape(block_shape)
    return np.transpose(block[tuple(inner_sl)], self.perm)

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    return np.transpose(ours, np.argsort(self.perm)).reshape(self.hf_shape(ours.shape))


IDENTITY_1D = Transform(((0,),), (0,))
IDENTITY_2D = Transform(((0,), (1,)), (0, 1))
LINEAR = Transform(((0,), (1,)), (1, 0))            # [out, in] -> [in, out]
LINEAR_TO_HEADS = Transform(((0, 1), (2,)), (2, 0, 1))  # [N*H, D] -> [D, N, H]
BIAS_TO_HEADS = Transform(((0, 1),), (0, 1))         # [N*H] -> [N, H]
LINEAR_FROM_HEADS = Transform(((0,), (1, 2)), (1, 2, 0))  # [D, N*H] -> [N, H, D]


@dataclasses.dataclass(frozen=True)
class ParamMap:
  """One of our parameters and the HF tensor(s) it comes from ({i} = layer index)."""

  path: Path
  hf_name: str
  transform: Transform
  stacked: bool  # leading [L] axis, one HF tensor per layer


def param_map(cfg: ModelConfig) -> list[ParamMap]:
  """Our parameter paths <-> HF tensor names, in checkpoint order."""
  layer = "model.layers.{i}."
  maps = [ParamMap(("embed_tokens", "embedding"), "model.embed_tokens.weight", IDENTITY_2D,
                   False)]
  attn = [("q_proj", LINEAR_TO_HEADS, BIAS_TO_HEADS), ("k_proj", LINEAR_TO_HEADS, BIAS_TO_HEADS),
          ("v_proj", LINEAR_TO_HEADS, BIAS_TO_HEADS)]
  maps.append(ParamMap(("layers", "input_layernorm", "scale"), layer + "input_layernorm.weight",
                       IDENTITY_1D, True))
  for proj, wt, bt in attn:
    maps.append(ParamMap(("layers", "self_attn", proj, "kernel"),
                         layer + f"self_attn.{proj}.weight", wt, True))
    if cfg.qkv_bias:
      maps.append(ParamMap(("layers", "self_attn", proj, "bias"),
                           layer + f"self_attn.{proj}.bias", bt, True))
  maps.append(ParamMap(("layers", "self_attn", "o_proj", "kernel"),
                       layer + "self_attn.o_proj.weight", LINEAR_FROM_HEADS, True))
  if cfg.o_bias:
    maps.append(ParamMap(("layers", "self_attn", "o_proj", "bias"),
                         layer + "self_attn.o_proj.bias", IDENTITY_1D, True))
  maps.append(ParamMap(("layers", "post_attention_layernorm", "scale"),
                       layer + "post_attention_layernorm.weight", IDENTITY_1D, True))
  for proj in ("gate_proj", "up_proj", "down_proj"):
    maps.append(ParamMap(("layers", "mlp", proj, "kernel"), layer + f"mlp.{proj}.weight",
                         LINEAR, True))
  maps.append(ParamMap(("norm", "scale"), "model.norm.weight", IDENTITY_1D, False))
  if not cfg.tie_word_embeddings:
    maps.append(ParamMap(("lm_head", "kernel"), "lm_head.weight", LINEAR, False))
  return maps


class TensorSource(Protocol):
  """HF-named tensors in HF layout ([out, in] linear weights)."""

  def shape(self, name: str) -> Optional[tuple[int, ...]]:
    """The tensor's shape, or None if it is not in the source."""

  def read(self, name: str, slices: tuple[slice, ...]) -> np.ndarray:
    """The block `tensor[slices]` (contiguous slices)."""

  def where(self, name: str) -> str:
    """Human-readable location of `name` (for error messages)."""


def _shard_error(path: str, e: Exception) -> DataFormatError:
  """One line naming the unreadable safetensors file, the reader's complaint, and the fix."""
  reason = " ".join(str(e).split())
  return DataFormatError(
      f"{path}: not a readable safetensors file ({reason}; {os.path.getsize(path)} bytes); it is "
      "probably truncated by an interrupted download: download that file again.")


def _read_weight_map(index_path: str) -> dict[str, str]:
  """The tensor -> shard file map of model.safetensors.index.json (one-line errors)."""
  index = read_json(index_path, fix="download the index again or re-save the model")
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not all(
      isinstance(v, str) for v in weight_map.values()):
    raise DataFormatError(f"{index_path}: no \"weight_map\" object of tensor name -> shard file; "
                          "download the index again or re-save the model.")
  return weight_map


class SafetensorsSource:
  """Tensors of a HF directory: model.safetensors, or shards listed in the index json."""

  def __init__(self, directory: str):
    self.directory = directory = os.fspath(directory)
    if not os.path.isdir(directory):
      raise FileNotFoundError(
          f"Model directory {directory!r} does not exist; expected {_EXPECTED_LAYOUT}.")
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
      weight_map = _read_weight_map(index_path)
      files = sorted(set(weight_map.values()))
      missing = [fn for fn in files if not os.path.isfile(os.path.join(directory, fn))]
      if missing:
        raise FileNotFoundError(
            f"{INDEX_FILE} in {directory!r} lists {len(files)} shard(s) but {missing} "
            f"{'is' if len(missing) == 1 else 'are'} missing; put every shard named in "
            "the index next to it.")
    else:
      files = ([SINGLE_FILE] if os.path.isfile(os.path.join(directory, SINGLE_FILE)) else
               sorted(os.path.basename(p)
                      for p in glob.glob(os.path.join(directory, "*.safetensors"))))
      if not files:
        raise FileNotFoundError(
            f"No safetensors weights in {directory!r}; expected {_EXPECTED_LAYOUT}. "
            "(pytorch_model.bin is not read: re-save it with transformers' save_pretrained.)")
      weight_map = None
    self._stack = contextlib.ExitStack()
    self._handles: dict[str, Any] = {}
    if weight_map is None:
      weight_map = {}
      for fn in files:
        for name in self._handle(fn).keys():
          weight_map[name] = fn
    self.weight_map: dict[str, str] = dict(weight_map)

  def _handle(self, fn: str) -> Any:
    if fn not in self._handles:
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
      path = os.path.join(self.directory, fn)
      try:
        handle = safe_open(path, framework="numpy")
      except Exception as e:  # safetensors raises its own SafetensorError (a plain Exception)
        raise _shard_error(path, e) from e
      self._handles[fn] = self._stack.enter_context(handle)
    return self._handles[fn]

  def shape(self, name: str) -> Optional[tuple[int, ...]]:
    if name not in self.weight_map:
      return None
    return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

  def read(self, name: str, slices: tuple[slice, ...]) -> np.ndarray:
    handle = self._handle(self.weight_map[name])
    try:
      return handle.get_slice(name)[slices]
    except Exception as e:  # a shard cut short after its header was read
      raise _shard_error(self.where(name), e) from e

  def where(self, name: str) -> str:
    fn = self.weight_map.get(name)
    return os.path.join(self.directory, fn) if fn else self.directory

  def close(self):
    self._stack.close()
    self._handles.clear()

  def __enter__(self) -> SafetensorsSource:
    return self

  def __exit__(self, *exc):
    self.close()


def _check_source(source: TensorSource, cfg: ModelConfig, shapes: dict[Path, Any]) -> None:
  """Fails before reading anything if a tensor is missing or has the wrong shape."""
  for m in param_map(cfg):
    ours = shapes[m.path].shape
    per_layer = ours[1:] if m.stacked else ours
    want = m.transform.hf_shape(per_layer)
    for i in (range(cfg.num_layers) if m.stacked else [None]):
      name = m.hf_name.format(i=i)
      got = source.shape(name)
      if got is None:
        hint = (" (the checkpoint has no LM head: is tie_word_embeddings missing from "
                "config.json?)" if name == "lm_head.weight" else "")
        raise ValueError(f"Tensor {name!r} (for {'/'.join(m.path)}) not found in "
                         f"{source.where(name)}{hint}.")
      if tuple(got) != tuple(want):
        raise ValueError(
            f"Tensor {name!r} in {source.where(name)} has shape {tuple(got)}, but the config "
            f"implies {tuple(want)} for {'/'.join(m.path)}; does config.json match the weights?")


def _index_key(index: tuple[slice, ...], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _assemble_shards(source: TensorSource, m: ParamMap, shape: tuple[int, ...], dtype: Any,
                     sharding_: jax.sharding.Sharding) -> jax.Array:
  """Builds one parameter from the slices each addressable device needs.

  Reads go layer by layer (outer) and shard by shard (inner), so a source that has to decode a
  whole tensor (GGUF) decodes each one once; replicated shards are read once.
  """
  indices = sharding_.addressable_devices_indices_map(shape)
  keys = {_index_key(idx, shape) for idx in indices.values()}
  blocks = {k: np.empty(tuple(b - a for a, b in k), dtype) for k in keys}
  if m.stacked:
    for layer in range(shape[0]):
      name = m.hf_name.format(i=layer)
      for k in keys:
        (l0, l1), rest = k[0], k[1:]
        if l0 <= layer < l1:
          blocks[k][layer - l0] = m.transform.read(
              source, name, shape[1:], [slice(a, b) for a, b in rest])
  else:
    for k in keys:
      blocks[k][...] = m.transform.read(source, m.hf_name, shape, [slice(a, b) for a, b in k])
  return jax.make_array_from_callback(shape, sharding_,
                                      lambda idx: blocks[_index_key(idx, shape)])


def load_params(source: TensorSource, cfg: ModelConfig, *, mesh: Optional[Mesh] = None,
                rules: Optional[sharding.Rules] = None) -> Any:
  """Parameters for `cfg` from `source`, placed directly into their shards.

  Args:
    source: HF-named tensors (`SafetensorsSource`, `gguf_io.GGUFSource`, ...).
    cfg: the model config; params are stored in `cfg.param_dtype`.
    mesh: device mesh; None puts everything on the first device.
    rules: logical->mesh rules (default `sharding.DEFAULT_RULES` / the active ones).
  """
  shapes, axes = abstract_params(cfg)
  flat_shapes = flax.traverse_util.flatten_dict(shapes)
  if mesh is None:
    device_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat_shardings = {p: device_sharding for p in flat_shapes}
  else:
    flat_shardings = flax.traverse_util.flatten_dict(
        sharding.logical_shardings(shapes, axes, mesh, rules))
  maps = {m.path: m for m in param_map(cfg)}
  if set(maps) != set(flat_shapes):  # a bug in param_map, not in the user's files
    raise AssertionError(f"param_map/model mismatch: {set(maps) ^ set(flat_shapes)}")
  _check_source(source, cfg, flat_shapes)
  dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  flat = {}
  for path, sds in flat_shapes.items():
    flat[path] = _assemble_shards(source, maps[path], tuple(sds.shape), dtype,
                                  flat_shardings[path])
  return flax.traverse_util.unflatten_dict(flat)


def load_hf(directory: str, *, mesh: Optional[Mesh] = None,
            rules: Optional[sharding.Rules] = None, **config_overrides
            ) -> tuple[ModelConfig, Any]:
  """Config and (sharded) params from a local HF directory (config.json + safetensors).

  Args:
    directory: the model directory.
    mesh, rules: see `load_params`.
    **config_overrides: ModelConfig fields, e.g. `param_dtype="bfloat16"`.

  Raises:
    FileNotFoundError: missing directory, config.json, or safetensors shard.
    DataFormatError: broken config.json / index JSON, or a truncated shard (naming the file).
    ValueError: unsupported architecture, missing tensor, or shape mismatch (naming it).
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"Model directory {directory!r} does not exist; expected {_EXPECTED_LAYOUT}.")
  cfg = ModelConfig.from_hf(directory, **config_overrides)
  with SafetensorsSource(directory) as source:
    params = load_params(source, cfg, mesh=mesh, rules=rules)
  return cfg, params


def _to_host(x: jax.Array) -> np.ndarray:
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def iter_hf_tensors(params: Any, cfg: ModelConfig, *, dtype: Any = None
                    ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, HF-layout numpy tensor), one at a time (one layer slice in host memory)."""
  flat = flax.traverse_util.flatten_dict(params)
  for m in param_map(cfg):
    arr = flat[m.path]
    for i in (range(cfg.num_layers) if m.stacked else [None]):
      x = _to_host(arr[i] if m.stacked else arr)
      if dtype is not None:
        x = x.astype(np.dtype(jax.numpy.dtype(dtype)))
      yield m.hf_name.format(i=i), np.ascontiguousarray(m.transform.to_hf(x))


def save_hf(params: Any, cfg: ModelConfig, directory: str, *, dtype: Any = None,
            max_shard_bytes: int = 4 * 2**30, tokenizer: Any = None) -> list[str]:
  """Writes config.json and safetensors (sharded with an index above `max_shard_bytes`).

  transformers loads the result with `AutoModelForCausalLM.from_pretrained(directory)`.

  Args:
    params: parameters (sharded or not).
    cfg: their config.
    directory: output directory (created).
    dtype: dtype to store (default: each parameter's own).
    max_shard_bytes: shard size limit.
    tokenizer: optional transformers tokenizer, saved alongside.

  Returns:
    The safetensors file names written.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  flat = flax.traverse_util.flatten_dict(params)
  # Plan the shards from shapes, then materialise one shard at a time.
  plan: list[list[tuple[str, int]]] = [[]]
  size = 0
  for m in param_map(cfg):
    arr = flat[m.path]
    itemsize = np.dtype(jax.numpy.dtype(dtype or arr.dtype)).itemsize
    per = math.prod(arr.shape[1:] if m.stacked else arr.shape) * itemsize
    for i in (range(cfg.num_layers) if m.stacked else [None]):
      if plan[-1] and size + per > max_shard_bytes:
        plan.append([])
        size = 0
      plan[-1].append((m.hf_name.format(i=i), per))
      size += per
  names = ([SINGLE_FILE] if len(plan) == 1 else
           [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))])
  write = jax.process_index() == 0
  if write:
    os.makedirs(directory, exist_ok=True)
    hf_cfg = cfg.to_hf()
    stored = jax.numpy.dtype(dtype or cfg.param_dtype).name
    hf_cfg["torch_dtype"] = stored
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=2)
  tensors = iter_hf_tensors(params, cfg, dtype=dtype)
  weight_map, total = {}, 0
  for fn, shard in zip(names, plan):
    chunk = {}
    for name, _ in shard:
      got_name, x = next(tensors)
      assert got_name == name, (got_name, name)
      chunk[name] = x
      weight_map[name] = fn
      total += x.nbytes
    if write:
      save_file(chunk, os.path.join(directory, fn), metadata={"format": "pt"})
  if write and len(names) > 1:
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  if write and tokenizer is not None:
    tokenizer.save_pretrained(directory)
  return names
