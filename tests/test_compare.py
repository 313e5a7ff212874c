import csv
import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import probe
from conftest import make_separable_tree
from probe import backbones, demo
from probe.cli import main
from probe.compare import CSV_COLUMNS
from probe.errors import BackboneError, DatasetError, ProbeError, WeightsError
from probe.runs import Run

FAST = {"dense": {"epochs": 3, "hidden_units": 16}, "logreg": {"C": 1.0}}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def colours(tmp_path):
    return make_separable_tree(tmp_path / "colours", per_class=8, classes=("blue", "green", "red"))


@pytest.fixture
def broken_resnet(monkeypatch):
    """resnet50 whose weights can not be loaded; every other backbone builds as usual."""
    build = backbones.BackboneSpec.build

    def fake(self, *args, **kwargs):
        if self.name == "resnet50":
            raise WeightsError("could not load the weights file w.h5 into resnet50")
        return build(self, *args, **kwargs)

    monkeypatch.setattr(backbones.BackboneSpec, "build", fake)


def test_compare_two_backbones_both_heads(colours, cache_dir):
    table = probe.compare(colours, "vgg16,resnet50", "logreg,dense", weights="none",
                          image_size=32, head_params=FAST)
    assert isinstance(table, list) and len(table) == 4
    assert {(r["backbone"], r["head"]) for r in table} == {
        (b, h) for b in ("vgg16", "resnet50") for h in ("logreg", "dense")}
    assert [r["rank"] for r in table] == [1, 2, 3, 4]
    keys = [(-r["accuracy"], -r["macro_f1"]) for r in table]
    assert keys == sorted(keys)
    for record in table:
        assert record["status"] == "ok" and record["error"] is None
        metrics = Run.load(record["run"]).metrics
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "accuracy_ci", "macro_f1_ci"):
            assert record[key] == metrics[key], key
        assert record["split_role"] == "test"
        # tied: a paired test against the best on the same images (3 test images: never
        # significant)
        assert record["tied"] == ("best" if record is table[0] else "yes")
        assert (record["p_value_vs_best"] is None) == (record is table[0])
        assert record["feature_size"] == {"vgg16": 512, "resnet50": 2048}[record["backbone"]]
        assert record["images_per_second"] > 0 and record["fit_seconds"] >= 0
        assert record["split"] == "test" and record["n_samples"] == 3
    # every fit is a normal run directory inside the comparison directory
    assert table.path.parent == cache_dir / "runs" and table.path.name.endswith("-compare")
    assert table.best is table[0] and table.best_run.parent == table.path
    best = Run.load(table.best_run)
    assert (best.config["backbone"], best.config["head"]) == (table[0]["backbone"], table[0]["head"])
    # identical splits for every backbone
    tests = {tuple(probe.FeatureCache.open(r["cache"]).paths("test")) for r in table}
    assert len(tests) == 1
    # the files
    with open(table.path / "compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == 4
    assert [row["backbone"] for row in rows] == [r["backbone"] for r in table]
    assert rows[0]["p_value_vs_best"] == "" and 0 < float(rows[1]["p_value_vs_best"]) <= 1
    for row, record in zip(rows, table):  # each row's calibration, as its run recorded it
        metrics = Run.load(record["run"]).metrics
        ece = metrics["expected_calibration_error"]
        assert float(row["expected_calibration_error"]) == pytest.approx(ece, rel=1e-5)
        assert float(row["temperature"]) == pytest.approx(metrics["temperature"], rel=1e-5)
    md = (table.path / "compare.md").read_text()
    assert "| rank | backbone | head | accuracy | accuracy_95% | tied | p_vs_best |" in md
    assert "McNemar" in md and "Chance level on these images: accuracy 0.3333" in md
    assert "split seed 0 (val 0.15, test 0.15)" in md  # a dataset without split folders
    assert f"`{table[0]['run']}`" in md and "95%" in md
    png = table.path / "compare.png"
    assert png.stat().st_size > 5000 and Image.open(png).format == "PNG"
    assert "extract_img/s" in table.table().splitlines()[0]

    # a second comparison reuses every cache and reports the stored extraction speed
    again = probe.compare(colours, ["resnet50", "vgg16"], ["logreg"], weights="none",
                          image_size=32, head_params=FAST)
    assert {r["extraction"] for r in again} == {"cached"}
    speeds = {r["backbone"]: r["images_per_second"] for r in table}
    assert {r["backbone"]: r["images_per_second"] for r in again} == speeds
    assert again.path != table.path


@pytest.fixture
def spied(monkeypatch):
    """The calls of `data.discover` (by module; fit's check of the source images aside) and
    of `run_extraction` (its dataset, settings and splits)."""
    from probe import data
    from probe.features import extract

    calls = {"discover": [], "run_extraction": []}
    discover, run_extraction = data.discover, extract.run_extraction

    def count(*args, **kwargs):
        caller = sys._getframe(1).f_globals["__name__"]
        if caller != "probe.features.cache":
            calls["discover"].append(caller)
        return discover(*args, **kwargs)

    def spy(found, extraction, split, *args, **kwargs):
        calls["run_extraction"].append((found, extraction, split))
        return run_extraction(found, extraction, split, *args, **kwargs)

    monkeypatch.setattr(data, "discover", count)
    monkeypatch.setattr(extract, "run_extraction", spy)
    return calls


def test_a_broken_backbone_gives_failed_rows_not_a_crash(colours, cache_dir, broken_resnet,
                                                         spied):
    events = []
    table = probe.compare(colours, "resnet50,vgg16", "logreg,dense", weights="none",
                          image_size=32, head_params=FAST, progress=events.append)
    _found_once_and_told_in_typed_events(spied, events)
    assert len(table) == 4
    assert [r["backbone"] for r in table] == ["vgg16", "vgg16", "resnet50", "resnet50"]
    failed = table.failed
    assert len(failed) == 2 and all(r["status"] == "failed" and r["rank"] is None for r in failed)
    assert all("could not load the weights file" in r["error"] for r in failed)
    assert table.best["backbone"] == "vgg16"
    md = (table.path / "compare.md").read_text()
    assert "## Failed" in md and "resnet50 + dense: extraction failed" in md

    result = cli("compare", colours, "--backbones", "vgg16,resnet50", "--weights", "none",
                 "--image-size", 32, "--epochs", 3, "--C", 1, "--quiet")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["rank", "backbone", "head", "accuracy", "accuracy_95%", "tied",
                                "p_vs_best", "balanced_acc", "macro_f1", "features",
                                "extract_img/s", "fit_s", "status"]
    assert sum(1 for line in lines[2:6] if line.split()[-1] == "failed") == 2
    assert "resnet50 + logreg, resnet50 + dense failed: extraction failed: could not load" in result.output
    assert result.output.count("extraction failed: could not load") == 1  # once per reason
    assert any(line.startswith("Best: vgg16 + ") for line in lines)
    # what the scores are without learning, under the table
    assert lines[6].startswith("chance: accuracy 0.") and "(most frequent class)" in lines[6]


def _found_once_and_told_in_typed_events(spied: dict, events: list) -> None:
    """The comparison of resnet50 (broken) and vgg16 found its dataset once, extracted
    each backbone with typed settings, and said so in typed events."""
    from probe.features.extract import ExtractionStatus
    from probe.progress import (BackboneExtracted, ExtractionFailed, HeadFitted, NextBackbone,
                                Stage)
    from probe.settings import ExtractionSettings

    assert spied["discover"] == ["probe.features.extract"]  # once, not again per backbone
    extractions = spied["run_extraction"]
    assert [e.backbone for _, e, _ in extractions] == ["resnet50", "vgg16"]
    (found, first, split), (found_again, second, split_again) = extractions
    assert found is found_again and split is split_again  # the same dataset and splits
    assert isinstance(second, ExtractionSettings) and second.weights is first.weights
    compared = [e for e in events if e.stage is Stage.COMPARE]
    assert [(e.backbone, e.index, e.count) for e in compared if isinstance(e, NextBackbone)] \
        == [("resnet50", 0, 2), ("vgg16", 1, 2)]
    assert [(e.backbone, e.status) for e in compared if isinstance(e, BackboneExtracted)] \
        == [("vgg16", ExtractionStatus.EXTRACTED)]
    failed = [e for e in compared if isinstance(e, ExtractionFailed)]
    assert [e.backbone for e in failed] == ["resnet50"] and "could not load" in failed[0].error
    assert [(e.backbone, e.head, e.error is None, e.done) for e in compared
            if isinstance(e, HeadFitted)] == [("resnet50", "logreg", False, 1),
                                              ("resnet50", "dense", False, 2),
                                              ("vgg16", "logreg", True, 3),
                                              ("vgg16", "dense", True, 4)]


def test_settings_wrong_for_every_row_are_refused_up_front(colours, cache_dir):
    with pytest.raises(BackboneError, match="unknown backbone.*resnet5'"):
        probe.compare(colours, "vgg16,resnet5", weights="none", image_size=32)
    with pytest.raises(BackboneError, match="xception needs an image size of at least 71"):
        probe.compare(colours, "vgg16,xception", weights="none", image_size=32)
    # every backbone below its minimum is named in the one error
    with pytest.raises(BackboneError) as error:
        probe.compare(colours, "all", weights="none", image_size=32)
    message = str(error.value)
    assert "xception needs an image size of at least 71" in message
    assert "inceptionv3 needs an image size of at least 75" in message
    assert "--image-size 75 or more" in message and "--image-size auto:32" in message
    with pytest.raises(BackboneError, match="'auto:N'"):
        probe.compare(colours, "vgg16", weights="none", image_size="big")
    with pytest.raises(ProbeError, match="unknown head"):
        probe.compare(colours, "vgg16", "logreg,svm", weights="none", image_size=32)
    with pytest.raises(ProbeError, match="takes the parameters"):
        probe.compare(colours, "vgg16", weights="none", image_size=32,
                      head_params={"dense": {"epoch": 3}})
    with pytest.raises(DatasetError, match="does not exist"):
        probe.compare(colours / "missing", "vgg16", weights="none", image_size=32)
    assert not (cache_dir / "runs").exists()
    result = cli("compare", colours, "--backbones", "vgg16,nope", "--weights", "none")
    assert result.exit_code == 1 and "Error: unknown backbone" in result.output


def test_every_fit_failing_is_an_error_exit(colours, cache_dir, monkeypatch):
    def fail(self, *args, **kwargs):
        raise WeightsError("no weights here")

    monkeypatch.setattr(backbones.BackboneSpec, "build", fail)
    result = cli("compare", colours, "--backbones", "vgg16", "--heads", "logreg",
                 "--weights", "none", "--image-size", 32, "--quiet")
    assert result.exit_code == 1
    assert "vgg16 + logreg failed: extraction failed: no weights here" in result.output
    assert "no backbone and head finished" in result.output


def test_write_digits(tmp_path):
    root = probe.write_digits(tmp_path / "digits", per_class=5)
    folders = sorted(p.name for p in root.iterdir())
    assert folders == [f"digit_{k}" for k in range(10)]
    files = sorted(root.rglob("*.png"))
    assert len(files) == 50
    image = Image.open(files[0])
    assert image.mode == "RGB" and image.size == (demo.DIGIT_PIXELS, demo.DIGIT_PIXELS)
    assert np.asarray(image).std() > 10  # a real picture, not a blank
    found = probe.discover(root)
    assert found.classes == folders and {s.split for s in found.samples} == {"train", "val", "test"}
    # a second call leaves the files alone, so caches of the directory stay valid
    mtimes = [os.stat(p).st_mtime_ns for p in files]
    probe.write_digits(root, per_class=5)
    assert [os.stat(p).st_mtime_ns for p in files] == mtimes
    with pytest.raises(DatasetError, match="per-class count between 4 and"):
        probe.write_digits(tmp_path / "d2", per_class=1000)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="holds other files"):
        probe.write_digits(tmp_path / "mine", per_class=5)


def test_demo_offline_runs_with_random_weights_and_shows_every_row(tmp_path, cache_dir,
                                                                      monkeypatch):
    asked = []

    def offline(backbone, image_size=None):
        asked.append((backbone, image_size))
        return False

    monkeypatch.setattr(demo, "imagenet_available", offline)
    result = cli("demo", "--per-class", 5, "--backbones", "vgg16", "--image-size", 32,
                 "--out", tmp_path / "digits")
    assert result.exit_code == 0, result.output
    assert asked == [("vgg16", 32)]
    assert result.output.count("ImageNet weights are not available offline") == 1
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    rows = [line.split() for line in lines[header + 2:header + 4]]
    assert {(r[1], r[2], r[-1]) for r in rows} == {("vgg16", "logreg", "ok"), ("vgg16", "dense", "ok")}
    assert len(list((tmp_path / "digits").rglob("*.png"))) == 50
    cache = probe.list_caches(cache_dir)[0]
    assert cache.attrs["weights"] == "random(seed=0)" and cache.attrs["image_size"] == 32


def test_demo_uses_imagenet_when_available_and_defaults_under_the_cache_dir(cache_dir,
                                                                              monkeypatch):
    monkeypatch.setattr(demo, "imagenet_available", lambda backbone, image_size=None: True)
    seen = {}

    def fake_compare(root, names, heads, **kwargs):
        seen.update(root=root, names=names, **kwargs)
        return "table"

    monkeypatch.setattr(demo, "compare", fake_compare)
    assert probe.run_demo(per_class=4) == "table"
    assert seen["weights"] == "imagenet" and seen["names"] == list(demo.DEMO_BACKBONES)
    assert seen["image_size"] == demo.DEMO_IMAGE_SIZE
    assert seen["root"] == cache_dir / "demo" / "digits-4"
    probe.run_demo(per_class=4, weights="none", backbones="densenet121")
    assert seen["weights"] == "none" and seen["names"] == ["densenet121"]


def test_imagenet_check_fails_fast_offline(monkeypatch):
    def no_download(self, *args, weights="imagenet", **kwargs):
        raise WeightsError("could not load the ImageNet weights of vgg16")

    monkeypatch.setattr(backbones.BackboneSpec, "build", no_download)
    assert demo.imagenet_available("vgg16", 32) is False


def test_a_long_error_keeps_its_start_and_its_advice():
    from probe.compare import _message

    error = WeightsError("could not load the weights file w.h5 into resnet50: "
                         + "tensor " * 2000 + "Use a resnet50 'notop' weights file.")
    text = _message(error)
    assert len(text) < 450 and "\n" not in text
    assert text.startswith("could not load the weights file") and text.endswith("weights file.")
    assert _message(ValueError("bad\nshape")) == "ValueError: bad shape"


def test_help_and_dataframe_without_pandas(tmp_path, monkeypatch):
    for command in ("compare", "demo"):
        result = cli(command, "--help")
        assert result.exit_code == 0 and "Example: probe" in result.output
    table = probe.Comparison([{"backbone": "vgg16", "head": "logreg", "status": "failed"}],
                             tmp_path, {})
    assert table.best is None and table.best_run is None and len(table.failed) == 1
    monkeypatch.setitem(__import__("sys").modules, "pandas", None)
    with pytest.raises(ProbeError, match="needs pandas"):
        table.to_dataframe()


def test_image_size_auto_and_backbones_all():
    from probe.compare import image_sizes
    from probe.settings import parse_names

    every = backbones.list_backbones()
    assert parse_names("all", ()) == ["all"]  # without the registry, "all" is just a name
    assert parse_names("all", (), every) == every
    assert parse_names("xception,all", (), every) == ["xception"] + [
        name for name in every if name != "xception"]  # no repeats, the given order first
    specs = [backbones.get(name) for name in every]
    minimum = {spec.name: spec.min_size for spec in specs}
    assert dict(zip(every, image_sizes(specs, "auto"))) == minimum
    assert dict(zip(every, image_sizes(specs, "auto:64"))) == {
        name: max(64, size) for name, size in minimum.items()}
    assert image_sizes(specs, "auto:299") == [299] * len(specs)
    assert image_sizes(specs, None) == [spec.native_size for spec in specs]
    assert image_sizes(specs[:1], "48") == [48]


def test_compare_ranks_and_marks_rows_without_predictions_not_comparable():
    from probe.compare import rank

    def row(name, accuracy, low, high, f1=0.5):
        return {"backbone": name, "head": "logreg", "status": "ok", "accuracy": accuracy,
                "macro_f1": f1, "accuracy_ci": [low, high]}

    ranked = rank([row("c", 0.70, 0.55, 0.78), row("a", 0.90, 0.80, 0.96),
                   row("b", 0.85, 0.74, 0.92), row("d", 0.90, 0.80, 0.96, f1=0.6),
                   {"backbone": "e", "head": "logreg", "status": "failed"}])
    # no predictions to pair: overlapping intervals alone make no one "tied"
    assert [(r["backbone"], r["rank"], r["tied"], r["p_value_vs_best"]) for r in ranked] == [
        ("d", 1, "best", None), ("a", 2, "not comparable", None),
        ("b", 3, "not comparable", None), ("c", 4, "not comparable", None),
        ("e", None, "not comparable", None)]


def test_compare_with_shots_adds_every_backbones_curve(colours, cache_dir):
    table = probe.compare(colours, "vgg16,resnet50", "logreg,knn", weights="none", image_size=32,
                          head_params=FAST, shots="1,2,all", repeats=2, html_report=False)
    curve = table.curve
    assert curve.path == table.path
    rows = list(csv.DictReader(open(table.path / "curve.csv", encoding="utf-8")))
    assert len(rows) == len(curve.records) == 2 * 2 * 3 * 2  # backbones x heads x shots x repeats
    assert {(r["backbone"], r["head"]) for r in rows} == {
        (b, h) for b in ("vgg16", "resnet50") for h in ("logreg", "knn")}
    assert {r["shots"] for r in rows} == {"1", "2", "all"}
    assert {r["split_role"] for r in rows} == {"test"}
    # each backbone's records are its own curve: the same as probe.curve on its cache
    for backbone in ("vgg16", "resnet50"):
        cache = probe.FeatureCache.open(next(r["cache"] for r in table if r["backbone"] == backbone))
        alone = probe.curve(cache, shots="1,2,all", repeats=2, heads="logreg,knn",
                            head_params=FAST, write=False)
        mine = [r for r in curve.records if r["backbone"] == backbone]
        assert [(r["head"], r["shots"], r["repeat"], r["accuracy"]) for r in mine] == \
               [(r["head"], r["shots"], r["repeat"], r["accuracy"]) for r in alone.records]
    # one summary line per backbone x head x shot count; the figure has one line per pair
    assert len(curve.summary) == 2 * 2 * 3
    assert (table.path / "curve.png").stat().st_size > 0


def test_compare_shots_on_the_command_line(colours, cache_dir):
    result = cli("compare", colours, "--backbones", "vgg16", "--heads", "logreg,knn",
                 "--weights", "none", "--image-size", 32, "--C", 1.0, "--shots", "1,all",
                 "--repeats", 2, "--no-report", "-q")
    assert result.exit_code == 0, result.output
    assert "curve.csv, curve.png" in result.output
    assert "vgg16" in result.output and "± " in result.output
    bad = cli("compare", colours, "--weights", "none", "--shots", "0,all")
    assert bad.exit_code != 0 and "shot count" in bad.output and "Traceback" not in bad.output



@pytest.mark.slow
def test_random_labels_give_rows_tied_with_the_best(tmp_path, cache_dir):
    """Labels independent of the pixels, in train/ and test/ folders: no row is
    significantly worse than the best, the chance level is the majority share of the test
    images, and the split is described as the dataset gives it (val carved from train)."""
    from conftest import make_image

    labels = np.random.default_rng(0).integers(0, 2, 80)
    for i, label in enumerate(labels):
        split = "train" if i < 40 else "test"
        make_image(tmp_path / "data" / split / "ab"[label] / f"{i}.png", seed=1000 + i,
                   size=(20, 20))
    table = probe.compare(tmp_path / "data", "vgg16", "logreg,knn,dense", weights="none",
                          image_size=32, head_params=FAST, html_report=False)
    assert [r["tied"] for r in table] == ["best", "yes", "yes"]
    assert all(0.05 <= r["p_value_vs_best"] <= 1 for r in table[1:])
    majority = max(np.mean(labels[40:]), 1 - np.mean(labels[40:]))
    assert table.chance["accuracy"] == pytest.approx(majority)
    md = (table.path / "compare.md").read_text()
    assert "splits as the dataset gives them, val carved from train (val 0.15, seed 0)" in md
    assert "test 0.15" not in md
    assert f"Chance level on these images: accuracy {majority:.4f}" in md


def _chart_of(table, monkeypatch, tmp_path):
    """The figure plot_comparison saves, caught before it is written."""
    from probe import report
    from probe.compare import plot_comparison

    caught = []
    save = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path: (caught.append(fig), save(fig, path))[1])
    plot_comparison(table, tmp_path / "chart.png")
    return caught[0].axes[0]


def test_the_chart_draws_the_chance_level_and_names_no_best_that_is_tied(tmp_path, monkeypatch):
    def row(head, accuracy, tied):
        return {"backbone": "vgg16", "head": head, "status": "ok", "accuracy": accuracy,
                "accuracy_ci": [accuracy - 0.1, accuracy + 0.05], "tied": tied,
                "split_role": "test", "macro_f1": 0.5}

    table = probe.Comparison([row("logreg", 0.62, "best"), row("knn", 0.58, "yes"),
                              row("dense", 0.2, "no")], tmp_path, {})
    table.chance = {"accuracy": 0.55, "balanced_accuracy": 0.5}
    ax = _chart_of(table, monkeypatch, tmp_path)
    chance = [line for line in ax.get_lines() if line.get_gid() == "chance"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.55, 0.55]
    low, high = ax.get_ylim()
    assert low <= 0.55 <= high and low == 0
    assert any(text.get_text() == "chance\n0.550" for text in ax.texts)
    assert "best:" not in ax.get_title() and "2 tied at the top" in ax.get_title()
    ticks = [ax.yaxis.get_major_formatter()(value) for value in (0.0, 1.0)]
    assert ticks == ["0.0", "1.0"]  # plain numbers
    # nobody tied: the best is named; no chance level known: no line
    table[1]["tied"] = "no"
    table.chance = {}
    ax = _chart_of(table, monkeypatch, tmp_path)
    assert ax.get_title() == "Backbones and heads (best: vgg16 + logreg)"
    assert not [line for line in ax.get_lines() if line.get_gid() == "chance"]


def test_markdown_names_the_split_fractions_only_where_they_were_used(tmp_path):
    from probe.compare import markdown

    settings = {"dataset": "/data/pets", "classes": ["a", "b"], "weights": "imagenet",
                "image_size": None, "pooling": "avg", "seed": 3, "val_fraction": 0.2,
                "test_fraction": 0.1, "created": "now"}
    table = probe.Comparison([], tmp_path, settings)
    assert "split seed 3 (val 0.2, test 0.1)" in markdown(table)  # older settings: fractions
    table.settings["split_source"] = "dataset"
    text = markdown(table)
    assert "splits as the dataset gives them" in text and "0.2" not in text and "0.1" not in text
    table.settings["split_source"] = "val carved"
    assert "val carved from train (val 0.2, seed 3)" in markdown(table)
    assert "test 0.1" not in markdown(table)
