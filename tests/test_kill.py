"""Real `probe extract` processes killed (SIGKILL), interrupted (SIGINT) and run twice at
once: the cache always opens with only complete rows, and the next run resumes to the
features of an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import probe
from conftest import make_tree
from probe.features import store
from probe.cli import main

ROOT = Path(__file__).resolve().parents[1]

# Runs `probe extract` in a fresh interpreter. PAUSE lets the test stop it at a known
# point before killing it: "slow" sleeps after each finished batch, "parts:N" waits for
# good after N batches, "assemble" waits for good while the cache file is being written.
DRIVER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from probe.features import store as cache

    pause, marker = os.environ["PAUSE"], Path(os.environ["MARKER"])

    def hold():
        marker.write_text(str(os.getpid()))
        while True:
            time.sleep(0.02)

    if pause == "slow":
        real_write = cache.PartStore.write
        def write(self, *args, **kwargs):
            out = real_write(self, *args, **kwargs)
            time.sleep(0.25)
            return out
        cache.PartStore.write = write
    elif pause.startswith("parts:"):
        wanted, done, real_write = int(pause[6:]), [], cache.PartStore.write
        def write(self, *args, **kwargs):
            done.append(real_write(self, *args, **kwargs))
            if len(done) == wanted:
                hold()
            return done[-1]
        cache.PartStore.write = write
    elif pause == "assemble":
        real_read = cache._RowReader.read
        def read(self, *args, **kwargs):
            real_read(self, *args, **kwargs)
            hold()
        cache._RowReader.read = read

    from probe.cli import main
    main(sys.argv[1:], prog_name="probe")
""")


def wait_for(condition, process, seconds=300.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, f"exited early with {process.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def spawn(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    started = []

    def start(args, pause, name):
        marker = tmp_path / f"{name}.marker"
        log = open(tmp_path / f"{name}.log", "w")
        process = subprocess.Popen(
            [sys.executable, str(driver), *map(str, args)], cwd=tmp_path, stdout=log,
            stderr=subprocess.STDOUT, env=dict(env, PAUSE=pause, MARKER=str(marker)))
        process.marker, process.log = marker, tmp_path / f"{name}.log"
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def by_path(cache) -> dict[str, np.ndarray]:
    return {p: f for split in cache.splits for p, f in zip(cache.paths(split), cache.features(split))}


def test_killed_and_interrupted_runs_resume_to_the_uninterrupted_features(tmp_path, spawn,
                                                                          monkeypatch):
    root = make_tree(tmp_path / "ds", classes=("a", "b"), per_class=16)
    settings = dict(weights="none", image_size=32, batch_size=2)
    reference = probe.extract(root, "vgg16", cache_dir=tmp_path / "reference", **settings)

    # a cache of an older state of the dataset: every kill below happens while it is updated
    later = tmp_path / "later"
    for name in ("a", "b"):
        for i in range(10, 16):
            path = next((root / name).glob(f"{name}_{i}.*"))
            (later / name).mkdir(parents=True, exist_ok=True)
            shutil.move(path, later / name / path.name)
    cache_dir = tmp_path / "cache"
    old = probe.extract(root, "vgg16", cache_dir=cache_dir, **settings)
    old_rows = by_path(old)
    shutil.copytree(later, root, dirs_exist_ok=True)  # 12 new images: 6 batches of 2
    parts = cache_dir / f".parts-{old.attrs['feature_key'][:16]}"
    args = ["extract", root, "--weights", "none", "--image-size", "32", "--batch-size", "2",
            "--cache-dir", cache_dir]

    def assert_intact():
        """The old cache still opens and holds exactly its complete rows; every part that
        exists is complete."""
        opened = probe.FeatureCache.open(old.path)
        assert opened.counts == old.counts
        rows = by_path(opened)
        assert rows.keys() == old_rows.keys()
        for key in rows:
            np.testing.assert_array_equal(rows[key], old_rows[key])
        for part in parts.glob("part-*.npz"):
            store._read_part_index(part)
        return sorted(parts.glob("part-*.npz"))

    # 1. SIGKILL at an arbitrary moment once the first batch is on disk
    first = spawn(args, "slow", "first")
    wait_for(lambda: any(parts.glob("part-*.npz")), first)
    time.sleep(0.1)
    first.kill()
    assert first.wait() == -signal.SIGKILL
    done = assert_intact()
    assert 1 <= len(done) < 6

    # 2. resumed, then stopped mid-way with a second extraction started meanwhile
    second = spawn(args, "parts:2", "second")
    wait_for(second.marker.exists, second)
    runner = CliRunner().invoke(main, [str(a) for a in args])
    assert runner.exit_code == 1
    assert f"another probe extract (pid {second.pid}) is writing this cache" in runner.output
    assert len(runner.output.strip().splitlines()) == 1 and "Traceback" not in runner.output
    assert_intact()
    second.send_signal(signal.SIGINT)  # Ctrl-C
    assert second.wait(timeout=300) == 130
    log = second.log.read_text()
    assert f"Resuming an interrupted extraction ({len(done)} batches done)" in log
    assert "Interrupted; finished batches are kept and the next run resumes." in log
    assert "Traceback" not in log
    done = assert_intact()
    assert len(done) >= 3
    with store.CacheLock(next(cache_dir.glob(".lock-*"))):
        pass  # the interrupted run let go of the lock

    # the remaining batches, stopped just before the cache file is written
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(store, "write_cache", stop)
        probe.extract(root, "vgg16", cache_dir=cache_dir, **settings)
    assert len(assert_intact()) == 6

    # 3. SIGKILL while the new cache file is being written
    third = spawn(args, "assemble", "third")
    wait_for(third.marker.exists, third)
    temporary = list(cache_dir.glob(f".{old.path.name}.tmp-*"))
    assert [p.name for p in temporary] == [f".{old.path.name}.tmp-{third.pid}"]
    third.kill()
    assert third.wait() == -signal.SIGKILL
    assert len(assert_intact()) == 6

    # 4. the next run finishes the job from what is on disk
    final = CliRunner().invoke(main, [str(a) for a in args])
    assert final.exit_code == 0, final.output
    assert "Resuming an interrupted extraction (6 batches done)" in final.output
    assert "12 added" in final.output and "0 extracted, 32 reused" in final.output
    assert not parts.exists()
    assert not list(cache_dir.glob(".*.tmp-*"))
    cache = probe.FeatureCache.open(old.path)
    assert cache.counts == reference.counts
    for split in reference.splits:
        assert cache.paths(split) == reference.paths(split)
        np.testing.assert_array_equal(cache.labels(split), reference.labels(split))
        np.testing.assert_allclose(cache.features(split), reference.features(split),
                                   rtol=1e-5, atol=1e-6)
