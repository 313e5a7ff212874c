"""Augmented views: drawn deterministically, extracted for training images only, reused
when K grows, resumed after a kill, and seen by the heads as they should."""

from __future__ import annotations

import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import probe
from conftest import make_tree
from probe.features import augment
from probe import data, runs
from probe.features.augment import ViewSettings
from probe.cli import main
from probe.features.engines import local
from probe.heads.estimator import Head
from probe.progress import Started
from test_kill import spawn, wait_for  # noqa: F401 (the fixture)

SETTINGS = dict(weights="none", image_size=32, batch_size=4)


@pytest.fixture
def tree(tmp_path):
    """train/val/test folders: 8 training images, 2 validation, 2 test."""
    return make_tree(tmp_path / "images", classes=("cat", "dog"), per_class=6, splits=True)


@pytest.fixture
def forwarded(monkeypatch):
    """The number of images the backbone has read, counted where it runs."""
    counted = []
    real = local._forward

    def forward(model, inputs, count):
        counted.append(count)
        return real(model, inputs, count)

    monkeypatch.setattr(local, "_forward", forward)
    return counted


def test_views_are_deterministic_per_seed_and_differ_from_the_clean_image(tree):
    path = next((tree / "train" / "cat").glob("cat_0.*"))
    relative = str(path.relative_to(tree))
    settings = ViewSettings.create(4, "default", seed=7)
    first = augment.load_view(path, relative, 32, 0, settings)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, augment.load_view(path, relative, 32, 0, settings))
    clean = data.load_image(path, 32).astype(int)
    assert np.abs(first.astype(int) - clean).mean() > 5
    other_view = augment.load_view(path, relative, 32, 1, settings).astype(int)
    other_seed = augment.load_view(path, relative, 32, 0, ViewSettings.create(4, "default", 8))
    assert np.abs(other_view - first).mean() > 5
    assert np.abs(other_seed.astype(int) - first).mean() > 5


def test_policies_and_counts_are_validated():
    with pytest.raises(probe.ProbeError, match="light, default, strong"):
        ViewSettings.create(2, "wild")
    with pytest.raises(probe.ProbeError, match="from 0 to 256"):
        ViewSettings.create(-1)
    assert ViewSettings.create(0, "strong", 5) == ViewSettings()  # no views: nothing else


def test_only_training_images_get_views_and_features_stay_clean(tree, tmp_path, forwarded):
    events = []
    plain = probe.extract(tree, "vgg16", cache_dir=tmp_path / "plain", **SETTINGS)
    forwarded.clear()
    cache, report = probe.extract_with_report(tree, "vgg16", cache_dir=tmp_path / "views",
                                              augment=3, progress=events.append, **SETTINGS)
    assert cache.counts == {"train": 8, "val": 2, "test": 2}
    assert (report.extracted, report.views_extracted, report.views_reused) == (12, 24, 0)
    assert sum(forwarded) == 12 + 24  # the backbone read 3 views of the 8 training images
    started = [e for e in events if isinstance(e, Started) and e.stage == "views"]
    assert [e.total for e in started] == [24]
    assert cache.views("train").shape == (8, 3, 512)
    assert cache.views("val") is None and cache.views("test") is None
    with h5py.File(cache.path) as handle:
        assert "views" in handle["train"] and "views" not in handle["val"]
        assert "views" not in handle["test"]
    for split in plain.splits:  # the clean features are those of a cache without views
        np.testing.assert_allclose(cache.features(split), plain.features(split), atol=1e-6)
    assert cache.info()["views"] == {"per_image": 3, "policy": "default", "seed": 0,
                                     "split": "train", "rows": 24}
    with h5py.File(plain.path) as handle:  # a cache without views has no trace of them
        assert "views" not in handle["train"] and "views" not in handle.attrs


def test_raising_k_extracts_only_the_missing_views(tree, tmp_path, forwarded):
    directory = tmp_path / "cache"
    two = probe.extract(tree, "vgg16", cache_dir=directory, augment=2, **SETTINGS)
    before = two.views("train")
    forwarded.clear()
    four, report = probe.extract_with_report(tree, "vgg16", cache_dir=directory, augment=4,
                                             **SETTINGS)
    assert (report.extracted, report.reused) == (0, 12)
    assert (report.views_extracted, report.views_reused) == (16, 16)
    assert sum(forwarded) == 16  # no clean image and no existing view went through again
    np.testing.assert_array_equal(four.views("train")[:, :2], before)
    assert four.path == two.path  # K is no part of the cache's key

    forwarded.clear()
    again, report = probe.extract_with_report(tree, "vgg16", cache_dir=directory, augment=4,
                                              **SETTINGS)
    assert report.status == "up to date" and sum(forwarded) == 0
    fewer, report = probe.extract_with_report(tree, "vgg16", cache_dir=directory, augment=1,
                                              **SETTINGS)
    assert sum(forwarded) == 0 and report.views_extracted == 0
    np.testing.assert_array_equal(fewer.views("train"), before[:, :1])
    other, report = probe.extract_with_report(tree, "vgg16", cache_dir=directory, augment=1,
                                              augment_policy="strong", **SETTINGS)
    assert report.views_extracted == 8 and report.extracted == 0  # a policy is other views
    none = probe.extract(tree, "vgg16", cache_dir=directory, **SETTINGS)
    assert none.view_count == 0 and none.views("train") is None


def test_a_modified_training_image_gets_new_views_and_the_others_are_reused(tree, tmp_path):
    from conftest import make_image

    directory = tmp_path / "cache"
    before = probe.extract(tree, "vgg16", cache_dir=directory, augment=2, **SETTINGS)
    old_views = dict(zip(before.paths("train"), before.views("train")))
    changed = next((tree / "train" / "dog").glob("dog_0.*"))
    make_image(changed, seed=999, size=(50, 41), tint=0)
    after, report = probe.extract_with_report(tree, "vgg16", cache_dir=directory, augment=2,
                                              **SETTINGS)
    assert report.changes["modified"] == 1 and report.extracted == 1
    assert (report.views_extracted, report.views_reused) == (2, 14)
    for path, views in zip(after.paths("train"), after.views("train")):
        if path == str(changed.relative_to(tree)):
            assert np.abs(views - old_views[path]).max() > 1e-3
        else:
            np.testing.assert_array_equal(views, old_views[path])


def test_a_kill_during_view_extraction_resumes_to_the_same_views(tree, tmp_path, spawn):
    reference = probe.extract(tree, "vgg16", cache_dir=tmp_path / "reference", augment=3,
                              **SETTINGS)
    cache_dir = tmp_path / "cache"
    args = ["extract", tree, "--weights", "none", "--image-size", "32", "--batch-size", "4",
            "--augment", "3", "--cache-dir", cache_dir]
    # 12 images: 3 clean batches, then 24 views: 6 batches; held after the 5th part
    process = spawn(args, "parts:5", "views")
    wait_for(process.marker.exists, process, seconds=300)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    view_parts = list(cache_dir.glob(".parts-*-views-*/part-*.npz"))
    assert len(view_parts) == 2 and not list(cache_dir.glob("*.h5"))

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "0 extracted, 12 reused" in result.output
    assert "Views: 3 per training image (default): 16 extracted, 8 reused" in result.output
    assert not list(cache_dir.glob(".parts-*"))
    cache = probe.FeatureCache.open(next(cache_dir.glob("*.h5")))
    assert cache.paths("train") == reference.paths("train")
    np.testing.assert_allclose(cache.views("train"), reference.views("train"),
                               rtol=1e-5, atol=1e-6)


@pytest.fixture
def seen(monkeypatch):
    """What each head's `_fit` received: training rows, views kept apart, validation rows."""
    records = []
    real = Head._fit

    def spy(self, data):
        records.append({"rows": data.X.shape[0], "views": data.n_views,
                        "val": None if data.X_val is None else data.X_val.shape[0]})
        return type(self)._real_fit(self, data)

    for name in probe.list_heads():
        cls = probe.heads.HEADS[name]
        monkeypatch.setattr(cls, "_real_fit", cls._fit, raising=False)
        monkeypatch.setattr(cls, "_fit", spy)
    assert real is Head._fit
    return records


def test_heads_see_the_views_they_should(tree, tmp_path, seen):
    cache = probe.extract(tree, "vgg16", cache_dir=tmp_path / "cache", augment=3, **SETTINGS)
    for head in probe.list_heads():
        run = runs.fit(cache, head, html_report=False, **({"epochs": 2} if head == "dense" else {}))
        assert run.config["views"] == {"per_image": 3, "available": 3, "policy": "default",
                                       "seed": 0}
    # every view a row of its own with its image's label; selection on the clean val
    assert seen == [{"rows": 8 * 4, "views": 0, "val": 2}] * len(probe.list_heads())
    seen.clear()
    run = runs.fit(cache, "dense", views=False, html_report=False, epochs=2)
    assert run.config["views"]["per_image"] == 0
    sampled = runs.fit(cache, "dense", html_report=False, epochs=3, view_sampling="sample")
    assert seen == [{"rows": 8, "views": 0, "val": 2}, {"rows": 8, "views": 3, "val": 2}]
    assert sampled.config["head_params"]["view_sampling"] == "sample"


def test_views_become_rows_with_their_labels_and_follow_their_rows_through_splits():
    from sklearn.model_selection import cross_val_score

    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 5))
    y = np.arange(12) % 2
    X[:, 0] += 3 * y
    views = X[:, None, :] + np.arange(1, 3)[None, :, None] * 1e-3  # row i's views: i + eps
    head = probe.KNNHead(k=1, temperature=0.07, refit=False).fit(X, y, views=views)
    assert head.n_views_ == 2
    expanded = probe.heads.base.prepare_fit(X, y, None, None, None, views).with_views_as_rows()
    np.testing.assert_array_equal(expanded.y, np.concatenate([y, y.repeat(2)]))
    np.testing.assert_allclose(expanded.X[12:14], views[0])

    checked = []

    class Checked(probe.KNNHead):
        def _use_views(self, data):
            # each fold's views are those of its own rows (within 2e-3 of them)
            assert np.abs(data.views - data.X[:, None, :]).max() < 3e-3
            checked.append(data.views.shape)
            return super()._use_views(data)

    cross_val_score(Checked(k=1, temperature=0.07), X, y, cv=3, params={"views": views})
    assert checked == [(8, 2, 5)] * 3
    with pytest.raises(probe.ProbeError, match="views"):
        probe.KNNHead().fit(X, y, views=views[:5])


def test_dense_sample_draws_one_view_per_image_each_epoch():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(20, 6))
    y = np.arange(20) % 2
    views = rng.normal(size=(20, 3, 6))
    head = probe.DenseHead(epochs=4, view_sampling="sample", refit=False).fit(X, y, views=views)
    # one fresh draw per epoch
    assert head.view_draws_ == 4 and len(head.history_["loss"]) == 4
    with pytest.raises(probe.ProbeError, match="view_sampling"):
        probe.DenseHead(view_sampling="some").fit(X, y)


def test_the_command_line_extracts_shows_and_uses_views(tree, tmp_path):
    import json

    cache_dir = tmp_path / "cache"
    runner = CliRunner()
    extracted = runner.invoke(main, ["extract", str(tree), "--weights", "none", "--image-size",
                                     "32", "--augment", "2", "--augment-policy", "light",
                                     "--cache-dir", str(cache_dir), "-q"])
    assert extracted.exit_code == 0, extracted.output
    assert "Views: 2 per training image (light): 16 extracted, 0 reused" in extracted.output
    path = next(cache_dir.glob("*.h5"))
    info = runner.invoke(main, ["cache", "info", str(path)])
    assert "views:          2 per training image, policy light, seed 0 (16 rows" in info.output
    for flags, used in ((["--head", "knn"], 2), (["--head", "knn", "--no-views"], 0)):
        fitted = runner.invoke(main, ["fit", str(path), "--no-report", *flags])
        assert fitted.exit_code == 0, fitted.output
        assert f"Views: {used} augmented views per training image used (of 2" in fitted.output
        run = fitted.output.strip().splitlines()[-1].removeprefix("Run: ")
        assert json.loads((Path(run) / "config.json").read_text())["views"]["per_image"] == used
    refused = runner.invoke(main, ["extract", str(tree), "--augment", "2", "--engine", "ray",
                                   "--weights", "none", "--cache-dir", str(cache_dir)])
    assert refused.exit_code != 0
    assert "augmented views are extracted by the local engine only" in refused.output
