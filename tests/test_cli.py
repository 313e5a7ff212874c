import json

import pytest
from click.testing import CliRunner

from conftest import make_tree
from probe.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_has_examples():
    for command in (["extract"], ["backbones"], ["cache", "ls"], ["cache", "info"],
                    ["cache", "reseal"]):
        result = run(*command, "--help")
        assert result.exit_code == 0
        assert "Example: probe" in result.output


def test_backbones_table():
    result = run("backbones")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[0] == "backbone"
    assert any(line.split()[:5] == ["xception", "299", "71", "2048", "tf"] for line in lines)


def test_extract_then_up_to_date_then_info(image_tree, cache_dir):
    args = ("extract", image_tree, "--weights", "none", "--image-size", 32, "--quiet")
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert "18 extracted" in first.output
    second = run(*args)
    assert second.exit_code == 0
    assert "Cache up to date" in second.output
    listing = run("cache", "ls")
    assert "vgg16" in listing.output and "train=" in listing.output
    path = next(cache_dir.glob("*.h5"))
    info = run("cache", "info", path, "--json")
    data = json.loads(info.output)
    assert data["backbone"] == "vgg16" and data["feature_shape"] == [512]
    assert {item["path"] for item in data["skipped"]} == {"cat/empty.jpg", "dog/text.jpg"}


def test_strict_fails_after_skips(image_tree):
    result = run("extract", image_tree, "--weights", "none", "--image-size", 32, "-q", "--strict")
    assert result.exit_code == 1
    assert "2 files were skipped" in result.output


@pytest.mark.parametrize("setup,args,message", [
    (None, ["--backbone", "alexnet"], "unknown backbone; expected one of"),
    (None, ["--image-size", "16"], "at least 32 pixels"),
    ("missing", [], "does not exist"),
    ("empty", [], "found no images"),
    ("single", [], "only one class: 'cat'"),
])
def test_bad_command_lines_give_one_line(tmp_path, setup, args, message):
    root = tmp_path / "ds"
    if setup is None:
        make_tree(root)
    elif setup == "empty":
        root.mkdir()
    elif setup == "single":
        make_tree(root, classes=("cat",))
    result = run("extract", root, "--weights", "none", *args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cache_info_on_a_file_that_is_not_a_cache(tmp_path):
    bogus = tmp_path / "bogus.h5"
    bogus.write_bytes(b"not hdf5 at all")
    result = run("cache", "info", bogus)
    assert result.exit_code == 1
    assert "corrupt or truncated" in result.output and "probe extract" in result.output


def test_fit_predict_export_from_the_command_line(tmp_path, cache_dir):
    from conftest import make_separable_tree

    root = make_separable_tree(tmp_path / "colours")
    assert run("extract", root, "--weights", "none", "--image-size", 32, "-q").exit_code == 0
    fitted = run("fit", "--head", "logreg")
    assert fitted.exit_code == 0, fitted.output
    assert "Chosen settings: C " in fitted.output
    assert any(line.split()[:1] == ["accuracy"] for line in fitted.output.splitlines())
    run_dir = fitted.output.strip().splitlines()[-1].removeprefix("Run: ")
    dense = run("fit", "--head", "dense", "--epochs", 3, "--hidden-units", 8)
    assert dense.exit_code == 0, dense.output
    predicted = run("predict", run_dir, root / "red", "-o", tmp_path / "p.csv")
    assert predicted.exit_code == 0, predicted.output
    assert predicted.output.splitlines()[0].split() == ["path", "predicted", "blue", "red", "error"]
    assert (tmp_path / "p.csv").is_file()
    exported = run("export", run_dir, tmp_path / "m.keras")
    assert exported.exit_code == 0 and (tmp_path / "m.keras").is_file()


@pytest.mark.parametrize("args,message", [
    (["fit"], "found none. Run `probe extract"),
    (["fit", "--head", "svm"], "Invalid value for '--head'"),
    (["predict", "not-a-run", "x.jpg"], "expected a run directory"),
    (["export", "not-a-run", "m.keras"], "expected a run directory"),
])
def test_fit_predict_export_errors(args, message):
    result = run(*args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_commands_print_no_tensorflow_start_up_lines(tmp_path):
    """A fresh interpreter, as a user's shell would run it: only probe's own lines."""
    import subprocess
    import sys

    from conftest import make_separable_tree

    root = make_separable_tree(tmp_path / "colours", per_class=4)
    env = {"PROBE_CACHE_DIR": str(tmp_path / "c"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "probe.cli", "extract", str(root), "--weights", "none",
         "--image-size", "32"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["Extracting 8 of 8 images"]
    assert result.stdout.startswith("Wrote ")


def test_importing_the_library_leaves_environment_stderr_and_logging_alone(tmp_path):
    """Keeping TensorFlow quiet is the CLI's business, not the library's."""
    import os
    import subprocess
    import sys

    script = (
        "import logging, os, sys\n"
        "env, err = dict(os.environ), sys.stderr\n"
        "def refuse(*args): raise AssertionError('file descriptor 2 redirected')\n"
        "os.dup2 = refuse\n"
        "import probe\n"
        "assert dict(os.environ) == env and sys.stderr is err\n"
        "import probe._keras\n"  # TensorFlow sets variables of its own (TPU_*, KMP_*)
        "assert 'TF_CPP_MIN_LOG_LEVEL' not in os.environ and sys.stderr is err\n"
        "assert logging.getLogger('tensorflow').level == logging.NOTSET\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_fit_with_a_class_absent_from_validation_is_one_line(tmp_path):
    from conftest import make_image

    root = tmp_path / "ds"
    for name in ("blue", "red"):
        for i in range(4):
            make_image(root / "train" / name / f"{i}.png", seed=i + (10 if name == "red" else 0))
        make_image(root / "test" / name / "t.png", seed=50 + len(name))
    make_image(root / "val" / "blue" / "v.png", seed=60)
    assert run("extract", root, "--weights", "none", "--image-size", 32, "-q").exit_code == 0
    result = run("fit", "--head", "logreg")
    assert result.exit_code == 1
    assert "'red' has training samples but none in the validation split" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("args, expected", [
    (["fit", "--seed", "-1"], "Invalid value for '--seed'"),
    (["extract", "--no-such-option", "x"], "No such option '--no-such-option'"),
    (["extract"], "Missing argument 'DATASET'"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["cache", "verify", "--no-such-option"], "No such option"),
])
def test_usage_errors_are_one_line_with_the_help_command(args, expected):
    result = run(*args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.output
    assert lines[0].startswith("Error: ") and "--help'" in lines[0]


def test_probe_alone_still_prints_the_help():
    result = run()
    assert "Commands:" in result.output and "extract" in result.output


def test_fit_among_several_caches_names_the_others_and_how_to_choose(tmp_path, cache_dir):
    for name in ("first", "second"):
        made = run("extract", make_tree(tmp_path / name, per_class=4), "--weights", "none",
                   "--image-size", 32, "--quiet")
        assert made.exit_code == 0, made.output
    fitted = run("fit", "--head", "knn", "--no-report")
    assert fitted.exit_code == 0, fitted.output
    assert "2 caches found; using the most recent" in fitted.output
    other = [p.name for p in cache_dir.glob("first-*.h5")]
    assert f"others: {other[0]}" in fitted.output and "--cache PATH" in fitted.output


def test_the_command_line_words_typed_events(capsys):
    from pathlib import Path

    from probe.cli import _Events, note_line
    from probe.features.extract import ExtractionStatus
    from probe.progress import (BackboneExtracted, ExtractionFailed, HeadFitted, NextBackbone,
                                NoImprovement, SourceChanged)

    events = [
        NextBackbone(backbone="vgg16", index=0, count=2),
        BackboneExtracted(backbone="vgg16", path=Path("c.h5"), status=ExtractionStatus.UP_TO_DATE),
        HeadFitted(done=1, total=2, backbone="vgg16", head="logreg", split_role="test",
                   fit_seconds=0.5, row={"accuracy": 0.75, "accuracy_ci": [0.5, 0.9]}),
        ExtractionFailed(backbone="resnet50", error="no weights"),
        NoImprovement(baseline_val_loss=0.25, epochs_run=3),
        SourceChanged(message="1 added"),
    ]
    for quiet in (False, True):
        shown = _Events(quiet)
        for event in events:
            shown(event)
        shown.close()
        err = capsys.readouterr().err
        assert ("no epoch beat epoch 0 (the starting head before any training, validation loss "
                "0.2500) in 3 epochs: the new run keeps that model") in err
        assert "warning: 1 added (--strict makes this an error)" in err
        lines = ["[1/2] vgg16", "  cache up to date: c.h5",
                 "  logreg: test accuracy 0.7500 [0.5000, 0.9000] (0.5 s)",
                 "  resnet50 failed: no weights"]
        assert all((line in err) != quiet for line in lines), err
    assert note_line(NextBackbone(backbone="vgg16", index=0, count=1)) is None
