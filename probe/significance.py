"""Paired significance tests between two sets of predictions on the same images.

Two rows of a comparison scored on the same images are paired data: most images are right
(or wrong) for both, and only the images where they disagree carry evidence about which is
better. A test on those images is far more powerful than asking whether two 95% intervals
overlap (two intervals can overlap although one model is right on every image the other gets
wrong), and with several rows compared to the best the chance of a false "better" grows, so
the p-values are corrected for the number of comparisons (Holm).

- `mcnemar_exact(b, c)`: accuracy. `b`: images only the first gets right, `c`: images only
  the second gets right; under "equally accurate" each discordant image is a fair coin.
- `paired_bootstrap_p`: balanced accuracy, macro F1 and mean average precision, scores of
  the whole set that do not split into per-image terms. Both rows are scored on the very
  same resampled images.
- `holm(p_values)`: Holm's step-down adjustment (family-wise error rate).

Pure numpy (the scores of a resample come from `probe.evaluate`, as the intervals do).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from . import evaluate
from .errors import ProbeError

__all__ = ["mcnemar_exact", "holm", "paired_bootstrap_p", "pairwise_bootstrap_p",
           "pairwise_mcnemar", "format_p", "explain", "BOOTSTRAP_METRICS", "SIGNIFICANCE"]

SIGNIFICANCE = 0.05  # below it, a difference is called significant
# resampled images held at once (rows of the (resamples x images) count matrix)
_CELLS = 4_000_000


def mcnemar_exact(b: int, c: int) -> float:
    """The two-sided exact McNemar test of `b` against `c` discordant images: p =
    min(1, 2 * P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2); 1.0 when b + c = 0."""
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ProbeError(f"expected counts of discordant images >= 0. Received: b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    if n <= 1000:  # exact in integers, then one division (no underflow of 0.5**n)
        term = tail = 1
        for i in range(k):
            term = term * (n - i) // (i + 1)  # C(n, i + 1), exactly
            tail += term
        return min(1.0, 2 * tail / 2**n)
    # many discordant images: the same sum in logarithms (relative error ~1e-12)
    steps = np.log((n - np.arange(k)) / (np.arange(k) + 1.0))
    logs = np.concatenate([[0.0], np.cumsum(steps)])
    top = logs.max()
    log_tail = top + math.log(np.exp(logs - top).sum()) - n * math.log(2)
    return min(1.0, 2 * math.exp(log_tail))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the given order: sorted ascending, the i-th
    smallest (i from 0) is multiplied by (m - i), made non-decreasing along the order, and
    capped at 1. Rejecting where the adjusted value is below alpha keeps the chance of any
    false rejection among the m tests at most alpha."""
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    if p.size == 0:
        return p
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ProbeError(f"expected p-values in [0, 1]. Received: {p.tolist()}")
    order = np.argsort(p, kind="stable")
    scaled = (p.size - np.arange(p.size)) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


# --- the paired bootstrap -------------------------------------------------------------------


def _confusions(truth: np.ndarray, predicted: np.ndarray, k: int,
                counts: np.ndarray) -> np.ndarray:
    """(R, k, k) confusion matrices of the images weighted by each row of `counts`."""
    codes = truth * k + predicted
    out = np.zeros((counts.shape[0], k * k), dtype=np.int64)
    for code in np.unique(codes):
        out[:, code] = counts[:, codes == code].sum(axis=1)
    return out.reshape(-1, k, k)


def _single_label(score: Callable[[np.ndarray], np.ndarray]):
    def scorer(truth, predicted, ignore) -> Callable[[np.ndarray], np.ndarray]:
        truth = np.asarray(truth, dtype=np.int64)
        predicted = np.asarray(predicted, dtype=np.int64)
        k = int(max(truth.max(), predicted.max())) + 1
        return lambda counts: score(_confusions(truth, predicted, k, counts))
    return scorer


def _map_scorer(truth, scores, ignore) -> Callable[[np.ndarray], np.ndarray]:
    truth = np.asarray(truth, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    mask = None if ignore is None else np.asarray(ignore, dtype=bool)
    return lambda counts: evaluate._bootstrap_map(truth, scores, mask, counts)


# metric -> scorer(truth, one row's predictions, ignore) -> (counts (R, N) -> scores (R,))
BOOTSTRAP_METRICS = {
    "balanced_accuracy": _single_label(evaluate._balanced_accuracy),
    "macro_f1": _single_label(evaluate._macro_f1),
    "mean_average_precision": _map_scorer,
}


def paired_bootstrap_p(metric: str, truth, first, second, *, ignore=None,
                       resamples: int = evaluate.BOOTSTRAP_RESAMPLES, seed: int = 0) -> float:
    """Two-sided paired-bootstrap p-value of the difference in `metric` between two rows
    scored on the same images.

    `metric`: "balanced_accuracy" or "macro_f1" (`truth`, `first`, `second`: (N,) class
    indices, the true and the two rows' predicted classes) or "mean_average_precision"
    (`truth`: (N, K) 0/1, `first`, `second`: (N, K) scores; `ignore`: (N, K) entries left
    out, VOC's "difficult").

    Definition: d = score(first) - score(second) on all the images. B resamples of the
    images with replacement (seeded by `seed`) are drawn once and BOTH rows are scored on
    each, giving d*_1..d*_B (resamples where a score is undefined are left out). A "flip" is
    a resample whose difference does not have the sign of d (d*_b <= 0 when d > 0, d*_b >= 0
    when d < 0: ties count against the difference). p = min(1, 2 * (1 + flips) / (1 + B)),
    and p = 1 when d = 0. The +1 counts the observed sample as a resample, so p is never
    0 and at least 2 / (B + 1): conservative, as a p-value from a finite bootstrap must be.
    """
    return float(pairwise_bootstrap_p(metric, truth, [first, second], ignore=ignore,
                                      resamples=resamples, seed=seed)[0, 1])


def pairwise_bootstrap_p(metric: str, truth, rows: list, *, ignore=None,
                         resamples: int = evaluate.BOOTSTRAP_RESAMPLES,
                         seed: int = 0) -> np.ndarray:
    """(R, R) p-values of `paired_bootstrap_p` between every two of the R `rows` (each
    row's predictions as there), all scored on the same resamples (1 on the diagonal)."""
    if metric not in BOOTSTRAP_METRICS:
        raise ProbeError(f"expected a metric of the paired bootstrap: "
                         f"{', '.join(BOOTSTRAP_METRICS)}. Received: metric={metric!r}")
    truth = np.asarray(truth)
    n = truth.shape[0]
    if n == 0 or any(np.shape(row)[0] != n for row in rows):
        raise ProbeError("expected the truth and every row's predictions on the same images "
                         f"(at least one). Received: {n} labels and "
                         f"{[np.shape(row)[0] for row in rows]} predictions")
    scorers = [BOOTSTRAP_METRICS[metric](truth, row, ignore) for row in rows]
    whole = np.array([score(np.ones((1, n), dtype=np.int32))[0] for score in scorers])
    sign = np.sign(whole[:, None] - whole[None, :])  # of each observed difference
    rng = np.random.default_rng(seed)
    flips = np.zeros(sign.shape)
    drawn = np.zeros(sign.shape)
    step = max(1, _CELLS // n)
    for start in range(0, resamples, step):
        counts = _resample_counts(n, min(step, resamples - start), rng)
        scores = np.array([score(counts) for score in scorers])  # (R, resamples)
        difference = scores[:, None, :] - scores[None, :, :]
        defined = ~np.isnan(difference)
        flips += np.sum(defined & (sign[:, :, None] * np.nan_to_num(difference) <= 0), axis=2)
        drawn += defined.sum(axis=2)
    p = np.minimum(1.0, 2 * (1 + flips) / (1 + drawn))
    p[(sign == 0) | np.isnan(sign)] = 1.0  # no observed difference: no evidence
    return p


def pairwise_mcnemar(correct) -> np.ndarray:
    """(R, R) `mcnemar_exact` p-values between every two of R rows, from `correct`, an
    (R, N) bool matrix: which of the same N images each row gets right."""
    right = np.asarray(correct, dtype=np.int64)
    only = right @ (1 - right).T  # [i, j]: images i gets right and j wrong
    return np.array([[mcnemar_exact(only[i, j], only[j, i]) for j in range(len(right))]
                     for i in range(len(right))])


def _resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) multiplicities of the images in each bootstrap resample."""
    drawn = rng.integers(0, n, size=(resamples, n))
    offsets = np.arange(resamples)[:, None] * n
    return np.bincount((drawn + offsets).ravel(),
                       minlength=resamples * n).reshape(resamples, n).astype(np.int32)


def format_p(value) -> str:
    """A p-value as text: 3 decimals, "<0.001" below that ("-" for none)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    value = float(value)
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def explain(score: str) -> str:
    """What a comparison's `p_vs_best` and `tied` mean when rows are ranked by `score`."""
    test = ("the exact McNemar test on the images that exactly one of the two gets right"
            if score == "accuracy" else
            "a paired bootstrap (both rows scored on the same resampled images)")
    return (f"`p_vs_best`: each row against the best on the same images, {test}, "
            "Holm-adjusted over every pair of rows (the best is chosen on these same "
            "images). `tied`: yes where p >= 0.05 (no significant "
            "difference from the best), no where p < 0.05; not comparable: scored on other "
            "images (or failed). A paired test sees what overlapping intervals can not: two "
            "rows scored on the same images differ only where their predictions differ.")
