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

Each resample is scored exactly as the point estimate is: balanced accuracy over the classes
present in the resample's truth, macro F1 over the classes present in its truth or its
predictions (scikit-learn's `f1_score(average="macro")` without `labels`). A class that a
resample happens to miss is left out, not scored 0: scoring it 0 put the interval of a
perfect 22-image split at [0.8, 1.0]. And an interval always contains its point estimate:
where the percentiles miss it (a skewed bootstrap on a few images), the interval is widened
to it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from probe import calibration
from probe.errors import DatasetError

__all__ = ["compute_metrics", "wilson_interval", "bootstrap_intervals", "split_role",
           "SPLIT_ROLES", "CONFIDENCE", "BOOTSTRAP_RESAMPLES", "compute_multilabel_metrics",
           "average_precisions", "mean_average_precision", "weighted_average_precision",
           "best_f1_thresholds", "percentile_interval", "calibration_error",
           "multilabel_calibration_error"]

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
    """Per confusion matrix: F1 averaged over the classes present as truth or prediction
    (as scikit-learn's macro F1 without `labels`); a class neither seen nor predicted has
    no F1 and is left out. A predicted class that never occurs scores 0."""
    correct = np.diagonal(confusions, axis1=1, axis2=2).astype(np.float64)
    predicted = confusions.sum(axis=1)
    actual = confusions.sum(axis=2)
    denominator = predicted + actual
    present = denominator > 0  # every matrix has at least one image, so one class
    f1 = np.where(present, 2 * correct / np.maximum(denominator, 1), 0.0)
    return f1.sum(axis=1) / present.sum(axis=1)


def percentile_interval(values: np.ndarray, point: float) -> list[float]:
    """The 95% percentile interval of bootstrap `values` (NaN: a resample where the score
    is undefined, left out), widened to contain `point`; [point, point] when no resample
    has a score."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not values.size:
        return [float(point), float(point)]
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(min(low, point)), float(max(high, point))]


def bootstrap_intervals(y: np.ndarray, pred: np.ndarray, k: int, seed: int = 0,
                        resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, list[float]]:
    """95% percentile-bootstrap intervals of balanced accuracy and macro F1 over the
    images (resampled with replacement, seeded), each containing its score on all the
    images."""
    confusions = _resampled_confusions(y, pred, k, resamples, np.random.default_rng(seed))
    whole = np.bincount(y * k + pred, minlength=k * k).reshape(1, k, k)
    intervals = {}
    for name, score in (("balanced_accuracy", _balanced_accuracy), ("macro_f1", _macro_f1)):
        intervals[f"{name}_ci"] = percentile_interval(score(confusions), float(score(whole)[0]))
    return intervals


def _resampled_ece(bin_index: np.ndarray, contribution: np.ndarray, image: np.ndarray,
                   n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The ECE of each of `resamples` bootstrap resamples of the `n` images (drawn as
    `_resampled_confusions` draws them, so the same seed gives the same resamples):
    the contributions of each image's predictions (`calibration.bin_contributions`; an
    image has one, or one per class when multi-label) summed per bin, weighted by how
    often the image was drawn."""
    bins = calibration.BINS
    per_image = np.zeros((n, bins))
    np.add.at(per_image, (image, bin_index), contribution)
    predictions = np.bincount(image, minlength=n).astype(np.float64)
    rows = max(1, _BOOTSTRAP_CELLS // n)
    values = []
    for start in range(0, resamples, rows):
        count = min(rows, resamples - start)
        drawn = rng.integers(0, n, size=(count, n))
        weights = np.bincount((drawn + np.arange(count)[:, None] * n).ravel(),
                              minlength=count * n).reshape(count, n).astype(np.float64)
        sums = weights @ per_image
        values.append(np.abs(sums).sum(axis=1) / np.maximum(weights @ predictions, 1))
    return np.concatenate(values)


def _ece_with_interval(name: str, confidence: np.ndarray, correct: np.ndarray,
                       image: np.ndarray, n: int, seed: int, resamples: int) -> dict[str, Any]:
    """`name` (the ECE of the predictions) and `name_ci` (its bootstrap interval over
    the `n` images)."""
    if confidence.size == 0:
        return {name: None, f"{name}_ci": None}
    bin_index, contribution = calibration.bin_contributions(confidence, correct)
    point = float(np.abs(np.bincount(bin_index, weights=contribution,
                                     minlength=calibration.BINS)).sum() / confidence.size)
    values = _resampled_ece(bin_index, contribution, image, n, resamples,
                            np.random.default_rng(seed))
    return {name: point, f"{name}_ci": percentile_interval(values, point)}


def calibration_error(y_true: Any, proba: Any, seed: int = 0,
                      resamples: int = BOOTSTRAP_RESAMPLES,
                      name: str = "expected_calibration_error") -> dict[str, Any]:
    """Top-label expected calibration error (`calibration.expected_calibration_error`,
    15 bins) of single-label probabilities, as `name`, with its 95% bootstrap interval
    over the images (`name_ci`, seeded by `seed`)."""
    confidence, correct = calibration.top_label(y_true, proba)
    return _ece_with_interval(name, confidence, correct, np.arange(confidence.size),
                              confidence.size, seed, resamples)


def multilabel_calibration_error(y_true: Any, proba: Any, ignore: Any = None, seed: int = 0,
                                 resamples: int = BOOTSTRAP_RESAMPLES,
                                 name: str = "expected_calibration_error") -> dict[str, Any]:
    """Multi-label: the ECE over every (image, class) entry not in `ignore`, each a
    binary prediction at 0.5 with confidence max(p, 1 - p)
    (`calibration.multilabel_confidence`); its interval resamples images."""
    confidence, correct, image = calibration.multilabel_confidence(y_true, proba, ignore)
    return _ece_with_interval(name, confidence, correct, image, int(np.shape(y_true)[0]),
                              seed, resamples)


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
    ``macro_f1`` (averaged over the classes present as truth or prediction, as
    scikit-learn's default: a class neither seen nor predicted has no F1 and is left
    out), each with its 95% interval (``accuracy_ci``: Wilson;
    ``balanced_accuracy_ci``, ``macro_f1_ci``: bootstrap seeded by ``seed``) as
    ``[low, high]``, ``per_class`` (``{name: {precision, recall, f1, support}}``),
    ``confusion_matrix`` (rows = true class), ``log_loss``,
    ``expected_calibration_error`` (top-label, 15 bins) with its bootstrap interval
    ``expected_calibration_error_ci``, ``n_samples`` and, when K > 5,
    ``top5_accuracy``. Predictions are ``argmax(proba, axis=1)``.
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
        # no `labels`: the classes present in y or pred, as each bootstrap resample
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        **bootstrap_intervals(y, pred, K, seed),
        "log_loss": float(log_loss(y, P, labels=labels)),
        **calibration_error(y, P, seed),
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


# --------------------------------------------------------------------------- #
# Multi-label: several classes per image, an (N, K) 0/1 target matrix
# --------------------------------------------------------------------------- #

# resampled images held at once by the average-precision bootstrap (per class)
_AP_BOOTSTRAP_CELLS = 2_000_000


def _tie_group_ends(scores: np.ndarray) -> np.ndarray:
    """For scores sorted in decreasing order, the index of the last element of each
    element's group of equal scores (a threshold includes all of its ties)."""
    n = scores.size
    is_end = np.ones(n, dtype=bool)
    is_end[:-1] = scores[1:] != scores[:-1]
    ends = np.flatnonzero(is_end)
    return ends[np.searchsorted(ends, np.arange(n))]


def weighted_average_precision(y: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Average precision of one class for each row of ``counts`` ((R, n) image
    multiplicities: one row of ones is the plain score; bootstrap resamples otherwise).

    scikit-learn's definition (``average_precision_score``): the sum over thresholds of
    the precision times the gain in recall, a threshold including all tied scores. NaN
    where a row has no positive image."""
    order = np.argsort(-scores, kind="stable")
    return _sorted_average_precision(y[order], _tie_group_ends(scores[order]),
                                     np.asarray(counts)[:, order])


def _sorted_average_precision(y: np.ndarray, ends: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`weighted_average_precision` of entries already sorted by decreasing score
    (``ends``: `_tie_group_ends` of the sorted scores)."""
    positive = y.astype(bool)
    counts = counts.astype(np.int64 if counts.sum() >= 2**31 else np.int32, copy=False)
    hits = counts[:, positive]
    # running sums in integers (exact); the true positives only change at positives
    predicted = np.cumsum(counts, axis=1)
    true_positives = np.cumsum(hits, axis=1)
    at_ends = ends[positive]  # the precision a positive counts with: at the end of its ties
    # the true positives at a tie group's end: those of the group's last positive
    last_positive = np.searchsorted(np.flatnonzero(positive), at_ends, side="right") - 1
    precision = true_positives[:, last_positive] / np.maximum(predicted[:, at_ends], 1).astype(np.float64)
    positives = (true_positives[:, -1] if hits.shape[1] else np.zeros(counts.shape[0])).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives > 0, (hits * precision).sum(axis=1) / positives, np.nan)


def _class_entries(Y: np.ndarray, P: np.ndarray, ignore: np.ndarray | None, k: int):
    """The rows that count for class ``k`` (VOC: difficult entries are left out), its
    targets and its scores."""
    rows = np.arange(Y.shape[0]) if ignore is None else np.flatnonzero(~ignore[:, k])
    return rows, Y[rows, k], P[rows, k]


def average_precisions(y_true: Any, proba: Any, ignore: Any = None) -> np.ndarray:
    """Per-class average precision (threshold-free) of an (N, K) score matrix against an
    (N, K) 0/1 target matrix, leaving out the entries of ``ignore`` ((N, K) bool) class
    by class; NaN for a class without a positive entry."""
    Y, P = np.asarray(y_true), np.asarray(proba, dtype=np.float64)
    mask = None if ignore is None else np.asarray(ignore, dtype=bool)
    values = []
    for k in range(Y.shape[1]):
        _, y, s = _class_entries(Y, P, mask, k)
        values.append(weighted_average_precision(y, s, np.ones((1, y.size)))[0])
    return np.array(values, dtype=np.float64)


def mean_average_precision(y_true: Any, proba: Any, ignore: Any = None) -> float:
    """The mean of the defined per-class average precisions (0.0 when none is defined)."""
    values = average_precisions(y_true, proba, ignore)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else 0.0


def _bootstrap_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) multiplicities of the images in each resample."""
    drawn = rng.integers(0, n, size=(resamples, n))
    offsets = np.arange(resamples)[:, None] * n
    counts = np.bincount((drawn + offsets).ravel(), minlength=resamples * n).reshape(resamples, n)
    return counts.astype(np.int32)  # at most n per image


def _bootstrap_map(Y: np.ndarray, P: np.ndarray, ignore: np.ndarray | None,
                   counts: np.ndarray) -> np.ndarray:
    """Mean average precision of every resample (classes without a positive in a
    resample are left out of its mean, as at the point estimate)."""
    per_class = np.full((counts.shape[0], Y.shape[1]), np.nan)
    for k in range(Y.shape[1]):
        rows, y, s = _class_entries(Y, P, ignore, k)
        order = np.argsort(-s, kind="stable")
        columns, y, ends = rows[order], y[order], _tie_group_ends(s[order])
        step = max(1, _AP_BOOTSTRAP_CELLS // max(1, rows.size))
        for start in range(0, counts.shape[0], step):
            per_class[start:start + step, k] = _sorted_average_precision(
                y, ends, counts[start:start + step, columns])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no positive at all
        return np.nanmean(per_class, axis=1)  # NaN there: undefined, left out of the interval


def _f1_scores(true_positives, predicted, actual,
               undefined: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Micro and macro F1 from per-class counts (..., K). A class neither seen nor
    predicted has no F1 and is left out of the macro mean, as in the single-label metrics
    (so a resample that misses a class is not scored down for it); `undefined` where no
    class is seen nor predicted at all (the point estimate: 0.0; a bootstrap resample:
    NaN, left out of the interval)."""
    tp, pp, ap = (np.asarray(a, dtype=np.float64) for a in (true_positives, predicted, actual))
    denominator = pp + ap
    present = denominator > 0
    per_class = np.where(present, 2 * tp / np.maximum(denominator, 1e-300), 0.0)
    total = denominator.sum(axis=-1)
    counted = present.sum(axis=-1)
    micro = np.where(total > 0, 2 * tp.sum(axis=-1) / np.maximum(total, 1e-300), undefined)
    macro = np.where(counted > 0, per_class.sum(axis=-1) / np.maximum(counted, 1), undefined)
    return micro, macro


def _check_multilabel(y_true: Any, proba: Any, names: list[str], thresholds: Any,
                      ignore: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Y (N, K) int64 0/1, P (N, K) float64 in [0, 1], thresholds (K,), ignore (N, K) bool
    or None; a DatasetError naming what is wrong otherwise."""
    K = len(names)
    Y, P = np.asarray(y_true), np.asarray(proba, dtype=np.float64)
    if P.ndim != 2 or P.shape[1] != K or Y.shape != P.shape:
        raise DatasetError(
            f"multi-label metrics need `y_true` and `proba` of the same shape (N, {K}) for the "
            f"{K} classes given. Received: y_true.shape={Y.shape}, proba.shape={P.shape}")
    if Y.shape[0] == 0:
        raise DatasetError("metrics need at least one sample. Received: y_true with 0 samples")
    if Y.dtype.kind not in "iub" or not np.isin(Y, (0, 1)).all():
        raise DatasetError(f"`y_true` must be a 0/1 matrix (one column per class). Received: "
                           f"values {np.unique(Y)[:5].tolist()}")
    if not np.all(np.isfinite(P)) or P.min() < 0 or P.max() > 1:
        raise DatasetError("`proba` must hold probabilities in [0, 1], e.g. the output of "
                           f"`predict_proba`. Received: values from {np.nanmin(P):.4g} to {np.nanmax(P):.4g}")
    T = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (K,))
    mask = None
    if ignore is not None:
        mask = np.asarray(ignore, dtype=bool)
        if mask.shape != Y.shape:
            raise DatasetError(f"`ignore` must have the shape of `y_true`. Received: "
                               f"ignore.shape={mask.shape}, y_true.shape={Y.shape}")
    return Y.astype(np.int64), P, T, mask


def _multilabel_intervals(Y, P, pred, mask, seed: int, resamples: int,
                          points: dict[str, float]) -> dict[str, list[float]]:
    """95% percentile-bootstrap intervals (images resampled, seeded) of mean average
    precision and micro / macro F1, each widened to contain its score in `points`."""
    counts = _bootstrap_counts(Y.shape[0], resamples, np.random.default_rng(seed))
    keep = np.ones_like(Y, dtype=bool) if mask is None else ~mask
    tp = counts @ ((pred == 1) & (Y == 1) & keep)
    predicted = counts @ ((pred == 1) & keep)
    actual = counts @ ((Y == 1) & keep)
    micro, macro = _f1_scores(tp, predicted, actual, undefined=np.nan)
    intervals = {}
    for name, values in (("mean_average_precision", _bootstrap_map(Y, P, mask, counts)),
                         ("micro_f1", micro), ("macro_f1", macro)):
        intervals[f"{name}_ci"] = percentile_interval(values, points[name])
    return intervals


def compute_multilabel_metrics(y_true: Any, proba: Any, classes: list[str], thresholds: Any,
                               ignore: Any = None, seed: int = 0,
                               resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Multi-label metrics of ``proba`` ((N, K) independent probabilities) against
    ``y_true`` ((N, K) 0/1), leaving out the entries of ``ignore`` ((N, K) bool, VOC's
    "difficult") class by class.

    Threshold-free: ``mean_average_precision`` and per class ``average_precision`` (None
    for a class without a positive image; left out of the mean). At ``thresholds`` (one
    per class, predicted = proba >= threshold): ``micro_f1``, ``macro_f1`` and
    ``exact_match_accuracy`` (every non-ignored entry of the image right; macro F1 over the
    classes seen or predicted, as in `compute_metrics`). Intervals:
    ``exact_match_accuracy_ci`` Wilson, the others a bootstrap over the images seeded by
    ``seed``. Also ``per_class`` (precision, recall, f1, support, average_precision,
    threshold), ``log_loss`` (mean binary cross-entropy), ``expected_calibration_error``
    (over the non-ignored entries, each a binary prediction at 0.5) with its interval, and
    ``n_samples``."""
    names = [str(c) for c in classes]
    Y, P, T, mask = _check_multilabel(y_true, proba, names, thresholds, ignore)
    pred = (P >= T).astype(np.int64)
    keep = np.ones_like(Y, dtype=bool) if mask is None else ~mask
    tp = ((pred == 1) & (Y == 1) & keep).sum(axis=0)
    predicted, actual = ((pred == 1) & keep).sum(axis=0), ((Y == 1) & keep).sum(axis=0)
    micro, macro = _f1_scores(tp, predicted, actual)
    exact = int(np.sum(np.all((pred == Y) | ~keep, axis=1)))
    ap = average_precisions(Y, P, mask)
    mean_ap = float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else 0.0
    clipped = np.clip(P, 1e-15, 1 - 1e-15)
    bce = -(Y * np.log(clipped) + (1 - Y) * np.log(1 - clipped))
    per_class = {}
    for k, name in enumerate(names):
        precision = tp[k] / predicted[k] if predicted[k] else 0.0
        recall = tp[k] / actual[k] if actual[k] else 0.0
        f1 = 2 * tp[k] / (predicted[k] + actual[k]) if predicted[k] + actual[k] else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(actual[k]), "ignored": int((~keep[:, k]).sum()),
                           "average_precision": None if np.isnan(ap[k]) else float(ap[k]),
                           "threshold": float(T[k])}
    return {
        "multilabel": True,
        "n_samples": int(Y.shape[0]),
        "mean_average_precision": mean_ap,
        "average_precision": {name: per_class[name]["average_precision"] for name in names},
        "micro_f1": float(micro),
        "macro_f1": float(macro),
        "exact_match_accuracy": exact / Y.shape[0],
        "exact_match_accuracy_ci": list(wilson_interval(exact, int(Y.shape[0]))),
        **_multilabel_intervals(Y, P, pred, mask, seed, resamples,
                                {"mean_average_precision": mean_ap, "micro_f1": float(micro),
                                 "macro_f1": float(macro)}),
        "log_loss": float(bce[keep].mean()) if keep.any() else 0.0,
        **multilabel_calibration_error(Y, P, mask, seed, resamples),
        "thresholds": {name: float(T[k]) for k, name in enumerate(names)},
        "per_class": per_class,
    }


def best_f1_thresholds(y_true: Any, proba: Any, ignore: Any = None,
                       default: float = 0.5) -> np.ndarray:
    """One decision threshold per class: the one with the best F1 on (y_true, proba), the
    midpoint between the lowest score predicted positive and the next score (so that
    ``proba >= threshold`` reproduces the cut); ``default`` for a class without a positive."""
    Y, P = np.asarray(y_true), np.asarray(proba, dtype=np.float64)
    mask = None if ignore is None else np.asarray(ignore, dtype=bool)
    thresholds = np.full(Y.shape[1], float(default))
    for k in range(Y.shape[1]):
        _, y, s = _class_entries(Y, P, mask, k)
        if not y.any():
            continue
        order = np.argsort(-s, kind="stable")
        y, s = y[order], s[order]
        ends = np.unique(_tie_group_ends(s))  # cut after a whole group of ties
        true_positives = np.cumsum(y)[ends]
        f1 = 2 * true_positives / (ends + 1 + y.sum())
        best = int(ends[np.argmax(f1)])  # first best: the highest threshold among equals
        below = s[best + 1] if best + 1 < s.size else 0.0
        thresholds[k] = float((s[best] + below) / 2) if s[best] > below else float(s[best])
    return thresholds
