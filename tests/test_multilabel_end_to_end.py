"""Multi-label end to end on a small Pascal VOC-style tree: extract with the
ImageSets/Main lists, compare every head ranked by mean average precision, predict two
labels for an image with two objects, export a sigmoid model equal to predict,
fine-tune with binary cross-entropy."""

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import probe
from probe.cli import main
from probe.heads import list_heads
from probe.runs import Run

COLOURS = {"car": (220, 30, 20), "dog": (30, 200, 40), "person": (20, 40, 220)}
CORNERS = {"car": (2, 2), "dog": (2, 20), "person": (20, 10)}
# objects per image: one, two or none, in every split
LAYOUT = [("car",), ("dog",), ("person",), ("car", "person"), ("dog", "person"), ("car", "dog"), ()]
COPIES = {"train": 4, "val": 2, "test": 2}
DIFFICULT = ("test_1_0", "dog")  # one "difficult" (0) entry, left out of dog's metrics
pytestmark = pytest.mark.slow  # one extraction and three fits shared by the module


def voc_image(path: Path, objects: tuple[str, ...], seed: int) -> None:
    """A grey noisy picture with a block of each object's colour, each class in its own
    corner (objects never hide each other) moved by a seeded few pixels."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(128 + rng.normal(0, 20, (40, 40, 3)), 0, 255)
    for name in objects:
        top, left = np.array(CORNERS[name]) + rng.integers(0, 4, 2)
        pixels[top:top + 16, left:left + 16] = np.clip(
            np.array(COLOURS[name]) + rng.normal(0, 15, (16, 16, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def make_voc_tree(root: Path) -> Path:
    """JPEGImages/<id>.jpg and ImageSets/Main/<class>_<split>.txt lists (1 / -1 / 0)."""
    lists = {(name, split): [] for name in COLOURS for split in COPIES}
    for split, copies in COPIES.items():
        for copy in range(copies):
            for index, objects in enumerate(LAYOUT):
                image_id = f"{split}_{copy}_{index}"
                voc_image(root / "JPEGImages" / f"{image_id}.jpg", objects,
                          zlib.crc32(image_id.encode()))
                for name in COLOURS:
                    mark = "1" if name in objects else "-1"
                    if (image_id, name) == DIFFICULT:
                        mark = "0"
                    lists[name, split].append(f"{image_id} {mark:>2}")
    main_dir = root / "ImageSets" / "Main"
    main_dir.mkdir(parents=True)
    for (name, split), lines in lists.items():
        (main_dir / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """extract, then compare every head on the VOC-style tree (the CLI, as a user would)."""
    root = make_voc_tree(tmp_path_factory.mktemp("voc") / "VOC2007")
    cache_dir = root.parent / "cache"
    lists = root / "ImageSets" / "Main"
    extracted = cli("extract", "--labels", lists, root, "--backbone", "vgg16", "--weights", "none",
                    "--image-size", 32, "--cache-dir", cache_dir, "--quiet")
    assert extracted.exit_code == 0, extracted.output
    compared = cli("compare", root, "--labels", lists, "--backbones", "vgg16",
                   "--heads", ",".join(list_heads()), "--weights", "none", "--image-size", 32,
                   "--cache-dir", cache_dir, "--epochs", 40, "--learning-rate", 0.01, "--quiet")
    assert compared.exit_code == 0, compared.output
    directory = max((cache_dir / "runs").glob("*-compare"))
    with open(directory / "compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return root, directory, rows, compared.output


def test_compare_ranks_every_head_by_mean_average_precision(comparison):
    _, directory, rows, output = comparison
    assert output.splitlines()[0].split()[:6] == ["rank", "backbone", "head", "mAP", "mAP_95%", "tied"]
    assert "mean average precision" in output
    assert {r["head"] for r in rows} == set(list_heads())
    scores = [float(r["mean_average_precision"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
    assert min(scores) > 0.9, rows
    assert "ranked by mean average precision" in (directory / "compare.md").read_text()


def test_a_multilabel_run_records_average_precision_per_class(comparison):
    _, _, rows, _ = comparison
    run = Run.load(rows[0]["run"])
    metrics = run.metrics
    assert set(metrics["average_precision"]) == set(COLOURS)
    assert metrics["mean_average_precision"] == pytest.approx(np.mean(list(metrics["average_precision"].values())))
    for key in ("micro_f1", "macro_f1", "exact_match_accuracy", "mean_average_precision"):
        low, high = metrics[f"{key}_ci"]
        assert low <= metrics[key] <= high
    assert metrics["per_class"]["dog"]["ignored"] == 1  # the difficult entry
    assert metrics["per_class"]["car"]["ignored"] == 0
    assert (run.path / "precision_recall.png").is_file()
    page = (run.path / "report.html").read_text()
    assert 'alt="Precision-recall per class"' in page and "mean_average_precision" in page
    assert "car;person" in page  # the map labels an image by its label set
    assert set(run.config["thresholds"]) == set(COLOURS)
    with open(run.path / "test_predictions.csv", newline="") as handle:
        predictions = {r["path"]: r for r in csv.DictReader(handle)}
    assert predictions["JPEGImages/test_0_3.jpg"]["true"] == "car;person"


@pytest.mark.parametrize("head", list_heads())
def test_predict_gives_two_labels_for_an_image_with_two_objects_and_export_equals_it(
        comparison, head, tmp_path):
    root, _, rows, _ = comparison
    run = next(r["run"] for r in rows if r["head"] == head)
    two = tmp_path / "two.jpg"
    voc_image(two, ("car", "person"), seed=7)
    none_ = tmp_path / "none.jpg"
    voc_image(none_, (), seed=8)
    predictions = probe.predict(run, [two, none_])
    assert predictions[0].labels == ["car", "person"], predictions[0]
    assert predictions[0].predicted == "car;person"
    assert predictions[1].labels == []
    assert set(predictions[0].probabilities) == set(COLOURS)

    from probe._keras import keras

    exported = probe.export(run, tmp_path / "model.keras")
    model = keras.saving.load_model(exported, safe_mode=True, compile=False)
    proba = model.predict(probe.load_images([two, none_], run), verbose=0)
    expected = [[p.probabilities[c] for c in Run.load(run).classes] for p in predictions]
    np.testing.assert_allclose(proba, expected, atol=1e-5)
    assert np.all(proba >= 0) and np.all(proba <= 1) and not np.allclose(proba.sum(axis=1), 1)

    result = cli("predict", run, two)
    assert result.exit_code == 0, result.output
    assert "car;person" in result.output


def test_finetune_trains_a_multilabel_run_with_binary_cross_entropy(comparison):
    _, _, rows, _ = comparison
    source = next(r["run"] for r in rows if r["head"] == "logreg")
    tuned = probe.finetune(source, unfreeze=1, epochs=2, learning_rate=1e-4, batch_size=8,
                           augment=False, patience=2)
    assert tuned.metrics["multilabel"] is True
    # epoch 0's validation loss is the binary cross-entropy of the source run's head fit
    # on train only (the source head was refit on train + val: it has seen val)
    from probe.features.cache import FeatureCache
    from probe.heads import make_head

    cache = FeatureCache.open(tuned.config["cache"])
    head = Run.load(source).load_head()
    assert head.get_params()["refit"] is True
    train, val = cache.split("train"), cache.split("val")
    train_only = make_head("logreg", **{**head.get_params(), **head.summary_(), "refit": False})
    train_only.fit(train.features, train.labels, classes=cache.classes)
    proba = np.clip(train_only.predict_proba(val.features), 1e-7, 1 - 1e-7)
    bce = -np.mean(val.labels * np.log(proba) + (1 - val.labels) * np.log(1 - proba))
    assert tuned.metrics["baseline_val_loss"] == pytest.approx(bce, rel=1e-3)
    assert tuned.config["finetune"]["start_head"]["chosen_settings"] == head.summary_()
    assert "mean_average_precision" in tuned.metrics["before"]
    assert tuned.metrics["mean_average_precision"] > 0.8
    assert set(tuned.config["thresholds"]) == set(COLOURS)
    assert json.loads((tuned.path / "config.json").read_text())["multilabel"] is True
    assert (tuned.path / "precision_recall.png").is_file()


def test_label_efficiency_curves_of_a_multilabel_dataset_give_mean_average_precision(comparison):
    root, _, _, _ = comparison
    cache_dir = root.parent / "cache"
    curve = cli("curve", "--cache-dir", cache_dir, "--shots", "1,all", "--repeats", 2,
                "--heads", "logreg,knn")
    assert curve.exit_code == 0, curve.output
    assert "test mean average precision" in curve.output
    assert "chance: mean average precision 0." in curve.output and "random ranking" in curve.output
    run = Path(curve.output.split("Run: ")[-1].strip())
    with open(run / "curve.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2 and "accuracy" not in rows[0]
    full = [float(r["mean_average_precision"]) for r in rows if r["shots"] == "all"]
    assert min(full) > float(rows[0]["mean_average_precision_chance"]) + 0.2
    compared = cli("compare", root, "--labels", root / "ImageSets" / "Main", "--backbones", "vgg16",
                   "--heads", "logreg", "--weights", "none", "--image-size", 32,
                   "--cache-dir", cache_dir, "--shots", "1,all", "--repeats", 2, "--quiet")
    assert compared.exit_code == 0, compared.output
    directory = max((cache_dir / "runs").glob("*-compare"))
    assert (directory / "curve.png").is_file()
    with open(directory / "curve.csv", newline="") as handle:
        assert "mean_average_precision_chance" in next(csv.reader(handle))
