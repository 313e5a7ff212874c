"""How long the bootstrap interval of the mean average precision takes
(`probe.evaluate`, multi-label): the vectorised form (per class, one sort and running sums
over all resamples at once) against the plain loop that scores each resample and class
with scikit-learn's `average_precision_score` (sample weights = the resample's counts),
on the same resamples. The default size is Pascal VOC 2007's test split (4,952 images,
20 classes).

Prints one line per figure: `multilabel_intervals <figure> <value>`.

    PYTHONPATH=. python benchmarks/multilabel_intervals.py --n 4952 --classes 20 --resamples 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score

from probe.evaluate import _bootstrap_counts, _bootstrap_map


def loop(Y, P, counts):
    """The reference: one scikit-learn call per resample and class."""
    values = []
    for row in counts:
        per_class = [average_precision_score(Y[:, k], P[:, k], sample_weight=row)
                     for k in range(Y.shape[1]) if (row * Y[:, k]).sum() > 0]
        values.append(np.mean(per_class))
    return np.array(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4952, help="reported images")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--resamples", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    Y = (rng.random((args.n, args.classes)) < 0.08).astype(np.int64)
    P = np.round(np.clip(0.5 * Y + 0.7 * rng.random(Y.shape), 0, 1), 3)  # with ties
    counts = _bootstrap_counts(args.n, args.resamples, np.random.default_rng(0))

    started = time.perf_counter()
    fast = _bootstrap_map(Y, P, None, counts)
    vectorised = time.perf_counter() - started
    started = time.perf_counter()
    slow = loop(Y, P, counts)
    looped = time.perf_counter() - started
    print(f"multilabel_intervals vectorised_s {vectorised:.4f}")
    print(f"multilabel_intervals loop_s {looped:.4f}")
    print(f"multilabel_intervals loop_over_vectorised {looped / vectorised:.1f}")
    print(f"multilabel_intervals max_abs_difference {np.max(np.abs(fast - slow)):.2e}")


if __name__ == "__main__":
    main()
