"""ipywidgets explorers built on `viz`.

`explorer(m, tasks)` shows controls for the task, the patching site, the
patching mode and a per-position toggle; every change reruns the sweep (or
reuses a cached one) and redraws the heatmap below the controls.
"""

from __future__ import annotations

from contextlib import contextmanager
from html import escape

import ipywidgets as widgets
from IPython.display import display

from .. import checks, patching


def show(output: widgets.Output, *shown) -> None:
    """Make `output` show `shown` (figures, tables) instead of what it showed.

    The outputs are set as the widget's state rather than captured with `with output:`. Capturing makes a
    headless runner (nbclient, which nbval and nbconvert use) stand in for the browser and send messages on
    the shell channel while it is waiting on that channel for the cell's reply; now and then it then waits
    forever (jupyter/nbclient#312). State set in the kernel reaches JupyterLab the same way."""
    output.outputs = tuple({"output_type": "display_data", "data": _mime_bundle(item), "metadata": {}} for item in shown)


def _mime_bundle(item) -> dict:
    """What `display(item)` sends: the object's own MIME bundle (plotly figures have one), else its repr."""
    if not hasattr(item, "_repr_mimebundle_"):
        return {"text/plain": repr(item)}
    bundle = item._repr_mimebundle_()
    return bundle[0] if isinstance(bundle, tuple) else bundle


@contextmanager
def computing(explorer, what: str):
    """While `explorer` redraws: its `.controls` disabled, its `.output` cleared, its `.status` saying
    "computing: <what>…" and `.busy` True; restored after, also when the redraw raises (then the status
    keeps the error), so a slow redraw never leaves a stale figure under new controls."""
    enabled = [not c.disabled for c in explorer.controls]
    explorer.busy = True
    for control in explorer.controls:
        control.disabled = True
    explorer.status.value = f"<i>computing: {escape(what)}…</i>"
    show(explorer.output)
    try:
        yield
        explorer.status.value = ""
    except Exception as error:
        explorer.status.value = f"<b>failed</b>: {type(error).__name__}: {escape(str(error))}"
        raise
    finally:
        for control, on in zip(explorer.controls, enabled):
            control.disabled = not on
        explorer.busy = False


class PatchingExplorer:
    """Controls plus a figure; `.scores` and `.figure` hold what is currently shown.

    Setting a control's `.value` (in the browser or in code) redraws, so the
    callbacks are testable without a browser. A sweep takes seconds, so while
    one runs the controls are disabled, `.status` says what is computing and
    the old figure is cleared (`.busy` is True): no stale figure under new controls.
    """

    SITE_LABELS = {"resid": "residual stream", "attn_out": "attention output (whole layer)",
                   "mlp_out": "MLP output", "heads": "attention heads (output)", "q": "attention heads (queries)",
                   "k": "attention heads (keys)", "v": "attention heads (values)"}
    MODE_TOOLTIPS = ("clean activation into the corrupt run", "corrupt activation into the clean run")

    def __init__(self, m, tasks: dict, site: str = "heads", per_position: bool = False, mode: str = "denoising",
                 **sweep_options):
        if not tasks:
            raise ValueError("explorer needs at least one task: explorer(m, {'ioi': task})")
        checks.choice(site, "site", patching.SITES)  # ranges are checked here, not by a widget's TraitError
        checks.choice(mode, "mode", patching.MODES)
        self.m, self.tasks, self.sweep_options = m, tasks, sweep_options
        self.task = widgets.Dropdown(options=list(tasks), description="task")
        self.site = widgets.Dropdown(options=[(self.SITE_LABELS[k], k) for k in patching.SITES], value=site,
                                     description="component")
        self.mode = widgets.ToggleButtons(options=patching.MODES, value=mode, description="mode",
                                          tooltips=list(self.MODE_TOOLTIPS))
        self.per_position = widgets.Checkbox(value=per_position, description="per position")
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.controls = (self.task, self.site, self.mode, self.per_position)
        self.widget = widgets.VBox([widgets.HBox([self.task, self.site, self.per_position]),
                                    widgets.HBox([self.mode, self.status]), self.output])
        self._cache: dict[tuple, object] = {}
        self.scores = self.figure = None
        self.busy = False
        for control in self.controls:
            control.observe(self.redraw, names="value")
        self.redraw()

    def settings(self) -> tuple[str, str, bool, str]:
        """(task, site, per_position, mode) as drawn; the residual stream is always per position,
        since patching a whole layer's residual stream just replays the source run."""
        per_position = self.per_position.value or self.site.value == "resid"
        return self.task.value, self.site.value, per_position, self.mode.value

    def title(self, key: tuple[str, str, bool, str]) -> str:
        """Names the task, mode, component and whether positions are patched one at a time or all at once."""
        task, site, per_position, mode = key
        where = "one position at a time" if per_position else "all positions at once"
        what = "normalized effect" if self.sweep_options.get("normalize", True) else "effect"
        return f"{mode} patching of {self.SITE_LABELS[site]}, {where}, on {task} ({what})"

    def _computing(self, key: tuple[str, str, bool, str]):
        self.figure = None
        return computing(self, self.title(key))

    def redraw(self, change=None) -> None:
        self.per_position.disabled = self.site.value == "resid"
        key = self.settings()
        if key not in self._cache:
            task, site, per_position, mode = key
            options = dict(progress=False) | self.sweep_options
            with self._computing(key):
                self._cache[key] = patching.sweep(self.m, self.tasks[task], site, per_position=per_position,
                                                  mode=mode, **options)
        self.scores = self._cache[key]
        self.figure = self.scores.plot(title=self.title(key))
        show(self.output, self.figure)

    def _ipython_display_(self) -> None:
        display(self.widget)


def explorer(m, tasks, **options) -> PatchingExplorer:
    """An activation-patching explorer over `tasks` (a Task, a list of Tasks, or a dict name -> Task).

    `options` go to `PatchingExplorer` (site, per_position, mode) and on to `patching.sweep`.
    """
    if not isinstance(tasks, dict):
        tasks = [tasks] if hasattr(tasks, "clean") else list(tasks)
        tasks = {task.name: task for task in tasks}
    return PatchingExplorer(m, tasks, **options)


# ---- free evolution (helper "evolution") ----

class CheckpointExplorer:
    """A checkpoint slider over a `evolution.Trajectory`: the circuit at step t beside the step-0 circuit,
    and the distance/stability curves with a marker at t. `.grids` and `.curves` hold the figures shown;
    setting `.checkpoint.value` or `.task.value` (in the browser or in code) redraws."""

    def __init__(self, traj, task: str | None = None, checkpoint: int | None = None):
        if task is not None and task not in traj.tasks:
            raise ValueError(f"task {task!r} is not in the trajectory; it tracked {traj.tasks}")
        self.traj = traj
        last = len(traj.labels) - 1
        if checkpoint is not None:
            checks.count(checkpoint, "checkpoint (an index into the trajectory's labels)", low=0, high=last)
        self.task = widgets.Dropdown(options=traj.tasks, value=task or traj.tasks[0], description="task")
        self.checkpoint = widgets.SelectionSlider(options=[(lab, i) for i, lab in enumerate(traj.labels)],
                                                  value=last if checkpoint is None else checkpoint,
                                                  description="checkpoint", continuous_update=False)
        self.output, self.status = widgets.Output(), widgets.HTML()
        self.controls = (self.task, self.checkpoint)
        self.widget = widgets.VBox([widgets.HBox([self.task, self.checkpoint, self.status]), self.output])
        self.grids = self.curves = None
        self.busy = False
        for control in self.controls:
            control.observe(self.redraw, names="value")
        self.redraw()

    def redraw(self, change=None) -> None:
        from .viz import circuit_grids_figure, trajectory_curves

        task, t = self.task.value, self.checkpoint.value
        with computing(self, f"{task} at {self.traj.labels[t]}"):
            self.grids = circuit_grids_figure(self.traj, task, t)
            self.curves = trajectory_curves(self.traj, task, marker=t)
        show(self.output, self.grids, self.curves)

    def _ipython_display_(self) -> None:
        display(self.widget)


class EditExplorer:
    """Pick heads and an ITI strength α (or the learned edit at those heads): see the next-token distribution
    over colours for a prompt and the edit's truth / informativeness scores (`truthfulness.Evaluator`).

    `probe` is an `edits.ITIProbe`; `train_pairs` (`truthfulness.Pairs`) trains the learned edit
    (`edits.rank1`, IPO with τ = `tau`) the first time a head set is shown with the learned toggle, then
    reuses it. Setting a control's `.value` redraws, so it is testable without a browser.
    """

    def __init__(self, m, probe, evaluator, train_pairs, prompt: str = "The glimmet is", heads=("a0.h1",),
                 alpha: float = 10.0, tau: float = 0.025, steps: int = 60, lr: float = 1e-2):
        from .. import edits

        alpha = checks.number(alpha, "alpha (the slider's range)", low=0.0, high=40.0)  # refused, never clamped
        tau, lr = checks.number(tau, "tau", above=0), checks.number(lr, "lr", low=0)
        steps = checks.count(steps, "steps")
        heads = edits.edit._check_heads(m, heads) if heads else ()  # no heads: the unedited model
        self.m, self.probe, self.evaluator, self.train_pairs = m, probe, evaluator, train_pairs
        self.tau, self.steps, self.lr = tau, steps, lr
        options = edits.all_heads(m)
        self.heads = widgets.SelectMultiple(options=options, value=tuple(edits.head_name(h) for h in heads),
                                            rows=len(options), description="heads")  # all visible
        self.alpha = widgets.FloatSlider(value=alpha, min=0.0, max=40.0, step=1.0, description="α")
        self.method = widgets.ToggleButtons(options=["ITI", "learned"], value="ITI", description="edit")
        self.prompt = widgets.Text(value=prompt, description="prompt")
        self.output, self.status = widgets.Output(), widgets.HTML()
        self.controls = (self.heads, self.alpha, self.method, self.prompt)
        self.widget = widgets.VBox([widgets.HBox([self.heads, widgets.VBox([self.method, self.alpha, self.prompt,
                                                                            self.status])]), self.output])
        self._learned: dict[tuple, object] = {}
        self.edit = self.probs = self.scores = self.figure = None
        self.busy = False
        for control in self.controls:
            control.observe(self.redraw, names="value")
        self.redraw()

    def describe(self) -> str:
        """The edit the controls describe, in words: heads, method and α (or τ for the learned edit)."""
        heads = ", ".join(self.heads.value)
        if not heads:
            return "unedited"
        return f"ITI at {heads}, α = {self.alpha.value:g}" if self.method.value == "ITI" else \
            f"learned rank-1 edit at {heads}, τ = {self.tau:g}"

    def current_edit(self):
        """The edit the controls describe, or None (no heads chosen: the unedited model)."""
        from .. import edits

        heads = list(self.heads.value)
        if not heads:
            return None
        if self.method.value == "ITI":
            return edits.iti(self.m, self.probe, heads, self.alpha.value)
        key = tuple(heads)
        if key not in self._learned:
            e = edits.rank1(self.m, heads)
            p = self.train_pairs
            edits.train(self.m, [e], p.prompts, p.chosen, p.rejected, objective="ipo", beta=self.tau, steps=self.steps,
                        lr=self.lr, progress=False)
            self._learned[key] = e
        return self._learned[key]

    def redraw(self, change=None) -> None:
        import plotly.graph_objects as go

        from ..experiments.truthfulness import word_ids
        from ..organisms import words

        with computing(self, self.describe()):
            self.edit = self.current_edit()
            logits_fn = self.m.logits if self.edit is None else self.edit.logits
            colours = word_ids(self.m, list(words.COLOURS))
            final = logits_fn(self.m.to_tokens(self.prompt.value))[0, -1].softmax(-1)  # (V,)
            self.probs = dict(zip(words.COLOURS, final[colours].tolist()))
            self.scores = self.evaluator(logits_fn, tasks=False).summary()
        self.alpha.disabled = self.method.value == "learned"
        s = self.scores
        title = (f"{self.describe()}: {self.prompt.value!r}<br>truth {s['truth']:.2f}, MC top-1 {s['mc_top1']:.2f}, "
                 f"ΔLM {s['lm_delta']:+.3f}, KL {s['kl']:.3f}, truth×info {s['product']:.2f}")
        self.figure = go.Figure(go.Bar(x=list(self.probs), y=list(self.probs.values())))
        self.figure.update_layout(title=title, yaxis_title="p(next token)", height=360)
        show(self.output, self.figure)

    def _ipython_display_(self) -> None:
        display(self.widget)


def edit_explorer(m, probe, evaluator, train_pairs, **options) -> EditExplorer:
    """An edit explorer (see `EditExplorer`); `options`: prompt, heads, alpha, tau, steps, lr."""
    return EditExplorer(m, probe, evaluator, train_pairs, **options)
