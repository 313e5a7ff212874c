"""Heads as scikit-learn estimators, refit roles, the fast C sweep, bounds on parameters
and checks on saved files; parametrised over the registry."""

import json
import zipfile

import h5py
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_val_score

from probe.errors import ProbeError, RunError
from probe.heads import HEADS, LogisticHead, list_heads, load_head, make_head

# small and fast settings per head
FAST = {"logreg": {}, "dense": {"hidden_units": 8, "epochs": 15, "patience": 3, "learning_rate": 0.02}, "knn": {}}


def blobs(n=90, dim=12, classes=3, seed=0, sep=2.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * sep
    y = np.arange(n) % classes
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


@pytest.mark.parametrize("name", list_heads())
def test_clone_set_params_and_cross_validation(name):
    head = make_head(name, **FAST[name])
    twin = clone(head)
    assert twin.get_params() == head.get_params() and twin is not head
    assert twin.set_params(refit=False).refit is False and head.refit is True
    X, y = blobs()
    scores = cross_val_score(make_head(name, **FAST[name]), X, y, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.8


def test_grid_search_over_a_head_parameter():
    X, y = blobs(sep=0.4, seed=3)
    search = GridSearchCV(LogisticHead(), {"C": [1e-4, 1.0]}, cv=3).fit(X, y)
    assert search.best_params_["C"] in (1e-4, 1.0)
    assert isinstance(search.best_estimator_, LogisticHead) and hasattr(search.best_estimator_, "coef_")


@pytest.mark.parametrize("name", list_heads())
def test_refit_false_keeps_validation_out_of_the_model(name):
    X, y = blobs(n=120, seed=4)
    Xtr, ytr, Xv, yv = X[:80], y[:80], X[80:], y[80:]
    seen = {}
    for refit in (True, False):
        head = make_head(name, refit=refit, **FAST[name]).fit(Xtr, ytr, X_val=Xv, y_val=yv)
        if name == "logreg":
            seen[refit] = head.mean_
        elif name == "knn":
            seen[refit] = head.bank_.shape[0]
        else:
            seen[refit] = np.asarray(head.model_.get_layer("standardize").mean).ravel()
        assert head.summary_()
    if name == "knn":
        assert (seen[True], seen[False]) == (120, 80)
    else:
        np.testing.assert_allclose(seen[False], Xtr.mean(axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(seen[True], X.mean(axis=0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_sweep_chooses_within_half_a_point_of_the_full_grid(seed):
    X, y = blobs(n=300, dim=40, classes=4, seed=seed, sep=0.35)
    Xtr, ytr, Xv, yv = X[:200], y[:200], X[200:], y[200:]
    full = LogisticHead(sweep="full", refit=False).fit(Xtr, ytr, X_val=Xv, y_val=yv)
    fast = LogisticHead(refit=False).fit(Xtr, ytr, X_val=Xv, y_val=yv)
    best = max(r["val_accuracy"] for r in full.sweep_)
    assert len(full.sweep_) == 12 and len(fast.sweep_) < 12
    chosen = {r["C"]: r["val_accuracy"] for r in full.sweep_}[fast.C_]
    assert best - chosen <= 0.005
    # without refit the model is the sweep's own fit at the chosen C, on train only
    assert fast.score(Xv, yv) == pytest.approx({r["C"]: r["val_accuracy"] for r in fast.sweep_}[fast.C_])


@pytest.mark.parametrize("name", list_heads())
@pytest.mark.parametrize("seed", [-1, 4294967296, 1.5])
def test_seed_out_of_range_is_one_clear_error(name, seed):
    X, y = blobs(n=30)
    with pytest.raises(ProbeError, match=r"`seed` must be an integer from 0 to 4294967295"):
        make_head(name, seed=seed).fit(X, y)


@pytest.mark.parametrize("params,match", [
    ({"hidden_units": 100000000}, "hidden_units.*0 to 16384"),
    ({"epochs": 10**9}, "epochs.*1 to 10000"),
    ({"batch_size": 10**9}, "batch_size.*1 to 65536"),
    ({"learning_rate": float("nan")}, "learning_rate"),
])
def test_absurd_dense_parameters_name_the_limit(params, match):
    X, y = blobs(n=30)
    with pytest.raises(ProbeError, match=match):
        make_head("dense", **params).fit(X, y)


def test_dense_first_layer_size_is_bounded_before_building():
    X, y = np.zeros((4, 20000), dtype=np.float32), np.array([0, 1, 0, 1])
    with pytest.raises(ProbeError, match="limit is 200,000,000"):
        make_head("dense", hidden_units=16384).fit(X, y)


def test_absurd_knn_and_logistic_parameters():
    X, y = blobs(n=30)
    with pytest.raises(ProbeError, match="1 to 10000"):
        make_head("knn", k=0).fit(X, y)
    with pytest.raises(ProbeError, match="temperature"):
        make_head("knn", temperature=float("inf")).fit(X, y)
    with pytest.raises(ProbeError, match="sweep"):
        make_head("logreg", sweep="slow").fit(X, y)
    with pytest.raises(ProbeError, match="max_iter"):
        make_head("logreg", max_iter=10**9).fit(X, y)


@pytest.mark.parametrize("name", list_heads())
def test_edited_head_json_values_are_one_clear_error(name, tmp_path):
    X, y = blobs(n=45)
    make_head(name, **FAST[name]).fit(X[:30], y[:30], X_val=X[30:], y_val=y[30:]).save(tmp_path)
    meta = json.loads((tmp_path / "head.json").read_text())
    edits = [
        {"params": {**meta["params"], "seed": -1}},
        {"params": {**meta["params"], "refit": "yes"}},
        {"params": {**meta["params"], "unknown": 1}},
        {"classes": ["a", "a", "b"]},
        {"input_shape": [999]},
        {"kind": "svm"},
    ]
    if name == "dense":
        edits.append({"params": {**meta["params"], "hidden_units": 100000000}})
    if name == "logreg":
        edits.append({"C_": -3})
    for edit in edits:
        (tmp_path / "head.json").write_text(json.dumps({**meta, **edit}))
        with pytest.raises(RunError, match="head.json.*probe fit"):
            load_head(tmp_path)
    (tmp_path / "head.json").write_text(json.dumps(meta))
    assert load_head(tmp_path).summary_()


@pytest.mark.parametrize("name", list_heads())
def test_class_names_are_cross_checked_on_load(name, tmp_path):
    X, y = blobs(n=45)
    make_head(name, **FAST[name]).fit(X, y, classes=["cat", "dog", "owl"]).save(tmp_path)
    assert list(load_head(tmp_path, classes=["cat", "dog", "owl"]).class_names_) == ["cat", "dog", "owl"]
    for wrong in (["dog", "cat", "owl"], ["cat", "dog"], ["cat", "dog", "owl", "fox"]):
        with pytest.raises(RunError, match="mislabelled"):
            load_head(tmp_path, classes=wrong)


def test_dense_head_is_saved_without_optimizer_state(tmp_path):
    X, y = blobs(n=60)
    head = make_head("dense", hidden_units=64, epochs=2).fit(X, y)
    head.save(tmp_path)
    with zipfile.ZipFile(tmp_path / "head.keras") as archive:
        archive.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as weights:
        groups = []
        weights.visit(groups.append)
    assert not [g for g in groups if "optimizer" in g], groups


def test_every_head_declares_its_options():
    for name in list_heads():
        params = set(HEADS[name]().get_params())
        assert {o.param for o in HEADS[name].options} <= params
        assert "refit" in params and "seed" in params


# --------------------------------------------------------------------------- #
# Labels in, the same labels out; scikit-learn's error types
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", list_heads())
def test_any_labels_in_the_same_labels_out_and_saved(name, tmp_path):
    X, y = blobs()
    words = np.array(["owl", "cat", "dog"])[y]  # not in sorted order: classes_ is sorted
    head = make_head(name, **FAST[name]).fit(X, words, X_val=X[:30], y_val=words[:30])
    assert list(head.classes_) == ["cat", "dog", "owl"] and list(head.class_names_) == ["cat", "dog", "owl"]
    predicted = head.predict(X)
    assert set(predicted) <= {"cat", "dog", "owl"} and np.mean(predicted == words) > 0.9
    assert head.score(X, words) == np.mean(predicted == words)
    head.save(tmp_path)
    assert json.loads((tmp_path / "head.json").read_text())["labels"] == ["cat", "dog", "owl"]
    np.testing.assert_array_equal(load_head(tmp_path).predict(X), predicted)
    # other integers than 0..K-1 keep their values (and their type) through save and load
    shifted = make_head(name, **FAST[name]).fit(X, y * 10 - 5)
    assert list(shifted.classes_) == [-5, 5, 15]
    shifted.save(tmp_path / "shifted")
    loaded = load_head(tmp_path / "shifted")
    assert loaded.predict(X[:5]).dtype.kind == "i" and list(loaded.classes_) == [-5, 5, 15]


@pytest.mark.parametrize("name", list_heads())
def test_probe_fits_with_class_names_predict_indices_and_save_as_before(name, tmp_path):
    """probe passes indices and the class names apart: predictions stay indices and
    head.json has no 'labels', so it reads as every head saved before it existed."""
    X, y = blobs()
    head = make_head(name, **FAST[name]).fit(X, y, classes=["cat", "dog", "owl"])
    assert list(head.classes_) == [0, 1, 2] and list(head.class_names_) == ["cat", "dog", "owl"]
    assert head.predict(X).dtype == np.int64
    head.save(tmp_path)
    meta = json.loads((tmp_path / "head.json").read_text())
    assert meta["classes"] == ["cat", "dog", "owl"] and "labels" not in meta
    loaded = load_head(tmp_path, classes=["cat", "dog", "owl"])
    assert list(loaded.classes_) == [0, 1, 2] and loaded.predict(X).dtype == np.int64
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))


def test_edited_labels_in_head_json_are_one_clear_error(tmp_path):
    X, y = blobs()
    LogisticHead().fit(X, np.array(["a", "b", "c"])[y]).save(tmp_path)
    meta = json.loads((tmp_path / "head.json").read_text())
    (tmp_path / "head.json").write_text(json.dumps({**meta, "labels": ["a", "a", "c"]}))
    with pytest.raises(RunError, match="'labels' must be unique"):
        load_head(tmp_path)


@pytest.mark.parametrize("name", list_heads())
def test_input_errors_are_value_errors_and_unfitted_is_sklearns(name):
    from sklearn.exceptions import NotFittedError as SklearnNotFitted

    from probe.errors import DatasetError, InputError, NotFittedError

    X, y = blobs()
    with pytest.raises(SklearnNotFitted) as caught:
        make_head(name).predict(X)
    assert isinstance(caught.value, NotFittedError)
    head = make_head(name, **FAST[name])
    with pytest.raises(ValueError, match="same number of samples") as caught:
        head.fit(X, y[:-1])
    assert isinstance(caught.value, InputError) and isinstance(caught.value, DatasetError)
    with pytest.raises(ValueError, match="Unknown label type: 'continuous'"):
        head.fit(X, y + 0.5)
    head.fit(X, y)
    with pytest.raises(ValueError, match="X has 3 features, but .*Head is expecting 12 features as input"):
        head.predict(X[:, :3])
    with pytest.raises(ValueError, match="Reshape your data"):
        head.predict(X[0])


@pytest.mark.parametrize("name", list_heads())
def test_column_vector_y_warns_and_lists_work(name):
    from sklearn.exceptions import DataConversionWarning

    X, y = blobs()
    expected = make_head(name, **FAST[name]).fit(X, y).predict(X)
    with pytest.warns(DataConversionWarning, match="column-vector y"):
        column = make_head(name, **FAST[name]).fit(X, y[:, None])
    np.testing.assert_array_equal(column.predict(X), expected)
    listed = make_head(name, **FAST[name]).fit(X.tolist(), y.tolist())
    np.testing.assert_array_equal(listed.predict(X.tolist()), expected)


def test_validation_labels_unseen_in_training_are_one_clear_error():
    X, y = blobs()
    words = np.array(["cat", "dog", "owl"])[y]
    with pytest.raises(ValueError, match=r"\['fox'\] of `y_val` have none in `y`"):
        LogisticHead().fit(X, words, X_val=X[:3], y_val=["cat", "fox", "dog"])
