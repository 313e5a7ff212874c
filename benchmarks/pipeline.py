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
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import extract as bench  # noqa: E402  (the dataset and the measurements of extract.py)
import probe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=512, help="images of the dataset")
    parser.add_argument("--backbones", default=",".join(probe.list_backbones()))
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", default=",".join(
        str(2 ** i) for i in range(6) if 2 ** i <= (os.cpu_count() or 1)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="probe-bench-"))
    bench.emit("machine", "cpu", bench.machine())
    bench.emit("setting", "command", " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])))
    root = bench.make_dataset(work / f"photos-{args.n}", args.n)
    threads = [int(t) for t in args.threads.split(",")]
    for name in [b.strip() for b in args.backbones.split(",") if b.strip()]:
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
