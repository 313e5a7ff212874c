"""`probe fit` refuses, before loading anything, features larger than the available memory."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import probe
from probe import runs, settings
from probe.cli import main


def test_features_larger_than_memory_are_refused_before_loading(separable_cache, monkeypatch):
    needed = sum(separable_cache.counts.values()) * 512 * 4  # vgg16: 512 values per image
    runs.check_features_fit_in_memory(separable_cache, available=needed)  # just fits
    monkeypatch.setattr(settings, "available_memory", lambda: needed - 1)
    loaded = []
    monkeypatch.setattr(type(separable_cache), "split",
                        lambda self, name: loaded.append(name))
    with pytest.raises(probe.ProbeError, match=r"fit in memory.*Fit on a subsample"):
        probe.fit(separable_cache, "logreg")
    assert loaded == []


def test_the_command_line_says_it_in_one_line(separable_cache, monkeypatch):
    monkeypatch.setattr(settings, "available_memory", lambda: 1000)
    result = CliRunner().invoke(main, ["fit", "--cache", str(separable_cache.path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "0.0 GiB is available" in lines[0], lines


def test_available_memory_is_known_here():
    assert settings.available_memory() > 0
