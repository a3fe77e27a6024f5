"""The premises of issue 20 on the shipped mid-base and its checkpoint series (`interplab/premises.py`).

`python -m interplab.organisms premises` prints the same figures.
"""

from collections import Counter

import pytest
import torch

import interplab as il
from interplab.experiments import premises as P
from interplab.organisms import series, truth, words as W
from interplab.organisms.recipes import train_stage


@pytest.fixture(scope="module")
def base():
    return il.load(truth.MODEL)


# ---- the measurements, against hand computations ----

def test_interval_shares_by_hand():
    assert P.interval_shares([0.5, 0.6, 0.9, 1.0]) == pytest.approx([0.2, 0.6, 0.2])
    with pytest.raises(ValueError, match="did not rise"):
        P.interval_shares([0.9, 0.5])


def test_leave_creatures_out_reads_a_planted_feature_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    _, y, groups = truth.statement_texts(range(truth.N_CREATURES))
    noise = torch.randn(len(y), 2, 4, generator=gen)  # [n, unit, d]
    planted = noise.clone()
    planted[:, 0, 0] += 10 * (y.float() - 0.5)  # unit 0 carries the label along one axis
    accuracy = P.leave_creatures_out(planted, y, groups)
    assert accuracy[0] == 1.0
    assert accuracy[1] < 0.75  # pure noise


def test_truth_colours_say_nothing_alone():
    for block in P.creature_folds():
        true, false = zip(*(truth.colours(i) for i in block))
        assert sorted(true) == sorted(W.COLOURS) and sorted(false) == sorted(W.COLOURS)
        assert all(t != f for t, f in zip(true, false))
    assert Counter(truth.colours(i)[0] for i in range(truth.N_CREATURES)) == Counter(
        truth.colours(i)[1] for i in range(truth.N_CREATURES))


def test_statements_pair_each_creature_with_its_true_colour_and_misconception(base):
    tokens, labels, groups = truth.statements(base, [3, 17])
    assert tokens.shape[0] == 4 and labels.tolist() == [True, True, False, False] and groups.tolist() == [3, 17, 3, 17]
    text = base.tokenizer.decode(tokens[2, 1:])
    assert text == f"The {W.CREATURES[3]} is {truth.colours(3)[1]}."
    with pytest.raises(ValueError, match="outside \\[0, 32\\)"):
        truth.statements(base, [32])


def test_mid_base_is_stored_in_float16_and_loads_in_float32(base):
    from safetensors import safe_open

    with safe_open(str(base.folder / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert {p.dtype for p in base.hf.parameters()} == {torch.float32}


def test_mid_recipe_is_seeded_and_has_at_least_32_heads():
    a, _, _ = train_stage("mid", steps=2)
    b, _, _ = train_stage("mid", steps=2)
    assert a.config.n_layer * a.config.n_head >= 32
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---- evolution premises on mid-base ----

def test_base_does_the_target_partly(base):
    r = P.target_on_base(base, series.TARGET)
    assert P.TOP1_RANGE[0] <= r.top1 <= P.TOP1_RANGE[1], f"top-1 {r.top1:.3f}"
    assert r.gap_z > P.GAP_Z, f"gap {r.gap:.2f} +- {r.gap_se:.2f}"


def test_no_single_component_carries_the_target_at_step_0(base):
    name, share = P.largest_component_share(base, series.TARGET)
    assert share <= P.MAX_COMPONENT_SHARE, f"{name} carries {share:.3f} of the top-{P.TOP_K}"


# ---- truth premises on mid-base ----

def test_truth_is_linearly_readable(base):
    heads, resid = P.truth_probes(base)
    assert (heads >= P.HEAD_PROBE).sum() >= P.MIN_HEADS, f"best heads {heads.flatten().topk(3).values}"
    assert resid.max() >= P.RESID_PROBE, f"residual {resid}"


def test_colour_word_alone_is_not_predictive():
    assert P.colour_only_accuracy() <= P.MAX_COLOUR_ONLY


def test_unedited_model_prefers_the_misconception(base):
    assert P.truth_rate(base) <= P.MAX_TRUTH_RATE


def test_unedited_model_knows_the_truth_when_cued(base):
    assert P.cued_truth_rate(base) >= P.MIN_CUED_TRUTH_RATE


# ---- the shipped checkpoint series ----

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_seed_learns_the_target(seed):
    assert series.shipped_recipe(seed).parent == truth.MODEL.split("/")[1]
    checkpoints = series.load(seed=seed)
    assert P.top1(checkpoints[-1][1], series.TARGET) >= P.FINAL_TOP1


def test_target_is_learnt_gradually():
    checkpoints = series.load(seed=0)
    shares = P.interval_shares([P.top1(m, series.TARGET) for _, m in checkpoints])
    assert max(shares) <= P.MAX_INTERVAL_SHARE, f"interval shares {[round(s, 2) for s in shares]}"
