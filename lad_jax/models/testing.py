"""Tiny models for tests: a random ModelConfig, and random transformers checkpoints on disk.

  cfg = tiny_config("qwen2")                                   # no torch needed
  hf_model, directory = tiny_hf_checkpoint(tmp_path, "llama", tie_word_embeddings=True)

`tiny_hf_checkpoint` needs torch and transformers (test dependencies). It builds the model from a
config object (no download), re-draws norms and biases so they are not the trivial ones/zeros,
and saves it with `save_pretrained` (config.json + model.safetensors).
"""

from __future__ import annotations

import os
from typing import Any

from lad_jax.models.config import ModelConfig

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16)


def tiny_config(architecture: str = "qwen2", **overrides) -> ModelConfig:
  """Hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 128 (overridable)."""
  fields = dict(TINY, architecture=architecture, qkv_bias=architecture == "qwen2",
                rope_theta=10000.0, initializer_range=0.2)
  fields.update(overrides)
  return ModelConfig(**fields)


def random_params(cfg: ModelConfig, *, seed: int = 0, scale: float = 0.2) -> Any:
  """Random parameters drawn in numpy (no XLA compile, unlike `init_params`): normal(scale)
  weights and biases, norms 1 + normal(scale). Returned as numpy arrays in cfg.param_dtype."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lad_jax.models.params import abstract_params  # pylint: disable=g-import-not-at-top

  shapes, _ = abstract_params(cfg)
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  out = []
  for path, sds in leaves:
    x = rng.normal(size=sds.shape).astype(np.float32) * scale
    if getattr(path[-1], "key", None) == "scale":
      x = x + 1.0
    out.append(x.astype(sds.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def tiny_hf_checkpoint(directory: str, architecture: str = "qwen2", *, seed: int = 0,
                       initializer_range: float = 0.2, **hf_overrides) -> tuple[Any, str]:
  """A random fp32 transformers model saved in `directory`; returns (model in eval mode, dir).

  `hf_overrides` are transformers config fields (tie_word_embeddings, attention_bias,
  rope_parameters, ...).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  kwargs = dict(vocab_size=TINY["vocab_size"], hidden_size=TINY["hidden_size"],
                intermediate_size=TINY["intermediate_size"],
                num_hidden_layers=TINY["num_layers"], num_attention_heads=TINY["num_heads"],
                num_key_value_heads=TINY["num_kv_heads"], initializer_range=initializer_range,
                max_position_embeddings=256, tie_word_embeddings=False)
  kwargs.update(hf_overrides)
  config_cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}
  if architecture not in config_cls:
    raise ValueError(f"Unknown architecture {architecture!r}; valid: {sorted(config_cls)}.")
  torch.manual_seed(seed)
  config = config_cls[architecture](**kwargs)
  model_cls = {"qwen2": transformers.Qwen2ForCausalLM, "llama": transformers.LlamaForCausalLM}
  model = model_cls[architecture](config).to(torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.3 * torch.randn_like(p))
  os.makedirs(directory, exist_ok=True)
  model.save_pretrained(directory)
  return model, os.fspath(directory)
