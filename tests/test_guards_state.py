"""After any call, successful or interrupted, the model's parameters, modes, gradients and hooks are as they
were (`tests/model_state.py` compares snapshots). Each case leaked on the code before issue 17's guards."""

import pytest
import torch

import interplab as il
from interplab import evolution, training
from model_state import assert_unchanged
from test_guards import TOK, _ce, gpt2


@pytest.fixture
def m():
    return il.load(gpt2(), tokenizer=TOK)


def _interrupted(model, step):
    if step == 1:
        raise KeyboardInterrupt  # a user stopping the cell mid-run
    return _ce(model, step)


def _act(m, tokens):
    with m.nn.trace(tokens):
        out = m.nn.transformer.h[0].mlp.act.output.save()
    return out


STATE = {
    "node attribution": (lambda m: il.attribution.nodes(m, il.tasks.random_tokens(m, n=2, seq=6)), None, True),
    "attribution locator": (lambda m: evolution.component_scores(m, il.tasks.random_tokens(m, n=2, seq=6),
                                                                 locator="attribution"), None, True),
    "training interrupted": (lambda m: training.train(m.hf, _interrupted, 3, 1e-3), KeyboardInterrupt, False),
    "training that fails": (lambda m: training.train(m.hf, lambda model, s: _ce(model, s) * torch.nan, 3, 1e-3),
                            FloatingPointError, False),
    "training, then nnsight": (lambda m: training.train(m.hf, _ce, 1, 1e-3), None, False),
}


@pytest.mark.parametrize("case", STATE.values(), ids=STATE.keys())
def test_state_is_restored(case, m):
    call, raises, parameters = case
    if raises is None:
        assert_unchanged(m.hf, lambda: call(m), parameters)
    else:
        with pytest.raises(raises):
            assert_unchanged(m.hf, lambda: call(m), parameters)
    assert _act(m, torch.arange(3, 9).view(1, 6)).shape == (1, 6, 4 * 16)  # nnsight still reaches mlp.act
