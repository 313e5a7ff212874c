"""Training a head on a cache, and the run directory that records it.

A run directory (`<cache dir>/runs/<time>-<backbone>-<head>/`) holds `config.json`
(everything needed to reproduce the run and to rebuild its backbone), `metrics.json`, the
plots and the head itself (`head/`), or for a fine-tuned run the whole model (`model.keras`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import cache as cache_mod, heads, report, store
from .cache import FeatureCache
from .errors import CacheError, RunError

CONFIG = "config.json"
METRICS = "metrics.json"
HEAD_DIR = "head"
MODEL_FILE = "model.keras"


@dataclass
class Run:
    """A finished run: its directory, configuration and test metrics."""

    path: Path
    config: dict
    metrics: dict
    notes: list[str] = field(default_factory=list)  # things the user should be told

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Run":
        """Open a run directory written by `probe fit` or `probe finetune`."""
        directory = Path(path).expanduser()
        config_path = directory / CONFIG
        if not config_path.is_file():
            raise RunError(
                f"expected a run directory written by `probe fit` (with {CONFIG}); "
                f"{'it does not exist' if not directory.exists() else f'found no {CONFIG}'}. "
                f"Runs are under .probe/runs/. Received: run='{path}'"
            )
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            metrics_path = directory / METRICS
            metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
        except (OSError, ValueError) as error:
            raise RunError(
                f"the run file '{config_path}' can not be read ({error}); re-run `probe fit`."
            ) from None
        missing = [key for key in ("head", "backbone", "classes", "image_size") if key not in config]
        if missing:
            raise RunError(
                f"'{config_path}' is not a probe run configuration: it lacks {', '.join(missing)}; "
                f"re-run `probe fit`. Received: run='{path}'"
            )
        return cls(directory, config, metrics)

    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def is_finetuned(self) -> bool:
        return (self.path / MODEL_FILE).is_file()

    def load_head(self) -> heads.LogisticHead | heads.DenseHead:
        """The trained head (not for a fine-tuned run, whose head is inside its model)."""
        return heads.load_head(self.path / HEAD_DIR)


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
        raise CacheError(
            f"expected a feature cache{wanted} in '{directory}'; found none. Run "
            f"`probe extract{' --backbone ' + backbone if backbone else ''} DATASET` first, "
            "or pass --cache PATH or --cache-dir."
        )
    if len(caches) == 1:
        return caches[0], None
    return caches[0], f"{len(caches)} caches found; using the most recent: {caches[0].path}"


def fit(
    cache: str | os.PathLike | FeatureCache | None = None,
    head: str = "logreg",
    *,
    backbone: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    runs_dir: str | os.PathLike | None = None,
    strict: bool = False,
    **head_params: Any,
) -> Run:
    """Train a head on a feature cache, evaluate it and write a run directory.

    `head` is "logreg" or "dense"; `head_params` go to its constructor (e.g. `C=1.0`,
    `epochs=20`, `class_weight="balanced"`, `seed=0`). The test split is used for the
    metrics (the validation split when there is no test split). When the cache's source
    images changed since extraction, `Run.notes` warns with the counts; `strict=True`
    raises `SourceChangedError` instead.

    >>> run = probe.fit(head="logreg")
    >>> run.metrics["accuracy"], run.path
    """
    chosen, note = resolve_cache(cache, backbone, cache_dir)
    notes = [note] if note else []
    changes = chosen.check_source(strict=strict)
    if changes:
        notes.append(f"warning: {changes.message()} (--strict makes this an error)")
    skipped = [{"path": path, "reason": reason} for path, reason in chosen.skipped]
    if skipped:
        notes.append(f"{len(skipped)} files of the dataset were skipped at extraction "
                     "(listed in metrics.json)")
    model = heads.make_head(head, **head_params)
    check_features_fit_in_memory(chosen)
    train = chosen.split("train")
    val = chosen.split("val") if "val" in chosen.counts else None
    evaluation = "test" if "test" in chosen.counts else ("val" if val is not None else None)
    if evaluation is None:
        raise CacheError(
            f"expected a test or validation split to evaluate on; cache '{chosen.path}' has only "
            "train. Extract with --test-fraction > 0 or add a test/ folder."
        )
    if val is None:
        notes.append("no validation split: no early stopping or C sweep")
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(train.features, train.labels,
                  X_val=None if val is None else val.features,
                  y_val=None if val is None else val.labels,
                  classes=chosen.classes)
    fit_seconds = time.perf_counter() - started
    evaluated = chosen.split(evaluation)
    proba = model.predict_proba(evaluated.features)
    metrics = {"split": evaluation, **report.compute_metrics(evaluated.labels, proba, chosen.classes)}
    metrics["fit_seconds"] = round(fit_seconds, 3)
    metrics["skipped_files"] = skipped
    if head == "logreg":
        metrics["C"] = float(model.C_)

    directory = new_run_dir(runs_dir or (chosen.path.parent / "runs"), chosen.backbone, head)
    model.save(directory / HEAD_DIR)
    config = run_config(chosen, head=head, head_params=model.get_params(), fit_seconds=fit_seconds)
    # dense: loss and accuracy per epoch; logreg: validation accuracy and loss over the C sweep
    write_run_files(directory, config, metrics, model.history_ if any(model.history_.values()) else None)
    write_split_predictions(directory / "test_predictions.csv", evaluated.paths, evaluated.labels, proba,
                       chosen.classes)
    return Run(directory, config, metrics, notes)


def check_features_fit_in_memory(cache: FeatureCache, available: int | None = None) -> None:
    """Refuse, before loading anything, a cache whose features (every split, float32) need
    more memory than is available: a head is fit on all of them in memory."""
    needed = sum(cache.counts.values()) * int(np.prod(cache.feature_shape)) * 4
    available = _available_memory() if available is None else available
    if available and needed > available:
        raise CacheError(
            f"expected the features of cache '{cache.path}' to fit in memory: they need "
            f"{needed / 2**30:.1f} GiB ({sum(cache.counts.values())} images x "
            f"{int(np.prod(cache.feature_shape))} values x 4 bytes), {available / 2**30:.1f} GiB "
            "is available. Fit on a subsample (a smaller dataset folder or --labels CSV), "
            "extract with --pooling avg (smaller features), or use a machine with more memory.")


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable, else free pages);
    None where the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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


def write_run_files(directory: Path, config: dict, metrics: dict, history: dict | None) -> None:
    """config.json, metrics.json, confusion_matrix.png and (with a history) curves.png."""
    store.write_text(directory / CONFIG, json.dumps(config, indent=2, default=_json))
    store.write_text(directory / METRICS, json.dumps(metrics, indent=2, default=_json))
    report.plot_confusion_matrix(metrics["confusion_matrix"], config["classes"],
                                 directory / "confusion_matrix.png")
    if history:
        report.plot_curves(history, directory / "curves.png")


def summary_rows(metrics: dict) -> list[dict]:
    """The headline figures of a run as table rows."""
    keys = ["accuracy", "balanced_accuracy", "macro_f1", "log_loss", "top5_accuracy"]
    return [{"metric": key, metrics.get("split", "test"): metrics[key]} for key in keys if key in metrics]


def write_split_predictions(path: Path, paths: list[str], labels: np.ndarray, proba: np.ndarray,
                       classes: list[str]) -> None:
    import csv

    with store.atomic_write(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", *classes])
        for p, label, row in zip(paths, labels, proba):
            writer.writerow([p, classes[int(label)], classes[int(np.argmax(row))],
                             *(f"{v:.6f}" for v in row)])


def _json(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
