"""Tests of probe.heads on small synthetic feature sets."""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from probe.errors import DatasetError, NotFittedError, ProbeError, RunError
from probe.heads import HEADS, DenseHead, KNNHead, LogisticHead, load_head, make_head

# Small and fast settings for the Keras head.
FAST_DENSE = dict(hidden_units=32, epochs=30, batch_size=32, patience=5, learning_rate=3e-3)


def clusters(n_per_class=60, n_classes=3, dim=64, sep=3.0, seed=0, counts=None):
    """Gaussian clusters around random centres, shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * sep
    counts = counts or [n_per_class] * n_classes
    y = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    X = centres[y] + rng.normal(size=(y.size, dim))
    order = rng.permutation(y.size)
    return X[order].astype(np.float32), y[order]


def split(X, y, fractions=(0.5, 0.25)):
    """Stratified train / val / test split."""
    rng = np.random.default_rng(1)
    parts = ([], [], [])
    for k in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == k))
        a = int(len(idx) * fractions[0])
        b = a + int(len(idx) * fractions[1])
        for part, sl in zip(parts, (idx[:a], idx[a:b], idx[b:])):
            part.append(sl)
    out = []
    for part in parts:
        idx = np.concatenate(part)
        out += [X[idx], y[idx]]
    return out


@pytest.fixture(scope="module")
def data():
    return split(*clusters())


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- #
# Learning
# --------------------------------------------------------------------------- #


def test_logistic_learns_separable_clusters(data):
    Xtr, ytr, Xv, yv, Xte, yte = data
    head = LogisticHead().fit(Xtr, ytr, X_val=Xv, y_val=yv, classes=["cat", "dog", "owl"])
    assert head.score(Xte, yte) > 0.95
    proba = head.predict_proba(Xte)
    assert proba.shape == (len(yte), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    assert list(head.class_names_) == ["cat", "dog", "owl"]
    assert list(head.classes_) == [0, 1, 2]  # fitted with `classes`: y holds indices
    assert head.n_features_in_ == 64
    assert head.predict(Xte).dtype.kind == "i"


def test_dense_learns_separable_clusters(data):
    Xtr, ytr, Xv, yv, Xte, yte = data
    head = DenseHead(**FAST_DENSE).fit(Xtr, ytr, X_val=Xv, y_val=yv)
    assert head.score(Xte, yte) > 0.95
    assert list(head.class_names_) == ["0", "1", "2"]
    assert list(head.classes_) == [0, 1, 2]
    assert set(head.history_) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(head.history_["loss"]) == len(head.history_["val_loss"]) >= 1
    assert head.model_.output_shape == (None, 3)


@pytest.mark.parametrize("make", [lambda: LogisticHead(), lambda: DenseHead(**FAST_DENSE)])
def test_shuffled_labels_give_chance_accuracy(make):
    rng = np.random.default_rng(5)
    X, y = clusters(n_per_class=100, seed=3)
    y = rng.permutation(y)  # labels no longer depend on the features
    Xtr, ytr, Xv, yv, Xte, yte = split(X, y)
    head = make().fit(Xtr, ytr, X_val=Xv, y_val=yv)
    # 75 test samples, chance is 1/3; 0.6 is far above what noise gives.
    assert head.score(Xte, yte) < 0.6


def test_sweep_picks_c_with_best_validation_accuracy():
    # Overlapping clusters so that C matters.
    X, y = clusters(sep=0.25, seed=2)
    Xtr, ytr, Xv, yv, _, _ = split(X, y)
    Cs = np.logspace(-4, 2, 7)
    head = LogisticHead(Cs=Cs, sweep="full").fit(Xtr, ytr, X_val=Xv, y_val=yv)

    # The full sweep goes from small to large C, each fit warm-started from the previous one.
    scaler = StandardScaler().fit(Xtr)
    accs = []
    model = LogisticRegression(max_iter=1000, warm_start=True, tol=1e-3)  # the sweep tolerance
    for C in Cs:
        model.set_params(C=C).fit(scaler.transform(Xtr), ytr)
        accs.append(np.mean(model.predict(scaler.transform(Xv)) == yv))
    assert len(set(np.round(accs, 6))) > 1, "the data should make C matter"
    best = max(accs)
    chosen = accs[list(Cs).index(head.C_)]
    assert chosen == pytest.approx(best)
    assert [r["C"] for r in head.sweep_] == pytest.approx(list(Cs))
    assert [r["val_accuracy"] for r in head.sweep_] == pytest.approx(accs)
    assert head.history_["C"] == pytest.approx(list(Cs))
    # Ties on accuracy are broken by the lower validation log loss.
    ties = [r for r in head.sweep_ if r["val_accuracy"] == pytest.approx(best)]
    assert head.C_ == min(ties, key=lambda r: r["val_log_loss"])["C"]


def test_logistic_refits_on_train_plus_validation(data):
    Xtr, ytr, Xv, yv, Xte, _ = data
    head = LogisticHead(C=0.1).fit(Xtr, ytr, X_val=Xv, y_val=yv)
    assert head.sweep_ == []
    X_all, y_all = np.concatenate([Xtr, Xv]), np.concatenate([ytr, yv])
    scaler = StandardScaler().fit(X_all)
    ref = LogisticRegression(C=0.1, max_iter=1000).fit(scaler.transform(X_all), y_all)
    np.testing.assert_allclose(head.predict_proba(Xte), ref.predict_proba(scaler.transform(Xte)), atol=1e-6)


def test_logistic_without_validation_uses_c_one(data):
    Xtr, ytr, _, _, Xte, _ = data
    head = LogisticHead().fit(Xtr, ytr)
    assert head.C_ == 1.0
    scaler = StandardScaler().fit(Xtr)
    ref = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(Xtr), ytr)
    np.testing.assert_allclose(head.predict_proba(Xte), ref.predict_proba(scaler.transform(Xte)), atol=1e-6)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_dense_weights_fold_equals_predict_proba(n_classes):
    X, y = clusters(n_per_class=30, n_classes=n_classes, sep=0.5, seed=n_classes)
    X = X * 5 + 3  # non-trivial standardisation
    head = LogisticHead(C=0.5).fit(X, y)
    assert head.coef_.shape[0] == (1 if n_classes == 2 else n_classes)
    W, b = head.dense_weights()
    assert W.shape == (64, n_classes) and b.shape == (n_classes,)
    np.testing.assert_allclose(softmax(X.astype(np.float64) @ W + b), head.predict_proba(X), atol=1e-9)


def test_spatial_features_are_flattened():
    X, y = clusters(n_per_class=40, dim=32, sep=3.0, seed=4)
    Xs = X.reshape(-1, 2, 2, 8)
    Xtr, ytr, Xv, yv, Xte, yte = split(Xs, y)
    for head in (LogisticHead(), DenseHead(**FAST_DENSE)):
        head.fit(Xtr, ytr, X_val=Xv, y_val=yv)
        assert head.input_shape_ == (2, 2, 8)
        assert head.n_features_in_ == 32
        assert head.score(Xte, yte) > 0.9
        # the flattened form is accepted too and gives the same answer
        np.testing.assert_allclose(head.predict_proba(Xte), head.predict_proba(Xte.reshape(len(Xte), -1)))
        with pytest.raises(DatasetError, match="per-sample shape"):
            head.predict_proba(Xte[:, :1])


def test_dense_same_seed_is_repeatable(data):
    Xtr, ytr, Xv, yv, Xte, _ = data
    a = DenseHead(**FAST_DENSE, seed=7).fit(Xtr, ytr, X_val=Xv, y_val=yv).predict_proba(Xte)
    b = DenseHead(**FAST_DENSE, seed=7).fit(Xtr, ytr, X_val=Xv, y_val=yv).predict_proba(Xte)
    np.testing.assert_array_equal(a, b)


def test_dense_without_hidden_layer(data):
    Xtr, ytr, _, _, Xte, yte = data
    head = DenseHead(hidden_units=0, epochs=20, learning_rate=1e-2).fit(Xtr, ytr)
    assert [layer.name for layer in head.model_.layers] == ["features", "standardize", "predictions"]
    assert "val_loss" not in head.history_
    assert len(head.history_["loss"]) == 20
    assert head.score(Xte, yte) > 0.9


@pytest.mark.parametrize("make", [lambda: LogisticHead(C=1.0), lambda: DenseHead(**FAST_DENSE)])
def test_balanced_class_weight_changes_fit(make):
    # Imbalanced and overlapping: the minority class gains recall when balanced.
    X, y = clusters(n_classes=2, sep=0.2, seed=6, counts=[150, 15])
    plain = make().fit(X, y)
    balanced = make()
    balanced.class_weight = "balanced"
    balanced.fit(X, y)
    p_plain, p_bal = plain.predict_proba(X), balanced.predict_proba(X)
    assert not np.allclose(p_plain, p_bal, atol=1e-3)
    minority = y == 1
    assert p_bal[minority, 1].mean() > p_plain[minority, 1].mean()


# --------------------------------------------------------------------------- #
# Persistence
# --------------------------------------------------------------------------- #


def test_logistic_save_load_round_trip(data, tmp_path):
    Xtr, ytr, Xv, yv, Xte, _ = data
    head = LogisticHead().fit(Xtr, ytr, X_val=Xv, y_val=yv, classes=["a", "b", "c"])
    head.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["head.json", "head.npz"]
    meta = json.loads((tmp_path / "run" / "head.json").read_text())
    assert meta["kind"] == "logreg"
    with np.load(tmp_path / "run" / "head.npz", allow_pickle=False) as npz:
        assert all(npz[k].dtype.kind == "f" for k in npz.files)
    for loaded in (LogisticHead.load(tmp_path / "run"), load_head(tmp_path / "run")):
        assert isinstance(loaded, LogisticHead)
        np.testing.assert_array_equal(loaded.predict_proba(Xte), head.predict_proba(Xte))
        assert list(loaded.class_names_) == ["a", "b", "c"]
        assert list(loaded.classes_) == [0, 1, 2]
        assert loaded.C_ == head.C_
        assert loaded.sweep_ == head.sweep_
        np.testing.assert_array_equal(loaded.dense_weights()[0], head.dense_weights()[0])


def test_dense_save_load_round_trip(data, tmp_path):
    Xtr, ytr, Xv, yv, Xte, _ = data
    head = DenseHead(**FAST_DENSE).fit(Xtr, ytr, X_val=Xv, y_val=yv)
    head.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["head.json", "head.keras"]
    loaded = load_head(tmp_path / "run")
    assert isinstance(loaded, DenseHead)
    np.testing.assert_allclose(loaded.predict_proba(Xte), head.predict_proba(Xte), atol=1e-6)
    assert loaded.history_ == head.history_
    assert loaded.get_params() == head.get_params()


def test_tampered_head_files_raise(data, tmp_path):
    Xtr, ytr, _, _, _, _ = data
    DenseHead(hidden_units=8, epochs=2).fit(Xtr, ytr).save(tmp_path / "dense")
    (tmp_path / "dense" / "head.keras").write_bytes(b"not a keras archive")
    with pytest.raises(RunError, match=r"head\.keras.*probe fit"):
        load_head(tmp_path / "dense")

    LogisticHead().fit(Xtr, ytr).save(tmp_path / "logreg")
    (tmp_path / "logreg" / "head.npz").write_bytes(b"garbage")
    with pytest.raises(RunError, match=r"head\.npz.*probe fit"):
        load_head(tmp_path / "logreg")

    (tmp_path / "logreg" / "head.json").write_text("{ not json")
    with pytest.raises(RunError, match=r"head\.json.*probe fit"):
        load_head(tmp_path / "logreg")

    with pytest.raises(RunError, match="probe fit"):
        load_head(tmp_path / "missing")


def test_npz_with_wrong_shapes_is_rejected(data, tmp_path):
    Xtr, ytr, _, _, _, _ = data
    head = LogisticHead().fit(Xtr, ytr)
    head.save(tmp_path)
    np.savez(tmp_path / "head.npz", mean=head.mean_[:3], scale=head.scale_, coef=head.coef_, intercept=head.intercept_)
    with pytest.raises(RunError, match="shape"):
        LogisticHead.load(tmp_path)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("cls", [LogisticHead, DenseHead])
def test_single_class_raises(cls):
    X = np.zeros((10, 4))
    with pytest.raises(DatasetError, match="at least 2 classes; got only one class: 'cat'"):
        cls().fit(X, np.zeros(10, dtype=int), classes=["cat", "dog"])


@pytest.mark.parametrize("cls", [LogisticHead, DenseHead])
def test_class_missing_from_validation_raises(cls):
    X, y = clusters(n_per_class=10, dim=4)
    Xv, yv = X[y != 2], y[y != 2]
    with pytest.raises(DatasetError, match=r"'owl'.*validation.*(more images|split seed)"):
        cls().fit(X, y, X_val=Xv, y_val=yv, classes=["cat", "dog", "owl"])


@pytest.mark.parametrize("cls", [LogisticHead, DenseHead])
def test_predict_before_fit_raises(cls):
    head = cls()
    for method in (head.predict, head.predict_proba):
        with pytest.raises(NotFittedError, match="not fitted"):
            method(np.zeros((2, 4)))
    with pytest.raises(AttributeError):  # NotFittedError is also an AttributeError
        head.save("unused")
    assert not hasattr(head, "classes_")


def test_bad_inputs_raise():
    X, y = clusters(n_per_class=10, dim=4)
    with pytest.raises(DatasetError, match="same number of samples"):
        LogisticHead().fit(X, y[:-1])
    Xn = X.copy()
    Xn[3, 1] = np.nan
    with pytest.raises(DatasetError, match="NaN"):
        LogisticHead().fit(Xn, y)
    with pytest.raises(DatasetError, match="NaN"):
        DenseHead().fit(X, y, X_val=Xn, y_val=y)
    with pytest.raises(DatasetError, match="both"):
        LogisticHead().fit(X, y, X_val=X)
    with pytest.raises(DatasetError, match="no training samples|none in the training"):
        LogisticHead().fit(X, y, classes=["a", "b", "c", "d"])
    with pytest.raises(ProbeError, match="class_weight"):
        DenseHead(class_weight="auto").fit(X, y)
    with pytest.raises(ProbeError, match="dropout"):
        DenseHead(dropout=1.5).fit(X, y)


def test_registry_and_unknown_head():
    assert dict(HEADS) == {"logreg": LogisticHead, "dense": DenseHead, "knn": KNNHead}
    head = make_head("dense", hidden_units=8)
    assert isinstance(head, DenseHead) and head.hidden_units == 8
    assert isinstance(make_head("logreg", C=2.0), LogisticHead)
    with pytest.raises(ProbeError, match=r"expected one of: dense, knn, logreg\. Received: head='svm'"):
        make_head("svm")
    with pytest.raises(ProbeError, match="hidden"):
        make_head("logreg", hidden_units=3)


def test_constructor_only_stores_arguments():
    head = DenseHead(dropout=7, epochs=-1)  # invalid values are reported by fit, not here
    assert head.dropout == 7 and head.epochs == -1
    assert "DenseHead(" in repr(head)


def test_numpy_parameters_are_saved_as_json(data, tmp_path):
    Xtr, ytr, _, _, Xte, _ = data
    head = LogisticHead(C=np.float32(0.5), max_iter=np.int64(500)).fit(Xtr, ytr)
    head.save(tmp_path)
    loaded = load_head(tmp_path)
    assert loaded.C == 0.5 and loaded.max_iter == 500
    np.testing.assert_array_equal(loaded.predict_proba(Xte), head.predict_proba(Xte))


def test_dense_head_standardises_tiny_scale_features():
    # Features whose spread is a thousand times smaller than their offset, as random-weight
    # backbones give: without standardisation Adam barely moves in 20 epochs.
    X, y = clusters(sep=3.0, seed=8)
    X = 5.0 + X * 1e-3
    head = DenseHead(epochs=20, seed=0).fit(X[:150], y[:150])
    assert head.score(X[150:], y[150:]) > 0.9
    standardised = head.model_.get_layer("standardize")(X[:150].astype("float32"))
    np.testing.assert_allclose(np.asarray(standardised).mean(axis=0), 0, atol=1e-2)


@pytest.mark.parametrize("name", ["logreg", "knn", "dense"])
def test_validation_proba_is_the_train_only_models_on_val(name):
    """`validation_proba_` of a head refit on train + val holds what its train-only model,
    chosen on val, predicts for val: the temperature of a run is fitted on it."""
    from probe.heads import make_head

    rng = np.random.default_rng(0)
    X, X_val = rng.normal(size=(60, 12)), rng.normal(size=(30, 12))
    y, y_val = rng.integers(0, 3, 60), rng.integers(0, 3, 30)
    X[:, 0] += 1.5 * y  # some signal, far from separable, so the settings matter
    X_val[:, 0] += 1.5 * y_val
    params = {"epochs": 5} if name == "dense" else {}
    refit = make_head(name, **params).fit(X, y, X_val=X_val, y_val=y_val)
    train_only = make_head(name, refit=False, **params).fit(X, y, X_val=X_val, y_val=y_val)
    tolerance = 2e-2 if name == "logreg" else 1e-6  # logreg: the sweep's looser tolerance
    np.testing.assert_allclose(refit.validation_proba_, train_only.predict_proba(X_val), atol=tolerance)
    assert np.abs(refit.predict_proba(X_val) - refit.validation_proba_).max() > 1e-3
    assert make_head(name, **params).fit(X, y).validation_proba_ is None
