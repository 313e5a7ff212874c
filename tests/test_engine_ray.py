"""The Ray engine on a local Ray (2 CPUs, bound to 127.0.0.1, no dashboard): the same cache
as the local engine, a resume that redoes only a missing shard, and a worker that dies once."""

from __future__ import annotations

import numpy as np
import pytest

import probe
from conftest import make_tree
from probe.features.engines import ray as ray_engine
from probe.features.engines.ray import FAIL_ONCE_VARIABLE, RayOptions, init_local, shards
from probe.features.plan import Source
from probe.progress import Advanced

ray = pytest.importorskip("ray", reason="the Ray engine needs `pip install 'probe[ray]'`")
pytestmark = pytest.mark.slow
OPTS = dict(weights="none", image_size=32, batch_size=4)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module, bound to 127.0.0.1 (no traffic to another address)."""
    context = init_local(ray, 2)
    try:
        assert context.address_info["node_ip_address"] == "127.0.0.1"
        assert context.address_info["gcs_address"].startswith("127.0.0.1:")
        assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
        assert context.dashboard_url in (None, "")
        yield
    finally:
        ray.shutdown()


def same_cache(a, b) -> None:
    assert a.counts == b.counts and a.classes == b.classes
    for split in a.splits:
        assert a.paths(split) == b.paths(split)
        np.testing.assert_array_equal(a.labels(split), b.labels(split))
        np.testing.assert_allclose(a.features(split), b.features(split), rtol=1e-5, atol=1e-5)


def test_shards_depend_only_on_the_sorted_list_and_the_size():
    todo = [Source(probe.Sample(f"c/{i}.png", 0, "train"), i, i) for i in range(7)]
    first = shards(todo, 3)
    assert [len(rows) for _, rows in first] == [3, 3, 1]
    assert shards(list(reversed(todo)), 3) == first
    assert len({name for name, _ in first}) == 3


def test_ray_engine_writes_the_local_engines_cache(tmp_path, local_ray, monkeypatch, capfd,
                                                  recwarn):
    root = make_tree(tmp_path / "ds")
    local = probe.extract(root, "vgg16", cache_dir=tmp_path / "local", **OPTS)
    options = RayOptions(workers=2, shard_size=5)
    capfd.readouterr()
    events = []
    # a worker that dies during its shard is restarted and the shard retried
    monkeypatch.setenv(FAIL_ONCE_VARIABLE, str(tmp_path / "failed-once"))
    distributed, report = probe.extract_with_report(
        root, "vgg16", cache_dir=tmp_path / "ray", engine="ray", ray=options,
        progress=events.append, **OPTS)
    assert report.extracted == 18 and distributed.path.name == local.path.name
    assert (tmp_path / "failed-once").exists()
    same_cache(local, distributed)
    # quiet: no deprecated Ray Data argument, none of Ray's log lines on stderr (the
    # driver's core worker logs an error line for every actor pool unless told not to)
    assert [str(w.message) for w in recwarn
            if w.category.__name__ == "RayDeprecationWarning"] == []
    written = capfd.readouterr()
    assert not [line for line in written.err.splitlines()
                if any(mark in line for mark in ("core_worker", "WARNING", "INFO", "Deprecat"))]
    # the pace of the shards: no estimate while each worker runs its first (start-up) shard
    advanced = [e for e in events if type(e) is Advanced]
    # (shards finish in any order: the counts grow by the shard sizes 5, 5, 5 and 3)
    done = [e.done for e in advanced]
    assert sorted(np.diff([0] + done).tolist()) == [3, 5, 5, 5] and done[-1] == 18
    unknown = [e.remaining is None for e in advanced]
    assert unknown[0] and 1 <= sum(unknown) <= options.workers
    assert advanced[-1].remaining == 0 and advanced[-1].elapsed > 0


def test_a_shard_is_attempted_at_most_max_restarts_plus_one_times(tmp_path):
    parts = tmp_path / "parts"
    for _ in range(ray_engine.MAX_RESTARTS + 1):
        ray_engine._count_attempt(parts, "shard-a")
    with pytest.raises(RuntimeError, match="shard-a was started 4 times"):
        ray_engine._count_attempt(parts, "shard-a")
    ray_engine._count_attempt(parts, "shard-b")  # each shard its own count
    ray_engine._forget_attempts(parts)  # a new run starts afresh
    ray_engine._count_attempt(parts, "shard-a")
    assert sorted(p.name for p in parts.iterdir()) == [".attempts-shard-a"]


def test_workers_dying_as_they_start_stop_the_run(tmp_path):
    """Ray restarts an actor that dies in its constructor without limit; the start marks
    left behind stop the run once MAX_RESTARTS + 1 deaths are certain (at most `workers`
    actors start at once). By hand, with PROBE_RAY_FAIL_AT_START set, `probe extract
    --engine ray` stops with the one-line error after the fifth start instead of hanging."""
    parts, workers = tmp_path / "parts", 2
    for marker in [ray_engine._count_start(parts, workers) for _ in range(workers)]:
        marker.unlink()  # two actors started together and built their backbones
    for _ in range(workers + ray_engine.MAX_RESTARTS):  # actors that died while starting
        ray_engine._count_start(parts, workers)
    with pytest.raises(RuntimeError, match=ray_engine.STARTS_DIED):
        ray_engine._count_start(parts, workers)
    ray_engine._forget_attempts(parts)  # a new run counts afresh
    ray_engine._count_start(parts, workers)
    assert len(list(parts.glob(f"{ray_engine.STARTS_PREFIX}*"))) == 1


def test_ray_workers_load_a_preset_from_its_path(tmp_path, local_ray):
    """Workers load a KerasHub preset directory (or a model file: the same path) by its
    path and write the local engine's cache."""
    pytest.importorskip("keras_hub")
    from test_hub_backbone import save_preset

    save_preset(tmp_path / "preset")
    root = make_tree(tmp_path / "ds")
    local = probe.extract(root, tmp_path / "preset", cache_dir=tmp_path / "local", batch_size=4)
    distributed, report = probe.extract_with_report(
        root, tmp_path / "preset", cache_dir=tmp_path / "ray", batch_size=4, engine="ray",
        ray=RayOptions(workers=2, shard_size=5))
    assert report.extracted == 18 and distributed.path.name == local.path.name
    same_cache(local, distributed)


def test_a_missing_shard_is_the_only_work_of_the_next_run(tmp_path, local_ray, monkeypatch):
    from probe.features import store

    root = make_tree(tmp_path / "ds")
    options = RayOptions(workers=1, shard_size=6)
    with monkeypatch.context() as patch:  # stop before the cache is written
        patch.setattr(store, "write_cache", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            probe.extract(root, "vgg16", engine="ray", ray=options, **OPTS)
    parts = sorted((tmp_path / "cache").glob(".parts-*/part-shard-*.npz"))
    assert len(parts) == 3
    parts[1].unlink()
    cache, report = probe.extract_with_report(root, "vgg16", engine="ray", ray=options, **OPTS)
    assert report.extracted == 6 and report.reused == 12
    same_cache(probe.extract(root, "vgg16", cache_dir=tmp_path / "local", **OPTS), cache)


def test_imagenet_weights_are_fetched_once_by_the_driver(tmp_path, monkeypatch):
    from probe import backbones
    from probe.features.engines import ray as ray_engine
    from probe.settings import ExtractionSettings

    assert ray_engine.imagenet_weights_file("inceptionv3").name == \
        "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached = tmp_path / "vgg16_notop.h5"
    cached.write_bytes(b"weights")
    monkeypatch.setattr(ray_engine, "imagenet_weights_file", lambda name: cached)
    monkeypatch.setattr(backbones.BackboneSpec, "build",
                        lambda *a, **k: pytest.fail("the driver built a model"))
    imagenet = ExtractionSettings.create("vgg16", "imagenet", 32, "avg", batch_size=4)
    assert ray_engine._weights_file(imagenet.to_attrs()) == str(cached)
    random = ExtractionSettings.create("vgg16", "none", 32, "avg", batch_size=4)
    assert ray_engine._weights_file(random.to_attrs()) is None  # the settings suffice


def test_compare_extracts_with_the_ray_engine(image_tree, monkeypatch):
    from click.testing import CliRunner

    import importlib

    extract_mod = importlib.import_module("probe.features.extract")
    from probe.cli import main

    seen = []

    def record(found, extraction, split, views, engine, **kwargs):
        seen.append(("ray", engine) if isinstance(engine, RayOptions) else ("local", engine))
        raise probe.ProbeError("recorded")

    monkeypatch.setattr(extract_mod, "run_extraction", record)
    options = RayOptions(workers=2, shard_size=8)
    probe.compare(image_tree, "vgg16", "logreg", weights="none", image_size=32,
                  engine="ray", ray=options)
    result = CliRunner().invoke(main, [
        "compare", str(image_tree), "--backbones", "vgg16", "--heads", "logreg", "--weights",
        "none", "--image-size", "32", "--engine", "ray", "--workers", "2", "--shard-size", "8",
        "--ray-address", "auto", "-q"])
    assert seen == [("ray", options), ("ray", RayOptions("auto", 2, 0.0, 8))], result.output


def test_without_ray_the_engine_is_one_line(monkeypatch, image_tree):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(probe.ProbeError, match=r"pip install 'probe\[ray\]'"):
        probe.extract(image_tree, "vgg16", engine="ray", **OPTS)


def test_command_line_without_ray_is_one_line(monkeypatch, image_tree):
    import sys

    from click.testing import CliRunner

    from probe.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    result = CliRunner().invoke(main, ["extract", str(image_tree), "--weights", "none",
                                       "--image-size", "32", "--engine", "ray", "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "Error: the Ray engine needs ray, which is not installed; `pip install 'probe[ray]'`, "
        "or use --engine local."]


def test_compare_without_ray_stops_once_before_any_work(monkeypatch, image_tree, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(probe.ProbeError, match=r"pip install 'probe\[ray\]'"):
        probe.compare(image_tree, "vgg16,resnet50", "logreg", engine="ray", weights="none",
                      image_size=32, cache_dir=tmp_path / "caches")
    assert not (tmp_path / "caches").exists()
