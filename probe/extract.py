"""Backbone + samples -> feature cache, streaming in batches.

Decoding runs in a thread pool one batch ahead of the model, so the backbone's forward pass
is the only thing the user waits for. Each batch carries its own samples from decoding to
the written part, so features and labels can not get out of order.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import backbones, cache as cache_mod, data
from .cache import Entry, FeatureCache, PartStore, Row
from .errors import CacheError, CacheMismatchError, ProbeError

ProgressCallback = Callable[[int, int], None]  # (images done, images to do)
PREFETCH_BATCHES = 2
# Speed of the largest backbone work that went into the cache: an incremental update of a
# few images would mostly measure start-up.
SPEED_ATTRS = ("extract_images", "extract_seconds", "extract_images_per_second")


@dataclass
class _Source:
    """A sample with its file's size and modification time."""

    sample: data.Sample
    size: int
    mtime: int


def extract(
    dataset: str | os.PathLike,
    backbone: str = "vgg16",
    *,
    weights: str | os.PathLike | None = "imagenet",
    image_size: int | None = None,
    pooling: str = "avg",
    labels: str | os.PathLike | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    on_start: Callable[[dict], None] | None = None,
    precision: str = "float32",
) -> FeatureCache:
    """Extract the features of every image of `dataset` into an HDF5 cache and return it.

    Features already computed with the same settings (in this cache, in a cache of the same
    dataset with other splits, or by an interrupted run) are reused, so an identical second
    run does no backbone work. `FeatureCache.report` says what this run did.
    `precision="bf16"` runs the backbone in Keras' mixed bfloat16 where the CPU or GPU
    supports it (faster, features agree closely but not exactly; stored as float32 in a
    cache of their own).

    >>> cache = probe.extract("cats_vs_dogs/", "vgg16", weights="none", image_size=64)
    """
    spec = backbones.get(backbone)
    size = spec.check_image_size(image_size)
    backbones.check_pooling(pooling)
    if batch_size < 1:
        raise ProbeError(f"expected a batch size of at least 1. Received: batch_size={batch_size}")
    check_precision(precision)
    found = data.discover(dataset, labels, val_fraction, test_fraction, seed)
    weights_id = backbones.weights_identity(weights, seed)
    settings = {
        "backbone": spec.name,
        "weights": weights_id,
        "image_size": size,
        "pooling": pooling,
        "preprocessing": spec.preprocessing,
    }
    if precision != "float32":  # float32 caches keep the key they always had
        settings["precision"] = precision
    feature_key = cache_mod.fingerprint({"dataset_root": str(found.root), **settings})
    split_settings = {
        "labels_file": str(Path(labels).expanduser().resolve()) if labels else "",
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
    }
    directory = cache_mod.resolve_cache_dir(cache_dir)
    name = f"{_safe(found.root.name)}-{spec.name}-{size}-{pooling}"
    if precision != "float32":
        name += f"-{precision}"
    # Split folders or a split column decide the splits; seed and fractions then change
    # nothing and must not make another cache.
    split_key = {"labels_file": split_settings["labels_file"]} if found.splits_given else split_settings
    target = directory / f"{name}-{cache_mod.fingerprint([feature_key, split_key])[:10]}.h5"

    sources, unreadable = _stat_sources(found)
    source_fingerprint = cache_mod.fingerprint(
        [found.classes, [(s.sample.path, s.sample.label, s.sample.split, s.size, s.mtime)
                         for s in sources], unreadable]
    )
    previous, damage = _open_if_valid(target)
    if previous is not None and previous.attrs.get("feature_key") != feature_key:
        raise CacheMismatchError(
            f"cache file '{cache_mod.display(target)}' holds features of other settings "
            f"(backbone {previous.attrs.get('backbone')!r}, weights "
            f"{previous.attrs.get('weights')!r}, size {previous.attrs.get('image_size')!r}, "
            f"pooling {previous.attrs.get('pooling')!r}) than asked for ({spec.name!r}, "
            f"{weights_id!r}, {size}, {pooling!r}); it was renamed or copied there. Move it "
            "away or use another --cache-dir; probe will not overwrite it."
        )
    if previous is not None and previous.attrs.get("source_fingerprint") == source_fingerprint:
        previous.report = {"status": "up to date", "extracted": 0, "reused": sum(previous.counts.values()),
                           "skipped": len(previous.skipped), "ignored": found.ignored, "changes": {},
                           "damaged": ""}
        return previous

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheError(
            f"expected a cache directory that can be created and written; {error.strerror}. "
            f"Pass a writable --cache-dir or set PROBE_CACHE_DIR. "
            f"Received: cache_dir='{cache_mod.display(directory)}'"
        ) from None
    with _write_errors_as_cache_error(directory), \
            cache_mod.CacheLock(directory / f".lock-{feature_key[:16]}"):
        parts = PartStore(directory / f".parts-{feature_key[:16]}")
        _remove_leftovers(directory, target, parts)
        known_rows, known_skips = _reusable(directory, feature_key, parts)
        todo = [s for s in sources if (s.sample.path, s.size, s.mtime) not in known_rows
                and (s.sample.path, s.size, s.mtime) not in known_skips]
        changes = _changes(previous, found, sources, unreadable)
        info = {"target": target, "total": len(sources), "todo": len(todo),
                "changes": changes, "resumed_parts": len(parts.parts()), "damaged": damage}
        # The model (and its weights) first: a download or a bad weights file fails
        # before anything announces an extraction.
        model = build_model(spec, weights, size, pooling, seed, precision) if todo else None
        if on_start:
            on_start(info)
        feature_shape = (tuple(int(d) for d in model.output_shape[1:]) if todo
                         else _stored_feature_shape(spec, pooling, known_rows))
        speed = {k: previous.attrs[k] for k in SPEED_ATTRS
                 if previous is not None and k in previous.attrs}
        if todo:
            started = time.perf_counter()
            for features, done, skipped in _run_batches(
                model, spec, found.root, todo, size, batch_size, workers, progress
            ):
                part = parts.write(features, [s.sample.path for s in done],
                                   [s.size for s in done], [s.mtime for s in done], skipped)
                for i, s in enumerate(done):
                    known_rows[(s.sample.path, s.size, s.mtime)] = Row(str(part), "", i)
                for path, reason, fsize, mtime in skipped:
                    known_skips[(path, fsize, mtime)] = reason
            seconds = time.perf_counter() - started
            if len(todo) >= int(speed.get("extract_images", 0)):
                speed = {"extract_images": len(todo), "extract_seconds": round(seconds, 3),
                         "extract_images_per_second": round(len(todo) / max(seconds, 1e-9), 2)}
        entries, skipped = [], []
        for s in sources:
            key = (s.sample.path, s.size, s.mtime)
            if key in known_rows:
                entries.append(Entry(s.sample.path, s.sample.label, s.sample.split,
                                     s.size, s.mtime, known_rows[key]))
            else:
                skipped.append((s.sample.path, known_skips[key], s.size, s.mtime,
                                s.sample.label, s.sample.split))
        skipped += [(s.path, reason, -1, -1, s.label, s.split) for s, reason in unreadable]
        attrs = {
            "format": cache_mod.FORMAT,
            "format_version": cache_mod.FORMAT_VERSION,
            "feature_key": feature_key,
            "source_fingerprint": source_fingerprint,
            **settings,
            "weights_source": _weights_source(weights),
            "feature_shape": list(feature_shape),
            "classes": found.classes,
            "dataset_root": str(found.root),
            **split_settings,
            "ignored_files": found.ignored,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            **speed,
        }
        if not entries:
            raise ProbeError(
                f"no image of '{found.root}' could be decoded ({len(skipped)} skipped, e.g. "
                f"'{skipped[0][0]}': {skipped[0][1]}); check the files."
            )
        cache_mod.write_cache(target, attrs, entries, skipped, feature_shape)
        parts.clear()
    extracted = sum(1 for s in todo if (s.sample.path, s.size, s.mtime) in known_rows)
    result = FeatureCache.open(target)
    result.report = {"status": "extracted", "extracted": extracted,
                     "reused": len(entries) - extracted, "skipped": len(skipped),
                     "ignored": found.ignored, "changes": changes, "damaged": damage}
    return result


@contextlib.contextmanager
def _write_errors_as_cache_error(directory: Path):
    """A full disk or a directory that turned read-only is one line, not a traceback;
    the finished batches stay for the next run."""
    try:
        yield
    except OSError as error:
        raise CacheError(
            f"could not write the cache in '{cache_mod.display(directory)}' "
            f"({error.strerror or error}); finished batches are kept. Free space or fix "
            "the permissions and run again, or pass another --cache-dir."
        ) from None


def _run_batches(
    model, spec: backbones.BackboneSpec, root: Path, todo: list[_Source], size: int,
    batch_size: int, workers: int | None, progress: ProgressCallback | None,
) -> Iterator[tuple[np.ndarray, list[_Source], list[tuple[str, str, int, int]]]]:
    """Yield (features, decoded sources, skipped) per batch, in order.

    A producer thread decodes the next batches (in a small thread pool), applies the
    backbone's preprocessing and pads a short batch, so that the model, in this thread,
    never waits for anything but its own forward pass. At most PREFETCH_BATCHES batches
    wait in memory, whatever the number of images."""
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    results: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2)))

    def decode(source: _Source):
        try:
            return data.load_image(root / source.sample.path, size), None
        except data.BadImage as error:
            return None, str(error)

    def produce() -> None:
        try:
            for batch in batches:
                if stop.is_set():
                    return
                decoded = list(pool.map(decode, batch))
                good = [s for s, (pixels, _) in zip(batch, decoded) if pixels is not None]
                skipped = [(s.sample.path, reason, s.size, s.mtime)
                           for s, (pixels, reason) in zip(batch, decoded) if pixels is None]
                inputs = None
                if good:
                    inputs = _prepare(spec, [p for p, _ in decoded if p is not None], batch_size)
                del decoded
                results.put((batch, good, skipped, inputs))
            results.put(None)
        except BaseException as error:  # hand any failure to the consuming thread
            results.put(error)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    done_count = 0
    try:
        while True:
            item = results.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            batch, good, skipped, inputs = item
            if good:
                features = _forward(model, inputs, len(good))
            else:
                features = np.zeros((0, *model.output_shape[1:]), dtype=np.float32)
            yield features, good, skipped
            done_count += len(batch)
            if progress:
                progress(done_count, len(todo))
    finally:
        stop.set()
        while producer.is_alive():
            try:
                results.get(timeout=0.1)
            except queue.Empty:
                pass
        pool.shutdown(wait=True, cancel_futures=True)


def _prepare(spec: backbones.BackboneSpec, pixels: list[np.ndarray], batch_size: int) -> np.ndarray:
    """Model inputs of one batch: the backbone's own preprocessing of the RGB pixels, a
    short batch padded with zeros to the batch size so the compiled model is not traced
    again."""
    inputs = spec.preprocess_input(np.stack(pixels))
    if len(inputs) < batch_size:
        padding = np.zeros((batch_size - len(inputs), *inputs.shape[1:]), dtype=inputs.dtype)
        inputs = np.concatenate([inputs, padding])
    return inputs


def _forward(model, inputs: np.ndarray, count: int) -> np.ndarray:
    """Features (float32, whatever the compute precision) of the first `count` rows."""
    return np.asarray(model.predict_on_batch(inputs), dtype=np.float32)[:count]


PRECISIONS = ("float32", "bf16")


def bf16_support() -> str | None:
    """None where bfloat16 runs fast (a GPU of compute capability 8.0+, or a CPU with
    AVX512_BF16 / AMX_BF16 / Arm BF16), else the reason it is not offered."""
    try:
        from ._keras import keras  # noqa: F401  (imports TensorFlow quietly)
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
            if capability and tuple(capability) >= (8, 0):
                return None
    except Exception:  # no TensorFlow GPU support: only the CPU counts
        pass
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("flags", "features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        return None
    return ("neither the CPU (no AVX512_BF16, AMX_BF16 or BF16 instructions) nor a GPU "
            "(compute capability 8.0+) runs bfloat16 natively")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ProbeError(f"expected precision to be one of {', '.join(PRECISIONS)}. "
                         f"Received: precision='{precision}'")
    if precision == "bf16":
        reason = bf16_support()
        if reason is not None:
            raise ProbeError(f"bf16 is not available here: {reason}; use float32. "
                             f"Received: precision='{precision}'")
    return precision


def build_model(spec: backbones.BackboneSpec, weights, size: int, pooling: str, seed: int,
                precision: str = "float32"):
    """The frozen backbone; with precision "bf16" under Keras' "mixed_bfloat16" policy
    (variables stay float32, so the weights are the same). The global policy is restored.
    BatchNormalizations after convolutions are folded into them (`probe.fold`; the same
    features up to float rounding, PROBE_FOLD_BATCHNORM=0 turns it off)."""
    from .fold import for_inference

    if precision == "float32":
        return for_inference(spec.build(weights=weights, image_size=size, pooling=pooling,
                                        seed=seed))
    from ._keras import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        return for_inference(spec.build(weights=weights, image_size=size, pooling=pooling,
                                        seed=seed))
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _stat_sources(found: data.Dataset) -> tuple[list[_Source], list[tuple[data.Sample, str]]]:
    sources, unreadable = [], []
    for sample in found.samples:
        try:
            stat = os.stat(found.root / sample.path)
        except OSError as error:
            unreadable.append((sample, f"can not be read: {error.strerror}"))
            continue
        sources.append(_Source(sample, int(stat.st_size), int(stat.st_mtime_ns)))
    return sources, unreadable


def _open_if_valid(path: Path) -> tuple[FeatureCache | None, str]:
    """The existing cache file, or None and why it can not be used (empty if missing)."""
    if not path.exists():
        return None, ""
    try:
        return FeatureCache.open(path), ""
    except CacheError as error:
        return None, str(error)  # corrupt: rebuilt from scratch, it is replaced atomically


def _remove_leftovers(directory: Path, target: Path, parts: PartStore) -> None:
    """Half-written files of a killed run of this cache (the lock is held, so no live
    process is writing them)."""
    parts.remove_temporary()
    for path in directory.glob(f"{cache_mod.TEMP_PREFIX}{target.name}.tmp-*"):
        path.unlink(missing_ok=True)


def _reusable(directory: Path, feature_key: str, parts: PartStore):
    """Feature rows and skip records already computed with the same settings: in any
    cache of this dataset and backbone settings, and in parts of an interrupted run."""
    rows: dict[tuple[str, int, int], Row] = {}
    skips: dict[tuple[str, int, int], str] = {}
    for existing in cache_mod.list_caches(directory):
        if existing.attrs.get("feature_key") != feature_key:
            continue
        try:
            found_rows = list(existing.rows())
            found_skips = list(existing.skip_records())
        except CacheError:
            continue  # damaged: nothing in it is trusted
        for path, row, size, mtime in found_rows:
            rows.setdefault((path, size, mtime), row)
        for path, reason, size, mtime in found_skips:
            skips.setdefault((path, size, mtime), reason)
    for path, row, size, mtime in parts.rows():
        rows[(path, size, mtime)] = row
    for path, reason, size, mtime in parts.skip_records():
        skips[(path, size, mtime)] = reason
    return rows, skips


def _stored_feature_shape(spec, pooling: str, known_rows) -> tuple[int, ...]:
    """The feature shape when every row is reused (nothing to extract, no model built)."""
    if pooling != "none":
        return (spec.feature_size,)
    for row in known_rows.values():
        if row.group:
            return tuple(FeatureCache.open(row.source).feature_shape)
        with np.load(row.source, allow_pickle=False) as part:
            return tuple(part["features"].shape[1:])
    return (spec.feature_size,)  # no row at all: the run stops before writing


def _changes(previous: FeatureCache | None, found: data.Dataset, sources: list[_Source],
             unreadable) -> dict[str, int]:
    """Counts of added, removed and modified source files against the previous cache (a
    new class or split alone needs no extraction, so it is not counted here)."""
    if previous is None:
        return {}
    new = {s.sample.path: (found.classes[s.sample.label], s.sample.split, s.size, s.mtime)
           for s in sources}
    new.update({sample.path: (found.classes[sample.label], sample.split, -1, -1)
                for sample, _ in unreadable})
    counts = cache_mod.diff_sources(str(previous.path), previous.source_records(), new).counts()
    return {key: counts[key] for key in ("added", "removed", "modified")}


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {}
    for package in ("probe", "keras", "tensorflow", "tensorflow-cpu", "h5py", "numpy", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _weights_source(weights) -> str:
    """What `BackboneSpec.build` needs to rebuild the same backbone for prediction."""
    kind, path = backbones.parse_weights(weights)
    return str(path) if kind == "file" else kind


def _safe(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return cleaned.strip("_") or "dataset"
