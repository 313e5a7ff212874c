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
import datetime as _dt
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from . import backbones as backbones_mod, cache as cache_mod, data, heads as heads_mod, report, store
from .engines.ray import RayOptions
from .progress import ProgressCallback
from .settings import TEST_FRACTION, VAL_FRACTION, SplitSettings, Weights, dataset_path
from .errors import ProbeError

__all__ = ["Comparison", "compare", "parse_names", "DEFAULT_BACKBONES", "DEFAULT_HEADS"]

DEFAULT_BACKBONES = ("vgg16", "resnet50")
DEFAULT_HEADS = ("logreg", "dense")
CSV_FILE, MARKDOWN_FILE, CHART_FILE = "compare.csv", "compare.md", "compare.png"

# (record key, table header) of the ranked table, in order.
TABLE_COLUMNS = [
    ("rank", "rank"),
    ("backbone", "backbone"),
    ("head", "head"),
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced_acc"),
    ("macro_f1", "macro_f1"),
    ("feature_size", "features"),
    ("images_per_second", "extract_img/s"),
    ("fit_seconds", "fit_s"),
    ("status", "status"),
]
CSV_COLUMNS = [key for key, _ in TABLE_COLUMNS] + [
    "split", "n_samples", "extraction", "image_size", "weights", "run", "cache", "error"]

TEXT_COLUMNS = ("backbone", "head", "status")
DECIMALS = {"accuracy": 4, "balanced_accuracy": 4, "macro_f1": 4, "images_per_second": 1,
            "fit_seconds": 2}

MESSAGE_LIMIT = 400

EventCallback = Callable[[str, dict], None]


class Comparison(list):
    """The ranked table: a list of records (dicts), best first, failed rows last.

    `path` is the comparison directory (compare.csv, compare.md, compare.png), `best` the
    best record and `best_run` its run directory, ready for `probe predict` / `probe export`.
    """

    def __init__(self, records: Iterable[dict], path: Path, settings: dict):
        super().__init__(records)
        self.path = path
        self.settings = settings

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
        headers = [header for _, header in TABLE_COLUMNS]
        rows = [[_text(key, record.get(key)) for key, _ in TABLE_COLUMNS] for record in self]
        widths = [max(len(c) for c in column) for column in zip(headers, *rows)]
        right = [key not in TEXT_COLUMNS for key, _ in TABLE_COLUMNS]

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
        return pandas.DataFrame(list(self), columns=CSV_COLUMNS)


def parse_names(value: str | Iterable[str] | None, default: Iterable[str]) -> list[str]:
    """Names from a comma-separated string or a list, lower case, without repeats."""
    if value is None:
        items = list(default)
    elif isinstance(value, str):
        items = value.split(",")
    else:
        items = [str(v) for v in value]
    names = []
    for item in items:
        name = item.strip().lower()
        if name and name not in names:
            names.append(name)
    return names


def compare(
    dataset: str | os.PathLike,
    backbones: str | Iterable[str] | None = None,
    heads: str | Iterable[str] | None = None,
    *,
    weights: str | os.PathLike | None = "imagenet",
    image_size: int | None = None,
    pooling: str = "avg",
    labels: str | os.PathLike | None = None,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    runs_dir: str | os.PathLike | None = None,
    head_params: dict[str, dict[str, Any]] | None = None,
    progress: ProgressCallback | None = None,
    on_event: EventCallback | None = None,
    engine: str = "local",
    ray: RayOptions | None = None,
) -> Comparison:
    """Fit every head on every backbone's features of `dataset` and rank the results.

    `backbones` and `heads` are lists or comma-separated strings (default: vgg16,resnet50
    and logreg,dense). The extraction settings are those of `probe.extract`; `image_size`
    None means each backbone's native size. `head_params` maps a head name to its
    parameters (e.g. `{"dense": {"epochs": 20}}`); `seed` is the default head seed.
    `progress` receives each extraction's events; `on_event(kind, info)` is told
    "extract", "extracted", "fit" and "fitted" as the work goes. `engine="ray"` extracts
    on a Ray cluster (`ray`: `RayOptions`), as in `probe.extract`.

    Returns a `Comparison`: the ranked records (backbone, head, accuracy, balanced_accuracy,
    macro_f1, feature_size, images_per_second, fit_seconds, status, error, run, ...).

    >>> table = probe.compare("digits/", "vgg16,resnet50", weights="none", image_size=64)
    >>> table.best_run, table.path
    """
    from .extract import extract_with_report
    from .runs import fit, new_run_dir

    names = parse_names(backbones, DEFAULT_BACKBONES)
    head_names = parse_names(heads, DEFAULT_HEADS)
    if not names:
        raise ProbeError(f"expected at least one backbone. Received: backbones={backbones!r}")
    if not head_names:
        raise ProbeError(f"expected at least one head. Received: heads={heads!r}")
    specs = [backbones_mod.get(name) for name in names]  # an unknown name is refused here
    for spec in specs:
        spec.check_image_size(image_size)
    backbones_mod.check_pooling(pooling)
    weights = Weights.parse(weights, seed)  # a weights file is hashed once, not per backbone
    params = _head_params(head_names, head_params, seed)
    split = SplitSettings.create(labels, val_fraction, test_fraction, seed)
    labels = split.labels  # one file or {split: file}, resolved
    found = data.discover(dataset_path(dataset), labels, val_fraction, test_fraction, seed)
    emit = on_event or (lambda kind, info: None)

    directory = cache_mod.resolve_cache_dir(cache_dir)
    out = new_run_dir(Path(runs_dir) if runs_dir else directory / "runs", "compare")
    records: list[dict] = []
    for index, spec in enumerate(specs):
        emit("extract", {"backbone": spec.name, "index": index, "total": len(specs)})
        size = spec.check_image_size(image_size)
        base = {"backbone": spec.name, "image_size": size, "weights": None, "cache": None,
                "feature_size": None, "images_per_second": None, "extraction": None}
        try:
            with warnings.catch_warnings():
                # Keras warns per layer when a weights file does not fit, then fails: the
                # row says why in one line instead
                warnings.simplefilter("ignore", UserWarning)
                cache, extraction = extract_with_report(
                    found.root, spec.name, weights=weights, image_size=size, pooling=pooling,
                    labels=labels, val_fraction=val_fraction, test_fraction=test_fraction,
                    seed=seed, batch_size=batch_size, cache_dir=directory, progress=progress,
                    engine=engine, ray=ray)
        except Exception as error:  # noqa: BLE001 - one backbone must not stop the others
            message = _message(error)
            emit("extracted", {"backbone": spec.name, "error": message})
            records += [_failed({**base, "head": head}, f"extraction failed: {message}")
                        for head in head_names]
            continue
        base.update(
            weights=cache.attrs.get("weights"),
            cache=str(cache.path),
            feature_size=int(np.prod(cache.feature_shape)),
            images_per_second=_images_per_second(cache, directory),
            extraction=("cached" if extraction.status == "up to date"
                        else f"extracted {extraction.extracted}, reused {extraction.reused}"),
        )
        emit("extracted", {"backbone": spec.name, "cache": cache, "report": extraction,
                           "error": None})
        for head in head_names:
            emit("fit", {"backbone": spec.name, "head": head})
            try:
                run = fit(cache, head, runs_dir=out, **params[head])
            except Exception as error:  # noqa: BLE001 - one fit must not stop the others
                message = _message(error)
                emit("fitted", {"backbone": spec.name, "head": head, "error": message})
                records.append(_failed({**base, "head": head}, f"fit failed: {message}"))
                continue
            metrics = run.metrics
            records.append({
                **base, "head": head, "status": "ok", "error": None,
                "accuracy": metrics["accuracy"],
                "balanced_accuracy": metrics["balanced_accuracy"],
                "macro_f1": metrics["macro_f1"],
                "fit_seconds": metrics.get("fit_seconds"),
                "split": metrics.get("split"), "n_samples": metrics.get("n_samples"),
                "run": str(run.path),
            })
            emit("fitted", {"backbone": spec.name, "head": head, "run": run, "error": None})

    ranked = rank(records)
    settings = {
        "dataset": str(found.root), "classes": found.classes, "weights": weights.source,
        "image_size": image_size, "pooling": pooling, "labels": str(labels) if labels else None,
        "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    result = Comparison(ranked, out, settings)
    write_files(result)
    return result


def rank(records: list[dict]) -> list[dict]:
    """Successful rows by test accuracy, then macro F1 (then the given order); failed rows
    last. Sets each record's `rank` (None for a failed row)."""
    ok = [r for r in records if r["status"] == "ok"]
    ok.sort(key=lambda r: (-r["accuracy"], -r["macro_f1"]))
    for position, record in enumerate(ok, start=1):
        record["rank"] = position
    failed = [r for r in records if r["status"] != "ok"]
    for record in failed:
        record["rank"] = None
    return [{key: r.get(key) for key in CSV_COLUMNS} for r in ok + failed]


# --- files ------------------------------------------------------------------------------


def write_files(result: Comparison) -> None:
    """compare.csv, compare.md and compare.png in the comparison directory."""
    with store.atomic_write(result.path / CSV_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for record in result:
            writer.writerow(["" if record.get(k) is None else _csv_value(record[k])
                             for k in CSV_COLUMNS])
    store.write_text(result.path / MARKDOWN_FILE, markdown(result))
    plot_comparison(result, result.path / CHART_FILE)


def markdown(result: Comparison) -> str:
    """The comparison as a Markdown document: settings, ranked table, best run, failures."""
    s = result.settings
    headers = [header for _, header in TABLE_COLUMNS]
    lines = [
        f"# probe compare: {Path(s['dataset']).name}",
        "",
        f"- dataset: `{s['dataset']}` ({len(s['classes'])} classes)",
        f"- weights: {s['weights']}; image size: {s['image_size'] or 'native'}; "
        f"pooling: {s['pooling']}; split seed {s['seed']} "
        f"(val {s['val_fraction']}, test {s['test_fraction']})",
        f"- created: {s['created']}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if k in TEXT_COLUMNS else "---:" for k, _ in TABLE_COLUMNS) + "|",
    ]
    for record in result:
        lines.append("| " + " | ".join(_text(key, record.get(key)) for key, _ in TABLE_COLUMNS) + " |")
    lines.append("")
    best = result.best
    if best:
        lines.append(f"Best: **{best['backbone']} + {best['head']}** "
                     f"({best['split']} accuracy {best['accuracy']:.4f}), run `{best['run']}`")
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
    """A grouped bar chart: test accuracy per backbone, one bar per head; failed rows are
    marked 'failed'; the best bar is outlined."""
    backbone_names = list(dict.fromkeys(r["backbone"] for r in result))
    head_names = list(dict.fromkeys(r["head"] for r in result))
    by_key = {(r["backbone"], r["head"]): r for r in result}
    width = 0.8 / max(1, len(head_names))
    fig = report._new_figure(max(5.0, 1.3 * len(backbone_names) * max(1, len(head_names)) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    best = result.best
    for h, head in enumerate(head_names):
        xs, heights, labels = [], [], []
        for b, backbone in enumerate(backbone_names):
            record = by_key.get((backbone, head))
            if record is None:
                continue
            xs.append(b + (h - (len(head_names) - 1) / 2) * width)
            ok = record["status"] == "ok"
            heights.append(record["accuracy"] if ok else 0.0)
            labels.append(f"{record['accuracy']:.3f}" if ok else "failed")
        bars = ax.bar(xs, heights, width=width * 0.95, label=head)
        for bar, text, x in zip(bars, labels, xs):
            ax.text(x, bar.get_height() + 0.01, text, ha="center", va="bottom", fontsize=8,
                    color="black" if text != "failed" else "firebrick")
    if best:
        b = backbone_names.index(best["backbone"])
        h = head_names.index(best["head"])
        x = b + (h - (len(head_names) - 1) / 2) * width
        ax.bar([x], [best["accuracy"]], width=width * 0.95, fill=False, edgecolor="black",
               linewidth=2)
    ax.set_xticks(range(len(backbone_names)), labels=backbone_names)
    ax.set_ylim(0, 1.12)
    split = best["split"] if best else "test"
    ax.set_ylabel(f"{split} accuracy")
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
            "split": None, "n_samples": None}


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
    """One cell of the table: 4 decimals for scores, 1 for images/s, 2 for seconds."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in DECIMALS:
        return f"{float(value):.{DECIMALS[key]}f}"
    return str(value)


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
