"""Reads local code-RL training data: JSON lines of {"problem": str, "tests": [{input, output}]}.

  records = read_code_records("~/lad_sources/deepcoder.jsonl")
  records[0] == {"problem": "...", "tests": [("1 2\\n", "3\\n"), ...]}

Every malformed line is a `DataFormatError` naming `path:line` and what is wrong with it (invalid
JSON and where, a missing field, a test without "input" or "output"), so a bad export is fixed in
one go rather than found from a KeyError deep in the training loop.
"""

from __future__ import annotations

import json
from typing import Any

from lad_jax.errors import DataFormatError, json_error

_FORMAT = ('each line must be a JSON object {"problem": str, "tests": [{"input": str, '
           '"output": str}, ...]}')


def _tests(where: str, tests: Any) -> list[tuple[str, str]]:
  """(input, output) pairs of one record's "tests" list; names the first bad test (1-based)."""
  if not isinstance(tests, list) or not tests:
    raise DataFormatError(f'{where}: "tests" must be a non-empty list, got {type(tests).__name__}'
                          f"; {_FORMAT}.")
  pairs = []
  for i, test in enumerate(tests, start=1):
    if not isinstance(test, dict):
      raise DataFormatError(f"{where}: test {i} is a {type(test).__name__}, not an object with "
                            '"input" and "output".')
    for field in ("input", "output"):
      if field not in test:
        raise DataFormatError(f'{where}: test {i} has no "{field}"; {_FORMAT}.')
    pairs.append((str(test["input"]), str(test["output"])))
  return pairs


def parse_code_record(where: str, line: str) -> dict[str, Any]:
  """One JSON line -> {"problem", "tests"}; `where` ("path:line") prefixes every error."""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    path, _, line_no = where.rpartition(":")
    raise json_error(path, e, line=int(line_no), fix=_FORMAT) from e
  if not isinstance(obj, dict):
    raise DataFormatError(f"{where}: a JSON {type(obj).__name__}, not an object; {_FORMAT}.")
  if not isinstance(obj.get("problem"), str):
    raise DataFormatError(f'{where}: "problem" is missing or not a string; {_FORMAT}.')
  return {"problem": obj["problem"], "tests": _tests(where, obj.get("tests"))}


def read_code_records(path: str) -> list[dict[str, Any]]:
  """All records of the JSON-lines file `path` (blank lines skipped).

  Raises:
    FileNotFoundError: no file at `path`.
    DataFormatError: a malformed line, as `path:line: <what is wrong>`.
  """
  records = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if line.strip():
        records.append(parse_code_record(f"{path}:{line_no}", line))
  return records
