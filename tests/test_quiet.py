"""Quiet by default: on a successful run only probe's own lines reach stderr; `--verbose`
lets TensorFlow's, Keras', absl's, OpenVINO's and Ray's own output through."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from probe import quiet

from conftest import make_separable_tree

REPO = Path(__file__).resolve().parents[1]
# What other libraries' lines look like: absl/glog prefixes (W0000, E1234 ...), Ray's C++
# core worker, Python warnings and log records.
FOREIGN = ("WARNING", "W0000", "I0000", "E0000", "core_worker", "Deprecat", "absl", "INFO",
           "tensorflow", "Warning:")


def probe_command(tmp_path: Path, *args: str, verbose: bool = False):
    """`probe ARGS` in a fresh interpreter, as a user's shell runs it."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "PROBE_CACHE_DIR": str(tmp_path / "cache"), "PROBE_RUNTIME": "tensorflow",
           "HOME": os.environ.get("HOME", str(tmp_path))}
    command = [sys.executable, "-m", "probe.cli", *(["--verbose"] if verbose else []), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def foreign_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(mark in line for mark in FOREIGN)]


@pytest.mark.slow
def test_verbose_shows_the_libraries_lines_and_fit_without_it_writes_only_probes(tmp_path):
    """(A quiet extraction's stderr is checked line by line in test_cli.)"""
    root = make_separable_tree(tmp_path / "colours", per_class=4)
    # --verbose: TensorFlow's own start-up lines come through (its absl C++ logging
    # announces itself on any import that logs, as every CPU-only one does)
    loud = probe_command(tmp_path, "extract", str(root), "--weights", "none",
                         "--image-size", "32", verbose=True)
    assert foreign_lines(loud.stderr), loud.stderr
    assert "Extracting 8 of 8 images" in loud.stderr.splitlines()
    fitted = probe_command(tmp_path, "fit", "--head", "logreg", "--runs-dir",
                           str(tmp_path / "runs"))
    assert foreign_lines(fitted.stderr) == [], fitted.stderr
    assert fitted.stdout.rstrip().splitlines()[-1].startswith("Run: ")


def test_quiet_process_installs_its_filters_only_when_not_verbose(monkeypatch):
    for name in (quiet.VERBOSE_VARIABLE, *quiet.NATIVE_LOG_LEVELS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    for name in quiet.LIBRARY_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    with warnings.catch_warnings():
        warnings.resetwarnings()
        quiet.quiet_process(verbose=True)
        assert quiet.verbose() and os.environ[quiet.VERBOSE_VARIABLE] == "1"
        assert warnings.filters == [] and "TF_CPP_MIN_LOG_LEVEL" not in os.environ
        assert logging.getLogger("ray.data").level == logging.NOTSET
        assert quiet.ray_init_options()["log_to_driver"] is True

        quiet.quiet_process(verbose=False)
        assert not quiet.verbose()
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
        assert os.environ["RAY_BACKEND_LOG_LEVEL"] == "fatal"
        assert logging.getLogger("ray.data").level == logging.ERROR
        assert quiet.ray_init_options() == {"log_to_driver": False,
                                            "logging_level": logging.ERROR}
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn_explicit("from keras", UserWarning, "x.py", 1,
                                   module="keras.src.layers")
            warnings.warn("a deprecation in probe's frame", DeprecationWarning)
            warnings.warn_explicit("probe's own", UserWarning, "y.py", 1, module="probe.heads")
        assert [str(w.message) for w in caught] == ["probe's own"]


def test_a_level_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    monkeypatch.delenv(quiet.VERBOSE_VARIABLE, raising=False)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    with warnings.catch_warnings():
        quiet.quiet_process()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"


def test_quiet_native_stderr_hides_file_descriptor_2_only_when_not_verbose(tmp_path):
    script = ("import os\nfrom probe import quiet\n"
              "with quiet.quiet_native_stderr():\n    os.write(2, b'hidden\\n')\n"
              "quiet.set_verbose(True)\n"
              "with quiet.quiet_native_stderr():\n    os.write(2, b'shown\\n')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "shown\n"


def test_quiet_imports_nothing_of_probes():
    import ast

    tree = ast.parse((REPO / "probe" / "quiet.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
    assert not any(name is None or name.startswith("probe") for name in imported), imported
