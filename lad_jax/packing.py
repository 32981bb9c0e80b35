"""Trimmed, packed training batches (verl's use_remove_padding + use_dynamic_bsz, on the host).

Rollouts are padded to the longest possible response (max_new_tokens), while most responses are
much shorter. A packed batch keeps the loss tensors in the unpacked [N, L] layout (so every
objective and aggregation is unchanged), with L trimmed to P + the longest response rounded up
to `length_bucket`, and runs the MODEL on packed rows: each micro-batch's sequences (the prompt
without its left padding, then the response without its right padding) are packed into r rows
of C tokens by first-fit-decreasing. In a packed row every sequence is its own segment (the
decoder's `mask_BT` segment ids: attention stays inside a segment) with positions restarting at 0,
so its hidden states equal the unpacked ones.

  settings = packing.PackSettings(mini_batches=2, micro_batches=4, row_multiple=4)
  plan = packing.plan(prompt_mask_NP, response_mask_NR, settings)        # host numpy
  packed = packing.pack_tokens(plan, tokens_NL)                          # a `Packed`, host
  logp_NL = packing.unpack(logp_RC_of_one_unit, packed_unit.index_NL)    # [N_u, L], on device

Layout (the one the trainer already uses for rows): mini-batch b is a contiguous block of N / K
rows and of R / K packed rows; inside it micro-batch i takes rows i, i + m, i + 2m, ... of both
(`train._split_micro_batches`), so the same leading-axis slicing and splitting serves the [N, L]
tensors and the [R, C] packed rows. `index_NL` holds, for each (row, column), the flat position
row * C + column inside its own micro-batch's r packed rows, or r * C (a pad slot) off the tokens.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lad_jax import errors

Array = jax.Array

MIN_SAVING = 0.1  # pack only when the packed rows have <= 90% of the trimmed batch's slots


@dataclasses.dataclass(frozen=True)
class PackSettings:
  """How to trim and pack (static per run).

  Attributes:
    mini_batches: optimizer steps per rollout (the rows are split into this many blocks).
    micro_batches: gradient-accumulation micro-batches per optimizer step.
    length_bucket: the trimmed response width is the longest response rounded up to a multiple
      of this (bounds the number of distinct shapes, hence compiles).
    capacity: tokens per packed row; 0 = the trimmed width P + R'. Raised to P + R' if smaller
      (every sequence must fit one row).
    row_multiple: packed rows per micro-batch are a multiple of this (the batch devices).
    max_sequences: the most sequences in one packed row; 0 = no limit. The cuDNN attention
      path handles a static number of segments per row (`ModelConfig.attention_max_segments`),
      so the run sets this to that number: a row never holds more than the kernel sees.
  """

  mini_batches: int = 1
  micro_batches: int = 1
  length_bucket: int = 128
  capacity: int = 0
  row_multiple: int = 1
  max_sequences: int = 0

  def __post_init__(self):
    if int(self.max_sequences) < 0:
      raise errors.ConfigError(f"PackSettings.max_sequences must be >= 0 (0 = no limit), got "
                               f"{self.max_sequences}.")
    for name in ("mini_batches", "micro_batches", "length_bucket", "row_multiple"):
      if int(getattr(self, name)) < 1:
        raise errors.ConfigError(f"PackSettings.{name} must be >= 1, got {getattr(self, name)}.")
    if int(self.capacity) < 0:
      raise errors.ConfigError(f"PackSettings.capacity must be >= 0 (0 = the trimmed length), "
                               f"got {self.capacity}.")


@flax.struct.dataclass
class Packed:
  """The model's view of a packed batch (rides in `train.TrainBatch.packed`).

  Attributes:
    tokens_RC: [R, C] int32 packed tokens (0 in empty slots).
    segment_ids_RC: [R, C] int32, 1, 2, ... per sequence in a row, 0 on empty slots.
    positions_RC: [R, C] int32 RoPE positions, 0 at each sequence's first token.
    index_NL: [N, L] int32 flat position (row * C + column) of token (n, l) inside the r packed
      rows of its micro-batch; r * C (the pad slot) where (n, l) is padding.
    micro_batches: m, static: micro-batch i of a block takes packed rows i, i + m, ...
    unit_rows: r, static: packed rows per micro-batch.
  """

  tokens_RC: Array
  segment_ids_RC: Array
  positions_RC: Array
  index_NL: Array
  micro_batches: int = flax.struct.field(pytree_node=False, default=1)
  unit_rows: int = flax.struct.field(pytree_node=False, default=1)

  @property
  def capacity(self) -> int:
    return int(self.tokens_RC.shape[1])


class Plan(NamedTuple):
  """Where every token goes (host numpy). See the module docstring for the layout.

  Attributes:
    response_width: R', the trimmed response width (L = P + R').
    capacity: C, tokens per packed row.
    unit_rows: r, packed rows per micro-batch.
    micro_batches: m.
    valid_NL: [N, L] bool, the tokens (prompt and response, trimmed).
    flat_T: [T] int64 position in the [R * C] packed array of each token (T = valid_NL.sum(),
      in row-major order of valid_NL).
    index_NL: [N, L] int32 position inside the micro-batch's r * C slots (r * C off valid_NL).
    segment_ids_RC, positions_RC: [R, C] int32.
  """

  response_width: int
  capacity: int
  unit_rows: int
  micro_batches: int
  valid_NL: np.ndarray
  flat_T: np.ndarray
  index_NL: np.ndarray
  segment_ids_RC: np.ndarray
  positions_RC: np.ndarray

  @property
  def padding_fraction(self) -> float:
    """Empty slots / all slots of the packed rows."""
    return 1.0 - float(self.valid_NL.sum()) / self.segment_ids_RC.size

  @property
  def flat_NL(self) -> np.ndarray:
    """[N, L] int64 `flat_T` in the batch layout, -1 off valid_NL."""
    out = np.full(self.valid_NL.shape, -1, np.int64)
    out[self.valid_NL] = self.flat_T
    return out

  @property
  def worth_packing(self) -> bool:
    """Whether the packed rows save at least MIN_SAVING of the trimmed [N, L] slots. Packing
    runs the LM head on every packed slot (the unpacked path skips the prompt columns), so
    rows that do not pack (long prompts, short responses) are cheaper unpacked."""
    return self.segment_ids_RC.size <= (1.0 - MIN_SAVING) * self.valid_NL.size


def round_up(x: int, multiple: int) -> int:
  return -(-int(x) // int(multiple)) * int(multiple)


def bucket_rows(rows: int, multiple: int = 1) -> int:
  """Rows rounded up to 4 significant bits (<= 1/16 more, 16 values per octave), then to a
  multiple of `multiple`: a bounded set of shapes for any batch."""
  rows = max(int(rows), 1)
  shift = max(rows.bit_length() - 5, 0)
  return round_up(round_up(rows, 1 << shift), multiple)


def trimmed_width(response_mask_NR: np.ndarray, length_bucket: int) -> int:
  """R' = the last response column used, rounded up to `length_bucket`, at most R (>= 1)."""
  width = response_mask_NR.shape[1]
  used = np.flatnonzero(response_mask_NR.any(axis=0))
  longest = int(used[-1]) + 1 if used.size else 1
  return min(width, round_up(longest, length_bucket))


def first_fit_decreasing(lengths: np.ndarray, capacity: int, max_items: int = 0
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(row, offset) of each item, longest first, each into the first row with room (and fewer
  than `max_items` items, when > 0)."""
  order = np.argsort(-lengths, kind="stable")
  free = np.zeros((0,), np.int64)
  count = np.zeros((0,), np.int64)
  row = np.zeros(len(lengths), np.int64)
  offset = np.zeros(len(lengths), np.int64)
  for i in order:
    fits = np.flatnonzero((free >= lengths[i]) & ((count < max_items) if max_items else True))
    if fits.size:
      j = int(fits[0])
    else:
      j = free.size
      free, count = np.append(free, capacity), np.append(count, 0)
    row[i], offset[i] = j, capacity - free[j]
    free[j] -= lengths[i]
    count[j] += 1
  return row, offset


def _unit_of_rows(n: int, settings: PackSettings) -> np.ndarray:
  """[N] micro-batch unit (b * m + i) of every row (mini-batch b, micro-batch i)."""
  k, m = settings.mini_batches, settings.micro_batches
  if n % (k * m):
    raise ValueError(f"{n} rows do not split into {k} mini-batches x {m} micro-batches.")
  rows = np.arange(n)
  return (rows // (n // k)) * m + (rows % (n // k)) % m


def _place(lengths_N: np.ndarray, unit_N: np.ndarray, units: int, capacity: int,
           max_items: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
  """(local row, offset) of every sequence packed per unit, and the most rows any unit needs."""
  row_N = np.zeros_like(lengths_N)
  offset_N = np.zeros_like(lengths_N)
  most = 1
  for u in range(units):
    members = np.flatnonzero(unit_N == u)
    row_N[members], offset_N[members] = first_fit_decreasing(lengths_N[members], capacity,
                                                             max_items)
    most = max(most, int(row_N[members].max()) + 1 if members.size else 1)
  return row_N, offset_N, most


def plan(prompt_mask_NP: np.ndarray, response_mask_NR: np.ndarray, settings: PackSettings
         ) -> Plan:
  """Trims the response columns and packs every micro-batch's sequences (deterministic)."""
  n, p = prompt_mask_NP.shape
  width = trimmed_width(response_mask_NR, settings.length_bucket)
  valid_NL = np.concatenate([prompt_mask_NP, response_mask_NR[:, :width]], axis=1).astype(bool)
  if response_mask_NR[:, width:].any():
    raise ValueError("response_mask is True beyond the trimmed width (not a prefix mask).")
  capacity = max(int(settings.capacity), p + width)
  units = settings.mini_batches * settings.micro_batches
  unit_N = _unit_of_rows(n, settings)
  lengths_N = valid_NL.sum(axis=1).astype(np.int64)
  row_N, offset_N, most = _place(lengths_N, unit_N, units, capacity, int(settings.max_sequences))
  r = bucket_rows(most, settings.row_multiple)
  m = settings.micro_batches
  # Per token (row-major over valid_NL, so a row's tokens are consecutive): rank in its sequence.
  rows_T, cols_T = np.nonzero(valid_NL)
  starts_N = np.cumsum(lengths_N) - lengths_N
  rank_T = np.arange(rows_T.size) - starts_N[rows_T]
  local_T = (row_N * capacity + offset_N)[rows_T] + rank_T
  index_NL = np.full((n, valid_NL.shape[1]), r * capacity, np.int32)
  index_NL[rows_T, cols_T] = local_T
  # Local row k of unit (b, i) is global packed row b * m * r + k * m + i.
  base_N = (unit_N // m) * m * r + unit_N % m + row_N * m
  flat_T = (base_N * capacity + offset_N)[rows_T] + rank_T
  total = units * r * capacity
  segment = np.zeros(total, np.int32)
  positions = np.zeros(total, np.int32)
  # Segment ids: 1 + the sequence's order in its row (by offset), unique inside a row.
  segment[flat_T] = _segment_numbers(row_N, offset_N, unit_N)[rows_T]
  positions[flat_T] = rank_T
  return Plan(response_width=width, capacity=capacity, unit_rows=r, micro_batches=m,
              valid_NL=valid_NL, flat_T=flat_T, index_NL=index_NL,
              segment_ids_RC=segment.reshape(-1, capacity),
              positions_RC=positions.reshape(-1, capacity))


def _segment_numbers(row_N: np.ndarray, offset_N: np.ndarray, unit_N: np.ndarray) -> np.ndarray:
  """[N] int32 segment id (1, 2, ... by offset) of each sequence within its packed row."""
  order = np.lexsort((offset_N, row_N, unit_N))
  seg = np.zeros(len(row_N), np.int32)
  prev, count = None, 0
  for i in order:
    key = (int(unit_N[i]), int(row_N[i]))
    count = count + 1 if key == prev else 1
    seg[i], prev = count, key
  return seg


def pack_tokens(p: Plan, tokens_NL: np.ndarray) -> Packed:
  """The `Packed` arrays (host numpy) of trimmed tokens [N, P + R'] under plan `p`."""
  if tokens_NL.shape != p.valid_NL.shape:
    raise ValueError(f"tokens have shape {tokens_NL.shape}, the plan {p.valid_NL.shape}.")
  flat = np.zeros(p.segment_ids_RC.size, np.int32)
  flat[p.flat_T] = tokens_NL[p.valid_NL]
  return Packed(tokens_RC=flat.reshape(p.segment_ids_RC.shape), segment_ids_RC=p.segment_ids_RC,
                positions_RC=p.positions_RC, index_NL=p.index_NL,
                micro_batches=p.micro_batches, unit_rows=p.unit_rows)


# ------------------------------------------------------------------------------------------------
# Device side: packed columns back to [N, L]
# ------------------------------------------------------------------------------------------------


def unpack(x_RC: Array, index_NL: Array) -> Array:
  """[r, C] (or [r, C, D]) values of one micro-batch's packed rows -> [N_u, L] (or [N_u, L, D]);
  0 at padding (the pad slot). Differentiable (a gather; its gradient a scatter-add)."""
  r, c = x_RC.shape[:2]
  flat = x_RC.reshape((r * c,) + x_RC.shape[2:])
  flat = jnp.concatenate([flat, jnp.zeros((1,) + flat.shape[1:], flat.dtype)], axis=0)
  return jnp.take(flat, index_NL, axis=0)


def to_units(x: Array, micro_batches: int, units: int) -> Array:
  """[K * m * s, ...] rows in the trainer's layout -> [K * m, s, ...]: unit b * m + i holds rows
  i, i + m, ... of block b (a micro-batch, as `train._split_micro_batches`)."""
  m = micro_batches
  k = units // m
  s = x.shape[0] // units
  x = x.reshape((k, s, m) + x.shape[1:])
  return jnp.swapaxes(x, 1, 2).reshape((units, s) + x.shape[3:])


def from_units(x: Array, micro_batches: int) -> Array:
  """Inverse of `to_units`: [K * m, s, ...] -> [K * m * s, ...]."""
  m = micro_batches
  units, s = x.shape[:2]
  x = x.reshape((units // m, m, s) + x.shape[2:])
  return jnp.swapaxes(x, 1, 2).reshape((units * s,) + x.shape[3:])
