"""Progress bars: one `progress` argument, one rule.

Every function that loops takes `progress: bool | None = None`. None shows a bar when the loop is long
enough to wait for (`AUTOMATIC_STEPS` steps or more); True and False force it. A forced value holds for
the nested calls too: a function passes its own `progress` down, or runs them under
`inherit(progress)`, so `run(progress=False)` draws no bar anywhere below it.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm.auto import tqdm

AUTOMATIC_STEPS = 4
_forced: ContextVar[bool | None] = ContextVar("interplab_progress", default=None)


def shown(steps: int, progress: bool | None = None) -> bool:
    """Whether a loop of `steps` steps shows a bar under `progress` (and any forced value around the call)."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be None (automatic), True or False, got {progress!r}")
    if progress is None:
        progress = _forced.get()
    return steps >= AUTOMATIC_STEPS if progress is None else progress


def bar(iterable: Iterable | None = None, progress: bool | None = None, desc: str | None = None,
        total: int | None = None, steps: int | None = None) -> tqdm:
    """`tqdm(iterable)` shown by the rule above; `steps` counts the work when it is not the iteration count."""
    n = steps if steps is not None else total if total is not None else len(iterable)
    return tqdm(iterable, desc=desc, total=total, disable=not shown(n, progress))


@contextmanager
def inherit(progress: bool | None = None):
    """Inside, calls left at `progress=None` take `progress` when it is forced (True or False)."""
    shown(0, progress)  # validates
    token = _forced.set(progress if progress is not None else _forced.get())
    try:
        yield
    finally:
        _forced.reset(token)
