"""Conventions of ARCHITECTURE.md that can be read off the source: one meaning per argument name, one
`progress` rule, and randomness that comes from arguments."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "interplab"
SOURCES = sorted(PACKAGE.rglob("*.py"))
# The organisms' recipes build fresh Hugging Face models, whose initial weights transformers draws from
# torch's global generator (no generator argument exists there); they seed it before training an organism.
GLOBAL_SEED_ALLOWED = {"organisms/recipes.py", "organisms/series.py"}


def _tree(path: Path) -> ast.Module:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node
    return tree


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)]


def _arguments(fn) -> list[tuple[ast.arg, ast.expr | None]]:
    """(argument, default) pairs of a function, positional and keyword-only."""
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    return list(zip(positional, defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))


def _dataclass_fields(tree) -> list[tuple[str, str]]:
    out = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        if any("dataclass" in ast.unparse(d) for d in cls.decorator_list):
            out += [(cls.name, s.target.id) for s in cls.body if isinstance(s, ast.AnnAssign)
                    and isinstance(s.target, ast.Name)]
    return out


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


@pytest.mark.parametrize("path", SOURCES, ids=_name)
def test_no_argument_is_called_kind(path):
    """`kind` meant eight things; each argument now says which: site, probe, component, loss, objective, ..."""
    tree = _tree(path)
    found = [f"{getattr(fn, 'name', 'lambda')}:{arg.arg}" for fn in _functions(tree) for arg, _ in _arguments(fn)
             if arg.arg == "kind"]
    found += [f"{cls}.{field}" for cls, field in _dataclass_fields(tree) if field == "kind"]
    assert not found, f"{_name(path)}: {found} named `kind`; name what it chooses"


@pytest.mark.parametrize("path", SOURCES, ids=_name)
def test_progress_defaults_to_automatic(path):
    """Every `progress` argument defaults to None (a bar when the loop is long) and bars come from `bars`."""
    tree = _tree(path)
    for fn in _functions(tree):
        for arg, default in _arguments(fn):
            if arg.arg == "progress":
                assert isinstance(default, ast.Constant) and default.value is None, (
                    f"{_name(path)}: {getattr(fn, 'name', 'lambda')}(progress=...) must default to None")
    if path.name != "bars.py":
        calls = [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
        assert "tqdm" not in calls, f"{_name(path)} draws its own tqdm bar; use bars.bar(..., progress)"


def _seeds_globally(call: ast.Call) -> bool:
    name = ast.unparse(call.func)
    return name in {"torch.manual_seed", "torch.random.manual_seed", "torch.cuda.manual_seed",
                    "torch.cuda.manual_seed_all", "random.seed", "np.random.seed", "numpy.random.seed",
                    "transformers.set_seed", "set_seed"}


def _inside_fork(node) -> bool:
    """Within `with torch.random.fork_rng():`, which restores the global generator on the way out."""
    while (node := getattr(node, "parent", None)) is not None:
        if isinstance(node, ast.With) and any("fork_rng" in ast.unparse(item.context_expr) for item in node.items):
            return True
    return False


@pytest.mark.parametrize("path", SOURCES, ids=_name)
def test_nothing_seeds_the_global_generators(path):
    """Random draws take a seed (a Generator, random.Random or numpy Generator built from it); a global
    generator is seeded only inside a fork that restores it (dropout, which takes no generator)."""
    if _name(path) in GLOBAL_SEED_ALLOWED:
        return
    tree = _tree(path)
    bad = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call) and _seeds_globally(n)
           and not _inside_fork(n)]
    assert not bad, f"{_name(path)} seeds a global generator: {bad}; take a seed and use a torch.Generator"


def test_the_checks_catch_what_they_look_for():
    """The checkers themselves, on planted source."""
    planted = ast.parse("def f(x, kind='a', progress=True):\n    torch.manual_seed(0)\n"
                        "def g():\n    with torch.random.fork_rng():\n        torch.manual_seed(1)\n")
    for node in ast.walk(planted):
        for child in ast.iter_child_nodes(node):
            child.parent = node
    f, g = [n for n in planted.body]
    assert [a.arg for a, _ in _arguments(f)] == ["x", "kind", "progress"]
    assert _arguments(f)[2][1].value is True
    seeds = [n for n in ast.walk(planted) if isinstance(n, ast.Call) and _seeds_globally(n)]
    assert [_inside_fork(n) for n in seeds] == [False, True]


def test_the_progress_rule(capsys):
    from interplab import bars

    assert not bars.shown(bars.AUTOMATIC_STEPS - 1) and bars.shown(bars.AUTOMATIC_STEPS)
    assert bars.shown(1, True) and not bars.shown(10_000, False)
    with pytest.raises(TypeError, match="progress must be"):
        bars.shown(1, "yes")
    with bars.inherit(False):  # an outer progress=False reaches calls left at None, at any depth
        with bars.inherit(None):
            list(bars.bar(range(50)))
            assert not bars.shown(10_000)
    assert capsys.readouterr().err == ""
    list(bars.bar(range(50)))  # automatic: a long loop shows its bar
    assert "50/50" in capsys.readouterr().err
