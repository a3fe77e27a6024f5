"""Figures by name, so objects below the UI draw themselves without importing it.

`Scores.plot()`, `Circuit.plot()`, `Trajectory.*_figure()` and `Decomposition.plot()` ask for a drawer
by name; `interplab.ui.viz` registers the drawers when `import interplab` loads the UI layer. The
import arrows keep pointing one way (ui -> core), and each figure still has one home, in `ui/viz.py`.
"""

from __future__ import annotations

from collections.abc import Callable

_DRAWERS: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` the drawer of figure `name`."""

    def add(fn: Callable) -> Callable:
        _DRAWERS[name] = fn
        return fn

    return add


def draw(name: str, *args, **kwargs):
    """The figure `name` drawn by its registered drawer (a plotly Figure)."""
    if name not in _DRAWERS:
        raise RuntimeError(f"no drawer for figure {name!r}: `import interplab` loads interplab.ui.viz, which "
                           f"registers them (registered: {sorted(_DRAWERS)})")
    return _DRAWERS[name](*args, **kwargs)
