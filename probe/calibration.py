"""Calibration: whether a run's probabilities mean what they say, and temperature scaling.

Expected calibration error (ECE), top-label: every image is put in one of `bins` equal-width
bins [i/bins, (i+1)/bins) by its confidence (its largest probability; the last bin is closed,
so a confidence of exactly 1.0 falls in it); the ECE is the mean over the bins of
|accuracy - mean confidence|, each bin weighted by its share of the images. Equivalently
(what is computed): the sum over the bins of |sum over its images of (right - confidence)|,
divided by the number of images.

Temperature scaling divides the head's logits, here the log-probabilities, by one scalar
T > 0 (T > 1 softens over-confident probabilities, T < 1 sharpens): p_T = softmax(log p / T).
The ranking of the classes, hence every prediction and accuracy, stays the same. T is the one
that minimises the negative log-likelihood of a validation split, searched on log T within
`TEMPERATURE_BOUNDS`; where validation can not choose one (too few images, one class only,
every image predicted right) T stays 1 and `Temperature.note` says why.

Multi-label runs are not temperature-scaled (their per-class thresholds were chosen on the
probabilities as they are); their ECE is over the (image, class) entries, each a binary
prediction at 0.5 (`multilabel_confidence`).

Pure numpy (and scipy for the one-dimensional search).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from probe.errors import DatasetError

__all__ = ["expected_calibration_error", "fit_temperature", "apply_temperature", "Temperature",
           "choose_temperature", "reliability_table", "bin_contributions",
           "multilabel_confidence", "top_label", "BINS", "TEMPERATURE_BOUNDS",
           "MIN_VALIDATION_IMAGES", "SMALLEST"]

BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)
MIN_VALIDATION_IMAGES = 10
# log-probabilities are taken of max(p, this): a probability that rounded to 0 (float32
# underflows near 1e-38) gets the same finite logit in numpy and in an exported model
SMALLEST = 1e-30


def _check(y_true: Any, proba: Any) -> tuple[np.ndarray, np.ndarray]:
    """y as (N,) int64 class indices and proba as (N, K) float64 probabilities."""
    y, P = np.asarray(y_true), np.asarray(proba, dtype=np.float64)
    if P.ndim != 2 or y.ndim != 1 or y.shape[0] != P.shape[0]:
        raise DatasetError(f"calibration needs `y_true` (N,) class indices and `proba` (N, K) "
                           f"probabilities of the same N. Received: y_true.shape={y.shape}, "
                           f"proba.shape={P.shape}")
    if y.size == 0:
        raise DatasetError("calibration needs at least one image. Received: 0 images")
    if not np.all(np.isfinite(P)) or P.min() < 0 or P.max() > 1 + 1e-6:
        raise DatasetError("`proba` must hold probabilities in [0, 1], e.g. the output of "
                           f"`predict_proba`. Received: values from {np.nanmin(P):.4g} to "
                           f"{np.nanmax(P):.4g}")
    if y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= P.shape[1]:
        raise DatasetError(f"`y_true` must hold class indices 0..{P.shape[1] - 1}. Received: "
                           f"values {np.unique(y)[:5].tolist()}")
    return y.astype(np.int64), P


def _bin_of(confidence: np.ndarray, bins: int) -> np.ndarray:
    """The bin [i/bins, (i+1)/bins) of each confidence, the last bin closed at 1.0."""
    # edges as i / bins: a confidence written as 2/15 is the same float as the edge
    edges = np.arange(bins + 1) / bins
    return np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)


def bin_contributions(confidence: Any, correct: Any, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """The bin of each prediction and its (right - confidence): the ECE is
    sum_b |sum of the contributions in b| / N (a bootstrap re-weights them per resample)."""
    c = np.asarray(confidence, dtype=np.float64)
    return _bin_of(c, bins), np.asarray(correct, dtype=np.float64) - c


def _ece(bin_index: np.ndarray, contribution: np.ndarray, bins: int) -> float:
    sums = np.bincount(bin_index, weights=contribution, minlength=bins)
    return float(np.abs(sums).sum() / max(bin_index.size, 1))


def top_label(y_true: Any, proba: Any) -> tuple[np.ndarray, np.ndarray]:
    """Each image's confidence (its largest probability) and whether its argmax is right."""
    y, P = _check(y_true, proba)
    return P.max(axis=1), (np.argmax(P, axis=1) == y)


def multilabel_confidence(y_true: Any, proba: Any, ignore: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-label entries as binary predictions at 0.5: per (image, class) entry not in
    `ignore`, its confidence max(p, 1 - p), whether (p >= 0.5) matches the label, and the
    image it belongs to (for a bootstrap over images)."""
    Y, P = np.asarray(y_true), np.asarray(proba, dtype=np.float64)
    keep = np.ones(Y.shape, dtype=bool) if ignore is None else ~np.asarray(ignore, dtype=bool)
    image = np.broadcast_to(np.arange(Y.shape[0])[:, None], Y.shape)[keep]
    p, y = P[keep], Y[keep]
    return np.maximum(p, 1 - p), (p >= 0.5) == (y == 1), image


def expected_calibration_error(y_true: Any, proba: Any, bins: int = BINS) -> float:
    """Top-label ECE of (N, K) probabilities against (N,) class indices: images binned by
    confidence into `bins` equal-width bins [i/bins, (i+1)/bins) (the last one closed), the
    mean |accuracy - mean confidence| weighted by each bin's share of the images.

    >>> expected_calibration_error([0, 1], [[0.9, 0.1], [0.8, 0.2]])  # 0.1 and 0.8 off
    0.45
    """
    confidence, correct = top_label(y_true, proba)
    return _ece(*bin_contributions(confidence, correct, bins), bins)


def reliability_table(confidence: Any, correct: Any, bins: int = BINS) -> list[dict]:
    """Per non-empty bin: its edges, image count, mean confidence and accuracy (the points
    of a reliability diagram)."""
    c, right = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    index = _bin_of(c, bins)
    rows = []
    for b in range(bins):
        members = index == b
        n = int(members.sum())
        if n:
            rows.append({"low": b / bins, "high": (b + 1) / bins, "count": n,
                         "confidence": float(c[members].mean()),
                         "accuracy": float(right[members].mean())})
    return rows


def _logits(proba: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(proba, dtype=np.float64), SMALLEST))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def apply_temperature(proba: Any, T: float) -> np.ndarray:
    """softmax(log p / T) of (N, K) probabilities; T == 1 returns them unchanged (float64)."""
    P = np.asarray(proba, dtype=np.float64)
    if T == 1:
        return P
    if not (math.isfinite(T) and T > 0):
        raise DatasetError(f"a temperature must be a finite number > 0. Received: T={T!r}")
    return _softmax(_logits(P) / T)


def _nll(logits: np.ndarray, y: np.ndarray, T: float) -> float:
    z = logits / T
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(y.size), y]))


def fit_temperature(y_val: Any, proba_val: Any) -> float:
    """The T in `TEMPERATURE_BOUNDS` minimising the mean negative log-likelihood of
    softmax(log proba_val / T) for the labels `y_val` (a bounded search on log T).
    Use `choose_temperature` for the checks of whether validation can choose one."""
    from scipy.optimize import minimize_scalar

    y, P = _check(y_val, proba_val)
    logits = _logits(P)
    low, high = (math.log(t) for t in TEMPERATURE_BOUNDS)
    found = minimize_scalar(lambda u: _nll(logits, y, math.exp(u)), bounds=(low, high),
                            method="bounded", options={"xatol": 1e-4})
    T = math.exp(float(found.x))
    # the bounded search never evaluates T = 1 itself: keep 1 when it is no worse
    return 1.0 if _nll(logits, y, 1.0) <= _nll(logits, y, T) else T


@dataclass(frozen=True)
class Temperature:
    """The temperature a run applies (1.0: none), where validation could not choose one,
    why (`note`), and which predictions it was fitted on (`source`)."""

    value: float = 1.0
    note: str | None = None
    source: str | None = None

    def apply(self, proba: Any) -> np.ndarray:
        return apply_temperature(proba, self.value)

    def record(self) -> dict:
        """What metrics.json records: `temperature`, `temperature_note` and
        `temperature_from` (the last two where there is something to say)."""
        return {"temperature": self.value,
                **({"temperature_note": self.note} if self.note else {}),
                **({"temperature_from": self.source} if self.source else {})}


def choose_temperature(y_val: Any, proba_val: Any | None, where: str = "validation") -> Temperature:
    """The temperature fitted on validation (`fit_temperature`), or T = 1 with the reason
    when there is no validation split, it has fewer than `MIN_VALIDATION_IMAGES` images or
    one class only, or every image of it is predicted right (then the likelihood only
    grows as T falls towards 0, so validation can not choose a finite T)."""
    if proba_val is None or y_val is None:
        return Temperature(note=f"no {where} split: the probabilities are the head's own (T = 1)")
    y, P = _check(y_val, proba_val)
    if y.size < MIN_VALIDATION_IMAGES:
        return Temperature(note=f"{y.size} {where} images, fewer than {MIN_VALIDATION_IMAGES}: "
                                "too few to fit a temperature (T = 1)")
    if np.unique(y).size < 2:
        return Temperature(note=f"the {where} images are all of one class: no temperature is "
                                "fitted (T = 1)")
    if np.all(np.argmax(P, axis=1) == y):
        return Temperature(note=f"every {where} image is predicted right, so the likelihood "
                                "keeps growing as T falls and validation can not choose a "
                                "temperature (T = 1)")
    T = fit_temperature(y, P)
    low, high = TEMPERATURE_BOUNDS
    note = None
    if math.isclose(T, high, rel_tol=1e-3):
        note = (f"the temperature is at the top of its range ({high:g}): on {where} the "
                "head's confidence says next to nothing about being right (as with random "
                "labels), so its probabilities are flattened towards equal")
    elif math.isclose(T, low, rel_tol=1e-3):
        note = (f"the temperature is at the bottom of its range ({low:g}): on {where} the "
                "head is right far more often than its probabilities say")
    return Temperature(round(T, 6), note)
