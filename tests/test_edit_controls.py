"""Issue 20's edit experiment: the hierarchical bootstrap against exact enumeration, the head sets, the
validation split, seeds that change the trained model, and a tiny run whose tables agree with hand counts."""

import itertools
import math

import numpy as np
import pytest
import torch

import interplab as il
from interplab import edits, stats
from interplab.experiments import edit_controls as C, edit_tables as E, truthfulness as T


@pytest.fixture(scope="module")
def organism():
    return il.load(T.MODEL)


# ---- the hierarchical bootstrap ----

def _exact_distribution(values, groups):
    """Every equally likely resample (seeds with replacement, then units within each group): {mean: prob}."""
    values, groups = np.asarray(values, float), np.asarray(groups)
    n_seeds = values.shape[0]
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    unit_choices = [list(itertools.product(m, repeat=len(m))) for m in members]
    outcomes = {}
    total = 0
    for seeds in itertools.product(range(n_seeds), repeat=n_seeds):
        for parts in itertools.product(*unit_choices):
            units = [u for part in parts for u in part]
            mean = round(float(values[np.ix_(seeds, units)].mean()), 12)
            outcomes[mean] = outcomes.get(mean, 0) + 1
            total += 1
    return {k: v / total for k, v in outcomes.items()}


def test_hierarchical_bootstrap_matches_exact_enumeration():
    # 2 seeds x 4 creatures in 2 folds, values chosen so that many resamples have distinct means
    values = np.array([[0.0, 0.3, 0.7, 1.0], [0.1, 0.45, 0.5, 0.9]])
    groups = np.array([0, 0, 1, 1])
    exact = _exact_distribution(values, groups)  # 4 seed draws x 4 x 4 unit draws = 64 outcomes
    support = np.array(sorted(exact))
    cdf_exact = np.cumsum([exact[s] for s in support])
    means = np.round(stats.hierarchical_means(values, groups, n_resamples=40000, seed=1), 12)
    assert set(np.unique(means)) <= set(support)  # no resample the enumeration does not have
    cdf_boot = np.array([(means <= s).mean() for s in support])
    assert np.abs(cdf_boot - cdf_exact).max() < 0.015  # KS distance; 99% critical value at n=40000 is 0.008
    exact_mean = sum(k * p for k, p in exact.items())
    exact_var = sum((k - exact_mean) ** 2 * p for k, p in exact.items())
    assert means.mean() == pytest.approx(exact_mean, abs=0.005)
    assert means.var() == pytest.approx(exact_var, rel=0.05)
    # the interval is the bootstrap distribution's 2.5 and 97.5 percentiles
    mean, lo, hi = stats.hierarchical_ci(values, groups, n_resamples=40000, seed=1)
    assert mean == pytest.approx(values.mean())
    lo_exact = support[np.searchsorted(cdf_exact, 0.025)]
    hi_exact = support[np.searchsorted(cdf_exact, 0.975)]
    step = np.diff(support).max()
    assert abs(lo - lo_exact) <= step and abs(hi - hi_exact) <= step


def test_hierarchical_bootstrap_includes_seed_variance_and_pairs_units():
    groups = np.array([0, 0, 1, 1])
    same_creatures = np.array([[0.2] * 4, [0.8] * 4])  # the seeds disagree, the creatures do not
    _, lo, hi = stats.hierarchical_ci(same_creatures, groups)
    assert lo < 0.35 and hi > 0.65
    one_seed = same_creatures[:1]
    assert stats.hierarchical_ci(one_seed, groups)[1:] == (0.2, 0.2)
    a = np.array([[0.0, 1.0, 0.5, 0.25]])
    assert stats.hierarchical_diff_ci(a, a, groups) == (0.0, 0.0, 0.0)  # units are paired
    assert stats.hierarchical_diff_ci(a + 0.5, a, groups) == pytest.approx((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="units"):
        stats.hierarchical_means(np.zeros((2, 3)), groups)


# ---- sets, validation, seeds ----

def test_head_sets_enumerate_every_set_or_draw_distinct_ones():
    sets, enumerated = C.head_sets(4, 4, 2, max_sets=500, n_draws=64, seed=0)
    assert enumerated and len(sets) == math.comb(16, 2) == len(set(sets))
    assert sets == list(itertools.combinations([f"a{l}.h{h}" for l in range(4) for h in range(4)], 2))
    drawn, enumerated = C.head_sets(12, 8, 2, max_sets=500, n_draws=64, seed=3)  # 4560 sets > 500
    assert not enumerated and len(drawn) == 64 == len(set(drawn))
    layer_major = lambda s: [tuple(int(x) for x in h[1:].split(".h")) for h in s]  # noqa: E731
    assert all(len(set(s)) == 2 and layer_major(s) == sorted(layer_major(s)) for s in drawn)
    assert any(layer_major(s)[0][0] >= 2 and layer_major(s)[1][0] >= 10 for s in drawn)  # not sorted as text
    assert drawn == C.head_sets(12, 8, 2, 500, 64, seed=3)[0] != C.head_sets(12, 8, 2, 500, 64, seed=4)[0]
    with pytest.raises(ValueError, match="exceeds"):
        C.head_sets(4, 4, 2, max_sets=0, n_draws=121, seed=0)


def test_validation_creatures_come_from_the_training_creatures():
    for fold, (train, test) in enumerate(T.folds()):
        fit, val = C.split_validation(train, 6, seed=fold)
        assert len(val) == 6 and set(val) <= set(train) and not set(val) & set(test)
        assert sorted(fit + val) == sorted(train) and not set(fit) & set(val)
    assert C.split_validation(range(24), 6, 0) != C.split_validation(range(24), 6, 1)


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="train_templates"):
        C.Config(train_templates=(0, 1, 2, 3, 4))
    with pytest.raises(ValueError, match="seeds"):
        C.Config(seeds=(0, 0))
    with pytest.raises(ValueError, match="folds"):
        C.Config(folds=(4,))


def test_seeds_change_the_trained_edit_and_the_full_model(organism):
    data = T.pairs(organism, range(12))
    trained = []
    for seed in (0, 0, 1):
        e = edits.rank1(organism, [(0, 1)], seed=seed)
        edits.train(organism, e, data.prompts, data.chosen, data.rejected, steps=3, seed=seed, batch_size=4,
                    progress=False)
        trained.append(e.params["b"].clone())
    assert torch.equal(trained[0], trained[1]) and not torch.allclose(trained[0], trained[2])
    full = [T.full_model_baseline(organism, range(12), steps=3, warmup=1, seed=s, batch_size=4, progress=False)
            for s in (0, 0, 1)]
    w = [dict(f.hf.named_parameters())["transformer.h.0.attn.c_attn.weight"] for f in full]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    with pytest.raises(ValueError, match="batch_size"):
        T.full_model_baseline(organism, range(4), steps=1, batch_size=5)


# ---- a tiny run ----

@pytest.fixture(scope="module")
def tiny():
    config = C.Config.small(n_draws=3, seeds=(0, 1), steps=2, full_steps=2, alphas=(5.0, 20.0), taus=(0.1,))
    return C.run(config, progress=False)


def test_a_tiny_run_has_every_arm_seed_and_choice_from_validation(tiny):
    count = lambda arm, **kw: len(tiny.select(arm, **kw))  # noqa: E731
    assert count("ipo single") == 48 * 2 and count("ipo selected") == count("full model") == 2
    assert count("ipo set", seed=0) == count("ipo set") == count("iti set") == 3
    assert tiny.alpha[3, "selected"] in (5.0, 20.0) and tiny.tau[3] == 0.1
    assert tiny.select("iti selected")[0].param == tiny.alpha[3, "selected"]
    fit, val = C.split_validation(T.folds()[3][0], 6, seed=3)
    held_out = T.folds()[3][1]
    for r in tiny.runs:
        assert r.test.creature.unique().tolist() == held_out
        assert set(r.seen.creature.unique().tolist()) == set(fit)  # never the validation creatures
    assert all(r.test.kl > 0 for r in tiny.runs if r.arm != "unedited")  # every edit fired


def test_tables_start_from_the_base_rate_counted_by_hand(organism, tiny):
    held_out = T.folds()[3][1]
    final = organism.logits(T.prompts(organism, held_out, T.TEMPLATES[0]))[:, -1].log_softmax(-1)  # [8, V]
    true, false = T.colour_ids(organism, held_out)
    rows = torch.arange(len(held_out))
    base = (final[rows, true] > final[rows, false]).float().mean().item()
    table = E.main_table(tiny)
    assert table[0]["arm"] == "unedited" and table[0]["creatures"] == pytest.approx(base)
    singles, rho = E.single_table(tiny)
    for rows_ in (singles, E.sets_table(tiny, "ipo"), E.sets_table(tiny, "iti")):
        assert rows_[0]["arm"] == "unedited" and rows_[0]["truth"] == pytest.approx(base)
    heads = [r for r in singles if "probe_accuracy" in r]
    assert [r["arm"] for r in heads] == [f"a{l}.h{h}" for l in range(6) for h in range(8)]
    assert any(r["arm"] == f"heads outside layer {rho['dominant']} (mean)" for r in singles)
    # a matrix row is the per-creature truth of that seed's run, pooled over folds
    v, g = E.matrix(tiny.select("ipo selected"), "both", tiny.config)
    run1 = tiny.select("ipo selected", seed=1)[0].test
    held = torch.isin(run1.template, torch.tensor(tiny.config.held_out_templates))
    assert v.shape == (2, 8) and (g == 3).all()
    assert v[1].mean() == pytest.approx((run1.margin[held] > 0).float().mean().item())
    assert "Table 4" in E.report(tiny)


def test_truth_task_pairs_the_cue_prompts_and_answers_with_the_colours(organism):
    task = T.truth_task(organism, [24, 25])
    assert task.clean.shape == task.corrupt.shape
    said = f"The {T.W.CREATURES[24]} is {T.colours(24)[1]}."
    assert task.clean_text[0] == f"{said} In truth, the {T.W.CREATURES[24]} is"
    assert task.corrupt_text[0] == f"{said} Many people say the {T.W.CREATURES[24]} is"
    true, false = T.colour_ids(organism, [24, 25])
    assert torch.equal(task.answer, true) and torch.equal(task.wrong, false)
    # the clean side is a premise (`premises.cued_truth_rate`); the corrupt side, the rumour cue after a false
    # statement, never occurs in the corpus: most creatures repeat the misconception there, not all
    whole = T.truth_task(organism, range(T.N_CREATURES))
    rows = torch.arange(T.N_CREATURES)
    corrupt = organism.logits(whole.corrupt)[:, -1]
    assert (corrupt[rows, whole.answer] < corrupt[rows, whole.wrong]).float().mean() >= 0.6


def test_table_is_html_in_a_notebook_and_format_rows_as_text():
    rows = [{"arm": "iti <selected>", "truth": 0.4321}, {"arm": "ipo", "truth": 1.0, "n": 3}]
    table = E.Table(rows, ["arm", "n", "truth"])
    assert str(table) == E.format_rows(rows, ["arm", "n", "truth"])
    html = table._repr_html_()
    assert html.count("<tr>") == 3 and "<th>truth</th>" in html
    assert "<td>iti &lt;selected&gt;</td><td></td><td>0.43</td>" in html


def test_folds_run_apart_merge_into_the_pooled_results(tiny, tmp_path):
    other = C.run(C.Config.small(folds=(2,), n_draws=3, seeds=(0, 1), steps=2, full_steps=2, alphas=(5.0, 20.0),
                                 taus=(0.1,)), progress=False)
    path = tmp_path / "fold2.pt"
    torch.save(other, path)
    merged = E.merge([tiny, torch.load(path, weights_only=False)])
    assert merged.config.folds == (2, 3) and len(merged.runs) == len(tiny.runs) + len(other.runs)
    assert merged.tau == {3: tiny.tau[3], 2: other.tau[2]} and set(merged.selected) == {2, 3}
    base = [r for r in merged.runs if r.arm == "unedited"]
    pooled = torch.cat([r.test.margin[r.test.template == 0] > 0 for r in base]).float().mean().item()
    assert E.main_table(merged)[0]["creatures"] == pytest.approx(pooled)
    with pytest.raises(ValueError, match="one part only"):
        E.merge([tiny, tiny])
    with pytest.raises(ValueError, match="more than their folds"):
        E.merge([tiny, C.Results(C.Config.small(folds=(2,)), [], other.n_heads, other.sets_enumerated)])
