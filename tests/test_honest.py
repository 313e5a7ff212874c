"""Honest numbers: on random labels no reported score may be above chance by more than its
confidence interval allows, on every dataset layout and with every head; the reported split
is never data the scored model was fit on; scores from validation are labelled as such."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import probe
from conftest import make_image
from probe import calibration
from probe.cli import main

N_IMAGES = 150  # enough that an honest interval is narrower than the gap to a leaked score
CLASSES = ("a", "b")
# every head; a weakly regularised logistic head as well, which memorises whatever it is fit
# on: were the reported images among them, its score would be far above chance
HEADS = {"logreg": ("logreg", {}), "logreg-C1000": ("logreg", {"C": 1000.0}),
         "dense": ("dense", {"epochs": 20, "hidden_units": 32})}


def _random_labels(seed: int = 0) -> list[str]:
    """Random labels, independent of the (random) pixels."""
    rng = np.random.default_rng(seed)
    return [CLASSES[k] for k in rng.integers(0, len(CLASSES), N_IMAGES)]


def _split_for(i: int, splits: tuple[str, ...]) -> str:
    """Splits in fixed shares: 60% train, then val and/or test."""
    if i < 0.6 * N_IMAGES or len(splits) == 1:
        return "train"
    rest = splits[1:]
    return rest[0] if len(rest) == 1 or i < 0.8 * N_IMAGES else rest[1]


def _csv_layout(root: Path, splits: tuple[str, ...]) -> Path:
    """Images in one flat folder, labels and splits in a CSV."""
    rows = []
    for i, label in enumerate(_random_labels()):
        make_image(root / "images" / f"img_{i:03d}.png", seed=1000 + i, size=(20, 20))
        rows.append({"path": f"images/img_{i:03d}.png", "label": label,
                     "split": _split_for(i, splits)})
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return labels


def _folder_layout(root: Path, splits: tuple[str, ...] | None) -> None:
    """Class folders, under split folders when `splits` is given."""
    for i, label in enumerate(_random_labels()):
        folder = root / _split_for(i, splits) / label if splits else root / label
        make_image(folder / f"img_{i:03d}.png", seed=1000 + i, size=(20, 20))


LAYOUTS = {
    "train+val in a CSV": lambda root: _csv_layout(root, ("train", "val")),
    "train/ and test/ folders": lambda root: _folder_layout(root, ("train", "test")),
    "flat class folders": lambda root: _folder_layout(root, None),
    "train+val+test in a CSV": lambda root: _csv_layout(root, ("train", "val", "test")),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def random_cache(request, tmp_path_factory):
    """(layout name, the cache of a random-label dataset in that layout, its cache dir)."""
    root = tmp_path_factory.mktemp("random")
    labels = LAYOUTS[request.param](root / "data")
    cache_dir = root / "cache"
    # flat folders: a test share large enough for a meaningful interval (~37 images)
    cache = probe.extract(root / "data", "vgg16", weights="none", image_size=32,
                          labels=labels, cache_dir=cache_dir, test_fraction=0.25)
    return request.param, cache, cache_dir


def _chance(metrics: dict, key: str, n_classes: int) -> float:
    """What a predictor that knows nothing scores: for accuracy, the larger of 1/K and
    always answering the most frequent class of the reported split."""
    if key != "accuracy":
        return 1 / n_classes
    support = [v["support"] for v in metrics["per_class"].values()]
    return max(1 / n_classes, max(support) / sum(support))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEADS))
def test_random_labels_score_no_better_than_chance(random_cache, name):
    layout, cache, cache_dir = random_cache
    head, params = HEADS[name]
    run = probe.fit(cache, head, runs_dir=cache_dir / "runs", seed=0, **params)
    metrics = run.metrics
    assert metrics["n_samples"] >= 30, layout  # an interval narrow enough to mean something
    assert metrics["accuracy_ci"][1] - metrics["accuracy_ci"][0] < 0.4
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        low, high = metrics[f"{key}_ci"]
        assert low <= metrics[key] <= high
        assert low <= _chance(metrics, key, len(CLASSES)), (layout, name, key, metrics[key])
    expected_role = "test" if metrics["split"] == "test" else "validation, used for selection"
    assert metrics["split_role"] == expected_role
    assert metrics["split"] == ("test" if cache.counts.get("test") else "val")


def _predictions(run) -> tuple[list[str], np.ndarray]:
    with open(run.path / "test_predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return [row[0] for row in rows[1:]], np.array([[float(v) for v in row[3:]] for row in rows[1:]])


def test_the_reported_split_is_never_fit_on(tmp_path):
    """Without a test split the logistic head reports on val from a model fit on train
    only (not refit on train + val); with one, the reported images are in no other split."""
    labels = _csv_layout(tmp_path / "data", ("train", "val"))
    cache = probe.extract(tmp_path / "data", "vgg16", weights="none", image_size=32, labels=labels)
    run = probe.fit(cache, "logreg")
    assert run.metrics["split"] == "val" and run.metrics["selected_on"] == "val"
    assert run.config["head_params"]["refit"] is False
    train, val = cache.split("train"), cache.split("val")
    train_only = probe.make_head("logreg", C=run.metrics["C"]).fit(
        train.features, train.labels, classes=cache.classes)
    paths, saved = _predictions(run)
    assert paths == val.paths
    # the saved probabilities are the head's under the run's temperature; 1/T undoes it
    saved = calibration.apply_temperature(saved, 1 / run.config["temperature"])
    # the same model up to the solver's tolerance (the sweep stops early, warm starts);
    # a head refit on train + val moves these probabilities by far more
    np.testing.assert_allclose(saved, train_only.predict_proba(val.features), atol=1e-3)
    assert any("no test split" in note for note in run.notes)

    both = _csv_layout(tmp_path / "data3", ("train", "val", "test"))
    cache3 = probe.extract(tmp_path / "data3", "vgg16", weights="none", image_size=32, labels=both)
    run3 = probe.fit(cache3, "logreg")
    reported, _ = _predictions(run3)
    assert run3.metrics["split_role"] == "test" and reported == cache3.paths("test")
    assert not set(reported) & (set(cache3.paths("train")) | set(cache3.paths("val")))
    assert not any("no test split" in note for note in run3.notes)


def test_no_validation_split_says_what_it_disables_and_nothing_contradictory(tmp_path):
    _folder_layout(tmp_path / "data", None)
    runner = CliRunner()
    extracted = runner.invoke(main, ["extract", str(tmp_path / "data"), "--weights", "none",
                                     "--image-size", "32", "--val-fraction", "0", "-q"])
    assert extracted.exit_code == 0, extracted.output
    result = runner.invoke(main, ["fit", "--head", "logreg"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    disabled = [line for line in lines if "no C sweep" in line]
    assert len(disabled) == 1 and "no validation split" in disabled[0]
    assert "no early stopping" in disabled[0]
    assert "C chosen on validation" not in result.output
    assert "Chosen settings: C 1 (the defaults: no validation split to choose them on)" in lines
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split()[:2] == ["metric", "test"] and "95% interval" in header


def test_validation_scores_are_labelled_everywhere(tmp_path):
    labels = _csv_layout(tmp_path / "data", ("train", "val"))
    runner = CliRunner()
    assert runner.invoke(main, ["extract", str(tmp_path / "data"), "--labels", str(labels),
                                "--weights", "none", "--image-size", "32", "-q"]).exit_code == 0
    result = runner.invoke(main, ["fit", "--head", "logreg"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("metric"))
    assert "validation, used for selection" in header
    assert sum("no test split" in line for line in result.output.splitlines()) == 1
    run = probe.Run.load(result.output.strip().splitlines()[-1].removeprefix("Run: "))
    assert run.metrics["split_role"] == "validation, used for selection"

    table = probe.compare(tmp_path / "data", "vgg16", "logreg", weights="none", image_size=32,
                          labels=labels)
    assert table[0]["split_role"] == "validation, used for selection"
    assert "validation split" in (table.path / "compare.md").read_text()
    with open(table.path / "compare.csv", newline="") as handle:
        assert next(csv.DictReader(handle))["split_role"] == "validation, used for selection"
