"""How fast the local engine's batch loop delivers model inputs, by number of decoding
threads: the ceiling decoding puts on extraction, whatever runs the backbone.

For each backbone at its native size (or --image-size), on N generated photo-like JPEGs
(those of `extract.py`): one core's decoding rate (Pillow + preprocessing, in thread CPU
time), then the batch loop feeding a model that computes nothing with 1, 2, 4, ...
threads, in turns, medians of --repeats rounds. `scaling` is the loop's rate over the
threads' cores at the one-core rate: 1.0 would be perfect scaling. A GPU running the
backbone at R images/s needs the thread count whose rate reaches R.

    python benchmarks/pipeline.py --n 512 --threads 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import extract as bench  # noqa: E402  (the dataset and the measurements of extract.py)
import probe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_dataset_options(parser, n=512)
    parser.add_argument("--threads", default=",".join(
        str(2 ** i) for i in range(6) if 2 ** i <= (os.cpu_count() or 1)))
    args = parser.parse_args(argv)

    root, names = bench.start(args, argv)
    threads = [int(t) for t in args.threads.split(",")]
    for name in names:
        spec = probe.get_backbone(name)
        size = args.image_size or spec.native_size
        decode_ms = bench.measure_decoding(spec, size, root)
        bench.emit(name, "decode_img_per_s_per_core", 1e3 / decode_ms)
        rates: dict[int, list[float]] = {t: [] for t in threads}
        for _ in range(args.repeats):
            for t in threads:
                rates[t].append(bench.measure_pipeline(spec, size, root, args.batch_size, t)[0])
        for t in threads:
            rate = statistics.median(rates[t])
            bench.emit(name, f"pipeline_threads_{t}_img_per_s", rate)
            bench.emit(name, f"pipeline_threads_{t}_scaling", rate * decode_ms / 1e3 / t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
