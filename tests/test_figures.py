"""What a person sees in the figures: every position label, axis titles on facets, colour scales that fit
the quantity, integer head ticks, and no "Loading weights" bar on every organism load."""

import pytest
import torch
import transformers

import interplab as il
from interplab.ui import viz
from interplab.graph import Circuit, Graph
from interplab.lens import logit_lens
from interplab.model import ORGANISM_DIR
from interplab.scores import Scores

TOKENS = ["<bos>", "When", "Mary", "and", "John", "went", "to", "the", "store", ",", "John", "gave", "a", "drink",
          "to"]


def _labels(tokens):
    return [f"{i}: {t}" for i, t in enumerate(tokens)]


def test_per_position_heatmap_keeps_every_position_label_and_titles_each_facet():
    n_layers, n_heads, seq = 4, 4, len(TOKENS)
    scores = Scores(torch.randn(n_layers, n_heads, seq), ("layer", "head", "pos"), {"pos": TOKENS})
    fig = scores.plot()
    xaxes = [fig.layout[f"xaxis{i if i > 1 else ''}"] for i in range(1, n_layers + 1)]  # top facet first
    yaxes = [fig.layout[f"yaxis{i if i > 1 else ''}"] for i in range(1, n_layers + 1)]
    assert "xaxis5" not in fig.layout and len(fig.data) == n_layers
    for axis in xaxes:  # every label drawn, the final position's included, none left to plotly's thinning
        assert axis.type == "category" and axis.tickmode == "array" and list(axis.ticktext) == _labels(TOKENS)
    assert [a.title.text for a in xaxes] == [None] * (n_layers - 1) + ["pos"]  # shared x: titled at the bottom
    assert all(a.title.text == "head" and list(a.tickvals) == ["0", "1", "2", "3"] for a in yaxes)
    assert [t.text for t in fig.layout.annotations] == [f"layer {i}" for i in range(n_layers)]
    assert all(list(trace.x) == _labels(TOKENS) for trace in fig.data)


def test_two_dim_heatmap_draws_every_label_on_both_axes():
    scores = Scores(torch.randn(12, len(TOKENS)), ("layer", "pos"), {"pos": TOKENS})
    fig = scores.plot()
    assert list(fig.layout.xaxis.ticktext) == _labels(TOKENS) and fig.layout.xaxis.title.text == "pos"
    # "0".."11" would otherwise be read as numbers, with ticks at 2, 4, ... (or 0.5 steps on few layers)
    assert fig.layout.yaxis.type == "category" and list(fig.layout.yaxis.tickvals) == [str(i) for i in range(12)]


def test_signed_scores_diverge_around_zero_probabilities_run_zero_to_one():
    values = torch.tensor([[0.2, -0.6], [0.1, 0.3]])
    signed = Scores(values, ("layer", "head")).plot().data[0]
    assert signed.colorscale[0][1] != signed.colorscale[-1][1]
    assert (signed.zmin, signed.zmid, signed.zmax) == pytest.approx((-0.6, 0, 0.6))
    probs = Scores(values.abs(), ("layer", "pos"), meta={"scale": "probability"}).plot().data[0]
    assert (probs.zmin, probs.zmax, probs.zmid) == (0, 1, None)
    blues = [c for _, c in probs.colorscale]
    assert blues == [c for _, c in Scores(values, ("a", "b"), meta={"scale": "probability"}).plot().data[0].colorscale]
    assert blues != [c for _, c in signed.colorscale]


def test_logit_lens_figure_is_a_probability_scale():
    m = il.load("interplab/tiny-base")
    lens = logit_lens(m, m.to_tokens("When Mary and John went to the store , John gave a drink to"))
    trace = lens.plot().data[0]
    assert (trace.zmin, trace.zmax) == (0, 1) and float(lens.values.min()) >= 0


def test_circuit_graph_head_axis_has_integer_ticks():
    g = Graph(3, 4)
    circuit = Circuit.full(g, torch.linspace(-1, 1, g.valid.numel()).view(g.valid.shape)).top(6)
    yaxis = viz.circuit_figure(circuit).layout.yaxis
    assert list(yaxis.tickvals) == [0, 1, 2, 3] and yaxis.title.text == "head"


def test_organism_load_shows_no_loading_weights_bar(capfd):
    logging = transformers.utils.logging
    logging.enable_progress_bar()
    folder = ORGANISM_DIR / "tiny-base"
    transformers.AutoModelForCausalLM.from_pretrained(folder)  # the bar il.load hides, drawn here
    assert "Loading weights" in capfd.readouterr().err
    il.load("interplab/tiny-base")
    il.load(folder)
    assert "Loading weights" not in capfd.readouterr().err
    assert logging.is_progress_bar_enabled()  # hidden for the load only, not for the session
