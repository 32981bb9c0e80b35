"""XLA:CPU compiler options for the sampler's jits (empty on GPU / TPU).

  fn = jax.jit(decode, compiler_options=xla_cpu.sampler_options(platform))

By default XLA:CPU (jax 0.10) fuses a dot with the reductions and elementwise ops around it into
one YNNPACK fusion. For decoding that is a loss: the LM head fused with the softmax's row max
runs at a third of the plain matmul's speed (128 x 576 x 49152: 105 ms vs 44 ms), and 64 tokens
of 128 rows of SmolLM2-135M took 25.3 s instead of 30.9 s with dots left unfused (in-process
A/B, best of 3).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

_UNFUSED_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _supported(options: tuple[tuple[str, Any], ...]) -> bool:
  """Whether this jaxlib's CPU compiler accepts `options` (they are experimental flags)."""
  try:
    jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(
        compiler_options=dict(options))
  except Exception as e:  # pylint: disable=broad-except
    if "option" in str(e).lower():
      return False
    raise
  return True


def sampler_options(platform: str) -> dict[str, Any]:
  """Compiler options for the sampler's prefill / decode on `platform` ("cpu", "gpu", ...).

  {} off CPU, or where this jaxlib lacks the flag (the default fusion then applies).
  """
  if platform != "cpu" or not _supported(tuple(sorted(_UNFUSED_DOTS.items()))):
    return {}
  return dict(_UNFUSED_DOTS)
