import json
from pathlib import Path
import os
import time

import numpy as np
import pytest

import probe
from conftest import make_separable_tree
from probe.errors import CacheError, DatasetError, RunError
from probe.runs import Run


def test_fit_logreg_writes_a_complete_run(separable_cache):
    run = probe.fit(head="logreg")
    assert run.config["cache"] == str(separable_cache.path.resolve())
    names = {p.name for p in run.path.iterdir()}
    assert {"config.json", "metrics.json", "confusion_matrix.png", "head", "test_predictions.csv"} <= names
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert metrics["accuracy"] >= 0.99
    assert metrics["C"] in [10.0 ** k for k in range(-6, 6)]
    assert np.array(metrics["confusion_matrix"]).sum() == separable_cache.counts["test"]
    assert run.config["backbone"] == "vgg16" and run.config["head"] == "logreg"
    assert run.path.parent == separable_cache.path.parent / "runs"
    assert run.path.name.endswith("-vgg16-logreg")
    assert (run.path / "curves.png").stat().st_size > 1000  # the C sweep


def test_fit_dense_writes_curves_and_reloads_identically(separable_cache):
    run = probe.fit(head="dense", epochs=30, seed=1)
    assert (run.path / "curves.png").stat().st_size > 1000
    assert run.metrics["accuracy"] >= 0.99
    head = Run.load(run.path).load_head()
    test = separable_cache.split("test")
    saved = np.loadtxt(run.path / "test_predictions.csv", delimiter=",", skiprows=1,
                       usecols=(3, 4, 5))
    np.testing.assert_allclose(head.predict_proba(test.features), saved, atol=1e-5)


def test_fit_chooses_the_newest_cache_and_says_so(separable_cache, tmp_path):
    other = probe.extract(separable_cache.attrs["dataset_root"], "vgg16", weights="none",
                          image_size=40)
    os.utime(other.path, (time.time() + 5, time.time() + 5))
    run = probe.fit(head="logreg", C=1.0)
    assert run.config["cache"] == str(other.path.resolve())
    assert any("using the most recent" in note for note in run.notes)
    chosen = probe.fit(separable_cache.path, "logreg", C=1.0)
    assert chosen.config["cache"] == str(separable_cache.path.resolve())
    with pytest.raises(CacheError, match="for backbone 'resnet50'"):
        probe.fit(head="logreg", backbone="resnet50")


def test_fit_without_any_cache(tmp_path):
    with pytest.raises(CacheError, match="Run `probe extract"):
        probe.fit(head="logreg", cache_dir=tmp_path / "empty")


def test_class_absent_from_validation_is_refused(tmp_path):
    root = make_separable_tree(tmp_path / "ds", classes=("blue", "red"))
    for split in ("train", "val", "test"):
        for name in ("blue", "red"):
            (root / split / name).mkdir(parents=True)
    for name in ("blue", "red"):
        files = sorted((root / name).iterdir())
        for i, path in enumerate(files):
            split = "train" if i < 6 else ("test" if i < 8 else "val")
            if split == "val" and name == "red":
                split = "train"
            path.rename(root / split / name / path.name)
        (root / name).rmdir()
    probe.extract(root, "vgg16", weights="none", image_size=32)
    with pytest.raises(DatasetError, match="red"):
        probe.fit(head="logreg")


def test_run_load_errors(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        Run.load(tmp_path / "missing")
    (tmp_path / "notarun").mkdir()
    with pytest.raises(RunError, match="found no config.json"):
        Run.load(tmp_path / "notarun")


def test_fit_warns_on_changed_source_and_strict_refuses(separable_cache):
    from conftest import make_image
    from probe.errors import SourceChangedError

    root = separable_cache.attrs["dataset_root"]
    make_image(Path(root) / "red" / "added.png", seed=5)
    run = probe.fit(head="logreg", C=1.0)
    assert any("1 added" in note and "--strict" in note for note in run.notes)
    with pytest.raises(SourceChangedError, match="1 added"):
        probe.fit(head="logreg", C=1.0, strict=True)


def test_skipped_files_are_listed_in_the_run_metrics(image_tree):
    probe.extract(image_tree, "vgg16", weights="none", image_size=32)
    run = probe.fit(head="logreg", C=1.0)
    assert {item["path"] for item in run.metrics["skipped_files"]} == {"cat/empty.jpg", "dog/text.jpg"}
    assert any("2 files" in note for note in run.notes)
