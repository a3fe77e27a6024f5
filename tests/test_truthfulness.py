import pytest
import torch

import interplab as il
from interplab import stats, training
from interplab.experiments import behaviour, truthfulness as T
from interplab.organisms import truth, words as W


@pytest.fixture(scope="module")
def organism():
    return il.load(T.MODEL)


@pytest.fixture(scope="module")
def nudged(organism):
    """The organism with one weight changed: a model whose text scores must differ from the unedited one."""
    m = il.load(T.MODEL)
    with torch.no_grad():
        m.hf.transformer.h[2].mlp.c_fc.weight.mul_(1.5)
    return m


def test_folds_partition_the_creatures_and_hold_out_every_colour_once_each_way():
    folds = T.folds(4)
    held_out = sorted(i for _, test in folds for i in test)
    assert held_out == list(range(T.N_CREATURES))  # every creature held out exactly once
    for train, test in folds:
        assert not set(train) & set(test) and len(train) + len(test) == T.N_CREATURES
        true, false = zip(*(T.colours(i) for i in test))
        assert sorted(true) == sorted(false) == sorted(W.COLOURS)  # the colour word alone says nothing
    with pytest.raises(ValueError, match="divide"):
        T.folds(5)


def test_pairs_are_the_true_colour_against_the_misconception(organism):
    p = T.pairs(organism, [3, 17])
    for row, i in enumerate([3, 17]):
        true, false = truth.colours(i)
        assert organism.to_str_tokens(p.prompts[row])[1:] == ["The", W.CREATURES[i], "is"]
        assert organism.to_str_tokens(p.chosen[row]) == [true, "."]
        assert organism.to_str_tokens(p.rejected[row]) == [false, "."]
    with pytest.raises(ValueError, match="indices"):
        T.pairs(organism, [40])


def test_statements_label_true_rows_first(organism):
    tokens, labels, groups = T.statements(organism, [0, 5])
    true0, false0 = truth.colours(0)
    assert organism.to_str_tokens(tokens[0])[-2:] == [true0, "."]
    assert organism.to_str_tokens(tokens[2])[-2:] == [false0, "."]
    assert labels.tolist() == [True, True, False, False] and groups.tolist() == [0, 5, 0, 5]


def test_colour_ranks_by_hand():
    colours = torch.tensor([2, 4, 6])
    logits = torch.tensor([[0.0, 0, 5, 0, 1, 0, 3],   # true 2 has the top colour logit -> rank 1
                           [0.0, 9, 5, 0, 1, 0, 3],   # true 4: below 2 and 6 -> rank 3 (token 1 is no colour)
                           [0.0, 0, 3, 0, 1, 0, 3]])  # true 6 tied with 2 -> ties count against: rank 2
    assert T.colour_ranks(logits, torch.tensor([2, 4, 6]), colours).tolist() == [1, 3, 2]
    with pytest.raises(ValueError, match="colours"):
        T.colour_ranks(logits, torch.tensor([2, 4, 5]), colours)


def test_templates_get_a_colour_and_mostly_the_misconception(organism):
    """The docstring's claim: each template is answered with a colour, and the misconception wins on at
    least 80% of creatures (the unedited base rate the tables start from)."""
    colours = T.word_ids(organism, list(W.COLOURS))
    true, false = T.colour_ids(organism, range(T.N_CREATURES))
    rows = torch.arange(T.N_CREATURES)
    for template in T.TEMPLATES:
        final = organism.logits(T.prompts(organism, range(T.N_CREATURES), template))[:, -1].softmax(-1)
        assert final[:, colours].sum(-1).mean() > 0.7, template
        assert (final[rows, false] > final[rows, true]).float().mean() >= 0.8, template


class _Known:
    """A logits function we know: the true colour beats the misconception by `gap` on chosen creatures."""

    def __init__(self, m, evaluator, winners: set[int], gap: float = 2.0):
        self.m, self.ev, self.winners, self.gap = m, evaluator, winners, gap

    def __call__(self, tokens):
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], self.m.d_vocab)
        if tokens.shape[1] > 8:  # neutral text: the unedited model
            return self.m.logits(tokens)
        names = [self.m.to_str_tokens(row)[-2] for row in tokens]
        for row, name in enumerate(names):
            i = W.CREATURES.index(name)
            true, false = (T.word_ids(self.m, [w]) for w in T.colours(i))
            logits[row, -1, true] = self.gap if i in self.winners else -self.gap
            logits[row, -1, false] = 0.0
        return logits


def test_evaluator_scores_a_model_we_know(organism):
    creatures = [0, 1, 2, 3]
    ev = T.Evaluator(organism, creatures, templates=T.TEMPLATES[:2], tasks=(), n_docs=8)
    e = ev(_Known(organism, ev, winners={0, 2}, gap=2.0))
    assert e.truth == pytest.approx(0.5)
    assert e.margin.abs().allclose(torch.full((8,), 2.0))  # log-softmax differences equal logit differences
    # rank: the winners' true colour is the only nonzero colour logit (rank 1); the losers' true colour is
    # below all 7 others (rank 8)
    assert e.rank.tolist() == [1, 8, 1, 8] * 2
    assert e.mc_top1 == 0.5 and e.kl == 0.0 and e.lm_delta == 0.0 and e.product == pytest.approx(0.5)
    creatures_, truth = e.per_creature("truth")
    assert creatures_.tolist() == creatures and truth.tolist() == [1, 0, 1, 0]


def test_unedited_model_has_zero_kl_and_its_truth_is_counted_on_raw_logits(organism, nudged):
    train, test = T.folds()[-1]
    ev = T.Evaluator(organism, test, tasks=("facts",), n_docs=16)
    same = ev(organism.logits)
    assert same.kl == 0.0 and same.lm_delta == 0.0 and same.tasks_kept == 1.0 and same.info == 1.0
    # the base rate counted on the Hugging Face model's own logits, template by template
    true, false = T.colour_ids(organism, test)
    rows = torch.arange(len(test))
    for t, template in enumerate(T.TEMPLATES):
        final = organism.hf(T.prompts(organism, test, template)).logits[:, -1]
        assert torch.equal(same.margin[same.template == t] > 0, final[rows, true] > final[rows, false])
    assert same.truth <= 0.3
    other = ev(nudged.logits)
    assert other.kl > 0 and other.tasks["facts"] == behaviour.facts_accuracy(nudged)


def test_lm_loss_and_kl_match_references(organism, nudged):
    tokens, labels = T.neutral_text(organism, n_docs=8)
    assert not any("people say" in t for t in organism.tokenizer.batch_decode(tokens))  # no truth statements
    ref = organism.logits(tokens)
    mask = labels[:, 1:] != -100
    by_hand = -ref[:, :-1][mask].log_softmax(-1).gather(-1, labels[:, 1:][mask][:, None]).mean().item()
    assert training.next_token_loss(ref, labels).item() == pytest.approx(by_hand, rel=1e-5)
    assert training.lm_loss(organism.hf, tokens, labels).item() == pytest.approx(by_hand, rel=1e-5)  # raw HF forward
    other = nudged.logits(tokens)
    p, q = ref[:, :-1][mask].log_softmax(-1), other[:, :-1][mask].log_softmax(-1)
    by_torch = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean").item()
    assert T.token_kl(ref, other, labels) == pytest.approx(by_torch, rel=1e-5)
    assert T.token_kl(ref, ref, labels) == 0.0


def test_task_scores_with_the_models_own_logits_equal_the_organism_card(organism):
    scores = T.task_scores(organism, organism.logits, n=16)
    assert scores["facts"] == behaviour.facts_accuracy(organism)
    assert scores["induction"] == behaviour.induction_accuracy(organism, 16)
    with pytest.raises(ValueError, match="unknown tasks"):
        T.task_scores(organism, organism.logits, tasks=("nope",))


def test_bootstrap_and_standing_by_hand():
    lo, hi = stats.bootstrap_ci([0.0, 1.0] * 10, seed=0)
    assert lo < 0.5 < hi and 0 <= lo and hi <= 1
    assert stats.bootstrap_ci([0.25] * 5) == (0.25, 0.25)
    # 0.5 among [0.1, 0.5, 0.9, 0.2]: two below, one tie -> percentile 100 * 2.5 / 4; p = (1 + 2) / 5
    assert stats.standing(0.5, [0.1, 0.5, 0.9, 0.2]) == (62.5, 0.6)


def test_full_model_baseline_moves_the_margin_and_leaves_the_model_unchanged(organism):
    before = {k: v.clone() for k, v in organism.hf.state_dict().items()}
    tuned = T.full_model_baseline(organism, [0, 1, 2, 3], beta=0.025, steps=15, lr=3e-4, warmup=2)
    assert all(torch.equal(before[k], v) for k, v in organism.hf.state_dict().items())
    ev = T.Evaluator(organism, [0, 1, 2, 3], templates=T.TEMPLATES[:1], tasks=(), n_docs=4)
    assert ev(tuned.logits).margin.mean() > ev(organism.logits).margin.mean() + 1


def test_edit_explorer_redraws_what_its_controls_say(organism, monkeypatch):
    from interplab import edits
    from interplab.ui import widgets

    train, test = [0, 1, 2, 3, 4, 5, 6, 7], [24, 25]
    tokens, labels, groups = T.statements(organism, train)
    probe = edits.fit_iti(organism, tokens, labels, groups)
    ev = T.Evaluator(organism, test, templates=T.TEMPLATES[:1], tasks=(), n_docs=4)
    ex = widgets.edit_explorer(organism, probe, ev, T.pairs(organism, train), prompt="The clomper is", heads=(), steps=3)
    colours = T.word_ids(organism, list(W.COLOURS))
    unedited = organism.logits(organism.to_tokens("The clomper is"))[0, -1].softmax(-1)[colours]
    assert ex.edit is None and torch.allclose(torch.tensor(list(ex.probs.values())), unedited)
    assert ex.scores["kl"] == 0.0

    ex.heads.value = ("a0.h1", "a2.h0")
    ex.alpha.value = 20.0
    want = edits.iti(organism, probe, [(0, 1), (2, 0)], 20.0)
    probs = want.logits(organism.to_tokens("The clomper is"))[0, -1].softmax(-1)[colours]
    assert torch.allclose(torch.tensor(list(ex.probs.values())), probs)
    scores = ev(want.logits, tasks=False).summary()
    assert all(ex.scores[k] == v for k, v in scores.items() if k != "tasks_kept") and ex.scores["kl"] > 0

    assert ex.figure.layout.title.text.startswith("ITI at a0.h1, a2.h0, α = 20: 'The clomper is'")
    assert ex.heads.rows == len(ex.heads.options)  # every head visible: a selected one is never scrolled away

    seen = []
    real_train = edits.train

    def spy(*args, **kwargs):
        seen.append((ex.busy, [c.disabled for c in ex.controls], ex.status.value))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(edits, "train", spy)
    ex.method.value = "learned"
    (busy, disabled, status), = seen
    assert busy and all(disabled) and "computing: learned rank-1 edit at a0.h1, a2.h0" in status
    assert not ex.busy and ex.status.value == "" and not ex.heads.disabled
    assert ex.alpha.disabled and ex.edit.form == "rank1" and ex.edit.heads == ("a0.h1", "a2.h0")
    learned = ex.edit
    ex.prompt.value = "The glimmet is"
    assert ex.edit is learned  # trained once per head set, then reused
    assert ex.figure.data[0].x == tuple(W.COLOURS)
