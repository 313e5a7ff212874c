"""Label-efficiency curves: subsets, selection inside the budget, the records and files."""

import csv
import importlib

import numpy as np
import pytest

import probe
from probe.features.cache import Split
from probe.errors import ProbeError

curve_mod = importlib.import_module("probe.curve")  # `probe.curve` itself is the function


def gaussian_split(name, n_per_class, classes=4, dim=16, seed=0, sep=1.0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, dim)) * sep
    y = np.repeat(np.arange(classes), n_per_class)
    X = (centres[y] + rng.normal(size=(y.size, dim))).astype(np.float32)
    return Split(name, X, y, [f"{name}/{i}.png" for i in range(y.size)])


def test_parse_shots():
    assert curve_mod.parse_shots("10, 1,all,5") == [1, 5, 10, "all"]
    assert curve_mod.parse_shots([2, "all"]) == [2, "all"]
    for bad in ("0", "1.5", "x", "", "-3"):
        with pytest.raises(ProbeError, match="shot count"):
            curve_mod.parse_shots(bad)


def test_subsets_are_stratified_seeded_and_nested():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    orders = curve_mod.nested_orders(labels, repeats=3, seed=7)
    again = curve_mod.nested_orders(labels, repeats=3, seed=7)
    for order, same in zip(orders, again):
        previous = np.array([], dtype=int)
        for shots in (1, 2, 5, "all"):
            chosen = curve_mod.subset(order, shots)
            np.testing.assert_array_equal(chosen, curve_mod.subset(same, shots))  # seeded
            counts = np.bincount(labels[chosen], minlength=3)
            expected = [c if shots == "all" else min(shots, c) for c in (10, 3, 7)]
            assert counts.tolist() == expected  # stratified; a short class gives all it has
            assert set(previous) <= set(chosen)  # nested across shot counts
            previous = chosen
    assert not all(np.array_equal(curve_mod.subset(orders[0], 2), curve_mod.subset(o, 2)) for o in orders[1:])


def test_selection_uses_a_held_out_part_of_the_subset_or_the_fixed_protocol():
    assert curve_mod.selection_split(np.array([0, 0, 0, 1, 1, 1]), 0) is None
    labels = np.repeat([0, 1, 2], 8)
    fit_part, held_out = curve_mod.selection_split(labels, 0)
    assert sorted(np.concatenate([fit_part, held_out])) == list(range(24))
    assert np.bincount(labels[held_out]).tolist() == [2, 2, 2]


def test_heads_only_ever_see_the_training_subset(monkeypatch):
    train, test = gaussian_split("train", 12), gaussian_split("test", 5, seed=1)
    seen = []
    original = probe.heads.make_head

    def spying(name, **params):
        head = original(name, **params)
        fit = head.fit

        def recording_fit(X, y, X_val=None, y_val=None, classes=None):
            seen.append(X)
            if X_val is not None:
                seen.append(X_val)
            return fit(X, y, X_val=X_val, y_val=y_val, classes=classes)

        head.fit = recording_fit
        return head

    monkeypatch.setattr(curve_mod.heads_mod, "make_head", spying)
    records = curve_mod.curve_records(train, test, ["a", "b", "c", "d"], [1, 5, "all"], 2,
                                      ["logreg", "knn"])
    train_rows = {row.tobytes() for row in train.features}
    assert seen and all(row.tobytes() in train_rows for X in seen for row in X)
    assert {r["selection"] for r in records} == {"fixed", "held-out quarter"}
    assert [r["n_train"] for r in records if r["repeat"] == 0 and r["head"] == "knn"] == [4, 20, 48]


def test_accuracy_rises_with_shots_on_a_learnable_set():
    train, test = gaussian_split("train", 40, sep=0.45), gaussian_split("test", 40, seed=1, sep=0.45)
    records = curve_mod.curve_records(train, test, list("abcd"), [1, 10, "all"], 3, ["logreg", "knn"])
    summary = {(r["head"], r["shots"]): r["accuracy"] for r in curve_mod.summarise(records)}
    for head in ("logreg", "knn"):
        assert summary[(head, 1)] < summary[(head, 10)] < summary[(head, "all")]
        assert summary[(head, "all")] > 0.6


def test_curve_writes_csv_and_png_and_the_cli_prints_the_table(separable_cache):
    from click.testing import CliRunner

    from probe.cli import main

    result = probe.curve(separable_cache, shots="1,2,all", repeats=2, heads="logreg,knn")
    rows = list(csv.DictReader(open(result.path / "curve.csv", encoding="utf-8")))
    assert len(rows) == 3 * 2 * 2 and rows[0]["split"] == "test"
    assert set(rows[0]) == set(curve_mod.CSV_COLUMNS)
    assert (result.path / "curve.png").stat().st_size > 1000
    assert {r["head"] for r in result.summary} == {"logreg", "knn"}

    printed = CliRunner().invoke(main, ["curve", "--shots", "1,all", "--repeats", "2", "--heads", "knn"])
    assert printed.exit_code == 0, printed.output
    assert "test accuracy" in printed.output and "±" in printed.output and "Run:" in printed.output
    refused = CliRunner().invoke(main, ["curve", "--shots", "0"])
    assert refused.exit_code == 1 and "shot count" in refused.output and "Traceback" not in refused.output


def test_records_do_not_depend_on_the_number_of_threads(monkeypatch):
    train, test = gaussian_split("train", 12), gaussian_split("test", 5, seed=1)
    params = {"dense": {"hidden_units": 8, "epochs": 5}}

    def records(workers):
        monkeypatch.setattr(curve_mod, "curve_workers", lambda: workers)
        return curve_mod.curve_records(train, test, list("abcd"), [1, 5, "all"], 2,
                                       ["logreg", "knn", "dense"], head_params=params)

    one, three = records(1), records(3)
    assert [(r["head"], r["shots"], r["repeat"]) for r in one] == [
        (h, s, rep) for rep in range(2) for s in (1, 5, "all") for h in ("logreg", "knn", "dense")]
    assert one == three
