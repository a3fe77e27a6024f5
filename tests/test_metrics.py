"""Metrics against planted values and independent formulas."""

import math
import warnings

import pytest
import torch

from interplab import metrics


def test_logit_diff_planted_and_final_position():
    logits = torch.zeros(2, 3, 5)
    logits[0, -1, 1], logits[0, -1, 4] = 3.0, 0.5
    logits[1, -1, 2], logits[1, 0, 2] = -1.0, 100.0  # an earlier position must be ignored
    got = metrics.logit_diff(logits, torch.tensor([1, 2]), torch.tensor([4, 0]))
    assert got.tolist() == [2.5, -1.0]
    assert torch.equal(metrics.logit_diff(logits[:, -1], torch.tensor([1, 2]), torch.tensor([4, 0])), got)


def test_answer_prob_matches_softmax_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]])
    got = metrics.answer_prob(logits, torch.tensor([2, 0]))
    for row, answer, value in zip(logits.tolist(), [2, 0], got.tolist()):
        assert value == pytest.approx(math.exp(row[answer]) / sum(math.exp(x) for x in row), rel=1e-6)


def test_normalized_effect_endpoints_and_error():
    clean, corrupt = torch.tensor(4.0), torch.tensor(-2.0)
    got = metrics.normalized_effect(torch.tensor([4.0, -2.0, 1.0]), clean, corrupt)
    assert got.tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="undefined"):
        metrics.normalized_effect(torch.tensor([1.0]), torch.tensor(2.0), torch.tensor(2.0))


def test_kl_divergence_matches_torch_distributions():
    torch.manual_seed(0)
    p, q = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    want = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=p),
                                             torch.distributions.Categorical(logits=q))
    torch.testing.assert_close(metrics.kl_divergence(p, q), want)
    torch.testing.assert_close(metrics.kl_divergence(p, p + 3.0), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.kl_divergence(p, q[:, :5])


def test_accuracy_planted():
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0], [0.0, 0.0, 9.0], [1.0, 0.0, 0.0]])
    assert metrics.accuracy(logits, torch.tensor([1, 0, 0, 0])).item() == 0.75


def test_bad_shapes_give_clear_errors():
    with pytest.raises(ValueError, match="one per example"):
        metrics.logit_diff(torch.zeros(3, 5), torch.tensor([1, 2]), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="expected logits"):
        metrics.accuracy(torch.zeros(5), torch.tensor([1]))


def test_scores_top_refuses_a_negative_count():
    from interplab.scores import Scores

    s = Scores(torch.tensor([[1.0, -3.0], [2.0, 0.5]]), ("layer", "head"))
    assert s.top(2) == [((0, 1), -3.0), ((1, 0), 2.0)]
    with pytest.raises(ValueError, match="non-negative"):
        s.top(-1)  # today: every entry but the smallest, silently


def test_check_gap_errors_on_zero_and_warns_inside_the_noise():
    clean = torch.tensor([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="normalized effect is undefined"):
        metrics.check_gap(clean, clean)
    assert metrics.check_gap(clean, clean, normalize=False) == 0.0
    noisy = torch.tensor([2.0, -2.0, 2.0, -1.9])  # differences clean - corrupt: mean 0.025, spread ~2
    # by hand: sd of the differences 2.281, SE = 2.281 / sqrt(4), so 2 x SE = 2.28
    with pytest.warns(UserWarning, match=r"two standard errors \(2 × SE = 2\.28\) of zero"):
        assert metrics.check_gap(noisy, torch.zeros(4)) == pytest.approx(0.025)
    steady = torch.tensor([5.0, -5.0, 3.0, -3.0])  # every example moves by 0.02, against a spread of ~4
    with pytest.warns(UserWarning, match="under a tenth of the metric's spread"):
        metrics.check_gap(steady + 0.02, steady)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.check_gap(steady + 2.0, steady) == pytest.approx(2.0)  # a clear gap: silent
