"""The import graph of lad_jax/ is acyclic, lazy (function-level) imports included.

Every module is parsed with `ast` (nothing is imported), each `import lad_jax...` /
`from lad_jax... import ...` / relative import anywhere in it (module level, inside functions,
classes or try blocks; not under `if TYPE_CHECKING:`, which never runs) becomes an edge to the
lad_jax module it names, and the graph must have no cycle. Edges go to the named module only: the
parent packages' `__init__` that Python also runs are left out, since a submodule importing its
own package's sibling is the ordinary layout, not a circle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "lad_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
  test = node.test
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
  """Every Import / ImportFrom node, at any depth, except under `if TYPE_CHECKING:`."""
  stack = [tree]
  while stack:
    node = stack.pop()
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    children = list(ast.iter_child_nodes(node))
    if isinstance(node, ast.If) and _is_type_checking(node):
      children = node.orelse
    stack.extend(children)


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
  """The longest prefix of a dotted name that is a lad_jax module (`lad_jax.models.Decoder` ->
  `lad_jax.models`), or None outside lad_jax."""
  parts = name.split(".")
  for end in range(len(parts), 0, -1):
    candidate = ".".join(parts[:end])
    if candidate in modules:
      return candidate
  return None


def _base_of(node: ast.ImportFrom, module: str, path: pathlib.Path) -> str:
  if not node.level:
    return node.module or ""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for _ in range(node.level - 1):
    package = package.rpartition(".")[0]
  return f"{package}.{node.module}" if node.module else package


def _imports(module: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """The lad_jax modules `module` imports, anywhere in its source."""
  out = set()
  for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    else:
      base = _base_of(node, module, path)
      # `from pkg import x` imports the submodule pkg.x when there is one, else pkg itself.
      names = [f"{base}.{alias.name}" for alias in node.names]
    out.update(t for t in (_resolve(n, modules) for n in names) if t is not None)
  out.discard(module)
  return out


def import_graph() -> dict[str, set[str]]:
  """{lad_jax module: the lad_jax modules it imports (top-level or lazily)}."""
  modules = _modules()
  return {m: _imports(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(out)


def _cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
  """A shortest circle through the component's first module, e.g. [a, b, a], for the message."""
  members, start = set(component), component[0]
  parent, frontier = {start: None}, [start]
  while frontier:
    next_frontier = []
    for v in frontier:
      for w in sorted(graph[v] & members):
        if w == start:
          path = [v]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return path[::-1] + [start]
        if w not in parent:
          parent[w] = v
          next_frontier.append(w)
    frontier = next_frontier
  return component


def test_graph_parser_sees_lazy_and_from_imports():
  # Cycle finding on hand-made graphs, then known edges of the real one.
  graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
  assert cycles(graph) == [["p.a", "p.b", "p.c"]]
  assert _cycle_path(graph, ["p.a", "p.b", "p.c"]) == ["p.a", "p.b", "p.c", "p.a"]
  assert cycles({"p.a": {"p.b"}, "p.b": set()}) == []
  real = import_graph()
  # A known lazy import (config_utils imports the registry inside a function) and a known
  # `from lad_jax.models.config import ModelConfig` edge.
  assert f"{PACKAGE}.objectives" in real[f"{PACKAGE}.config_utils"]
  assert f"{PACKAGE}.models.config" in real[f"{PACKAGE}.models.decoder"]
  assert {f"{PACKAGE}.losses", f"{PACKAGE}.lad", f"{PACKAGE}.baselines"} <= real[
      f"{PACKAGE}.objectives"]


def test_losses_imports_nothing_above_it():
  graph = import_graph()
  assert graph[f"{PACKAGE}.losses"] == set()
  for module in ("lad", "baselines"):
    assert f"{PACKAGE}.objectives" not in graph[f"{PACKAGE}.{module}"]


def test_no_import_cycle_in_lad_jax():
  graph = import_graph()
  found = cycles(graph)
  if found:
    circles = [" -> ".join(_cycle_path(graph, c)) for c in found]
    pytest.fail("Import cycles in lad_jax/ (lazy imports count):\n  " + "\n  ".join(circles))
