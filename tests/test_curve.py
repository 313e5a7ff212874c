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
    assert "chance: accuracy 0." in printed.output and "(most frequent class)" in printed.output
    assert {float(r["accuracy_chance"]) for r in rows} == {result.chance["accuracy"]}
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


# --- the chance level and the figure ----------------------------------------------------


def figure_lines(result, n_classes):
    """The Axes of the curve's figure, before it is saved."""
    return curve_mod.curve_figure(result, n_classes, title="t").axes[0]


def chance_line(ax):
    lines = [line for line in ax.get_lines() if line.get_gid() == "chance"]
    assert len(lines) == 1 and lines[0].get_label().startswith("chance")
    return lines[0]


def test_the_figure_draws_the_majority_share_with_a_full_y_axis_and_plain_ticks():
    train = gaussian_split("train", 12, seed=3)
    test = gaussian_split("test", 5, seed=4)
    test.labels[5:12] = 0  # 12 of the 20 test images in class 0, none in class 1
    records = curve_mod.curve_records(train, test, list("abcd"), [1, 2, 3, 5, "all"], 2, ["knn"])
    assert {r["accuracy_chance"] for r in records} == {12 / 20}
    assert {r["balanced_accuracy_chance"] for r in records} == {1 / 3}  # the classes it has
    result = curve_mod.Curve(None, records, curve_mod.summarise(records), "test")
    assert result.chance == {"accuracy": 12 / 20, "balanced_accuracy": 1 / 3}
    ax = figure_lines(result, 4)
    np.testing.assert_allclose(chance_line(ax).get_ydata(), [12 / 20, 12 / 20])
    low, high = ax.get_ylim()
    assert low <= 0 and high >= 1  # noise near chance can not fill the figure
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    assert labels == ["1", "2", "3", "5", "all (12)"]  # no "2x10^0"
    assert ax.get_xticks(minor=True).size == 0


def test_the_chance_level_of_mean_average_precision_is_a_random_rankings():
    from probe import evaluate
    from probe.task import MULTI_LABEL, expected_random_average_precision

    rng = np.random.default_rng(0)
    y = np.zeros((30, 1), dtype=int)
    y[:10] = 1
    simulated = np.mean([evaluate.average_precisions(y, rng.random((30, 1)))[0] for _ in range(4000)])
    assert expected_random_average_precision(10, 30) == pytest.approx(simulated, abs=0.01)
    assert expected_random_average_precision(10, 30) > 10 / 30  # small splits: above the rate
    assert expected_random_average_precision(1000, 100_000) == pytest.approx(0.01, abs=0.001)
    assert expected_random_average_precision(3, 3) == 1.0
    Y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    ignore = np.zeros_like(Y, dtype=bool)
    ignore[3, 0] = True  # a difficult entry counts for nothing
    expected = np.mean([expected_random_average_precision(2, 3), expected_random_average_precision(1, 4)])
    assert MULTI_LABEL.chance_levels(Y, ignore) == {"mean_average_precision": pytest.approx(expected)}


# --- multi-label curves ---------------------------------------------------------------


def multilabel_split(name, n, classes=3, dim=16, seed=0, learnable=True, rate=0.35):
    """Gaussian features; each class is on a `rate` share of the images; with `learnable`
    each class shifts its images' features along its own axis."""
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, classes)) < rate).astype(np.int64)
    X = rng.normal(size=(n, dim))
    if learnable:
        X[:, :classes] += 2.5 * Y
    return Split(name, X.astype(np.float32), Y, [f"{name}/{i}.png" for i in range(n)])


def test_multilabel_subsets_hold_shots_of_each_rarest_class_and_every_class_both_ways():
    from probe.task import MULTI_LABEL

    Y = np.zeros((24, 3), dtype=int)
    Y[:10, 0] = 1  # class 0 on images 0-9
    Y[10:20, 2] = 1  # class 2 on 10-19
    Y[[0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15], 1] = 1  # class 1 only ever with a rarer class
    strata = MULTI_LABEL.curve_strata(Y)
    assert strata.tolist() == [0] * 10 + [2] * 10 + [3] * 4  # 3: no class; none is class 1's
    members = MULTI_LABEL.class_matrix(Y, 3)
    sizes = []
    for repeat, order in enumerate(curve_mod.nested_orders(strata, 12, seed=5)):
        always = curve_mod.anchors(members, order, [5, repeat])
        previous = np.array([], dtype=int)
        for shots in (1, 2, 4, "all"):
            chosen = curve_mod.subset(order, shots, always)
            counts = np.bincount(strata[chosen], minlength=4)
            assert (counts >= [min(shots if shots != "all" else 99, c) for c in (10, 0, 10, 4)]).all()
            present = members[chosen]  # every class with a positive and a negative image
            assert present.any(axis=0).all() and not present.all(axis=0).any(), (repeat, shots)
            assert set(previous) <= set(chosen)  # nested
            previous = chosen
        sizes.append(len(curve_mod.subset(order, 1, always)))
        assert len(previous) == 24
    assert min(sizes) == 3 and max(sizes) == 4  # an image of class 1 added where it lacked one


@pytest.mark.slow
def test_a_multilabel_curve_rises_from_chance_and_random_labels_stay_at_it():
    from probe.task import MULTI_LABEL

    train = multilabel_split("train", 120, seed=1)
    test = multilabel_split("test", 150, seed=2)
    records = curve_mod.curve_records(train, test, list("abc"), [1, 5, "all"], 2, ["logreg", "knn"])
    assert set(records[0]) == set(curve_mod.csv_columns(MULTI_LABEL))
    summary = {(r["head"], r["shots"]): r for r in curve_mod.summarise(records)}
    chance = MULTI_LABEL.chance_levels(test.labels)["mean_average_precision"]
    for head in ("logreg", "knn"):
        assert summary[head, "all"]["mean_average_precision"] > chance + 0.3
        assert summary[head, "all"]["mean_average_precision_chance"] == chance
    assert {r["selection"] for r in records} == {"fixed", "held-out quarter"}

    noise_train = multilabel_split("train", 120, seed=3, learnable=False)
    noise_test = multilabel_split("test", 300, seed=4, learnable=False)
    records = curve_mod.curve_records(noise_train, noise_test, list("abc"), [1, 5, "all"], 2,
                                      ["logreg", "knn"])
    chance = MULTI_LABEL.chance_levels(noise_test.labels)["mean_average_precision"]
    scores = [r["mean_average_precision"] for r in curve_mod.summarise(records)]
    assert max(abs(s - chance) for s in scores) < 0.08, (chance, scores)  # flat, at chance
    assert abs(np.mean(scores) - chance) < 0.03, (chance, scores)
    result = curve_mod.Curve(None, records, curve_mod.summarise(records), "test", task=MULTI_LABEL)
    ax = figure_lines(result, 3)
    np.testing.assert_allclose(chance_line(ax).get_ydata(), [chance, chance])
    assert ax.get_ylabel() == "mean average precision on test"


def test_selection_falls_back_to_the_fixed_protocol_when_the_fitting_part_would_lose_a_class():
    from probe.task import MULTI_LABEL, SINGLE_LABEL

    labels = np.repeat([0, 2], 8)  # class 1 has no image at all: selection still runs
    assert curve_mod.selection_split(labels, 0, SINGLE_LABEL.class_matrix(labels, 3)) is not None
    Y = np.zeros((16, 2), dtype=int)
    Y[:8, 0] = 1
    Y[8:, 1] = 1
    Y[0, 1] = 1  # class 1's only image among class 0's: held out, the fit could not learn it
    strata = MULTI_LABEL.curve_strata(Y)
    fit_part, held_out = curve_mod.selection_split(strata, 0)
    Y[:, 1] = 0
    Y[held_out[0], 1] = 1
    assert curve_mod.selection_split(strata, 0, MULTI_LABEL.class_matrix(Y, 2)) is None
    Y[:, 1] = 0
    Y[fit_part[0], 1] = Y[held_out[0], 1] = 1
    assert curve_mod.selection_split(strata, 0, MULTI_LABEL.class_matrix(Y, 2)) is not None
