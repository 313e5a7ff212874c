"""Tests of probe.evaluate: the intervals against their definitions, split roles."""

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from probe.errors import DatasetError
from probe.evaluate import (bootstrap_intervals, compute_metrics, compute_multilabel_metrics,
                            percentile_interval, split_role, wilson_interval)


def predictions(n, k=3, strength=1.5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += strength
    return y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_wilson_interval_known_values():
    # the textbook example: 8 successes in 10 trials
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = wilson_interval(0, 30)
    assert low == 0.0 and high == pytest.approx(0.1135, abs=1e-4)
    low, high = wilson_interval(30, 30)
    assert high == 1.0 and low == pytest.approx(0.8865, abs=1e-4)
    with pytest.raises(DatasetError):
        wilson_interval(0, 0)


@pytest.mark.parametrize("k", [2, 5])
def test_bootstrap_equals_a_plain_loop_over_the_same_resamples(k):
    y, proba = predictions(60, k)
    y[y == k - 1] = 0
    y[:2] = k - 1  # a class with 2 images: many resamples lack it (balanced accuracy skips it)
    pred = proba.argmax(axis=1)
    resamples = 200
    fast = bootstrap_intervals(y, pred, k, seed=3, resamples=resamples)
    # the same resamples, one at a time, scored by scikit-learn
    rows = np.random.default_rng(3).integers(0, y.size, size=(resamples, y.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a predicted class absent from a resample
        balanced = [balanced_accuracy_score(y[r], pred[r]) for r in rows]
    # no `labels`: the classes present in the resample's truth or predictions
    f1 = [f1_score(y[r], pred[r], average="macro", zero_division=0) for r in rows]
    assert fast["balanced_accuracy_ci"] == pytest.approx(list(np.percentile(balanced, [2.5, 97.5])), abs=1e-12)
    assert fast["macro_f1_ci"] == pytest.approx(list(np.percentile(f1, [2.5, 97.5])), abs=1e-12)


def test_intervals_are_seeded_contain_the_score_and_shrink_with_more_images():
    y, proba = predictions(80)
    first, again = compute_metrics(y, proba, ["a", "b", "c"]), compute_metrics(y, proba, ["a", "b", "c"])
    assert first == again
    other = compute_metrics(y, proba, ["a", "b", "c"], seed=1)
    assert other["macro_f1_ci"] != first["macro_f1_ci"]
    assert other["accuracy_ci"] == first["accuracy_ci"]  # Wilson: no randomness
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        low, high = first[f"{key}_ci"]
        assert low < first[key] < high
    big_y, big_proba = predictions(4000)
    big = compute_metrics(big_y, big_proba, ["a", "b", "c"])
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        width = lambda m: m[f"{key}_ci"][1] - m[f"{key}_ci"][0]  # noqa: E731
        assert width(big) < width(first) / 3, key
    assert json.loads(json.dumps(big)) == big


def test_split_roles():
    assert split_role("test") == "test"
    assert split_role("val") == "validation, used for selection"


# --- degenerate cases: perfect, all wrong, classes missing from the split or a resample ---


def one_hot(labels, k):
    return np.eye(k)[labels] * 0.9 + 0.1 / k


@pytest.mark.parametrize("n, k", [(22, 6), (6, 3), (6, 2), (40, 10)])
def test_perfect_predictions_have_intervals_of_exactly_one(n, k):
    y = np.arange(n) % k  # every class present; resamples miss some of them
    m = compute_metrics(y, one_hot(y, k), [f"c{i}" for i in range(k)])
    assert m["balanced_accuracy"] == m["macro_f1"] == 1.0
    assert m["balanced_accuracy_ci"] == [1.0, 1.0]
    assert m["macro_f1_ci"] == [1.0, 1.0]
    assert m["accuracy_ci"][1] == 1.0 and m["accuracy_ci"][0] < 1.0  # Wilson does not collapse


def test_a_split_with_only_one_class():
    y = np.zeros(8, dtype=int)
    m = compute_metrics(y, one_hot(y, 3), ["a", "b", "c"])
    assert m["macro_f1"] == 1.0 and m["macro_f1_ci"] == [1.0, 1.0]
    assert m["balanced_accuracy_ci"] == [1.0, 1.0]
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 2])  # 5 of 8 right, two classes that never occur
    m = compute_metrics(y, one_hot(pred, 3), ["a", "b", "c"])
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        low, high = m[f"{key}_ci"]
        assert low <= m[key] <= high, key


@pytest.mark.parametrize("k", [2, 4])
def test_all_wrong_predictions_have_intervals_at_zero(k):
    y = np.arange(24) % k
    m = compute_metrics(y, one_hot((y + 1) % k, k), [f"c{i}" for i in range(k)])
    assert m["accuracy"] == m["balanced_accuracy"] == m["macro_f1"] == 0.0
    assert m["balanced_accuracy_ci"] == [0.0, 0.0] and m["macro_f1_ci"] == [0.0, 0.0]
    assert m["accuracy_ci"][0] == 0.0 and 0.0 < m["accuracy_ci"][1] < 0.2  # Wilson's upper end


@pytest.mark.parametrize("seed", range(12))
def test_every_interval_contains_its_score(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(3, 30)), int(rng.integers(2, 9))  # often a class is missing
    y, proba = predictions(n, k, strength=float(rng.uniform(0, 4)), seed=seed)
    m = compute_metrics(y, proba, [f"c{i}" for i in range(k)], seed=seed)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        low, high = m[f"{key}_ci"]
        assert 0.0 <= low <= m[key] <= high <= 1.0, (key, m[key], low, high)
    Y = (rng.random((n, k)) < rng.uniform(0.05, 0.5)).astype(int)
    P = np.clip(0.5 * Y + 0.6 * rng.random((n, k)), 0, 1)
    m = compute_multilabel_metrics(Y, P, [f"c{i}" for i in range(k)], 0.5, seed=seed, resamples=200)
    for key in ("mean_average_precision", "micro_f1", "macro_f1", "exact_match_accuracy"):
        low, high = m[f"{key}_ci"]
        assert 0.0 <= low <= m[key] <= high <= 1.0, (key, m[key], low, high)


@pytest.mark.parametrize("n", [6, 22])
def test_perfect_multilabel_predictions_have_intervals_of_exactly_one(n):
    Y = np.zeros((n, 4), dtype=int)
    Y[np.arange(n), np.arange(n) % 3] = 1  # class 3 has no positive; resamples miss others
    Y[0, 1] = 1
    P = np.where(Y == 1, 0.9, 0.1)
    m = compute_multilabel_metrics(Y, P, ["a", "b", "c", "d"], 0.5)
    for key in ("mean_average_precision", "micro_f1", "macro_f1", "exact_match_accuracy"):
        assert m[key] == 1.0, key
    for key in ("mean_average_precision", "micro_f1", "macro_f1"):
        assert m[f"{key}_ci"] == [1.0, 1.0], key


def test_percentile_interval_widens_to_its_point_and_skips_undefined_resamples():
    assert percentile_interval(np.ones(50), 0.9) == [0.9, 1.0]
    assert percentile_interval(np.zeros(50), 0.2) == [0.0, 0.2]
    assert percentile_interval(np.array([np.nan, 1.0, 1.0]), 1.0) == [1.0, 1.0]
    assert percentile_interval(np.full(5, np.nan), 0.0) == [0.0, 0.0]


def assert_same_ece_and_interval(fast: dict, point: float, slow: list[float]) -> None:
    """The vectorised ECE and its interval equal the point value and the percentiles of
    the same resamples scored one at a time (the interval widened to hold its score)."""
    low, high = np.percentile(slow, [2.5, 97.5])
    assert fast["expected_calibration_error"] == pytest.approx(point, abs=1e-12)
    assert fast["expected_calibration_error_ci"] == pytest.approx([min(low, point), max(high, point)],
                                                                  abs=1e-12)


def test_ece_bootstrap_equals_a_plain_loop_over_the_same_resamples():
    from probe.calibration import expected_calibration_error
    from probe.evaluate import calibration_error, multilabel_calibration_error

    y, proba = predictions(70, 3)
    resamples = 200
    fast = calibration_error(y, proba, seed=3, resamples=resamples)
    # the same resamples as the other bootstrap intervals of the seed, scored one at a time
    rows = np.random.default_rng(3).integers(0, y.size, size=(resamples, y.size))
    slow = [expected_calibration_error(y[r], proba[r]) for r in rows]
    point = expected_calibration_error(y, proba)
    assert_same_ece_and_interval(fast, point, slow)
    # multi-label: the resampled images bring all their (image, class) entries
    Y = (np.random.default_rng(4).random((40, 3)) < 0.4).astype(int)
    P = np.random.default_rng(5).random((40, 3))
    fast = multilabel_calibration_error(Y, P, seed=3, resamples=resamples)
    rows = np.random.default_rng(3).integers(0, 40, size=(resamples, 40))

    def entries_ece(Yr, Pr):
        p, t = Pr.ravel(), Yr.ravel()
        return expected_calibration_error(((p >= 0.5).astype(int) == t).astype(int),
                                          np.stack([1 - np.maximum(p, 1 - p), np.maximum(p, 1 - p)], 1))

    slow = [entries_ece(Y[r], P[r]) for r in rows]
    point = entries_ece(Y, P)
    assert_same_ece_and_interval(fast, point, slow)
