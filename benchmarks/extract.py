"""Extraction speed, memory and head-fitting time of probe against the backbone's limit and
the plain Keras recipe.

For each backbone, at its native size (or --image-size), on N generated photo-like JPEGs:

1. limit: the Keras model alone on decoded, preprocessed tensors in memory, unfolded and
   with its BatchNormalizations folded into the convolutions (what extraction runs), in
   turns, with the speed-up, the largest relative feature difference and the start-up
   pieces (build, fold, trace); then one core's decoding rate (Pillow + preprocessing),
   the cores of decoding the model alone needs, and the batch loop's own ceiling (its
   decoding threads feeding a model that computes nothing);
2. extract: `probe.features.extract` end to end, from the files to a finished cache;
3. keras: `keras.utils.image_dataset_from_directory` mapped through the backbone's
   `preprocess_input`, then `model.predict`, features kept in memory;

then the ratios extract/limit and extract/keras, bfloat16 against float32 and the time to
fit the heads on the cache. Finally the peak memory of `probe.features.extract` in a fresh
process for two dataset sizes.

bf16 against float32, per backbone, in the same run, where the CPU or GPU computes
bfloat16: end to end on the runtime `--precision bf16` resolves to (`runtime_bf16`), over
TensorFlow's float32 (`speedup_bf16`) and OpenVINO's, the default (`speedup_bf16_over_
openvino_float32`); the model alone on TensorFlow's mixed_bfloat16 (`limit_speedup_bf16`)
and, where bf16 resolves to OpenVINO, on its bf16 hint (`limit_openvino_bf16_over_*`); the
features' agreement and the logistic head's accuracy on both. Elsewhere each backbone
prints `<backbone> bf16 not available here: <why>` in their place (and `machine bf16`).

Every figure is printed on its own line: `<scope> <figure> <value>`, e.g.
`vgg16 limit_img_per_s 7.1`. Weights are random (`--weights none`): the speed is the same
as with ImageNet weights and nothing needs downloading. Any Keras backend runs it (the
plain Keras recipe needs TensorFlow's tf.data: `--no-keras` elsewhere); a GPU it sees is
named on the `machine accelerator` line.

    python benchmarks/extract.py --n 96
    KERAS_BACKEND=jax python benchmarks/extract.py --n 1536 --batch-size 64 --no-keras --no-openvino
    python benchmarks/extract.py --n 6 --backbones vgg16 --image-size 32 --memory-sizes ''
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import probe  # noqa: E402
from probe import data  # noqa: E402
from probe.progress import Advanced  # noqa: E402

CLASSES = ("meadow", "sunset", "harbour")


# --- data ------------------------------------------------------------------------------


def make_photo(rng: np.random.Generator, label: int, width: int, height: int) -> np.ndarray:
    """Pixels that compress like a photo: a smooth colour gradient (sky, ground), soft
    blobs and shapes, and sensor noise; the class sets the palette and the shapes."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= width
    y /= height
    palettes = (((90, 140, 210), (60, 150, 50)), ((250, 150, 60), (120, 50, 90)),
                ((150, 180, 210), (30, 60, 110)))
    top, bottom = (np.array(c, np.float32) + rng.normal(0, 25, 3) for c in palettes[label])
    horizon = rng.uniform(0.3, 0.7)
    t = np.clip((y - horizon) * 4 + 0.5, 0, 1)[..., None]
    image = top * (1 - t) + bottom * t + (x[..., None] - 0.5) * rng.normal(0, 40, 3)
    for _ in range(rng.integers(4, 9)):
        cx, cy = rng.uniform(0, 1, 2)
        r = rng.uniform(0.03, 0.25)
        colour = rng.uniform(0, 255, 3)
        if (label + rng.integers(0, 3)) % 3 == 0:  # soft round blob
            d = ((x - cx) ** 2 + ((y - cy) * height / width) ** 2) / (r * r)
            alpha = np.exp(-d)[..., None]
        else:  # hard-edged box
            alpha = ((abs(x - cx) < r) & (abs(y - cy) < r * 0.6))[..., None] * 0.8
        image = image * (1 - alpha) + colour * alpha
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs of about 500x375 (landscape and portrait, varied) in class folders, written
    by one process per core (each image drawn from its own seed, so the set does not
    depend on the number of cores). An existing folder with the same count is reused."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    marker = root / ".complete"
    if marker.exists() and marker.read_text() == str(n):
        return root
    shutil.rmtree(root, ignore_errors=True)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    # spawned, not forked: the parent may already run a Keras backend's threads
    with ProcessPoolExecutor(os.cpu_count(), multiprocessing.get_context("spawn")) as pool:
        list(pool.map(write_photo, [(root, seed, i) for i in range(n)], chunksize=16))
    marker.write_text(str(n))
    return root


def write_photo(job: tuple[Path, int, int]) -> None:
    """Image number i of the dataset at root, drawn from the generator seeded (seed, i)."""
    from PIL import Image

    root, seed, i = job
    rng = np.random.default_rng([seed, i])
    label = i % len(CLASSES)
    width, height = int(rng.integers(440, 561)), int(rng.integers(330, 421))
    if rng.random() < 0.2:
        width, height = height, width
    path = root / CLASSES[label] / f"{i:05d}.jpg"
    Image.fromarray(make_photo(rng, label, width, height)).save(path, quality=90)


def samples_in_order(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.jpg"))


# --- measurements ----------------------------------------------------------------------


def emit(scope: str, figure: str, value) -> None:
    if isinstance(value, float):
        # four significant digits, so a printed ratio can be checked against its rates
        value = f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    print(f"{scope} {figure} {value}", flush=True)


def measure_model(spec, size: int, root: Path, batch_size: int, precision: str,
                  openvino: bool = False, openvino_bf16: bool = False) -> dict:
    """The Keras model alone on preprocessed tensors in memory, unfolded and with its
    BatchNormalizations folded (`probe.features.fold`, what extraction runs), batch by batch in
    turns so that outside load hits both alike; each after one warm-up batch, so tracing
    is not counted. Also the start-up pieces: building the model, folding it, and the
    first call (tracing plus one batch) less one steady batch; and the largest difference
    between the two models' features relative to the largest feature. With `openvino`, the
    unfolded model converted to OpenVINO (`probe.features.runtime`: written from its layers,
    BatchNormalizations folded, wide 3x3 convolutions as Winograd ones) runs in the same
    turns, and so does the same graph with plain convolutions; the time the traced
    conversion would take is measured for comparison. With `openvino_bf16` (precision bf16),
    the float32 model converted to OpenVINO and compiled with the bf16 hint (what
    `--precision bf16` runs where it resolves to OpenVINO) runs in the same turns."""
    from probe.features import fold
    from probe.features.extract import build_model

    pixels = np.stack([data.load_image(p, size) for p in samples_in_order(root)])
    inputs = spec.preprocess_input(pixels)
    del pixels
    batches = [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
    os.environ[fold.FOLD_ENV] = "0"
    try:
        started = time.perf_counter()
        unfolded = build_model(spec, "none", size, "avg", 0, precision)
        build_seconds = time.perf_counter() - started
    finally:
        del os.environ[fold.FOLD_ENV]
    started = time.perf_counter()
    folded = fold.fold_batchnorm(unfolded)
    fold_seconds = time.perf_counter() - started
    models = {"unfolded": unfolded, "folded": folded}
    convert_seconds = traced_seconds = float("nan")
    if openvino:
        from probe.features import runtime

        started = time.perf_counter()
        runtime.convert_traced(folded, size)  # how openvino.convert_model would read it
        traced_seconds = time.perf_counter() - started
        started = time.perf_counter()  # what extraction does: written from the layers
        converted = runtime.compile_for_cpu(runtime.convert(unfolded, size))
        models["openvino"] = runtime.OpenVINOBackbone(converted)
        convert_seconds = time.perf_counter() - started
        from probe.features import openvino_graph  # the same, every convolution a plain one

        os.environ[openvino_graph.WINOGRAD_ENV] = "0"
        try:
            models["openvino_plain"] = runtime.OpenVINOBackbone(
                runtime.compile_for_cpu(runtime.convert(unfolded, size)))
        finally:
            del os.environ[openvino_graph.WINOGRAD_ENV]
    if openvino_bf16:
        from probe.features import runtime

        os.environ[fold.FOLD_ENV] = "0"
        try:  # OpenVINO converts the float32 Keras model; the hint makes it compute bf16
            float32_model = build_model(spec, "none", size, "avg", 0, "float32")
        finally:
            del os.environ[fold.FOLD_ENV]
        models["openvino_bf16"] = runtime.OpenVINOBackbone(
            runtime.compile_for_cpu(runtime.convert(float32_model, size), "bf16"))
    first_call, seconds, outputs = {}, {k: 0.0 for k in models}, {k: [] for k in models}
    for key, model in models.items():
        started = time.perf_counter()
        model.predict_on_batch(batches[0])
        first_call[key] = time.perf_counter() - started
    for batch in batches:
        for key, model in models.items():
            started = time.perf_counter()
            outputs[key].append(np.asarray(model.predict_on_batch(batch), dtype=np.float32))
            seconds[key] += time.perf_counter() - started
    features = {k: np.concatenate(v) for k, v in outputs.items()}
    reference = features["unfolded"]

    def max_rel_diff(key: str) -> float:
        return float(np.max(np.abs(reference - features[key]))
                     / max(np.max(np.abs(reference)), 1e-30))

    per_batch = {k: seconds[k] / len(batches) for k in models}
    results = {"unfolded": len(inputs) / seconds["unfolded"],
               "folded": len(inputs) / seconds["folded"],
               "build_s": build_seconds, "fold_s": fold_seconds,
               "trace_unfolded_s": first_call["unfolded"] - per_batch["unfolded"],
               "trace_folded_s": first_call["folded"] - per_batch["folded"],
               "max_rel_diff": max_rel_diff("folded")}
    if openvino:
        results.update({"openvino": len(inputs) / seconds["openvino"],
                        "openvino_plain": len(inputs) / seconds["openvino_plain"],
                        "convert_s": convert_seconds, "convert_traced_s": traced_seconds,
                        "trace_openvino_s": first_call["openvino"] - per_batch["openvino"],
                        "openvino_max_rel_diff": max_rel_diff("openvino")})
    if openvino_bf16:
        results["openvino_bf16"] = len(inputs) / seconds["openvino_bf16"]
    return results


def measure_decoding(spec, size: int, root: Path) -> float:
    """Milliseconds of one core to decode one image and apply the backbone's
    preprocessing (what the decoding threads do per image). Counted in this thread's CPU
    time (Pillow and numpy do this work in the calling thread), so that other processes
    sharing the cores do not inflate it. The first 256 images are enough."""
    paths = samples_in_order(root)[:256]
    started = time.thread_time()
    for path in paths:
        spec.preprocess_input(data.load_image(path, size)[None])
    return (time.thread_time() - started) / len(paths) * 1e3


class NoModel:
    """A model that computes nothing: what the batch loop delivers without one is the
    ceiling decoding puts on extraction (what a fast GPU would see)."""

    output_shape = (None, 1)

    def predict_on_batch(self, inputs: np.ndarray) -> np.ndarray:
        return np.zeros((len(inputs), 1), np.float32)


def measure_pipeline(spec, size: int, root: Path, batch_size: int,
                     workers: int | None = None) -> tuple[float, int]:
    """Images/s of the local engine's batch loop (decoding threads, preprocessing, batch
    assembly) feeding a model that computes nothing, and its number of decoding threads
    (`workers`, or probe's default)."""
    from probe.features.engines import local
    from probe.features.plan import Source

    paths = samples_in_order(root)
    todo = [Source(data.Sample(str(p.relative_to(root)), 0, "train"), p.stat().st_size, 0)
            for p in paths]
    started = time.perf_counter()
    done = sum(len(batch) for batch in local.run_batches(NoModel(), spec, root, todo, size,
                                                          batch_size, workers))
    assert done == len(todo)
    return done / (time.perf_counter() - started), local.decoding_threads(workers)


def steady_and_startup(marks: list[tuple[float, int]], start: float) -> tuple[float, float]:
    """From (time, images done) at the end of each batch of a run started at `start`: the
    rate after the first batch, and the time to the first batch less one batch at that
    rate (NaN for a run of one batch)."""
    if len(marks) < 2:
        return float("nan"), float("nan")
    (first_time, first_done), (last_time, last_done) = marks[0], marks[-1]
    steady = (last_done - first_done) / (last_time - first_time)
    return steady, first_time - start - first_done / steady


def measure_extract(name: str, size: int, root: Path, cache_dir: Path, batch_size: int,
                    precision: str, runtime: str = "tensorflow"):
    """`probe.features.extract` from files to a finished cache: (seconds, steady images/s, start-up
    seconds, the cache). Steady is the rate after the first batch, once the model is built
    and traced; start-up is the time to the first batch less one batch at the steady rate:
    the fixed cost every run pays whatever the number of images (with OpenVINO: a first
    run's, converting the model)."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    marks: list[tuple[float, int]] = []
    start = time.perf_counter()
    cache = probe.extract(root, name, weights="none", image_size=size, cache_dir=cache_dir,
                          batch_size=batch_size, precision=precision, runtime=runtime,
                          progress=lambda event: isinstance(event, Advanced)
                          and marks.append((time.perf_counter(), event.done)))
    seconds = time.perf_counter() - start
    return (seconds, *steady_and_startup(marks, start), cache)


def measure_saved_startup(name: str, size: int, root: Path, cache_dir: Path, batch_size: int,
                          steady: float) -> float:
    """Start-up of a later OpenVINO extraction, which reads the model converted by an
    earlier one from the cache directory: loading it plus the first batch, less one batch
    at the steady rate."""
    from probe.features import runtime
    from probe.settings import ExtractionSettings

    extraction = ExtractionSettings.create(name, "none", size, batch_size=batch_size,
                                           runtime="openvino")
    spec = extraction.spec
    paths = samples_in_order(root)[:batch_size]
    inputs = spec.preprocess_input(np.stack([data.load_image(p, size) for p in paths]))
    started = time.perf_counter()
    runtime.load_backbone(extraction, cache_dir).predict_on_batch(inputs)
    return time.perf_counter() - started - len(inputs) / steady


def measure_keras_recipe(spec, size: int, root: Path, batch_size: int):
    """The plain Keras recipe: image_dataset_from_directory, preprocess_input,
    model.predict (features kept in memory). Returns (seconds, steady images/s, start-up
    seconds), steady and start-up as for `measure_extract`, from the ends of predict's
    batches (a callback)."""
    import keras
    import tensorflow as tf

    marks: list[tuple[float, int]] = []

    class BatchEnds(keras.callbacks.Callback):
        def on_predict_batch_end(self, batch, logs=None):
            marks.append((time.perf_counter(), min((batch + 1) * batch_size, total)))

    total = len(samples_in_order(root))
    start = time.perf_counter()
    module = getattr(keras.applications, spec.module)
    model = getattr(keras.applications, spec.constructor)(
        weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")
    dataset = keras.utils.image_dataset_from_directory(
        root, labels="inferred", image_size=(size, size), batch_size=batch_size,
        shuffle=False, verbose=False)
    dataset = dataset.map(lambda x, y: module.preprocess_input(x)).prefetch(tf.data.AUTOTUNE)
    features = model.predict(dataset, verbose=0, callbacks=[BatchEnds()])
    seconds = time.perf_counter() - start
    assert len(features) == total
    return (seconds, *steady_and_startup(marks, start))


def at_images(n: int, steady: float, startup: float) -> float:
    """Images/s end to end on n images at this steady rate after this start-up."""
    return n / (n / steady + startup)


def fit_heads(cache, scope: str, extract_seconds: float, runs_dir: Path,
              kinds: list[str]) -> dict[str, float]:
    """Seconds of what `probe fit --head logreg` (with its C sweep) and `--head dense` run
    on the cache (fit, evaluate, write the run directory), and their test accuracy."""
    try:
        from probe.runs import fit
    except ImportError:
        fit = None
    results = {}
    for kind in kinds:
        start = time.perf_counter()
        if fit is not None:
            run = fit(cache, kind, runs_dir=runs_dir)
            accuracy = float(run.metrics["accuracy"])
            source = "probe fit (probe.runs.fit)"
        elif kind == "logreg":
            accuracy = sklearn_logreg_sweep(cache.split("train"), cache.split("val"),
                                            cache.split("test"))
            source = "scikit-learn C sweep (probe fit not available)"
        else:
            emit(scope, f"fit_{kind}_s", "unavailable (probe fit not available)")
            continue
        seconds = time.perf_counter() - start
        results[kind] = accuracy
        emit(scope, f"fit_{kind}_source", source)
        emit(scope, f"fit_{kind}_s", seconds)
        emit(scope, f"fit_{kind}_test_accuracy", accuracy)
        emit(scope, f"extract_over_fit_{kind}", extract_seconds / seconds)
    return results


def sklearn_logreg_sweep(train, val, test) -> float:
    """StandardScaler + lbfgs LogisticRegression over 12 values of C (1e-6..1e5), picked on
    validation accuracy, refitted on train+val; returns the test accuracy."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model(c):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = [(model(c).fit(train.features, train.labels).score(val.features, val.labels), -c)
                  for c in np.logspace(-6, 5, 12)]
        best = -max(scores)[1]
        final = model(best).fit(np.concatenate([train.features, val.features]),
                                np.concatenate([train.labels, val.labels]))
        return float(final.score(test.features, test.labels))


def logreg_accuracy(cache) -> float:
    train, val, test = cache.split("train"), cache.split("val"), cache.split("test")
    try:
        from probe.heads import LogisticHead
    except ImportError:
        return sklearn_logreg_sweep(train, val, test)
    head = LogisticHead().fit(train.features, train.labels, X_val=val.features,
                              y_val=val.labels, classes=cache.classes)
    return float(np.mean(head.predict(test.features) == test.labels))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)))


def all_features(cache) -> tuple[list[str], np.ndarray]:
    paths, rows = [], []
    for split in cache.splits:
        part = cache.split(split)
        paths += list(part.paths)
        rows.append(part.features)
    order = np.argsort(paths)
    return [paths[i] for i in order], np.concatenate(rows)[order]


# The peak is read from /proc/self/status (VmHWM, this process's own address space), not
# from getrusage: Linux carries ru_maxrss over from the parent across fork and exec, so a
# child of a large benchmark process would report the parent's peak.
MEMORY_CHILD = """
import sys, time
import probe
start = time.perf_counter()
probe.extract(sys.argv[1], sys.argv[2], weights="none", image_size=int(sys.argv[3]),
              cache_dir=sys.argv[4], batch_size=int(sys.argv[5]))
print("SECONDS", time.perf_counter() - start)
with open("/proc/self/status") as status:
    peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
print("MAXRSS_KB", peak)
"""


def measure_memory(root: Path, name: str, size: int, cache_dir: Path, batch_size: int):
    """Peak resident memory (MB) and seconds of one `probe.features.extract` in a fresh process."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(root), name, str(size), str(cache_dir),
         str(batch_size)], capture_output=True, text=True, env=env, check=True)
    values = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    return int(values["MAXRSS_KB"]) / 1024, float(values["SECONDS"])


# --- main ------------------------------------------------------------------------------


def emit_openvino(name: str, rate: dict, model: dict, model_figures: dict,
                  keras: bool) -> None:
    """The OpenVINO runtime's lines: the model alone against TensorFlow's (folded, the
    same turns), its features against the unfolded model's, probe extract end to end on
    it (a first run: converting included; and the start-up of a later run, which reads
    the converted model back), against the Keras recipe."""
    emit(name, "limit_openvino_img_per_s", model["openvino"])
    emit(name, "openvino_over_tensorflow", model["openvino"] / model["folded"])
    # what writing the wide 3x3 convolutions as Winograd ones gives (probe.features.openvino_graph)
    emit(name, "limit_openvino_plain_img_per_s", model["openvino_plain"])
    emit(name, "winograd_speedup", model["openvino"] / model["openvino_plain"])
    emit(name, "openvino_max_rel_diff", f"{max(model_figures['openvino_max_rel_diff']):.2e}")
    emit(name, "convert_openvino_s", model["convert_s"])  # written from the layers, compiled
    emit(name, "convert_traced_openvino_s", model["convert_traced_s"])  # traced, not compiled
    emit(name, "trace_openvino_s", model["trace_openvino_s"])
    emit(name, "extract_openvino_img_per_s", rate["extract_ov"])
    emit(name, "extract_openvino_over_extract_tensorflow", rate["extract_ov"] / rate["extract"])
    emit(name, "extract_openvino_over_limit_openvino", rate["extract_ov"] / rate["limit_ov"])
    emit(name, "extract_openvino_steady_over_limit_openvino", rate["steady_ov"] / rate["limit_ov"])
    emit(name, "extract_openvino_startup_first_run_s", rate["startup_ov"])
    emit(name, "extract_openvino_startup_saved_model_s", rate["startup_ov_saved"])
    for n in (200, 2000):  # the end-to-end ratio a later run gets on n images
        emit(name, f"extract_openvino_over_limit_openvino_at_{n}_saved_model",
             at_images(n, rate["steady_ov"], rate["startup_ov_saved"]) / rate["limit_ov"])
    first_run = at_images(2000, rate["steady_ov"], rate["startup_ov"])  # converting included
    if keras:
        emit(name, "extract_openvino_over_keras", rate["extract_ov"] / rate["keras"])
        emit(name, "extract_openvino_over_keras_at_2000", first_run
             / at_images(2000, rate["keras_steady"], rate["keras_startup"]))
    # The most the Keras recipe could reach: it runs the unfolded model, so it can not go
    # faster than that model alone on tensors in memory. A lower bound of the ratio to it.
    emit(name, "extract_openvino_at_2000_over_limit_unfolded", first_run / model["unfolded"])


def emit_bf16(name: str, tag: str, runtime: str, rate: dict, model: dict, fp32: dict) -> None:
    """bf16 against float32, end to end (bf16 where `--precision bf16` resolves, against
    TensorFlow's float32 and, where measured, OpenVINO's, the default) and the model alone
    (TensorFlow's mixed_bfloat16 and, where bf16 resolves to it, OpenVINO's bf16 hint)."""
    emit(name, f"runtime{tag}", runtime)
    emit(name, f"speedup{tag}", rate["extract"] / fp32["extract"])
    if "extract_ov" in fp32:
        emit(name, f"speedup{tag}_over_openvino_float32", rate["extract"] / fp32["extract_ov"])
    emit(name, f"limit_speedup{tag}", rate["limit"] / fp32["limit"])
    if "openvino_bf16" in model:
        emit(name, f"limit_openvino{tag}_img_per_s", model["openvino_bf16"])
        emit(name, f"limit_openvino{tag}_over_tensorflow_float32", model["openvino_bf16"] / fp32["limit"])
        if "limit_ov" in fp32:
            emit(name, f"limit_openvino{tag}_over_openvino_float32", model["openvino_bf16"] / fp32["limit_ov"])


def machine() -> str:
    """The CPU's model name and cores."""
    from probe.device import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores"


def cpu_flags() -> str:
    """Which of the flags that decide bfloat16's speed the CPU has and lacks (AVX-512,
    AVX512_BF16, AMX), and what OpenVINO's CPU device says it computes natively: the
    figures of bf16 (and of float32 against them) depend on these."""
    from probe import device

    flags = device.cpu_flags()
    has = [flag for flag in device.NOTED_CPU_FLAGS if flag in flags]
    lacks = [flag for flag in device.NOTED_CPU_FLAGS if flag not in flags]
    line = f"has {' '.join(has) or 'none of them'}; lacks {' '.join(lacks) or 'none'}"
    capabilities = device.openvino_capabilities()
    return line + (f"; openvino cpu {' '.join(capabilities)}" if capabilities else "")


def backend_version() -> str:
    """The Keras backend and its version (TensorFlow unless KERAS_BACKEND says otherwise)."""
    import importlib

    import keras

    name = keras.config.backend()
    return f"{name} {getattr(importlib.import_module(name), '__version__', '?')}"


def accelerator() -> str:
    """The GPU the Keras backend computes on, or "none"."""
    from probe.device import backend_gpus

    return ", ".join(f"{gpu.name} (compute capability {gpu.capability})"
                     for gpu in backend_gpus()) or "none"


def add_dataset_options(parser: argparse.ArgumentParser, n: int) -> None:
    """The options of the benchmarks that measure backbones on this module's dataset
    (pipeline.py, ceiling.py)."""
    parser.add_argument("--n", type=int, default=n, help="images of the dataset")
    parser.add_argument("--backbones", default=",".join(probe.list_backbones()))
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None)


def start(args: argparse.Namespace, argv: list[str] | None) -> tuple[Path, list[str]]:
    """Print the machine and command lines and make the dataset of `add_dataset_options`:
    its root and the backbones to measure."""
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="probe-bench-"))
    emit("machine", "cpu", machine())
    emit("machine", "cpu_flags", cpu_flags())
    emit("setting", "command", " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])))
    root = make_dataset(work / f"photos-{args.n}", args.n)
    return root, [name.strip() for name in args.backbones.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=96, help="images of the speed dataset")
    parser.add_argument("--backbones", default=",".join(probe.list_backbones()),
                        help="comma-separated backbone names")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size for every backbone [default: each one's native size]")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of limit/extract/keras per backbone; medians are printed")
    parser.add_argument("--precisions", default="float32,bf16",
                        help="comma-separated; bf16 is skipped where it is not supported")
    parser.add_argument("--no-keras", action="store_true", help="skip the plain Keras recipe")
    parser.add_argument("--no-openvino", action="store_true",
                        help="skip the OpenVINO runtime (skipped anyway where not installed)")
    parser.add_argument("--heads", default="logreg,dense",
                        help="heads to time with `probe fit` ('' to skip)")
    parser.add_argument("--memory-sizes", default="500,2000",
                        help="dataset sizes for the peak-memory runs ('' to skip)")
    parser.add_argument("--memory-backbone", default="vgg16")
    parser.add_argument("--memory-image-size", type=int, default=64,
                        help="input size of the memory runs (small, so they finish quickly)")
    parser.add_argument("--workdir", default=None,
                        help="where datasets and caches go [default: a temporary folder]; "
                             "generated datasets there are reused")
    args = parser.parse_args(argv)

    from probe import device

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="probe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    precisions = ["float32"] + [p for p in args.precisions.split(",") if p and p != "float32"]
    heads = [h for h in args.heads.split(",") if h]
    bf16_reason = device.bf16_support()
    from probe.features import runtime

    openvino = device.openvino_installed() and not args.no_openvino
    bf16_refused = "bf16" in precisions and bf16_reason is not None
    if bf16_refused:
        precisions.remove("bf16")
    import keras

    emit("machine", "cpu", machine())
    emit("machine", "cpu_flags", cpu_flags())
    emit("machine", "versions", f"python {platform.python_version()}, keras "
         f"{keras.__version__} on {backend_version()}")
    emit("machine", "accelerator", accelerator())
    emit("machine", "bf16", "supported" if bf16_reason is None else f"unsupported: {bf16_reason}")
    emit("setting", "command", " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])))
    emit("machine", "load_average_1min", os.getloadavg()[0])
    start = time.perf_counter()
    root = make_dataset(work / f"photos-{args.n}", args.n)
    emit("setting", "images", f"{args.n} JPEGs ~500x375 in {len(CLASSES)} classes, "
         f"{sum(p.stat().st_size for p in samples_in_order(root)) / args.n / 1e3:.0f} kB "
         f"average (made in {time.perf_counter() - start:.1f} s)")

    native_rates: dict[str, float] = {}
    for name in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        spec = probe.get_backbone(name)
        size = args.image_size or spec.native_size
        emit(name, "image_size", size)
        caches = {}
        for precision in precisions:
            tag = "" if precision == "float32" else f"_{precision}"
            figures: dict[str, list[float]] = {"limit": [], "extract": [], "keras": [],
                                               "steady": [], "startup": [], "limit_ov": [],
                                               "extract_ov": [], "steady_ov": [],
                                               "startup_ov": [], "startup_ov_saved": [],
                                               "keras_steady": [], "keras_startup": []}
            with_ov = openvino and precision == "float32"
            # bf16 end to end runs where `--precision bf16` resolves (OpenVINO's bf16 hint or
            # TensorFlow's mixed_bfloat16); the model alone on TensorFlow's mixed_bfloat16, and
            # on OpenVINO's bf16 hint too where bf16 resolves to it
            runtime = "tensorflow" if precision == "float32" else device.resolve("auto", precision, name)
            model_figures: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                measured = measure_model(spec, size, root, args.batch_size, precision, with_ov,
                                         openvino_bf16=runtime == "openvino")
                for key, value in measured.items():
                    model_figures.setdefault(key, []).append(value)
                figures["limit"].append(measured["folded"])
                seconds, steady, startup, caches[precision] = measure_extract(
                    name, size, root, work / f"cache-{name}-{precision}", args.batch_size,
                    precision, runtime)
                figures["extract"].append(args.n / seconds)
                figures["steady"].append(steady)
                figures["startup"].append(startup)
                if with_ov:
                    figures["limit_ov"].append(measured["openvino"])
                    ov_dir = work / f"cache-{name}-openvino"
                    seconds, steady, startup, _ = measure_extract(
                        name, size, root, ov_dir, args.batch_size, precision, "openvino")
                    figures["extract_ov"].append(args.n / seconds)
                    figures["steady_ov"].append(steady)
                    figures["startup_ov"].append(startup)
                    figures["startup_ov_saved"].append(measure_saved_startup(
                        name, size, root, ov_dir, args.batch_size, steady))
                if precision == "float32" and not args.no_keras:
                    seconds, steady, startup = measure_keras_recipe(spec, size, root,
                                                                    args.batch_size)
                    figures["keras"].append(args.n / seconds)
                    figures["keras_steady"].append(steady)
                    figures["keras_startup"].append(startup)
            rate = {k: statistics.median(v) for k, v in figures.items() if v}
            model = {k: statistics.median(v) for k, v in model_figures.items()}
            emit(name, f"limit_unfolded{tag}_img_per_s", model["unfolded"])
            emit(name, f"limit{tag}_img_per_s", model["folded"])
            emit(name, f"fold{tag}_speedup", model["folded"] / model["unfolded"])
            emit(name, f"fold{tag}_max_rel_diff", f"{max(model_figures['max_rel_diff']):.2e}")
            for key in ("build_s", "fold_s", "trace_unfolded_s", "trace_folded_s"):
                emit(name, f"{key[:-2]}{tag}_s", model[key])
            emit(name, f"extract{tag}_img_per_s", rate["extract"])
            emit(name, f"extract{tag}_over_limit", rate["extract"] / rate["limit"])
            emit(name, f"extract{tag}_steady_img_per_s", rate["steady"])
            emit(name, f"extract{tag}_steady_over_limit", rate["steady"] / rate["limit"])
            emit(name, f"extract{tag}_startup_s", rate["startup"])
            # what the end-to-end ratio becomes on a dataset of 2,000 images
            emit(name, f"extract{tag}_over_limit_at_2000",
                 at_images(2000, rate["steady"], rate["startup"]) / rate["limit"])
            if "keras" in rate:
                emit(name, "keras_img_per_s", rate["keras"])
                emit(name, "extract_over_keras", rate["extract"] / rate["keras"])
                emit(name, "keras_steady_img_per_s", rate["keras_steady"])
                emit(name, "keras_startup_s", rate["keras_startup"])
                # both projected to 2,000 images from their steady rates and start-ups
                emit(name, "extract_over_keras_at_2000",
                     at_images(2000, rate["steady"], rate["startup"])
                     / at_images(2000, rate["keras_steady"], rate["keras_startup"]))
            if "limit_ov" in rate:
                emit_openvino(name, rate, model, model_figures, "keras" in rate)
            if precision == "float32":
                decode_ms = measure_decoding(spec, size, root)
                emit(name, "decode_ms_per_image_one_core", decode_ms)
                emit(name, "decode_img_per_s_per_core", 1e3 / decode_ms)
                # how many cores must decode to keep the model alone busy (the decoding
                # threads do nothing else; the batch assembly is not counted)
                emit(name, "decode_cores_to_feed_limit", rate["limit"] * decode_ms / 1e3)
                pipeline, threads = measure_pipeline(spec, size, root, args.batch_size)
                emit(name, "pipeline_img_per_s", pipeline)
                emit(name, "pipeline_threads", threads)
                # the share of the decoding threads' cores that reaches the model
                emit(name, "pipeline_over_decode_cores", pipeline * decode_ms / 1e3 / threads)
                emit(name, "pipeline_over_limit", pipeline / rate["limit"])
                emit(name, "load_average_1min", os.getloadavg()[0])
                extract_seconds = args.n / rate["extract"]
                if args.image_size is None:
                    native_rates[name] = rate["extract"]
                emit(name, "extract_s", extract_seconds)
                fit_heads(caches["float32"], name, extract_seconds, work / "runs", heads)
            else:
                emit_bf16(name, tag, runtime, rate, model, figures_fp32)
                emit(name, f"decode_cores_to_feed_limit{tag}",
                     rate["limit"] * decode_ms / 1e3)
                paths_a, a = all_features(caches["float32"])
                paths_b, b = all_features(caches[precision])
                assert paths_a == paths_b
                emit(name, f"cosine{tag}_vs_float32", f"{mean_cosine(a, b):.5f}")
                emit(name, "logreg_test_accuracy_float32",
                     logreg_accuracy(caches["float32"]))
                emit(name, f"logreg_test_accuracy{tag}", logreg_accuracy(caches[precision]))
            if precision == "float32":
                figures_fp32 = rate
                if bf16_refused:  # said per backbone, where its bf16 figures would be
                    emit(name, "bf16", f"not available here: {bf16_reason}")

    sizes = [int(s) for s in args.memory_sizes.split(",") if s.strip()]
    peaks = []
    for n in sizes:
        mem_root = make_dataset(work / f"photos-{n}", n, seed=1)
        peak, seconds = measure_memory(mem_root, args.memory_backbone, args.memory_image_size,
                                       work / f"cache-memory-{n}", args.batch_size)
        peaks.append(peak)
        emit(f"memory_{n}", "peak_rss_mb", peak)
        emit(f"memory_{n}", "seconds", seconds)
    if len(peaks) >= 2:
        emit("memory", "growth", peaks[-1] / peaks[0])
    if sizes and heads and args.memory_backbone in native_rates:
        # Fitting time hardly depends on the image size, extraction time does: compare the
        # fits on the largest cache with extracting it at native size (the measured rate).
        n = sizes[-1]
        cache = probe.list_caches(work / f"cache-memory-{n}")[0]
        fit_heads(cache, f"fit_{n}", n / native_rates[args.memory_backbone], work / "runs",
                  heads)
    emit("total", "seconds", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
