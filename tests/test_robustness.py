"""Never lose work, never crash on bad input: damaged caches, stale caches, bad files,
locking and bad command lines. The kill and two-process tests are in test_kill.py."""

from __future__ import annotations

import errno
import io
import os
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import probe
from conftest import make_image, make_tree
from probe.features import cache as cache_mod, store
from probe import data
from probe.cli import main

OPTS = ("--weights", "none", "--image-size", "32", "--quiet")


def run(*args):
    return CliRunner().invoke(main, [a if isinstance(a, bytes) else str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for needle in needles:
        assert needle in result.output, result.output


def snapshot(directory: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def by_path(cache, split="train") -> dict[str, np.ndarray]:
    part = cache.split(split)
    return dict(zip(part.paths, part.features))


# --- damaged cache files ----------------------------------------------------------------


def test_truncated_cache_is_one_line_error_and_extract_rebuilds_it(image_tree, cache_dir):
    first = probe.extract(image_tree, "vgg16", weights="none", image_size=32)
    original = {split: by_path(first, split) for split in first.splits}
    path = first.path
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])

    info = run("cache", "info", path)
    one_line_error(info, str(path), "corrupt or truncated", "probe extract")
    with pytest.raises(probe.CacheError, match="corrupt or truncated"):
        probe.FeatureCache.open(path)
    listing = run("cache", "ls")  # a damaged file is pointed out, not a crash
    assert listing.exit_code == 0 and "Not a readable cache" in listing.output

    rebuilt = run("extract", image_tree, *OPTS)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "Rebuilding a damaged cache" in rebuilt.output
    assert "18 extracted, 0 reused" in rebuilt.output  # nothing trusted from the damaged file
    cache = probe.FeatureCache.open(path)
    for split in cache.splits:
        got = by_path(cache, split)
        assert got.keys() == original[split].keys()
        for key in got:
            np.testing.assert_allclose(got[key], original[split][key], rtol=1e-5, atol=1e-6)


def test_damaged_bytes_inside_a_cache_are_an_error_not_wrong_data(image_tree):
    cache = probe.extract(image_tree, "vgg16", weights="none", image_size=32)
    with h5py.File(cache.path, "r") as handle:
        features_at = handle["train/features"].id.get_chunk_info(0).byte_offset
        labels_at = handle["train/labels"].id.get_chunk_info(0).byte_offset
    for offset in (features_at + 100, labels_at):
        damaged = bytearray(cache.path.read_bytes())
        damaged[offset] ^= 0x04  # one flipped bit
        copy = cache.path.with_name(f"damaged-{offset}.h5")
        copy.write_bytes(bytes(damaged))
        with pytest.raises(probe.CacheError, match="corrupt or truncated"):
            probe.FeatureCache.open(copy)  # the whole-file checksum, before any data is read
        result = run("cache", "verify", copy)
        one_line_error(result, "corrupt or truncated")


def test_a_damaged_part_file_is_extracted_again(image_tree, cache_dir, monkeypatch):
    reference = probe.extract(image_tree, "vgg16", weights="none", image_size=32,
                              cache_dir=cache_dir / "reference")
    written = []
    real_write = store.PartStore.write

    def write_then_stop(self, *args, **kwargs):
        written.append(real_write(self, *args, **kwargs))
        if len(written) == 3:
            raise KeyboardInterrupt
        return written[-1]

    monkeypatch.setattr(store.PartStore, "write", write_then_stop)
    stopped = run("extract", image_tree, *OPTS, "--batch-size", "4")
    assert stopped.exit_code == 130 and "Interrupted" in stopped.output
    monkeypatch.setattr(store.PartStore, "write", real_write)
    assert not list(cache_dir.glob("*.h5"))
    damaged = written[1]
    damaged.write_bytes(damaged.read_bytes()[:200])
    (damaged.parent / "part-000009.tmp").write_bytes(b"half written")

    resumed = run("extract", image_tree, *OPTS, "--batch-size", "4")
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming an interrupted extraction (2 batches done)" in resumed.output
    assert "10 extracted, 8 reused" in resumed.output
    cache = probe.FeatureCache.open(next(cache_dir.glob("*.h5")))
    assert not list(cache_dir.glob(".parts-*"))
    for split in reference.splits:
        expected, got = by_path(reference, split), by_path(cache, split)
        assert list(got) == list(expected)
        np.testing.assert_allclose(np.stack(list(got.values())),
                                   np.stack(list(expected.values())), rtol=1e-5, atol=1e-6)


# --- stale caches and incremental updates --------------------------------------------


def test_changed_source_is_reported_and_only_changes_are_extracted(image_tree, cache_dir):
    first = probe.extract(image_tree, "vgg16", weights="none", image_size=32)
    assert not first.check_source()
    assert run("cache", "verify", first.path, "--strict").exit_code == 0
    before = {split: by_path(first, split) for split in first.splits}

    make_image(image_tree / "cat" / "new_one.png", seed=999, size=(33, 21))  # added
    removed = next(p for p in first.paths("train") if p.startswith("dog/"))
    (image_tree / removed).unlink()  # removed
    modified = next(p for p in first.paths("train") if p.startswith("fox/"))
    make_image(image_tree / modified, seed=12345, size=(50, 45),
               mode=Image.open(image_tree / modified).mode)  # modified: new content and size
    touched = next(p for p in first.paths("train") if p.startswith("cat/"))
    stat = os.stat(image_tree / touched)
    os.utime(image_tree / touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # mtime only

    changes = probe.FeatureCache.open(first.path).check_source()
    assert changes.added == ["cat/new_one.png"]
    assert changes.removed == [removed]
    assert sorted(changes.modified) == sorted([modified, touched])
    assert "1 added, 1 removed, 2 modified" in changes.message()
    with pytest.raises(probe.SourceChangedError) as raised:
        first.check_source(strict=True)
    assert raised.value.changes.counts()["added"] == 1
    assert isinstance(raised.value, probe.CacheMismatchError)
    verify = run("cache", "verify", first.path, "--strict")
    one_line_error(verify, "1 added, 1 removed, 2 modified", "probe extract")
    lenient = run("cache", "verify", first.path)
    assert lenient.exit_code == 0 and "Warning: the dataset changed" in lenient.output

    result = run("extract", image_tree, *OPTS)
    assert result.exit_code == 0, result.output
    assert "1 added, 1 removed, 2 modified" in result.output
    assert "3 extracted, 15 reused" in result.output
    cache = probe.FeatureCache.open(first.path)
    assert not cache.check_source()
    every = {p for split in cache.splits for p in cache.paths(split)}
    assert removed not in every and "cat/new_one.png" in every
    for split in cache.splits:
        for path, row in by_path(cache, split).items():
            if path in before[split] and path not in (modified, touched):
                np.testing.assert_array_equal(row, before[split][path])  # reused as is
    fresh = probe.extract(image_tree, "vgg16", weights="none", image_size=32,
                          cache_dir=cache_dir / "fresh")
    for split in cache.splits:
        np.testing.assert_allclose(cache.features(split), fresh.features(split),
                                   rtol=1e-5, atol=1e-6)
        assert cache.paths(split) == fresh.paths(split)


def test_check_source_when_the_dataset_is_gone(image_tree):
    cache = probe.extract(image_tree, "vgg16", weights="none", image_size=32)
    image_tree.rename(image_tree.with_name("moved"))
    changes = cache.check_source()
    assert changes and len(changes.removed) == 20
    assert "does not exist" in changes.message()
    with pytest.raises(probe.SourceChangedError):
        cache.check_source(strict=True)


def test_other_settings_never_mix_features(image_tree, cache_dir):
    base = probe.extract(image_tree, "vgg16", weights="none", image_size=32)
    variants = {"size": dict(image_size=40), "pooling": dict(pooling="max"),
                "weights": dict(seed=1)}
    others = {}
    for name, variant in variants.items():
        other, report = probe.extract_with_report(
            image_tree, "vgg16", **(dict(weights="none", image_size=32) | variant))
        assert other.path != base.path and other.path not in [o.path for o in others.values()]
        assert report.extracted == 18 and report.reused == 0, name
        assert other.attrs["feature_key"] != base.attrs["feature_key"]
        others[name] = other
    reseeded, original = by_path(others["weights"]), by_path(base)
    shared = sorted(set(reseeded) & set(original))
    assert shared and not np.allclose([reseeded[p] for p in shared], [original[p] for p in shared])
    # a cache copied under the name of other settings is refused, and left untouched
    impostor = cache_dir / "impostor"
    impostor.mkdir()
    (impostor / others["pooling"].path.name).write_bytes(base.path.read_bytes())
    before = snapshot(impostor)
    result = run("extract", image_tree, *OPTS, "--pooling", "max", "--cache-dir", impostor)
    one_line_error(result, "other settings", "will not overwrite")
    assert snapshot(impostor) == before


# --- bad files ----------------------------------------------------------------------------


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: over the decompression bomb limit
    without the memory."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    content = bytearray(buffer.getvalue())
    ihdr = content.index(b"IHDR")
    content[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(content[ihdr:ihdr + 17])) & 0xFFFFFFFF
    content[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(content)


def _bad_files_tree(root: Path) -> dict[str, str | None]:
    """A dataset with every kind of awkward file; returns {relative path: expected skip
    reason or None for decoded}."""
    make_tree(root, classes=("cat", "dog"), per_class=4)
    odd = root / "cat"
    expected: dict[str, str | None] = {}

    def add(name, content: bytes | None = None, reason=None, image=None, **save):
        path = odd / name
        if image is not None:
            image.save(path, **save)
        else:
            path.write_bytes(content)
        expected[f"cat/{name}"] = reason

    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    jpeg = io.BytesIO()
    rgb.save(jpeg, "JPEG")
    png = io.BytesIO()
    rgb.save(png, "PNG")
    add("zero.jpg", b"", "empty file")
    add("truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "truncated")
    add("text.jpg", b"just some words, not a picture\n", "not an image")
    add("png_named.jpg", png.getvalue())
    add("sixteen.png", image=Image.fromarray(np.full((12, 10), 40000, np.uint16)))
    add("cmyk.jpg", image=rgb.convert("CMYK"), format="JPEG")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    add("palette.png", image=palette, transparency=0)
    add("rgba.png", image=rgb.convert("RGBA"))
    add("gray.png", image=rgb.convert("L"))
    add("one.png", image=Image.new("RGB", (1, 1), (10, 200, 30)))
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    add("animated.gif", image=frames[0], save_all=True, append_images=frames[1:], duration=50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    sideways = Image.new("RGB", (40, 20), (255, 0, 0))
    sideways.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue as stored
    add("exif_rotated.jpg", image=sideways, format="JPEG", exif=exif, quality=95)
    add("bomb.png", _png_with_header_size(20000, 20000), "decompression bomb")
    add("with space.png", png.getvalue())
    add("gâteau 猫.png", png.getvalue())
    raw = os.fsencode(odd) + b"/caf\xe9-latin1.png"  # not valid UTF-8
    with open(raw, "wb") as handle:
        handle.write(png.getvalue())
    expected["cat/" + os.fsdecode(b"caf\xe9-latin1.png")] = None
    add("locked.png", png.getvalue(), "permission denied")
    os.chmod(odd / "locked.png", 0)
    (odd / "loop").symlink_to(odd)  # a directory symlink loop
    os.symlink("self.jpg", odd / "self.jpg")  # a file symlink to itself: not followed
    return expected


@pytest.fixture
def unreadable_when_mode_says_so(monkeypatch):
    """Root reads every file whatever its mode; as root, make a file without read
    permission fail the way it does for everyone else."""
    if os.geteuid() != 0:
        return
    real_open = Image.open

    def open_like_a_user(path, *args, **kwargs):
        if isinstance(path, (str, bytes, os.PathLike)) and not os.stat(path).st_mode & 0o444:
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_like_a_user)


def test_every_bad_file_is_decoded_or_skipped_with_a_reason(tmp_path, cache_dir,
                                                            unreadable_when_mode_says_so):
    root = tmp_path / "odd files"
    expected = _bad_files_tree(root)

    result = run("extract", root, *OPTS, "--strict")
    assert result.exit_code == 1  # --strict: the run completes, then fails on the skips
    assert "--strict: 5 files were skipped" in result.output
    assert "Traceback" not in result.output
    assert "Did not follow 2 symbolic links that lead back into the dataset" in result.output
    cache = probe.FeatureCache.open(next(cache_dir.glob("*.h5")))
    stored = {p for split in cache.splits for p in cache.paths(split)}
    skipped = dict(cache.skipped)
    for path, reason in expected.items():
        if reason is None:
            assert path in stored, (path, skipped.get(path))
        else:
            assert path in skipped, path
            assert reason in skipped[path].lower(), (path, skipped[path])
    assert not any("/loop/" in p for p in stored | set(skipped))  # the loop was not followed
    assert len(stored) == 8 + sum(1 for r in expected.values() if r is None)
    for split in cache.splits:
        assert np.isfinite(cache.features(split)).all()

    info = run("cache", "info", cache.path)
    assert info.exit_code == 0, info.output
    assert "skipped:        5" in info.output
    assert "cat/caf\\xe9-latin1.png" not in info.output  # decoded, so not listed as skipped
    for path, reason in expected.items():
        if reason:
            assert f"{path}: " in info.output
    again = run("extract", root, *OPTS)  # skipped files are remembered, not retried
    assert again.exit_code == 0 and "Cache up to date" in again.output

    # what the decoded pixels look like
    pixels = data.load_image(root / "cat" / "exif_rotated.jpg", 32)
    assert pixels[:8, :, 0].mean() > 200 and pixels[:8, :, 2].mean() < 60  # red on top
    assert pixels[-8:, :, 2].mean() > 200 and pixels[-8:, :, 0].mean() < 60  # blue below
    np.testing.assert_array_equal(data.load_image(root / "cat" / "animated.gif", 4)[0, 0],
                                  [255, 0, 0])  # first frame
    assert data.load_image(root / "cat" / "sixteen.png", 4)[0, 0, 0] == round(40000 / 257)
    assert data.load_image(root / "cat" / "one.png", 8).shape == (8, 8, 3)
    palette = data.load_image(root / "cat" / "palette.png", 24)
    assert (palette == 255).all(axis=-1).any()  # transparent colour composited onto white


def test_skipped_files_are_listed_without_strict(tmp_path, cache_dir):
    root = make_tree(tmp_path / "ds", classes=("a", "b"), per_class=3)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = run("extract", root, *OPTS)
    assert result.exit_code == 0
    assert "Skipped 1 files" in result.output
    info = run("cache", "info", next(cache_dir.glob("*.h5")), "--json")
    assert '"path": "a/broken.png"' in info.output


# --- locking ------------------------------------------------------------------------------


def test_no_file_locking_says_what_to_do(image_tree, cache_dir, monkeypatch):
    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(store.fcntl, "flock", no_locks)
    result = run("extract", image_tree, *OPTS)
    one_line_error(result, "file locking is not available", "--cache-dir", "PROBE_CACHE_DIR")
    assert not list(cache_dir.glob("*.h5"))


def test_hdf5_lock_failure_says_what_to_do(image_tree, monkeypatch):
    cache = probe.extract(image_tree, "vgg16", weights="none", image_size=32)

    def cannot_lock(path, mode):
        raise OSError("Unable to synchronously open file (unable to lock file, errno = 37, "
                      "error message = 'No locks available')")

    monkeypatch.setattr(cache_mod, "h5open", cannot_lock)
    result = run("cache", "info", cache.path)
    one_line_error(result, "HDF5_USE_FILE_LOCKING=FALSE", "--cache-dir")


def test_a_held_lock_stops_a_second_extraction(image_tree, cache_dir):
    first = probe.extract(image_tree, "vgg16", weights="none", image_size=32)
    lock = next(cache_dir.glob(".lock-*"))
    before = snapshot(cache_dir)
    (image_tree / "cat" / "cat_0.jpg").unlink()  # so the second run has work to do
    with store.CacheLock(lock):
        result = run("extract", image_tree, *OPTS)
    one_line_error(result, f"another probe extract (pid {os.getpid()})", "wait for it")
    assert {p: c for p, c in snapshot(cache_dir).items() if p != lock} == \
        {p: c for p, c in before.items() if p != lock}
    assert probe.FeatureCache.open(first.path).counts == first.counts


# --- bad command lines ----------------------------------------------------------------------


@pytest.mark.parametrize("csv,message", [
    ("path,label\ncat/cat_0.jpg,cat\ncat/missing.jpg,cat\n", "1 do not, e.g. 'cat/missing.jpg'"),
    ("path,label,colour\ncat/cat_0.jpg,cat,red\n", "columns=['path', 'label', 'colour']"),
    ("path,label,split\ncat/cat_0.jpg,cat,holdout\n", "split='holdout'"),
    ("file,class\ncat/cat_0.jpg,cat\n", "expected a CSV header"),
])
def test_bad_labels_files_touch_nothing(image_tree, cache_dir, tmp_path, csv, message):
    probe.extract(image_tree, "vgg16", weights="none", image_size=32)
    before = snapshot(cache_dir)
    labels = tmp_path / "labels.csv"
    labels.write_text(csv)
    result = run("extract", image_tree, *OPTS, "--labels", labels)
    one_line_error(result, message)
    assert snapshot(cache_dir) == before


@pytest.mark.parametrize("args,message", [
    (["--labels", "nowhere.csv"], "it does not exist"),
    (["--backbone", "alexnet"], "Received: backbone='alexnet'"),
    (["--image-size", "31"], "Received: image_size=31"),
    (["--val-fraction", "0.9"], "Received: val_fraction=0.9"),
    (["--batch-size", "0"], "Received: batch_size=0"),
])
def test_bad_options_touch_nothing(image_tree, cache_dir, args, message):
    probe.extract(image_tree, "vgg16", weights="none", image_size=32)
    before = snapshot(cache_dir)
    result = run("extract", image_tree, *OPTS, *args)
    one_line_error(result, message)
    assert snapshot(cache_dir) == before


def test_unwritable_cache_dir_is_one_line(image_tree, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    result = run("extract", image_tree, *OPTS, "--cache-dir", blocker / "sub")
    one_line_error(result, "cache directory", "--cache-dir")


def test_cache_commands_on_missing_files(tmp_path):
    one_line_error(run("cache", "info", tmp_path / "nope.h5"), "does not exist")
    one_line_error(run("cache", "verify", tmp_path / "nope.h5"), "does not exist")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle["x"] = np.arange(3)
    one_line_error(run("cache", "info", other), "carries no checksum", "probe cache reseal")
    one_line_error(run("cache", "reseal", other), "no probe header")  # read in a child


def test_dataset_directory_named_with_non_utf8_bytes(tmp_path):
    from conftest import make_tree

    root = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9-photos"))
    make_tree(root)
    cache = probe.extract(root, "vgg16", weights="none", image_size=32)
    reopened = probe.FeatureCache.open(cache.path)
    assert reopened.attrs["dataset_root"] == str(root)
    assert not reopened.check_source()


def test_unwritable_parts_directory_is_one_line(image_tree, cache_dir, monkeypatch):

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.PartStore, "write", disk_full)
    result = CliRunner().invoke(main, ["extract", str(image_tree), "--weights", "none",
                                       "--image-size", "32", "-q"])
    assert result.exit_code == 1
    assert "No space left on device" in result.output and "finished batches are kept" in result.output
    assert "Traceback" not in result.output
