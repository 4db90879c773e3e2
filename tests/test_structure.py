"""The package's shape: imports run one way, nothing refers outside the repo.

Run alone to print the import graph of the fdjax modules, lowest first:

  python tests/test_structure.py
"""

import ast
import graphlib
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'fdjax'
# Function-level imports are allowed only to defer these heavy, optional
# dependencies.
DEFERRED_OK = (
  'tensorflow',
  'tensorflow_datasets',
  'tensorboardX',
  'sklearn',
  'matplotlib',
)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _imported(node: ast.AST) -> list[str]:
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if isinstance(node, ast.ImportFrom) and node.module:
    return [node.module] + [f'{node.module}.{a.name}' for a in node.names]
  return []


def import_graph() -> dict[str, set[str]]:
  """{module: the fdjax modules it imports} (submodules of a package count
  as the package's own, `__init__` re-exports excepted)."""
  mods = _modules()
  graph = {}
  for name, path in mods.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      for target in _imported(node):
        while target and target not in mods:
          target = target.rpartition('.')[0]
        if target and target != name and target != 'fdjax':
          if not name.startswith(target + '.'):
            deps.add(target)
    graph[name] = deps
  return graph


def test_no_import_cycle():
  graph = import_graph()
  try:
    order = list(graphlib.TopologicalSorter(graph).static_order())
  except graphlib.CycleError as e:
    raise AssertionError(f'import cycle: {" -> ".join(e.args[1])}') from None
  assert set(order) == set(graph)


def test_the_main_direction():
  graph = import_graph()

  def reaches(a, b):
    seen, todo = set(), [a]
    while todo:
      m = todo.pop()
      if m == b:
        return True
      if m not in seen:
        seen.add(m)
        todo.extend(graph[m])
    return False

  for low in ('fdjax.denoise', 'fdjax.parallel', 'fdjax.attacks.ball'):
    assert not graph[low] - {'fdjax.attacks'}, (low, graph[low])
  for low in ('fdjax.attacks', 'fdjax.models', 'fdjax.input_pipeline'):
    for high in ('fdjax.train', 'fdjax.evaluate', 'fdjax.main'):
      assert not reaches(low, high), f'{low} imports {high}'
  assert not reaches('fdjax.evaluate', 'fdjax.train')


def test_function_level_imports_only_defer_heavy_dependencies():
  offenders = []
  for name, path in _modules().items():
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(fn):
        for target in _imported(node)[:1]:
          if not target.startswith(DEFERRED_OK):
            offenders.append(f'{name}.{fn.name}: import {target}')
  assert not offenders, offenders


def test_no_reference_outside_the_repository():
  hits = []
  for path in ROOT.rglob('*'):
    if path.suffix not in ('.py', '.md', '.ipynb', '.toml', '.cfg', '.sh'):
      continue
    if {'.git', '.venv'} & set(path.parts):
      continue
    text = path.read_text(errors='ignore')
    if 'SPEC' + '.md' in text or '/work/' + 'shared' in text:
      hits.append(str(path.relative_to(ROOT)))
  assert not hits, hits


if __name__ == '__main__':
  graph = import_graph()
  for module in graphlib.TopologicalSorter(graph).static_order():
    lines = sum(1 for _ in open(_modules()[module]))
    print(f'{module:28s} {lines:5d}  <- {", ".join(sorted(graph[module]))}')
