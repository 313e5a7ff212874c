"""Extraction on a Ray cluster (or every GPU of one machine): the same plan, the same
parts, the same cache as a local run.

The driver cuts the to-do list of the plan into fixed shards (boundaries depend only on
the sorted list and the shard size). A Ray Data pipeline over the shards maps them with a
pool of actors (`map_batches` with `ActorPoolStrategy`), each holding the backbone built
once from the cache's settings (a weights file path, never a pickled model); it runs the local
batch loop (`engines.local.run_batches`) on one shard at a time and writes it as one part
file (atomically renamed) into the shared parts directory; actors return only the shard's
name and count, so no feature array passes through Ray's object store. The driver then
assembles the cache from the parts exactly as after a local run. A killed driver or a lost
worker leaves finished shards: the next run redoes only the missing ones, and a worker
that dies mid-shard is restarted by Ray and its shard retried.

Needs the optional extra: `pip install 'probe[ray]'`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ... import backbones, files, quiet
from ...errors import ProbeError
from ..plan import Source

# Restarts of a dead actor (and retries of its shard) before the run stops with an error.
MAX_RESTARTS = 3

# Set to a file path: the first actor to start a shard exits once (to test restarts).
FAIL_ONCE_VARIABLE = "PROBE_RAY_FAIL_ONCE"
# Set to anything: every actor exits while it starts, before building the backbone (to test
# that a worker dying as it loads, e.g. a crash in a native library, stops the run).
FAIL_AT_START_VARIABLE = "PROBE_RAY_FAIL_AT_START"


@dataclass(frozen=True)
class RayOptions:
    """How the Ray engine runs: `address` None starts a local Ray on this machine ("auto"
    joins a running cluster); one actor per `workers`, each with `gpus_per_worker` GPUs;
    `shard_size` images per shard (and per part file)."""

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    shard_size: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 4096 or not 1 <= self.shard_size <= 1_000_000 \
                or self.gpus_per_worker < 0:
            raise ProbeError(
                "expected --workers 1 or more, --shard-size 1 or more and --gpus-per-worker "
                f"0 or more. Received: workers={self.workers}, shard_size={self.shard_size}, "
                f"gpus_per_worker={self.gpus_per_worker}")


def require_ray():
    """The ray module, or one error line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ProbeError("the Ray engine needs ray, which is not installed; "
                         "`pip install 'probe[ray]'`, or use --engine local.") from None
    return ray


def shards(todo: Sequence[Source], shard_size: int) -> list[tuple[str, list[tuple]]]:
    """(name, [(path, size, mtime), ...]) of each shard of the sorted to-do list. The name
    is a hash of the shard's rows: a retried shard rewrites the same part file."""
    rows = sorted((s.sample.path, s.size, s.mtime) for s in todo)
    found = []
    for start in range(0, len(rows), shard_size):
        chunk = rows[start:start + shard_size]
        digest = hashlib.sha256(repr(chunk).encode("utf-8", "surrogateescape")).hexdigest()
        found.append((f"shard-{digest[:16]}", chunk))
    return found


class ShardWorker:
    """One actor of the pool (a Ray Data callable class): the backbone, built once from the
    cache's settings and a weights file path, run over shard after shard."""

    def __init__(self, attrs: dict[str, Any], batch_size: int, root: str, parts_dir: str,
                 weights_file: str | None = None, workers: int = 1):
        from .. import store
        from ...settings import ExtractionSettings
        from .local import build_model

        starting = _count_start(Path(parts_dir), workers)
        if os.environ.get(FAIL_AT_START_VARIABLE):
            os._exit(1)
        _gpu_memory_growth()
        self.extraction = ExtractionSettings.from_attrs(attrs, batch_size)
        weights = self.extraction.weights
        self.model = build_model(self.extraction.spec, weights_file or weights.source,
                                 self.extraction.image_size, self.extraction.pooling,
                                 weights.seed, self.extraction.precision)
        self.root, self.parts = Path(root), store.PartStore(Path(parts_dir))
        starting.unlink(missing_ok=True)

    def __call__(self, batch: dict) -> dict:
        """Ray Data's entry: a batch of shards (`name`, `rows` as JSON) in, only their names
        and image counts out."""
        import numpy as np

        done = [self.run(str(name), [tuple(row) for row in json.loads(rows)])
                for name, rows in zip(batch["name"], batch["rows"])]
        return {"name": np.array([name for name, _ in done]),
                "count": np.array([count for _, count in done], dtype=np.int64)}

    def run(self, name: str, rows: list[tuple]) -> tuple[str, int]:
        """Extract one shard into the part file `part-<name>.npz`; returns (name, images)."""
        import numpy as np

        from ... import data
        from .local import run_batches

        _count_attempt(self.parts.directory, name)
        _maybe_fail_once()
        todo = [Source(data.Sample(path, 0, ""), size, mtime) for path, size, mtime in rows]
        features, done, skipped = [], [], []
        for batch in run_batches(self.model, self.extraction.spec, self.root, todo,
                                 self.extraction.image_size, self.extraction.batch_size, 1):
            features.append(batch.features)
            done += batch.done
            skipped += batch.skipped
        self.parts.write(np.concatenate(features), [s.sample.path for s in done],
                         [s.size for s in done], [s.mtime for s in done], skipped, name=name)
        return name, len(rows)


def run_shards(attrs: dict[str, Any], batch_size: int, root: Path, todo: Sequence[Source],
               parts_dir: Path, options: RayOptions) -> Iterator[int]:
    """Run every shard of `todo` through a Ray Data pipeline with an actor pool; yields each
    finished shard's number of images (its part file is on disk by then)."""
    ray = require_ray()
    started_here = not ray.is_initialized()
    weights_file = _weights_file(attrs)  # before any worker starts: fetched once, here
    if started_here:
        _init(ray, options)
    try:
        _forget_attempts(parts_dir)
        work = shards(todo, options.shard_size)
        if not work:
            return
        yield from _run_dataset(ray, attrs, batch_size, root, parts_dir, options, work,
                                weights_file)
    finally:
        if started_here:
            ray.shutdown()


def _run_dataset(ray, attrs: dict[str, Any], batch_size: int, root: Path, parts_dir: Path,
                 options: RayOptions, work: list, weights_file: str | None) -> Iterator[int]:
    """The shards as a dataset (one row, one block each), mapped by a pool of ShardWorker
    actors (restarted by Ray Data, their shard retried, when one dies)."""
    import ray.data

    # its start and finish lines, a note on progress bars, and a failed shard's error,
    # which reaches the user as probe's own one line (below)
    quiet.quiet_loggers("ray.data", level=logging.CRITICAL)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    items = [{"name": name, "rows": json.dumps(rows)} for name, rows in work]
    # Ray Data restarts a dead actor and retries its shard (its defaults); ShardWorker.run
    # bounds the attempts at a shard (`_count_attempt`)
    workers = min(options.workers, len(work))
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardWorker, batch_size=1, batch_format="numpy",
        fn_constructor_args=(attrs, batch_size, str(root), str(parts_dir), weights_file, workers),
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
        num_gpus=options.gpus_per_worker or None,
        runtime_env={"env_vars": _env()} if _env() else None)
    try:
        for row in dataset.iter_rows():
            yield int(row["count"])
    except ray.exceptions.RayError as error:
        reason = " ".join(ANSI_CODE.sub("", str(error)).split())
        if STARTS_DIED in reason:
            raise ProbeError(
                f"expected the Ray workers to load the backbone; at least {MAX_RESTARTS + 1} "
                "of them died while loading it, without a Python error (a crash in native "
                "code, or out of memory). Run the same command with --engine local to see the "
                "failure in this process, or give the workers more memory.") from None
        raise ProbeError(
            f"a Ray worker failed {MAX_RESTARTS + 1} times on a shard "
            f"({reason[:300]}{' ...' if len(reason) > 300 else ''}). Finished shards are "
            "kept: fix the cause and run the same command again to extract only the rest.") \
            from None


def _env() -> dict[str, str]:
    """The fault-injection variables, passed on to the actors where they are set."""
    return {name: os.environ[name] for name in (FAIL_ONCE_VARIABLE, FAIL_AT_START_VARIABLE)
            if os.environ.get(name)}


def _weights_file(attrs: dict[str, Any]) -> str | None:
    """The weights file every actor loads: for ImageNet weights, Keras' cached file, fetched
    here once (so N actors never download N copies); None where the settings suffice (random
    weights by seed, or a weights file named in them)."""
    from ...settings import ExtractionSettings

    extraction = ExtractionSettings.from_attrs(attrs, 1)
    if extraction.weights.kind != "imagenet":
        return None
    path = imagenet_weights_file(extraction.spec.name)
    if not path.exists():  # Keras downloads it into its cache while building the model once
        extraction.spec.build(weights="imagenet", image_size=None, pooling="avg")
    if not path.exists():
        raise ProbeError(f"expected Keras to cache the ImageNet weights of "
                         f"{extraction.spec.name} at {path}; not found. Use --weights PATH with "
                         "a local notop weights file, or --engine local.")
    return str(path)


def imagenet_weights_file(backbone: str) -> Path:
    """Where Keras caches the ImageNet notop weights of `backbone` (under KERAS_HOME,
    ~/.keras by default)."""
    try:
        from keras.src.backend.config import keras_home

        home = keras_home()
    except ImportError:  # another Keras layout: its documented default
        home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models" / backbones.get(backbone).imagenet_weights_file


def _init(ray, options: RayOptions) -> None:
    """Join the cluster at `options.address`, or start a local one bound to 127.0.0.1
    without a dashboard."""
    try:
        if options.address:
            with quiet.quiet_native_stderr():
                ray.init(address=options.address, include_dashboard=False,
                         **quiet.ray_init_options())
        else:
            init_local(ray, max(1, options.workers))
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ProbeError(f"could not start or join Ray ({' '.join(str(error).split())[:200]}); "
                         "check --ray-address (e.g. auto after `ray start --head`). "
                         f"Received: ray_address={options.address!r}") from None


# Ray resolves a node address of 127.0.0.1 to the machine's outward address unless it is
# told the cluster is local-only (the switch Ray reads on macOS and Windows).
LOCAL_ONLY_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local(ray, num_cpus: int, **kwargs: Any):
    """Start a local Ray bound to 127.0.0.1 (its processes listen and talk only there),
    without a dashboard; returns `ray.init`'s context."""
    os.environ[LOCAL_ONLY_VARIABLE] = "0"  # read by the processes Ray starts
    try:
        from ray._private import ray_constants  # read by this process at every address lookup

        ray_constants.ENABLE_RAY_CLUSTER = False
    except ImportError:  # another Ray layout: the variable alone
        pass
    kwargs = {**quiet.ray_init_options(), **kwargs}
    # the driver's Ray backend announces its log level on stderr as it starts
    with quiet.quiet_native_stderr():
        return ray.init(num_cpus=num_cpus, include_dashboard=False,
                        _node_ip_address="127.0.0.1", **kwargs)


def _gpu_memory_growth() -> None:
    """Let several actors share a GPU's memory instead of the first taking all of it."""
    try:
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except Exception:  # no GPU support: nothing to set
        pass


ATTEMPTS_PREFIX = ".attempts-"


def _count_attempt(parts_dir: Path, name: str) -> None:
    """Count a start of the shard `name` (in a file beside its part); past MAX_RESTARTS
    restarts an error, which Ray Data does not retry, stops the run."""
    marker = parts_dir / f"{ATTEMPTS_PREFIX}{name}"
    try:
        attempts = int(marker.read_text(encoding="ascii")) + 1
    except (OSError, ValueError):
        attempts = 1
    if attempts > MAX_RESTARTS + 1:
        raise RuntimeError(f"shard {name} was started {attempts - 1} times; the worker "
                           "running it died each time")
    parts_dir.mkdir(parents=True, exist_ok=True)
    files.write_text(marker, str(attempts))


STARTS_PREFIX = ".starting-"
STARTS_DIED = "Ray workers died while loading the backbone"
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours the actor names in its errors


def _count_start(parts_dir: Path, workers: int) -> Path:
    """Mark an actor's start with a file that it removes once its backbone is built; return
    the file. Ray restarts an actor that dies as it starts (a crash in a native library
    while loading the model) without limit, so the marks left behind count those deaths:
    at most `workers` actors start at once, so `workers + MAX_RESTARTS` marks already there
    mean at least MAX_RESTARTS + 1 deaths, and an error, which Ray Data does not retry in a
    constructor, stops the run."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    left = sum(1 for _ in parts_dir.glob(f"{STARTS_PREFIX}*"))
    if left >= workers + MAX_RESTARTS:
        raise RuntimeError(f"{STARTS_DIED}: at least {left - workers + 1}")
    marker = parts_dir / f"{STARTS_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    files.write_text(marker, "")
    return marker


def _forget_attempts(parts_dir: Path) -> None:
    """A new run counts the attempts at its shards, and the deaths of its workers, afresh."""
    if parts_dir.is_dir():
        for prefix in (ATTEMPTS_PREFIX, STARTS_PREFIX):
            for marker in parts_dir.glob(f"{prefix}*"):
                marker.unlink(missing_ok=True)


def _maybe_fail_once() -> None:
    marker = os.environ.get(FAIL_ONCE_VARIABLE)
    if marker and not os.path.exists(marker):
        files.write_text(marker, str(os.getpid()))
        os._exit(1)  # a lost worker: Ray restarts the actor and retries the shard
