"""Llama / Qwen2 decoder (Flax linen), its config, parameters and weight I/O.

  from lad_jax import models
  cfg, params = models.load_hf(model_dir, mesh=mesh)         # or models.load_gguf(path)
  model = models.Decoder(cfg)
  out = model.apply({"params": params}, tokens_BT, mask_BT=mask_BT)   # DecoderOutput
  logp_BT = models.forward_logprobs(model, params, tokens_BT, mask_BT=mask_BT)
"""

from lad_jax.models.config import ModelConfig, RopeScaling, SUPPORTED_ARCHITECTURES
from lad_jax.models.decoder import Decoder, DecoderOutput, KVCache, default_positions
from lad_jax.models.gguf_io import GGUFSource, find_smollm2_gguf, gguf_config, load_gguf
from lad_jax.models.logprobs import forward_logprobs, token_logprobs
from lad_jax.models.params import (abstract_params, count_params, init_params,
                                   param_shardings)
from lad_jax.models.tokenizer import encode_chat, load_tokenizer, pad_batch
from lad_jax.models.weights import SafetensorsSource, load_hf, load_params, save_hf

__all__ = [
    "ModelConfig", "RopeScaling", "SUPPORTED_ARCHITECTURES", "Decoder", "DecoderOutput",
    "KVCache", "default_positions", "GGUFSource", "find_smollm2_gguf", "gguf_config",
    "load_gguf", "forward_logprobs", "token_logprobs", "abstract_params", "count_params",
    "init_params", "param_shardings", "encode_chat", "load_tokenizer", "pad_batch",
    "SafetensorsSource", "load_hf", "load_params", "save_hf",
]
