"""The patching explorer's callbacks, driven by setting widget values as a browser would."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import interplab as il
from interplab import patching
from interplab.ui import widgets
from interplab.organisms.tokenizer import build_tokenizer
from interplab.tasks import Task


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = build_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_layer=2, n_head=3, n_embd=24, n_positions=16, initializer_range=0.3)
    m = il.load(GPT2LMHeadModel(config).double(), tokenizer=tok)
    g = torch.Generator().manual_seed(1)
    tasks = []
    for name, seq in (("short", 4), ("long", 6)):
        clean = torch.randint(3, m.d_vocab, (2, seq), generator=g)
        corrupt = torch.randint(3, m.d_vocab, (2, seq), generator=g)
        answer, wrong = torch.randint(3, m.d_vocab, (2, 2), generator=g)
        tasks.append(Task(name, clean, corrupt, answer, wrong, [""] * 2, [""] * 2))
    return m, tasks


def test_controls_redraw_the_sweep_they_name(setup):
    m, tasks = setup
    ex = widgets.explorer(m, tasks)
    assert ex.scores.dims == ("layer", "head") and ex.scores.meta["task"] == "short"

    ex.per_position.value = True
    assert ex.scores.dims == ("layer", "head", "pos") and ex.scores.shape[-1] == 4
    assert len(ex.figure.data) == m.n_layers

    ex.task.value = "long"
    want = patching.heads(m, tasks[1], per_position=True, progress=False)
    torch.testing.assert_close(ex.scores.values, want.values)
    assert ex.figure.layout.title.text == ("denoising patching of attention heads (output), one position at a time, "
                                           "on long (normalized effect)")

    ex.mode.value = "noising"
    assert ex.scores.meta["mode"] == "noising"
    torch.testing.assert_close(ex.scores.values, patching.heads(m, tasks[1], per_position=True, mode="noising",
                                                                progress=False).values)

    ex.site.value = "mlp_out"
    assert ex.scores.dims == ("layer", "pos") and ex.scores.meta["site"] == "mlp_out"
    ex.per_position.value = False
    assert ex.scores.dims == ("layer",)


def test_resid_is_always_per_position(setup):
    m, tasks = setup
    ex = widgets.explorer(m, {"short": tasks[0]}, site="resid", per_position=False)
    assert ex.per_position.disabled and ex.scores.dims == ("layer", "pos")
    ex.site.value = "attn_out"
    assert not ex.per_position.disabled and ex.scores.dims == ("layer",)


def test_redraw_reuses_cached_sweeps(setup, monkeypatch):
    m, tasks = setup
    ex = widgets.explorer(m, tasks)
    calls = []
    original = patching.sweep
    monkeypatch.setattr(patching, "sweep", lambda *a, **k: calls.append(1) or original(*a, **k))
    ex.per_position.value = True
    ex.per_position.value = False
    assert len(calls) == 1


def test_needs_a_task(setup):
    m, _ = setup
    with pytest.raises(ValueError, match="at least one task"):
        widgets.explorer(m, {})


def test_whole_head_and_per_position_titles_differ_and_options_are_readable(setup):
    m, tasks = setup
    ex = widgets.explorer(m, tasks)
    whole = ex.figure.layout.title.text
    ex.per_position.value = True
    assert "all positions at once" in whole and "one position at a time" in ex.figure.layout.title.text
    labels = dict(ex.site.options)  # (label, kind) pairs: people read the label, sweeps get the kind
    assert set(labels.values()) == set(patching.SITES)
    assert labels["residual stream"] == "resid" and labels["MLP output"] == "mlp_out"


def test_busy_while_a_sweep_runs_and_cleared_after(setup, monkeypatch):
    m, tasks = setup
    ex = widgets.explorer(m, tasks)
    seen = []
    original = patching.sweep

    def spy(*args, **kwargs):
        seen.append((ex.busy, ex.figure, [c.disabled for c in ex.controls], ex.status.value))
        return original(*args, **kwargs)

    monkeypatch.setattr(patching, "sweep", spy)
    ex.mode.value = "noising"
    busy, figure, disabled, status = seen[0]
    assert busy and figure is None and all(disabled) and "computing" in status and "noising" in status
    assert not ex.busy and ex.figure is not None and ex.status.value == ""
    assert not any(c.disabled for c in ex.controls)

    ex.mode.value = "denoising"  # cached: no sweep, no busy state
    assert len(seen) == 1


def test_failed_sweep_reenables_controls_and_says_why(setup, monkeypatch):
    m, tasks = setup
    ex = widgets.explorer(m, tasks, site="resid")
    assert ex.per_position.disabled

    def fail(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(patching, "sweep", fail)
    with pytest.raises(RuntimeError, match="planted"):
        ex.task.value = "long"
    assert not ex.busy and "planted failure" in ex.status.value
    assert [c.disabled for c in ex.controls] == [False, False, False, True]  # per position stays off for resid


def test_explorers_show_figures_as_output_state_never_by_capture(setup, monkeypatch):
    """Capturing (`with output:`) makes nbclient send on the shell channel mid-cell and can hang nbval;
    every redraw sets the Output widget's state instead, and shows exactly the current figure."""
    import ipywidgets
    import plotly.io as pio

    def refuse(self):
        raise AssertionError("an explorer captured output with `with output:`")

    monkeypatch.setattr(ipywidgets.Output, "__enter__", refuse)
    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")  # as in a notebook kernel
    m, tasks = setup
    ex = widgets.explorer(m, tasks)
    ex.task.value = "long"
    (shown,) = ex.output.outputs  # the old figure is gone, the new one is there once
    assert shown["output_type"] == "display_data"
    assert shown["data"] == ex.figure._repr_mimebundle_()  # what display(figure) sends
    assert "application/vnd.plotly.v1+json" in shown["data"]
    widgets.show(ex.output)
    assert ex.output.outputs == ()
