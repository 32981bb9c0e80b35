"""Published shapes of the models the paper configs train, as config.json dicts (no weights).

`memory_plan` needs a model's sizes before its checkpoint is downloaded; these are the fields of
each model's Hugging Face `config.json` that change memory (and RoPE / special ids, so the
ModelConfig is the same one `ModelConfig.from_hf` would build from the real file).

  cfg = ModelConfig.from_hf(shapes.get("qwen2.5-7b"), param_dtype="bfloat16")
  name = shapes.infer("~/models/Thinkless-DeepScaleR-1.5B")   # -> "deepseek-r1-distill-qwen-1.5b"

Source of every row: the `config.json` of the Hugging Face repository named in its comment (values
as published when this table was written; a local config.json, `--config.model.path`, wins).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from lad_jax.errors import ConfigError


def _qwen2(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, *,
           tie: bool, theta: float, max_pos: int, bos: int = 151643, eos: int = 151643
           ) -> dict[str, Any]:
  return {"architectures": ["Qwen2ForCausalLM"], "hidden_size": hidden,
          "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
          "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tie,
          "rope_theta": theta, "max_position_embeddings": max_pos, "rms_norm_eps": 1e-6,
          "bos_token_id": bos, "eos_token_id": eos, "hidden_act": "silu",
          "use_sliding_window": False}


# name -> config.json fields. Qwen2 family: head_dim = hidden / heads = 128 throughout.
SHAPES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-7B (configs/qwen7b.py)
    "qwen2.5-7b": _qwen2(3584, 18944, 28, 28, 4, 152064, tie=False, theta=1e6, max_pos=131072),
    # Qwen/Qwen2.5-1.5B
    "qwen2.5-1.5b": _qwen2(1536, 8960, 28, 12, 2, 151936, tie=True, theta=1e6, max_pos=131072),
    # Qwen/Qwen2.5-Math-1.5B (base of the R1 distill and of OpenMath-Nemotron)
    "qwen2.5-math-1.5b": _qwen2(1536, 8960, 28, 12, 2, 151936, tie=True, theta=1e4,
                                max_pos=4096),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (untied LM head, unlike its base); also the shape
    # of agentica-org/DeepScaleR-1.5B-Preview and Thinkless-DeepScaleR-1.5B (configs/deepscaler1p5b.py)
    "deepseek-r1-distill-qwen-1.5b": _qwen2(1536, 8960, 28, 12, 2, 151936, tie=False, theta=1e4,
                                            max_pos=131072, bos=151646),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-7B (configs/deepseek7b_code.py)
    "deepseek-r1-distill-qwen-7b": _qwen2(3584, 18944, 28, 28, 4, 152064, tie=False, theta=1e4,
                                          max_pos=131072, bos=151646),
    # nvidia/OpenMath-Nemotron-1.5B (configs/nemotron1p5b.py): Qwen2.5-Math-1.5B fine-tuned with a
    # longer context; sizes and tied head as its base (rope_theta / max_position_embeddings do not
    # change memory; taken from the base here, check the real config.json for RoPE).
    "openmath-nemotron-1.5b": _qwen2(1536, 8960, 28, 12, 2, 151936, tie=True, theta=1e4,
                                     max_pos=131072),
}

# Lower-cased checkpoint directory names that are fine-tunes of a shape above.
ALIASES = {
    "thinkless-deepscaler-1.5b": "deepseek-r1-distill-qwen-1.5b",
    "deepscaler-1.5b-preview": "deepseek-r1-distill-qwen-1.5b",
}


def names() -> list[str]:
  return sorted(SHAPES)


def get(name: str) -> dict[str, Any]:
  """The config.json dict of a published model (`names()`, or an alias); ConfigError if unknown."""
  key = ALIASES.get(name.lower(), name.lower())
  if key not in SHAPES:
    raise ConfigError(f"Unknown model shape {name!r}; known: {names()} (or pass "
                      "--config.model.path=<dir with config.json>).")
  return dict(SHAPES[key])


def infer(path: Optional[str]) -> Optional[str]:
  """The shape named by a checkpoint path's last component (e.g. '~/models/Qwen2.5-7B'), if any."""
  if not path:
    return None
  base = os.path.basename(os.path.normpath(os.path.expanduser(path))).lower()
  base = ALIASES.get(base, base)
  return base if base in SHAPES else None
