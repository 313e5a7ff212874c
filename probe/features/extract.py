"""Backbone + samples -> feature cache: settings, then plan, run and store.

`extract()` validates its arguments once into `ExtractionSettings` and `SplitSettings`
(probe/settings.py) and finds the samples (data.py); `run_extraction`, the one entry point
that takes typed settings and a found dataset (`compare` calls it per backbone), plans what
is left to do (plan.py), runs the backbone over it in batches (engines/local.py) and writes
parts and the final cache (store.py). What happened is returned as an `ExtractionReport`
and told as it goes through progress events (probe/progress.py, stage "extract").
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import augment as augment_mod, cache as cache_mod, format as format_mod, plan as plan_mod
from .. import data, device, files
from . import runtime as runtime_mod, store
from .augment import ViewSettings
from .cache import FeatureCache
from .outcome import ExtractionReport, ExtractionStatus  # noqa: F401 (API)
from .engines import ray as ray_engine
from .engines.local import Decoding, build_model, forward, run_batches  # noqa: F401 (API)
from .engines.ray import RayOptions
from ..errors import CacheError, ProbeError
from .plan import ExtractionPlan, Source
from ..progress import (Advanced, Bf16Available, ExtractionFinished, ExtractionStarted,
                        Pace, ProgressCallback, RuntimeNote, Stage, ViewsFinished, ViewsStarted, emit)
from ..settings import (DEFAULT_BATCH_SIZE, DEFAULT_SEED, TEST_FRACTION, VAL_FRACTION,
                       ExtractionSettings, SplitSettings, check_precision, dataset_path)

__all__ = ["extract", "extract_with_report", "run_extraction", "ExtractionReport",
           "ExtractionStatus", "build_model", "check_precision"]

STAGE = Stage.EXTRACT
# The local engine with its number of decoding threads (None: the default of
# `engines.local.decoding_threads`), or the Ray engine with its options.
Engine = "int | None | RayOptions"
# Speed of the largest backbone work that went into the cache: an incremental update of a
# few images would mostly measure start-up.
SPEED_ATTRS = ("extract_images", "extract_seconds", "extract_images_per_second",
               "extract_runtime")


def extract(
    dataset: str | os.PathLike,
    backbone: str = "vgg16",
    *,
    weights: Any = "imagenet",
    image_size: int | None = None,
    pooling: str = "avg",
    labels: Any = None,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    precision: str = "float32",
    engine: str = "local",
    ray: RayOptions | None = None,
    augment: int = 0,
    augment_policy: str = augment_mod.DEFAULT_POLICY,
    runtime: str = "auto",
    layer: Any = None,
    preprocess: str | None = None,
    blocks: int = 0,
) -> FeatureCache:
    """Extract the features of every image of `dataset` into an HDF5 cache and return it.

    Features already computed with the same settings (in this cache, in a cache of the same
    dataset with other splits, or by an interrupted run) are reused, so an identical second
    run does no backbone work; `extract_with_report` also says what this run did.
    `weights` is "imagenet", "none" (random, seeded by `seed`) or a weights file; `labels`
    one labels file, a {split: file} mapping or `--labels` values (`FILE`, `SPLIT=FILE`).
    `precision="bf16"` runs the backbone in bfloat16 (OpenVINO's bf16 hint or Keras' mixed
    bfloat16, the faster here) where the CPU or GPU supports it (faster, features agree
    closely but not exactly; a cache of their own).
    `progress` receives `ExtractionStarted` / `Advanced` / `ExtractionFinished` events
    (probe.progress, stage "extract"; "views" for the augmented views), and for float32 on
    a CPU that computes bfloat16, `Bf16Available` (advice).
    `engine="ray"` runs the backbone on a Ray cluster (`ray`: `RayOptions`; needs
    `pip install 'probe[ray]'`) and writes the same cache.
    `augment=K` also extracts K augmented views of every training image (`augment_policy`
    "light", "default" or "strong"; seeded by `seed`), stored apart from the clean features
    (`cache.views("train")`); raising K extracts only the missing views.
    `runtime` runs the backbone: "tensorflow", "openvino" (faster on the CPU, the same
    features up to float rounding) or "auto" (OpenVINO where it is installed, on a machine
    without a GPU, for float32, and for bf16 where it is the faster: `device.resolve`).
    `backbone` may be the path of a .keras model file (`preprocess`: what its pixels need,
    "none" when the model does it); `layer` "a,b" reads those layers, pooled, concatenated.
    `backbone` "hub:NAME" or a preset directory is a KerasHub preset (`pip install
    'probe[hub]'`; `pooling` "cls", "mean" or "cls+mean" for its tokens, `blocks` N: the
    last N transformer blocks, pooled, concatenated).

    >>> cache = probe.extract("cats_vs_dogs/", "vgg16", weights="none", image_size=64)
    """
    return extract_with_report(
        dataset, backbone, weights=weights, image_size=image_size, pooling=pooling,
        labels=labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
        batch_size=batch_size, cache_dir=cache_dir, workers=workers, progress=progress,
        precision=precision, engine=engine, ray=ray, augment=augment,
        augment_policy=augment_policy, runtime=runtime, layer=layer, preprocess=preprocess,
        blocks=blocks)[0]


def extract_with_report(dataset: str | os.PathLike, backbone: str = "vgg16", *,
                        weights: Any = "imagenet", image_size: int | None = None,
                        pooling: str = "avg", labels: Any = None,
                        val_fraction: float = VAL_FRACTION, test_fraction: float = TEST_FRACTION,
                        seed: int = DEFAULT_SEED, batch_size: int = DEFAULT_BATCH_SIZE,
                        cache_dir: str | os.PathLike | None = None, workers: int | None = None,
                        progress: ProgressCallback | None = None, precision: str = "float32",
                        engine: str = "local", ray: RayOptions | None = None,
                        augment: int = 0, augment_policy: str = augment_mod.DEFAULT_POLICY,
                        runtime: str = "auto", layer: Any = None,
                        preprocess: str | None = None,
                        blocks: int = 0) -> tuple[FeatureCache, ExtractionReport]:
    """`extract`, returning the cache and the `ExtractionReport` of this run.

    >>> cache, report = probe.extract_with_report("cats_vs_dogs/", "vgg16", weights="none")
    >>> report.extracted, report.reused
    """
    root = dataset_path(dataset)
    extraction = ExtractionSettings.create(backbone, weights, image_size, pooling, precision,
                                           batch_size, seed, runtime, layer, preprocess,
                                           blocks)
    split = SplitSettings.create(labels, val_fraction, test_fraction, seed)
    views = ViewSettings.create(augment, augment_policy, seed)
    resolved = resolve_engine(engine, workers, ray)
    check_engine_views(resolved, views)
    found = discover(root, split)
    return run_extraction(found, extraction, split, views, resolved, cache_dir=cache_dir,
                          progress=progress)


def discover(root: str | os.PathLike, split: SplitSettings) -> data.Dataset:
    """The samples of the dataset at `root` with their labels and splits (`data.discover`)."""
    return data.discover(dataset_path(root), split.labels, split.val_fraction,
                         split.test_fraction, split.seed)


def check_engine_views(engine: Engine, views: ViewSettings) -> None:
    """Augmented views run on the local engine only."""
    if views.count and isinstance(engine, RayOptions):
        raise ProbeError("expected --engine local with --augment: augmented views are "
                         f"extracted by the local engine only. Received: engine='ray', "
                         f"augment={views.count}")


def run_extraction(found: data.Dataset, extraction: ExtractionSettings, split: SplitSettings,
                   views: ViewSettings = ViewSettings(), engine: Engine = None, *,
                   cache_dir: str | os.PathLike | None = None,
                   progress: ProgressCallback | None = None,
                   ) -> tuple[FeatureCache, ExtractionReport]:
    """Extract with validated settings from a dataset already found (`discover`, with the
    same `split`): plan, run, store (and the augmented views of the training images,
    `views`). `engine` is what `resolve_engine` returns. The settings are trusted: build
    them with `ExtractionSettings.create` / `with_backbone`, `SplitSettings.create` and
    `ViewSettings.create`."""
    check_engine_views(engine, views)
    directory = cache_mod.resolve_cache_dir(cache_dir)
    target = plan_mod.cache_target(extraction, split, found, directory)
    sources, unreadable = stat_sources(found)
    fingerprint = plan_mod.source_fingerprint(found, sources, unreadable)
    resealed, reseal_failure = _reseal_older_format(directory, target)
    previous, damaged = store.open_existing(target.path)
    damaged = reseal_failure or damaged
    previous_attrs = previous.attrs if previous is not None else None
    plan_mod.check_previous(previous_attrs, target, extraction)
    if plan_mod.is_up_to_date(previous_attrs, fingerprint, views):
        store.tidy_up_to_date(directory, _lock_path(directory, target), _parts(directory, target),
                              previous)
        report = ExtractionReport(ExtractionStatus.UP_TO_DATE, 0, sum(previous.counts.values()),
                                  len(previous.skipped), found.ignored,
                                  notes=[*found.notes(), *resealed],
                                  views_reused=views.count * previous.counts.get("train", 0))
        emit(progress, ExtractionFinished(path=previous.path, report=report))
        return previous, report
    _make_directory(directory)
    with store.write_errors_as_cache_error(directory), \
            store.CacheLock(_lock_path(directory, target)):
        cache, report = _extract_locked(found, extraction, split, target, fingerprint,
                                        sources, unreadable, previous, damaged, engine,
                                        progress, views)
    report.notes[:0] = resealed
    return cache, report


def _reseal_older_format(directory: Path, target: plan_mod.CacheTarget) -> tuple[list[str], str]:
    """A cache of this key written before caches were sealed is rewritten sealed (in a child
    process, keeping the rows whose images did not change), so its features are reused:
    (notes for the report, why it could not be resealed: "" when it was, or there was none)."""
    if not format_mod.is_unsealed(target.path):
        return [], ""
    try:
        with store.CacheLock(_lock_path(directory, target)):
            kept = store.reseal(target.path)
    except CacheError as error:
        return [], str(error)
    return [f"resealed the older-format cache '{files.display(target.path)}': kept "
            f"{kept['kept']} rows, left out {kept['left_out']} whose images changed"], ""


def _extract_locked(found: data.Dataset, extraction: ExtractionSettings, split: SplitSettings,
                    target: plan_mod.CacheTarget, fingerprint: str, sources, unreadable,
                    previous: FeatureCache | None, damaged: str, engine: Engine,
                    progress: ProgressCallback | None, views: ViewSettings = ViewSettings(),
                    ) -> tuple[FeatureCache, ExtractionReport]:
    """Plan against what is on disk, run the backbone over the rest, write the cache."""
    parts = _parts(target.path.parent, target)
    view_parts = _view_parts(target.path.parent, target, views)
    store.remove_leftovers(target.path.parent, target.path, parts)
    view_parts.remove_temporary()
    rows, skips = store.reusable_rows(target.path.parent, target.feature_key, parts)
    known_views = _known_views(target, views, view_parts)
    plan = plan_mod.make_plan(target, fingerprint, found, sources, unreadable,
                              previous.source_records() if previous is not None else None,
                              rows, skips, len(parts.parts()), damaged)
    decodable = {s.key: True for s in plan.sources if s.key not in skips}
    views_needed = bool(plan_mod.views_todo(plan.sources, decodable, known_views, views.count))
    local_engine = not isinstance(engine, RayOptions)
    with contextlib.ExitStack() as running:
        # Decoding starts first: the first batches are ready when the model is built.
        decoding = running.enter_context(Decoding(
            extraction.spec, found.root, plan.todo, extraction.image_size,
            extraction.batch_size, engine)) if plan.todo and local_engine else None
        # The model (and its weights) before anything announces an extraction: a
        # download or a bad weights file fails first (Ray's workers build their own).
        runtime_notes: list[str] = []  # what the runtime could not do as asked (probe.features.runtime)
        model = runtime_mod.load_backbone(extraction, target.path.parent, runtime_notes.append) \
            if (plan.todo or views_needed) and local_engine else None
        for note in runtime_notes:
            emit(progress, RuntimeNote(message=note))
        if model is not None and extraction.precision == "float32" and device.bf16_pays():
            emit(progress, Bf16Available())  # advice: the CLI says it once per run
        emit(progress, _started(plan))
        speed = {k: previous.attrs[k] for k in SPEED_ATTRS
                 if previous is not None and k in previous.attrs}
        if plan.todo:
            speed = _run(model, extraction, found.root, plan, parts, rows, skips, engine,
                         progress, speed, decoding)
    entries, skipped = plan_mod.assemble(plan, rows, skips, found.root)
    view_todo = plan_mod.views_todo(plan.sources, rows, known_views, views.count)
    if view_todo:
        _run_views(model, extraction, found.root, view_todo, view_parts, known_views, views,
                   progress)
    feature_shape = _feature_shape(model, extraction, rows)
    attrs = {**_attrs(plan, extraction, split, found, feature_shape, speed), **views.to_attrs()}
    store.write_cache(target.path, attrs, entries, skipped, feature_shape,
                      _view_rows(entries, known_views, views))
    parts.clear()
    view_parts.clear()
    extracted = sum(1 for s in plan.todo if s.key in rows)
    train_rows = sum(1 for entry in entries if entry.split == "train")
    ran = "" if model is None and not (plan.todo and isinstance(engine, RayOptions)) \
        else runtime_mod.runtime_of(model)
    report = ExtractionReport(ExtractionStatus.EXTRACTED, extracted, len(entries) - extracted, len(skipped),
                              found.ignored, plan.changes, damaged,
                              found.notes() + runtime_notes,
                              len(view_todo), views.count * train_rows - len(view_todo), ran)
    emit(progress, ExtractionFinished(path=target.path, report=report))
    return FeatureCache.open(target.path), report


def _run(model, extraction: ExtractionSettings, root: Path, plan: ExtractionPlan,
         parts: store.PartStore, rows: dict, skips: dict, engine: Engine,
         progress: ProgressCallback | None, speed: dict, decoding: Decoding | None) -> dict:
    """Run the backbone over the plan's to-do list, one part per batch (local: the batches
    of `decoding`) or per shard (Ray); returns the speed attributes to record (this run's,
    when it did the most work; timed from here, the model's loading left out as before,
    though the first batches may have been decoded while it loaded)."""
    started, done = time.perf_counter(), 0
    if isinstance(engine, RayOptions):
        steps = ray_engine.run_shards(extraction.to_attrs(), extraction.batch_size, root,
                                      plan.todo, parts.directory, engine)
        # the first shard of each worker also starts it and builds its model
        pace = Pace(len(plan.todo), warm_up=engine.workers)
    else:
        steps = _run_local(model, parts, rows, skips, decoding)
        pace = Pace(len(plan.todo))  # the first batch also traces the model
    for count in steps:
        done += count
        elapsed, remaining = pace.advance(done)
        emit(progress, Advanced(STAGE, done=done, total=len(plan.todo), elapsed=elapsed,
                                remaining=remaining))
    if isinstance(engine, RayOptions):  # the workers wrote the parts
        _read_parts(parts, rows, skips)
    seconds = time.perf_counter() - started
    if len(plan.todo) < int(speed.get("extract_images", 0)):
        return speed
    return {"extract_images": len(plan.todo), "extract_seconds": round(seconds, 3),
            "extract_images_per_second": round(len(plan.todo) / max(seconds, 1e-9), 2),
            "extract_runtime": runtime_mod.runtime_of(model)}


def _run_local(model, parts: store.PartStore, rows: dict, skips: dict, decoding: Decoding):
    """The local engine: one part per batch; yields each batch's number of images."""
    for batch in forward(model, decoding):
        part = parts.write(batch.features, [s.sample.path for s in batch.done],
                           [s.size for s in batch.done], [s.mtime for s in batch.done],
                           batch.skipped)
        for i, s in enumerate(batch.done):
            rows[s.key] = cache_mod.Row(str(part), "", i)
        for path, reason, size, mtime in batch.skipped:
            skips[(path, size, mtime)] = reason
        yield len(batch)


VIEWS_STAGE = Stage.VIEWS


def _run_views(model, extraction: ExtractionSettings, root: Path,
               todo: tuple[plan_mod.ViewSource, ...], parts: store.PartStore,
               known: dict, views: ViewSettings, progress: ProgressCallback | None) -> None:
    """The backbone over the augmented views still missing, one part per batch (as for
    clean features: a kill loses at most the batch being computed); `known` gets their
    rows. Progress events of stage "views"."""
    def load(item: plan_mod.ViewSource) -> np.ndarray:
        return augment_mod.load_view(root / item.sample.path, item.sample.path,
                                     extraction.image_size, item.view, views)

    images = len({item.source.key for item in todo})
    emit(progress, ViewsStarted(total=len(todo), images=images, per_image=views.count,
                                policy=views.policy))
    done, pace = 0, Pace(len(todo))
    for batch in run_batches(model, extraction.spec, root, todo, extraction.image_size,
                             extraction.batch_size, load=load):
        if batch.skipped:
            path, reason = batch.skipped[0][:2]
            raise ProbeError(f"expected every training image with features to give its "
                             f"augmented views; '{path}' did not ({reason}). Check the file "
                             "and run again (finished batches are kept).")
        part = parts.write(batch.features, [s.sample.path for s in batch.done],
                           [s.size for s in batch.done], [s.mtime for s in batch.done], [],
                           views=[s.view for s in batch.done])
        for i, item in enumerate(batch.done):
            known[item.key] = cache_mod.ViewRow(str(part), "", i, item.view)
        done += len(batch)
        elapsed, remaining = pace.advance(done)
        emit(progress, Advanced(VIEWS_STAGE, done=done, total=len(todo), elapsed=elapsed,
                                remaining=remaining))
    emit(progress, ViewsFinished(extracted=len(todo)))


def _known_views(target: plan_mod.CacheTarget, views: ViewSettings,
                 view_parts: store.PartStore) -> dict:
    """Views already computed with these features, policy and seed."""
    if not views.count:
        return {}
    return store.reusable_view_rows(target.path.parent, target.feature_key, views.policy,
                                    views.seed, view_parts)


def _view_rows(entries: list[plan_mod.Entry], known: dict, views: ViewSettings) -> dict | None:
    """The rows of views 0..count-1 of every training entry, for `store.write_cache`."""
    if not views.count:
        return None
    return {(e.path, e.size, e.mtime): [known[(e.path, e.size, e.mtime, v)]
                                        for v in range(views.count)]
            for e in entries if e.split == "train"}


def _view_parts(directory: Path, target: plan_mod.CacheTarget,
                views: ViewSettings) -> store.PartStore:
    """Finished batches of views of one policy and seed (under the lock of the features)."""
    key = cache_mod.fingerprint(views.identity)[:8]
    return store.PartStore(directory / f".parts-{target.short_key}-views-{key}")


def _read_parts(parts: store.PartStore, rows: dict, skips: dict) -> None:
    """The rows and skip records of the parts written meanwhile (by other processes)."""
    for path, row, size, mtime in parts.rows():
        rows.setdefault((path, size, mtime), row)
    for path, reason, size, mtime in parts.skip_records():
        skips.setdefault((path, size, mtime), reason)


def stat_sources(found: data.Dataset) -> tuple[list[Source], list[tuple[data.Sample, str]]]:
    """Each sample with its file's size and mtime; files that can not be stat'ed apart."""
    sources, unreadable = [], []
    for sample in found.samples:
        try:
            stat = os.stat(found.root / sample.path)
        except OSError as error:
            unreadable.append((sample, f"can not be read: {error.strerror}"))
            continue
        sources.append(Source(sample, int(stat.st_size), int(stat.st_mtime_ns)))
    return sources, unreadable


def resolve_engine(engine: str, workers: int | None, ray: RayOptions | None) -> Engine:
    """The engine to run: the local one (its decoding threads) or Ray's options; one error
    line for an unknown name or a Ray engine without ray installed."""
    if engine == "local":
        return workers
    if engine == "ray":
        ray_engine.require_ray()
        return ray or RayOptions()
    raise ProbeError(f"expected engine 'local' or 'ray'. Received: engine='{engine}'")


def _started(plan: ExtractionPlan) -> ExtractionStarted:
    return ExtractionStarted(total=len(plan.todo), target=plan.target.path,
                             images=len(plan.sources), changes=plan.changes,
                             resumed_parts=plan.resumed_parts, damaged=plan.damaged)


def _feature_shape(model, extraction: ExtractionSettings, rows: dict) -> tuple[int, ...]:
    """The shape of one image's features: the model's, or, when every row is reused (no
    model built), the stored one."""
    if model is not None:
        return tuple(int(d) for d in model.output_shape[1:])
    if extraction.pooling != "none":
        return tuple(extraction.spec.feature_shape(extraction.image_size, extraction.pooling))
    for row in rows.values():
        if row.group:
            return tuple(FeatureCache.open(row.source).feature_shape)
        with np.load(row.source, allow_pickle=False) as part:
            return tuple(part["features"].shape[1:])
    return (extraction.spec.feature_size,)  # no row at all: the run stops before writing


def _attrs(plan: ExtractionPlan, extraction: ExtractionSettings, split: SplitSettings,
           found: data.Dataset, feature_shape: tuple[int, ...], speed: dict) -> dict[str, Any]:
    return {
        "format": format_mod.FORMAT,
        "format_version": format_mod.FORMAT_VERSION,
        "feature_key": plan.target.feature_key,
        "source_fingerprint": plan.source_fingerprint,
        **extraction.to_attrs(),
        "feature_shape": list(feature_shape),
        "classes": found.classes,
        **({"multilabel": True} if found.multilabel else {}),  # single-label: as before
        "dataset_root": str(found.root),
        **split.to_attrs(),
        "ignored_files": found.ignored,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": device.package_versions(),
        **speed,
    }


def _lock_path(directory: Path, target: plan_mod.CacheTarget) -> Path:
    return directory / f".lock-{target.short_key}"


def _parts(directory: Path, target: plan_mod.CacheTarget) -> store.PartStore:
    return store.PartStore(directory / f".parts-{target.short_key}")


def _make_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheError(
            f"expected a cache directory that can be created and written; {error.strerror}. "
            f"Pass a writable --cache-dir or set PROBE_CACHE_DIR. "
            f"Received: cache_dir='{files.display(directory)}'"
        ) from None
