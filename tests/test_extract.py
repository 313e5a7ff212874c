import numpy as np
import pytest

import probe
from conftest import make_image
from probe import backbones, data
from probe.features.cache import FeatureCache

SMALL = {"vgg16": 32, "resnet50": 32, "densenet121": 32, "xception": 71, "inceptionv3": 75}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_features_equal_plain_keras(name, tmp_path):
    """Cache rows equal the plain Keras model with the backbone's own preprocess_input on
    the same decoded pixels, row by row, with labels and paths aligned."""
    import keras

    root = tmp_path / "ds"
    for c, cls in enumerate(["a", "b"]):
        for i in range(3):
            make_image(root / "train" / cls / f"{i}.png", seed=10 * c + i, size=(30 + i, 20))
    size = SMALL[name]
    cache = probe.extract(root, name, weights="none", image_size=size, batch_size=4,
                          val_fraction=0)  # train only: no val carved
    train = cache.split("train")
    spec = backbones.get(name)
    keras.utils.set_random_seed(0)  # what --weights none --seed 0 means
    model = getattr(keras.applications, spec.constructor)(
        weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")
    pixels = np.stack([data.load_image(root / p, size) for p in train.paths]).astype("float32")
    module = getattr(keras.applications, spec.module)
    expected = model.predict(module.preprocess_input(pixels), verbose=0)
    assert train.features.shape == (6, spec.feature_size)
    np.testing.assert_allclose(train.features, expected, rtol=1e-4, atol=1e-4)
    assert [cache.classes[label] for label in train.labels] == [p.split("/")[1] for p in train.paths]


def test_extract_writes_every_split_and_records_skips(image_tree, cache_dir):
    cache, report = probe.extract_with_report(image_tree, "vgg16", weights="none", image_size=32)
    assert cache.path.parent == cache_dir
    assert sum(cache.counts.values()) == 18
    assert set(cache.splits) == {"train", "val", "test"}
    assert sorted(p for p, _ in cache.skipped) == ["cat/empty.jpg", "dog/text.jpg"]
    assert dict(cache.skipped)["cat/empty.jpg"].startswith("empty file")
    assert report.extracted == 18 and report.skipped == 2 and report.status == "extracted"
    assert not hasattr(cache, "report")  # the cache only reads; the report is returned
    assert cache.attrs["weights"] == "random(seed=0)" and cache.attrs["weights_seed"] == 0
    assert cache.attrs["preprocessing"] == "caffe"
    reopened = FeatureCache.open(cache.path)
    assert reopened.classes == ["cat", "dog", "fox"]
    for split in reopened.splits:
        part = reopened.split(split)
        assert part.features.shape == (len(part.paths), 512)
        assert np.isfinite(part.features).all()
        assert [reopened.classes[label] for label in part.labels] == [p.split("/")[0] for p in part.paths]


def test_second_identical_run_does_no_backbone_work(image_tree, monkeypatch):
    first = probe.extract(image_tree, "vgg16", weights="none", image_size=32)

    def no_model(*args, **kwargs):
        raise AssertionError("the backbone was built again")

    monkeypatch.setattr(backbones.BackboneSpec, "build", no_model)
    second, report = probe.extract_with_report(image_tree, "vgg16", weights="none", image_size=32)
    assert report.status == "up to date"
    assert second.path == first.path
    np.testing.assert_array_equal(second.features("train"), first.features("train"))


def test_a_file_whose_mtime_alone_changed_is_extracted_again(image_tree):
    """Same size, same bytes, a new modification time: probe can not know the pixels are
    the same without reading them, so the plan says not up to date and the file is read
    again (and only it)."""
    import os

    first = probe.extract(image_tree, "vgg16", weights="none", image_size=32)
    touched = first.paths("train")[0]
    content = (image_tree / touched).read_bytes()
    stat = os.stat(image_tree / touched)
    os.utime(image_tree / touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert (image_tree / touched).read_bytes() == content

    again, report = probe.extract_with_report(image_tree, "vgg16", weights="none", image_size=32)
    assert report.status == "extracted"
    assert report.extracted == 1 and report.reused == 17
    assert report.changes == {"added": 0, "removed": 0, "modified": 1}
    assert again.path == first.path and not again.check_source()


def test_other_split_seed_reuses_features(image_tree, monkeypatch):
    first = probe.extract(image_tree, "vgg16", weights="none", image_size=32, seed=0)
    monkeypatch.setattr(backbones.BackboneSpec, "build",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    other, report = probe.extract_with_report(image_tree, "vgg16", weights="none", image_size=32,
                                              seed=0, val_fraction=0.3)
    assert other.path != first.path
    assert report.extracted == 0 and report.reused == 18


def test_pooling_none_and_other_settings_get_their_own_cache(image_tree):
    pooled = probe.extract(image_tree, "vgg16", weights="none", image_size=64)
    spatial = probe.extract(image_tree, "vgg16", weights="none", image_size=64, pooling="none")
    assert spatial.path != pooled.path
    assert spatial.feature_shape == (2, 2, 512)
    assert spatial.features("train").shape[1:] == (2, 2, 512)
    np.testing.assert_allclose(spatial.features("train").mean(axis=(1, 2)),
                               pooled.features("train"), rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_features(image_tree):
    one = probe.extract(image_tree, "vgg16", weights="none", image_size=32, batch_size=1,
                        cache_dir=image_tree.parent / "c1")
    many = probe.extract(image_tree, "vgg16", weights="none", image_size=32, batch_size=7,
                         cache_dir=image_tree.parent / "c2")
    assert one.paths("train") == many.paths("train")
    np.testing.assert_allclose(one.features("train"), many.features("train"), rtol=1e-4, atol=1e-5)


def test_progress_is_reported_as_events(image_tree):
    from probe.progress import Advanced, ExtractionFinished, ExtractionStarted, Stage

    events = []
    cache = probe.extract(image_tree, "vgg16", weights="none", image_size=32, batch_size=8,
                          progress=events.append)
    assert {event.stage for event in events} == {Stage.EXTRACT}
    assert isinstance(events[0], ExtractionStarted) and isinstance(events[-1], ExtractionFinished)
    assert events[0].total == 20 and events[0].images == 20
    assert events[0].target == cache.path and events[0].changes == {}
    steps = [(e.done, e.total) for e in events if isinstance(e, Advanced)]
    assert steps == [(8, 20), (16, 20), (20, 20)]
    assert events[-1].report.extracted == 18 and events[-1].path == cache.path
    again = []
    probe.extract(image_tree, "vgg16", weights="none", image_size=32, progress=again.append)
    assert [type(e) for e in again] == [ExtractionFinished]
    assert again[0].report.status is probe.ExtractionStatus.UP_TO_DATE


def test_fractions_do_not_split_a_dataset_with_split_folders_into_two_caches(tmp_path):
    from conftest import make_tree

    root = make_tree(tmp_path / "ds", splits=True)
    first = probe.extract(root, "vgg16", weights="none", image_size=32)
    again, report = probe.extract_with_report(root, "vgg16", weights="none", image_size=32,
                                              val_fraction=0.3, test_fraction=0.3)
    assert again.path == first.path and report.status == "up to date"


def test_extraction_speed_of_the_largest_work_is_kept(image_tree):
    first = probe.extract(image_tree, "vgg16", weights="none", image_size=32)
    assert first.attrs["extract_images"] == 20
    make_image(image_tree / "cat" / "added.png", seed=77)
    updated, report = probe.extract_with_report(image_tree, "vgg16", weights="none", image_size=32)
    assert report.extracted == 1
    assert updated.attrs["extract_images"] == 20
    assert updated.attrs["extract_images_per_second"] == first.attrs["extract_images_per_second"]


def test_decoding_starts_while_the_model_is_built(image_tree, monkeypatch):
    import threading

    from probe.features import runtime

    decoded, load_image, load_backbone = threading.Event(), data.load_image, runtime.load_backbone

    def decoding(*args, **kwargs):
        decoded.set()
        return load_image(*args, **kwargs)

    def loading_once_decoding_has_begun(*args, **kwargs):
        assert decoded.wait(timeout=300), "no image was decoded while the model was built"
        return load_backbone(*args, **kwargs)

    monkeypatch.setattr(data, "load_image", decoding)
    monkeypatch.setattr(runtime, "load_backbone", loading_once_decoding_has_begun)
    cache = probe.extract(image_tree, "vgg16", weights="none", image_size=32,
                          cache_dir=image_tree.parent / "cache", batch_size=4)
    assert sum(cache.counts.values()) == 18 and cache.attrs["extract_images_per_second"] > 0


def test_a_model_that_can_not_be_built_stops_the_decoding(image_tree, monkeypatch):
    import threading

    from probe.features import runtime

    def failing(*args, **kwargs):
        raise probe.WeightsError("expected a weights file; received a broken one")

    monkeypatch.setattr(runtime, "load_backbone", failing)
    threads = threading.active_count()
    with pytest.raises(probe.WeightsError, match="broken one"):
        probe.extract(image_tree, "vgg16", weights="none", image_size=32,
                      cache_dir=image_tree.parent / "cache", batch_size=4)
    assert threading.active_count() == threads  # the decoding threads are gone
    assert not list((image_tree.parent / "cache").glob("*.h5"))


def test_events_are_typed_and_the_status_is_written_as_its_word():
    import dataclasses
    import json

    from probe import progress
    from probe.features.extract import ExtractionReport, ExtractionStatus

    shapes = {progress.Event, progress.Started, progress.Advanced, progress.Note, progress.Finished}
    events = [cls for cls in map(progress.__dict__.get, progress.__all__)
              if isinstance(cls, type) and issubclass(cls, progress.Event)]
    assert len(events) > 30
    for cls in events:  # attributes, not a free-form dict or a kind string
        assert not {f.name for f in dataclasses.fields(cls)} & {"details", "kind"}, cls
        if cls not in shapes:  # each kind fixes its stage
            assert isinstance(cls.__dataclass_fields__["stage"].default, progress.Stage), cls
    report = ExtractionReport(ExtractionStatus.UP_TO_DATE, 0, 3, 0, 0)
    assert report.status == "up to date" and str(report.status) == "up to date"
    written = report.as_dict()
    assert type(written["status"]) is str and json.loads(json.dumps(written))["status"] == "up to date"
