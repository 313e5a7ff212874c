"""What a child process that parses a hostile file can do to probe: crash, hang, raise or
answer; each is one `ProbeError` (or the answer) in the caller, which lives on."""

from __future__ import annotations

import ctypes
import os
import time

import pytest

from probe.errors import CacheError, ProbeError
from probe.isolated import IsolationError, run_isolated


def answer(x: int) -> dict:
    return {"double": 2 * x, "pid": os.getpid()}


def segfault() -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV, as a damaged byte can make libhdf5 do


def hang() -> None:
    while True:
        time.sleep(1)


def refuse() -> None:
    raise CacheError("expected a cache; received nonsense. Delete it.")


def blunder() -> None:
    raise KeyError("deep inside a library")


def test_the_answer_comes_back_from_another_process():
    got = run_isolated(answer, 21, timeout=300, what="doubling")
    assert got["double"] == 42 and got["pid"] != os.getpid()


def test_a_crash_is_one_error_naming_the_signal():
    with pytest.raises(IsolationError) as raised:
        run_isolated(segfault, timeout=300, what="reading cache file 'x.h5'")
    assert str(raised.value).startswith("reading cache file 'x.h5' crashed")
    assert "SIGSEGV" in str(raised.value)


def test_a_hang_is_stopped_at_the_time_limit():
    # the limit is what is under test: the child never ends by itself
    with pytest.raises(IsolationError, match="did not finish within 2 s"):
        run_isolated(hang, timeout=2, what="reading")


def test_probe_errors_keep_their_class_and_message_and_others_are_one_line():
    with pytest.raises(CacheError, match="^expected a cache; received nonsense. Delete it.$"):
        run_isolated(refuse, timeout=300, what="reading")
    with pytest.raises(ProbeError, match="^reading failed unexpectedly") as raised:
        run_isolated(blunder, timeout=300, what="reading")
    assert "KeyError" in str(raised.value) and "\n" not in str(raised.value)
