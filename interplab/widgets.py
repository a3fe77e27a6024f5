"""ipywidgets explorers built on `viz`.

`explorer(m, tasks)` shows controls for the task, the component kind, the
patching mode and a per-position toggle; every change reruns the sweep (or
reuses a cached one) and redraws the heatmap below the controls.
"""

from __future__ import annotations

import ipywidgets as widgets
from IPython.display import display

from . import patching


class PatchingExplorer:
    """Controls plus a figure; `.scores` and `.figure` hold what is currently shown.

    Setting a control's `.value` (in the browser or in code) redraws, so the
    callbacks are testable without a browser.
    """

    def __init__(self, m, tasks: dict, kind: str = "heads", per_position: bool = False, mode: str = "denoising",
                 **sweep_options):
        if not tasks:
            raise ValueError("explorer needs at least one task: explorer(m, {'ioi': task})")
        self.m, self.tasks, self.sweep_options = m, tasks, sweep_options
        self.task = widgets.Dropdown(options=list(tasks), description="task")
        self.kind = widgets.Dropdown(options=patching.KINDS, value=kind, description="component")
        self.mode = widgets.ToggleButtons(options=patching.MODES, value=mode, description="mode")
        self.per_position = widgets.Checkbox(value=per_position, description="per position")
        self.output = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox([self.task, self.kind, self.per_position]), self.mode, self.output])
        self._cache: dict[tuple, object] = {}
        self.scores = self.figure = None
        for control in (self.task, self.kind, self.mode, self.per_position):
            control.observe(self.redraw, names="value")
        self.redraw()

    def settings(self) -> tuple[str, str, bool, str]:
        """(task, kind, per_position, mode) as drawn; the residual stream is always per position,
        since patching a whole layer's residual stream just replays the source run."""
        per_position = self.per_position.value or self.kind.value == "resid"
        return self.task.value, self.kind.value, per_position, self.mode.value

    def redraw(self, change=None) -> None:
        self.per_position.disabled = self.kind.value == "resid"
        key = self.settings()
        if key not in self._cache:
            task, kind, per_position, mode = key
            options = dict(progress=False) | self.sweep_options
            self._cache[key] = patching.sweep(self.m, self.tasks[task], kind, per_position=per_position, mode=mode,
                                              **options)
        self.scores = self._cache[key]
        self.figure = self.scores.plot()
        with self.output:
            self.output.clear_output(wait=True)
            display(self.figure)

    def _ipython_display_(self) -> None:
        display(self.widget)


def explorer(m, tasks, **options) -> PatchingExplorer:
    """An activation-patching explorer over `tasks` (a Task, a list of Tasks, or a dict name -> Task).

    `options` go to `PatchingExplorer` (kind, per_position, mode) and on to `patching.sweep`.
    """
    if not isinstance(tasks, dict):
        tasks = [tasks] if hasattr(tasks, "clean") else list(tasks)
        tasks = {task.name: task for task in tasks}
    return PatchingExplorer(m, tasks, **options)
