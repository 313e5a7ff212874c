"""Paired significance tests (probe.significance) against hand computations and scipy, and
the paired tests of `probe.compare.rank` on fixed predictions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from probe import evaluate
from probe.compare import RowPredictions, chance_levels, rank
from probe.errors import ProbeError
from probe.significance import format_p, holm, mcnemar_exact, paired_bootstrap_p
from probe.task import MULTI_LABEL, SINGLE_LABEL


# --- McNemar ----------------------------------------------------------------------------


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(0, 0) == 1.0  # no discordant image: no evidence
    assert mcnemar_exact(1, 0) == 1.0  # 2 * P(X <= 0), X ~ Bin(1, 1/2) = 2 * 1/2
    assert mcnemar_exact(5, 5) == 1.0
    # b=10, c=2: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096, rel=1e-12)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)  # two-sided
    assert mcnemar_exact(12, 0) == pytest.approx(2 / 4096, rel=1e-12)
    # thousands of discordant images: no underflow to 0 or overflow
    assert 0 < mcnemar_exact(2000, 1800) < 0.01
    with pytest.raises(ProbeError, match="discordant"):
        mcnemar_exact(-1, 3)


def test_mcnemar_exact_equals_scipys_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    for b in range(0, 25):
        for c in range(0, 25, 3):
            if b + c == 0:
                continue
            expected = stats.binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
            assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-15), (b, c)
    for b, c in ((2000, 1800), (700, 400), (1500, 1490)):  # summed in logarithms
        expected = stats.binomtest(min(b, c), b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9), (b, c)


# --- Holm ---------------------------------------------------------------------------------


def test_holm_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max so far 0.06
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted.tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0]  # capped at 1
    assert holm([0.2]).tolist() == [0.2]  # one test: nothing to correct
    assert holm([]).size == 0
    raw = np.random.default_rng(0).uniform(size=20)
    assert np.all(holm(raw) >= raw)
    with pytest.raises(ProbeError, match="p-values"):
        holm([0.1, 1.5])


# --- the paired bootstrap -----------------------------------------------------------------


def _two_rows(n: int = 200, extra_wrong: int = 12):
    """Truth of two balanced classes, a row right on 85% of the images and a second row
    equal to it but wrong on `extra_wrong` more images (a consistent handful)."""
    truth = np.arange(n) % 2
    first = truth.copy()
    first[np.arange(0, n, 7)[: int(0.15 * n)]] ^= 1  # 15% wrong
    second = first.copy()
    right = np.flatnonzero(first == truth)
    second[right[:extra_wrong]] ^= 1
    return truth, first, second


def _proba(predicted: np.ndarray, k: int = 2) -> np.ndarray:
    return np.eye(k)[predicted] * 0.8 + 0.2 / k


def test_a_consistent_handful_of_images_is_significant_although_the_intervals_overlap():
    truth, first, second = _two_rows()
    ours, theirs = (evaluate.compute_metrics(truth, _proba(p), ["a", "b"]) for p in (first, second))
    for key in ("accuracy_ci", "balanced_accuracy_ci", "macro_f1_ci"):
        assert ours[key][0] <= theirs[key][1], key  # the intervals overlap ...
    for metric in ("balanced_accuracy", "macro_f1"):
        # ... but the second row is wrong on 12 images more and never right where the
        # first is wrong: a paired test sees it
        p = paired_bootstrap_p(metric, truth, first, second, seed=0)
        assert p < 0.05, metric
        assert p >= 2 / 1001  # never below what 1000 resamples can show
        assert paired_bootstrap_p(metric, truth, second, first, seed=0) == p  # two-sided
    assert mcnemar_exact(12, 0) < 0.05


def test_identical_predictions_give_p_one():
    truth, first, _ = _two_rows()
    for metric in ("balanced_accuracy", "macro_f1"):
        assert paired_bootstrap_p(metric, truth, first, first.copy(), seed=3) == 1.0
    labels = np.random.default_rng(0).integers(0, 2, (40, 3))
    scores = np.random.default_rng(1).uniform(size=(40, 3))
    assert paired_bootstrap_p("mean_average_precision", labels, scores, scores.copy()) == 1.0


def test_mean_average_precision_bootstrap_finds_a_better_ranking():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (120, 3))
    good = labels * 0.6 + rng.uniform(0, 0.4, labels.shape)  # ranks positives first
    noise = rng.uniform(size=labels.shape)
    assert paired_bootstrap_p("mean_average_precision", labels, good, noise, seed=0) < 0.01
    # the ignored entries are left out, as in the metrics: ignoring every entry where the
    # two differ makes them equal
    same = good.copy()
    same[:, 0] = noise[:, 0]
    ignore = np.zeros(labels.shape, dtype=bool)
    ignore[:, 0] = True
    assert paired_bootstrap_p("mean_average_precision", labels, good, same, ignore=ignore) == 1.0
    with pytest.raises(ProbeError, match="metric"):
        paired_bootstrap_p("accuracy", labels, good, noise)


def test_format_p():
    assert [format_p(v) for v in (None, math.nan, 0.0004, 0.04, 1.0)] == [
        "-", "-", "<0.001", "0.040", "1.000"]


# --- rank: the paired tests of a comparison -------------------------------------------------


def _single(truth, predicted, paths=None, split="test", classes=("a", "b")):
    paths = tuple(paths or (f"img_{i:03d}.png" for i in range(len(truth))))
    return RowPredictions(split, tuple(classes), paths, np.asarray(truth),
                          np.asarray(predicted), _proba(np.asarray(predicted), len(classes)))


def _row(name, accuracy, f1=0.5):
    return {"backbone": name, "head": "logreg", "status": "ok", "accuracy": accuracy,
            "macro_f1": f1, "accuracy_ci": [accuracy - 0.1, accuracy + 0.1], "run": f"/runs/{name}"}


def test_rank_tests_every_row_against_the_best_on_the_same_images():
    truth, first, second = _two_rows()
    shuffled = np.random.default_rng(0).permutation(truth.size)
    paths = [f"img_{i:03d}.png" for i in range(truth.size)]
    predictions = {
        "/runs/a": _single(truth, first),
        "/runs/b": _single(truth, second),  # 12 images worse: "no"
        # the best's predictions on the same images in another order: aligned by path
        "/runs/c": _single(truth[shuffled], first[shuffled], [paths[i] for i in shuffled]),
        "/runs/d": _single(truth, first, split="val"),  # another split
        "/runs/e": _single(truth[:-1], first[:-1]),  # another image set
    }
    accuracy = {name: float(np.mean(p.correct())) for name, p in
                zip("abcde", predictions.values())}
    records = [_row(name, accuracy[name], f1=0.9 if name == "a" else 0.5) for name in "abcde"]
    records.append({"backbone": "f", "head": "logreg", "status": "failed"})
    ranked = {r["backbone"]: r for r in rank(records, SINGLE_LABEL, predictions=predictions)}
    assert ranked["a"]["tied"] == "best" and ranked["a"]["p_value_vs_best"] is None
    assert ranked["c"]["tied"] == "yes" and ranked["c"]["p_value_vs_best"] == 1.0
    assert ranked["b"]["tied"] == "no"
    # Holm over the 3 pairs of a, b, c (a-b and c-b: McNemar of 12 against 0; a-c: 1):
    # the smallest p-value times 3
    assert ranked["b"]["p_value_vs_best"] == pytest.approx(3 * mcnemar_exact(12, 0))
    for name in "def":
        assert ranked[name]["tied"] == "not comparable" and ranked[name]["p_value_vs_best"] is None
    # without predictions nothing can be compared image by image
    alone = rank([_row("a", 0.9), _row("b", 0.8)], SINGLE_LABEL)
    assert [r["tied"] for r in alone] == ["best", "not comparable"]


def test_other_labels_on_the_same_paths_are_not_the_same_images():
    truth, first, _ = _two_rows(n=20)
    relabelled = truth.copy()
    relabelled[0] ^= 1
    best = _single(truth, first)
    assert best.aligned(_single(relabelled, first)) is None
    assert best.aligned(_single(truth, first, classes=("a", "c"))) is None
    assert best.aligned(_single(truth, first)).tolist() == list(range(20))


def test_random_predictions_are_tied_with_the_best_at_the_nominal_rate():
    """Rows of predictions that know nothing of the labels, ranked and tested 300 times
    for each number of rows: a comparison with any false "no" (significantly worse than
    the best) at most at the nominal 5%, although the best is the luckiest of the rows
    (Holm over the pairs with the best alone gives 10% with 12 rows)."""
    rng = np.random.default_rng(0)
    for count in (2, 6, 12):
        false = 0
        for _ in range(300):
            truth = rng.integers(0, 2, 60)
            rows = {f"/runs/{k}": _single(truth, rng.integers(0, 2, 60)) for k in range(count)}
            records = [_row(str(k), float(np.mean(p.correct())))
                       for k, p in enumerate(rows.values())]
            ranked = rank(records, SINGLE_LABEL, predictions=rows)
            assert all(r["tied"] in ("best", "yes", "no") for r in ranked)
            false += any(r["tied"] == "no" for r in ranked)
        assert false / 300 <= 0.05, (count, false)


def test_multilabel_rank_uses_the_paired_bootstrap_of_mean_average_precision():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (120, 3))
    good = labels * 0.6 + rng.uniform(0, 0.4, labels.shape)
    noise = rng.uniform(size=labels.shape)
    paths = tuple(f"{i}.jpg" for i in range(120))
    rows = {f"/runs/{name}": RowPredictions("test", ("x", "y", "z"), paths, labels,
                                            np.full(120, -1), scores)
            for name, scores in (("good", good), ("noise", noise), ("copy", good.copy()))}
    records = [{"backbone": name, "head": "logreg", "status": "ok", "run": f"/runs/{name}",
                "mean_average_precision": evaluate.mean_average_precision(labels, p.scores),
                "macro_f1": 0.5} for name, p in zip(("good", "noise", "copy"), rows.values())]
    ranked = rank(records, MULTI_LABEL, predictions=rows, seed=0)
    assert [(r["backbone"], r["tied"]) for r in ranked] == [
        ("good", "best"), ("copy", "yes"), ("noise", "no")]
    assert ranked[1]["p_value_vs_best"] == 1.0 and ranked[2]["p_value_vs_best"] < 0.05


def test_chance_levels_of_the_reported_images():
    row = _single([0, 0, 0, 1], [0, 1, 0, 1], classes=("a", "b", "c"))
    assert chance_levels(row, SINGLE_LABEL) == {"accuracy": 0.75, "balanced_accuracy": 0.5}
    labels = np.array([[1, 0], [0, 0], [1, 1], [0, 0]])
    ignore = np.array([[False, False], [False, True], [False, False], [False, False]])
    multi = RowPredictions("test", ("x", "y"), ("1", "2", "3", "4"), labels, np.full(4, -1),
                           labels * 0.5, ignore)
    # x: 2 positives of 4 entries; y: 1 of 3 (one ignored). A random ranking's expected
    # average precision: x, positives at ranks (1,2) (1,3) (1,4) (2,3) (2,4) (3,4): AP 1,
    # 5/6, 3/4, 7/12, 1/2, 5/12; y, the positive at rank 1, 2 or 3: AP 1, 1/2 or 1/3
    x, y = (1 + 5 / 6 + 3 / 4 + 7 / 12 + 1 / 2 + 5 / 12) / 6, (1 + 1 / 2 + 1 / 3) / 3
    assert chance_levels(multi, MULTI_LABEL) == {"mean_average_precision": pytest.approx((x + y) / 2)}
    assert chance_levels(None, SINGLE_LABEL) == {}


def test_predictions_are_read_back_from_each_run(tmp_path: Path):
    from probe.compare import read_predictions

    run = tmp_path / "run"
    run.mkdir()
    (run / "test_predictions.csv").write_text(
        "path,true,predicted,a,b\nx.png,a,a,0.9,0.1\ny.png,b,a,0.6,0.4\n", encoding="utf-8")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "test_predictions.csv").write_text("path,true,predicted,a,b\nx.png,z,a,1,0\n")
    records = [{"status": "ok", "run": str(run), "split": "test"},
               {"status": "ok", "run": str(broken), "split": "test"},
               {"status": "ok", "run": str(tmp_path / "missing"), "split": "test"},
               {"status": "failed", "run": None}]
    found = read_predictions(records, SINGLE_LABEL)
    assert list(found) == [str(run)]  # a row without readable predictions is left out
    row = found[str(run)]
    assert row.paths == ("x.png", "y.png") and row.truth.tolist() == [0, 1]
    assert row.correct().tolist() == [True, False] and row.split == "test"
