"""Evaluation: metrics of predicted probabilities, with 95% confidence intervals, and the
role of the split they were measured on.

Split roles: train fits; val selects (C, epochs, early stopping); test reports. A score
measured on val is a score of the data the choices were made on, so it is labelled
`SPLIT_ROLES["val"]` wherever it is shown.

Intervals: Wilson's score interval for accuracy (a proportion); a seeded percentile
bootstrap over the reported images for balanced accuracy and macro F1, computed for all
resamples at once from their confusion matrices. A percentile bootstrap can not see beyond
the reported images: when every one of them is right, every resample scores 1.0 and the
interval collapses to [1.0, 1.0]; the accuracy's Wilson interval, which does not collapse,
is the one to read then.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from probe.errors import DatasetError

__all__ = ["compute_metrics", "wilson_interval", "bootstrap_intervals", "split_role",
           "SPLIT_ROLES", "CONFIDENCE", "BOOTSTRAP_RESAMPLES"]

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000
_Z95 = 1.959963984540054  # the standard normal quantile for a two-sided 95% interval
# rows of the (resamples x images) index matrix drawn at once: bounds the memory of a
# bootstrap on a large test split to tens of megabytes
_BOOTSTRAP_CELLS = 4_000_000

SPLIT_ROLES = {"test": "test", "val": "validation, used for selection"}


def split_role(split: str) -> str:
    """How a score measured on `split` must be labelled: "test", or "validation, used for
    selection" (the split that chose C / the epoch, so its score is optimistic)."""
    return SPLIT_ROLES.get(split, split)


def wilson_interval(successes: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion `successes / n` (95% by default)."""
    if n <= 0:
        raise DatasetError(f"an interval needs at least one trial. Received: n={n}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)  # exact, not 0.9999999999999999
    return low, high


def _resampled_confusions(y: np.ndarray, pred: np.ndarray, k: int, resamples: int,
                          rng: np.random.Generator) -> np.ndarray:
    """Confusion matrices (resamples, k, k) of `resamples` bootstrap resamples."""
    n = y.size
    pair = y * k + pred  # one code per (true, predicted) cell
    rows = max(1, _BOOTSTRAP_CELLS // n)
    chunks = []
    for start in range(0, resamples, rows):
        count = min(rows, resamples - start)
        drawn = pair[rng.integers(0, n, size=(count, n))]
        offsets = np.arange(count)[:, None] * (k * k)
        chunks.append(np.bincount((drawn + offsets).ravel(), minlength=count * k * k)
                      .reshape(count, k, k))
    return np.concatenate(chunks)


def _balanced_accuracy(confusions: np.ndarray) -> np.ndarray:
    """Per confusion matrix: mean recall over the classes present (as scikit-learn)."""
    support = confusions.sum(axis=2)
    correct = np.diagonal(confusions, axis1=1, axis2=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, correct / np.maximum(support, 1), np.nan)
    return np.nanmean(recall, axis=1)


def _macro_f1(confusions: np.ndarray) -> np.ndarray:
    """Per confusion matrix: F1 averaged over every class (0 where undefined)."""
    correct = np.diagonal(confusions, axis1=1, axis2=2).astype(np.float64)
    predicted = confusions.sum(axis=1)
    actual = confusions.sum(axis=2)
    denominator = predicted + actual
    f1 = np.where(denominator > 0, 2 * correct / np.maximum(denominator, 1), 0.0)
    return f1.mean(axis=1)


def bootstrap_intervals(y: np.ndarray, pred: np.ndarray, k: int, seed: int = 0,
                        resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, list[float]]:
    """95% percentile-bootstrap intervals of balanced accuracy and macro F1 over the
    images (resampled with replacement, seeded)."""
    confusions = _resampled_confusions(y, pred, k, resamples, np.random.default_rng(seed))
    tail = (1 - CONFIDENCE) / 2 * 100
    intervals = {}
    for name, values in (("balanced_accuracy", _balanced_accuracy(confusions)),
                         ("macro_f1", _macro_f1(confusions))):
        low, high = np.percentile(values, [tail, 100 - tail])
        intervals[f"{name}_ci"] = [float(low), float(high)]
    return intervals


def _checked(y_true: Any, proba: Any, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """y as int64 (N,) and proba as float64 (N, K) rows summing to 1, or a DatasetError."""
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
    return y.astype(np.int64), P / P.sum(axis=1, keepdims=True)  # no float32 round-off


def compute_metrics(y_true: Any, proba: Any, classes: list[str], seed: int = 0) -> dict[str, Any]:
    """Classification metrics of ``proba`` (``(N, K)``) against ``y_true`` (``(N,)``).

    Returns a JSON-serialisable dict with ``accuracy``, ``balanced_accuracy``,
    ``macro_f1`` (averaged over all K classes, a class never seen nor predicted
    counting as 0), each with its 95% interval (``accuracy_ci``: Wilson;
    ``balanced_accuracy_ci``, ``macro_f1_ci``: bootstrap seeded by ``seed``) as
    ``[low, high]``, ``per_class`` (``{name: {precision, recall, f1, support}}``),
    ``confusion_matrix`` (rows = true class), ``log_loss``, ``n_samples`` and, when
    K > 5, ``top5_accuracy``. Predictions are ``argmax(proba, axis=1)``.
    """
    from sklearn.metrics import (balanced_accuracy_score, confusion_matrix, f1_score, log_loss,
                                 precision_recall_fscore_support, top_k_accuracy_score)

    names = [str(c) for c in classes]
    y, P = _checked(y_true, proba, names)
    K, labels = len(names), list(range(len(names)))
    pred = np.argmax(P, axis=1)
    with warnings.catch_warnings():
        # balanced_accuracy warns when a predicted class is absent from y_true.
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y, pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0)
    correct = int(np.sum(pred == y))
    metrics: dict[str, Any] = {
        "n_samples": int(y.size),
        "accuracy": correct / y.size,
        "accuracy_ci": list(wilson_interval(correct, int(y.size))),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        **bootstrap_intervals(y, pred, K, seed),
        "log_loss": float(log_loss(y, P, labels=labels)),
        "per_class": {
            name: {"precision": float(precision[k]), "recall": float(recall[k]),
                   "f1": float(f1[k]), "support": int(support[k])}
            for k, name in enumerate(names)
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).astype(int).tolist(),
    }
    if K > 5:
        metrics["top5_accuracy"] = float(top_k_accuracy_score(y, P, k=5, labels=labels))
    return metrics
