"""Multi-label heads and metrics: an (N, K) 0/1 target, independent probabilities, one
decision threshold per class chosen on validation, mean average precision."""

import json

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import average_precision_score, f1_score
from sklearn.model_selection import GridSearchCV

from probe.errors import DatasetError, RunError
from probe.evaluate import (average_precisions, best_f1_thresholds, compute_multilabel_metrics,
                            mean_average_precision, weighted_average_precision)
from probe.heads import list_heads, load_head, make_head

CLASSES = ["car", "dog", "person", "tree"]
FAST = {"dense": {"epochs": 15, "hidden_units": 16, "batch_size": 16, "learning_rate": 0.01}}


def features(n, seed, k=len(CLASSES), d=24, signal=3.0):
    """Each class adds a shift along its own direction: several classes per sample."""
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, k)) < 0.35).astype(np.int64)
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[:, :k] += signal * Y
    return X, Y


@pytest.fixture(scope="module")
def splits():
    return features(160, 0), features(60, 1), features(120, 2)


def fitted(name, splits, **params):
    (X, Y), (Xv, Yv), _ = splits
    return make_head(name, **{**FAST.get(name, {}), **params}).fit(X, Y, Xv, Yv, classes=CLASSES)


@pytest.mark.parametrize("name", list_heads())
def test_every_head_reaches_a_high_mean_average_precision(name, splits):
    head = fitted(name, splits)
    _, _, (Xt, Yt) = splits
    proba = head.predict_proba(Xt)
    assert proba.shape == Yt.shape and proba.min() >= 0 and proba.max() <= 1
    assert not np.allclose(proba.sum(axis=1), 1.0)  # independent, not a softmax
    assert mean_average_precision(Yt, proba) > 0.9
    predicted = head.predict(Xt)
    assert predicted.shape == Yt.shape and set(np.unique(predicted)) <= {0, 1}
    assert np.array_equal(predicted, (proba >= head.thresholds_).astype(int))
    assert head.score(Xt, Yt) == pytest.approx(np.mean(np.all(predicted == Yt, axis=1)))
    assert f1_score(Yt, predicted, average="micro") > 0.8


@pytest.mark.parametrize("name", list_heads())
def test_saved_head_and_keras_form_give_the_same_probabilities(name, splits, tmp_path):
    head = fitted(name, splits)
    _, _, (Xt, _) = splits
    head.save(tmp_path / "head")
    meta = json.loads((tmp_path / "head" / "head.json").read_text())
    assert meta["multilabel"] is True and len(meta["thresholds"]) == len(CLASSES)
    loaded = load_head(tmp_path / "head", classes=CLASSES)
    np.testing.assert_allclose(loaded.predict_proba(Xt), head.predict_proba(Xt), atol=1e-6)
    np.testing.assert_array_equal(loaded.thresholds_, head.thresholds_)
    np.testing.assert_array_equal(loaded.predict(Xt), head.predict(Xt))
    keras_proba = np.asarray(head.keras_head()(Xt.astype(np.float32)))
    np.testing.assert_allclose(keras_proba, head.predict_proba(Xt), atol=1e-5)


def test_a_tampered_threshold_is_refused(splits, tmp_path):
    head = fitted("knn", splits)
    head.save(tmp_path)
    meta = json.loads((tmp_path / "head.json").read_text())
    meta["thresholds"] = meta["thresholds"][:-1]
    (tmp_path / "head.json").write_text(json.dumps(meta))
    with pytest.raises(RunError, match="thresholds"):
        load_head(tmp_path)


@pytest.mark.parametrize("name", list_heads())
def test_thresholds_are_the_best_f1_on_val_of_the_model_fit_on_train_only(name, splits):
    (_, _), (Xv, Yv), _ = splits
    train_only = fitted(name, splits, refit=False)
    expected = best_f1_thresholds(Yv, train_only.predict_proba(Xv))
    np.testing.assert_allclose(train_only.thresholds_, expected)
    # refit=True fits again on train + val but keeps the thresholds the train-only model
    # chose on val (its own val scores would be scores of its training data)
    refitted = fitted(name, splits, refit=True)
    np.testing.assert_allclose(refitted.thresholds_, expected, atol=0.02)
    assert not np.allclose(refitted.thresholds_, best_f1_thresholds(Yv, refitted.predict_proba(Xv)))


def test_without_validation_the_thresholds_are_one_half(splits):
    (X, Y), _, _ = splits
    head = make_head("knn").fit(X, Y)
    np.testing.assert_array_equal(head.thresholds_, 0.5)
    assert list(head.class_names_) == ["0", "1", "2", "3"]
    assert list(head.classes_) == [0, 1, 2, 3]


def test_best_f1_thresholds_reach_the_best_f1_of_any_cut():
    rng = np.random.default_rng(3)
    Y = (rng.random((80, 3)) < 0.4).astype(int)
    P = np.round(np.clip(0.4 * Y + 0.6 * rng.random((80, 3)), 0, 1), 2)  # with ties
    thresholds = best_f1_thresholds(Y, P)
    for k in range(3):
        best = max(f1_score(Y[:, k], P[:, k] >= c) for c in np.unique(P[:, k]))
        assert f1_score(Y[:, k], P[:, k] >= thresholds[k]) == pytest.approx(best)
    no_positive = best_f1_thresholds(np.zeros((5, 2), int), rng.random((5, 2)))
    np.testing.assert_array_equal(no_positive, 0.5)


def test_average_precision_equals_scikit_learn_leaving_out_the_ignored_entries():
    rng = np.random.default_rng(4)
    Y = (rng.random((120, 4)) < 0.3).astype(int)
    P = np.clip(0.3 * Y + 0.7 * rng.random((120, 4)), 0, 1)
    P[:40, 0] = 0.5  # ties
    ignore = rng.random((120, 4)) < 0.15
    ignore[Y[:, 3] == 1, 3] = True  # class 3: every positive difficult -> undefined
    values = average_precisions(Y, P, ignore)
    for k in range(3):
        keep = ~ignore[:, k]
        assert values[k] == pytest.approx(average_precision_score(Y[keep, k], P[keep, k]))
    assert np.isnan(values[3])
    assert mean_average_precision(Y, P, ignore) == pytest.approx(np.mean(values[:3]))
    # ignoring changes the score: the mask is really used
    assert not np.isclose(average_precisions(Y, P)[1], values[1])


def test_resampled_average_precision_equals_scikit_learn_with_sample_weights():
    rng = np.random.default_rng(5)
    y = (rng.random(50) < 0.4).astype(int)
    s = np.round(rng.random(50), 1)
    counts = rng.multinomial(50, np.full(50, 1 / 50), size=6)
    values = weighted_average_precision(y, s, counts)
    for row, value in zip(counts, values):
        assert value == pytest.approx(average_precision_score(y, s, sample_weight=row))


def test_multilabel_metrics_and_their_intervals():
    rng = np.random.default_rng(6)
    Y = (rng.random((150, 4)) < 0.3).astype(int)
    P = np.clip(0.4 * Y + 0.6 * rng.random((150, 4)), 0, 1)
    thresholds = [0.5, 0.55, 0.6, 0.45]
    m = compute_multilabel_metrics(Y, P, CLASSES, thresholds, seed=0)
    predicted = (P >= np.array(thresholds)).astype(int)
    assert m["micro_f1"] == pytest.approx(f1_score(Y, predicted, average="micro"))
    assert m["macro_f1"] == pytest.approx(f1_score(Y, predicted, average="macro"))
    assert m["exact_match_accuracy"] == pytest.approx(np.mean(np.all(predicted == Y, axis=1)))
    assert m["mean_average_precision"] == pytest.approx(
        np.mean([average_precision_score(Y[:, k], P[:, k]) for k in range(4)]))
    for key in ("mean_average_precision", "micro_f1", "macro_f1", "exact_match_accuracy"):
        low, high = m[f"{key}_ci"]
        assert low < m[key] < high and high - low < 0.3
    assert m == compute_multilabel_metrics(Y, P, CLASSES, thresholds, seed=0)  # seeded
    assert m["mean_average_precision_ci"] != compute_multilabel_metrics(
        Y, P, CLASSES, thresholds, seed=1)["mean_average_precision_ci"]
    assert m["per_class"]["dog"]["threshold"] == 0.55
    json.dumps(m)  # serialisable as it is
    with pytest.raises(DatasetError, match="same shape"):
        compute_multilabel_metrics(Y[:, :3], P, CLASSES, 0.5)


def test_clone_and_grid_search_work_with_a_multilabel_target(splits):
    (X, Y), _, (Xt, Yt) = splits
    head = make_head("logreg", C=1.0)
    copy = clone(head).fit(X, Y)
    assert copy.predict(Xt).shape == Yt.shape
    search = GridSearchCV(make_head("knn", temperature=0.07), {"k": [3, 10]}, cv=3).fit(X, Y)
    assert search.best_params_["k"] in (3, 10)
    assert search.best_estimator_.predict_proba(Xt).shape == Yt.shape


@pytest.mark.parametrize("name", ["logreg", "dense"])
def test_balanced_class_weight_works_per_class(name):
    rng = np.random.default_rng(7)
    X = rng.normal(size=(200, 10))
    Y = np.stack([rng.random(200) < 0.5, rng.random(200) < 0.06], axis=1).astype(int)
    X[:, 0] += Y[:, 0]
    X[:, 1] += 0.7 * Y[:, 1]
    params = {**FAST.get(name, {}), "C": 1.0} if name == "logreg" else FAST[name]
    plain = make_head(name, **params).fit(X, Y)
    balanced = make_head(name, class_weight="balanced", **params).fit(X, Y)
    rare = Y[:, 1] == 1
    # the rare class's positives get far higher probabilities once its few positives weigh
    # as much as its many negatives
    assert balanced.predict_proba(X)[rare, 1].mean() > plain.predict_proba(X)[rare, 1].mean() + 0.15


def test_multilabel_targets_are_checked():
    X = np.zeros((6, 3))
    with pytest.raises(DatasetError, match="only 0 and 1"):
        make_head("knn").fit(X, np.full((6, 2), 2))
    with pytest.raises(DatasetError, match="with and without"):
        make_head("knn").fit(X, np.array([[1, 0]] * 3 + [[1, 1]] * 3))
    with pytest.raises(DatasetError, match="one column per class"):
        make_head("knn").fit(X, np.array([[1, 0], [0, 1]] * 3), X, np.zeros((6, 3)))


@pytest.mark.parametrize("name", list_heads())
def test_random_labels_score_at_chance(name):
    """No score looks like learning when the labels are noise: the mean average precision
    stays at the labels' prevalence, its interval covers it, and the macro F1 at the
    thresholds chosen on val is no better than calling every class present."""
    rng = np.random.default_rng(7)

    def noise(n):
        return rng.normal(size=(n, 32)), (rng.random((n, len(CLASSES))) < 0.3).astype(int)

    (X, Y), (Xv, Yv), (Xt, Yt) = noise(240), noise(80), noise(200)
    head = make_head(name).fit(X, Y, Xv, Yv)
    metrics = compute_multilabel_metrics(Yt, head.predict_proba(Xt), CLASSES, head.thresholds_)
    prevalence = Yt.mean(axis=0)
    low, high = metrics["mean_average_precision_ci"]
    assert low <= prevalence.mean() <= high, metrics
    assert metrics["mean_average_precision"] < prevalence.mean() + 0.08
    all_positive_f1 = np.mean(2 * prevalence / (1 + prevalence))
    assert metrics["macro_f1"] < all_positive_f1 + 0.05, metrics
