"""The package's shape stays what the README's Architecture section says: layers that import only downwards, no
import cycles (imports inside functions and `if TYPE_CHECKING:` blocks count), and small modules and functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# lowest first: a module may import its own layer (without a cycle) and the layers below it
LAYERS = [("atofx.errors", "atofx.version"), ("atofx.passes",), ("atofx.core",), ("atofx.ato",), ("atofx.app",),
          ("atofx.__init__", "atofx.__main__")]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MODULE_SIZE_EXEMPT = {"passes/op_rules.py"}  # the op table: one entry per op, by design


def _modules() -> dict[str, Path]:
    """Every module of the installed package by its dotted name (`passes/` is installed as `atofx.passes`)."""
    found = {}
    for folder, package in ((ROOT / "atofx", "atofx"), (ROOT / "passes", "atofx.passes")):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__" and (parts[:-1] or package != "atofx"):  # a subpackage is its __init__
                parts.pop()
            found[".".join([package, *parts])] = path  # atofx/__init__.py stays `atofx.__init__`, the top layer
    return found


MODULES = _modules()


def _name(module: str) -> str:
    """`atofx.__init__` is what `import atofx` runs."""
    return "atofx.__init__" if module == "atofx" else module


def _imports(module: str, path: Path) -> set[str]:
    """The atofx modules `module` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                for n in range(len(parts), 0, -1):  # the longest prefix that is a module
                    if _name(".".join(parts[:n])) in MODULES:
                        out.add(_name(".".join(parts[:n])))
                        break
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in MODULES:
                    out.add(full)
                elif _name(base) in MODULES:
                    out.add(_name(base))
    out.discard(module)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and the README's Architecture section)")


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in GRAPH.items() for t in sorted(targets) if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    """Tarjan's strongly connected components: any of two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_the_walker_sees_imports_inside_functions_and_type_checking_blocks():
    """The checks above would pass vacuously if the walker missed the imports that hide."""
    assert "atofx.core.analysis" in GRAPH["atofx.ato.projection"]  # under `if TYPE_CHECKING:`
    assert "atofx.ato.plain_training" in GRAPH["atofx.app.train_job"]
    assert "atofx.app.model_zoo" in GRAPH["atofx.app.cli"]  # inside a function


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_stay_small(module):
    path = MODULES[module]
    rel = path.relative_to(ROOT).as_posix()
    source = path.read_text()
    if rel not in MODULE_SIZE_EXEMPT:
        assert source.count("\n") <= MAX_MODULE_LINES, f"{rel} has {source.count(chr(10))} lines: split it"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{rel}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
