"""Training a head on a cache, and the run directory that records it.

A run directory (`<cache dir>/runs/<time>-<backbone>-<head>/`) holds `config.json`
(everything needed to reproduce the run and to rebuild its backbone), `metrics.json`, the
plots and the head itself (`head/`), or for a fine-tuned run the whole model (`model.keras`),
and last `manifest.json`: the checksum of every file, verified whenever the run is read back
(`probe.run_files`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .features import cache as cache_mod
from . import calibration, evaluate, files, heads, html, report, run_files, settings
from .features.cache import FeatureCache
from .errors import CacheError, RunError
from .heads.stream import FeatureStream
from .run_files import CONFIG, HEAD_DIR, METRICS, MODEL_FILE, RELIABILITY_FIGURE, Run  # noqa: F401 (API)
from .task import Task


def resolve_cache(
    cache: str | os.PathLike | FeatureCache | None = None,
    backbone: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[FeatureCache, str | None]:
    """The cache to fit on, and a note when it was picked among several."""
    if isinstance(cache, FeatureCache):
        return cache, None
    if cache is not None:
        return FeatureCache.open(cache), None
    directory = cache_mod.resolve_cache_dir(cache_dir)
    caches = cache_mod.list_caches(directory)
    if backbone is not None:
        caches = [c for c in caches if c.backbone == str(backbone).lower()]
    if not caches:
        wanted = f" for backbone '{backbone}'" if backbone else ""
        unsealed = cache_mod.list_unsealed(directory)
        older = (f" ({len(unsealed)} older-format cache(s) need `probe cache reseal "
                 f"'{files.display(unsealed[0])}'` first)") if unsealed else ""
        raise CacheError(
            f"expected a feature cache{wanted} in '{directory}'; found none{older}. Run "
            f"`probe extract{' --backbone ' + backbone if backbone else ''} DATASET` first, "
            "or pass --cache PATH or --cache-dir."
        )
    if len(caches) == 1:
        return caches[0], None
    others = ", ".join(files.display(c.path.name) for c in caches[1:4])
    more = f" and {len(caches) - 4} more" if len(caches) > 4 else ""
    return caches[0], (f"{len(caches)} caches found; using the most recent: {caches[0].path} "
                       f"(others: {others}{more}; choose one with --cache PATH or --backbone "
                       "NAME, see `probe cache ls`)")


def fit(
    cache: str | os.PathLike | FeatureCache | None = None,
    head: str = heads.DEFAULT_HEAD,
    *,
    backbone: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    runs_dir: str | os.PathLike | None = None,
    strict: bool = False,
    html_report: bool = True,
    views: bool = True,
    **head_params: Any,
) -> Run:
    """Train a head on a feature cache, evaluate it and write a run directory.

    `head` is a name of `probe.list_heads()` ("logreg", "dense", "knn"); `head_params` go
    to its constructor (e.g. `C=1.0`, `epochs=20`, `class_weight="balanced"`, `seed=0`). Split roles: train fits, val selects
    (C, early stopping), test reports. Without a test split the scores are those of the
    validation split, from a head fit on train only, and labelled "validation, used for
    selection" (`metrics["split_role"]`). Every score carries its 95% interval
    (`accuracy_ci`, ...). When the cache's source images changed since extraction,
    `Run.notes` warns with the counts; `strict=True` raises `SourceChangedError` instead.
    The runs directory is checked for writing before any training. `html_report=True`
    writes report.html (probe.html); cross-split duplicates in the cache add a warning to
    `Run.notes`. When the cache holds augmented views (`probe.extract(..., augment=K)`)
    the head trains on them too, unless `views=False`; `config["views"]` records which.
    Calibration: see `validation_temperature` (the temperature, applied to what the run,
    predict and export give) and `probe.calibration` (`expected_calibration_error`).

    >>> run = probe.fit(head="logreg")
    >>> run.metrics["accuracy"], run.metrics["accuracy_ci"], run.path
    """
    chosen, note = resolve_cache(cache, backbone, cache_dir)
    runs = Path(runs_dir) if runs_dir else chosen.path.parent / "runs"
    check_writable(runs)
    notes = ([note] if note else []) + source_notes(chosen, strict)
    roles = SplitRoles.of(chosen)
    notes += roles.notes()
    task = Task.of_flag(chosen.multilabel)
    model = heads.make_head(head, **head_params)
    if roles.report == "val":
        model.set_params(refit=False)  # the reported split must not be training data
    stream = check_features_fit_in_memory(chosen, streams=model.streams_features, views=views)
    views = views and not stream  # views are read into memory; a streamed fit goes without
    fit_seconds = train_head(model, chosen, roles, stream, views)
    temperature = validation_temperature(model, chosen, roles, task, stream, views)
    reported = read_split(chosen, roles.report, stream)
    raw = model.predict_proba(reported.features)
    proba = temperature.apply(raw)  # what the run reports, predict and export give
    settings_chosen = model.summary_()  # C; k and T; epochs
    thresholds = task.head_thresholds(model)
    metrics = {**roles.describe(),
               **task.metrics(reported.labels, proba, chosen.classes, thresholds,
                              ignore=reported.ignore),
               **uncalibrated_error(task, reported.labels, raw, reported.ignore),
               **temperature.record(),
               "fit_seconds": round(fit_seconds, 3),
               "skipped_files": [{"path": p, "reason": r} for p, r in chosen.skipped],
               "chosen": settings_chosen, **settings_chosen}
    config = run_config(chosen, head=head, head_params=model.get_params(), fit_seconds=fit_seconds,
                        **task.config(chosen.classes, thresholds), views=views_config(chosen, views),
                        temperature=temperature.value)

    def write(directory: Path) -> None:
        model.save(directory / HEAD_DIR)
        write_run_files(directory, config, metrics, model.curves_())
        task.write_predictions(directory, reported.paths, reported.labels, proba, chosen.classes,
                               metrics, thresholds, reported.ignore)
        write_reliability(directory, task, reported.labels, raw, proba, metrics, reported.ignore)

    directory = save_run(runs, (chosen.backbone, head), write)
    notes += temperature_notes(metrics)
    if stream:
        notes.append("the features are larger than the memory available: the head read them "
                     "in chunks; the duplicate check and report.html, which need them all in "
                     "memory, were skipped"
                     + ("; the augmented views were not used" if chosen.view_count else ""))
    else:
        notes += html.after_fit(chosen, directory, report=html_report)
    return Run(directory, config, metrics, notes)


@dataclass(frozen=True)
class SplitRoles:
    """Which split of a cache fits, which selects and which reports.

    train fits; val (when there is one) selects; test reports, or val when there is no
    test split (then the head is fit on train only and the score is labelled as a
    validation score).
    """

    select: str | None
    report: str

    @classmethod
    def of(cls, cache: FeatureCache) -> "SplitRoles":
        select = "val" if cache.counts.get("val") else None
        report = "test" if cache.counts.get("test") else select
        if report is None:
            raise CacheError(
                f"expected a test or validation split to evaluate on; cache '{cache.path}' has "
                "only train. Extract with --test-fraction > 0 or add a test/ folder."
            )
        return cls(select, report)

    def describe(self) -> dict:
        """The metrics.json fields that say where the scores come from."""
        return {"split": self.report, "split_role": evaluate.split_role(self.report),
                "selected_on": self.select}

    def notes(self) -> list[str]:
        """One line per thing the user must know about the roles."""
        if self.select is None:
            return ["no validation split (extracted with --val-fraction 0, or by an older "
                    "probe): nothing is chosen on validation, so no C sweep (C = 1 unless "
                    "--C) and no early stopping (every epoch runs)"]
        if self.report == "val":
            return ["no test split: the scores are on the validation split that chose the "
                    "head's settings (optimistic), from a head fit on train only; add a test "
                    "split (a test/ folder, --test-fraction or test rows) for an unbiased score"]
        return []


def validation_temperature(model: Any, cache: FeatureCache, roles: SplitRoles, task: Task,
                           stream: bool = False, views: bool = True) -> calibration.Temperature:
    """The temperature of a fitted single-label head (`calibration.choose_temperature`).
    It is fitted on the validation predictions of a head that never trained on val:
    `model` itself when it was fit on train only, otherwise (refit on train + val) those
    its selection made with the train-only model (`validation_proba_`), or, for a head
    that made none (a C given, no selection), a clone of it fit on train only. T = 1 with
    a note for multi-label runs and without val.

    `fit` applies it to every probability the run reports (test_predictions.csv, the
    metrics), and records it in config.json (`temperature`, which `probe.predict` and
    `probe.export` apply) and metrics.json (`temperature`, `temperature_note`,
    `temperature_from`, beside `expected_calibration_error_uncalibrated`)."""
    if task.multilabel or roles.select is None:
        return task_temperature(task, None, None)
    val = read_split(cache, roles.select, stream)
    if not model.get_params().get("refit"):
        return task_temperature(task, val.labels, lambda: model.predict_proba(val.features),
                                "the validation predictions of the scored head (fit on train only)")
    where = ("the validation predictions of the head fit on train only (the scored head was "
             "refit on train + val)")
    kept = getattr(model, "validation_proba_", None)
    if kept is not None and len(kept) == len(val.labels):  # selection computed them already
        return task_temperature(task, val.labels, lambda: kept, where)
    from sklearn.base import clone

    source = clone(model).set_params(refit=False)
    train_head(source, cache, roles, stream, views)
    return task_temperature(task, val.labels, lambda: source.predict_proba(val.features), where)


def task_temperature(task: Task, y_val: Any, proba_val: Callable[[], np.ndarray] | None,
                     source: str | None = None) -> calibration.Temperature:
    """The temperature fitted on validation labels and the probabilities `proba_val()`
    gives, from a model that never trained on them (`calibration.choose_temperature`;
    None: no validation split), recorded as fitted on `source` where it is not 1.
    Multi-label: T = 1, with the reason."""
    if task.multilabel:
        return calibration.Temperature(note=(
            "multi-label: not temperature-scaled (each class's decision threshold was chosen "
            "on the probabilities as they are); the calibration error is over the (image, "
            "class) entries, each a prediction at 0.5"))
    if proba_val is None:
        return calibration.choose_temperature(None, None)
    temperature = calibration.choose_temperature(y_val, proba_val())
    return replace(temperature, source=source) if temperature.value != 1 else temperature


def uncalibrated_error(task: Task, labels: Any, raw: np.ndarray, ignore: Any = None,
                       seed: int = 0) -> dict:
    """`expected_calibration_error_uncalibrated` (and its interval): the ECE of the head's
    own probabilities `raw`, before the temperature (`calibration.Temperature`)."""
    name = "expected_calibration_error_uncalibrated"
    if task.multilabel:
        return evaluate.multilabel_calibration_error(labels, raw, ignore, seed, name=name)
    return evaluate.calibration_error(labels, raw, seed, name=name)


def write_reliability(directory: Path, task: Task, labels: Any, raw: np.ndarray,
                      proba: np.ndarray, metrics: dict, ignore: Any = None) -> None:
    """reliability.png: the reliability diagram of the reported probabilities and of the
    head's own (`report.plot_reliability`); multi-label: of the (image, class) entries."""
    if task.multilabel:
        before = calibration.multilabel_confidence(labels, raw, ignore)[:2]
        after = calibration.multilabel_confidence(labels, proba, ignore)[:2]
    else:
        before, after = calibration.top_label(labels, raw), calibration.top_label(labels, proba)
    role = metrics.get("split_role") or metrics.get("split", "test")
    report.plot_reliability(after, directory / RELIABILITY_FIGURE, before=before,
                            temperature=metrics.get("temperature", 1.0),
                            title=f"Reliability ({role})")


def temperature_notes(metrics: dict) -> list[str]:
    """A line when the reported probabilities are the head's own divided by a temperature:
    T and the calibration error before and after."""
    T = metrics.get("temperature", 1.0)
    if T == 1 or "expected_calibration_error_uncalibrated" not in metrics:
        return []
    return [f"probabilities temperature-scaled (T = {T:.3g}, fitted on validation): expected "
            f"calibration error {metrics['expected_calibration_error_uncalibrated']:.4f} before, "
            f"{metrics['expected_calibration_error']:.4f} after; predict and export apply it too"]


def source_notes(cache: FeatureCache, strict: bool) -> list[str]:
    """Warnings about the cache's source images (changed since extraction, skipped files);
    with `strict`, a change raises `SourceChangedError`."""
    notes = []
    changes = cache.check_source(strict=strict)
    if changes:
        notes.append(f"warning: {changes.message()} (--strict makes this an error)")
    if cache.skipped:
        notes.append(f"{len(cache.skipped)} files of the dataset were skipped at extraction "
                     "(listed in metrics.json)")
    return notes


def read_split(cache: FeatureCache, name: str, stream: bool = False) -> cache_mod.Split:
    """One split of the cache; with `stream`, its features as a `FeatureStream` (read a
    chunk at a time by the head) instead of an array."""
    if not stream:
        return cache.split(name)
    paths, labels = cache.index(name)
    return cache_mod.Split(name, FeatureStream.of_cache(cache, name), labels, paths)


def views_config(cache: FeatureCache, used: bool) -> dict:
    """What config.json records about augmented views: how many the cache has per training
    image, with which policy and seed, and whether the head trained on them."""
    count = cache.view_count
    return {"per_image": count if used else 0, "available": count,
            "policy": cache.attrs.get("views_policy") if count else None,
            "seed": cache.attrs.get("views_seed") if count else None}


def train_head(model: Any, cache: FeatureCache, roles: SplitRoles, stream: bool = False,
               views: bool = True) -> float:
    """Fit `model` on train (selecting on the clean val when there is one; with `views`,
    also on the cache's augmented views of the training images); the seconds it took.
    With `stream`, the head reads the features a chunk at a time."""
    augmented = cache.views("train") if views else None
    train = read_split(cache, "train", stream)
    val = read_split(cache, roles.select, stream) if roles.select else None
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(train.features, train.labels,
                  X_val=None if val is None else val.features,
                  y_val=None if val is None else val.labels,
                  classes=cache.classes, views=augmented)
    return time.perf_counter() - started


def check_writable(directory: Path) -> None:
    """Raise `RunError` (one line) unless a run can be written under `directory`: checked
    before training, so that a read-only or full disk does not cost the training time."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-") as handle:
            handle.write(b"\0" * 65536)  # a full disk fails here or at the sync
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise RunError(
            f"expected a writable directory for the run; can not write in '{directory}' "
            f"({error.strerror or error}). Free some space, fix its permissions, or choose "
            "another place with --runs-dir."
        ) from None


def save_run(runs_dir: Path, labels: tuple[str, ...], write: Callable[[Path], None]) -> Path:
    """Have `write` fill a hidden temporary directory, add its manifest, then give it its
    final name (`new_run_dir`): a failure half-way leaves no half-written run directory
    behind."""
    temporary = Path(tempfile.mkdtemp(dir=runs_dir, prefix=".run-"))
    final = None
    try:
        write(temporary)
        run_files.write_manifest(temporary)  # last: it lists every file written above
        final = new_run_dir(runs_dir, *labels)
        files.replace_directory(temporary, final)  # over the empty reserved one, atomically
        return final
    except OSError as error:
        _remove(temporary, final)
        raise RunError(
            f"could not write the run under '{runs_dir}' ({error.strerror or error}); free "
            "some space or choose another place with --runs-dir."
        ) from None
    except BaseException:
        _remove(temporary, final)
        raise


def _remove(temporary: Path, final: Path | None) -> None:
    shutil.rmtree(temporary, ignore_errors=True)
    if final is not None and final.is_dir() and not any(final.iterdir()):
        final.rmdir()


def check_features_fit_in_memory(cache: FeatureCache, available: int | None = None,
                                 streams: bool = False, views: bool = False) -> bool:
    """Whether the head must read the features in chunks: False when they (every split,
    with `views` the augmented views too, float32) fit in the memory available; True when
    they do not and the head streams (`streams_features`); otherwise a refusal, before
    anything is loaded."""
    rows = sum(cache.counts.values()) + (cache.view_count * cache.counts.get("train", 0)
                                         if views else 0)
    needed = rows * int(np.prod(cache.feature_shape)) * 4
    available = settings.available_memory() if available is None else available
    if not available or needed <= available:
        return False
    if streams:
        return True
    raise CacheError(
        f"expected the features of cache '{cache.path}' to fit in memory: they need "
        f"{needed / 2**30:.1f} GiB ({rows} feature rows x "
        f"{int(np.prod(cache.feature_shape))} values x 4 bytes), {available / 2**30:.1f} GiB "
        "is available. Fit on a subsample (a smaller dataset folder or --labels CSV), "
        "extract with --pooling avg (smaller features), use a head that reads the cache "
        f"in chunks ({streaming_heads()}), or use a machine with more memory.")


def streaming_heads() -> str:
    """The heads that read features larger than memory in chunks, as options."""
    return " or ".join(f"--head {name}" for name in heads.list_heads()
                       if heads.HEADS[name].streams_features)


def run_config(cache: FeatureCache, **extra: Any) -> dict:
    """What a run records about its cache: enough to rebuild the backbone and find the
    images, plus whatever the caller adds."""
    attrs = cache.attrs
    return {
        "cache": str(cache.path.resolve()),
        "feature_key": attrs.get("feature_key"),
        "source_fingerprint": attrs.get("source_fingerprint"),
        "backbone": cache.backbone,
        "weights": attrs.get("weights"),
        "weights_source": attrs.get("weights_source"),
        "weights_seed": attrs.get("weights_seed"),
        "weights_sha256": attrs.get("weights_sha256"),
        "image_size": int(attrs["image_size"]),
        "pooling": attrs.get("pooling"),
        "preprocessing": attrs.get("preprocessing"),
        # a .keras backbone and chosen layers, where the cache has them
        **{key: attrs[key] for key in ("backbone_source", "backbone_sha256", "layers",
                                   "hub_source", "hub_sha256", "blocks")
           if key in attrs},
        "feature_shape": list(cache.feature_shape),
        "classes": cache.classes,
        "dataset_root": attrs.get("dataset_root"),
        "split_seed": attrs.get("seed"),
        "splits": dict(cache.counts),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": attrs.get("versions"),
        **extra,
    }


def new_run_dir(runs_dir: str | os.PathLike, *labels: str) -> Path:
    """A fresh, empty directory named by the time and the labels, e.g.
    `20260101-120000-vgg16-logreg`."""
    runs = Path(runs_dir)
    base = "-".join([_dt.datetime.now().strftime("%Y%m%d-%H%M%S"), *labels])
    for attempt in range(1000):
        candidate = runs / (base if attempt == 0 else f"{base}-{attempt + 1}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise RunError(f"could not create a run directory under '{runs}'")


def write_run_files(directory: Path, config: dict, metrics: dict, history: Any) -> None:
    """config.json, metrics.json and (with curves: a head's `curves_()` or a Keras history
    dict) curves.png; the predictions and their figure are the task's
    (`Task.write_predictions`)."""
    files.write_text(directory / CONFIG, json.dumps(config, indent=2, default=files.json_default))
    files.write_text(directory / METRICS, json.dumps(metrics, indent=2, default=files.json_default))
    if history:
        report.plot_curves(history, directory / "curves.png")


SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "mean_average_precision", "micro_f1", "macro_f1",
                "exact_match_accuracy", "log_loss", "top5_accuracy", "expected_calibration_error")
CI_COLUMN = "95% interval"


def summary_columns(metrics: dict) -> list[str]:
    """The columns of `summary_rows`: metric, the split's role, the interval."""
    return ["metric", score_label(metrics), CI_COLUMN]


def score_label(metrics: dict) -> str:
    """What a run's scores are: "test", or "validation, used for selection"."""
    return metrics.get("split_role") or evaluate.split_role(metrics.get("split", "test"))


def summary_rows(metrics: dict) -> list[dict]:
    """The headline figures of a run as table rows, each with its 95% interval."""
    label = score_label(metrics)
    return [{"metric": key, label: metrics[key],
             CI_COLUMN: report.format_interval(metrics.get(f"{key}_ci")) if f"{key}_ci" in metrics else None}
            for key in SUMMARY_KEYS if key in metrics]
