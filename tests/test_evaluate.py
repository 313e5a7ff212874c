"""Tests of probe.evaluate: the intervals against their definitions, split roles."""

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from probe.errors import DatasetError
from probe.evaluate import (bootstrap_intervals, compute_metrics, split_role,
                            wilson_interval)


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
    f1 = [f1_score(y[r], pred[r], labels=list(range(k)), average="macro", zero_division=0) for r in rows]
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
