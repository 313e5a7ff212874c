"""The self-contained HTML report of a run or a comparison: `report.html`.

One file that opens from a `file://` URL offline and can be mailed: plots and thumbnails
are inlined as `data:` URIs, the embedding map is inline SVG, the little interaction
there is (thumbnails on hover) is inline JavaScript, and nothing is requested from any
server. Its size is bounded: thumbnails are small JPEGs and the number of images of each
section is capped (the caps are stated in the page).

A run's report reads only what the run directory and its cache hold: config.json,
metrics.json, test_predictions.csv, the plots, the cached features (for the map, the
nearest neighbours and the duplicates) and the image files under the dataset root (for
the thumbnails; a missing or undecodable file gets a note instead of a picture). Every
value that comes from data (paths, class names, messages, and the numbers of metrics.json
and of the duplicates file, which are files like any other) is HTML-escaped, attributes
included; the page's Content-Security-Policy allows its own <style> and <script> by hash
only, so markup that got past the escaping still could not run.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import files, run_files, significance
from .features.cache import FeatureCache
from .duplicates import cached_duplicates, centre, leakage_warning
from .errors import ProbeError, RunError
from .run_files import Run
from .progress import ProgressCallback, ReportFinished, ReportStarted, ReportWithoutCache, emit
from .task import SINGLE_LABEL, Task

__all__ = ["write_report", "REPORT_FILE", "Caps"]

REPORT_FILE = "report.html"
PREDICTIONS_FILE = "test_predictions.csv"
COMPARE_CSV = "compare.csv"
METRIC_KEYS = ("accuracy", "balanced_accuracy", "mean_average_precision", "micro_f1", "macro_f1",
               "exact_match_accuracy", "log_loss", "top5_accuracy", "expected_calibration_error",
               "expected_calibration_error_uncalibrated")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
BLANK_GIF = ("data:image/gif;base64,"
             "R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")


@dataclass(frozen=True)
class Caps:
    """How much of the data a report shows (so its size stays bounded)."""

    thumbnail_px: int = 96
    mistakes: int = 48
    neighbour_queries: int = 12
    neighbours: int = 5
    map_points: int = 1000
    map_thumbnails: int = 300
    duplicate_pairs: int = 30
    skipped: int = 200

    def sentence(self) -> str:
        return (f"To keep this file small it shows at most {self.mistakes} misclassified "
                f"images, {self.neighbour_queries} nearest-neighbour queries of "
                f"{self.neighbours} images, {self.map_points:,} map points (thumbnails for "
                f"{self.map_thumbnails} of them), {self.duplicate_pairs} duplicate pairs and "
                f"{self.skipped} skipped files; thumbnails are {self.thumbnail_px}-pixel JPEGs.")


def write_report(
    run_or_dir: Any,
    *,
    out: str | os.PathLike | None = None,
    caps: Caps = Caps(),
    progress: ProgressCallback | None = None,
) -> Path:
    """Write `report.html` for a run directory (of `probe fit`) or a comparison directory
    (of `probe compare`) and return its path (`out`, default inside the directory).

    `run_or_dir` is a path, a `Run` or a `Comparison`. The directory's files are checked
    against its manifest first (`probe.run_files`): an edited run is refused, not reported.
    report.html itself is outside the manifest, so writing it changes nothing that is checked.

    >>> probe.write_report(".probe/runs/20260101-120000-vgg16-logreg")
    PosixPath('.probe/runs/20260101-120000-vgg16-logreg/report.html')
    """
    directory = Path(getattr(run_or_dir, "path", run_or_dir)).expanduser()
    emit(progress, ReportStarted(directory=directory))
    if (directory / "config.json").is_file():
        page = render_run(directory, caps, progress)
    elif (directory / COMPARE_CSV).is_file():
        run_files.verify_directory(directory, "comparison")  # compare.csv, compare.png
        page = render_comparison(directory)
    else:
        raise RunError(
            "expected a run directory (with config.json, written by `probe fit`) or a "
            f"comparison directory (with {COMPARE_CSV}, written by `probe compare`). "
            f"Received: '{_display(directory)}'"
        )
    target = Path(out) if out else directory / REPORT_FILE
    files.write_text(target, page)
    emit(progress, ReportFinished(path=target, size=target.stat().st_size))
    return target


# --- what a run report reads ----------------------------------------------------------


@dataclass
class Prediction:
    path: str
    true: str
    predicted: str
    proba: dict[str, float]

    @property
    def confidence(self) -> float:
        return self.proba.get(self.predicted, float("nan"))


@dataclass
class RunInputs:
    directory: Path
    config: dict
    metrics: dict
    predictions: list[Prediction]
    root: Path | None
    cache: Any = None  # FeatureCache or None
    cache_problem: str = ""
    thumbnails: dict[str, tuple[str | None, str]] = field(default_factory=dict)

    def thumbnail(self, path: str, size: int) -> tuple[str | None, str]:
        """(data URI or None, problem) of one image, decoded once per report."""
        if path not in self.thumbnails:
            if self.root is None:
                self.thumbnails[path] = (None, "dataset root unknown")
            else:
                self.thumbnails[path] = thumbnail_uri(self.root / path, size)
        return self.thumbnails[path]

    def prefetch(self, paths: list[str], size: int) -> None:
        """Decode the thumbnails of `paths` on a few threads (Pillow decodes and encodes
        without holding the interpreter lock): a report shows hundreds, and one thread
        decoding them was a sixth of a logistic fit's time."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [path for path in dict.fromkeys(paths) if path not in self.thumbnails]
        if self.root is None or len(todo) < 2:
            return
        root = self.root
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            for path, result in zip(todo, pool.map(lambda p: thumbnail_uri(root / p, size), todo)):
                self.thumbnails[path] = result


def load_run_inputs(directory: Path) -> RunInputs:
    """What a run's report reads, once the run's files match its manifest and its JSON
    files have the types the report uses (`Run.load`; else `RunError` naming the file)."""

    run = Run.load(directory)
    config, metrics = run.config, run.metrics
    predictions = read_predictions(directory / PREDICTIONS_FILE, config.get("classes", []))
    cache, problem = None, ""
    if config.get("cache"):
        try:
            cache = FeatureCache.open(config["cache"])
        except ProbeError as error:
            problem = str(error)
    else:
        problem = "the run names no cache"
    root = config.get("dataset_root") or (cache.attrs.get("dataset_root") if cache else None)
    return RunInputs(directory, config, metrics, predictions, Path(root) if root else None,
                     cache, problem)


def read_predictions(path: Path, classes: list[str]) -> list[Prediction]:
    """The rows of test_predictions.csv (path, true, predicted, one column per class)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        names = header[3:] or list(classes)
        for row in reader:
            if len(row) < 3:
                continue
            proba = {}
            for name, value in zip(names, row[3:]):
                try:
                    proba[name] = float(value)
                except ValueError:
                    proba[name] = float("nan")
            rows.append(Prediction(row[0], row[1], row[2], proba))
    return rows


# --- images ---------------------------------------------------------------------------


def thumbnail_uri(path: Path, size: int = 96) -> tuple[str | None, str]:
    """A JPEG thumbnail (longest side `size`) as a data URI, or (None, why not)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                # a JPEG decodes at 1/2, 1/4 or 1/8 scale when that is still at least the
                # thumbnail's own size (not size x size, which a wide image seldom allows)
                scale = size / max(max(image.size), 1)
                image.draft("RGB", (max(1, round(image.width * scale)),
                                    max(1, round(image.height * scale))))
                image.thumbnail((size, size))
                picture = _rgb(image)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=75)
    except FileNotFoundError:
        return None, "file not found"
    except Exception as error:  # noqa: BLE001 - any undecodable file is a note, not a failure
        return None, f"not decodable ({type(error).__name__})"
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), ""


def _rgb(image):
    """RGB pixels; transparent images on white."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def png_uri(path: Path) -> str | None:
    """A PNG file as a data URI, or None when it is missing."""
    try:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return None


# --- escaping -------------------------------------------------------------------------


def _display(value: Any) -> str:
    """Text safe to encode as UTF-8: undecodable bytes of a path are shown as \\xff."""
    text = str(value)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def esc(value: Any) -> str:
    """HTML-escaped text of any value (quotes included, for attributes too)."""
    return html.escape(_display(value), quote=True)


def script_json(value: Any) -> str:
    """JSON that can sit inside a <script> element: no '<' can close it (nor open a
    `<!--`, which changes how the element ends), no '&' or '>' either."""
    text = json.dumps(value, ensure_ascii=True, default=_display)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _img(uri: str | None, alt: str, problem: str = "", cls: str = "thumb") -> str:
    if uri is None:
        return f'<div class="{esc(cls)} missing" title="{esc(problem)}">{esc(problem or "no image")}</div>'
    return f'<img class="{esc(cls)}" src="{esc(uri)}" alt="{esc(alt)}">'


def _is_number(value: Any) -> bool:
    """A real number (bool is not one: `True` in metrics.json is not a score)."""
    return isinstance(value, (numbers.Real, np.number)) and not isinstance(value, (bool, np.bool_))


def _number_text(value: Any, digits: int = 4) -> str:
    """Plain text of a value shown where a number belongs: finite floats rounded, NaN and
    None as '-', anything else (infinities, strings, lists from a hand-edited file) as its
    text, which the caller escapes like any other string."""
    if value is None:
        return "-"
    if _is_number(value) and not isinstance(value, (numbers.Integral, np.integer)):
        number = float(value)
        if number != number:
            return "-"
        return f"{number:.{digits}f}" if math.isfinite(number) else str(number)
    return _display(value)


def _fmt(value: Any, digits: int = 4) -> str:
    """HTML of a value shown where a number belongs (escaped: metrics.json is data)."""
    return esc(_number_text(value, digits))


# --- run report -----------------------------------------------------------------------


def render_run(directory: Path, caps: Caps = Caps(), progress: ProgressCallback | None = None) -> str:
    """The HTML page of a run directory."""
    inputs = load_run_inputs(directory)
    embedding = _embedding_inputs(inputs, caps)
    chosen = _map_selection(inputs, embedding, caps) if embedding else None
    neighbours = _neighbour_rows(inputs, embedding, caps) if embedding else []
    inputs.prefetch(_wanted_thumbnails(inputs, embedding, chosen, neighbours, caps), caps.thumbnail_px)
    sections = [
        f'<div class="row">{_settings_section(inputs)}{_metrics_section(inputs)}</div>',
        _plots_section(inputs),
        _mistakes_section(inputs, caps),
        _map_section(inputs, embedding, chosen, caps),
        _neighbours_section(inputs, embedding, neighbours, caps),
        _duplicates_section(inputs, caps),
        _skipped_section(inputs, caps),
    ]
    if inputs.cache_problem:
        emit(progress, ReportWithoutCache(problem=inputs.cache_problem))
    config = inputs.config
    title = f"probe run: {config.get('backbone', '?')} + {config.get('head', '?')}"
    intro = (f"<p>{esc(directory.name)} &middot; created {esc(config.get('created', '?'))}</p>"
             f'<p class="caps">{esc(caps.sentence())}</p>')
    return page(title, intro + "".join(sections))


def _settings_section(inputs: RunInputs) -> str:
    config = inputs.config
    keys = ["backbone", "weights", "weights_source", "image_size", "pooling", "preprocessing",
            "feature_shape", "head", "classes", "dataset_root", "split_seed", "splits", "cache",
            "fit_seconds"]
    rows = [(key, config[key]) for key in keys if key in config]
    params = config.get("head_params") or {}
    rows += [(f"head: {key}", value) for key, value in sorted(params.items())]
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_plain(v))}</td></tr>" for k, v in rows)
    return _section("settings", "Settings", f"<table class='kv'>{body}</table>")


def _plain(value: Any) -> str:
    """Plain (unescaped) text of a setting."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return _number_text(value)


def _interval(metrics: dict, key: str) -> str:
    """'[low, high]' from `<key>_ci` given as a pair or a dict, or ''."""
    value = metrics.get(f"{key}_ci")
    if isinstance(value, dict):
        value = [value.get("low", value.get("lower")), value.get("high", value.get("upper"))]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            _is_number(v) and math.isfinite(v) for v in value):
        return f"[{float(value[0]):.4f}, {float(value[1]):.4f}]"
    return ""


def _metrics_section(inputs: RunInputs) -> str:
    metrics = inputs.metrics
    if not metrics:
        return _section("metrics", "Metrics", "<p>No metrics.json in this run.</p>")
    split = metrics.get("split", "test")
    role = metrics.get("split_role")
    caption = f"on the {esc(split)} split" + (f" ({esc(role)})" if role else "")
    caption += f", {esc(metrics['n_samples'])} images" if "n_samples" in metrics else ""
    rows = "".join(
        f"<tr><th>{esc(key)}</th><td>{_fmt(metrics[key])}</td><td>{esc(_interval(metrics, key))}</td></tr>"
        for key in METRIC_KEYS if key in metrics)
    table = f"<table><tr><th>metric</th><th>value</th><th>95% interval</th></tr>{rows}</table>"
    per_class = metrics.get("per_class")
    per_class = per_class if isinstance(per_class, dict) else {}
    class_rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{_fmt(v.get('precision'))}</td><td>{_fmt(v.get('recall'))}"
        f"</td><td>{_fmt(v.get('f1'))}</td><td>{_fmt(v.get('support'))}</td></tr>"
        for name, v in per_class.items() if isinstance(v, dict))
    classes = (f"<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
               f"<th>support</th></tr>{class_rows}</table>") if class_rows else ""
    return _section("metrics", "Metrics",
                    f"<p>{caption}</p>{table}{_calibration_text(metrics)}{classes}")


def _calibration_text(metrics: dict) -> str:
    """One paragraph: the temperature applied to the probabilities, the calibration
    error before and after it, and why no temperature was fitted where none was."""
    if "expected_calibration_error" not in metrics:
        return ""
    T = metrics.get("temperature", 1.0)
    after, before = (metrics.get("expected_calibration_error"),
                     metrics.get("expected_calibration_error_uncalibrated"))
    text = (f"Calibration: temperature T = {T:.3g}; expected calibration error "
            f"{_fmt(before)} before, {_fmt(after)} after (15 confidence bins; 0 is perfectly "
            "calibrated)." if _is_number(T) and T != 1 and before is not None else
            f"Calibration: expected calibration error {_fmt(after)} (15 confidence bins; 0 is "
            "perfectly calibrated); no temperature applied (T = 1).")
    note = metrics.get("temperature_note")
    source = metrics.get("temperature_from")
    extra = "".join(f" {esc(part[0].upper() + part[1:])}." for part in (source, note)
                    if isinstance(part, str) and part)
    return f'<p class="calibration">{esc(text)}{extra}</p>'


def _plots_section(inputs: RunInputs) -> str:
    parts = []
    for name, label in (("confusion_matrix.png", "Confusion matrix"),
                        ("precision_recall.png", "Precision-recall per class"),
                        ("reliability.png", "Reliability diagram"),
                        ("curves.png", "Training curves")):
        uri = png_uri(inputs.directory / name)
        if uri:
            parts.append(f'<figure><img class="plot" src="{esc(uri)}" alt="{esc(label)}"></figure>')
    body = "".join(parts) or "<p>No plots in this run.</p>"
    return _section("plots", "Confusion matrix, reliability and training curves", body)


def mistakes(predictions: list[Prediction]) -> list[Prediction]:
    """The wrong predictions, most confident first."""
    wrong = [p for p in predictions if p.true != p.predicted]
    return sorted(wrong, key=lambda p: (-(p.confidence if p.confidence == p.confidence else 0.0), p.path))


def _mistakes_section(inputs: RunInputs, caps: Caps) -> str:
    wrong = mistakes(inputs.predictions)
    total = len(inputs.predictions)
    if not total:
        return _section("mistakes", "Misclassified images", f"<p>No {PREDICTIONS_FILE} in this run.</p>")
    cards = []
    for p in wrong[:caps.mistakes]:
        uri, problem = inputs.thumbnail(p.path, caps.thumbnail_px)
        cards.append(
            f'<div class="card mistake">{_img(uri, p.path, problem)}'
            f'<div class="path" title="{esc(p.path)}">{esc(p.path)}</div>'
            f"<div>true <b>{esc(p.true)}</b> ({_fmt(p.proba.get(p.true), 3)})</div>"
            f"<div>predicted <b>{esc(p.predicted)}</b> ({_fmt(p.confidence, 3)})</div></div>")
    shown = f" (the {min(len(wrong), caps.mistakes)} most confident shown)" if len(wrong) > caps.mistakes else ""
    head = f"<p>{len(wrong)} of {total} images misclassified{shown}, most confident mistakes first.</p>"
    return _section("mistakes", "Misclassified images", head + f'<div class="cards">{"".join(cards)}</div>')


# --- embedding map and neighbours -----------------------------------------------------


@dataclass
class Embedding:
    """The cached images the map and the neighbours use (centred, unit-length features)."""

    features: np.ndarray
    paths: list[str]
    labels: list[str]
    splits: list[str]


def _embedding_inputs(inputs: RunInputs, caps: Caps) -> Embedding | None:
    if inputs.cache is None:
        return None

    cache = inputs.cache
    classes, task = cache.classes, Task.of_flag(cache.multilabel)
    features, paths, labels, splits = [], [], [], []
    for split in cache.splits:
        part = cache.split(split)
        features.append(np.asarray(part.features, dtype=np.float32).reshape(len(part), -1))
        paths += part.paths
        labels += [task.label_name(v, classes) for v in part.labels]
        splits += [split] * len(part)
    if not features:
        return None
    return Embedding(centre(np.concatenate(features)), paths, labels, splits)


def map_coordinates(X: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of X: UMAP when umap-learn is installed (it is not a
    dependency of probe), else PCA. Both seeded. (t-SNE was tried: over a minute for a
    few hundred points on two busy cores, too slow for a report written by every fit.)"""
    n = len(X)
    if n < 3:
        return np.zeros((n, 2)) + np.arange(n)[:, None], "PCA"
    try:
        import umap
    except ImportError:
        return pca_2d(X), "PCA"

    reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, n - 1))
    return np.asarray(reducer.fit_transform(X)), "UMAP"


def pca_2d(X: np.ndarray) -> np.ndarray:
    """The first two principal components (signs fixed so the result is deterministic)."""
    centred = X - X.mean(axis=0)
    if min(centred.shape) <= 50:  # small: the exact SVD costs nothing
        axes = np.linalg.svd(centred, full_matrices=False)[2][:2]
    else:
        # the full SVD of 1,200 x 2,048 features was three quarters of a logistic fit's time;
        # a seeded randomized SVD gives the same two axes (|cosine| 1.0000) at 1/20 the cost
        from sklearn.utils.extmath import randomized_svd

        axes = randomized_svd(centred, 2, random_state=0)[2]
    axes = axes * np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    coords = centred @ axes.T
    return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))


def _map_selection(inputs: RunInputs, embedding: Embedding, caps: Caps) -> np.ndarray:
    """Indices of the points drawn: every shown mistake, then a seeded sample."""
    index = {(s, p): i for i, (s, p) in enumerate(zip(embedding.splits, embedding.paths))}
    split = inputs.metrics.get("split", "test")
    wanted = [index[(split, p.path)] for p in mistakes(inputs.predictions)[:caps.mistakes]
              if (split, p.path) in index]
    rest = np.setdiff1d(np.arange(len(embedding.paths)), wanted)
    rng = np.random.default_rng(0)
    room = max(0, caps.map_points - len(wanted))
    sample = rng.choice(rest, size=min(room, len(rest)), replace=False) if len(rest) else rest
    return np.array(sorted(set(wanted) | set(sample.tolist())), dtype=np.int64)


def _map_section(inputs: RunInputs, embedding: Embedding | None, chosen: np.ndarray | None,
                 caps: Caps) -> str:
    if embedding is None or chosen is None:
        return _section("map", "Embedding map", f"<p>Unavailable: {esc(inputs.cache_problem)}</p>")
    coords, method = map_coordinates(embedding.features[chosen])
    split = inputs.metrics.get("split", "test")
    wrong = {p.path: p.predicted for p in inputs.predictions if p.true != p.predicted}
    classes = list(dict.fromkeys(inputs.config.get("classes") or embedding.labels))
    colour = {name: _colour(k) for k, name in enumerate(classes)}
    points, circles = [], []
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    scaled = (coords - lo) / np.where(hi > lo, hi - lo, 1.0) * [760, 520] + [20, 20]
    with_thumbs = 0
    for k, (i, (x, y)) in enumerate(zip(chosen.tolist(), scaled.tolist())):
        path, label, where = embedding.paths[i], embedding.labels[i], embedding.splits[i]
        predicted = wrong.get(path) if where == split else None
        thumb = None
        if with_thumbs < caps.map_thumbnails or predicted is not None:
            thumb, _ = inputs.thumbnail(path, caps.thumbnail_px)
            with_thumbs += thumb is not None
        points.append({"p": _display(path), "c": _display(label), "s": where,
                       "w": _display(predicted) if predicted else "", "t": thumb or ""})
        mark = ' class="pt wrong" r="6"' if predicted else ' class="pt" r="4"'
        circles.append(f'<circle{mark} cx="{x:.1f}" cy="{y:.1f}" fill="{esc(colour.get(label, "#999"))}" '
                       f'data-i="{k}"><title>{esc(path)}</title></circle>')
    # a swatch is an SVG fill, not a style="" attribute: the page's policy allows no
    # inline style attribute, only its own <style> element
    legend = "".join(f'<span class="key"><svg class="swatch" viewBox="0 0 10 10"><rect width="10" '
                     f'height="10" fill="{esc(colour[c])}"/></svg>{esc(c)}</span>' for c in classes)
    svg = (f'<svg id="map-svg" viewBox="0 0 800 560" role="img" aria-label="embedding map">'
           f'{"".join(circles)}</svg>')
    text = (f"<p>{len(chosen)} of {len(embedding.paths)} cached images, {method} of the centred "
            f"features (seed 0); rings mark misclassified {esc(split)} images. Hover a point for "
            f"its thumbnail.</p><div class='legend'>{legend}</div>")
    tip = (f'<div id="map-tip" hidden><img id="map-tip-img" src="{esc(BLANK_GIF)}" alt="">'
           f'<div id="map-tip-text"></div></div>')
    data = f'<script type="application/json" id="map-data">{script_json(points)}</script>'
    return _section("map", "Embedding map", text + f'<div id="map-wrap">{svg}{tip}</div>' + data)


def _colour(k: int) -> str:
    if k < len(PALETTE):
        return PALETTE[k]
    return f"hsl({(k * 137) % 360}, 60%, 45%)"


@dataclass
class NeighbourRow:
    """One evaluated image (an index into the embedding) and its most similar training
    images, with their cosine similarities."""

    query: int
    neighbours: list[tuple[int, float]]


def _neighbour_rows(inputs: RunInputs, embedding: Embedding, caps: Caps) -> list[NeighbourRow]:
    """For the queried images of the evaluated split, their `caps.neighbours` most similar
    training images (none without training images)."""
    split = inputs.metrics.get("split", "test")
    train = np.nonzero(np.array(embedding.splits) == "train")[0]
    if not len(train):
        return []
    rows = []
    for q in _neighbour_queries(inputs, embedding, split, caps):
        sims = embedding.features[train] @ embedding.features[q]
        order = np.argsort(-sims, kind="stable")[:caps.neighbours]
        rows.append(NeighbourRow(q, [(int(train[j]), float(sims[j])) for j in order]))
    return rows


def _neighbours_section(inputs: RunInputs, embedding: Embedding | None,
                        rows: list[NeighbourRow], caps: Caps) -> str:
    title = "Nearest training images"
    if embedding is None:
        return _section("neighbours", title, f"<p>Unavailable: {esc(inputs.cache_problem)}</p>")
    if not rows:
        return _section("neighbours", title, "<p>No train or evaluated images in the cache.</p>")
    split = inputs.metrics.get("split", "test")
    wrong = {p.path: p.predicted for p in inputs.predictions if p.true != p.predicted}
    html_rows = []
    for row in rows:
        cells = [_neighbour_card(inputs, embedding, row.query, caps, "query",
                                 wrong.get(embedding.paths[row.query]))]
        cells += [_neighbour_card(inputs, embedding, j, caps, f"{similarity:.3f}")
                  for j, similarity in row.neighbours]
        html_rows.append(f'<div class="nrow">{"".join(cells)}</div>')
    text = (f"<p>For {len(rows)} {esc(split)} images (the most confident mistakes, then a "
            f"seeded sample), the {caps.neighbours} most similar training images by cosine "
            "similarity of the centred cached features.</p>")
    return _section("neighbours", title, text + "".join(html_rows))


def _wanted_thumbnails(inputs: RunInputs, embedding: Embedding | None, chosen: np.ndarray | None,
                       rows: list[NeighbourRow], caps: Caps) -> list[str]:
    """The images whose thumbnails the sections will show (the mistakes, the map's first
    points and its misclassified ones, the neighbour rows), for `RunInputs.prefetch`; a
    thumbnail missed here is still decoded when its section asks for it."""
    wanted = [p.path for p in mistakes(inputs.predictions)[:caps.mistakes]]
    if embedding is not None and chosen is not None:
        wanted += [embedding.paths[i] for i in chosen[:caps.map_thumbnails].tolist()]
        split = inputs.metrics.get("split", "test")
        wrong = {p.path for p in inputs.predictions if p.true != p.predicted}
        wanted += [embedding.paths[i] for i in chosen.tolist()  # every wrong point has one
                   if embedding.splits[i] == split and embedding.paths[i] in wrong]
        wanted += [embedding.paths[i] for row in rows
                   for i in [row.query, *(j for j, _ in row.neighbours)]]
    return wanted


def _neighbour_queries(inputs: RunInputs, embedding: Embedding, split: str, caps: Caps) -> list[int]:
    index = {p: i for i, (s, p) in enumerate(zip(embedding.splits, embedding.paths)) if s == split}
    half = caps.neighbour_queries // 2
    chosen = [index[p.path] for p in mistakes(inputs.predictions) if p.path in index][:half]
    others = sorted(set(index.values()) - set(chosen))
    rng = np.random.default_rng(0)
    room = caps.neighbour_queries - len(chosen)
    if others and room > 0:
        chosen += sorted(rng.choice(others, size=min(room, len(others)), replace=False).tolist())
    return chosen


def _neighbour_card(inputs: RunInputs, embedding: Embedding, i: int, caps: Caps, note: str,
                    predicted: str | None = None) -> str:
    path = embedding.paths[i]
    uri, problem = inputs.thumbnail(path, caps.thumbnail_px)
    extra = f" &rarr; {esc(predicted)}" if predicted else ""
    css = "card query" if note == "query" else "card"
    return (f'<div class="{css}">{_img(uri, path, problem)}<div class="path" title="{esc(path)}">'
            f"{esc(path)}</div><div>{esc(embedding.labels[i])}{extra} &middot; {esc(note)}</div></div>")


# --- duplicates and skipped files -----------------------------------------------------


def _duplicates_section(inputs: RunInputs, caps: Caps) -> str:
    title = "Duplicates across splits"
    if inputs.cache is None:
        return _section("duplicates", title, f"<p>Unavailable: {esc(inputs.cache_problem)}</p>")

    found = cached_duplicates(inputs.cache)
    try:
        return _section("duplicates", title, _duplicates_body(inputs, found, caps))
    except (KeyError, TypeError, AttributeError, ValueError):
        # <cache>.duplicates.json is a file anyone can edit: a malformed one is a note
        return _section("duplicates", title,
                        "<p>Unavailable: the remembered duplicates of the cache are malformed; "
                        f"run <code>probe duplicates {esc(inputs.cache.path)}</code>.</p>")


def _duplicates_body(inputs: RunInputs, found: dict, caps: Caps) -> str:
    """The duplicates section's HTML from `cached_duplicates`' dict (every value escaped:
    the dict is read back from a file)."""
    pairs = found["pairs"]
    counts = found["counts"]
    summary = (f"<p>{_fmt(counts['pairs'])} duplicate pairs among {_fmt(found['n_images'])} cached "
               f"images (cosine similarity of centred features &ge; {_fmt(found['threshold'], 2)}), "
               f"{_fmt(counts['cross_split_pairs'])} of them across splits. Run "
               f"<code>probe duplicates {esc(inputs.cache.path)}</code> to hash every file too.</p>")
    shown = list(pairs)[:caps.duplicate_pairs]
    inputs.prefetch([_display(pair[side]["path"]) for pair in shown for side in ("first", "second")],
                    caps.thumbnail_px)
    rows = []
    for pair in shown:
        a, b = pair["first"], pair["second"]
        cells = []
        for image in (a, b):
            uri, problem = inputs.thumbnail(_display(image["path"]), caps.thumbnail_px)
            cells.append(f'<div class="card">{_img(uri, image["path"], problem)}<div class="path" '
                         f'title="{esc(image["path"])}">{esc(image["path"])}</div>'
                         f'<div>{esc(image["split"])} &middot; {esc(image["label"])}</div></div>')
        kind = "identical files" if pair["exact"] else "near"
        cross = " cross" if a["split"] != b["split"] else ""
        rows.append(f'<div class="nrow{cross}">{"".join(cells)}<div class="sim">{esc(kind)}<br>'
                    f'{_fmt(pair["similarity"])}</div></div>')
    return summary + "".join(rows)


def _skipped_section(inputs: RunInputs, caps: Caps) -> str:
    skipped = inputs.metrics.get("skipped_files")
    if skipped is None and inputs.cache is not None:
        skipped = [{"path": p, "reason": r} for p, r in inputs.cache.skipped]
    skipped = skipped or []
    if not skipped:
        return _section("skipped", "Skipped files", "<p>No file was skipped at extraction.</p>")
    rows = "".join(f"<tr><td>{esc(s.get('path'))}</td><td>{esc(s.get('reason'))}</td></tr>"
                   for s in skipped[:caps.skipped])
    more = f"<p>{len(skipped) - caps.skipped} more not shown.</p>" if len(skipped) > caps.skipped else ""
    return _section("skipped", "Skipped files",
                    f"<p>{len(skipped)} files could not be decoded at extraction.</p>"
                    f"<table><tr><th>path</th><th>reason</th></tr>{rows}</table>{more}")


# --- comparison report ----------------------------------------------------------------


# how a comparison's numbers are shown: decimals per column (intervals: 3)
_COMPARE_DIGITS = {"images_per_second": 1, "fit_seconds": 2}
_COMPARE_HEADERS = {"p_value_vs_best": "p vs best", "images_per_second": "extract img/s",
                    "fit_seconds": "fit s", "feature_size": "features"}


def render_comparison(directory: Path) -> str:
    """The HTML page of a comparison directory: the ranked table (each score with its 95%
    interval, the paired test against the best and `tied`), the chart, the label-efficiency
    curves when the comparison drew them, and a link to each run's report."""
    with open(directory / COMPARE_CSV, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        records = list(csv.DictReader(handle))
    task = Task.of_row(records[0]) if records else SINGLE_LABEL
    columns = ["rank", "backbone", "head", task.score, f"{task.score}_ci", "tied",
               "p_value_vs_best", *task.scores[1:], "feature_size", "images_per_second",
               "fit_seconds", "status", "report"]
    head = "".join(f"<th>{esc(_COMPARE_HEADERS.get(c, c.replace('_ci', ' 95%')))}</th>"
                   for c in columns)
    body = []
    for record in records:
        cells = [f"<td>{_compare_cell(c, record.get(c))}{_secondary_interval(c, record)}</td>"
                 for c in columns[:-1]]
        cells.append(f"<td>{_run_link(directory, record)}</td>")
        row_class = ' class="failed"' if record.get("status") != "ok" else ""
        error = (f'<tr class="error"><td colspan="{len(columns):d}">{esc(record["error"])}</td></tr>'
                 if record.get("error") else "")
        body.append(f"<tr{row_class}>{''.join(cells)}</tr>{error}")
    table = f"<table><tr>{head}</tr>{''.join(body)}</table>"
    split = next((r.get("split") for r in records if r.get("split")), "test")
    text = (f"<p>Ranked by {esc(split)} {esc(task.score_name)}, then macro F1; failed rows "
            f"last. Intervals are 95%.</p>")
    meaning = significance.explain(task.score).replace("`p_vs_best`", "p vs best")
    meaning = f"<p>{esc(meaning.replace('`', ''))}</p>"
    sections = _section("ranking", "Ranked backbones and heads",
                        text + table + meaning + _compare_figure(directory, "compare.png",
                                                                 "comparison chart"))
    curves = _compare_figure(directory, "curve.png", "label-efficiency curves")
    if curves:
        sections += _section("curves", "Label-efficiency curves",
                             "<p>Score against labelled images per class (curve.csv).</p>" + curves)
    return page(f"probe comparison: {directory.name}", sections)


def _compare_figure(directory: Path, name: str, alt: str) -> str:
    uri = png_uri(directory / name)
    return f'<figure><img class="plot" src="{esc(uri)}" alt="{esc(alt)}"></figure>' if uri else ""


def _secondary_interval(column: str, record: dict) -> str:
    """' [low, high]' after a score other than the ranking one, when compare.csv has its
    interval ('' otherwise: the ranking score's interval has its own column)."""
    if (column not in METRIC_KEYS or column == Task.of_row(record).score
            or not record.get(f"{column}_ci")):
        return ""
    return " " + _compare_cell(f"{column}_ci", record[f"{column}_ci"])


def _compare_cell(column: str, text: str | None) -> str:
    """One cell of the comparison table from its compare.csv text: scores with 4
    decimals, intervals as [low, high] with 3, p-values as `significance.format_p`; text
    that is not the number it should be is shown as it is (escaped: the file is data)."""
    if text is None or text == "":
        return "-"
    try:
        if column.endswith("_ci"):
            low, high = (float(v) for v in text.split())
            return esc(f"[{_number_text(low, 3)}, {_number_text(high, 3)}]")
        if column == "p_value_vs_best":
            return esc(significance.format_p(float(text)))
        if column in METRIC_KEYS or column in _COMPARE_DIGITS:
            return _fmt(float(text), _COMPARE_DIGITS.get(column, 4))
    except ValueError:
        pass
    return esc(text)


def _run_link(directory: Path, record: dict) -> str:
    run = record.get("run")
    if not run:
        return "-"
    report = Path(run) / REPORT_FILE
    if not report.is_file():
        return f"no report (<code>probe report {esc(run)}</code>)"
    try:
        href = os.path.relpath(report, directory)
    except ValueError:
        href = report.resolve().as_uri()
    href = "/".join(_url_quote(part) for part in Path(href).parts)
    return f'<a href="{esc(href)}">{esc(Path(run).name)}</a>'


def _url_quote(part: str) -> str:
    from urllib.parse import quote

    return quote(os.fsencode(part), safe="")


# --- the page -------------------------------------------------------------------------


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
table.kv th{background:#f6f6f6;font-weight:600}.caps{color:#666;font-size:12px}
tr.failed td{color:#a33}tr.error td{font-size:12px;color:#a33}
.cards,.nrow{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}.nrow.cross{background:#fff3f0}
.card{width:112px;font-size:11px;overflow:hidden}.card.query{border-right:3px solid #888;padding-right:6px}
.thumb{width:96px;height:96px;object-fit:contain;background:#eee;display:block}
.thumb.missing{font-size:10px;color:#a33;overflow:hidden;padding:2px;box-sizing:border-box}
.path{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}.sim{align-self:center;font-size:12px}
img.plot{max-width:100%}figure{margin:8px 0}.row{display:flex;flex-wrap:wrap;gap:0 32px}
#plots figure{display:inline-block;vertical-align:top;max-width:49%;margin-right:8px}
table.kv td{max-width:420px;overflow-wrap:anywhere}
#map-wrap{position:relative}#map-svg{width:100%;max-width:800px;border:1px solid #ddd}
circle.pt{opacity:.8}circle.wrong{stroke:#000;stroke-width:2}
#map-tip{position:absolute;background:#fff;border:1px solid #999;padding:4px;font-size:11px;
pointer-events:none;max-width:200px}#map-tip img{max-width:96px;max-height:96px;display:block}
.legend .key{margin-right:12px}.legend .swatch{width:10px;height:10px;margin-right:4px}
nav a{margin-right:10px}
"""

SCRIPT = """
(function(){
  var node=document.getElementById('map-data'); if(!node) return;
  var points=JSON.parse(node.textContent), svg=document.getElementById('map-svg');
  var tip=document.getElementById('map-tip'), img=document.getElementById('map-tip-img');
  var text=document.getElementById('map-tip-text'), wrap=document.getElementById('map-wrap');
  svg.addEventListener('mouseover',function(e){
    var i=e.target.getAttribute&&e.target.getAttribute('data-i'); if(i===null) return;
    var p=points[+i]; if(p.t){img.src=p.t;img.hidden=false;}else{img.hidden=true;}
    text.textContent=p.p+' \\u00b7 '+p.s+' \\u00b7 '+p.c+(p.w?' \\u2192 predicted '+p.w:'');
    var box=wrap.getBoundingClientRect();
    tip.style.left=(e.clientX-box.left+12)+'px'; tip.style.top=(e.clientY-box.top+12)+'px';
    tip.hidden=false;
  });
  svg.addEventListener('mouseout',function(){tip.hidden=true;});
})();
"""


def csp_hash(text: str) -> str:
    """The Content-Security-Policy source that allows exactly one inline <script> or
    <style> element whose content is `text`: 'sha256-<base64 of its UTF-8 digest>'."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def content_security_policy() -> str:
    """The page's policy: nothing loaded from anywhere, images only from data: URIs, and
    only the page's own <style> and <script> (by hash). An element or attribute that data
    could smuggle in (a <script>, an onerror=, a style=) is refused by the browser even if
    it got past the escaping."""
    return (f"default-src 'none'; img-src data:; style-src {csp_hash(STYLE)}; "
            f"script-src {csp_hash(SCRIPT)}; base-uri 'none'; form-action 'none'")


def page(title: str, body: str) -> str:
    """A complete HTML document: inline style and script, no external resource."""
    anchors = [a for a in ("settings", "metrics", "plots", "mistakes", "map", "neighbours",
                           "duplicates", "skipped", "ranking", "curves") if f'id="{a}"' in body]
    nav = "".join(f'<a href="#{esc(a)}">{esc(a)}</a>' for a in anchors)
    policy = content_security_policy()
    # made of constants and base64 digests only, so it is inserted as it is (escaping
    # would turn its quotes into &#x27;, the same attribute value but harder to read)
    assert not set(policy) & set('"&<>'), policy
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{policy}\">"
        f"<link rel=\"icon\" href=\"data:,\"><title>{esc(title)}</title><style>{STYLE}</style>"
        f"</head><body><h1>{esc(title)}</h1><nav>{nav}</nav>{body}"
        f"<script>{SCRIPT}</script></body></html>\n"
    )


def after_fit(cache: Any, directory: Path, report: bool = True) -> list[str]:
    """What `probe fit` adds once its run files are written: a one-line warning when the
    cache has near-duplicate pairs across splits, and report.html (unless `report` is
    False). Returns the notes for the user; a report that fails is a note, never a lost run.
    """

    notes = []
    try:
        warning = leakage_warning(cache)
    except Exception as error:  # noqa: BLE001 - a check must not fail a saved run
        warning = (f"warning: the duplicate check failed ({type(error).__name__}: {error}); "
                   f"run `probe duplicates {_display(cache.path)}`")
    if warning:
        notes.append(warning)
    if report:
        try:
            write_report(directory)
        except Exception as error:  # noqa: BLE001 - the run itself is already saved
            notes.append(f"warning: report.html could not be written ({type(error).__name__}: "
                         f"{error}); retry with `probe report {_display(directory)}`")
    return notes
