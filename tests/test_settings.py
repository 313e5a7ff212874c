"""Typed settings: parsed and bounded once, written to and read back from cache attributes."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import probe
from probe import inference, settings
from probe.cli import main
from probe.errors import BackboneError, CacheError, DatasetError, ProbeError, WeightsError
from probe.settings import ExtractionSettings, SplitSettings, Weights, parse_label_sources


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


# --- weights ------------------------------------------------------------------------------


def test_weights_identities_are_the_stored_ones(tmp_path):
    assert Weights.parse("imagenet").identity == "imagenet"
    assert Weights.parse(None, seed=7).identity == "random(seed=7)"
    path = tmp_path / "w.weights.h5"
    path.write_bytes(b"some weights")
    weights = Weights.parse(str(path))
    assert weights.identity == f"file:w.weights.h5:sha256={weights.sha256[:16]}"
    assert weights.source == str(path.resolve())


def test_a_weights_file_is_hashed_once(tmp_path, monkeypatch):
    path = tmp_path / "w.weights.h5"
    path.write_bytes(b"some weights")
    calls = []
    real = settings.file_sha256
    monkeypatch.setattr(settings, "file_sha256", lambda p: calls.append(p) or real(p))
    extraction = ExtractionSettings.create("vgg16", str(path), 32)
    for name in ("resnet50", "densenet121", "xception"):
        other = extraction.with_backbone(name)
        assert other.weights is extraction.weights
    assert Weights.parse(extraction.weights) is extraction.weights
    assert len(calls) == 1


@pytest.mark.parametrize("weights", ["imagenet", "none"])
def test_settings_round_trip_through_cache_attributes(weights):
    extraction = ExtractionSettings.create("resnet50", weights, 48, "max", seed=9)
    attrs = extraction.to_attrs()
    assert attrs["backbone"] == "resnet50" and attrs["preprocessing"] == "caffe"
    assert ExtractionSettings.from_attrs(attrs) == extraction


def test_file_weights_round_trip_and_must_still_match(tmp_path):
    path = tmp_path / "w.weights.h5"
    path.write_bytes(b"some weights")
    extraction = ExtractionSettings.create("vgg16", str(path), 32)
    assert ExtractionSettings.from_attrs(extraction.to_attrs()) == extraction
    path.write_bytes(b"other weights")
    with pytest.raises(CacheError, match="do not match"):
        ExtractionSettings.from_attrs(extraction.to_attrs())
    path.unlink()
    with pytest.raises(WeightsError, match="put it back"):
        ExtractionSettings.from_attrs(extraction.to_attrs())


def test_random_weights_seed_is_its_own_field():
    attrs = {"backbone": "vgg16", "image_size": 32, "pooling": "avg", "weights": "random(seed=5)",
             "weights_source": "none", "weights_seed": 5, "seed": 0, "split_seed": 0}
    assert ExtractionSettings.from_attrs(attrs).weights.seed == 5
    # caches and runs written before weights_seed existed used one seed for both
    legacy = {k: v for k, v in attrs.items() if k != "weights_seed"} | {"weights": "random(seed=0)"}
    assert ExtractionSettings.from_attrs(legacy).weights.seed == 0
    with pytest.raises(CacheError, match="do not match"):
        ExtractionSettings.from_attrs(attrs | {"weights_seed": 6})


def test_rebuilt_backbone_uses_the_weights_seed_not_the_split_seed():
    config = {"backbone": "vgg16", "image_size": 32, "pooling": "avg",
              "weights": "random(seed=3)", "weights_source": "none", "weights_seed": 3,
              "split_seed": 0}
    rebuilt = inference.rebuild_backbone(config)
    expected = probe.get_backbone("vgg16").build("none", 32, seed=3)
    for a, b in zip(rebuilt.get_weights(), expected.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_edited_run_config_is_a_clear_error():
    config = {"backbone": "vgg16", "image_size": 100000, "pooling": "avg", "weights": "imagenet",
              "weights_source": "imagenet"}
    with pytest.raises(CacheError, match="at most 1024"):
        ExtractionSettings.from_attrs(config)
    with pytest.raises(CacheError, match="backbone"):
        ExtractionSettings.from_attrs({**config, "image_size": 32, "backbone": "alexnet"})


# --- splits -------------------------------------------------------------------------------


def test_label_sources(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b=c.csv"
    assert parse_label_sources(None) == ()
    assert parse_label_sources(str(a)) == (("", str(a)),)
    assert parse_label_sources([f"train={a}", f"TEST={b}"]) == (("train", str(a)), ("test", str(b)))
    assert parse_label_sources([str(b)]) == (("", str(b)),)  # "=" in a file name
    assert parse_label_sources({"trainval": a}) == (("trainval", str(a)),)
    split = SplitSettings.create([f"train={a}", f"val={b}"])
    assert split.labels == {"train": str(a), "val": str(b)}
    assert SplitSettings.from_attrs(split.to_attrs()) == split
    single = SplitSettings.create(str(a), 0.2, 0.1, 4)
    assert single.labels == str(a) and SplitSettings.from_attrs(single.to_attrs()) == single


@pytest.mark.parametrize("values,message", [
    (["a.csv", "b.csv"], "got two"),
    (["train=a.csv", "train=b.csv"], "the train split"),
    (["a.csv", "test=b.csv"], "got both"),
    ([""], "empty"),
])
def test_label_sources_never_drop_a_file(values, message):
    with pytest.raises(DatasetError, match=message):
        parse_label_sources(values)


def test_two_unnamed_labels_files_on_the_command_line(image_tree, tmp_path):
    result = run("extract", image_tree, "--labels", tmp_path / "a.csv", "--labels",
                 tmp_path / "b.csv", "--weights", "none")
    one_line_error(result, "got two")


def test_split_defaults_are_written_once():
    assert SplitSettings() == SplitSettings.create()
    assert (SplitSettings().val_fraction, SplitSettings().test_fraction) == (0.15, 0.15)
    for command in ("extract", "compare"):
        params = {p.name: p.default for p in main.commands[command].params}
        assert params["val_fraction"] == settings.VAL_FRACTION
        assert params["test_fraction"] == settings.TEST_FRACTION


# --- bounds -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_seed_bounds(seed):
    with pytest.raises(ProbeError, match="0 to 4294967295"):
        ExtractionSettings.create("vgg16", "none", 32, seed=seed)
    with pytest.raises(ProbeError, match="0 to 4294967295"):
        SplitSettings.create(seed=seed)


@pytest.mark.parametrize("batch_size", [0, -1, 100_000_000])
def test_batch_size_bounds(batch_size):
    with pytest.raises(ProbeError, match="from 1 to 4096"):
        ExtractionSettings.create("vgg16", "none", 32, batch_size=batch_size)


def test_image_size_bound():
    with pytest.raises(BackboneError, match="at most 1024 pixels"):
        ExtractionSettings.create("vgg16", "none", 100000)


def test_a_batch_that_does_not_fit_in_memory_is_refused_before_decoding(image_tree,
                                                                         monkeypatch):
    monkeypatch.setattr(settings, "available_memory", lambda: 2**20)
    decoded = []
    monkeypatch.setattr(probe.data, "load_image", lambda *a: decoded.append(a))
    with pytest.raises(ProbeError, match=r"use --batch-size \d+ or less"):
        probe.extract(image_tree, "vgg16", weights="none", image_size=64, batch_size=16)
    assert not decoded


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "0<=x<=4294967295"),
    (["--seed", "4294967296"], "0<=x<=4294967295"),
    (["--batch-size", "100000000"], "from 1 to 4096"),
    (["--batch-size", "0"], "from 1 to 4096"),
    (["--image-size", "100000"], "at most 1024 pixels"),
])
def test_bounds_on_the_command_line(image_tree, cache_dir, args, message):
    result = run("extract", image_tree, "--weights", "none", *args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert message in result.output, result.output
    assert not cache_dir.exists() or not list(cache_dir.glob("*.h5"))


def test_empty_dataset_argument_is_an_error_not_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(run("extract", "", "--weights", "none"), "empty path")
    with pytest.raises(DatasetError, match="empty path"):
        probe.extract("", weights="none")


def test_predict_batch_size_is_bounded(separable_cache, tmp_path):
    run_dir = probe.fit(separable_cache, "logreg").path
    for size in (0, -1):
        result = run("predict", run_dir, tmp_path, "--batch-size", size)
        one_line_error(result, "from 1 to 4096")
