"""Plots and terminal tables of a run's evaluation.

The metrics themselves (and their confidence intervals) live in `probe.evaluate`;
`compute_metrics` is re-exported here for older imports. Plots are drawn with matplotlib's Agg
canvas directly (no pyplot, no global backend switch); matplotlib is only
imported when a plot is made.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from probe import calibration, files
from probe.errors import ProbeError
from probe.evaluate import compute_metrics

__all__ = ["compute_metrics", "format_interval", "format_table", "plot_confusion_matrix",
           "plot_precision_recall",
           "plot_curves", "plot_reliability", "printable"]


def printable(name: str) -> str:
    """A class name that fonts and encoders can take: a folder name that is not UTF-8
    (kept by Python as lone surrogates) shows its undecodable bytes as U+FFFD."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def format_interval(interval: Any) -> str:
    """A 95% interval as `[0.8123, 0.9340]`, or '-' when there is none."""
    if not interval:
        return "-"
    low, high = interval
    return f"[{float(low):.4f}, {float(high):.4f}]"


# --------------------------------------------------------------------------- #
# Plots
# --------------------------------------------------------------------------- #


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def plot_confusion_matrix(matrix: Any, classes: list[str], path: str | os.PathLike,
                          title: str = "Confusion matrix") -> Path:
    """Write the confusion matrix (rows = true class) as a PNG with annotated counts;
    `title` names the split it was measured on."""
    M = np.asarray(matrix)
    names = [printable(c) for c in classes]
    K = len(names)
    if M.shape != (K, K):
        raise ProbeError(
            f"`matrix` must be a {K}x{K} confusion matrix for the {K} classes given. "
            f"Received: matrix.shape={M.shape}"
        )
    side = min(max(4.0, 0.45 * K + 2.5), 30.0)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(M, cmap="Blues", interpolation="nearest", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(K), labels=names, rotation=45 if K > 3 else 0, ha="right" if K > 3 else "center")
    ax.set_yticks(range(K), labels=names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(title)
    if K <= 40:
        top = M.max() if M.size else 0
        fontsize = 10 if K <= 10 else 7 if K <= 20 else 5
        for i in range(K):
            for j in range(K):
                value = M[i, j]
                text = f"{value:d}" if np.issubdtype(M.dtype, np.integer) else f"{value:.2f}"
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=fontsize,
                    color="white" if top and value > top / 2 else "black",
                )
    return _save(fig, path)


def plot_precision_recall(y_true: Any, proba: Any, classes: list[str], path: str | os.PathLike,
                          ignore: Any = None, title: str = "Precision-recall per class") -> Path:
    """Multi-label: one precision-recall curve per class (its difficult entries left out),
    labelled with its average precision; a class without a positive image is not drawn."""
    from sklearn.metrics import precision_recall_curve

    from .evaluate import average_precisions

    Y, P = np.asarray(y_true), np.asarray(proba, dtype=np.float64)
    mask = np.zeros(Y.shape, dtype=bool) if ignore is None else np.asarray(ignore, dtype=bool)
    ap = average_precisions(Y, P, mask)
    fig = _new_figure(7.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    for k, name in enumerate(classes):
        keep = ~mask[:, k]
        if np.isnan(ap[k]):
            continue
        precision, recall, _ = precision_recall_curve(Y[keep, k], P[keep, k])
        ax.step(recall, precision, where="post", linewidth=1.2,
                label=f"{printable(name)} (AP {ap[k]:.3f})")
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.05)
    mean = np.nanmean(ap) if np.any(~np.isnan(ap)) else 0.0
    ax.set_title(f"{title}: mAP {mean:.3f}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=7 if len(classes) <= 20 else 5,
              ncol=1 if len(classes) <= 10 else 2)
    return _save(fig, path)


def curves_from_history(history: dict[str, list[float]]) -> "Curves":
    """A Keras-style history (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``) as
    curves per epoch, the epoch of the lowest validation loss marked as restored."""
    from .heads.base import Curves

    history = {key: [float(v) for v in values] for key, values in dict(history or {}).items()}
    length = max((len(v) for v in history.values()), default=0)
    chosen = int(np.argmin(history["val_loss"])) + 1 if history.get("val_loss") else None
    return Curves(
        xlabel="Epoch", x=list(range(1, length + 1)),
        panels={"Loss": [("loss", "train"), ("val_loss", "validation")],
                "Accuracy": [("accuracy", "train"), ("val_accuracy", "validation")]},
        series=history, chosen=chosen, chosen_label=f"restored epoch {chosen}")


def plot_curves(curves: Any, path: str | os.PathLike) -> Path:
    """Write a PNG of a head's training curves, one panel per ``curves.panels`` entry,
    with the chosen point (the chosen C, k or restored epoch) marked by a dashed line.

    ``curves`` is a head's ``curves_()`` (``probe.heads.Curves``) or a Keras-style history
    dict (drawn per epoch, see ``curves_from_history``).
    """
    if isinstance(curves, dict) or curves is None:
        curves = curves_from_history(curves or {})
    drawn = [key for series in curves.panels.values() for key, _ in series if curves.series.get(key)]
    if not drawn:
        raise ProbeError(
            "the curves have no series to draw; expected a head's curves_() or a history with "
            "loss/accuracy (and val_loss/val_accuracy) per epoch. "
            f"Received: series {sorted(curves.series)}"
        )
    fig = _new_figure(4.8 * len(curves.panels), 3.6)
    width, height = fig.get_size_inches()
    # margins in inches; the gap between panels is a fraction of a panel's width (0.7 in)
    fig.subplots_adjust(left=0.65 / width, right=1 - 0.2 / width, bottom=0.55 / height,
                        top=1 - 0.3 / height, wspace=0.17)
    for index, (title, series) in enumerate(curves.panels.items(), start=1):
        ax = fig.add_subplot(1, len(curves.panels), index)
        for key, label in series:
            values = curves.series.get(key) or []
            if values:
                ax.plot(curves.x[: len(values)], values, marker="o", markersize=3, label=label)
        if curves.chosen is not None:
            ax.axvline(curves.chosen, color="black", linestyle="--", linewidth=1, label=curves.chosen_label)
        if curves.log_x:
            _plain_log_x(ax, curves.x)
        else:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel(curves.xlabel)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save_palette(fig, path)


def _plain_log_x(ax, values: list[float]) -> None:
    """A log x axis labelled in plain numbers (0.01, 1, 100; 1, 2, 5, 10, 20 over two
    decades or less) with no minor ticks: the minor ticks and the mathtext labels (10^-2)
    were most of a plot's drawing time, and plain numbers read as what the options take
    (--C 0.01)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    positive = [v for v in values if v > 0]
    decades = math.log10(max(positive) / min(positive)) if positive else 0.0
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if decades > 2 else (1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


# --------------------------------------------------------------------------- #
# Terminal table
# --------------------------------------------------------------------------- #


def _cell(value: Any) -> tuple[str, bool]:
    """Text of one cell and whether it is numeric (right-aligned)."""
    if value is None:
        return "-", False
    if isinstance(value, bool):
        return str(value), False
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return ("nan" if math.isnan(v) else f"{v:.4f}"), True
    if isinstance(value, (int, np.integer)):
        return str(int(value)), True
    return str(value), False


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table: header, dashes, one line per row.

    Floats are shown with 4 decimals, numbers are right-aligned, text
    left-aligned, missing values as ``-``. No trailing newline.
    """
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [
        max([len(str(col))] + [len(r[i][0]) for r in cells]) for i, col in enumerate(columns)
    ]
    numeric = [bool(cells) and all(r[i][1] or r[i][0] == "-" for r in cells) for i in range(len(columns))]

    def line(texts: list[str]) -> str:
        parts = [
            t.rjust(w) if num else t.ljust(w) for t, w, num in zip(texts, widths, numeric)
        ]
        return "  ".join(parts).rstrip()

    out = [line([str(c) for c in columns]), "  ".join("-" * w for w in widths)]
    out.extend(line([text for text, _ in r]) for r in cells)
    return "\n".join(out)


def plot_reliability(calibrated: tuple[Any, Any], path: str | os.PathLike,
                     before: tuple[Any, Any] | None = None, temperature: float = 1.0,
                     title: str = "Reliability", bins: int = 15) -> Path:
    """Write a reliability diagram: per confidence bin (`calibration.reliability_table`),
    the accuracy against the mean confidence of the probabilities a run reports
    (`calibrated`: each prediction's confidence and whether it is right), with the
    diagonal of perfect calibration; `before` (the head's own probabilities) is drawn
    too when a temperature changed them. Below, how many predictions fall in each bin.
    The legend gives each one's expected calibration error."""
    fig = _new_figure(4.2, 4.6)  # small: it is embedded in every run's report.html
    top = fig.add_axes((0.16, 0.39, 0.81, 0.54))
    bottom = fig.add_axes((0.16, 0.12, 0.81, 0.18), sharex=top)
    top.plot([0, 1], [0, 1], linestyle="--", color="#7f7f7f", label="perfect calibration")
    series = [("after temperature" if temperature != 1 else "reported", calibrated, "#1f77b4")]
    if before is not None and temperature != 1:
        series.append(("before (the head's own)", before, "#ff7f0e"))
    for label, (confidence, correct), colour in reversed(series):
        table = calibration.reliability_table(confidence, correct, bins)
        index, contribution = calibration.bin_contributions(confidence, correct, bins)
        ece = float(np.abs(np.bincount(index, weights=contribution, minlength=bins)).sum()
                    / max(index.size, 1))
        name = f"{label}: ECE {ece:.4f}" + (f", T = {temperature:.3g}"
                                             if label == "after temperature" else "")
        top.plot([r["confidence"] for r in table], [r["accuracy"] for r in table],
                 marker="o", color=colour, label=name)
        bottom.bar([(r["low"] + r["high"]) / 2 for r in table], [r["count"] for r in table],
                   width=1 / bins, color=colour, alpha=0.5, edgecolor="white")
    top.set_xlim(-0.02, 1.02)  # points at 0 and 1 drawn whole
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("Accuracy in the bin")
    top.set_title(title)
    top.legend(loc="upper left", fontsize="small")
    top.grid(alpha=0.3)
    bottom.set_xlabel("Confidence (the predicted probability)")
    bottom.set_ylabel("Predictions")
    return _save_palette(fig, path)


def _save_palette(fig, path: str | os.PathLike, colours: int = 24) -> Path:
    """Save as a PNG of at most `colours` colours (no dithering) at 80 dpi: a figure of a
    few flat colours stays legible at a quarter of the space, in every report that
    embeds it. The figure keeps the margins it was given (its labels are short and
    known): a tight bounding box would draw it twice, a third of a logistic fit's time."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    buffer.seek(0)
    with Image.open(buffer) as image:
        # octree keeps a rare colour (a legend swatch) that median cut merges into a grey
        small = image.convert("RGB").quantize(colours, method=Image.Quantize.FASTOCTREE,
                                              dither=Image.Dither.NONE)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_write(path, "wb") as handle:
        small.save(handle, format="PNG", optimize=True)
    return path
