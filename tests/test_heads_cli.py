"""The heads on the command line: options from the registry, one-line errors, and the run's
class names checked against its head."""

import json

import pytest
from click.testing import CliRunner

import probe
from probe.cli import main
from probe.errors import RunError
from probe.run_files import write_manifest


def test_fit_help_lists_every_head_and_its_options():
    shown = CliRunner().invoke(main, ["fit", "--help"]).output
    for name in probe.list_heads():
        assert name in shown
    for flag in ("--C", "--hidden-units", "--k", "--temperature", "--class-weight"):
        assert flag in shown


def test_fit_knn_from_the_command_line(separable_cache):
    result = CliRunner().invoke(main, ["fit", "--head", "knn", "--k", "3"])
    assert result.exit_code == 0, result.output
    assert "Chosen settings: k 3, T " in result.output and "accuracy" in result.output


@pytest.mark.parametrize("args,expected", [
    (["--head", "dense", "--hidden-units", "100000000"], "from 0 to 16384"),
    (["--head", "knn", "--k", "0"], "from 1 to 10000"),
])
def test_absurd_head_options_are_one_line(separable_cache, args, expected):
    result = CliRunner().invoke(main, ["fit", *args])
    assert result.exit_code == 1
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_out_of_range_is_a_usage_error(separable_cache, seed):
    result = CliRunner().invoke(main, ["fit", "--seed", seed])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "0<=x<=4294967295" in result.output


def test_a_head_seed_out_of_range_is_one_error(separable_cache):
    with pytest.raises(probe.ProbeError, match="from 0 to 4294967295"):
        probe.fit(head="logreg", seed=-1)


def test_reordered_or_missing_class_names_in_a_run_are_refused(separable_cache):
    run = probe.fit(head="logreg", C=1.0)
    config_path = run.path / "config.json"
    config = json.loads(config_path.read_text())
    for classes in (config["classes"][::-1], config["classes"][:2]):
        config_path.write_text(json.dumps({**config, "classes": classes}))
        write_manifest(run.path)  # past the manifest: the head's own check still refuses
        with pytest.raises(RunError, match="mislabelled"):
            probe.Run.load(run.path).load_head()
        refused = CliRunner().invoke(main, ["predict", str(run.path), str(separable_cache.path.parent)])
        assert refused.exit_code == 1 and "mislabelled" in refused.output
