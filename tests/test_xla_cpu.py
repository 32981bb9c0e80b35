"""lad_jax/xla_cpu.py: the CPU-only options and malloc settings, each checked in effect."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from lad_jax import xla_cpu


def test_sampler_options_unfuse_dots_on_cpu_only():
  """On CPU the option leaves the LM-head dot out of the row-max reduction's fusion (the slow
  YNN fusion of the sampler's step) and gives the same values; off CPU it is empty."""
  assert xla_cpu.sampler_options("gpu") == {} and xla_cpu.sampler_options("tpu") == {}
  opts = xla_cpu.sampler_options("cpu")
  assert opts  # this jaxlib (pinned in requirements.txt) has the flag

  def head_minus_max(x, w):
    logits = jnp.einsum("nd,vd->nv", x, w, preferred_element_type=jnp.float32)
    return logits - logits.max(axis=-1, keepdims=True)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((128, 576), np.float32)  # a decode step's LM head, 1/12 of the vocab
  w = rng.standard_normal((4096, 576), np.float32)
  lowered = jax.jit(head_minus_max).lower(x, w)
  fused, unfused = lowered.compile(), lowered.compile(compiler_options=opts)

  def dot_fusion_has_reduce(text):
    comps = text.split("\n\n")
    return any(" dot(" in c and " reduce(" in c for c in comps)

  assert dot_fusion_has_reduce(fused.as_text())  # the default this works around
  assert not dot_fusion_has_reduce(unfused.as_text())
  np.testing.assert_allclose(unfused(x, w), fused(x, w), rtol=1e-6, atol=1e-5)


def test_cpu_only_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert xla_cpu.cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not xla_cpu.cpu_only()


def test_retain_freed_memory_stops_refaulting_large_buffers():
  """In a fresh process (it must run before JAX's threads exist): a jitted function with a
  large temporary page-faults all of it on every call by default, and not after
  `retain_freed_memory`."""
  script = textwrap.dedent("""
      import resource, sys
      from lad_jax import xla_cpu
      if sys.argv[1] == "retain":
        assert xla_cpu.retain_freed_memory()
      import jax, jax.numpy as jnp
      f = jax.jit(lambda a, v: (a @ a.T) @ v)  # a 256 MB [8192, 8192] temporary per call
      a = jnp.ones((8192, 64), jnp.float32)
      v = jnp.ones((8192, 1), jnp.float32)
      for _ in range(3):
        f(a, v).block_until_ready()
      faults = []
      for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(a, v).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      print(min(faults))  # a previous call's temporary may be freed late: the heap grows once
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, XLA_FLAGS="")
  faults = {}
  for mode in ("default", "retain"):
    # Best of two processes: the host's proactive reclaim (kdamond) can take retained pages
    # back while other jobs press on memory, as during the full suite on 2 workers.
    faults[mode] = min(
        int(subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True,
                           text=True, check=True).stdout.strip().splitlines()[-1])
        for _ in range(2))
  pages = 8192 * 8192 * 4 // 4096
  assert faults["default"] > pages // 2, faults  # the temporary is faulted in on every call
  assert faults["retain"] < pages // 20, faults
