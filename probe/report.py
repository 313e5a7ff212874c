"""Evaluation metrics, plots and terminal tables.

Metrics come from scikit-learn and are returned as plain Python types so they
can be written with ``json.dump``. Plots are drawn with matplotlib's Agg
canvas directly (no pyplot, no global backend switch); matplotlib is only
imported when a plot is made.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from probe.errors import DatasetError, ProbeError

__all__ = ["compute_metrics", "format_table", "plot_confusion_matrix", "plot_curves"]


def compute_metrics(y_true: Any, proba: Any, classes: list[str]) -> dict[str, Any]:
    """Classification metrics of ``proba`` (``(N, K)``) against ``y_true`` (``(N,)``).

    Returns a JSON-serialisable dict with ``accuracy``, ``balanced_accuracy``,
    ``macro_f1`` (averaged over all K classes, a class never seen nor predicted
    counting as 0), ``per_class`` (``{name: {precision, recall, f1, support}}``),
    ``confusion_matrix`` (list of lists, rows = true class, columns = predicted),
    ``log_loss``, ``n_samples`` and, when K > 5, ``top5_accuracy``.
    Predictions are ``argmax(proba, axis=1)``.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        log_loss,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    names = [str(c) for c in classes]
    K = len(names)
    P = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y_true)
    if P.ndim != 2 or P.shape[1] != K:
        raise DatasetError(
            f"`proba` must have shape (N, {K}) for the {K} classes given. Received: proba.shape={P.shape}"
        )
    if y.ndim != 1 or y.shape[0] != P.shape[0]:
        raise DatasetError(
            "`y_true` must be a 1-D array with one label per row of `proba`. "
            f"Received: y_true.shape={y.shape}, proba.shape={P.shape}"
        )
    if y.size == 0:
        raise DatasetError("metrics need at least one sample. Received: y_true with 0 samples")
    if y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= K:
        raise DatasetError(
            f"`y_true` must hold integer class indices 0..{K - 1}. "
            f"Received: dtype={y.dtype}, min={y.min()}, max={y.max()}"
        )
    if K < 2:
        raise DatasetError(f"metrics need at least 2 classes. Received: classes={names}")
    if not np.all(np.isfinite(P)) or P.min() < 0 or not np.allclose(P.sum(axis=1), 1.0, atol=1e-3):
        raise DatasetError(
            "`proba` must hold probabilities (finite, >= 0, rows summing to 1), e.g. the output of "
            "`predict_proba`. Received: row sums between "
            f"{np.nanmin(P.sum(axis=1)):.4g} and {np.nanmax(P.sum(axis=1)):.4g}"
        )
    P = P / P.sum(axis=1, keepdims=True)  # remove float32 round-off before log_loss
    y = y.astype(np.int64)
    labels = list(range(K))
    pred = np.argmax(P, axis=1)

    with warnings.catch_warnings():
        # balanced_accuracy warns when a predicted class is absent from y_true.
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y, pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    metrics: dict[str, Any] = {
        "n_samples": int(y.size),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "log_loss": float(log_loss(y, P, labels=labels)),
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k, name in enumerate(names)
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).astype(int).tolist(),
    }
    if K > 5:
        metrics["top5_accuracy"] = float(top_k_accuracy_score(y, P, k=5, labels=labels))
    return metrics


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


def plot_confusion_matrix(matrix: Any, classes: list[str], path: str | os.PathLike) -> Path:
    """Write the confusion matrix (rows = true class) as a PNG with annotated counts."""
    M = np.asarray(matrix)
    names = [str(c) for c in classes]
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
    ax.set_title("Confusion matrix")
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
    fig = _new_figure(5.5 * len(curves.panels), 4.0)
    for index, (title, series) in enumerate(curves.panels.items(), start=1):
        ax = fig.add_subplot(1, len(curves.panels), index)
        for key, label in series:
            values = curves.series.get(key) or []
            if values:
                ax.plot(curves.x[: len(values)], values, marker="o", markersize=3, label=label)
        if curves.chosen is not None:
            ax.axvline(curves.chosen, color="black", linestyle="--", linewidth=1, label=curves.chosen_label)
        if curves.log_x:
            ax.set_xscale("log")
        else:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel(curves.xlabel)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


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
