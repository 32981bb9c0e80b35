"""CPU-only speedups: XLA:CPU compiler options for the sampler, and glibc malloc settings.

  fn = jax.jit(decode, compiler_options=xla_cpu.sampler_options(platform))
  if xla_cpu.cpu_only():           # first thing in a training / benchmark process
    xla_cpu.retain_freed_memory()

By default XLA:CPU (jax 0.10) fuses a dot with the reductions and elementwise ops around it into
one YNNPACK fusion. For decoding that is a loss: the LM head fused with the softmax's row max
runs at a fraction of the plain matmul's speed, so the sampler leaves dots unfused (timings:
the README's sampler results).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import sys
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


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


@functools.cache
def retain_freed_memory() -> bool:
  """Makes glibc keep freed memory mapped, so XLA:CPU's per-step buffers are not re-faulted.

  XLA:CPU allocates each execution's temporaries (1.8 GB for a SmolLM2-135M train step) with
  malloc from a worker thread. glibc serves a request that large from a thread's arena with a
  fresh mmap and munmaps it on free, so every step page-faults all of it again (a large share
  of the step in system time). One arena, no mmap and no trimming keep the memory mapped: no
  faults in steady state; a step that lands its temporaries on fresh heap pages (seen in the
  first few steps next to torch) still faults them all in (figures: the README's results).
  The process's resident memory then stays at its peak.

  Call it before JAX starts its threads (first thing in an entry point); it affects the whole
  process (every library's malloc). A no-op (False) where libc is not glibc.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # glibc stores the trim threshold as a size_t: -1 is 'never trim'; the largest int (2 GiB)
  # is within reach of the 1.8 GB temporary plus the other free memory at the heap's top.
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def cpu_only() -> bool:
  """Whether JAX in this process can only run on the CPU, decided without starting a backend.

  JAX_PLATFORMS if set; otherwise no accelerator plugin is installed (no `jax_plugins` entry
  point or namespace package, no libtpu).
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms == "cpu"
  if list(importlib.metadata.entry_points(group="jax_plugins")):
    return False
  return not any(importlib.util.find_spec(m) for m in ("jax_plugins", "libtpu"))
