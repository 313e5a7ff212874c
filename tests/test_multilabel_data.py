"""Multi-label datasets: a CSV `labels` column and a Pascal VOC ImageSets/Main directory,
read into samples with targets and difficult marks, and stored in the cache as an (N, K)
0/1 matrix with an ignore mask."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import probe
from probe.features import format as format_mod
from probe import data
from probe.errors import CacheError, DatasetError
from test_cache_integrity import unsealed_copy

VOC_CLASSES = ("car", "dog", "person")
COLOURS = {"car": (220, 30, 20), "dog": (30, 200, 40), "person": (20, 40, 220)}
# objects per image, cycling: one, two or none
OBJECTS = (("car",), ("dog",), ("person",), ("car", "person"), ("dog", "car"), ())
SPLIT_OF = ("train", "train", "train", "val", "test")  # by image index


def voc_image(path: Path, objects: tuple[str, ...], seed: int) -> None:
    """A grey picture with one coloured square per object, at places that vary."""
    rng = np.random.default_rng(seed)
    pixels = np.full((32, 32, 3), 128, dtype=np.uint8)
    pixels += rng.integers(0, 20, pixels.shape, dtype=np.uint8)
    for k, name in enumerate(objects):
        top, left = 2 + 16 * k + int(rng.integers(0, 3)), 2 + int(rng.integers(0, 14))
        pixels[top:top + 12, left:left + 12] = COLOURS[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_voc(root: Path, images: int = 30, difficult=((7, "dog"), (8, "person"), (13, "car")),
             splits=("train", "val", "trainval", "test")) -> dict:
    """A VOC-style tree: JPEGImages/<name>.jpg and ImageSets/Main/<class>_<split>.txt.
    Returns {name: (split, targets, ignored)} of what the lists say."""
    truth = {}
    for i in range(images):
        name = f"2007_{i:06d}"
        objects = OBJECTS[i % len(OBJECTS)]
        voc_image(root / "JPEGImages" / f"{name}.jpg", objects, seed=i)
        hard = tuple(c for j, c in difficult if j == i)
        truth[name] = (SPLIT_OF[i % len(SPLIT_OF)], tuple(c for c in objects if c not in hard), hard)
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for split in splits:
        members = [n for n, (s, _, _) in truth.items()
                   if s == split or (split == "trainval" and s in ("train", "val"))]
        (main / f"{split}.txt").write_text("\n".join(members) + "\n")  # VOC's plain lists
        for c in VOC_CLASSES:
            lines = [f"{n} {'0' if c in truth[n][2] else ' 1' if c in truth[n][1] else '-1'}"
                     for n in members]
            (main / f"{c}_{split}.txt").write_text("\n".join(lines) + "\n")
    return truth


def indicator(names, classes=VOC_CLASSES) -> list[int]:
    return [int(c in names) for c in classes]


# --- discovery ------------------------------------------------------------------------


def test_voc_directory_gives_targets_difficult_marks_and_the_listed_splits(tmp_path):
    root = tmp_path / "VOC2007"
    truth = make_voc(root)
    found = data.discover(root, labels=root / "ImageSets" / "Main")
    assert found.multilabel and found.classes == list(VOC_CLASSES)
    assert found.splits_given and not found.val_carved  # train and val lists: trainval unused
    assert found.counts() == {"train": 18, "val": 6, "test": 6}
    assert found.difficult == 3
    assert any("Kept 3 labels marked difficult" in note for note in found.notes())
    for sample in found.samples:
        name = Path(sample.path).stem
        assert sample.path == f"JPEGImages/{name}.jpg" and sample.label == -1
        split, targets, hard = truth[name]
        assert sample.split == split
        assert [found.classes[i] for i in sample.targets] == list(sorted(targets))
        assert [found.classes[i] for i in sample.ignored] == list(hard)


def test_voc_trainval_lists_alone_have_val_carved(tmp_path):
    root = tmp_path / "VOC2007"
    make_voc(root, splits=("trainval", "test"))
    found = data.discover(root, labels=root / "ImageSets" / "Main", val_fraction=0.25)
    assert found.val_carved and found.counts()["test"] == 6
    assert found.counts()["train"] + found.counts()["val"] == 24 and found.counts()["val"] >= 3
    assert found.split_identity()["val_fraction"] == 0.25
    again = data.discover(root, labels=root / "ImageSets" / "Main", val_fraction=0.25)
    assert again.samples == found.samples


def test_a_single_voc_list_is_still_a_binary_single_label_dataset(tmp_path):
    root = tmp_path / "VOC2007"
    make_voc(root)
    found = data.discover(root, labels=root / "ImageSets" / "Main" / "car_trainval.txt")
    assert not found.multilabel and found.classes == ["car", "not_car"]
    assert all(s.targets == () and s.label in (0, 1) for s in found.samples)


def csv_dataset(tmp_path: Path, rows: list[str], header: str = "path,labels,split") -> Path:
    root = tmp_path / "photos"
    for i in range(12):
        voc_image(root / f"p{i}.png", OBJECTS[i % len(OBJECTS)], seed=i)
    (tmp_path / "tags.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def csv_rows() -> list[str]:
    return [f"p{i}.png,{';'.join(OBJECTS[i % 6])},{('train', 'train', 'val', 'test')[i % 4]}"
            for i in range(12)]


def test_csv_labels_column_holds_zero_or_more_classes(tmp_path):
    rows = csv_rows()
    rows[0] = "p0.png, car ;; car;dog ,train"  # blanks and repeats are dropped
    root = csv_dataset(tmp_path, rows)
    found = data.discover(root, labels=tmp_path / "tags.csv")
    assert found.multilabel and found.classes == ["car", "dog", "person"]
    by_path = {s.path: s for s in found.samples}
    assert by_path["p0.png"].targets == (0, 1)
    assert by_path["p5.png"].targets == () and by_path["p5.png"].split == "train"
    assert by_path["p4.png"].targets == (0, 1)
    assert found.counts() == {"train": 6, "val": 3, "test": 3}


def test_unsplit_multilabel_csv_is_split_on_each_image_s_rarest_class(tmp_path):
    root = tmp_path / "photos"
    rows = []
    for i in range(60):  # "rare" on 10 images, with the common "car" (51 images)
        voc_image(root / f"p{i}.png", ("car",), seed=i)
        tags = ["car"] * (i % 7 != 3) + ["rare"] * (i % 6 == 0) + ["dog"] * (i % 5 == 0)
        rows.append(f"p{i}.png,{';'.join(tags)}")
    (tmp_path / "tags.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    found = data.discover(root, labels=tmp_path / "tags.csv", seed=3)
    rare = found.classes.index("rare")
    per_split = {s: sum(rare in x.targets for x in found.split(s)) for s in data.SPLITS}
    # strata: rare (10 images) and dog without rare (10) are each cut 7 / 1 / 2, car only
    # (34) 24 / 5 / 5, no class (6) 4 / 1 / 1
    assert per_split == {"train": 7, "val": 1, "test": 2}
    assert found.counts() == {"train": 42, "val": 8, "test": 10}
    assert data.discover(root, labels=tmp_path / "tags.csv", seed=3).samples == found.samples
    assert data.discover(root, labels=tmp_path / "tags.csv", seed=4).samples != found.samples


@pytest.mark.parametrize("header,rows,needle", [
    ("path,label,labels", ["p0.png,car,car"], "not both label and labels"),
    ("path,labels,split", ['p0.png,"car,dog",train'], "separated by ';'; line 2"),
    ("path,label", ["p0.png,car;dog"], "one class name in the label column; line 2"),
    ("path,labels", ["p0.png,", "p1.png,"], "every row's labels cell is empty"),
    ("path,labels,split", ["p0.png,car,train", "p1.png,car,train", "p2.png,dog,test"],
     "train images with it; 1 have none (of 2 train images): 'dog'"),
    ("path,labels", ["p0.png,car", "p1.png,car;dog", "p2.png,car"],
     "train images without it; 1 have none"),
], ids=["label-and-labels", "comma", "semicolon-in-label", "no-class", "no-positive",
        "on-every-image"])
def test_malformed_multilabel_csv_is_refused_with_the_fix(tmp_path, header, rows, needle):
    root = csv_dataset(tmp_path, rows, header)
    with pytest.raises(DatasetError, match="expected") as raised:
        data.discover(root, labels=tmp_path / "tags.csv", val_fraction=0, test_fraction=0)
    assert needle in str(raised.value), str(raised.value)


def test_single_and_multi_label_files_can_not_be_mixed(tmp_path):
    root = csv_dataset(tmp_path, csv_rows())
    (tmp_path / "train.csv").write_text("path,labels\np0.png,car\np1.png,dog\np3.png,\n")
    (tmp_path / "test.csv").write_text("path,label\np2.png,car\np4.png,dog\n")
    with pytest.raises(DatasetError, match="single-label .* or every one multi-label"):
        data.discover(root, labels={"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"})


def _remove(name):
    return lambda main: (main / name).unlink()


def _write(name, text):
    return lambda main: (main / name).write_text(text)


@pytest.mark.parametrize("damage,needle", [
    (_remove("dog_val.txt"), "the val split has no list of 1 classes, e.g. 'dog_val.txt'"),
    (_write("car_train.txt", "2007_000000 yes\n"), "Received: line 1 '2007_000000 yes'"),
    (_write("car_train.txt", "2007_000000 1\n2007_000000 1\n"), "listed again on line 2"),
    (_write("car_test.txt", "2007_000004 1\n2007_000009 1\n2007_000999 1\n"),
     "1 do not, e.g. '2007_000999'"),
    (_write("car_test.txt", "2007_000000 1\n2007_000004 1\n"), "listed more than once"),
], ids=["missing-list", "bad-flag", "repeated", "missing-image", "in-two-splits"])
def test_malformed_voc_directory_is_refused_with_the_fix(tmp_path, damage, needle):
    root = tmp_path / "VOC2007"
    make_voc(root)
    damage(root / "ImageSets" / "Main")
    with pytest.raises(DatasetError, match="expected") as raised:
        data.discover(root, labels=root / "ImageSets" / "Main")
    assert needle in str(raised.value), str(raised.value)


def test_a_directory_without_lists_or_given_for_one_split_is_refused(tmp_path):
    root = tmp_path / "VOC2007"
    make_voc(root)
    with pytest.raises(DatasetError, match="<class>_<split>.txt .* found none"):
        data.discover(root, labels=root / "JPEGImages")
    with pytest.raises(DatasetError, match="is a directory.*give it alone"):
        data.discover(root, labels={"train": root / "ImageSets" / "Main"})


# --- the cache ------------------------------------------------------------------------


def _extract(root, labels, **kwargs):
    return probe.extract_with_report(root, "vgg16", weights="none", image_size=32,
                                     labels=labels, **kwargs)


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOC2007"
    truth = make_voc(root)
    cache, report = _extract(root, root / "ImageSets" / "Main")
    return root, truth, cache, report


def test_voc_extracts_to_a_label_matrix_and_ignore_mask_aligned_with_paths(voc):
    root, truth, cache, report = voc
    assert report.status == "extracted" and report.skipped == 0
    assert cache.multilabel and cache.attrs["multilabel"] is True
    assert cache.classes == list(VOC_CLASSES)
    assert {s: cache.counts[s] for s in cache.splits} == {"train": 18, "val": 6, "test": 6}
    for name in cache.splits:
        split = cache.split(name)
        assert split.labels.shape == (len(split), 3) and split.labels.dtype == np.int64
        assert split.features.shape == (len(split), 512)
        expected = [indicator(truth[Path(p).stem][1]) for p in split.paths]
        hard = [indicator(truth[Path(p).stem][2]) for p in split.paths]
        assert split.labels.tolist() == expected
        assert np.array_equal(cache.labels(name), split.labels)
        assert all(truth[Path(p).stem][0] == name for p in split.paths)
        if any(map(any, hard)):
            assert split.ignore.dtype == bool and split.ignore.astype(int).tolist() == hard
            assert np.array_equal(cache.ignore_mask(name), split.ignore)
        else:
            assert split.ignore is None and cache.ignore_mask(name) is None
    # features follow their image: the same picture's row is the same in any split order
    train = cache.split("train")
    alone = probe.extract(root, "vgg16", weights="none", image_size=32,  # computed anew
                          labels=root / "ImageSets" / "Main" / "car_train.txt",
                          cache_dir=root.parent / "elsewhere")
    solo = {p: f for s in alone.splits for p, f in zip(alone.paths(s), alone.features(s))}
    for path, row in zip(train.paths, train.features):
        np.testing.assert_allclose(row, solo[path], rtol=1e-5, atol=1e-6)


def test_cache_info_says_multilabel_with_counts_per_class(voc):
    _, truth, cache, _ = voc
    info = probe.FeatureCache.open(cache.path).info()
    assert info["multilabel"] is True
    train = [t for s, t, _ in truth.values() if s == "train"]
    assert info["label_counts"]["train"] == {c: sum(c in t for t in train) for c in VOC_CLASSES}
    assert cache.check_source().counts() == {"added": 0, "removed": 0, "modified": 0,
                                            "relabelled": 0}


def test_a_single_label_cache_is_as_before(tmp_path):
    root = tmp_path / "VOC2007"
    make_voc(root)
    cache, _ = _extract(root, root / "ImageSets" / "Main" / "dog_trainval.txt")
    assert not cache.multilabel and "multilabel" not in cache.attrs
    assert "label_counts" not in cache.info() and cache.info()["multilabel"] is False
    assert cache.labels("train").ndim == 1 and cache.ignore_mask("train") is None
    assert cache.split("train").ignore is None
    with h5py.File(cache.path, "r") as handle:
        assert handle["train/labels"].dtype == np.int32 and "ignore" not in handle["train"]
        assert handle["skipped/labels"].dtype == np.int32
    ignore = np.zeros((cache.counts["train"], 2), np.uint8)
    damaged = unsealed_copy(cache.path, tmp_path / "old.h5",
                            lambda handle: handle.create_dataset("train/ignore", data=ignore))
    with pytest.raises(CacheError, match="'train' does not hold"):
        probe.FeatureCache._open(damaged, allow_unsealed=True)  # as `reseal`'s child reads it


def test_csv_multilabel_cache_and_relabelling_rewrites_labels_reusing_features(tmp_path):
    root = csv_dataset(tmp_path, csv_rows())
    (root / "p10.png").write_bytes(b"not an image")  # a skipped file keeps its labels too
    cache, report = _extract(root, tmp_path / "tags.csv")
    assert cache.multilabel and report.skipped == 1 and cache.ignore_mask("train") is None
    by_path = dict(zip(cache.paths("train"), cache.labels("train").tolist()))
    assert by_path["p1.png"] == [0, 1, 0] and by_path["p5.png"] == [0, 0, 0]
    with h5py.File(cache.path, "r") as handle:
        assert handle["skipped/labels"][()].tolist() == [[1, 1, 0]]
    rows = csv_rows()
    rows[1] = "p1.png,person;car,train"
    (tmp_path / "tags.csv").write_text("path,labels,split\n" + "\n".join(rows) + "\n")
    relabelled, report = _extract(root, tmp_path / "tags.csv")
    assert report.status == "extracted" and report.extracted == 0 and report.reused == 11
    assert relabelled.path == cache.path  # the same cache, rewritten with the new labels
    by_path = dict(zip(relabelled.paths("train"), relabelled.labels("train").tolist()))
    assert by_path["p1.png"] == [1, 0, 1]
    assert _extract(root, tmp_path / "tags.csv")[1].status == "up to date"


def test_a_relabelled_dataset_is_reported_by_check_source(voc):
    root, _, cache, _ = voc
    lines = (root / "ImageSets/Main/dog_train.txt").read_text().replace("2007_000000 -1",
                                                                        "2007_000000 0")
    (root / "ImageSets/Main/dog_train.txt").write_text(lines)
    changes = cache.check_source()
    assert changes.relabelled == ["JPEGImages/2007_000000.jpg"]
    _, report = _extract(root, root / "ImageSets" / "Main")
    assert report.status == "extracted" and report.extracted == 0


def _replace(name, data):
    def edit(handle):
        del handle[name]
        handle.create_dataset(name, data=data)
    return edit


def _drop_attr(key):
    def edit(handle):
        del handle.attrs[key]
        del handle.attrs["attrs_checksum"]
    return edit


@pytest.mark.parametrize("edit,needle", [
    (_replace("train/labels", np.full((18, 3), 2, np.uint8)), "values other than 0 and 1"),
    (_replace("train/ignore", np.full((18, 3), 7, np.uint8)), "'train/ignore' holds values"),
    (_replace("train/labels", np.zeros((18, 4), np.uint8)), "'train/labels' has shape (18, 4)"),
    (_replace("train/labels", np.zeros((18, 3), np.int32)), "'train/labels' has dtype int32"),
    (_replace("train/ignore", np.zeros((17, 3), np.uint8)), "rows"),
    (_drop_attr("multilabel"), "'train' does not hold"),
    (lambda h: h.attrs.__setitem__("multilabel", False), "attribute multilabel is False"),
], ids=["labels-2", "ignore-7", "K", "dtype", "ignore-rows", "no-attribute", "false"])
def test_the_multilabel_format_is_checked_on_open(voc, tmp_path, edit, needle):
    _, _, cache, _ = voc
    damaged = unsealed_copy(cache.path, tmp_path / "old.h5", edit)
    with pytest.raises(CacheError, match="corrupt or truncated") as raised:
        probe.FeatureCache._open(damaged, allow_unsealed=True)  # as `reseal`'s child reads it
    assert needle in str(raised.value), str(raised.value)


def test_the_multilabel_attribute_is_in_the_attributes_checksum(voc):
    _, _, cache, _ = voc
    assert format_mod.attrs_checksum({**cache.attrs, "multilabel": False}) != \
        cache.attrs["attrs_checksum"]
    assert format_mod.attrs_checksum(cache.attrs) == cache.attrs["attrs_checksum"]


def test_the_command_line_reads_a_voc_directory_and_shows_a_multilabel_cache(tmp_path, cache_dir):
    from click.testing import CliRunner

    from probe.cli import main

    root = tmp_path / "VOC2007"
    make_voc(root)
    main_dir = root / "ImageSets" / "Main"
    run = lambda *args: CliRunner().invoke(main, [str(a) for a in args])  # noqa: E731
    result = run("extract", root, "--labels", main_dir, "--weights", "none",
                 "--image-size", 32, "--quiet")
    assert result.exit_code == 0, result.output
    assert "multi-label, 3 classes" in result.output
    assert "Kept 3 labels marked difficult" in result.output
    info = run("cache", "info", next(cache_dir.glob("*.h5")))
    assert info.exit_code == 0, info.output
    assert "multi-label (images per class)" in info.output
    assert "train: car 9, dog 5, person 6" in info.output
    (main_dir / "car_val.txt").unlink()
    failed = run("extract", root, "--labels", main_dir, "--weights", "none", "--image-size", 32)
    assert failed.exit_code != 0 and "Traceback" not in failed.output
    assert "the val split has no list of 1 classes" in failed.output


def test_an_interrupted_multilabel_extraction_resumes_with_the_labels_of_now(tmp_path, monkeypatch):
    """Parts hold features only: labels come from the dataset when the cache is assembled,
    so a run resumed after the labels changed writes the new labels."""
    from probe.features import store

    root = csv_dataset(tmp_path, csv_rows())
    written = []
    real_write = store.PartStore.write

    def write_then_stop(self, *args, **kwargs):
        written.append(real_write(self, *args, **kwargs))
        if len(written) == 2:
            raise KeyboardInterrupt
        return written[-1]

    monkeypatch.setattr(store.PartStore, "write", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _extract(root, tmp_path / "tags.csv", batch_size=4)
    monkeypatch.setattr(store.PartStore, "write", real_write)
    rows = csv_rows()
    rows[0] = "p0.png,dog;person,train"  # was car
    (tmp_path / "tags.csv").write_text("path,labels,split\n" + "\n".join(rows) + "\n")
    cache, report = _extract(root, tmp_path / "tags.csv", batch_size=4)
    assert report.reused == 8 and report.extracted == 4
    labels = {p: row for s in cache.splits for p, row in zip(cache.paths(s), cache.labels(s).tolist())}
    expected = {f"p{i}.png": indicator(OBJECTS[i % 6]) for i in range(12)}
    expected["p0.png"] = [0, 1, 1]
    assert labels == expected
