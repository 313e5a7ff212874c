"""Calibration: the expected calibration error by hand, temperature scaling fitted on
validation only, and what random labels show."""

from __future__ import annotations

import math

import numpy as np
import pytest

from probe import calibration, evaluate
from probe.calibration import (Temperature, apply_temperature, choose_temperature,
                               expected_calibration_error, fit_temperature)
from probe.errors import DatasetError


def _row(top: int, confidence: float, K: int = 10) -> list[float]:
    """Probabilities with `confidence` on class `top`, the rest shared evenly."""
    row = [(1 - confidence) / (K - 1)] * K
    row[top] = confidence
    return row


def test_ece_by_hand_with_a_confidence_of_one_and_one_on_a_bin_edge():
    rows = [  # (true class, predicted class, confidence) -> its bin of [i/15, (i+1)/15)
        (1, 0, 1.0),     # wrong; 1.0 is in the last bin (14), closed
        (5, 5, 0.95),    # right; bin 14 = [14/15, 1]
        (3, 3, 2 / 15),  # right; exactly on the edge 2/15: bin 2, not 1
        (1, 2, 0.15),    # wrong; bin 2 = [2/15, 3/15)
        (2, 1, 0.5),     # wrong; bin 7 = [7/15, 8/15)
        (4, 4, 0.52),    # right; bin 7
        (0, 5, 0.9),     # wrong; bin 13
    ]
    y = np.array([r[0] for r in rows])
    proba = np.array([_row(r[1], r[2]) for r in rows])
    assert np.array_equal(np.argmax(proba, axis=1), [r[1] for r in rows])
    # per bin |right - sum of confidences|, over the 7 images (the weighted mean of
    # |accuracy - mean confidence| with each bin's share n_b / N)
    bin14 = abs(1 - (1.0 + 0.95))
    bin2 = abs(1 - (2 / 15 + 0.15))
    bin7 = abs(1 - (0.5 + 0.52))
    bin13 = abs(0 - 0.9)
    expected = (bin14 + bin2 + bin7 + bin13) / 7
    assert expected_calibration_error(y, proba) == pytest.approx(expected, abs=1e-12)
    # the same as the textbook form, sum_b n_b / N |acc_b - conf_b|
    textbook = (2 / 7 * abs(1 / 2 - 1.95 / 2) + 2 / 7 * abs(1 / 2 - (2 / 15 + 0.15) / 2)
                + 2 / 7 * abs(1 / 2 - 1.02 / 2) + 1 / 7 * 0.9)
    assert expected == pytest.approx(textbook)


def test_a_confidence_exactly_on_a_bin_edge_opens_the_upper_bin():
    table = calibration.reliability_table([2 / 15, 1.0, 14 / 15], [True, False, True])
    assert [(r["low"], r["count"]) for r in table] == [(2 / 15, 1), (14 / 15, 2)]
    index, _ = calibration.bin_contributions([2 / 15, 1.0, 0.0, 3 / 15 - 1e-12], [1, 1, 0, 0])
    assert index.tolist() == [2, 14, 0, 2]


def test_ece_is_zero_when_confidence_matches_accuracy_in_every_bin():
    # 10 images at confidence 0.8, 8 of them right
    proba = np.tile([0.8, 0.2], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(y, proba) == pytest.approx(0.0, abs=1e-12)
    metrics = evaluate.calibration_error(y, proba)
    assert metrics["expected_calibration_error"] == pytest.approx(0.0, abs=1e-12)
    low, high = metrics["expected_calibration_error_ci"]
    assert low <= 1e-12 <= high + 1e-12 and high < 0.5


def test_the_interval_contains_the_value_and_matches_compute_metrics():
    rng = np.random.default_rng(1)
    proba = rng.dirichlet([1, 1, 1], size=80)
    y = rng.integers(0, 3, 80)
    metrics = evaluate.compute_metrics(y, proba, ["a", "b", "c"])
    value = metrics["expected_calibration_error"]
    assert value == pytest.approx(expected_calibration_error(y, proba))
    low, high = metrics["expected_calibration_error_ci"]
    assert low <= value <= high and high - low > 0.01


def test_multilabel_ece_is_over_the_entries_leaving_out_ignored_ones():
    Y = np.array([[1, 0], [0, 1]])
    P = np.array([[0.9, 0.3], [0.6, 0.8]])
    ignore = np.array([[False, False], [False, True]])
    # entries: 0.9 right (conf 0.9), 0.3 right (conf 0.7), 0.6 wrong (conf 0.6); 0.8 ignored
    got = evaluate.multilabel_calibration_error(Y, P, ignore)["expected_calibration_error"]
    assert got == pytest.approx((0.1 + 0.3 + 0.6) / 3)
    metrics = evaluate.compute_multilabel_metrics(Y, P, ["a", "b"], 0.5, ignore=ignore)
    assert metrics["expected_calibration_error"] == pytest.approx(got)


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes, 70% right, but every prediction at confidence ~0.98."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    predicted = np.where(rng.random(n) < 0.7, y, (y + 1 + rng.integers(0, 2, n)) % 3)
    logits = rng.normal(0, 0.3, (n, 3))
    logits[np.arange(n), predicted] += 5.0
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return y, z / z.sum(axis=1, keepdims=True)


def test_temperature_softens_an_overconfident_head_and_lowers_validation_ece():
    y_val, proba_val = _overconfident(300, seed=0)
    T = fit_temperature(y_val, proba_val)
    assert T > 1.5
    before = expected_calibration_error(y_val, proba_val)
    after = expected_calibration_error(y_val, apply_temperature(proba_val, T))
    assert after <= before and after < 0.1 < before
    # the ranking, so every prediction, is unchanged; rows still sum to 1
    scaled = apply_temperature(proba_val, T)
    assert np.array_equal(np.argmax(scaled, axis=1), np.argmax(proba_val, axis=1))
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0)
    # and it carries over to images it was not fitted on
    y_test, proba_test = _overconfident(300, seed=1)
    assert (expected_calibration_error(y_test, apply_temperature(proba_test, T))
            < expected_calibration_error(y_test, proba_test))
    chosen = choose_temperature(y_val, proba_val)
    assert chosen.note is None and chosen.value == pytest.approx(T, rel=1e-5)


def test_an_underconfident_head_gets_a_temperature_below_one():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    proba = np.where(np.eye(2)[y] == 1, 0.6, 0.4)  # always right at 0.6
    proba[:10] = proba[:10, ::-1]  # 10 wrong ones, so that validation can choose
    assert fit_temperature(y, proba) < 1


def test_apply_temperature_is_softmax_of_log_probabilities_over_t():
    proba = np.array([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]])
    assert apply_temperature(proba, 1.0) is not None
    np.testing.assert_array_equal(apply_temperature(proba, 1.0), proba)
    z = np.log(np.maximum(proba, calibration.SMALLEST)) / 2.0
    expected = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(apply_temperature(proba, 2.0), expected)
    with pytest.raises(DatasetError, match="temperature"):
        apply_temperature(proba, 0.0)


@pytest.mark.parametrize("y, proba, says", [
    (None, None, "no validation split"),
    (np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), "too few"),
    (np.zeros(12, int), np.tile([0.4, 0.6], (12, 1)), "one class"),
    (np.arange(12) % 2, np.eye(2)[np.arange(12) % 2] * 0.8 + 0.1, "predicted right"),
])
def test_validation_that_can_not_choose_keeps_t_at_one_and_says_why(y, proba, says):
    chosen = choose_temperature(y, proba)
    assert chosen.value == 1.0 and says in chosen.note
    assert chosen.record() == {"temperature": 1.0, "temperature_note": chosen.note}
    assert Temperature(2.0).record() == {"temperature": 2.0}


def test_random_labels_a_calibrated_head_is_near_chance_and_its_ece_is_small():
    """Over-fit on random labels, a dense head is sure of itself on new images; the
    temperature fitted on validation brings its confidence back near 1/2, and the ECE of
    the calibrated probabilities is at the level sampling noise gives a calibrated
    predictor, where the head's own is far above it."""
    from probe.heads import make_head

    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 32)).astype(np.float32)
    y = rng.integers(0, 2, 500)
    train, val, test = slice(0, 200), slice(200, 350), slice(350, 500)
    head = make_head("logreg", C=1000.0, refit=False)
    head.fit(X[train], y[train], X_val=X[val], y_val=y[val], classes=["a", "b"])
    chosen = choose_temperature(y[val], head.predict_proba(X[val]))
    raw = head.predict_proba(X[test])
    calibrated = chosen.apply(raw)
    before = evaluate.calibration_error(y[test], raw)["expected_calibration_error"]
    after = evaluate.calibration_error(y[test], calibrated)
    assert chosen.value > 1
    assert calibrated.max(axis=1).mean() < 0.65  # near chance: it knows nothing
    # a perfectly calibrated predictor on 150 images: ECE of the order of 0.05-0.1
    assert after["expected_calibration_error"] < 0.15 < before
    assert after["expected_calibration_error_ci"][0] < 0.1


def test_nll_is_lowest_at_the_fitted_temperature():
    y, proba = _overconfident(200, seed=5)
    T = fit_temperature(y, proba)

    def nll(t):
        p = apply_temperature(proba, t)
        return -np.mean(np.log(p[np.arange(y.size), y]))

    assert nll(T) <= min(nll(T * 0.9), nll(T * 1.1), nll(1.0)) + 1e-9
    assert math.isfinite(T) and calibration.TEMPERATURE_BOUNDS[0] <= T <= calibration.TEMPERATURE_BOUNDS[1]


def test_a_temperature_at_the_top_of_its_range_says_the_confidence_means_nothing():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 100)
    proba = np.tile([0.9, 0.1], (100, 1))  # sure of class 0 whatever the image
    chosen = choose_temperature(y, proba)
    assert chosen.value == pytest.approx(calibration.TEMPERATURE_BOUNDS[1], rel=1e-3)
    assert "next to nothing" in chosen.note
