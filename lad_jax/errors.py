"""The error classes a user can fix, in one place; `lad_jax.cli` prints them as one line.

  ConfigError      a config (or flag) that cannot run: unknown key, bad value, missing file.
  DataFormatError  a file that exists but cannot be read: broken JSON, a truncated safetensors
                   shard, a record without a required field. Messages start `path:line:` where a
                   line is known.
  RunError         a run that stopped on purpose to lose nothing: too many non-finite updates in
                   a row (NonFiniteError), a checkpoint that could not be saved or restored.

Both subclass ValueError, so code that caught ValueError before keeps working. `read_json`
loads a JSON file and turns a decode error into a DataFormatError naming the file and position.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional


class ConfigError(ValueError):
  """A config that cannot run: unknown key, bad value, or a missing model / data file."""


class DataFormatError(ValueError):
  """A data, model or config file that exists but is malformed (names the file and line)."""


class RunError(RuntimeError):
  """A run stopped on purpose, with its last good checkpoint intact (the message says which)."""


class NonFiniteError(RunError):
  """Too many policy updates in a row had a non-finite loss or gradient (all were skipped)."""


def json_error(path: str, e: json.JSONDecodeError, *, line: Optional[int] = None,
               fix: str = "") -> DataFormatError:
  """A DataFormatError for JSON that does not parse: `path:line: invalid JSON (msg, column c)`."""
  where = f"{path}:{line if line is not None else e.lineno}"
  fix = f"; {fix}" if fix else ""
  msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg  # "Invalid control character at"
  return DataFormatError(f"{where}: invalid JSON ({msg} at column {e.colno}){fix}.")


def read_json(path: str, *, fix: str = "") -> Any:
  """The parsed contents of the JSON file `path`; a parse error names the file and position."""
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise json_error(path, e, fix=fix) from e


def is_number(value: Any) -> bool:
  """True for an int or float that is not a bool (True is not a learning rate)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
  """True for a finite int or float that is not a bool."""
  return is_number(value) and math.isfinite(value)
