"""Damaged and awkward input: EXIF that breaks orientation, path aliases, symlinks back into
the tree, non-UTF-8 names and labels files, paths over PATH_MAX, per-split labels files,
validation carved from train, and the messages for layouts that can not work."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

import probe
from conftest import make_image, make_tree
from probe import data
from probe.cli import main
from probe.errors import DatasetError


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- decoding: any failure is a skip of that file ---------------------------------------


def exif_jpeg(path: Path, make_tag: int = 0x5301) -> Path:
    """A 40x40 JPEG whose EXIF has orientation 6 and a Make entry whose first field is
    overwritten with the little-endian bytes of `make_tag` (0x5301 -> 01 53: Pillow then
    reads tag 0x0153, SampleFormat, holding text, and `exif_transpose` fails with
    `struct.error` when it writes the EXIF back)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Canon"
    raw = bytearray(exif.tobytes())
    entry = raw.index(b"\x01\x0f\x00\x02")  # big-endian: tag Make, type ASCII
    raw[entry:entry + 2] = make_tag.to_bytes(2, "little")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(path, exif=bytes(raw))
    return path


@pytest.mark.parametrize("make_tag", [0x5301, 0x1A01, 0x05B2])  # struct.error, TypeError, ValueError
def test_malformed_exif_is_a_skip_with_its_reason(tmp_path, make_tag):
    path = exif_jpeg(tmp_path / "bad_exif.jpg", make_tag)
    with pytest.raises(data.BadImage, match="could not decode"):
        data.load_image(path, 32)


def test_any_exception_while_orienting_is_a_bad_image(tmp_path, monkeypatch):
    path = make_image(tmp_path / "fine.jpg", seed=1)

    def broken(image, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'get'")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    with pytest.raises(data.BadImage, match="AttributeError"):
        data.load_image(path, 8)


def test_extract_skips_malformed_exif_and_goes_on(image_tree):
    exif_jpeg(image_tree / "cat" / "bad_exif.jpg")
    cache = probe.extract(image_tree, "vgg16", weights="none", image_size=32)
    skipped = dict(cache.skipped)
    assert "could not decode or orient" in skipped["cat/bad_exif.jpg"]
    assert sum(cache.counts.values()) == 18


def test_predict_lists_malformed_exif_as_a_failed_row(separable_cache, tmp_path):
    fitted = run("fit", "--head", "logreg", "--C", 1.0)
    assert fitted.exit_code == 0, fitted.output
    run_dir = fitted.output.strip().splitlines()[-1].removeprefix("Run: ")
    folder = tmp_path / "new"
    exif_jpeg(folder / "bad_exif.jpg")
    good = sorted((separable_cache.path.parent.parent / "colours" / "red").iterdir())[0]
    (folder / "good.png").write_bytes(good.read_bytes())
    predicted = run("predict", run_dir, folder)
    assert predicted.exit_code == 0, predicted.output
    assert "Traceback" not in predicted.output
    rows = {line.split()[0].split("/")[-1]: line for line in predicted.output.splitlines()[1:]}
    assert "could not decode or orient" in rows["bad_exif.jpg"]
    assert rows["good.png"].split()[1] == "red"


DECODE_IN_A_FRESH_PROCESS = """
import sys
from probe import data
for path in sys.argv[1:]:
    try:
        data.load_image(path, 16)
    except data.BadImage:
        pass
"""


def tiff_with_an_odd_tag(path: Path) -> Path:
    """An LZW TIFF (decoded by libtiff) with a private tag of an unknown type: libtiff
    prints about it on stderr."""
    Image.new("RGB", (8, 8)).save(path, compression="tiff_lzw", tiffinfo={65000: "x"})
    raw = bytearray(path.read_bytes())
    order = "little" if raw[:2] == b"II" else "big"
    directory = int.from_bytes(raw[4:8], order)
    for i in range(int.from_bytes(raw[directory:directory + 2], order)):
        entry = directory + 2 + 12 * i
        if int.from_bytes(raw[entry:entry + 2], order) == 65000:
            raw[entry + 2:entry + 4] = (0x5301).to_bytes(2, order)
    path.write_bytes(bytes(raw))
    return path


PLAIN_PILLOW = """
import sys
from PIL import Image, ImageOps
for path in sys.argv[1:]:
    try:
        with Image.open(path) as image:
            image.load()
            ImageOps.exif_transpose(image)
    except Exception:
        pass
"""


def test_pillow_warnings_do_not_reach_stderr(tmp_path):
    """Corrupt EXIF and truncated files make Pillow warn, odd TIFF tags make libtiff
    print; decoding them in a fresh process (default warning filters) prints nothing."""
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    raw = bytearray(exif.tobytes())
    entry = raw.index(b"\x01\x0f\x00\x02")
    raw[entry + 4:entry + 8] = b"\x00\x00\xff\xff"  # a count far larger than the block
    too_long = tmp_path / "tag_larger_than_file.jpg"
    Image.new("RGB", (20, 20)).save(too_long, exif=bytes(raw))
    truncated = make_image(tmp_path / "truncated.png", seed=2, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:-40])
    odd_tag = tiff_with_an_odd_tag(tmp_path / "odd_tag.tif")
    env = {**os.environ, "PYTHONPATH": str(Path(probe.__file__).parent.parent)}
    files = [str(too_long), str(truncated), str(odd_tag)]
    plain = subprocess.run([sys.executable, "-c", PLAIN_PILLOW, *files], capture_output=True,
                           text=True, timeout=300, env=env)
    assert "Skipping tag" in plain.stderr  # the files really make Pillow warn
    assert "TIFFFetchNormalTag" in plain.stderr  # and libtiff print
    result = subprocess.run([sys.executable, "-c", DECODE_IN_A_FRESH_PROCESS, *files],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


# --- path aliases in labels files --------------------------------------------------------


def test_one_file_under_several_names_is_refused(tmp_path):
    root = make_tree(tmp_path / "ds")
    labels = tmp_path / "aliases.csv"
    absolute = root / "cat" / "cat_1.png"
    labels.write_text(
        "path,label,split\n"
        "cat/cat_1.png,cat,train\n"
        "cat/../cat/cat_1.png,cat,test\n"
        f"{absolute},cat,val\n"
        "dog/dog_1.png,dog,train\n"
    )
    with pytest.raises(DatasetError, match=r"listed more than once.*'cat/cat_1.png', 3 times, as "
                                           r"'cat/cat_1.png', 'cat/../cat/cat_1.png'"):
        data.discover(root, labels)


def test_one_file_in_two_per_split_lists_is_refused(tmp_path):
    root = make_tree(tmp_path / "ds")
    (tmp_path / "train.csv").write_text("path,label\ncat/cat_0.jpg,cat\ndog/dog_0.jpg,dog\n")
    (tmp_path / "test.csv").write_text(f"path,label\n{root}/cat/cat_0.jpg,cat\n")
    with pytest.raises(DatasetError, match="listed more than once"):
        data.discover(root, {"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"})


def test_absolute_and_dotted_paths_inside_the_root_are_normalised(tmp_path):
    root = make_tree(tmp_path / "ds")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{root}/cat/cat_0.jpg,cat\n./dog/../dog/dog_0.jpg,dog\n")
    found = data.discover(root, labels, val_fraction=0, test_fraction=0)
    assert sorted(s.path for s in found.samples) == ["cat/cat_0.jpg", "dog/dog_0.jpg"]


def test_paths_outside_the_root_are_refused(tmp_path):
    root = make_tree(tmp_path / "ds")
    make_image(tmp_path / "elsewhere" / "x.png", seed=5)
    labels = tmp_path / "outside.csv"
    labels.write_text("path,label\ncat/cat_0.jpg,cat\n../elsewhere/x.png,dog\n")
    with pytest.raises(DatasetError, match=r"1 are outside it, e.g. '../elsewhere/x.png'"):
        data.discover(root, labels)
    labels.write_text(f"path,label\ncat/cat_0.jpg,cat\n{tmp_path}/elsewhere/x.png,dog\n")
    with pytest.raises(DatasetError, match="outside it"):
        data.discover(root, labels)


# --- symbolic links ------------------------------------------------------------------------


def test_no_link_back_into_the_tree_is_followed(tmp_path):
    root = make_tree(tmp_path / "ds")
    plain = {s.path: s.label for s in data.discover(root).samples}
    (root / "cat" / "loop").symlink_to("..")  # the dataset root
    (root / "cat" / "up").symlink_to("../..")  # an ancestor of it
    (root / "cat" / "dogs").symlink_to("../dog")  # another class folder
    (root / "cat" / "stolen.png").symlink_to("../dog/dog_1.png")  # another class's image
    found = data.discover(root)
    assert {s.path: s.label for s in found.samples} == plain
    assert sorted(found.links_skipped) == sorted(
        str(root / "cat" / name) for name in ("dogs", "loop", "stolen.png", "up"))
    assert any("Did not follow 4 symbolic links" in note for note in found.notes())


def test_links_to_elsewhere_are_followed_once(tmp_path):
    root = make_tree(tmp_path / "ds")
    shared = tmp_path / "shared"
    make_image(shared / "extra.png", seed=11)
    (shared / "back").symlink_to(root)  # a link out there leading back: not followed
    (root / "cat" / "more").symlink_to(shared)
    (root / "cat" / "one.png").symlink_to(shared / "extra.png")
    with pytest.raises(DatasetError, match=r"listed more than once.*'cat/more/extra.png'"):
        data.discover(root)  # the same outside file under two names
    (root / "cat" / "one.png").unlink()
    found = data.discover(root)
    assert "cat/more/extra.png" in {s.path for s in found.samples}
    assert not any("/back/" in s.path for s in found.samples)
    images, _ = data.find_images(root / "cat")
    assert root / "cat" / "more" / "extra.png" in images


# --- names and labels files that are not UTF-8, empty arguments ---------------------------


def test_labels_csv_not_in_utf8_is_one_line(tmp_path):
    root = make_tree(tmp_path / "ds")
    (tmp_path / "latin1.csv").write_bytes("path,label\ncat/cat_0.jpg,gâteau\n".encode("latin-1"))
    result = run("extract", root, "--labels", tmp_path / "latin1.csv", "--weights", "none",
                 "--image-size", 32)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "expected a UTF-8 labels file; byte 0xe2 at offset 26 is not UTF-8" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_class_folder_name_not_in_utf8_is_refused_before_any_work(tmp_path):
    root = make_tree(tmp_path / "ds")
    os.rename(os.fsencode(root / "cat"), os.fsencode(root) + b"/caf\xe9")
    with pytest.raises(DatasetError, match=r"class folder names in UTF-8; 'caf\\xe9'"):
        data.discover(root)


def test_extract_of_an_empty_path_is_an_error(tmp_path, monkeypatch):
    make_tree(tmp_path / "ds")
    monkeypatch.chdir(tmp_path / "ds")  # the current directory is a valid dataset
    result = run("extract", "", "--weights", "none", "--image-size", 32)
    assert result.exit_code == 1
    assert "empty path" in result.output
    with pytest.raises(DatasetError, match="empty path"):
        data.discover("")


def test_empty_label_is_an_error(tmp_path):
    root = make_tree(tmp_path / "ds")
    (tmp_path / "l.csv").write_text("path,label\ncat/cat_0.jpg,cat\ndog/dog_0.jpg,\n")
    with pytest.raises(DatasetError, match=r"line 3 \('dog/dog_0.jpg'\) has none"):
        data.discover(root, tmp_path / "l.csv")


def test_header_only_csv_is_about_the_csv(tmp_path):
    root = make_tree(tmp_path / "ds")
    (tmp_path / "l.csv").write_text("path,label,split\n")
    with pytest.raises(DatasetError, match=r"has none \(header only\)") as error:
        data.discover(root, tmp_path / "l.csv")
    assert "class folders" not in str(error.value)


def test_files_deeper_than_path_max_are_counted(tmp_path):
    root = make_tree(tmp_path / "ds")
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    fd = os.open(root / "cat", os.O_RDONLY)
    try:
        for _ in range(20):  # 20 x 251 bytes: well past PATH_MAX (4096)
            os.mkdir("d" * 250, dir_fd=fd)
            inner = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, png.getvalue())
        os.close(out)
    finally:
        os.close(fd)
    found = data.discover(root)
    assert len(found.unreadable) == 1
    path, reason = found.unreadable[0]
    assert path.endswith("/deep.png") and "PATH_MAX" in reason
    assert any(note.startswith("Could not read 1 files or folders") for note in found.notes())
    assert len(found.samples) == 18


# --- layouts: loose images, class sets, per-split labels, carving ------------------------


def test_images_directly_in_a_split_folder_are_explained(tmp_path):
    root = make_tree(tmp_path / "ds", splits=True)
    make_image(root / "train" / "loose.jpg", seed=3)
    with pytest.raises(DatasetError, match=r"split folder 'train/'.*found 1 images directly "
                                           r"in it.*one subfolder per class"):
        data.discover(root)


def test_a_class_missing_from_train_is_an_error(tmp_path):
    root = make_tree(tmp_path / "ds", classes=("a", "b"), splits=True)
    (root / "val" / "b").rename(root / "val" / "c")
    with pytest.raises(DatasetError, match=r"every class of the val split to have train "
                                           r"images; 1 have none in train: 'c'"):
        data.discover(root)


def test_a_class_missing_from_val_is_noted(tmp_path):
    root = make_tree(tmp_path / "ds", classes=("a", "b", "c"), splits=True)
    for path in (root / "val" / "c").iterdir():
        path.unlink()
    (root / "val" / "c").rmdir()
    found = data.discover(root)
    assert found.missing_classes == {"val": ["c"]}
    assert "The val split has no images of 1 classes: 'c'" in found.notes()


def voc_lists(tmp_path: Path, n: int = 12) -> Path:
    root = tmp_path / "voc"
    for i in range(3 * n):
        make_image(root / "JPEGImages" / f"2008_{i:06d}.jpg", seed=i, size=(8, 8))
    for part, split in enumerate(("train", "val", "test")):
        ids = range(part * n, (part + 1) * n)
        lines = [f"2008_{i:06d} {('1', '-1', '1', '-1', '0')[i % 5]}" for i in ids]
        (tmp_path / f"car_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_per_split_voc_lists(tmp_path):
    root = voc_lists(tmp_path)
    lists = {split: tmp_path / f"car_{split}.txt" for split in ("train", "val", "test")}
    found = data.discover(root, lists)
    assert found.classes == ["car", "not_car"]
    assert found.difficult == sum(1 for i in range(36) if i % 5 == 4)
    assert found.ignored == 0
    assert {s.split for s in found.samples} == {"train", "val", "test"}
    for sample in found.samples:
        number = int(sample.path.split("_")[1].split(".")[0])
        assert sample.split == ("train", "val", "test")[number // 12]
    assert not found.val_carved and found.splits_given
    assert any("Left out" in note and "difficult" in note for note in found.notes())


def test_trainval_list_has_val_carved_from_it(tmp_path):
    root = voc_lists(tmp_path)
    combined = tmp_path / "car_trainval.txt"
    combined.write_text((tmp_path / "car_train.txt").read_text() + (tmp_path / "car_val.txt").read_text())
    found = data.discover(root, {"trainval": combined, "test": tmp_path / "car_test.txt"}, seed=3)
    assert found.val_carved
    val = found.split("val")
    assert 0 < len(val) < len(found.split("train"))
    assert {s.label for s in val} == {0, 1}  # stratified: both classes
    again = data.discover(root, {"trainval": combined, "test": tmp_path / "car_test.txt"}, seed=3)
    assert again.samples == found.samples


def test_label_source_errors(tmp_path):
    root = voc_lists(tmp_path)
    with pytest.raises(DatasetError, match="split names train, val, test or trainval"):
        data.discover(root, {"holdout": tmp_path / "car_test.txt"})
    with pytest.raises(DatasetError, match="trainval= .* or train= and val="):
        data.discover(root, {"trainval": tmp_path / "car_train.txt", "val": tmp_path / "car_val.txt"})
    with pytest.raises(DatasetError, match="one labels file per split; got several for 'val'"):
        data.discover(root, [("val", tmp_path / "car_val.txt"), ("validation", tmp_path / "car_test.txt")])
    (tmp_path / "split.csv").write_text("path,label,split\nJPEGImages/2008_000000.jpg,car,test\n")
    with pytest.raises(DatasetError, match="split column .* to agree with its split 'train'"):
        data.discover(root, {"train": tmp_path / "split.csv"})


def test_train_and_test_folders_get_a_carved_val(tmp_path):
    root = make_tree(tmp_path / "ds", per_class=12, splits=True)
    for split in ("val",):
        for path in sorted((root / split).rglob("*.*")):
            path.unlink()
        for folder in sorted((root / split).iterdir()):
            folder.rmdir()
        (root / split).rmdir()
    found = data.discover(root, seed=4)
    assert found.val_carved and found.splits_given
    test_before = {s.path for s in found.split("test")}
    assert all(s.path.startswith("train/") for s in found.split("val"))
    per_class = [sum(1 for s in found.split("val") if s.label == c) for c in range(3)]
    assert per_class == [1, 1, 1]  # round(8 * 0.15) of each class's 8 train images
    opted_out = data.discover(root, val_fraction=0)
    assert not opted_out.val_carved and "val" not in opted_out.counts()
    assert {s.path for s in opted_out.split("test")} == test_before


def test_split_identity_holds_only_what_decides_the_split(tmp_path):
    with_val = make_tree(tmp_path / "given", splits=True)
    assert data.discover(with_val).split_identity() == {"labels_file": ""}
    assert data.discover(with_val, seed=5, val_fraction=0.3).split_identity() == {"labels_file": ""}

    flat = make_tree(tmp_path / "flat")
    assert data.discover(flat, seed=2).split_identity() == {
        "labels_file": "", "seed": 2, "val_fraction": 0.15, "test_fraction": 0.15}

    root = voc_lists(tmp_path)
    carved = data.discover(root, {"train": tmp_path / "car_train.txt"}, seed=1, test_fraction=0.4)
    identity = carved.split_identity()
    assert identity == {"labels_file": '{"train": "%s"}' % (tmp_path / "car_train.txt"),
                        "seed": 1, "val_fraction": 0.15}
    assert data.discover(root, {"train": tmp_path / "car_train.txt"}, seed=1).split_identity() == identity
    assert data.discover(root, {"train": tmp_path / "car_train.txt"},
                         val_fraction=0).split_identity() == {"labels_file": identity["labels_file"]}


def test_labels_per_split_from_the_command_line(tmp_path, cache_dir):
    root = voc_lists(tmp_path, n=6)
    options = ["--weights", "none", "--image-size", 32, "-q"]
    repeated = run("extract", root, "--labels", tmp_path / "car_train.txt",
                   "--labels", tmp_path / "car_val.txt", *options)
    assert repeated.exit_code == 1 and "Name the split of each" in repeated.output
    result = run("extract", root, "--labels", f"train={tmp_path / 'car_train.txt'}",
                 "--labels", f"test={tmp_path / 'car_test.txt'}", *options)
    assert result.exit_code == 0, result.output
    assert "No validation split given: carved" in result.output
    assert "marked difficult" in result.output
    cache = probe.FeatureCache.open(next(cache_dir.glob("*.h5")))
    assert set(cache.counts) == {"train", "val", "test"}
    assert not cache.check_source()  # the cache finds its labels files again
    again = run("extract", root, "--labels", f"train={tmp_path / 'car_train.txt'}",
                "--labels", f"test={tmp_path / 'car_test.txt'}", *options)
    assert "Cache up to date" in again.output


def test_a_class_folder_that_is_a_link_elsewhere_is_read(tmp_path):
    root = make_tree(tmp_path / "ds")
    pool = tmp_path / "pool" / "owls"
    for i in range(3):
        make_image(pool / f"owl_{i}.png", seed=50 + i)
    (root / "owl").symlink_to(pool)
    (root / "cats_again").symlink_to(root / "cat")  # a second name for a class folder
    found = data.discover(root)
    assert found.classes == ["cat", "dog", "fox", "owl"]
    assert sorted(s.path for s in found.samples if found.classes[s.label] == "owl") == [
        f"owl/owl_{i}.png" for i in range(3)]
    assert found.links_skipped == [str(root / "cats_again")]
    linked_dir = tmp_path / "linked"
    linked_dir.symlink_to(pool)
    assert len(data.find_images(linked_dir)[0]) == 3  # predict on a linked folder
