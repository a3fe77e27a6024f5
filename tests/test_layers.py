"""The layering rules of ARCHITECTURE.md, checked on the source (imports inside functions included).

- No module outside `experiments/` and `ui/` imports from them (the package `__init__`s re-export them,
  and `__main__.py` command lines sit above the library).
- No import cycles between modules.
- Every module stays under 500 lines.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "interplab"
UPPER = ("experiments", "ui")


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    return _imports_of(path.read_text(), _module(path), path.name == "__init__.py")


MODULES = {_module(p) for p in PACKAGE.rglob("*.py")}


def _imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """Every interplab module `source` imports, at any depth (functions, classes, branches).

    `from pkg import name` depends on module `pkg.name` when that is a module, and on `pkg` itself
    (its `__init__`) for any other name.
    """
    package = module if is_package else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "interplab"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            if stem.split(".")[0] != "interplab":
                continue
            for alias in node.names:
                found.add(f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in MODULES else stem)
    return (found & MODULES) - {module}


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {_module(p): _imports(p) for p in SOURCES}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in UPPER else None


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_below_imports_experiments_or_ui(path):
    module = _module(path)
    if _layer(module) or module == "interplab" or path.name == "__main__.py":
        return  # the upper layers themselves, the root's re-exports and the command lines above the library
    upward = sorted(name for name in GRAPH[module] if _layer(name))
    assert not upward, f"{module} imports {upward}: only experiments/ and ui/ may import from experiments/ and ui/"


def test_the_checker_sees_function_local_and_absolute_imports():
    """The checker itself: planted imports inside a function body, relative and absolute, are found."""
    source = "def f():\n    from ..ui import viz\n    import interplab.experiments.updates\n    return viz\n"
    found = _imports_of(source, "interplab.edits.edit", is_package=False)
    assert {"interplab.ui.viz", "interplab.experiments.updates"} <= found
    assert _imports_of("from . import load\n", "interplab.experiments.behaviour", False) == {"interplab.experiments"}


def test_no_import_cycles():
    """No module reaches itself through module-level or function-local imports (a package counts as its
    `__init__`, which imports what it re-exports)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_is_under_500_lines(path):
    n = len(path.read_text().splitlines())
    assert n < 500, f"{path.relative_to(PACKAGE)} has {n} lines; split it by concept (ARCHITECTURE.md)"
