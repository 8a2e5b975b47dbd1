"""fastkd.metrics against values computed by hand."""

import math

import pytest
import torch

from fastkd import metrics


def lp(rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64))


P = lp([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])
Y = torch.tensor([0, 1, 0, 2])


def test_accuracy_and_nll():
    assert metrics.accuracy(P, Y) == pytest.approx(0.5)  # rows 0 and 1 right
    expected = -(math.log(0.7) + math.log(0.6) + math.log(0.3) + math.log(0.25)) / 4
    assert metrics.nll(P, Y) == pytest.approx(expected)


def test_ece_by_hand():
    # Confidences 0.7, 0.6, 0.4, 0.5 land in bins (ceil(c*15)-1) 10, 8, 5, 7: one row per bin,
    # so ECE = mean |correct - conf| = (0.3 + 0.4 + 0.4 + 0.5) / 4.
    assert metrics.ece(P, Y) == pytest.approx((0.3 + 0.4 + 0.4 + 0.5) / 4)
    # Two bins: {0.7, 0.6} (correct, correct) and {0.4, 0.5} (wrong, wrong).
    assert metrics.ece(P, Y, bins=2) == pytest.approx(0.5 * abs(1 - 0.65) + 0.5 * abs(0 - 0.45))


def test_ece_perfectly_calibrated_is_zero():
    p = lp([[1.0, 0.0]] * 4)
    assert metrics.ece(p, torch.tensor([0, 0, 0, 0])) == pytest.approx(0.0)


def test_agreement_and_predictive_kl():
    t = lp([[0.6, 0.4, 0.0], [0.2, 0.2, 0.6]])
    s = lp([[0.5, 0.5, 0.0], [0.1, 0.3, 0.6]])
    assert metrics.agreement(s, t) == pytest.approx(1.0)  # argmax 0 (tie broken to 0) and 2 both
    kl0 = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)  # the zero entry adds nothing
    kl1 = 0.2 * math.log(2.0) + 0.2 * math.log(0.2 / 0.3) + 0.0
    assert metrics.predictive_kl(s, t) == pytest.approx((kl0 + kl1) / 2)
    s2 = lp([[0.2, 0.8, 0.0], [0.1, 0.3, 0.6]])
    assert metrics.agreement(s2, t) == pytest.approx(0.5)
    assert metrics.predictive_kl(t, t) == pytest.approx(0.0)


def test_ensemble_averages_probabilities_not_logits():
    a = lp([[0.9, 0.1]])
    b = lp([[0.3, 0.7]])
    ens = metrics.ensemble_log_probs([a, b]).exp()
    assert torch.allclose(ens, torch.tensor([[0.6, 0.4]], dtype=torch.float64))


def test_classification_metrics_keys():
    m = metrics.classification_metrics(P, Y)
    assert set(m) == {"accuracy", "nll", "ece"}
    m = metrics.classification_metrics(P, Y, P)
    assert m["agreement"] == 1.0 and m["predictive_kl"] == pytest.approx(0.0)
