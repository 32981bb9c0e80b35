"""Hardware-efficiency figures of a run, as verl logs them: MFU of the policy update, peak memory.

  flops = perf.update_flops(num_params=..., tokens=...)       # 6 N T (forward + backward)
  mfu = perf.mfu(flops, seconds, devices=jax.devices())       # None where the peak is unknown
  gb = perf.max_memory_allocated_gb(jax.devices())            # None where the backend has no stats

The peak is the dense bf16 matmul rate per chip from the vendors' data sheets; an MFU is only
reported where it is known (never on CPU, whose peak depends on the host).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

# Dense bf16 FLOP/s per chip, by a lower-case substring of `device.device_kind`, most specific
# first (vendor data sheets: NVIDIA H100/H200 SXM, A100; Google Cloud TPU v4 / v5e / v5p / v6e).
PEAK_BF16_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("tpu v6", 918e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v4", 275e12),
)


def peak_flops(device: Any) -> Optional[float]:
  """Dense bf16 FLOP/s of one device, or None for a device kind not in `PEAK_BF16_FLOPS`."""
  kind = str(getattr(device, "device_kind", "")).lower()
  for name, flops in PEAK_BF16_FLOPS:
    if name in kind:
      return flops
  return None


def update_flops(*, num_params: int, tokens: float) -> float:
  """Matmul FLOPs of a policy update over `tokens` tokens: 6 N T (2 N T forward, 4 N T
  backward), the usual estimate that leaves out attention's T^2 term."""
  return 6.0 * float(num_params) * float(tokens)


def mfu(flops: float, seconds: float, *, devices: Sequence[Any]) -> Optional[float]:
  """Model FLOPs utilisation: flops / (seconds * sum of the devices' peaks); None if unknown."""
  peaks = [peak_flops(d) for d in devices]
  if not peaks or any(p is None for p in peaks) or seconds <= 0:
    return None
  return flops / (seconds * sum(peaks))


def max_memory_allocated_gb(devices: Sequence[Any]) -> Optional[float]:
  """The largest peak of bytes in use over the devices (`memory_stats()`), in GiB; None where
  the backend reports no statistics (CPU). Pass this process's (addressable) devices only."""
  peaks = []
  for d in devices:
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return max(peaks) / 2**30 if peaks else None
