"""A damaged cache is an error, never a crash, a hang or other numbers: the whole-file
checksum in the header, the format's promises checked on open, caches listed from their
headers alone, reads that notice a replaced file, and a seeded single-byte fuzz."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import probe
from conftest import make_separable_tree
from probe.features import cache as cache_mod, format as format_mod, store
from probe.cli import main

OPTS = ("--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--quiet")
HERE = Path(__file__).resolve()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for needle in needles:
        assert needle in result.output, result.output


def contents(cache) -> dict:
    """Everything a fit reads: features, labels and paths of every split, and the classes."""
    return {"classes": cache.classes,
            **{split: (cache.split(split).features, cache.split(split).labels,
                       cache.split(split).paths) for split in cache.splits}}


def same_contents(a: dict, b: dict) -> bool:
    if a.keys() != b.keys() or a["classes"] != b["classes"]:
        return False
    return all(x.dtype == y.dtype and np.array_equal(x, y) and lx.tolist() == ly.tolist()
               and px == py for (x, lx, px), (y, ly, py)
               in ((a[k], b[k]) for k in a if k != "classes"))


def unsealed_copy(source: Path, target: Path, edit=None, opener=None) -> Path:
    """The cache rewritten as an older probe wrote it (no header, no whole-file checksum),
    optionally edited: the format checks on open are then the only line of defence."""
    opener = opener or (lambda path: h5py.File(path, "w"))
    with h5py.File(source, "r") as old, opener(target) as new:
        for key, value in old.attrs.items():
            new.attrs[key] = value
        for name in old:
            group = new.create_group(name)
            for key, dataset in old[name].items():
                group.create_dataset(key, data=dataset[()], dtype=dataset.dtype,
                                     chunks=dataset.chunks, fletcher32=dataset.fletcher32,
                                     maxshape=dataset.maxshape)
        if edit is not None:
            edit(new)
    return target


@pytest.fixture
def colours(tmp_path) -> Path:
    return make_separable_tree(tmp_path / "colours", per_class=4,
                               classes=("blue", "green", "red"))


@pytest.fixture
def cache(colours):
    return probe.extract(colours, "vgg16", weights="none", image_size=32)


# --- the header and the attribute checksum ----------------------------------------------


def test_a_new_cache_carries_its_checksums(cache):
    assert cache.sealed and cache.damage() == ""
    assert cache.attrs["attrs_checksum"] == format_mod.attrs_checksum(cache.attrs)
    reordered = dict(reversed(list(cache.attrs.items())))
    assert format_mod.attrs_checksum(reordered) == cache.attrs["attrs_checksum"]
    assert format_mod.attrs_checksum({**cache.attrs, "image_size": 33}) != \
        cache.attrs["attrs_checksum"]
    with h5py.File(cache.path, "r") as handle:  # still plain HDF5 for anyone with h5py
        assert handle.userblock_size >= 4096
        assert handle["train/features"].shape == (cache.counts["train"], 512)
    assert cache.path.read_bytes().startswith(format_mod.SEAL_MAGIC)


@pytest.mark.parametrize("edit", [
    lambda f: f.attrs.__setitem__("classes", "xyz"),
    lambda f: f["train/features"].__setitem__((0, 0), np.nan),
    lambda f: f["train/labels"].__setitem__(0, 7),
    lambda f: f.__delitem__("test"),
], ids=["classes-xyz", "nan-feature", "garbage-label", "deleted-split"])
def test_an_edited_cache_is_damaged(cache, edit):
    with h5py.File(cache.path, "r+") as handle:
        edit(handle)
    with pytest.raises(probe.CacheError, match="corrupt or truncated"):
        probe.FeatureCache.open(cache.path)
    one_line_error(run("cache", "info", cache.path), "corrupt or truncated")
    one_line_error(run("cache", "verify", cache.path), "corrupt or truncated")


# --- the format's promises (caches written before the header) ----------------------------


def _attr(key, value, keep_checksum=False):
    def edit(handle):
        handle.attrs[key] = value
        if not keep_checksum:
            del handle.attrs["attrs_checksum"]
    return edit


def _replace(name, data, dtype=None):
    def edit(handle):
        del handle[name]
        handle.create_dataset(name, data=data, dtype=dtype)
    return edit


def _lose_a_row(handle):
    """Features whose last chunk was never stored: HDF5 reads its rows as zeros."""
    features = handle["train/features"][()]
    del handle["train/features"]
    handle.create_dataset("train/features", shape=features.shape, dtype=np.float32,
                          chunks=(1, features.shape[1]), fletcher32=True)[:-1] = features[:-1]


@pytest.mark.parametrize("edit,needle", [
    (_attr("classes", "xyz"), "attribute classes is 'xyz'"),
    (_attr("classes", '["a", "a", "b"]'), "attribute classes"),
    (_attr("classes", '["a", ""]'), "attribute classes"),
    (_attr("image_size", "big"), "attribute image_size"),
    (_attr("image_size", -3), "attribute image_size"),
    (_attr("pooling", "median"), "attribute pooling"),
    (_attr("feature_shape", "[0]"), "attribute feature_shape"),
    (_attr("val_fraction", 1.5), "attribute val_fraction"),
    (_attr("image_size", 33, keep_checksum=True), "attributes do not match their checksum"),
    (lambda f: f.move("test", "holdout"), "groups"),
    (lambda f: f.__delitem__("train/paths"), "'train' does not hold"),
    (_replace("train/features", np.zeros((6, 512)), np.float64), "'train/features' has dtype float64"),
    (_replace("train/features", np.zeros((6, 512), ">f4")), "'train/features' has dtype >f4"),
    (_replace("train/features", np.zeros((6, 256), np.float32)), "has shape (6, 256)"),
    (_replace("train/labels", np.zeros(6, np.int64)), "'train/labels' has dtype int64"),
    (_replace("train/labels", np.full(6, 3, np.int32)), "class indices outside 0..2"),
    (_replace("train/labels", np.zeros(5, np.int32)), "rows"),
    (_lose_a_row, "'train/features' has lost some of its stored rows"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_the_format_is_checked_on_open(cache, tmp_path, edit, needle):
    """Where HDF5 parses a file without the header (only in `reseal`'s child process), the
    format's promises are checked before anything is used."""
    damaged = unsealed_copy(cache.path, tmp_path / "old.h5", edit)
    with pytest.raises(probe.CacheError, match="corrupt or truncated") as raised:
        probe.FeatureCache._open(damaged, allow_unsealed=True)
    assert needle in str(raised.value)
    with pytest.raises(probe.CacheError, match="corrupt or truncated"):
        store._reseal_unsealed(str(damaged))  # what the child runs
    one_line_error(run("cache", "info", damaged), "carries no checksum", "probe cache reseal")


def test_an_unsealed_cache_is_resealed_by_extract_and_its_features_reused(cache, colours):
    expected = contents(cache)
    unsealed_copy(cache.path, cache.path.with_name("old.h5"))
    os.replace(cache.path.with_name("old.h5"), cache.path)
    with pytest.raises(probe.UnsealedCacheError, match="probe cache reseal"):
        probe.FeatureCache.open(cache.path)  # never parsed in this process

    again, report = probe.extract_with_report(colours, "vgg16", weights="none", image_size=32)
    assert report.status == "up to date" and report.extracted == 0  # every row matched
    assert any(note.startswith("resealed the older-format cache") for note in report.notes)
    assert again.sealed and again.damage() == ""
    assert same_contents(contents(again), expected)


def test_reseal_keeps_only_rows_that_match_their_images(cache, colours, cache_dir):
    """A flipped byte in a path string (not covered by any HDF5 checksum) and an image
    changed since: both rows are left out of the sealed rewrite, then extracted again."""
    expected = contents(cache)
    train = cache.split("train")
    renamed, touched = train.paths[0], train.paths[1]

    def flip_a_path(handle):
        paths = [p.decode() if isinstance(p, bytes) else p for p in handle["train/paths"][()]]
        paths[0] = paths[0][:-6] + "\udc8c" + paths[0][-6:]
        del handle["train/paths"]
        handle.create_dataset("train/paths", data=[os.fsencode(p) for p in paths],
                              dtype=h5py.string_dtype())

    unsealed_copy(cache.path, cache.path.with_name("old.h5"), flip_a_path)
    os.replace(cache.path.with_name("old.h5"), cache.path)
    os.utime(colours / touched, ns=(1, 1))
    result = run("cache", "reseal", cache.path)
    assert result.exit_code == 0, result.output
    assert f"{len(train) - 2 + sum(expected[s][1].shape[0] for s in ('val', 'test'))} rows " \
           "kept, 2 left out" in result.output, result.output
    resealed = probe.FeatureCache.open(cache.path)  # sealed now: read in this process
    kept = resealed.split("train")
    assert renamed not in kept.paths and touched not in kept.paths and len(kept) == len(train) - 2
    for i, path in enumerate(kept.paths):
        np.testing.assert_array_equal(kept.features[i], train.features[train.paths.index(path)])
        assert kept.labels[i] == train.labels[train.paths.index(path)]
    again, report = probe.extract_with_report(colours, "vgg16", weights="none", image_size=32)
    assert report.status == "extracted" and report.extracted == 2, report
    assert sorted(again.split("train").paths) == sorted(train.paths)


def test_a_reseal_that_crashes_is_one_line_and_keeps_the_file(cache, tmp_path, monkeypatch):
    from probe import isolated

    old = unsealed_copy(cache.path, tmp_path / "old.h5")
    before = old.read_bytes()

    def crashed(*args, what, **kwargs):
        raise isolated.IsolationError(f"{what} crashed the process that did it (SIGSEGV)",
                                      "crashed")

    monkeypatch.setattr(store, "run_isolated", crashed)
    one_line_error(run("cache", "reseal", old), "crashed the process", "SIGSEGV",
                   "Delete it and run `probe extract` again")
    assert old.read_bytes() == before


def test_hdf5_1_10_format_catches_every_flip_of_the_feature_datatype(cache, tmp_path):
    """Without the header, a flipped byte in the datatype message of train/features read
    the features back as float64, big-endian or other float32 numbers with the HDF5 1.8
    format; the writer's format (1.10 object headers) carries checksums."""
    expected = contents(cache)
    source = unsealed_copy(cache.path, tmp_path / "v110.h5",
                           opener=lambda path: format_mod.h5open(path, "w"))
    data = source.read_bytes()
    float32_message = b"\x11\x20\x1f\x00\x04\x00\x00\x00"
    assert data.count(float32_message) == 3  # features of train, val and test
    outcomes = set()
    for start in [i for i in range(len(data)) if data.startswith(float32_message, i)]:
        for offset in range(start, start + 20):
            flipped = bytearray(data)
            flipped[offset] ^= 0x01
            copy = tmp_path / "flipped.h5"
            copy.write_bytes(bytes(flipped))
            try:  # in this process, as `reseal`'s child reads it
                opened = probe.FeatureCache._open(copy, allow_unsealed=True)
                outcomes.add(same_contents(contents(opened), expected))
            except probe.CacheError:
                outcomes.add("error")
    assert False not in outcomes, outcomes


# --- extract rebuilds what it finds damaged ---------------------------------------------


@pytest.mark.parametrize("damage", ["flipped-feature", "nan-feature", "deleted-split",
                                    "nan-feature-without-header"])
def test_extract_rebuilds_a_damaged_cache(cache, colours, damage):
    expected = contents(cache)
    with h5py.File(cache.path, "r") as handle:
        features_at = handle["train/features"].id.get_chunk_info(0).byte_offset
    if damage == "flipped-feature":
        data = bytearray(cache.path.read_bytes())
        data[features_at + 9] ^= 0x10
        cache.path.write_bytes(bytes(data))
    elif damage == "nan-feature-without-header":  # only a full read finds it
        unsealed_copy(cache.path, cache.path.with_name("old.h5"),
                      lambda f: f["val/features"].__setitem__((1, 3), np.nan))
        os.replace(cache.path.with_name("old.h5"), cache.path)
    else:
        with h5py.File(cache.path, "r+") as handle:
            if damage == "nan-feature":
                handle["val/features"][1, 3] = np.inf
            else:
                del handle["test"]
    result = run("extract", colours, *OPTS[:-1])
    assert result.exit_code == 0, result.output
    assert "Rebuilding a damaged cache" in result.output, result.output
    assert ("NaN or infinite" if damage.endswith("without-header") else "corrupt") in result.output
    rebuilt = probe.FeatureCache.open(cache.path)
    assert rebuilt.damage() == ""
    assert contents(rebuilt).keys() == expected.keys()
    for split in rebuilt.splits:
        np.testing.assert_allclose(rebuilt.features(split), expected[split][0], rtol=1e-5, atol=1e-6)
    again, report = probe.extract_with_report(colours, "vgg16", weights="none", image_size=32)
    assert report.status == "up to date"


def test_verify_never_calls_an_unsealed_cache_intact_and_reseal_finds_its_nan(cache, tmp_path):
    damaged = unsealed_copy(cache.path, tmp_path / "old.h5",
                            lambda f: f["val/features"].__setitem__((0, 0), np.nan))
    opened = probe.FeatureCache._open(damaged, allow_unsealed=True)  # the format is fine
    assert "NaN or infinite" in opened.damage()
    with pytest.raises(probe.CacheError, match="NaN or infinite"):
        opened.split("val")
    before = damaged.read_bytes()
    verified = run("cache", "verify", damaged)
    one_line_error(verified, "carries no checksum", "probe cache reseal")
    assert "intact" not in verified.output
    one_line_error(run("cache", "reseal", damaged), "NaN or infinite")  # in a child process
    assert damaged.read_bytes() == before  # nothing resealed, nothing lost


# --- only the files needed are opened ---------------------------------------------------


def test_a_damaged_file_does_not_break_listing_fit_or_other_extractions(cache, tmp_path,
                                                                        cache_dir, monkeypatch):
    data = cache.path.read_bytes()
    (cache_dir / "header.h5").write_bytes(data[:40] + b"X" + data[41:])
    body = bytearray(data)
    body[len(data) // 2] ^= 0xFF
    (cache_dir / "body.h5").write_bytes(bytes(body))

    def no_hdf5(path, mode, userblock=0):
        raise AssertionError(f"HDF5 opened {path}")

    with monkeypatch.context() as patch:  # listing sealed caches reads their headers only
        patch.setattr(cache_mod, "h5open", no_hdf5)
        listed = {c.path.name for c in probe.list_caches()}
    assert listed == {cache.path.name, "body.h5"}

    (cache_dir / "garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(3000))
    assert {c.path.name for c in probe.list_caches()} == {cache.path.name, "body.h5"}

    with monkeypatch.context() as patch:  # an unsealed file is never parsed in process
        patch.setattr(cache_mod, "h5open", no_hdf5)
        listing = run("cache", "ls")
    assert listing.exit_code == 0, listing.output
    assert "Unsealed (older format)" in listing.output and "garbage.h5" in listing.output
    assert "probe cache reseal" in listing.output
    assert "Not a readable cache" in listing.output and "header.h5" in listing.output
    os.utime(cache.path)  # the most recent sealed cache: fit picks it
    os.utime(cache_dir / "garbage.h5")  # newer still, but unsealed: never a candidate
    opened = []
    real_open = format_mod.h5open
    with monkeypatch.context() as patch:
        patch.setattr(cache_mod, "h5open",
                      lambda path, *a, **k: opened.append(Path(path).name) or real_open(path, *a, **k))
        fitted = run("fit", "--head", "logreg")
    assert "garbage.h5" not in opened and cache.path.name in opened
    assert fitted.exit_code == 0, fitted.output
    one_line_error(run("fit", "--cache", cache_dir / "body.h5"), "corrupt or truncated")
    other = make_separable_tree(tmp_path / "others", per_class=4, classes=("red", "blue"))
    assert probe.extract(other, "vgg16", weights="none", image_size=32).damage() == ""


# --- one consistent snapshot ------------------------------------------------------------


def test_fit_notices_a_cache_replaced_between_its_reads(cache, colours, monkeypatch):
    read = probe.FeatureCache.split

    def split_then_rewrite(self, name):
        got = read(self, name)
        if name == "train":  # another extraction replaces the cache meanwhile
            (colours / "green").rename(colours / "lime")
            probe.extract(colours, "vgg16", weights="none", image_size=32)
        return got

    monkeypatch.setattr(probe.FeatureCache, "split", split_then_rewrite)
    with pytest.raises(probe.CacheError, match="changed while it was read .*run the command again"):
        probe.fit(cache.path)
    monkeypatch.undo()
    assert probe.FeatureCache.open(cache.path).classes == ["blue", "lime", "red"]
    assert probe.fit(cache.path).metrics["split"] == "test"


# --- a seeded single-byte fuzz ----------------------------------------------------------


def _fuzz_offsets(path: Path, seed: int = 12) -> list[tuple[int, int]]:
    """(offset, xor mask) over the header, HDF5 metadata, the data chunks and the
    datatype message of the features."""
    rng = np.random.default_rng(seed)
    data = path.read_bytes()
    with h5py.File(path, "r") as handle:
        header = handle.userblock_size
        chunks = []
        for name in ("train", "val", "test", "skipped"):
            for dataset in handle[name].values():
                if dataset.chunks and dataset.shape[0]:
                    info = dataset.id.get_chunk_info(0)
                    chunks.append((info.byte_offset, info.byte_offset + info.size))
    used = data.index(b"\0", 0, header)
    in_chunks = [o for start, end in chunks for o in range(start, end)]
    metadata = sorted(set(range(header, len(data))) - set(in_chunks))
    dtype_at = data.index(b"\x11\x20\x1f\x00\x04\x00\x00\x00")
    offsets = [*rng.integers(0, used, 24), *rng.integers(used, header, 4),
               *rng.choice(metadata, 36), *rng.choice(in_chunks, 20),
               *range(dtype_at, dtype_at + 16)]
    return [(int(o), int(rng.integers(1, 256))) for o in offsets]


def _outcome(result, expected_output: str) -> str:
    """'same', 'error' (one line, exit 1) or what went wrong."""
    if result.exit_code == 0:
        return "same" if result.output == expected_output else f"other output: {result.output!r}"
    lines = result.output.strip().splitlines()
    if result.exit_code == 1 and isinstance(result.exception, SystemExit) and len(lines) == 1 \
            and "Traceback" not in result.output:
        return "error"
    return f"exit {result.exit_code}, {result.exception!r}: {result.output[-300:]!r}"


def fuzz_worker(original: str, copies: list[str]) -> None:
    """Check each flipped copy as `probe cache info`, `probe cache verify` and a fit would
    read it; one JSON line per copy, flushed, so a crash or hang names its copy."""
    original_cache = probe.FeatureCache.open(original)
    expected = contents(original_cache)
    info = run("cache", "info", original, "--json").output
    verify = run("cache", "verify", original).output
    for copy in copies:
        report = {"copy": copy}
        same = lambda text: text.replace(original, copy)  # noqa: E731
        report["info"] = _outcome(run("cache", "info", copy, "--json"), same(info))
        report["verify"] = _outcome(run("cache", "verify", copy), same(verify))
        try:
            opened = probe.FeatureCache.open(copy)
            report["read"] = "same" if same_contents(contents(opened), expected) else "other numbers"
            report["damage"] = "none" if opened.damage() == "" else "found"
        except probe.CacheError as error:
            report["read"] = report["damage"] = "error" if len(str(error).splitlines()) == 1 \
                else "multi-line error"
        except Exception as error:  # noqa: BLE001 (the point: nothing else may escape)
            report["read"] = f"{type(error).__name__}: {error}"
        print(json.dumps(report), flush=True)


def _bad(report: dict) -> str:
    problems = [f"{k}: {v}" for k, v in report.items()
                if k in ("info", "verify", "read") and v not in ("same", "error")]
    if report.get("verify") == "same" and report.get("read") != "same":
        problems.append("verify says intact but the data differ")
    if report.get("damage") == "none" and report.get("read") != "same":
        problems.append("no damage found but the data differ")
    return "; ".join(problems)


def test_single_byte_flips_give_the_same_results_or_one_clean_error(cache, tmp_path):
    copies = []
    data = cache.path.read_bytes()
    for offset, mask in _fuzz_offsets(cache.path):
        flipped = bytearray(data)
        flipped[offset] ^= mask
        copy = tmp_path / f"flip-{offset}-{mask}.h5"
        copy.write_bytes(bytes(flipped))
        copies.append(str(copy))
    assert len(copies) == 100
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), str(HERE.parent)])}
    try:
        done = subprocess.run([sys.executable, str(HERE), str(cache.path), *copies],
                              capture_output=True, text=True, timeout=300, env=env)
        output, crashed = done.stdout, done.returncode != 0 and f"exit {done.returncode}"
    except subprocess.TimeoutExpired as timeout:
        output = (timeout.stdout or b"").decode() if isinstance(timeout.stdout, bytes) \
            else (timeout.stdout or "")
        crashed = "hang (no answer in 240 s)"
    reports = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    if crashed:
        culprit = copies[len(reports)] if len(reports) < len(copies) else "after the last copy"
        pytest.fail(f"{crashed} at {culprit}")
    assert len(reports) == len(copies)
    failures = {r["copy"]: _bad(r) for r in reports if _bad(r)}
    assert not failures, failures
    # the header's checksums cover every byte, so each flip is found (none is ignored)
    assert all(r["read"] == r["info"] == r["verify"] == "error" for r in reports)

    # the real command line: exit 1, one line on stderr, no traceback
    for copy in (copies[0], copies[40]):
        result = subprocess.run([sys.executable, "-m", "probe.cli", "cache", "info", copy],
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


if __name__ == "__main__":  # the fuzz worker, run in a subprocess by the test above
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    fuzz_worker(sys.argv[1], sys.argv[2:])
