"""Bad inputs end in a clear error before any work, one table per module (issue 17).

Each case names what was wrong in the message it expects, so a traceback from deep inside torch, nnsight or
ipywidgets does not pass for one. Every case here failed on the code before these guards (a silent result, a
different error, or an error only after the work); the state tests are in test_guards_state.py.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

import interplab as il
from interplab import evolution, training, weights
from interplab.experiments import truthfulness
from interplab.organisms.tokenizer import build_tokenizer
from interplab.scores import Scores

TOK = build_tokenizer()


def gpt2(vocab=None, width=16, dropout=0.0, positions=16, layers=2):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab or len(TOK), n_layer=layers, n_head=2, n_embd=width, n_positions=positions,
                        resid_pdrop=dropout, attn_pdrop=dropout, embd_pdrop=dropout, initializer_range=0.3)
    return GPT2LMHeadModel(config).double()


def neox():
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(TOK), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=16, rotary_pct=0.5)
    return GPTNeoXForCausalLM(config).double()


def make_env():
    """The models and data every table's cases use (also run by benchmarks/guards.py)."""
    m = il.load(gpt2(), tokenizer=TOK)
    drop = il.load(gpt2(dropout=0.1), tokenizer=TOK)
    for sub in drop.hf.modules():  # left in train() mode with active dropout (flags only: see training.training_mode)
        sub.training = True
    task = il.tasks.random_tokens(m, n=4, seq=6, seed=0)
    pairs = truthfulness.pairs(m, [0, 1, 2, 3])
    names = il.components.component_names(m)
    return SimpleNamespace(m=m, drop=drop, task=task, pairs=pairs, names=names)


@pytest.fixture(scope="module")
def env():
    return make_env()


def _ce(model, step):
    tokens = torch.arange(3, 11).view(2, 4)
    return model(tokens).logits.log_softmax(-1)[..., 5].mean().neg()


def _nan_loss(model, step):
    return _ce(model, step) * float("nan")


def _mask(model, name, value):
    return {name: torch.full_like(dict(model.named_parameters())[name], value)}


def run(case, env):
    fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn(env)


# ---- training: counts, non-finite steps, masks, mode ----
W = "transformer.h.0.attn.c_attn.weight"  # [16, 48]
TRAINING = {
    "negative steps": (lambda e: training.train(gpt2(), _ce, -3, 1e-3), ValueError, "steps must be a positive int"),
    "float steps": (lambda e: training.train(gpt2(), _ce, 2.0, 1e-3), TypeError, "steps must be an int"),
    "negative warmup": (lambda e: training.train(gpt2(), _ce, 2, 1e-3, warmup=-1), ValueError, "warmup"),
    "infinite lr": (lambda e: training.train(gpt2(), _ce, 2, math.inf), ValueError, "lr must be finite"),
    "NaN loss": (lambda e: training.train(gpt2(), _nan_loss, 3, 1e-3), FloatingPointError, "step 0"),
    "mask of a row's shape": (lambda e: training.train(gpt2(), _ce, 1, 1e-3, grad_mask={W: torch.ones(48)}),
                              ValueError, "exact shape"),
    "all-zero mask": (lambda e: training.train(gpt2(), _ce, 1, 1e-3, grad_mask=_mask(gpt2(), W, 0.0)),
                      ValueError, "all zero"),
    "mask of 0.5": (lambda e: training.train(gpt2(), _ce, 1, 1e-3, grad_mask=_mask(gpt2(), W, 0.5)),
                    ValueError, "only 0 and 1"),
    "masked runs, NaN loss": (lambda e: training.train_masked(gpt2(), _nan_loss, [_mask(gpt2(), W, 1.0)], 2, 1e-3),
                              FloatingPointError, "step 0"),
    "masked runs, all-zero mask": (lambda e: training.train_masked(gpt2(), _ce, [_mask(gpt2(), W, 0.0)], 2, 1e-3),
                                   ValueError, "all zero"),
    "masked runs with dropout": (lambda e: training.train_masked(gpt2(dropout=0.1), _ce, [_mask(gpt2(), W, 1.0)], 1,
                                                                 1e-3), ValueError, "dropout"),
    "DPO beta 0": (lambda e: training.preference_loss(*torch.zeros(4, 2), beta=0.0, objective="ipo"), ValueError,
                   "beta"),
    "DPO beta < 0": (lambda e: training.preference_loss(*torch.zeros(4, 2), beta=-0.1), ValueError, "beta"),
}


@pytest.mark.parametrize("case", TRAINING.values(), ids=TRAINING.keys())
def test_training(case, env):
    run(case, env)


# ---- scores, ranking and distances ----
NAN = torch.tensor([[0.5, math.nan], [0.1, 0.2]])
SCORES = {
    "top of NaN scores": (lambda e: Scores(NAN, ("layer", "head")).top(1), ValueError, "non-finite"),
    "top_components of NaN": (lambda e: evolution.top_components(
        Scores(torch.tensor([math.nan, 1.0]), ("component",), {"component": ["a0.h0", "m0"]}), 1),
        ValueError, "non-finite"),
    "distance of different dims": (lambda e: evolution.circuit_distance(
        Scores(NAN.nan_to_num(), ("layer", "head")), Scores(NAN.nan_to_num().T, ("head", "layer")), 1),
        ValueError, "same dims and labels"),
}


@pytest.mark.parametrize("case", SCORES.values(), ids=SCORES.keys())
def test_scores(case, env):
    run(case, env)


def test_scores_holding_nan_say_so():
    with pytest.warns(RuntimeWarning, match="non-finite"):
        Scores(NAN, ("layer", "head"))


def test_circuit_distance_takes_any_two_scores_over_the_same_dims():
    a = Scores(torch.tensor([[3.0, 0.0], [0.0, 2.0]]), ("layer", "head"))
    b = Scores(torch.tensor([[3.0, 2.0], [0.0, 0.0]]), ("layer", "head"))
    assert evolution.circuit_distance(a, b, 2) == pytest.approx(1 - 1 / 3)  # {(0,0),(1,1)} vs {(0,0),(0,1)}


# ---- the model: tokens checked by m.logits, mode, unknown words ----
MODEL = {
    "ids beyond the vocabulary": (lambda e: e.m.logits(torch.tensor([[1, len(TOK) + 5]])), ValueError, "vocabulary"),
    "float ids": (lambda e: e.m.logits(torch.ones(1, 3)), ValueError, "integer token ids"),
    "longer than the context": (lambda e: e.m.logits(torch.ones(1, 17, dtype=torch.long)), ValueError, "at most 16"),
    "logits with active dropout": (lambda e: e.drop.logits(e.task.clean), ValueError, "dropout"),
    "patching with active dropout": (lambda e: il.patching.heads(e.drop, e.task, progress=False), ValueError,
                                     "dropout"),
    "attribution with active dropout": (lambda e: il.attribution.nodes(e.drop, e.task), ValueError, "dropout"),
}


@pytest.mark.parametrize("case", MODEL.values(), ids=MODEL.keys())
def test_model(case, env):
    run(case, env)


def test_unknown_words_warn(env):
    with pytest.warns(UserWarning, match="does not know"):
        env.m.to_tokens("The zzqx is")


# ---- tasks ----
TASKS = {
    "float n": (lambda e: il.tasks.make("ioi", e.m, n=8.0), TypeError, "n must be an int"),
    "float seed": (lambda e: il.tasks.make("ioi", e.m, n=4, seed=1.5), TypeError, "seed must be an int"),
    "float rows": (lambda e: e.task[[0.5]], TypeError, "rows must be ints"),
    "short boolean mask": (lambda e: e.task[[True, False]], IndexError, "boolean mask"),
    "negative n": (lambda e: il.tasks.random_tokens(e.m, n=-1), ValueError, "n must be a positive int"),
}


@pytest.mark.parametrize("case", TASKS.values(), ids=TASKS.keys())
def test_tasks(case, env):
    run(case, env)


def test_a_boolean_mask_selects_rows(env):
    assert torch.equal(env.task[[True, False, True, False]].clean, env.task.clean[[0, 2]])


# ---- evolution: checkpoints that do not belong together, counts checked before the sweep ----
def _locator(m, task):
    names = il.components.component_names(m)
    return Scores(torch.arange(len(names), dtype=torch.float), ("component",), {"component": names})


def _track(checkpoints, tasks, **options):
    return evolution.track(checkpoints, tasks, k=2, locator=_locator, progress=False, **options)


def _other(e, **kwargs):
    return il.load(gpt2(**kwargs), tokenizer=TOK)


EVOLUTION = {
    "different vocabulary": (lambda e: _track([("a", e.m), ("b", _other(e, vocab=1000))], [e.task]),
                             ValueError, "different architecture"),
    "different width": (lambda e: _track([("a", e.m), ("b", _other(e, width=32))], [e.task]),
                        ValueError, "different architecture"),
    "different family": (lambda e: _track([("a", e.m), ("b", il.load(neox(), tokenizer=TOK))], [e.task]),
                         ValueError, "different architecture"),
    "two tasks named alike": (lambda e: _track([("a", e.m)], [e.task, e.task[:2]]), ValueError, "repeat"),
    "negative cka_examples": (lambda e: _track([("a", e.m)], [e.task], cka_examples=-2), ValueError, "cka_examples"),
    "zero cka_examples": (lambda e: _track([("a", e.m)], [e.task], cka_examples=0), ValueError, "cka_examples"),
}


@pytest.mark.parametrize("case", EVOLUTION.values(), ids=EVOLUTION.keys())
def test_evolution(case, env):
    run(case, env)


def test_track_checks_k_before_any_sweep(env):
    calls = []

    def locator(m, task):
        calls.append(m)
        return _locator(m, task)

    with pytest.raises(ValueError, match="k must be an int between 1 and 6"):
        evolution.track([("a", env.m), ("b", env.m)], [env.task], k=25, locator=locator, progress=False)
    assert calls == []


# ---- weights ----
WEIGHTS = {
    "zero diff": (lambda e: weights.diff_svd(e.m, e.m, "mlp_out", 0), ValueError, "all zero"),
    "zero direction": (lambda e: weights.svd(torch.eye(3)).alignment(torch.zeros(3), "out"), ValueError, "all zero"),
    "no stages": (lambda e: weights.diff_table({}, torch.ones(2, 16)), ValueError, "stages"),
    "float k": (lambda e: weights.svd(torch.eye(3), k=1.5), TypeError, "k must be an int"),
}


@pytest.mark.parametrize("case", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_weights(case, env):
    run(case, env)


# ---- circuits and faithfulness: a circuit belongs to its model, prompts to its vocabulary ----
CIRCUITS = {
    "circuit of a 2-layer graph on a 4-layer model": (lambda e: il.circuits.circuit_metrics(
        il.load(gpt2(layers=4), tokenizer=TOK), e.task, [il.graph.Circuit.full(il.graph.Graph.from_model(e.m))]),
        ValueError, "graph has"),
    "node faithfulness with active dropout": (lambda e: evolution.node_faithfulness(e.drop, e.task, [["m0"]]),
                                              ValueError, "dropout"),
}


@pytest.mark.parametrize("case", CIRCUITS.values(), ids=CIRCUITS.keys())
def test_circuits(case, env):
    run(case, env)
