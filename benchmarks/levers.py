"""Process-wide settings and start-up overlap, each against its baseline in the same run.

1. Start-up: the time from "build the model" to the first batch's features, when the
   first call is traced after the first batch is decoded (what extraction does) and when it
   is traced in a background thread while the first batch is decoded. Rounds alternate.
2. Thread layout and oneDNN: `probe.features.extract` end to end (folded model, decoding threads)
   in a fresh process per setting, settings applied before TensorFlow starts:
   TensorFlow's defaults; one intra-op thread (the other core left to decoding); one
   decoding worker; oneDNN graph rewrites off (TF_ENABLE_ONEDNN_OPTS=0). The settings are
   run round-robin, --rounds times, and the median is printed with its ratio to the
   defaults.

Every figure is one line `<scope> <figure> <value>`.

    python benchmarks/levers.py --n 64 --backbone resnet50
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract import emit, make_dataset, samples_in_order  # noqa: E402

SETTINGS = {
    "defaults": {},
    "intra_op_1": {"intra_op": 1},
    "decode_workers_1": {"workers": 1},
    "onednn_off": {"env": {"TF_ENABLE_ONEDNN_OPTS": "0"}},
}

CHILD = """
import json, sys, time
setting = json.loads(sys.argv[1])
import tensorflow as tf
if "intra_op" in setting:
    tf.config.threading.set_intra_op_parallelism_threads(setting["intra_op"])
import probe
marks = []
start = time.perf_counter()
probe.extract(sys.argv[2], sys.argv[3], weights="none", cache_dir=sys.argv[4],
              workers=setting.get("workers"),
              progress=lambda done, total: marks.append((time.perf_counter(), done)))
seconds = time.perf_counter() - start
(t0, d0), (t1, d1) = marks[0], marks[-1]
print(json.dumps({"end_to_end": d1 / seconds,
                  "steady": (d1 - d0) / (t1 - t0) if t1 > t0 else float("nan")}))
"""


def run_setting(name: str, setting: dict, root: Path, backbone: str, work: Path) -> dict:
    cache_dir = work / f"cache-{name}"
    subprocess.run(["rm", "-rf", str(cache_dir)], check=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), **setting.get("env", {}))
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(setting), str(root),
                             backbone, str(cache_dir)], capture_output=True, text=True,
                            env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def thread_layouts(root: Path, backbone: str, work: Path, rounds: int) -> None:
    results: dict[str, dict[str, list[float]]] = {k: {"end_to_end": [], "steady": []}
                                                  for k in SETTINGS}
    for _ in range(rounds):
        for name, setting in SETTINGS.items():
            for key, value in run_setting(name, setting, root, backbone, work).items():
                results[name][key].append(value)
    base = {k: statistics.median(v) for k, v in results["defaults"].items()}
    for name in SETTINGS:
        for key in ("end_to_end", "steady"):
            value = statistics.median(results[name][key])
            emit(f"{backbone}_{name}", f"{key}_img_per_s", value)
            if name != "defaults":
                emit(f"{backbone}_{name}", f"{key}_over_defaults", value / base[key])


def first_features_seconds(spec, size: int, paths: list[Path], batch_size: int,
                           background: bool) -> float:
    """Seconds from building the (folded) model to the first batch's features."""
    import numpy as np

    from probe import data
    from probe.features.extract import build_model

    start = time.perf_counter()
    model = build_model(spec, "none", size, "avg", 0)
    tracer = None
    if background:
        zeros = np.zeros((batch_size, size, size, 3), np.float32)
        tracer = threading.Thread(target=model.predict_on_batch, args=(zeros,))
        tracer.start()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        pixels = list(pool.map(lambda p: data.load_image(p, size), paths[:batch_size]))
    inputs = spec.preprocess_input(np.stack(pixels))
    if tracer is not None:
        tracer.join()
    model.predict_on_batch(inputs)
    return time.perf_counter() - start


def startup_overlap(root: Path, backbone: str, batch_size: int, rounds: int) -> None:
    import probe

    spec = probe.get_backbone(backbone)
    paths = samples_in_order(root)
    times: dict[bool, list[float]] = {False: [], True: []}
    first_features_seconds(spec, spec.native_size, paths, batch_size, False)  # imports
    for _ in range(rounds):
        for background in (False, True):
            times[background].append(first_features_seconds(
                spec, spec.native_size, paths, batch_size, background))
    serial, overlap = statistics.median(times[False]), statistics.median(times[True])
    emit(f"{backbone}_startup", "serial_first_features_s", serial)
    emit(f"{backbone}_startup", "background_trace_first_features_s", overlap)
    emit(f"{backbone}_startup", "saved_s", serial - overlap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--no-layouts", action="store_true",
                        help="measure the start-up overlap only")
    args = parser.parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="probe-levers-"))
    work.mkdir(parents=True, exist_ok=True)
    root = make_dataset(work / f"photos-{args.n}", args.n)
    emit("machine", "load_average_1min", os.getloadavg()[0])
    startup_overlap(root, args.backbone, args.batch_size, max(args.rounds, 2))
    if not args.no_layouts:
        thread_layouts(root, args.backbone, work, args.rounds)
    emit("machine", "load_average_1min_end", os.getloadavg()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
