"""Orbax checkpoints with exact resume: the train state pytree plus JSON metadata.

The state (params, optimizer state, step, PRNG key) is saved with `StandardSave`, so each host writes
only its own shards and a restore places every array directly into the sharding of the abstract
target. Everything that is not an array (data-iterator position, config snapshot) goes in `meta`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores `(state, meta)` under `directory/<step>/`.

  Args:
    directory: where checkpoints live (created if missing; local path or a GCS/S3 URL orbax knows).
    max_to_keep: how many recent checkpoints to keep.
    save_interval_steps: `maybe_save` saves when `step % save_interval_steps == 0`.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1):
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        create=True,
    )
    self._manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: Optional[dict[str, Any]] = None, *, force: bool = False) -> bool:
    """Saves (asynchronously where orbax can); returns whether a checkpoint was written."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(dict(meta or {})),
    )
    return self._manager.save(int(step), args=args, force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict[str, Any]]:
    """Restores `(state, meta)` at `step` (default: latest) into `abstract_state`'s shardings.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` (with `.sharding`) or of arrays, e.g. from
        `jax.eval_shape`; restored arrays get its shapes, dtypes and shardings.
      step: which checkpoint; None for the latest.

    Raises:
      FileNotFoundError: if there is no checkpoint to restore.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint found in {self.directory}.")
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self._manager.restore(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored.state, dict(restored.meta)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
