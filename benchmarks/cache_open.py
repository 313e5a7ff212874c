"""What the cache's integrity checks cost: opening a cache (whole-file sha256, format
checks) and a fit's reads, against reading the same features with h5py alone.

A synthetic cache of N rows of D float32 features (random, 70/15/15 splits) is written with
probe's own writer, then each figure is the best of --repeat runs, the file in the page
cache (warm: what a second command sees). One line per figure: `<scope> <figure> <value>`.

    PYTHONPATH=. python benchmarks/cache_open.py --rows 20000 --dim 2048
    PYTHONPATH=. python benchmarks/cache_open.py --rows 200 --dim 64 --repeat 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from probe.features import cache as cache_mod, format as format_mod, plan, store


def write(directory: Path, rows: int, dim: int) -> Path:
    """A finished cache, written as `probe extract` writes one."""
    rng = np.random.default_rng(0)
    parts = store.PartStore(directory / "parts")
    block = 4096
    entries = []
    for start in range(0, rows, block):
        count = min(block, rows - start)
        paths = [f"c{i % 3}/img_{i}.jpg" for i in range(start, start + count)]
        part = parts.write(rng.standard_normal((count, dim), dtype=np.float32), paths,
                           [1000] * count, [0] * count, [])
        for i, path in enumerate(paths):
            split = ("train",) * 14 + ("val",) * 3 + ("test",) * 3
            entries.append(plan.Entry(path, (start + i) % 3, split[(start + i) % 20],
                                           1000, 0, cache_mod.Row(str(part), "", i)))
    attrs = {"format": format_mod.FORMAT, "format_version": format_mod.FORMAT_VERSION,
             "feature_key": "0" * 64, "source_fingerprint": "1" * 64, "backbone": "vgg16",
             "weights": "none", "image_size": 224, "pooling": "avg", "preprocessing": "caffe",
             "feature_shape": [dim], "classes": ["c0", "c1", "c2"],
             "dataset_root": str(directory / "images"), "labels_file": "", "seed": 0,
             "val_fraction": 0.15, "test_fraction": 0.15}
    target = directory / "bench.h5"
    store.write_cache(target, attrs, entries, [], (dim,))
    parts.clear()
    return target


def best(repeat: int, action) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def h5py_reads(path: Path) -> None:
    """The baseline: every split's features, labels and paths, h5py alone."""
    with h5py.File(path, "r") as handle:
        for split in ("train", "val", "test"):
            group = handle[split]
            group["features"][()], group["labels"][()], group["paths"][()]


def fit_reads(path: Path) -> None:
    """What `probe fit` reads: open (checks), then every split."""
    opened = cache_mod.FeatureCache.open(path)
    for split in opened.splits:
        opened.split(split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        path = write(Path(workdir), args.rows, args.dim)
        print(f"cache size_mb {path.stat().st_size / 1e6:.1f}")
        h5py_reads(path)  # into the page cache
        baseline = best(args.repeat, lambda: h5py_reads(path))
        opening = best(args.repeat, lambda: cache_mod.FeatureCache.open(path))
        fit = best(args.repeat, lambda: fit_reads(path))
        verify = best(args.repeat, lambda: cache_mod.FeatureCache.open(path).verify())
        listing = best(args.repeat, lambda: cache_mod.list_caches(workdir))
        print(f"h5py read_all_s {baseline:.4f}")
        print(f"probe open_s {opening:.4f}")
        print(f"probe open_and_read_all_s {fit:.4f}")
        print(f"probe verify_s {verify:.4f}")
        print(f"probe list_s {listing:.4f}")
        print(f"ratio open_and_read_all_over_h5py {fit / baseline:.2f}")
        print(f"ratio verify_over_h5py {verify / baseline:.2f}")


if __name__ == "__main__":
    main()
