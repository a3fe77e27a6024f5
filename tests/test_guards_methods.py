"""Bad inputs to edits, decompose, the update experiment, truthfulness, statistics, the experiment configs,
widgets and the report scan: one table per module, each case failing on the code before issue 17's guards."""

import math
from types import SimpleNamespace

import pytest
import torch

import interplab as il
from interplab import decompose, edits, stats
from interplab.experiments import edit_controls, truthfulness, updates
from interplab.scores import Scores
from interplab.ui import report, widgets
from test_guards import TOK, _ce, _nan_loss, gpt2, make_env, neox, run


@pytest.fixture(scope="module")
def env():
    return make_env()


def _train(e, m=None, **options):
    m = m or e.m
    p = truthfulness.pairs(m, [0, 1, 2, 3])
    return edits.train(m, [edits.vector(m, [(0, 1)])], p.prompts, p.chosen, p.rejected,
                       **({"steps": 2, "progress": False} | options))


def _probe(m, sigma=1.0):
    acc = Scores(torch.zeros(m.n_layers, m.n_heads), ("layer", "head"))
    theta = torch.ones(m.n_layers, m.n_heads, m.d_head, dtype=torch.float64)
    return edits.ITIProbe(acc, theta, torch.full((m.n_layers, m.n_heads), sigma, dtype=torch.float64),
                          torch.ones(4, dtype=torch.bool))


def _save_load_across_families(e, tmp):
    edits.additive(e.m, {(0, 1): torch.ones(e.m.d_head)}).save(tmp)
    return edits.load(il.load(neox(), tokenizer=TOK), tmp)


EDITS = {
    "negative batch_size": (lambda e: _train(e, batch_size=-1), ValueError, "batch_size must be an int between 1"),
    "zero batch_size": (lambda e: _train(e, batch_size=0), ValueError, "batch_size must be an int between 1"),
    "IPO beta 0": (lambda e: _train(e, beta=0.0), ValueError, "beta must be greater than 0"),
    "DPO beta < 0": (lambda e: _train(e, objective="dpo", beta=-0.1), ValueError, "beta must be greater than 0"),
    "NaN lr": (lambda e: _train(e, lr=math.nan), ValueError, "lr must be finite"),
    "diverging lr": (lambda e: _train(e, lr=1e300, steps=4), FloatingPointError, "at step"),
    "float steps": (lambda e: _train(e, steps=2.5), TypeError, "steps must be an int"),
    "active dropout": (lambda e: _train(e, m=e.drop), ValueError, "dropout"),
    "NaN additive edit": (lambda e: edits.additive(e.m, {(0, 1): torch.full((e.m.d_head,), math.nan)}),
                          ValueError, "non-finite"),
    "ITI alpha NaN": (lambda e: edits.iti(e.m, _probe(e.m), [(0, 1)], math.nan), ValueError, "alpha must be finite"),
    "rank-1 init_scale 0": (lambda e: edits.rank1(e.m, [(0, 1)], init_scale=0.0), ValueError, "init_scale"),
    "float seed": (lambda e: edits.random_heads(e.m, 2, seed=1.5), TypeError, "seed must be an int"),
    "float head": (lambda e: edits.vector(e.m, [(0.0, 1)]), TypeError, "pairs of ints"),
    "float k": (lambda e: edits.random_heads(e.m, 2.0, seed=0), TypeError, "k must be an int"),
}


@pytest.mark.parametrize("case", EDITS.values(), ids=EDITS.keys())
def test_edits(case, env):
    run(case, env)


def test_an_edit_refuses_a_model_of_another_family(env, tmp_path):
    with pytest.raises(ValueError, match="family GPT-2 here GPT-NeoX"):
        _save_load_across_families(env, tmp_path / "edit")


def test_edited_logits_that_overflow_say_so(env):
    with pytest.warns(RuntimeWarning, match="non-finite"):
        edits.iti(env.m, _probe(env.m, sigma=1e150), [(0, 1), (1, 0)], 1e150).logits(env.task.clean)


# ---- decompose ----
def _decomposition(model, **fit):
    d = decompose.Decomposition(model, ["0"] if isinstance(model, torch.nn.Sequential) else
                                ["transformer.h.0.mlp.c_fc"], C=2)
    return d.fit(**({"steps": 2, "batch_size": 2, "warmup_steps": 0, "progress": False} | fit))


def _float(dropout=0.0):
    """A float32 model, as decompositions train in float32; with dropout, left in train() mode."""
    hf = gpt2(dropout=dropout).float()
    for sub in hf.modules():
        sub.training = dropout > 0
    return hf


DECOMPOSE = {
    "ids beyond the vocabulary": (lambda e: _decomposition(_float(), data=torch.full((4, 5), len(TOK) + 3)),
                                  ValueError, "vocabulary"),
    "NaN data": (lambda e: _decomposition(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                                          data=torch.full((4, 4), math.nan)),
                 ValueError, "non-finite"),
    "diverging loss": (lambda e: _decomposition(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                                                data=torch.full((4, 4), 1e30)),
                       FloatingPointError, "step 0"),
    "NaN lr": (lambda e: _decomposition(_float(), data=e.task.clean, lr=math.nan), ValueError, "lr must be finite"),
    "active dropout": (lambda e: _decomposition(_float(dropout=0.1), data=e.task.clean), ValueError, "dropout"),
    "float seed": (lambda e: decompose.Decomposition(e.m, ["transformer.h.0.mlp.c_fc"], C=2, seed=1.5), TypeError,
                   "seed must be an int"),
}


@pytest.mark.parametrize("case", DECOMPOSE.values(), ids=DECOMPOSE.keys())
def test_decompose(case, env):
    run(case, env)


# ---- the update experiment ----
def _update(e, **options):
    names = il.components.component_names(e.m)
    args = dict(make_loss=lambda seed: _ce, target=e.task, others={}, heldout=e.task.clean,
                locate=lambda model: names[:2], foresight=names[2:4], steps=1, lr=1e-3, seeds=(0,), n_random=1)
    return updates.update_experiment(e.m, **(args | options))


UPDATES = {
    "foresight on a NaN loss": (lambda e: updates.foresight_scores(e.m, _nan_loss, batches=1), FloatingPointError,
                                "step 0"),
    "foresight float batches": (lambda e: updates.foresight_scores(e.m, _ce, batches=2.0), TypeError,
                                "batches must be an int"),
    "held-out ids beyond the vocabulary": (lambda e: _update(e, heldout=torch.full((2, 4), len(TOK) + 1)),
                                           ValueError, "vocabulary"),
    "float steps": (lambda e: _update(e, steps=2.5), TypeError, "steps must be an int"),
    "float draw seed": (lambda e: _update(e, draw_seed=1.5), TypeError, "draw_seed must be an int"),
}


@pytest.mark.parametrize("case", UPDATES.values(), ids=UPDATES.keys())
def test_updates(case, env):
    run(case, env)


# ---- truthfulness, statistics and the edit experiments' configuration ----
TRUTH = {
    "float creature": (lambda e: truthfulness.pairs(e.m, [1.7]), TypeError, "int indices"),
    "repeated creature": (lambda e: truthfulness.pairs(e.m, [1, 1, 1]), ValueError, "repeats"),
    "boolean creatures": (lambda e: truthfulness.check_creatures(torch.tensor([True, False])), TypeError, "boolean"),
    "template without {c}": (lambda e: truthfulness.prompts(e.m, [0, 1], "The animal is"), ValueError, "\\{c\\}"),
    "evaluator template without {c}": (lambda e: truthfulness.Evaluator(e.m, [0, 1], templates=("A thing is",)),
                                       ValueError, "\\{c\\}"),
    "empty null": (lambda e: stats.standing(0.5, []), ValueError, "at least 1"),
    "NaN in a sample": (lambda e: stats.permutation_test([math.nan, 1.0], [1.0, 2.0], seed=0), ValueError, "finite"),
    "NaN bootstrap": (lambda e: stats.bootstrap_ci([math.nan, 1.0, 2.0]), ValueError, "non-finite"),
    "float step count": (lambda e: edit_controls.Config(steps=4.0), TypeError, "steps must be an int"),
    "non-positive tau": (lambda e: edit_controls.Config(taus=(0.1, 0.0)), ValueError, "greater than 0"),
    "fold out of range": (lambda e: edit_controls.Config(folds=(4,)), ValueError, "folds"),
    "zero heads": (lambda e: edit_controls.Config(k=0), ValueError, "k must be a positive int"),
}


@pytest.mark.parametrize("case", TRUTH.values(), ids=TRUTH.keys())
def test_truthfulness_stats_and_configs(case, env):
    run(case, env)


# ---- widgets: ranges checked, never clamped ----
WIDGETS = {
    "alpha beyond the slider": (lambda e: widgets.edit_explorer(e.m, None, None, None, alpha=100.0), ValueError,
                                "alpha"),
    "unknown component": (lambda e: widgets.explorer(e.m, {"t": e.task}, site="bogus"), ValueError,
                          "site must be one of"),
    "checkpoint out of range": (lambda e: widgets.CheckpointExplorer(SimpleNamespace(tasks=["t"], labels=["s0", "s1"]),
                                                                     checkpoint=5), ValueError, "checkpoint"),
}


@pytest.mark.parametrize("case", WIDGETS.values(), ids=WIDGETS.keys())
def test_widgets(case, env):
    run(case, env)


# ---- the report's offline check: every URL-bearing attribute ----
LOADS = {
    "srcset": '<img srcset="https://cdn.example/a.png 1x, https://cdn.example/b.png 2x">',
    "static ES import": '<script type="module">import { x } from "https://cdn.example/m.mjs";</script>',
    "poster": '<video poster="https://cdn.example/p.jpg"></video>',
    "SVG image href": '<svg><image href="//cdn.example/i.png" /></svg>',
    "meta refresh": '<meta http-equiv="refresh" content="0; url=https://example.org/">',
    "object data": '<object data="https://cdn.example/o.svg"></object>',
}


@pytest.mark.parametrize("html", LOADS.values(), ids=LOADS.keys())
def test_report_finds_every_remote_load(html):
    assert report.remote_loads(html)
    assert all(url.startswith(("https://", "//")) for url in report.remote_loads(html))


def test_report_ignores_links_and_prose():
    prose = '<a href="https://arxiv.org">x</a><p>CSS reads url(https://x/a.png) and @import "//x/b.css"</p>'
    assert report.remote_loads(prose) == []  # text a reader sees is not a load
