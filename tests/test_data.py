import numpy as np
import pytest
from PIL import Image

from conftest import make_image, make_tree
from probe import data
from probe.errors import DatasetError


def test_discover_class_folders(image_tree):
    found = data.discover(image_tree)
    assert found.classes == ["cat", "dog", "fox"]
    # 18 images + 2 broken files with image names; notes.txt ignored, hidden file skipped
    assert len(found.samples) == 20
    assert found.ignored == 1
    for sample in found.samples:
        assert sample.path.split("/")[0] == found.classes[sample.label]


def test_split_folders_are_used_as_given(tmp_path):
    root = make_tree(tmp_path / "ds", splits=True)
    (root / "val").rename(root / "validation")
    found = data.discover(root)
    assert found.counts() == {"train": 12, "val": 3, "test": 3}
    assert all(s.path.startswith("validation/") for s in found.split("val"))


def test_seeded_split_is_deterministic_and_stratified(tmp_path):
    root = make_tree(tmp_path / "ds", per_class=20)
    first = data.discover(root, seed=1)
    again = data.discover(root, seed=1)
    other = data.discover(root, seed=2)
    assert first.samples == again.samples
    assert first.samples != other.samples
    for label in range(3):
        per_split = {s: sum(1 for x in first.split(s) if x.label == label) for s in data.SPLITS}
        assert per_split == {"train": 14, "val": 3, "test": 3}


def test_adding_images_moves_at_most_two_others_of_that_class(tmp_path):
    """What the README promises: per class the order is a seeded hash of the path and the
    cuts move by at most one place each, so adding one image of a class moves at most two
    others of that class between splits, and no image of another class."""
    root = make_tree(tmp_path / "ds", per_class=20)
    before = {s.path: s.split for s in data.discover(root).samples}
    for i in range(12):
        make_image(root / "cat" / f"new_{i}.jpg", seed=999 + i)
        after = {s.path: s.split for s in data.discover(root).samples}
        moved = [p for p in before if before[p] != after[p]]
        assert len(moved) <= 2 and all(p.startswith("cat/") for p in moved), moved
        before = after


def test_fractions_are_checked(tmp_path):
    root = make_tree(tmp_path / "ds")
    with pytest.raises(DatasetError, match="Received: val_fraction=0.6, test_fraction=0.5"):
        data.discover(root, val_fraction=0.6, test_fraction=0.5)


def test_missing_empty_and_single_class(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        data.discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="found no images"):
        data.discover(tmp_path / "empty")
    make_tree(tmp_path / "one", classes=("cat",))
    with pytest.raises(DatasetError, match="only one class: 'cat'"):
        data.discover(tmp_path / "one")


def test_csv_labels(tmp_path):
    root = make_tree(tmp_path / "ds")
    rows = ["path,label,split"]
    for i, name in enumerate(sorted(p.relative_to(root).as_posix() for p in root.rglob("*.*"))):
        rows.append(f"{name},{'even' if i % 2 == 0 else 'odd'},{'train' if i % 3 else 'test'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    found = data.discover(root, labels=tmp_path / "labels.csv")
    assert found.classes == ["even", "odd"]
    # no val rows: val is carved from train, per class
    assert found.counts() == {"train": 10, "val": 2, "test": 6} and found.val_carved
    unsplit = data.discover(root, labels=tmp_path / "labels.csv", val_fraction=0)
    assert unsplit.counts() == {"train": 12, "test": 6} and not unsplit.val_carved


def test_csv_errors(tmp_path):
    root = make_tree(tmp_path / "ds")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\ncat/cat_0.jpg,cat\n")
    with pytest.raises(DatasetError, match="columns path,label"):
        data.discover(root, labels=bad)
    bad.write_text("path,label\ncat/cat_0.jpg,cat\ncat/missing.jpg,cat\n")
    with pytest.raises(DatasetError, match="1 do not, e.g. 'cat/missing.jpg'"):
        data.discover(root, labels=bad)
    bad.write_text("path,label,split\ncat/cat_0.jpg,cat,holdout\n")
    with pytest.raises(DatasetError, match="Received: split='holdout'"):
        data.discover(root, labels=bad)


def test_voc_style_list(tmp_path):
    root = tmp_path / "voc"
    for i in range(12):
        make_image(root / "JPEGImages" / f"2008_{i:06d}.jpg", seed=i)
    lines = [f"2008_{i:06d} {'1' if i % 3 == 0 else '-1'}" for i in range(11)] + ["2008_000011  0"]
    (tmp_path / "aeroplane_trainval.txt").write_text("\n".join(lines) + "\n")
    found = data.discover(root, labels=tmp_path / "aeroplane_trainval.txt")
    assert found.classes == ["aeroplane", "not_aeroplane"]
    assert len(found.samples) == 11 and found.ignored == 0 and found.difficult == 1
    positives = {s.path for s in found.samples if s.label == 0}
    assert positives == {f"JPEGImages/2008_{i:06d}.jpg" for i in (0, 3, 6, 9)}


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "1", "I;16", "RGB"])
def test_every_mode_decodes_to_rgb(tmp_path, mode):
    path = tmp_path / f"image.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"
    if mode == "I;16":
        Image.fromarray(np.full((10, 12), 65535, dtype=np.uint16)).save(path)
    else:
        make_image(path, seed=1, size=(12, 10), mode=mode)
    pixels = data.load_image(path, 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    if mode == "I;16":
        assert pixels.min() == 255  # scaled from 16 bits, not clipped garbage


def test_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert (data.load_image(path, 4) == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    decoded = data.load_image(path, 40).astype(int)
    # after a clockwise turn the white half is on top
    assert decoded[:20].mean() > 200 and decoded[20:].mean() < 50


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"plain text, not an image", "not an image"),
])
def test_broken_files_raise_bad_image(tmp_path, content, reason):
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(data.BadImage, match=reason):
        data.load_image(path, 8)


def test_truncated_jpeg_is_a_bad_image(tmp_path):
    path = make_image(tmp_path / "full.jpg", seed=3, size=(64, 64))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(data.BadImage):
        data.load_image(path, 8)


def test_a_path_listed_twice_is_refused(tmp_path):
    root = make_tree(tmp_path / "ds")
    labels = tmp_path / "dup.csv"
    labels.write_text("path,label\ncat/cat_0.jpg,cat\ncat/cat_0.jpg,dog\ndog/dog_0.jpg,dog\n")
    with pytest.raises(DatasetError, match="listed more than once.*'cat/cat_0.jpg', 2 times"):
        data.discover(root, labels=labels)


def test_images_without_class_folders_are_explained(tmp_path):
    for i in range(3):
        make_image(tmp_path / "flat" / f"{i}.jpg", seed=i)
    with pytest.raises(DatasetError, match="found 3 images directly in it; move them into one subfolder per class"):
        data.discover(tmp_path / "flat")


def test_split_folders_are_marked_as_given(tmp_path):
    assert data.discover(make_tree(tmp_path / "s", splits=True)).splits_given
    assert not data.discover(make_tree(tmp_path / "f")).splits_given


# --- labels files an adversary wrote: one-line errors, never a wrong label -------------


def _tiny_images(root, names):
    for i, name in enumerate(names):
        make_image(root / name, seed=i, size=(8, 8))
    return root


@pytest.mark.parametrize("separator", ["\n", "\r", "\r\n", "\u2028", "\u2029", "\x85",
                                       "\x0b", "\x0c", "\x1c"],
                         ids=["LF", "CR", "CRLF", "U+2028", "U+2029", "NEL", "VT", "FF", "FS"])
def test_a_line_break_inside_a_quoted_csv_path_is_refused(tmp_path, separator):
    """`"b/x<LF>y.png",a` was read as a row for b/xy.png: a label applied to an image
    the row never named."""
    root = _tiny_images(tmp_path / "ds", ["a/p.png", "a/q.png", "b/xy.png", "b/z.png"])
    labels = tmp_path / "labels.csv"
    labels.write_text(f'path,label\na/p.png,a\n"b/x{separator}y.png",a\nb/z.png,b\n',
                      newline="")
    with pytest.raises(DatasetError) as raised:
        data.discover(root, labels=labels)
    message = str(raised.value)
    assert "\n" not in message.replace("\\n", "")
    assert "line break" in message and "line 3" in message and str(labels) in message


def test_an_unquoted_unicode_line_separator_in_a_csv_path_is_refused(tmp_path):
    root = _tiny_images(tmp_path / "ds", ["a/p.png", "b/xy.png", "b/z.png"])
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na/p.png,a\nb/x\u2028y.png,b\nb/z.png,b\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"path cell of the row starting on line 3 .*U\+2028"):
        data.discover(root, labels=labels)


def test_a_quoted_comma_in_a_csv_path_is_still_a_path(tmp_path):
    """Reading with line ends kept changes nothing for ordinary quoting."""
    root = _tiny_images(tmp_path / "ds", ["a/p,1.png", "a/q.png", "b/r.png", "b/s.png"])
    labels = tmp_path / "labels.csv"
    labels.write_text('path,label\r\n"a/p,1.png",a\r\na/q.png,a\r\n\r\nb/r.png,b\r\nb/s.png,b\r\n',
                      newline="")
    found = data.discover(root, labels=labels, val_fraction=0, test_fraction=0)
    assert [s.path for s in found.samples] == ["a/p,1.png", "a/q.png", "b/r.png", "b/s.png"]


def test_a_csv_cell_over_the_readers_limit_is_one_line(tmp_path):
    root = _tiny_images(tmp_path / "ds", ["a/p.png", "b/q.png"])
    labels = tmp_path / "labels.csv"
    labels.write_text('path,label\na/p.png,a\n"' + "x" * 140_000 + '",b\n')
    with pytest.raises(DatasetError, match=r"line 3 of .*limit of 131,072 characters"):
        data.discover(root, labels=labels)


def test_a_line_break_inside_a_list_line_is_refused_on_the_line_an_editor_shows(tmp_path):
    root = _tiny_images(tmp_path / "voc", ["JPEGImages/x.jpg", "JPEGImages/y.jpg"])
    listed = tmp_path / "car_train.txt"
    listed.write_text("x 1\ny\u2028z 1\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"line 2 of .*car_train.txt' holds U\+2028"):
        data.discover(root, labels=listed)


def _voc_main(tmp_path):
    """The smallest VOC tree: two classes, train and val lists."""
    root = _tiny_images(tmp_path / "VOC", [f"JPEGImages/{i}.jpg" for i in range(4)])
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for split, ids in (("train", (0, 1)), ("val", (2, 3))):
        for c, name in enumerate(("car", "dog")):
            (main / f"{name}_{split}.txt").write_text(
                "".join(f"{i} {'1' if i % 2 == c else '-1'}\n" for i in ids))
    return root, main


def _loop(main):
    (main / "dog_train.txt").unlink()
    (main / "dog_train.txt").symlink_to("dog_train.txt")


def _folder(main):
    (main / "dog_train.txt").unlink()
    (main / "dog_train.txt").mkdir()


def _dangling(main):
    (main / "dog_train.txt").unlink()
    (main / "dog_train.txt").symlink_to("nowhere.txt")


def _latin1(main):
    (main / "dog_train.txt").write_bytes("0 1\ncaf\xe9 -1\n".encode("latin-1"))


@pytest.mark.parametrize("damage,needle", [
    (_loop, "symbolic link loop"), (_folder, "is a directory"),
    (_dangling, "link to a file that does not exist"), (_latin1, "byte 0xe9 at offset 7"),
], ids=["link-loop", "directory", "dangling-link", "not-utf8"])
def test_an_unreadable_voc_list_is_a_one_line_error(tmp_path, damage, needle):
    root, main = _voc_main(tmp_path)
    assert data.discover(root, labels=main).multilabel
    damage(main)
    with pytest.raises(DatasetError) as raised:
        data.discover(root, labels=main)
    message = str(raised.value)
    assert needle in message and "dog_train.txt" in message and "\n" not in message


def test_a_labels_file_that_is_a_link_loop_or_a_directory_is_a_one_line_error(tmp_path):
    root = _tiny_images(tmp_path / "ds", ["a/p.png", "b/q.png"])
    loop = tmp_path / "labels.csv"
    loop.symlink_to("labels.csv")
    with pytest.raises(DatasetError, match="labels.csv' is a symbolic link loop"):
        data.discover(root, labels=loop)
    with pytest.raises(DatasetError, match="symbolic link loop"):
        data.discover(root, labels={"train": loop})
    (tmp_path / "test.csv").mkdir()
    (tmp_path / "train.csv").write_text("path,label\na/p.png,a\nb/q.png,b\n")
    with pytest.raises(DatasetError, match="expected a labels file for the test split"):
        data.discover(root, labels={"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"})


def test_a_dataset_directory_that_is_a_link_loop_is_named_as_one(tmp_path):
    (tmp_path / "ds").symlink_to("ds")
    with pytest.raises(DatasetError, match="a symbolic link that leads nowhere"):
        data.discover(tmp_path / "ds")


def test_a_link_loop_among_class_folders_is_noted_not_raised(tmp_path):
    root = make_tree(tmp_path / "ds", per_class=3)
    (root / "loop").symlink_to("loop")
    found = data.discover(root)
    assert len(found.samples) == 9 and found.ignored == 0
    assert "'" + str(root / "loop") + "': it is a symbolic link loop" in found.notes()[0]
