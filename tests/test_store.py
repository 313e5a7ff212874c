"""Writing: atomic writes, a full disk during the final write, leftovers of killed runs,
and the batch loop's memory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import probe
from conftest import make_tree
from probe import backbones, data, files
from probe.features import store
from probe.features.engines.local import run_batches
from probe.features.plan import Source

ROOT = Path(__file__).resolve().parents[1]
OPTS = dict(weights="none", image_size=32)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "config.json"
    files.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with files.atomic_write(target, "w", encoding="utf-8") as handle:
            handle.write("half of the new")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    files.write_text(target, "new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_no_other_file_writes_in_the_package():
    """Every file probe writes goes through files' helpers (or a library writing to the
    temporary path they give): no bare write_text, os.replace or mkstemp elsewhere."""
    old_heads = ROOT / "probe" / "heads.py"  # being replaced by the probe/heads/ package
    offenders = []
    for path in (ROOT / "probe").rglob("*.py"):
        if path.name == "files.py" or path == old_heads:
            continue
        text = path.read_text(encoding="utf-8")
        for needle in (r"os\.replace\(", r"(?<!files)\.write_text\(", r"\.write_bytes\(",
                       r"mkstemp\("):
            if re.search(needle, text):
                offenders.append(f"{path.name}: {needle}")
    assert not offenders, offenders


DISK_FULL = textwrap.dedent("""
    import errno, sys
    from probe.features import store

    where = sys.argv.pop(1)
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    if where == "split":  # after a split's datasets were created, the file open
        real = store._write_split
        def write_split(*args, **kwargs):
            real(*args, **kwargs)
            full()
        store._write_split = write_split
    else:  # while rows are copied into the open features dataset
        store._RowReader.read = full
    from probe.cli import main
    main(sys.argv[1:], prog_name="probe")
""")


@pytest.mark.parametrize("where", ["split", "rows"])
def test_a_full_disk_during_the_final_write_is_one_line(tmp_path, cache_dir, where):
    root = make_tree(tmp_path / "ds")
    driver = tmp_path / "driver.py"
    driver.write_text(DISK_FULL)
    args = ["extract", str(root), "--weights", "none", "--image-size", "32", "-q"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3",
               PROBE_CACHE_DIR=str(cache_dir))
    done = subprocess.run([sys.executable, str(driver), where, *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, (done.returncode, done.stderr)  # not a signal (segfault)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("Error: could not write the cache"), lines
    assert "No space left on device" in lines[-1] and "finished batches are kept" in lines[-1]
    assert not list(cache_dir.glob("*.h5")) and not list(cache_dir.glob(".*.tmp-*"))
    assert list(cache_dir.glob(".parts-*/part-*.npz"))  # the finished batches survived
    cache, report = probe.extract_with_report(root, "vgg16", **OPTS)
    assert report.extracted == 0 and report.reused == 18


def test_an_up_to_date_run_removes_parts_left_by_a_killed_clean_up(image_tree, cache_dir,
                                                                     monkeypatch):
    with monkeypatch.context() as patch:  # killed before the parts were deleted
        patch.setattr(store.PartStore, "clear", lambda self: None)
        first = probe.extract(image_tree, "vgg16", batch_size=8, **OPTS)
    parts_dir = next(cache_dir.glob(".parts-*"))
    assert len(list(parts_dir.glob("part-*.npz"))) == 3
    # work of another, interrupted extraction of the same features stays for it
    other = store.PartStore(parts_dir).write(np.zeros((1, 512), np.float32),
                                             ["cat/other.png"], [1], [1], [])
    _, report = probe.extract_with_report(image_tree, "vgg16", **OPTS)
    assert report.status == "up to date"
    assert list(parts_dir.iterdir()) == [other]
    other.unlink()
    store.PartStore(parts_dir).write(np.zeros((1, 512), np.float32), ["cat/cat_0.jpg"],
                                     *zip(*[(s.size, s.mtime) for s in _sources(first)][:1]), [])
    probe.extract(image_tree, "vgg16", **OPTS)
    assert not parts_dir.exists()


def _sources(cache):
    root = Path(cache.attrs["dataset_root"])
    stat = os.stat(root / "cat/cat_0.jpg")
    return [Source(data.Sample("cat/cat_0.jpg", 0, "train"), stat.st_size, stat.st_mtime_ns)]


class _RecordingModel:
    output_shape = (None, 4)

    def __init__(self):
        self.shapes = []

    def predict_on_batch(self, inputs):
        self.shapes.append(inputs.shape)
        return np.ones((len(inputs), 4), np.float32)


def _todo(root: Path, n: int) -> list[Source]:
    found = data.discover(root)
    return [Source(s, 0, 0) for s in found.samples[:n]]


def test_a_short_job_is_not_padded_to_the_batch_size(tmp_path):
    root = make_tree(tmp_path / "ds")
    model = _RecordingModel()
    batches = list(run_batches(model, backbones.get("vgg16"), root, _todo(root, 5), 32, 4096))
    assert model.shapes == [(5, 32, 32, 3)]
    assert [len(b) for b in batches] == [5] and batches[0].features.shape == (5, 4)


class _InputsModel:
    """Features that are the inputs themselves, flattened: what reached each row."""

    def __init__(self):
        self.batches = []

    def predict_on_batch(self, inputs):
        self.batches.append(inputs.copy())
        return inputs.reshape(len(inputs), -1)


def test_each_row_gets_its_own_image_around_files_that_can_not_be_decoded(tmp_path):
    root = make_tree(tmp_path / "ds")
    todo = _todo(root, 10)
    for broken in (todo[1], todo[2], todo[8]):  # two in the first batch, one in the last
        (root / broken.sample.path).write_bytes(b"not a jpeg")
    spec, model = backbones.get("resnet50"), _InputsModel()
    batches = list(run_batches(model, spec, root, todo, 32, 4))
    assert [[s.sample.path for s in b.done] for b in batches] == [
        [todo[0].sample.path, todo[3].sample.path], [s.sample.path for s in todo[4:8]],
        [todo[9].sample.path]]
    assert [path for b in batches for path, *_ in b.skipped] == \
        [todo[i].sample.path for i in (1, 2, 8)]
    for batch in batches:
        for source, row in zip(batch.done, batch.features):
            expected = spec.preprocess_input(data.load_image(root / source.sample.path, 32))
            np.testing.assert_array_equal(row, expected.ravel())
    # the rows after a batch's decoded images are zeros, whatever was decoded there first
    assert all(len(inputs) == 4 for inputs in model.batches)
    assert not model.batches[0][2:].any() and not model.batches[2][1:].any()


def test_features_with_nan_or_infinity_stop_the_run_naming_the_image(tmp_path):
    class Overflowing(_RecordingModel):
        def predict_on_batch(self, inputs):
            features = super().predict_on_batch(inputs)
            if len(self.shapes) == 2:  # the second batch overflows in its second row
                features[1, 2] = np.inf
            return features

    root = make_tree(tmp_path / "ds")
    todo = _todo(root, 8)
    batches = run_batches(Overflowing(), backbones.get("vgg16"), root, todo, 32, 4)
    assert len(next(batches)) == 4  # the first batch is fine
    with pytest.raises(probe.ProbeError, match=rf"1 of 4 images.*'{todo[5].sample.path}'"
                                               r".*--precision float32"):
        next(batches)


def test_the_last_batch_is_padded_to_one_traced_shape(tmp_path):
    root = make_tree(tmp_path / "ds")
    model = _RecordingModel()
    batches = list(run_batches(model, backbones.get("vgg16"), root, _todo(root, 7), 32, 4))
    assert model.shapes == [(4, 32, 32, 3), (4, 32, 32, 3)]
    assert [b.features.shape[0] for b in batches] == [4, 3]
    assert [s.sample.path for b in batches for s in b.done] == \
        [s.sample.path for s in _todo(root, 7)]
    inputs_model = _InputsModel()
    list(run_batches(inputs_model, backbones.get("vgg16"), root, _todo(root, 7), 32, 4))
    assert inputs_model.batches[1][:3].any() and not inputs_model.batches[1][3:].any()
