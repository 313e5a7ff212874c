"""The Ray engine against the local engine on the same dataset, in the same run.

On N generated photo-like JPEGs (those of benchmarks/extract.py), random weights:

1. local: `probe.features.extract` with the local engine, from the files to a finished cache;
2. ray_startup_s: starting a local Ray (2 CPUs or --workers, dashboard off, 127.0.0.1);
3. ray: `probe.extract(engine="ray")` on that running Ray (actors start, build the
   backbone, extract their shards, the driver assembles the cache);
4. ray_cold: the same, starting and stopping its own local Ray, as `probe extract
   --engine ray` without --ray-address does;

then the ratios local/ray (the engine's overhead on one machine). Every figure is printed on
its own line: `<scope> <figure> <value>`. Each extraction writes into a fresh cache
directory, so nothing is reused.

    python benchmarks/ray_engine.py --n 96 --image-size 96 --workers 2 --shard-size 24
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent
for path in (str(HERE.parent), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import probe  # noqa: E402
from extract import emit, make_dataset  # noqa: E402  (benchmarks/extract.py)
from probe.features.engines.ray import init_local  # noqa: E402


def timed_extract(root: Path, cache_dir: Path, args, **engine) -> float:
    """Images/s of one extraction into an empty cache directory."""
    started = time.perf_counter()
    cache = probe.extract(root, args.backbone, weights="none", image_size=args.image_size,
                          batch_size=args.batch_size, cache_dir=cache_dir, **engine)
    seconds = time.perf_counter() - started
    return sum(cache.counts.values()) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=24)
    args = parser.parse_args()

    import ray

    scope = f"{args.backbone}@{args.image_size}"
    options = probe.RayOptions(workers=args.workers, shard_size=args.shard_size)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        root = make_dataset(work / "photos", args.n)
        local = timed_extract(root, work / "local", args, engine="local")
        emit(scope, "local_img_per_s", local)

        started = time.perf_counter()
        init_local(ray, max(2, args.workers))
        emit(scope, "ray_startup_s", time.perf_counter() - started)
        try:
            warm = timed_extract(root, work / "ray", args, engine="ray", ray=options)
        finally:
            ray.shutdown()
        emit(scope, "ray_img_per_s", warm)
        emit(scope, "local_over_ray", local / warm)

        cold = timed_extract(root, work / "ray-cold", args, engine="ray", ray=options)
        emit(scope, "ray_cold_img_per_s", cold)
        emit(scope, "local_over_ray_cold", local / cold)


if __name__ == "__main__":
    main()
