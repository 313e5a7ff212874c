"""How long the 95% intervals of `probe.evaluate.compute_metrics` take: the vectorised
bootstrap (all resamples' confusion matrices from one bincount) against the plain loop
that scores each resample with scikit-learn, on the same resamples.

Prints one line per figure: `intervals <figure> <value>`.

    PYTHONPATH=. python benchmarks/intervals.py --n 2000 --classes 10 --resamples 1000
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score

from probe.evaluate import bootstrap_intervals


def loop(y, pred, k, seed, resamples):
    """The reference: one scikit-learn call per resample and metric."""
    rows = np.random.default_rng(seed).integers(0, y.size, size=(resamples, y.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        balanced = [balanced_accuracy_score(y[r], pred[r]) for r in rows]
    f1 = [f1_score(y[r], pred[r], labels=list(range(k)), average="macro", zero_division=0)
          for r in rows]
    return {"balanced_accuracy_ci": list(np.percentile(balanced, [2.5, 97.5])),
            "macro_f1_ci": list(np.percentile(f1, [2.5, 97.5]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="reported images")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    y = rng.integers(0, args.classes, args.n)
    pred = np.where(rng.random(args.n) < 0.8, y, rng.integers(0, args.classes, args.n))

    started = time.perf_counter()
    fast = bootstrap_intervals(y, pred, args.classes, seed=0, resamples=args.resamples)
    vectorised = time.perf_counter() - started
    started = time.perf_counter()
    slow = loop(y, pred, args.classes, 0, args.resamples)
    looped = time.perf_counter() - started
    same = all(np.allclose(fast[key], slow[key], atol=1e-12) for key in fast)
    print(f"intervals vectorised_s {vectorised:.4f}")
    print(f"intervals loop_s {looped:.4f}")
    print(f"intervals loop_over_vectorised {looped / vectorised:.1f}")
    print(f"intervals identical {same}")


if __name__ == "__main__":
    main()
