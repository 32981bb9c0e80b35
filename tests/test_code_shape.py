"""Code shape the project holds itself to: no function in lad_jax/ or experiments/ is longer
than 80 lines."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_LINES = 80


def _functions(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node.name, node.end_lineno - node.lineno + 1, node.lineno


def test_no_function_longer_than_80_lines():
  too_long = []
  for folder in ("lad_jax", "experiments"):
    for path in sorted((ROOT / folder).rglob("*.py")):
      rel = path.relative_to(ROOT).as_posix()
      for name, lines, line_no in _functions(path):
        if lines > MAX_LINES:
          too_long.append(f"{rel}:{line_no} {name} ({lines} lines)")
  assert not too_long, "functions over 80 lines:\n" + "\n".join(too_long)
