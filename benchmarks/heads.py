"""Head fitting speed: the logistic head's C sweep against one fit, the fast sweep's choice
against the full grid's, the k-NN head's fit time, and the label-efficiency curve.

Feature sets (no images, no backbone: the heads only see features):

* digits: scikit-learn's 8x8 handwritten digits through a fixed random ReLU layer to 2,048
  dimensions (non-negative, correlated, like pooled CNN features), 420 train, 180 val and
  the rest test;
* blobs: 10 classes of 2,000 noisy low-rank 2,048-dimensional features (70/15/15).

Every figure is printed on its own line, `<scope> <figure> <value>`; times are the best of
`--repeat` runs, and each ratio is measured in the same run as its baseline:

* `sweep_over_single_fit`: the default (fast) sweep plus the refit on train + val, over one
  fit at the chosen C on train + val (issue goal: at most 3);
* `full_sweep_over_single_fit`: the same for the full 12-value grid;
* `val_accuracy_fast` / `val_accuracy_full_best` / `val_accuracy_gap_points`: validation
  accuracy of the fast sweep's C against the best of the full grid (goal: within 0.5 point);
* `knn_fit_s`, `logreg_fit_over_knn_fit`: the k-NN head's fit (selection of k and T on
  val included) and the logistic head's fit time over it;
* `knn_fit_10000x2048_s`: a k-NN fit on 10,000 x 2,048 features with 1,500 validation rows,
  over one 1,500 x 10,000 similarity product (fit and product alternated, best of each;
  the load average printed before and after), and the same ratio in CPU seconds with BLAS
  on one thread (insensitive to other jobs on the machine);
* `curve_s`: `probe.curve`'s work (6 shot counts x 5 repeats x logreg, knn, dense) on a
  10-class set of 2,000 images: wall-clock and CPU seconds (every thread), the threads
  used, the load average around it and each head's mean accuracy with every image.

    PYTHONPATH=. python benchmarks/heads.py
    PYTHONPATH=. python benchmarks/heads.py --quick
    PYTHONPATH=. python benchmarks/heads.py --only curve --repeat 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from probe.features.cache import Split  # noqa: E402
from probe.curve import curve_records  # noqa: E402
from probe.heads import KNNHead, LogisticHead  # noqa: E402


def digits(dim: int = 2048, seed: int = 0) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(y.size)
    X, y = X[order] / 16.0, y[order]
    projection = rng.normal(size=(X.shape[1], dim)) / np.sqrt(X.shape[1])
    F = np.maximum(X @ projection + rng.normal(0, 0.1, dim), 0).astype(np.float32)
    return F[:420], y[:420], F[420:600], y[420:600], F[600:], y[600:]


def blobs(n: int = 2000, dim: int = 2048, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(64, dim))
    centres = rng.normal(size=(classes, 64)) * 0.6
    y = np.arange(n) % classes
    F = ((centres[y] + rng.normal(size=(n, 64))) @ basis + rng.normal(size=(n, dim)) * 2).astype(np.float32)
    order = rng.permutation(n)
    F, y = F[order], y[order]
    a, b = int(0.7 * n), int(0.85 * n)
    return F[:a], y[:a], F[a:b], y[a:b], F[b:], y[b:]


def best_time(function, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return min(times), result


def logistic_figures(scope: str, data: tuple[np.ndarray, ...], repeat: int) -> None:
    Xtr, ytr, Xv, yv, _, _ = data
    fast_s, fast = best_time(lambda: LogisticHead().fit(Xtr, ytr, X_val=Xv, y_val=yv), repeat)
    full_s, full = best_time(lambda: LogisticHead(sweep="full").fit(Xtr, ytr, X_val=Xv, y_val=yv), repeat)
    single_s, _ = best_time(lambda: LogisticHead(C=fast.C_).fit(Xtr, ytr, X_val=Xv, y_val=yv), repeat)
    knn_s, _ = best_time(lambda: KNNHead().fit(Xtr, ytr, X_val=Xv, y_val=yv), repeat)
    by_c = {r["C"]: r["val_accuracy"] for r in full.sweep_}
    best = max(by_c.values())
    print(f"{scope} features {Xtr.shape[0]}x{Xtr.shape[1]}")
    print(f"{scope} chosen_C_fast {fast.C_:g}")
    print(f"{scope} fits_fast {len(fast.sweep_)}")
    print(f"{scope} single_fit_s {single_s:.3f}")
    print(f"{scope} sweep_fast_s {fast_s:.3f}")
    print(f"{scope} sweep_full_s {full_s:.3f}")
    print(f"{scope} sweep_over_single_fit {fast_s / single_s:.2f}")
    print(f"{scope} full_sweep_over_single_fit {full_s / single_s:.2f}")
    print(f"{scope} val_accuracy_fast {by_c[fast.C_]:.4f}")
    print(f"{scope} val_accuracy_full_best {best:.4f}")
    print(f"{scope} val_accuracy_gap_points {100 * (best - by_c[fast.C_]):.2f}")
    print(f"{scope} knn_fit_s {knn_s:.3f}")
    print(f"{scope} logreg_fit_over_knn_fit {fast_s / knn_s:.1f}")


def knn_large(repeat: int, n: int = 10000) -> None:
    rng = np.random.default_rng(1)
    X, y = rng.random((n, 2048), dtype=np.float32), rng.integers(0, 10, n)
    Xv, yv = rng.random((1500, 2048), dtype=np.float32), np.arange(1500) % 10
    print(f"knn load_average_1min_before {os.getloadavg()[0]:.2f}")
    fit_times, product_times = [], []
    for _ in range(repeat):  # alternated, so that both see the same load
        fit_times.append(best_time(lambda: KNNHead().fit(X, y, X_val=Xv, y_val=yv), 1)[0])
        product_times.append(best_time(lambda: Xv @ X.T, 1)[0])
    fit_s, product_s = min(fit_times), min(product_times)
    print(f"knn fit_{n}x2048_s {fit_s:.3f}")
    print(f"knn one_similarity_product_s {product_s:.3f}")
    print(f"knn fit_over_one_similarity_product {fit_s / product_s:.2f}")
    print(f"knn load_average_1min_after {os.getloadavg()[0]:.2f}")
    # the same ratio in CPU time of one thread (BLAS on one thread): what the fit adds to the
    # product, unaffected by other jobs sharing the cores
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        fit_cpu = min(thread_seconds(lambda: KNNHead().fit(X, y, X_val=Xv, y_val=yv)) for _ in range(repeat))
        product_cpu = min(thread_seconds(lambda: Xv @ X.T) for _ in range(repeat))
    print(f"knn fit_over_one_similarity_product_cpu_one_thread {fit_cpu / product_cpu:.3f}")


def thread_seconds(function) -> float:
    started = time.thread_time()
    function()
    return time.thread_time() - started


def curve_figure() -> None:
    import importlib

    # one thread where the curve has no thread pool (an older probe, for a baseline)
    curve_workers = getattr(importlib.import_module("probe.curve"), "curve_workers", lambda: 1)
    Xtr, ytr, Xv, yv, Xte, yte = blobs()
    train, test = Split("train", Xtr, ytr, []), Split("test", Xte, yte, [])
    print(f"curve load_average_1min_before {os.getloadavg()[0]:.2f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started, cpu = time.perf_counter(), time.process_time()
        records = curve_records(train, test, [str(c) for c in range(10)], [1, 2, 5, 10, 25, "all"], 5,
                                ["logreg", "knn", "dense"])
    print(f"curve 6_shots_x_5_repeats_x_3_heads_s {time.perf_counter() - started:.1f}")
    # CPU seconds of every thread: what the work costs whatever else the machine runs
    print(f"curve 6_shots_x_5_repeats_x_3_heads_cpu_s {time.process_time() - cpu:.1f}")
    print(f"curve threads {curve_workers()}")
    print(f"curve load_average_1min_after {os.getloadavg()[0]:.2f}")
    for name in ("logreg", "knn", "dense"):
        mean = np.mean([r["accuracy"] for r in records if r["head"] == name and r["shots"] == "all"])
        print(f"curve {name}_accuracy_all_shots {mean:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing (best kept)")
    parser.add_argument("--quick", action="store_true", help="small knn bank, no curve")
    parser.add_argument("--only", choices=("logistic", "knn", "curve"), default=None,
                        help="one group of figures")
    args = parser.parse_args()
    if args.only in (None, "logistic"):
        logistic_figures("digits", digits(), args.repeat)
        logistic_figures("blobs", blobs(), args.repeat)
    if args.only in (None, "knn"):
        knn_large(args.repeat, 2000 if args.quick else 10000)
    if args.only in (None, "curve") and not args.quick:
        curve_figure()


if __name__ == "__main__":
    main()
