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

`--only fit_vs_extract` times `probe fit --head logreg` against `probe extract` of the same
cache, each as a user runs it (a whole `probe` process: wall-clock and CPU seconds, the CPU
seconds being what counts on a machine shared with other jobs): resnet50, random weights,
`--photos` generated JPEGs (those of `extract.py`) at 224 px. The fit runs on this tree's
code and on `--baseline` (another checkout, e.g. an older commit's, read only) in the same
run; then where the time of one in-process `probe.fit` goes (`stage_*` CPU seconds):

    PYTHONPATH=. python benchmarks/heads.py --only fit_vs_extract --photos 1200 \
        --baseline /path/to/main --workdir /tmp/fit-vs-extract

The `probe` processes run on this Python (`sys.executable`): run the script with the Python
of a default install (`pip install .` in a fresh virtual environment) to time what a user
gets; the `pandas_installed` line says whether scikit-learn's import of pandas is paid.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
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


def run_probe(code_root: Path, args: list[str], env: dict) -> tuple[float, float]:
    """Wall-clock and CPU seconds (user + system, the child's) of one `probe` process run
    from `code_root`."""
    env = dict(env, PYTHONPATH=str(code_root))
    command = [sys.executable, "-m", "probe.cli"] + args
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=code_root)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"probe {' '.join(args)} failed: {result.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def fit_stages(cache_path: Path, runs_dir: Path) -> dict[str, float]:
    """CPU seconds of the parts of one in-process `probe.fit` (logreg) on this tree."""
    from probe import html, report, runs

    stages: dict[str, float] = {}

    def timed(module, name: str) -> None:
        function = getattr(module, name)

        def wrapper(*args, **kwargs):
            started = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                stages[name] = stages.get(name, 0.0) + time.process_time() - started
        setattr(module, name, wrapper)

    for module, name in ((runs, "train_head"), (report, "plot_curves"), (runs, "save_run"),
                         (html, "pca_2d"), (html, "after_fit")):
        timed(module, name)
    import probe

    cache = probe.list_caches(cache_path.parent)[0]
    started = time.process_time()
    runs.fit(cache, "logreg", runs_dir=runs_dir)
    stages["fit"] = time.process_time() - started
    return stages


def fit_vs_extract(photos: int, baseline: Path | None, workdir: Path | None, repeat: int) -> None:
    import tempfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import extract as bench

    work = workdir or Path(tempfile.mkdtemp(prefix="probe-fit-vs-extract-"))
    work.mkdir(parents=True, exist_ok=True)
    root = bench.make_dataset(work / f"photos-{photos}", photos)
    cache_dir, runs_dir = work / "cache", work / "runs"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PROBE_CACHE_DIR=str(cache_dir))
    from probe.device import cpu_name

    print(f"machine cpu {cpu_name()}, {os.cpu_count()} cores")
    # scikit-learn imports pandas whenever it is installed (the ray extra brings it): half
    # a second of every fit process that a default install does not pay
    import importlib.util

    pandas = "yes" if importlib.util.find_spec("pandas") else "no"
    print(f"fit_vs_extract pandas_installed {pandas}")
    print(f"fit_vs_extract load_average_1min_before {os.getloadavg()[0]:.2f}")
    import shutil

    shutil.rmtree(cache_dir, ignore_errors=True)
    extract_wall, extract_cpu = run_probe(ROOT, ["extract", "--backbone", "resnet50", "--weights",
                                                 "none", "--image-size", "224", str(root)], env)
    cache = next(cache_dir.glob("*.h5"))
    print(f"fit_vs_extract extract_{photos}_resnet50_224_wall_s {extract_wall:.1f}")
    print(f"fit_vs_extract extract_{photos}_resnet50_224_cpu_s {extract_cpu:.1f}")
    fit_args = ["fit", "--head", "logreg", "--cache", str(cache), "--runs-dir", str(runs_dir)]
    variants = [("this_tree", ROOT)]
    if baseline is not None:
        variants.insert(0, ("baseline", baseline))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    for _ in range(repeat):  # in turns, so that outside load hits every variant alike
        for name, code_root in variants:
            times[name].append(run_probe(code_root, fit_args, env))
    for name, _ in variants:
        wall, cpu = min(t[0] for t in times[name]), min(t[1] for t in times[name])
        print(f"fit_vs_extract fit_{name}_wall_s {wall:.2f}")
        print(f"fit_vs_extract fit_{name}_cpu_s {cpu:.2f}")
        print(f"fit_vs_extract extract_over_fit_{name}_wall {extract_wall / wall:.1f}")
        print(f"fit_vs_extract extract_over_fit_{name}_cpu {extract_cpu / cpu:.1f}")
    for stage, seconds in fit_stages(cache, runs_dir).items():
        print(f"fit_vs_extract stage_{stage}_cpu_s {seconds:.2f}")
    print(f"fit_vs_extract load_average_1min_after {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing (best kept)")
    parser.add_argument("--quick", action="store_true", help="small knn bank, no curve")
    parser.add_argument("--only", choices=("logistic", "knn", "curve", "fit_vs_extract"),
                        default=None, help="one group of figures")
    parser.add_argument("--photos", type=int, default=1200, help="fit_vs_extract: images")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="fit_vs_extract: a checkout of the code to compare against")
    parser.add_argument("--workdir", type=Path, default=None, help="fit_vs_extract: work folder")
    args = parser.parse_args()
    if args.only == "fit_vs_extract":
        fit_vs_extract(args.photos, args.baseline, args.workdir, args.repeat)
        return
    if args.only in (None, "logistic"):
        logistic_figures("digits", digits(), args.repeat)
        logistic_figures("blobs", blobs(), args.repeat)
    if args.only in (None, "knn"):
        knn_large(args.repeat, 2000 if args.quick else 10000)
    if args.only in (None, "curve") and not args.quick:
        curve_figure()


if __name__ == "__main__":
    main()
