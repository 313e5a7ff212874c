"""Comparing backbones and heads on one dataset.

`compare()` extracts the features of every backbone that are not cached yet (every existing
cache is reused), fits every head on every backbone's features with identical splits, and
ranks the results. It writes a comparison directory `<cache dir>/runs/<time>-compare/` with
`compare.csv`, `compare.md` and a bar chart `compare.png`; each (backbone, head) fit is a
normal run directory inside it, ready for `probe predict` / `probe export`.

A backbone or a fit that fails (weights that can not be loaded, for example) gets a row that
says why; the other rows still run. Settings that are wrong for every row (an unknown
backbone or head, an image size below a backbone's minimum, a missing dataset) are refused
before any work.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import (model_backbones, backbones as backbones_mod, data, device, evaluate, files, heads as heads_mod, html,
               report, run_files)
from .features import cache as cache_mod
from .features.engines.ray import RayOptions
from .errors import BackboneError, ProbeError
from .progress import (BackboneExtracted, ComparisonFinished, ComparisonStarted, CurveFailed,
                       ExtractionFailed, HeadFitted, NextBackbone, ProgressCallback, emit)
from .settings import (DEFAULT_BATCH_SIZE, DEFAULT_SEED, TEST_FRACTION, VAL_FRACTION,
                       ExtractionSettings, SplitSettings, backbone_spec, parse_names)
# the columns of each task, importable from here as before
from .task import (CSV_COLUMNS, INTERVAL_KEYS, ML_CSV_COLUMNS, ML_INTERVAL_KEYS,  # noqa: F401
                   ML_SCORES, ML_TABLE_COLUMNS, TABLE_COLUMNS, Task)

__all__ = ["Comparison", "compare", "parse_names", "parse_image_size", "image_sizes",
           "DEFAULT_BACKBONES", "DEFAULT_HEADS"]

DEFAULT_BACKBONES = ("vgg16", "resnet50")
DEFAULT_HEADS = ("logreg", "dense")
CSV_FILE, MARKDOWN_FILE, CHART_FILE = "compare.csv", "compare.md", "compare.png"

TEXT_COLUMNS = ("backbone", "head", "status", "tied", "accuracy_ci", "mean_average_precision_ci")
DECIMALS = {"accuracy": 4, "balanced_accuracy": 4, "macro_f1": 4, "images_per_second": 1,
            "fit_seconds": 2, "mean_average_precision": 4, "micro_f1": 4, "exact_match_accuracy": 4}
# the "tied" column: the best row, and rows whose accuracy interval overlaps the best's
BEST, TIED = "best", "yes"

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
        return self.task.table_columns

    @property
    def csv_columns(self) -> list[str]:
        return self.task.csv_columns

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
    interval, tied (with the best), balanced_accuracy, macro_f1, split_role, ...).

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
    result = Comparison(rank(records, task), out,
                        _settings(plan, image_size, pooling, val_fraction, test_fraction, task))
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

    Task.of_flag(plan.found.multilabel).check_curve(f"dataset '{plan.found.root}'")
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
        **{key: metrics.get(key) for key in ("fit_seconds", "split", "n_samples")},
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
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def rank(records: list[dict], task: Task | None = None, *, multilabel: bool = False) -> list[dict]:
    """Successful rows by the task's score (the kind of dataset decides, not the head:
    accuracy, or for a multi-label dataset mean average precision), then macro F1 (then
    the given order); failed rows last. Sets each record's `rank` (None for a failed row)
    and `tied`: "best" for the first, "yes" for a row whose 95% interval of that score
    overlaps the best one's (their difference may be noise), "no" otherwise. Without a
    `task`, the dataset's `multilabel` flag names it."""
    task = task or Task.of_flag(multilabel)
    score = task.score
    ok = [r for r in records if r["status"] == "ok"]
    ok.sort(key=lambda r: (-r[score], -r["macro_f1"]))
    for position, record in enumerate(ok, start=1):
        record["rank"] = position
        record["tied"] = BEST if position == 1 else ("yes" if _overlaps(record, ok[0], score) else "no")
    failed = [r for r in records if r["status"] != "ok"]
    for record in failed:
        record["rank"] = record["tied"] = None
    return [{key: r.get(key) for key in task.csv_columns} for r in ok + failed]


def _overlaps(record: dict, best: dict, score: str = "accuracy") -> bool:
    """Whether the intervals of the ranking score of two rows overlap (no interval:
    treated as tied)."""
    mine, theirs = record.get(f"{score}_ci"), best.get(f"{score}_ci")
    if not mine or not theirs:
        return True
    return mine[1] >= theirs[0] and theirs[1] >= mine[0]


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
        f"pooling: {s['pooling']}; split seed {s['seed']} "
        f"(val {s['val_fraction']}, test {s['test_fraction']})",
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
                 "Wilson; the others: bootstrap over the images); "
                 f"`tied`: the row's {name} interval overlaps the best one's, so the "
                 "difference may be noise.")
    note = score_note(result)
    if note:
        lines += ["", f"**Note:** {note}"]
    lines.append("")
    best = result.best
    if best:
        lines.append(f"Best: **{best['backbone']} + {best['head']}** "
                     f"({best['split_role']} {name} {best[score]:.4f} "
                     f"{_text(f'{score}_ci', best.get(f'{score}_ci'))}), run `{best['run']}`")
        lines.append("")
        lines.append(f"    probe predict {best['run']} IMAGES...")
        lines.append(f"    probe export {best['run']} model.keras")
    else:
        lines.append("No backbone and head finished.")
    if result.failed:
        lines += ["", "## Failed", ""]
        lines += [f"- {r['backbone']} + {r['head']}: {r['error']}" for r in result.failed]
    return "\n".join(lines) + "\n"


def plot_comparison(result: Comparison, path: str | os.PathLike) -> Path:
    """A grouped bar chart: accuracy per backbone with its 95% interval, one bar per head;
    failed rows are marked 'failed'; the best bar is outlined; the axis names the split's
    role (test, or validation used for selection)."""
    backbone_names = list(dict.fromkeys(r["backbone"] for r in result))
    head_names = list(dict.fromkeys(r["head"] for r in result))
    by_key = {(r["backbone"], r["head"]): r for r in result}
    width = 0.8 / max(1, len(head_names))
    fig = report._new_figure(max(5.0, 1.3 * len(backbone_names) * max(1, len(head_names)) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    best = result.best
    score = result.score
    for h, head in enumerate(head_names):
        xs, heights, labels, errors = [], [], [], ([], [])
        for b, backbone in enumerate(backbone_names):
            record = by_key.get((backbone, head))
            if record is None:
                continue
            xs.append(b + (h - (len(head_names) - 1) / 2) * width)
            ok = record["status"] == "ok"
            heights.append(record[score] if ok else 0.0)
            labels.append(f"{record[score]:.3f}" if ok else "failed")
            interval = record.get(f"{score}_ci") if ok else None
            errors[0].append(record[score] - interval[0] if interval else 0.0)
            errors[1].append(interval[1] - record[score] if interval else 0.0)
        bars = ax.bar(xs, heights, width=width * 0.95, label=head, yerr=errors, capsize=3,
                      error_kw={"elinewidth": 1})
        for bar, text, x in zip(bars, labels, xs):
            ax.text(x, bar.get_height() + 0.01, text, ha="center", va="bottom", fontsize=8,
                    color="black" if text != "failed" else "firebrick")
    if best:
        b = backbone_names.index(best["backbone"])
        h = head_names.index(best["head"])
        x = b + (h - (len(head_names) - 1) / 2) * width
        ax.bar([x], [best[score]], width=width * 0.95, fill=False, edgecolor="black",
               linewidth=2)
    ax.set_xticks(range(len(backbone_names)), labels=backbone_names)
    ax.set_ylim(0, 1.12)
    role = best["split_role"] if best else "test"
    what = result.task.score_name
    ax.set_ylabel(f"{what} ({role}), 95% interval" if len(f"{what} ({role})") < 24
                  else f"{what} ({role}),\n95% interval")
    ax.set_title("Backbones and heads" + (f" (best: {best['backbone']} + {best['head']})"
                                          if best else ""))
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(title="head", loc="upper right", fontsize=8)
    return report._save(fig, path)


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
    if key in DECIMALS:
        return f"{float(value):.{DECIMALS[key]}f}"
    return str(value)


def _csv_value(value):
    if isinstance(value, (list, tuple)):  # an interval
        return " ".join(f"{float(v):.6g}" for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
