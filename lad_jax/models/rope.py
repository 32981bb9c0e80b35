"""Rotary position embeddings (RoPE) with the scalings of the Llama / Qwen2 family.

Frequencies follow transformers' `modeling_rope_utils` (default, linear, llama3, yarn) so that
checkpoints trained with them reproduce; the rotation is the "rotate half" layout used by HF
checkpoints: x = [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lad_jax.models.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """Per-pair inverse frequencies [H/2] and the attention (cos/sin) scaling factor.

  Computed in float32 numpy at trace time; they are compile-time constants.
  """
  dim = cfg.head_dim
  base = cfg.rope_theta
  rs = cfg.rope_scaling
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  pos_freqs = np.float32(base) ** exponents
  inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
  attention_factor = 1.0
  if rs.rope_type == "default":
    pass
  elif rs.rope_type == "linear":
    inv_freq = inv_freq / np.float32(rs.factor)
  elif rs.rope_type == "llama3":
    old_ctx = rs.original_max_position_embeddings
    low_wavelen = old_ctx / rs.low_freq_factor
    high_wavelen = old_ctx / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
  elif rs.rope_type == "yarn":
    factor = rs.factor
    orig = rs.original_max_position_embeddings

    def get_mscale(scale, mscale=1.0):
      return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if rs.attention_factor is not None:
      attention_factor = float(rs.attention_factor)
    elif rs.mscale and rs.mscale_all_dim:
      attention_factor = get_mscale(factor, rs.mscale) / get_mscale(factor, rs.mscale_all_dim)
    else:
      attention_factor = get_mscale(factor)

    def correction_dim(num_rotations):
      return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
      high += 0.001  # avoids a division by zero, as transformers does
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / np.float32(factor) * (1 - extrapolation)
                + inv_freq * extrapolation).astype(np.float32)
  else:  # ModelConfig validates rope_type, so this is unreachable.
    raise ValueError(f"Unsupported rope type {rs.rope_type!r}.")
  return inv_freq.astype(np.float32), float(attention_factor)


def sin_cos(positions_BT: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """sin and cos tables [B, T, H/2] (float32) for integer positions [B, T]."""
  inv_freq, attention_factor = inverse_frequencies(cfg)
  angles_BTh = positions_BT.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
  return jnp.sin(angles_BTh) * attention_factor, jnp.cos(angles_BTh) * attention_factor


def apply_rope(x_BTNH: jax.Array, sin_BTh: jax.Array, cos_BTh: jax.Array) -> jax.Array:
  """Rotates q or k [B, T, heads, H] in float32 and returns it in the input dtype."""
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  sin = sin_BTh[:, :, None, :]
  cos = cos_BTh[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)
