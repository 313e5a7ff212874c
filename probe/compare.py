"""Comparing backbones and heads on one dataset.

`compare()` extracts the features of every backbone that are not cached yet (every existing
cache is reused), fits every head on every backbone's features with identical splits, and
ranks the results. It writes a comparison directory `<cache dir>/runs/<time>-compare/` with
`compare.csv`, `compare.md` and a bar chart `compare.png`; each (backbone, head) fit is a
normal run directory inside it, ready for `probe predict` / `probe export`. Every row is
tested against the best on the same images (their test_predictions.csv, matched by path):
`p_value_vs_best` and `tied` (probe.significance).

A backbone or a fit that fails (weights that can not be loaded, for example) gets a row that
says why; the other rows still run. Settings that are wrong for every row (an unknown
backbone or head, an image size below a backbone's minimum, a missing dataset) are refused
before any work.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import itertools
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import (model_backbones, backbones as backbones_mod, data, device, evaluate, files, heads as heads_mod, html,
               report, run_files, significance)
from .features import cache as cache_mod
from .features.engines.ray import RayOptions
from .errors import BackboneError, ProbeError
from .progress import (BackboneExtracted, ComparisonFinished, ComparisonStarted, CurveFailed,
                       ExtractionFailed, HeadFitted, NextBackbone, ProgressCallback, emit)
from .settings import (DEFAULT_BATCH_SIZE, DEFAULT_SEED, TEST_FRACTION, VAL_FRACTION,
                       ExtractionSettings, SplitSettings, backbone_spec, parse_names)
from .task import INTERVAL_KEYS, ML_INTERVAL_KEYS, ML_SCORES, MULTI_LABEL, PREDICTIONS_FILE, \
    SINGLE_LABEL, Task

__all__ = ["Comparison", "compare", "parse_names", "parse_image_size", "image_sizes",
           "DEFAULT_BACKBONES", "DEFAULT_HEADS"]

DEFAULT_BACKBONES = ("vgg16", "resnet50")
DEFAULT_HEADS = ("logreg", "dense")
CSV_FILE, MARKDOWN_FILE, CHART_FILE = "compare.csv", "compare.md", "compare.png"

TEXT_COLUMNS = ("backbone", "head", "status", "tied", "accuracy_ci", "mean_average_precision_ci")
DECIMALS = {"accuracy": 4, "balanced_accuracy": 4, "macro_f1": 4, "images_per_second": 1,
            "fit_seconds": 2, "mean_average_precision": 4, "micro_f1": 4, "exact_match_accuracy": 4}
# the "tied" column: the best row; rows whose paired test against the best finds no
# significant difference (Holm-adjusted p >= 0.05), those where it does, and rows that were
# not scored on the best's images (or failed)
BEST, TIED, NOT_TIED, NOT_COMPARABLE = "best", "yes", "no", "not comparable"
P_COLUMN = ("p_value_vs_best", "p_vs_best")


def table_columns(task: Task) -> list[tuple[str, str]]:
    """(record key, header) of a comparison's table: the task's, with the Holm-adjusted
    p-value against the best after `tied`."""
    keys = [key for key, _ in task.table_columns]
    at = keys.index("tied") + 1
    return [*task.table_columns[:at], P_COLUMN, *task.table_columns[at:]]


def csv_columns(task: Task) -> list[str]:
    """The columns of compare.csv: the task's, with `p_value_vs_best` after `tied`."""
    at = task.csv_columns.index("tied") + 1
    return [*task.csv_columns[:at], P_COLUMN[0], *task.csv_columns[at:]]


TABLE_COLUMNS, ML_TABLE_COLUMNS = table_columns(SINGLE_LABEL), table_columns(MULTI_LABEL)
CSV_COLUMNS, ML_CSV_COLUMNS = csv_columns(SINGLE_LABEL), csv_columns(MULTI_LABEL)

MESSAGE_LIMIT = 400


class Comparison(list):
    """The ranked table: a list of records (dicts), best first, failed rows last.

    `path` is the comparison directory (compare.csv, compare.md, compare.png), `best` the
    best record and `best_run` its run directory, ready for `probe predict` / `probe export`.
    """

    def __init__(self, records: Iterable[dict], path: Path, settings: dict):
        super().__init__(records)
        self.path = path
        self.settings = settings
        self.curve = None  # with `shots`: the label-efficiency curves (a probe.curve.Curve)
        # what a predictor that knows nothing scores on the reported images ({score: value}):
        # `chance_levels` of the best row's predictions
        self.chance: dict[str, float] = {}

    @property
    def task(self) -> Task:
        """Single- or multi-label, as the settings record the dataset."""
        return Task.of_record(self.settings)

    @property
    def multilabel(self) -> bool:
        """Whether the dataset is multi-label (ranked by mean average precision)."""
        return self.task.multilabel

    @property
    def score(self) -> str:
        """The record key the rows are ranked by."""
        return self.task.score

    @property
    def columns(self) -> list[tuple[str, str]]:
        return table_columns(self.task)

    @property
    def csv_columns(self) -> list[str]:
        return csv_columns(self.task)

    @property
    def tied(self) -> list[dict]:
        """The rows whose paired test finds no significant difference from the best."""
        return [r for r in self if r.get("tied") == TIED]

    @property
    def not_comparable(self) -> list[dict]:
        """The successful rows that were not scored on the best row's images."""
        return [r for r in self if r["status"] == "ok" and r.get("tied") == NOT_COMPARABLE]

    @property
    def best(self) -> dict | None:
        return next((r for r in self if r["status"] == "ok"), None)

    @property
    def best_run(self) -> Path | None:
        return Path(self.best["run"]) if self.best else None

    @property
    def failed(self) -> list[dict]:
        return [r for r in self if r["status"] != "ok"]

    def table(self) -> str:
        """The ranked table as aligned text (numbers right-aligned, '-' where missing)."""
        headers = [header for _, header in self.columns]
        rows = [[_text(key, record.get(key)) for key, _ in self.columns] for record in self]
        widths = [max(len(c) for c in column) for column in zip(headers, *rows)]
        right = [key not in TEXT_COLUMNS for key, _ in self.columns]

        def line(cells: list[str]) -> str:
            return "  ".join(c.rjust(w) if r else c.ljust(w)
                             for c, w, r in zip(cells, widths, right)).rstrip()

        return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])

    def to_dataframe(self):
        """The table as a pandas DataFrame (needs pandas, which probe does not require)."""
        try:
            import pandas
        except ImportError:
            raise ProbeError(
                "to_dataframe() needs pandas, which is not installed; `pip install pandas`, "
                "or use the records of this list directly."
            ) from None
        return pandas.DataFrame(list(self), columns=self.csv_columns)


def parse_image_size(value: int | str | None) -> int | str | None:
    """`--image-size`: None (each backbone's native size), a number of pixels (every
    backbone at that size), "auto" (each backbone at its minimum size) or "auto:N" (each
    backbone at N, or at its minimum where N is below it)."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text.isdigit():
        return int(text)
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()):
        return text
    raise BackboneError(
        "expected --image-size as a number of pixels, 'auto' (each backbone's minimum) or "
        f"'auto:N' (N, raised to each backbone's minimum). Received: image_size={value!r}")


def image_sizes(specs: list, image_size: int | str | None) -> list[int]:
    """The input size of each backbone for `image_size` (see `parse_image_size`); a
    fixed size below some backbones' minimum names all of them in one error."""
    image_size = parse_image_size(image_size)
    if isinstance(image_size, str):
        floor = int(image_size[5:]) if ":" in image_size else 0
        return [spec.check_image_size(max(spec.min_size, floor)) for spec in specs]
    too_small = [spec for spec in specs if image_size is not None and image_size < spec.min_size]
    if too_small:
        named = ", ".join(f"{spec.name} needs an image size of at least {spec.min_size}"
                          for spec in too_small)
        raise BackboneError(
            f"{named}; use --image-size {max(s.min_size for s in too_small)} or more, or "
            f"--image-size auto:{image_size} (each backbone at {image_size} or its minimum, "
            f"whichever is larger). Received: image_size={image_size}")
    return [spec.check_image_size(image_size) for spec in specs]


@dataclass(frozen=True)
class _Plan:
    """Everything a comparison needs, validated before any work."""

    specs: list
    sizes: list[int]
    heads: list[str]
    params: dict[str, dict]
    found: data.Dataset  # discovered once, extracted by every backbone
    extraction: ExtractionSettings  # of the first backbone: `with_backbone` gives the others
    split: SplitSettings
    views: Any  # features.augment.ViewSettings
    engine: Any  # what features.extract.resolve_engine returned
    seed: int  # the default seed of the heads and curves
    html_report: bool = True  # report.html in every run directory
    shots: list | None = None  # label-efficiency curves of every backbone at these shot counts
    repeats: int = 5

    @property
    def total(self) -> int:
        return len(self.specs) * len(self.heads)


def compare(
    dataset: str | os.PathLike,
    backbones: str | Iterable[str] | None = None,
    heads: str | Iterable[str] | None = None,
    *,
    weights: str | os.PathLike | None = "imagenet",
    image_size: int | str | None = None,
    pooling: str = "avg",
    labels: str | os.PathLike | None = None,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: str | os.PathLike | None = None,
    runs_dir: str | os.PathLike | None = None,
    head_params: dict[str, dict[str, Any]] | None = None,
    progress: ProgressCallback | None = None,
    html_report: bool = True,
    engine: str = "local",
    ray: RayOptions | None = None,
    shots: str | Iterable[Any] | None = None,
    repeats: int = 5,
    augment: int = 0,
    augment_policy: str = "default",
    runtime: str = "auto",
) -> Comparison:
    """Fit every head on every backbone's features of `dataset` and rank the results.

    `backbones` and `heads` are lists or comma-separated strings (default: vgg16,resnet50
    and logreg,dense; "all": every registered backbone). The extraction settings are those
    of `probe.extract`; `image_size` None means each backbone's native size, "auto" each
    backbone's minimum, "auto:N" N raised to each backbone's minimum. `head_params` maps a
    head name to its parameters (e.g. `{"dense": {"epochs": 20}}`); `seed` is the default
    head seed. `progress` receives the events of the comparison (stage "compare") and of
    each extraction (stage "extract"). `html_report=True` writes report.html into the
    comparison directory and every run directory. `engine="ray"` extracts on a Ray
    cluster (`ray`: `RayOptions`), as in `probe.extract`. `shots` (e.g. "1,10,all") adds
    the label-efficiency curve of every backbone (`probe.curve`, `repeats` subsets per shot
    count, every head): `curve.csv` and `curve.png` (one line per backbone and head) in the
    comparison directory, and `Comparison.curve`. `augment=K` extracts K augmented
    views of every training image (`augment_policy`), as in `probe.extract`, and every head
    trains on them. `runtime` runs the backbones ("auto", "tensorflow", "openvino"), as in
    `probe.extract`.

    Returns a `Comparison`: the ranked records (backbone, head, accuracy and its 95%
    interval, tied and p_value_vs_best (a paired test against the best on the same images,
    see `paired_tests`), balanced_accuracy, macro_f1, split_role, ...) and `chance`, the
    scores of a predictor that knows nothing on the reported images.

    >>> table = probe.compare("digits/", "vgg16,resnet50", weights="none", image_size=64)
    >>> table.best_run, table.path
    """
    plan = _plan(dataset, backbones, heads, image_size, head_params, seed, weights=weights,
                 pooling=pooling, labels=labels, val_fraction=val_fraction,
                 test_fraction=test_fraction, batch_size=batch_size, engine=engine, ray=ray,
                 augment=augment, augment_policy=augment_policy, runtime=runtime)
    plan = _with_curves(dataclasses.replace(plan, html_report=html_report), shots, repeats)
    directory, out = _output_directories(cache_dir, runs_dir)
    emit(progress, ComparisonStarted(total=plan.total, backbones=tuple(s.name for s in plan.specs),
                                     heads=tuple(plan.heads), path=out))
    records, curves = _run_backbones(plan, directory, out, progress)
    task = Task.of_flag(plan.found.multilabel)
    predictions = read_predictions(records, task)
    result = Comparison(rank(records, task, predictions=predictions, seed=plan.seed), out,
                        _settings(plan, image_size, pooling, val_fraction, test_fraction, task))
    if result.best:
        result.chance = chance_levels(predictions.get(result.best["run"]), task)
    _write_outputs(result, plan, curves)
    emit(progress, ComparisonFinished(path=out, runs=len(result), failed=len(result.failed)))
    return result


def _plan(dataset, backbones, heads, image_size, head_params, seed: int, *, weights, pooling: str,
          labels, val_fraction: float, test_fraction: float, batch_size: int, engine: str,
          ray: RayOptions | None, augment: int, augment_policy: str, runtime: str) -> _Plan:
    """Refuse before any work what is wrong for every row: unknown names, sizes below a
    backbone's minimum, a bad pooling, weights, batch size or runtime, head parameters, the
    augmented views, the dataset, an engine that can not run. The settings are typed once
    here (a weights file hashed once, label files resolved once) and the dataset found once."""
    from . import hub_backbones
    from .features.augment import ViewSettings
    from .features.extract import discover, resolve_engine

    views = ViewSettings.create(augment, augment_policy, seed)
    names = parse_names(backbones, DEFAULT_BACKBONES, backbones_mod.list_backbones(),
                        keep_case=lambda name: model_backbones.is_model_path(name)
                        or hub_backbones.is_hub_value(name))
    head_names = parse_names(heads, DEFAULT_HEADS)
    if not names:
        raise ProbeError(f"expected at least one backbone. Received: backbones={backbones!r}")
    if not head_names:
        raise ProbeError(f"expected at least one head. Received: heads={heads!r}")
    # an unknown name or a missing or unloadable .keras file is refused here
    specs = [backbone_spec(name) for name in names]
    resolved = resolve_engine(engine, None, ray)  # once, not per backbone
    device.check_runtime(runtime)
    sizes = image_sizes(specs, image_size)
    # pooling, weights (a file hashed once), batch size: checked once, for every backbone
    registry = [spec for spec in specs if not _is_model_file(spec)]
    extraction = ExtractionSettings.create(
        registry[0].name if registry else model_backbones.argument(specs[0]),
        weights if registry else "model", (sizes[specs.index(registry[0])] if registry
                                           else sizes[0]),
        pooling, batch_size=batch_size, seed=seed, runtime=runtime)
    split = SplitSettings.create(labels, val_fraction, test_fraction, seed)
    params = _head_params(head_names, head_params, seed)
    found = discover(dataset, split)
    return _Plan(specs, sizes, head_names, params, found, extraction, split, views, resolved,
                 seed)


def _with_curves(plan: _Plan, shots, repeats: int) -> _Plan:
    """The plan with its curves' shot counts and repeats (checked), when `shots` asks."""
    if shots is None:
        return plan
    from .curve import check_settings

    shot_counts, _, repeats, _ = check_settings(shots, repeats, plan.heads, plan.seed, plan.params)
    return dataclasses.replace(plan, shots=shot_counts, repeats=repeats)


def _output_directories(cache_dir, runs_dir) -> tuple[Path, Path]:
    """The cache directory, and the new comparison directory (its parent checked first)."""
    from .runs import check_writable, new_run_dir

    directory = cache_mod.resolve_cache_dir(cache_dir)
    runs = Path(runs_dir) if runs_dir else directory / "runs"
    check_writable(runs)
    return directory, new_run_dir(runs, "compare")


def _run_backbones(plan: _Plan, directory: Path, out: Path,
                   progress: ProgressCallback | None) -> tuple[list[dict], dict[str, Any]]:
    """Each backbone in turn: extract, fit every head, its curve; (records, curves)."""
    records: list[dict] = []
    curves: dict[str, Any] = {}
    for index, (spec, size) in enumerate(zip(plan.specs, plan.sizes)):
        emit(progress, NextBackbone(backbone=spec.name, index=index, count=len(plan.specs)))
        cache, base = _extract_one(plan, spec, size, directory, progress)
        records += _fit_heads(plan, cache, base, out, len(records), progress)
        if plan.shots and cache is not None:
            curves.update(_curve_one(plan, spec.name, cache, progress))
    return records, curves


def _write_outputs(result: Comparison, plan: _Plan, curves: dict[str, Any]) -> None:
    """compare.csv, .md, .png, the curves, the manifest, then report.html."""
    write_files(result)
    if curves:
        from .curve import write_comparison_curves

        result.curve = write_comparison_curves(result.path, curves, len(plan.found.classes))
    run_files.write_manifest(result.path, "comparison")  # last but report.html, which it leaves out
    if plan.html_report:
        html.write_report(result)


def _is_model_file(spec) -> bool:
    return model_backbones.holds_weights(spec)  # a .keras file or a KerasHub preset


def _extraction_of(plan: _Plan, spec, size: int) -> ExtractionSettings:
    """The comparison's settings for one backbone; a .keras model file holds its own weights
    (--weights is for the registry's backbones)."""
    if not _is_model_file(spec):
        return plan.extraction.with_backbone(spec.name, size)
    shared = plan.extraction
    return ExtractionSettings.create(model_backbones.argument(spec), "model", size,
                                     shared.pooling, shared.precision, shared.batch_size,
                                     plan.seed, shared.runtime)


def _extract_one(plan: _Plan, spec, size: int, directory: Path,
                 progress: ProgressCallback | None) -> tuple[Any, dict]:
    """The backbone's cache (None when extraction failed) and the columns it gives every
    row of the backbone (with the error when it failed)."""
    from .features.extract import ExtractionStatus, run_extraction

    base = {"backbone": spec.name, "image_size": size, "weights": None, "cache": None,
            "feature_size": None, "images_per_second": None, "extraction": None}
    try:
        with warnings.catch_warnings():
            # Keras warns per layer when a weights file does not fit, then fails: the
            # row says why in one line instead
            warnings.simplefilter("ignore", UserWarning)
            extraction = _extraction_of(plan, spec, size)
            cache, report_ = run_extraction(plan.found, extraction, plan.split, plan.views,
                                            plan.engine, cache_dir=directory, progress=progress)
    except Exception as error:  # noqa: BLE001 - one backbone must not stop the others
        message = _message(error)
        emit(progress, ExtractionFailed(backbone=spec.name, error=message))
        return None, {**base, "error": f"extraction failed: {message}"}
    up_to_date = report_.status is ExtractionStatus.UP_TO_DATE
    base.update(
        weights=cache.attrs.get("weights"), cache=str(cache.path),
        feature_size=int(np.prod(cache.feature_shape)),
        images_per_second=_images_per_second(cache, directory),
        extraction=("cached" if up_to_date
                    else f"extracted {report_.extracted}, reused {report_.reused}"),
    )
    emit(progress, BackboneExtracted(backbone=spec.name, path=cache.path, status=report_.status))
    return cache, base


def _fit_heads(plan: _Plan, cache, base: dict, out: Path, done: int,
               progress: ProgressCallback | None) -> list[dict]:
    """One record per head: fitted on the backbone's cache, or failed with the reason."""
    from .runs import fit

    records = []
    for head in plan.heads:
        if cache is None:
            record = _failed({**base, "head": head}, base["error"])
        else:
            try:
                run = fit(cache, head, runs_dir=out, html_report=plan.html_report,
                          **plan.params[head])
                record = _record(base, head, run)
            except Exception as error:  # noqa: BLE001 - one fit must not stop the others
                record = _failed({**base, "head": head}, f"fit failed: {_message(error)}")
        records.append(record)
        emit(progress, _fitted(record, done + len(records), plan.total))
    return records


def _fitted(record: dict, done: int, total: int) -> HeadFitted:
    """The event of a finished row, with the columns of its headline score."""
    row = {key: record.get(key) for key in (
        "backbone", "head", "status", "error", "accuracy", "accuracy_ci", "split",
        "split_role", "fit_seconds", *ML_SCORES[:1], *ML_INTERVAL_KEYS[:1]) if key in record}
    return HeadFitted(done=done, total=total, backbone=record["backbone"], head=record["head"],
                      error=record.get("error"), split_role=record.get("split_role"),
                      fit_seconds=record.get("fit_seconds"), row=row)


def _curve_one(plan: _Plan, backbone: str, cache, progress: ProgressCallback | None) -> dict:
    """{backbone: its curve}, or nothing when the curve failed (a Note says why)."""
    from .curve import cache_curve

    try:
        return {backbone: cache_curve(cache, plan.shots, plan.repeats, plan.heads,
                                      seed=plan.seed, head_params=plan.params,
                                      progress=progress)}
    except Exception as error:  # noqa: BLE001 - one backbone must not stop the others
        emit(progress, CurveFailed(backbone=backbone, error=_message(error)))
        return {}


def _record(base: dict, head: str, run) -> dict:
    """The row of a finished fit."""
    metrics = run.metrics
    return {
        **base, "head": head, "status": "ok", "error": None,
        **Task.of_record(metrics).row_scores(metrics),
        **{key: metrics.get(key) for key in ("fit_seconds", "split", "n_samples",
                                             "expected_calibration_error", "temperature")},
        "split_role": metrics.get("split_role") or evaluate.split_role(metrics.get("split", "test")),
        "run": str(run.path),
    }


def _settings(plan: _Plan, image_size, pooling, val_fraction, test_fraction,
              task: Task) -> dict:
    return {**task.flag(),
        "dataset": str(plan.found.root), "classes": plan.found.classes, "weights": plan.extraction.weights.source,
        "image_size": image_size, "image_sizes": dict(zip([s.name for s in plan.specs], plan.sizes)),
        "pooling": pooling, "labels": plan.split.labels,
        "seed": plan.seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
        "split_source": ("fractions" if not plan.found.splits_given
                         else "val carved" if plan.found.val_carved else "dataset"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def rank(records: list[dict], task: Task | None = None, *, multilabel: bool = False,
         predictions: dict | None = None, seed: int = DEFAULT_SEED) -> list[dict]:
    """Successful rows by the task's score (the kind of dataset decides, not the head:
    accuracy, or for a multi-label dataset mean average precision), then macro F1 (then
    the given order); failed rows last. Sets each record's `rank` (None for a failed row),
    `p_value_vs_best` and `tied` (see `paired_tests`); `predictions` maps a record's "run"
    to its `RowPredictions` (`read_predictions`), `seed` seeds the paired bootstrap.
    Without a `task`, the dataset's `multilabel` flag names it."""
    task = task or Task.of_flag(multilabel)
    score = task.score
    ok = [r for r in records if r["status"] == "ok"]
    ok.sort(key=lambda r: (-r[score], -r["macro_f1"]))
    for position, record in enumerate(ok, start=1):
        record["rank"] = position
    failed = [r for r in records if r["status"] != "ok"]
    for record in failed:
        record["rank"], record["tied"], record["p_value_vs_best"] = None, NOT_COMPARABLE, None
    paired_tests(ok, task, predictions or {}, seed)
    return [{key: r.get(key) for key in csv_columns(task)} for r in ok + failed]


def paired_tests(ranked: list[dict], task: Task, predictions: dict, seed: int) -> None:
    """Test the first row (the best) against every other on the same images and set each
    row's `p_value_vs_best` and `tied`: "best" for the first, "yes" where the adjusted
    p-value is >= 0.05 (no significant difference), "no" where it is below, "not
    comparable" (p None) for a row without predictions on exactly the best's images
    (another split or image set, or no predictions file).

    The test is the one of the ranking score: the exact McNemar test on the images that
    exactly one of two rows gets right for accuracy, the paired bootstrap
    (`significance.pairwise_bootstrap_p`, seeded by `seed`) for mean average precision.
    Holm's adjustment runs over every pair of comparable rows, not only the pairs with
    the best: the best is chosen on the same images, and only the family of all pairs
    keeps the chance of any false "no" at 5% when no row is better than another."""
    if not ranked:
        return
    ranked[0].update(tied=BEST, p_value_vs_best=None)
    for record in ranked[1:]:
        record.update(tied=NOT_COMPARABLE, p_value_vs_best=None)
    best = predictions.get(ranked[0].get("run"))
    if best is None:
        return
    orders = {i: best.aligned(predictions.get(r.get("run"))) for i, r in enumerate(ranked)}
    group = [i for i in range(len(ranked)) if i == 0 or orders[i] is not None]
    rows = [predictions[ranked[i]["run"]] for i in group]
    p = _pairwise_p(task, best, rows, [orders[i] for i in group], seed)
    pairs = list(itertools.combinations(range(len(group)), 2))
    adjusted = dict(zip(pairs, significance.holm([p[a, b] for a, b in pairs])))
    for member in range(1, len(group)):
        value = float(adjusted[(0, member)])
        ranked[group[member]].update(
            p_value_vs_best=value, tied=TIED if value >= significance.SIGNIFICANCE else NOT_TIED)


def _pairwise_p(task: Task, best: "RowPredictions", rows: list, orders: list,
                seed: int) -> np.ndarray:
    """The unadjusted p-values between every two of `rows` (each put in the order of the
    best's images by `orders`)."""
    if task.score == "accuracy":
        return significance.pairwise_mcnemar(
            [row.correct()[order] for row, order in zip(rows, orders)])
    return significance.pairwise_bootstrap_p(
        task.score, best.truth, [row.scores[order] for row, order in zip(rows, orders)],
        ignore=best.ignore, seed=seed)


@dataclass(frozen=True)
class RowPredictions:
    """One row's predictions on the images it was scored on, as its run's
    test_predictions.csv records them."""

    split: str | None
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    truth: np.ndarray  # (N,) class indices, or (N, K) 0/1 for a multi-label dataset
    predicted: np.ndarray  # (N,) predicted class indices (single-label; -1 for multi-label)
    scores: np.ndarray  # (N, K) probabilities
    ignore: np.ndarray | None = None  # (N, K) entries left out of the metrics (multi-label)

    def correct(self) -> np.ndarray:
        """(N,) bool: the images predicted right (single-label)."""
        return self.predicted == self.truth

    def aligned(self, other: "RowPredictions | None") -> np.ndarray | None:
        """The positions in `other` of this row's images, in this row's order; None unless
        `other` was scored on exactly the same images (same split, same paths, each with
        the same label, same classes)."""
        if (other is None or other.split != self.split or other.classes != self.classes
                or len(other.paths) != len(self.paths)):
            return None
        where = {path: i for i, path in enumerate(other.paths)}
        if len(where) != len(other.paths) or set(where) != set(self.paths):
            return None
        order = np.array([where[path] for path in self.paths], dtype=np.int64)
        return order if np.array_equal(other.truth[order], self.truth) else None


def read_predictions(records: list[dict], task: Task) -> dict[str, RowPredictions]:
    """{run directory: its `RowPredictions`} of every successful row whose run holds a
    readable test_predictions.csv (a row without one can not be compared image by image).
    Multi-label: with the "difficult" entries of the row's cache, left out as the row's
    metrics left them out."""
    found: dict[str, RowPredictions] = {}
    for record in records:
        run = record.get("run")
        if record.get("status") == "ok" and run:
            row = _read_row_predictions(Path(run), task, record.get("split"))
            if row is not None:
                found[run] = _with_ignore(row, record.get("cache")) if task.multilabel else row
    return found


def _read_row_predictions(directory: Path, task: Task, split: str | None) -> RowPredictions | None:
    """A run's test_predictions.csv (path, true, predicted, one probability per class), or
    None when it is missing or not in that shape."""
    try:
        with open(directory / PREDICTIONS_FILE, newline="", encoding="utf-8",
                  errors="surrogateescape") as handle:
            rows = list(csv.reader(handle))
    except OSError:
        return None
    if not rows or rows[0][:3] != ["path", "true", "predicted"]:
        return None
    classes, body = tuple(rows[0][3:]), rows[1:]
    index = {name: k for k, name in enumerate(classes)}
    try:
        scores = np.array([[float(v) for v in row[3:]] for row in body],
                          dtype=np.float64).reshape(len(body), len(classes))
        if task.multilabel:
            truth = np.zeros((len(body), len(classes)), dtype=np.int64)
            for i, row in enumerate(body):
                truth[i, [index[name] for name in row[1].split(";") if name]] = 1
            predicted = np.full(len(body), -1, dtype=np.int64)
        else:
            truth = np.array([index[row[1]] for row in body], dtype=np.int64)
            predicted = np.array([index[row[2]] for row in body], dtype=np.int64)
    except (KeyError, ValueError, IndexError):
        return None
    return RowPredictions(split, classes, tuple(row[0] for row in body), truth, predicted, scores)


def _with_ignore(row: RowPredictions, cache_path: str | None) -> RowPredictions:
    """The row with the "difficult" entries its cache records for its images (none when
    the cache records none or can not be read)."""
    try:
        cache = cache_mod.FeatureCache.open(cache_path)
        mask = cache.ignore_mask(row.split)
        paths = cache.paths(row.split)
    except (ProbeError, OSError, TypeError):
        return row
    if mask is None:
        return row
    at = {path: i for i, path in enumerate(paths)}
    if not all(path in at for path in row.paths):
        return row
    return dataclasses.replace(row, ignore=mask[[at[path] for path in row.paths]])


def chance_levels(predictions: RowPredictions | None, task: Task) -> dict[str, float]:
    """What a predictor that knows nothing scores on the reported images
    (`Task.chance_levels`, as the curves draw it: the most frequent class's share for
    accuracy, 1/K over the classes present for balanced accuracy, a random ranking's
    expected average precision for mAP). {} without predictions."""
    if predictions is None or not len(predictions.paths):
        return {}
    return task.chance_levels(predictions.truth, predictions.ignore)


def score_note(result: "Comparison") -> str | None:
    """One line when the scores are validation scores (no test split)."""
    roles = {r.get("split_role") for r in result if r["status"] == "ok"}
    if evaluate.split_role("val") in roles:
        return ("Scores are on the validation split that chose each head's settings "
                "(optimistic): add a test split for an unbiased ranking.")
    return None


# --- files ------------------------------------------------------------------------------


def write_files(result: Comparison) -> None:
    """compare.csv, compare.md and compare.png in the comparison directory."""
    with files.atomic_write(result.path / CSV_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(result.csv_columns)
        for record in result:
            writer.writerow(["" if record.get(k) is None else _csv_value(record[k])
                             for k in result.csv_columns])
    files.write_text(result.path / MARKDOWN_FILE, markdown(result))
    plot_comparison(result, result.path / CHART_FILE)


def markdown(result: Comparison) -> str:
    """The comparison as a Markdown document: settings, ranked table, best run, failures."""
    s, task = result.settings, result.task
    columns, score = result.columns, result.score
    name = score.replace("_", " ")
    headers = [header for _, header in columns]
    lines = [
        f"# probe compare: {Path(s['dataset']).name}",
        "",
        f"- dataset: `{s['dataset']}` ({len(s['classes'])} classes)",
        f"- weights: {s['weights']}; image size: {s['image_size'] or 'native'} "
        f"({', '.join(f'{k} {v}' for k, v in s.get('image_sizes', {}).items())}); "
        f"pooling: {s['pooling']}; {split_text(s)}",
        f"- created: {s['created']}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if k in TEXT_COLUMNS else "---:" for k, _ in columns) + "|",
    ]
    for record in result:
        lines.append("| " + " | ".join(_text(key, record.get(key)) for key, _ in columns) + " |")
    lines.append("")
    lines += task.ranking_notes
    lines.append(f"Intervals are 95% ({task.exact_score_name}: "
                 "Wilson; the others: bootstrap over the images).")
    lines += ["", tied_text(task)]
    chance = chance_text(result)
    if chance:
        lines += ["", chance]
    note = score_note(result)
    if note:
        lines += ["", f"**Note:** {note}"]
    lines.append("")
    best = result.best
    if best:
        lines.append(f"Best: **{best['backbone']} + {best['head']}** "
                     f"({best['split_role']} {name} {best[score]:.4f} "
                     f"{_text(f'{score}_ci', best.get(f'{score}_ci'))}), run `{best['run']}`")
        if result.tied:
            lines.append(f"(ranked first, but not significantly better than "
                         f"{', '.join(r['backbone'] + ' + ' + r['head'] for r in result.tied)})")
        lines.append("")
        lines.append(f"    probe predict {best['run']} IMAGES...")
        lines.append(f"    probe export {best['run']} model.keras")
    else:
        lines.append("No backbone and head finished.")
    if result.failed:
        lines += ["", "## Failed", ""]
        lines += [f"- {r['backbone']} + {r['head']}: {r['error']}" for r in result.failed]
    return "\n".join(lines) + "\n"


def split_text(settings: dict) -> str:
    """How the images were split, naming the seed and fractions only where they were used
    (a dataset with train/val/test folders or a split column is split as it says)."""
    source = settings.get("split_source", "fractions")
    if source == "dataset":
        return "splits as the dataset gives them"
    if source == "val carved":
        return (f"splits as the dataset gives them, val carved from train (val "
                f"{settings['val_fraction']}, seed {settings['seed']})")
    return (f"split seed {settings['seed']} (val {settings['val_fraction']}, "
            f"test {settings['test_fraction']})")


def tied_text(task: Task) -> str:
    """What `tied` and `p_vs_best` mean, in one paragraph."""
    return significance.explain(task.score)


def chance_text(result: Comparison) -> str:
    """One line: what a predictor that knows nothing scores on the reported images."""
    what = {"accuracy": "accuracy {:.4f} (always the most frequent class)",
            "balanced_accuracy": "balanced accuracy {:.4f} (1/K)",
            "mean_average_precision": "mean average precision {:.4f} (a random "
                                      "ranking)"}
    parts = [what[key].format(value) for key, value in result.chance.items() if key in what]
    return f"Chance level on these images: {'; '.join(parts)}." if parts else ""


def plot_comparison(result: Comparison, path: str | os.PathLike) -> Path:
    """A grouped bar chart: the ranking score per backbone with its 95% interval, one bar
    per head; failed rows are marked 'failed'; the best bar and those tied with it are
    outlined; a dashed line (gid "chance") marks the chance level of the reported images;
    the title names a best only when no row is tied with it; the axis names the split's
    role (test, or validation used for selection)."""
    backbone_names = list(dict.fromkeys(r["backbone"] for r in result))
    head_names = list(dict.fromkeys(r["head"] for r in result))
    width = 0.8 / max(1, len(head_names))
    fig = report._new_figure(max(5.0, 1.3 * len(backbone_names) * max(1, len(head_names)) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    score = result.score

    def x_of(record: dict) -> float:
        h = head_names.index(record["head"])
        return backbone_names.index(record["backbone"]) + (h - (len(head_names) - 1) / 2) * width

    for head in head_names:
        rows = [r for r in result if r["head"] == head]
        xs = [x_of(r) for r in rows]
        ok = [r["status"] == "ok" for r in rows]
        heights = [r[score] if good else 0.0 for r, good in zip(rows, ok)]
        intervals = [r.get(f"{score}_ci") if good else None for r, good in zip(rows, ok)]
        errors = ([h - i[0] if i else 0.0 for h, i in zip(heights, intervals)],
                  [i[1] - h if i else 0.0 for h, i in zip(heights, intervals)])
        ax.bar(xs, heights, width=width * 0.95, label=head, yerr=errors, capsize=3,
               error_kw={"elinewidth": 1})
        for x, height, good in zip(xs, heights, ok):
            ax.text(x, height + 0.01, f"{height:.3f}" if good else "failed", ha="center",
                    va="bottom", fontsize=8, color="black" if good else "firebrick")
    top = [r for r in result if r.get("tied") in (BEST, TIED)]
    if top:
        ax.bar([x_of(r) for r in top], [r[score] for r in top], width=width * 0.95, fill=False,
               edgecolor="black", linewidth=2)
    _chance_line(ax, result.chance.get(score))
    ax.set_xticks(range(len(backbone_names)), labels=backbone_names)
    ax.set_ylim(0, 1.12)  # holds every score, its interval and the chance level
    ax.yaxis.set_major_formatter("{x:.1f}")  # plain numbers, never an offset or 2x10^0
    best = result.best
    role = best["split_role"] if best else "test"
    what = result.task.score_name
    ax.set_ylabel(f"{what} ({role}), 95% interval" if len(f"{what} ({role})") < 24
                  else f"{what} ({role}),\n95% interval")
    ax.set_title(chart_title(result))
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(title="head", loc="upper right", fontsize=8)
    return report._save(fig, path)


def _chance_line(ax, chance: float | None) -> None:
    """A dashed labelled line at the chance level (nothing when it is unknown)."""
    if chance is None:
        return
    ax.axhline(chance, color="black", linestyle="--", linewidth=1.2, gid="chance", zorder=3,
               label="_chance")  # "_": not a head of the legend
    ax.text(1.01, chance, f"chance\n{chance:.3f}", transform=ax.get_yaxis_transform(),
            ha="left", va="center", fontsize=8)


def chart_title(result: Comparison) -> str:
    """The chart's title: it names the best only when no row is tied with it."""
    best = result.best
    if best is None:
        return "Backbones and heads"
    tied = len(result.tied)
    if tied:
        return (f"Backbones and heads ({tied + 1} tied at the top, no significant best; "
                f"first: {best['backbone']} + {best['head']})")
    return f"Backbones and heads (best: {best['backbone']} + {best['head']})"


# --- helpers ----------------------------------------------------------------------------


def _head_params(head_names: list[str], given: dict | None, seed: int) -> dict[str, dict]:
    given = dict(given or {})
    unknown = sorted(set(head_names) - set(heads_mod.HEADS)) or sorted(set(given) - set(heads_mod.HEADS))
    if unknown:
        raise ProbeError(
            f"unknown head: expected one of: {', '.join(sorted(heads_mod.HEADS))}. "
            f"Received: heads={unknown}"
        )
    params = {}
    for head in head_names:
        chosen = {"seed": seed, **(given.get(head) or {})}
        heads_mod.make_head(head, **chosen)  # refuses an unknown parameter before any work
        params[head] = chosen
    return params


def _images_per_second(cache, directory: Path) -> float | None:
    """The extraction speed recorded in the cache, or in another cache of the same
    features (a new split of the same images is written without backbone work)."""
    value = cache.attrs.get("extract_images_per_second")
    if value not in (None, ""):
        return float(value)
    key = cache.attrs.get("feature_key")
    for other in cache_mod.list_caches(directory):
        if other.attrs.get("feature_key") == key and other.attrs.get("extract_images_per_second"):
            return float(other.attrs["extract_images_per_second"])
    return None


def _failed(base: dict, message: str) -> dict:
    return {**base, "status": "failed", "error": message, "accuracy": None,
            "balanced_accuracy": None, "macro_f1": None, "fit_seconds": None, "run": None,
            "split": None, "split_role": None, "n_samples": None,
            **{key: None for key in INTERVAL_KEYS}}


def headline(record: dict) -> tuple[str, float | None, list | None]:
    """A row's ranking score as (name, value, 95% interval): mean average precision for a
    multi-label row, accuracy otherwise."""
    task = Task.of_row(record)
    return task.score_name, record.get(task.score), record.get(f"{task.score}_ci")


def _message(error: BaseException, limit: int = MESSAGE_LIMIT) -> str:
    """The error in one line; a very long one (Keras quotes whole weight tensors) keeps
    its beginning and its end, where probe's advice is."""
    text = " ".join((str(error).strip() or type(error).__name__).split())
    if not isinstance(error, ProbeError):
        text = f"{type(error).__name__}: {text}"
    if len(text) > limit:
        text = f"{text[:limit // 2]} [...] {text[-limit // 2:]}"
    return text


def _text(key: str, value) -> str:
    """One cell of the table: 4 decimals for scores, 1 for images/s, 2 for seconds,
    intervals as [low, high] with 3 decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in INTERVAL_KEYS or key in ML_INTERVAL_KEYS:
        return f"[{float(value[0]):.3f}, {float(value[1]):.3f}]"
    if key == P_COLUMN[0]:
        return significance.format_p(value)
    if key in DECIMALS:
        return f"{float(value):.{DECIMALS[key]}f}"
    return str(value)


def _csv_value(value):
    if isinstance(value, (list, tuple)):  # an interval
        return " ".join(f"{float(v):.6g}" for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
