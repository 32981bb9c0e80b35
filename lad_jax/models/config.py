"""Decoder configuration for the Llama / Qwen2 family, read from a Hugging Face `config.json`.

  cfg = ModelConfig.from_hf("/models/Qwen2.5-7B")              # a directory, a config.json path,
  cfg = ModelConfig.from_hf(config_dict, param_dtype="bfloat16")  # a dict, or a transformers config
  hf_dict = cfg.to_hf()                                          # back to config.json form

Both the transformers 4 spelling (`rope_theta` + `rope_scaling`) and the transformers 5 one
(`rope_parameters`) are understood.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import jax.numpy as jnp

from lad_jax.errors import DataFormatError, read_json

# config.json `architectures[0]` -> our family name. Everything here is one code path: pre-norm
# decoder, GQA, RoPE, RMSNorm, SwiGLU; Qwen2 adds q/k/v biases.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
ATTENTION_IMPLS = ("auto", "einsum", "blockwise", "cudnn", "splash")  # lad_jax.models.attention
DECODE_ATTENTIONS = ("auto", "ragged", "window")  # lad_jax.models.decode_attention
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (`rope_scaling` / `rope_parameters` in config.json).

  Attributes mirror transformers' names. `rope_type` is one of `ROPE_TYPES`.
  """

  rope_type: str = "default"
  factor: float = 1.0
  # llama3
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: Optional[int] = None
  # yarn
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: Optional[float] = None
  mscale: Optional[float] = None
  mscale_all_dim: Optional[float] = None
  truncate: bool = True

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(
          f"Unsupported rope_scaling type {self.rope_type!r}; supported: {list(ROPE_TYPES)}. "
          "Remove `rope_scaling` from config.json or use one of these.")

  @classmethod
  def from_hf(cls, d: Optional[Mapping[str, Any]], *, max_position_embeddings: int) -> RopeScaling:
    if not d:
      return cls()
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type not in ROPE_TYPES:
      raise ValueError(
          f"Unsupported rope_scaling type {rope_type!r}; supported: {list(ROPE_TYPES)}.")
    if rope_type == "default":
      return cls()
    orig = d.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn") and orig is None:
      orig = max_position_embeddings  # transformers' default
    return cls(
        rope_type=rope_type,
        factor=float(d.get("factor") or 1.0),
        low_freq_factor=float(d.get("low_freq_factor", 1.0)),
        high_freq_factor=float(d.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=None if orig is None else int(orig),
        beta_fast=float(d.get("beta_fast") or 32.0),
        beta_slow=float(d.get("beta_slow") or 1.0),
        attention_factor=d.get("attention_factor"),
        mscale=d.get("mscale"),
        mscale_all_dim=d.get("mscale_all_dim"),
        truncate=bool(d.get("truncate", True)),
    )

  def to_hf(self) -> Optional[dict[str, Any]]:
    if self.rope_type == "default":
      return None
    d: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
    if self.rope_type == "llama3":
      d.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
               original_max_position_embeddings=self.original_max_position_embeddings)
    elif self.rope_type == "yarn":
      d.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow,
               original_max_position_embeddings=self.original_max_position_embeddings,
               truncate=self.truncate)
      for k in ("attention_factor", "mscale", "mscale_all_dim"):
        if getattr(self, k) is not None:
          d[k] = getattr(self, k)
    return d


def _dtype_name(x: Any) -> str:
  name = jnp.dtype(x).name
  if name not in _DTYPES:
    raise ValueError(f"Unsupported dtype {x!r}; use one of {list(_DTYPES)}.")
  return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a decoder; hashable, so it can be a Flax module attribute.

  Attributes:
    architecture: "llama" or "qwen2" (values of `SUPPORTED_ARCHITECTURES`).
    vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim:
      sizes (V, D, F, L, N, K, H). num_heads must be a multiple of num_kv_heads (GQA).
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: RoPE base; rope_scaling: frequency scaling.
    max_position_embeddings: context length the model was trained for (informational, and the
      default `original_max_position_embeddings` of llama3/yarn scaling).
    tie_word_embeddings: the LM head reuses the input embedding.
    qkv_bias: q/k/v projections have biases (Qwen2, or Llama with attention_bias).
    o_bias: the output projection has a bias (Llama with attention_bias).
    param_dtype: storage dtype of parameters ("float32" or "bfloat16").
    dtype: compute dtype of matmuls and the residual stream. Norms, RoPE and the attention
      softmax always run in float32.
    logits_dtype: dtype of the returned logits (float32 accumulation either way).
    remat_policy: rematerialisation of each block, one of `REMAT_POLICIES`.
    scan_unroll: layers per iteration of the layer scan (num_layers = fully unrolled).
    attention_impl: attention of the tokens among themselves (no KV cache, or an empty one),
      one of `ATTENTION_IMPLS` (see `lad_jax.models.attention`): "auto" (cuDNN on GPU, splash
      on TPU, else blockwise), "einsum" (the reference), "blockwise" (flash-style, memory
      O(T * block)), "cudnn", "splash". Attention over a filled KV cache: `decode_block_size`.
    attention_block_size: queries (and keys) per block of the no-cache attention: "einsum"
      runs each query block against the keys up to its end (causal block skipping),
      "blockwise" also blocks the keys; 0 = one block.
    attention_max_segments: the most segment runs (packed sequences) per row that "cudnn"
      handles; runs past it are dropped (static shapes), so keep it >= the packing.
    decode_block_size: with a KV cache, attention reads only a prefix window of the cache,
      the smallest of this, twice this, four times ... (up to the bucket) that holds the
      written slots (`decode_attention`): decode cost follows the written length, not the cache
      bucket (for either attention_impl). 0 = attend over the whole bucket, empty slots
      masked.
    decode_attention: how a cached step reads the written slots (with decode_block_size > 0):
      "ragged", each row its own written blocks of decode_block_size slots (none once it has
      ended), so a step's work follows the sum of the rows' lengths, through a gather that
      copies them; "window", every row the prefix window that holds the longest row, no copy;
      "auto" (the default), per step whichever reads less (`decode_attention.attend_auto`).
    bos_token_id, eos_token_ids, pad_token_id: special tokens from config.json, if given.
    initializer_range: stddev of the normal initialiser for fresh parameters.
  """

  architecture: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  max_position_embeddings: int = 32768
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  logits_dtype: str = "float32"
  remat_policy: str = "none"
  scan_unroll: int = 1
  attention_impl: str = "auto"
  attention_block_size: int = 128
  attention_max_segments: int = 16
  decode_block_size: int = 32
  decode_attention: str = "auto"
  bos_token_id: Optional[int] = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: Optional[int] = None
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.architecture not in _MODEL_TYPES:
      raise ValueError(
          f"Unknown architecture {self.architecture!r}; supported: {sorted(_MODEL_TYPES)}.")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "scan_unroll"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads}) for grouped-query attention.")
    if self.attention_block_size < 0:
      raise ValueError(f"attention_block_size must be >= 0, got {self.attention_block_size}.")
    if self.attention_max_segments < 1:
      raise ValueError(
          f"attention_max_segments must be >= 1, got {self.attention_max_segments}.")
    if self.decode_block_size < 0:
      raise ValueError(f"decode_block_size must be >= 0 (0 = whole cache), got "
                       f"{self.decode_block_size}.")
    if self.decode_attention not in DECODE_ATTENTIONS:
      raise ValueError(f"Unknown decode_attention {self.decode_attention!r}; valid: "
                       f"{list(DECODE_ATTENTIONS)}.")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}.")
    for name in ("param_dtype", "dtype", "logits_dtype"):
      object.__setattr__(self, name, _dtype_name(getattr(self, name)))
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"Unknown remat_policy {self.remat_policy!r}; valid: {list(REMAT_POLICIES)}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
          f"Unknown attention_impl {self.attention_impl!r}; valid: {list(ATTENTION_IMPLS)}.")
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", RopeScaling.from_hf(
          self.rope_scaling, max_position_embeddings=self.max_position_embeddings))
    object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))

  @property
  def num_groups(self) -> int:
    """Query heads per kv head (G = N / K)."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **kwargs) -> ModelConfig:
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def from_hf(cls, source: Any, **overrides) -> ModelConfig:
    """Builds a config from a Hugging Face config.

    Args:
      source: a model directory (containing config.json), a path to a config.json, a dict of
        its contents, or a `transformers.PretrainedConfig`.
      **overrides: ModelConfig fields to set (e.g. `param_dtype="bfloat16"`, `remat_policy="dots"`).

    Raises:
      FileNotFoundError: no config.json where one was expected.
      DataFormatError: config.json is not valid JSON (names the file and position).
      ValueError: unsupported architecture or rope scaling.
    """
    d = _read_hf_dict(source)
    arch = _architecture(d)
    text = d.get("text_config")
    if isinstance(text, Mapping) and "hidden_size" not in d:
      d = {**d, **text}
    if d.get("use_sliding_window"):
      raise ValueError(
          "use_sliding_window=true is not supported (sliding-window attention); set it to false "
          "in config.json (Qwen2.5 checkpoints ship with it false).")
    if d.get("mlp_bias"):
      raise ValueError("mlp_bias=true is not supported by this decoder.")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise ValueError(f"hidden_act {act!r} is not supported; the family uses 'silu' (SwiGLU).")
    num_heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    max_pos = int(d.get("max_position_embeddings", 32768))
    rope_params = d.get("rope_parameters")
    if isinstance(rope_params, Mapping) and "rope_theta" in rope_params:
      rope_theta = float(rope_params["rope_theta"])
      scaling = rope_params
    else:
      rope_theta = float(d.get("rope_theta", 10000.0))
      scaling = d.get("rope_scaling")
    if isinstance(rope_params, Mapping) and any(
        isinstance(v, Mapping) for v in rope_params.values()):
      raise ValueError("Per-layer-type rope_parameters are not supported by this decoder.")
    if isinstance(rope_params, Mapping) and rope_params.get("partial_rotary_factor", 1.0) != 1.0:
      raise ValueError("partial_rotary_factor != 1 is not supported by this decoder.")
    eos = d.get("eos_token_id")
    eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
    attention_bias = bool(d.get("attention_bias", False))
    fields = dict(
        architecture=arch,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
        head_dim=int(d.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=RopeScaling.from_hf(scaling, max_position_embeddings=max_pos),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=True if arch == "qwen2" else attention_bias,
        o_bias=False if arch == "qwen2" else attention_bias,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=d.get("pad_token_id"),
        initializer_range=float(d.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict[str, Any]:
    """The config.json contents transformers needs to rebuild this model."""
    d: dict[str, Any] = {
        "architectures": [_MODEL_TYPES[self.architecture]],
        "model_type": self.architecture,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": self.rope_scaling.to_hf(),
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "initializer_range": self.initializer_range,
        "torch_dtype": self.param_dtype,
    }
    if self.architecture == "llama":
      if self.qkv_bias != self.o_bias:
        raise ValueError("Llama's attention_bias covers q, k, v and o together; qkv_bias and "
                         "o_bias must be equal to export a Llama config.")
      d["attention_bias"] = self.qkv_bias
      d["mlp_bias"] = False
    else:
      if not self.qkv_bias or self.o_bias:
        raise ValueError("Qwen2 always has q/k/v biases and no o bias.")
      d["use_sliding_window"] = False
    if self.bos_token_id is not None:
      d["bos_token_id"] = self.bos_token_id
    if self.eos_token_ids:
      d["eos_token_id"] = (self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                           else list(self.eos_token_ids))
    if self.pad_token_id is not None:
      d["pad_token_id"] = self.pad_token_id
    return d


def _read_hf_dict(source: Any) -> dict[str, Any]:
  if isinstance(source, Mapping):
    return dict(source)
  if hasattr(source, "to_dict"):  # transformers.PretrainedConfig
    return source.to_dict()
  path = os.fspath(source)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No config.json at {path!r}. Expected a Hugging Face model directory containing "
        "config.json (plus model.safetensors or model-*.safetensors shards).")
  d = read_json(path, fix="download config.json again or fix it by hand")
  if not isinstance(d, dict):
    raise DataFormatError(f"{path}: a JSON {type(d).__name__}, not an object of model settings; "
                          "download config.json again.")
  return d


def _architecture(d: Mapping[str, Any]) -> str:
  archs = d.get("architectures") or []
  for a in archs:
    if a in SUPPORTED_ARCHITECTURES:
      return SUPPORTED_ARCHITECTURES[a]
  if not archs and d.get("model_type") in _MODEL_TYPES:
    return d["model_type"]
  raise ValueError(
      f"Unsupported architecture {archs or d.get('model_type')!r} in config.json; supported: "
      f"{sorted(SUPPORTED_ARCHITECTURES)}.")
