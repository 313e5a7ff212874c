"""A run (or comparison) directory is trusted only as probe wrote it: its manifest refuses an
edited, deleted or added file, and config.json / metrics.json of the wrong JSON shape are one
error line naming the file and the key, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import probe
from conftest import make_separable_tree
from probe import files, run_files
from probe.cli import main
from probe.errors import RunError


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One logistic run (random-weight vgg16 at 32 px, no report) and its dataset; every
    test edits a copy of it."""
    base = tmp_path_factory.mktemp("integrity")
    root = make_separable_tree(base / "colours", classes=("blue", "green", "red"))
    cache = probe.extract(root, "vgg16", weights="none", image_size=32, cache_dir=base / "cache",
                          runtime="tensorflow")
    run = probe.fit(cache, "logreg", C=1.0, html_report=False)
    return run, root


@pytest.fixture
def run_copy(fitted, tmp_path) -> Path:
    run, _ = fitted
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    return copy


def swap_class_rows(run_dir: Path) -> None:
    """The adversary's edit: the class rows of the logistic head swapped, so that every
    prediction would come out under another class name."""
    path = run_dir / "head" / "head.npz"
    with np.load(path) as data:
        arrays = dict(data)
    arrays["coef"] = arrays["coef"][[1, 0, 2]]
    arrays["intercept"] = arrays["intercept"][[1, 0, 2]]
    np.savez(path, **arrays)


def readers(run_dir: Path, images: Path, out: Path) -> dict:
    """Every way probe reads a run back, by name."""
    return {
        "load": lambda: probe.Run.load(run_dir),
        "predict": lambda: probe.predict(run_dir, [images]),
        "load_images": lambda: probe.load_images([images / "red" / "red_0.png"], run_dir),
        "export": lambda: probe.export(run_dir, out / "model.keras"),
        "finetune": lambda: probe.finetune(run_dir, unfreeze=1, epochs=1),
        "report": lambda: probe.write_report(run_dir),
    }


def test_a_fresh_run_lists_every_file_it_wrote(fitted):
    run, _ = fitted
    manifest = json.loads((run.path / run_files.MANIFEST).read_text())
    assert manifest["format"] == "probe-run-manifest" and manifest["kind"] == "run"
    written = {p.relative_to(run.path).as_posix() for p in run.path.rglob("*")
               if p.is_file() and p.name != run_files.MANIFEST}
    assert set(manifest["files"]) == written
    assert {"config.json", "metrics.json", "head/head.npz", "head/head.json",
            "reliability.png"} <= written
    entry = manifest["files"]["head/head.npz"]
    assert entry["size"] == (run.path / "head" / "head.npz").stat().st_size
    assert entry["sha256"] == files.file_sha256(run.path / "head" / "head.npz")


def test_swapped_class_rows_are_refused_by_every_reader(fitted, run_copy, tmp_path):
    run, images = fitted
    stale = probe.Run.load(run_copy)  # loaded before the edit
    swap_class_rows(run_copy)
    calls = readers(run_copy, images, tmp_path)
    calls["predict a Run loaded before"] = lambda: probe.predict(stale, [images])
    for name, call in calls.items():
        with pytest.raises(RunError) as refused:
            call()
        message = str(refused.value)
        assert "run file 'head/head.npz'" in message and "does not match its checksum" in message, name
        assert f"probe fit --cache {run.config['cache']} --head logreg" in message, name
    assert not (tmp_path / "model.keras").exists() and not (run_copy / "report.html").exists()


@pytest.mark.parametrize("command", ["predict", "export", "finetune", "report"])
def test_the_cli_refuses_an_edited_run_in_one_line(fitted, run_copy, tmp_path, command):
    _, images = fitted
    swap_class_rows(run_copy)
    extra = {"predict": [str(images)], "export": [str(tmp_path / "m.keras")],
             "finetune": ["--quiet"], "report": []}[command]
    result = CliRunner().invoke(main, [command, str(run_copy), *extra])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.count("\n") == 1, result.output
    assert "run file 'head/head.npz'" in result.output and "`probe fit --cache" in result.output


def _unlist(run_dir: Path, name: str) -> None:
    """The manifest without the entry of `name`, as if the file were added afterwards."""
    path = run_dir / run_files.MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["files"][name]
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, expected", [
    (lambda d: (d / "test_predictions.csv").unlink(),
     "run file 'test_predictions.csv' of run '{run}' is missing"),
    (lambda d: (d / "head" / "head.json").unlink(), "run file 'head/head.json' of run '{run}' is missing"),
    (lambda d: (d / run_files.MANIFEST).unlink(), "run '{run}' has no manifest.json: it was written by an older probe"),
    (lambda d: (d / run_files.MANIFEST).write_text('{"files": [1]'), "run file 'manifest.json' of run '{run}' is damaged"),
    (lambda d: (d / "model.keras").write_bytes(b"PK"), "run file 'model.keras' of run '{run}' is not in its manifest.json"),
    (lambda d: (d / "head" / "extra.npy").write_bytes(b"x"), "run file 'head/extra.npy' of run '{run}' is not in"),
    (lambda d: _unlist(d, "reliability.png"), "run file 'reliability.png' of run '{run}' is not in"),
], ids=["deleted-predictions", "deleted-head-json", "no-manifest", "damaged-manifest",
        "added-model", "added-head-file", "unlisted-reliability"])
def test_a_deleted_added_or_unlisted_file_is_refused(fitted, run_copy, tmp_path, edit, expected):
    _, images = fitted
    edit(run_copy)
    for name, call in readers(run_copy, images, tmp_path).items():
        with pytest.raises(RunError, match="fit it again with `probe fit") as refused:
            call()
        assert expected.format(run=run_copy) in str(refused.value), name


def test_files_probe_adds_later_do_not_break_the_run(fitted, run_copy):
    _, images = fitted
    probe.write_report(run_copy)  # report.html is outside the manifest
    probe.predict(run_copy, [images / "red"], output=run_copy / "predictions.csv")
    (run_copy / "notes.txt").write_text("mine")  # probe never reads it
    assert probe.Run.load(run_copy).classes == ["blue", "green", "red"]
    probe.write_report(run_copy)


def test_a_comparison_directory_is_verified_before_its_report(tmp_path):
    directory = tmp_path / "compare"
    directory.mkdir()
    (directory / "compare.csv").write_text("rank,backbone,head,accuracy,status\n1,vgg16,logreg,0.9,ok\n")
    run_files.write_manifest(directory, "comparison")
    assert probe.write_report(directory).is_file()
    (directory / "compare.csv").write_text("rank,backbone,head,accuracy,status\n1,vgg16,logreg,1.0,ok\n")
    result = CliRunner().invoke(main, ["report", str(directory)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert ("comparison file 'compare.csv' of comparison" in result.output
            and "does not match its checksum" in result.output and "probe compare" in result.output)


def _set(data, key, value):
    if key is None:
        return value
    data[key] = value
    return data


@pytest.mark.parametrize("name, key, value, expected", [
    ("config.json", None, ["vgg16"], "expected an object at the top level, received a list"),
    ("metrics.json", None, "accuracy", "expected an object at the top level, received a string"),
    ("config.json", "classes", "blue,green,red", "expected a list at 'classes', received a string"),
    ("config.json", "head_params", [1.0], "expected an object or null at 'head_params', received a list"),
    ("config.json", "dataset_root", {"path": "x"}, "expected a string or null at 'dataset_root', received an object"),
    ("config.json", "image_size", "32", "expected an integer at 'image_size', received a string"),
    ("metrics.json", "accuracy", [1.0], "expected a number or null at 'accuracy', received a list"),
    ("metrics.json", "per_class", [{"precision": 1.0}], "expected an object at 'per_class', received a list"),
    ("metrics.json", "skipped_files", "none", "expected a list at 'skipped_files', received a string"),
    ("metrics.json", "split", ["test"], "expected a string at 'split', received a list"),
    ("config.json", "temperature", -2.0, "expected a finite number > 0 at 'temperature', received a number"),
    ("metrics.json", "expected_calibration_error", "0.1",
     "expected a number or null at 'expected_calibration_error', received a string"),
], ids=["config-list", "metrics-string", "classes-string", "head-params-list",
        "dataset-root-object", "image-size-string", "accuracy-list", "per-class-list",
        "skipped-files-string", "split-list", "temperature-negative", "ece-string"])
def test_a_run_file_of_the_wrong_json_shape_is_one_line(fitted, run_copy, name, key, value,
                                                        expected):
    """The manifest is written again after the edit: this is the second line of defence."""
    path = run_copy / name
    path.write_text(json.dumps(_set(json.loads(path.read_text()), key, value)))
    run_files.write_manifest(run_copy)
    result = CliRunner().invoke(main, ["report", str(run_copy)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.count("\n") == 1, result.output
    assert f"run file '{name}' of run '{run_copy}': {expected}; fit it again with" in result.output
    assert not (run_copy / "report.html").exists()


def test_nested_keys_are_named_in_full(run_copy):
    path = run_copy / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["per_class"]["green"]["recall"] = "high"
    path.write_text(json.dumps(metrics))
    run_files.write_manifest(run_copy)
    with pytest.raises(RunError, match="expected a number or null at 'per_class.green.recall', "
                                       "received a string"):
        probe.Run.load(run_copy)


def test_a_curve_directory_has_a_manifest_too(fitted, tmp_path):
    run, _ = fitted
    result = probe.curve(run.config["cache"], shots="2", repeats=1, heads="logreg",
                         runs_dir=tmp_path)
    run_files.verify_directory(result.path, "curve")
    with open(result.path / "curve.csv", "a") as handle:
        handle.write("logreg,2,1,6,,1.0,1.0,fixed,{},test,test\n")
    with pytest.raises(RunError, match="run file 'curve.csv' .* does not match its checksum .*; "
                                       "run `probe curve` again"):
        run_files.verify_directory(result.path, "curve")
