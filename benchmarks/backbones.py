"""Extraction rate of today's backbones through probe against the plain Keras / KerasHub
recipe, random weights, batch 32.

Backbones: a ViT-S/14-sized DINOv2 (KerasHub `DINOV2Backbone`: hidden 384, 12 layers, 6
heads, patch 14, image 224; saved as a preset directory with its image converter and read
by probe as `--backbone DIR`), `convnext_tiny` and `efficientnetv2b0` (keras.applications,
`--weights none`). For each, in alternating rounds on the same N generated JPEGs:

- probe: `probe.extract` end to end (decode the files, resize, preprocess, run the
  backbone on probe's runtime, write the cache), each round into a fresh cache file; the
  runtime's converted model is made by one warm-up extraction before the rounds, as a
  second extraction finds it on disk;
- keras: the plain recipe on pixels already decoded in memory (no file reading): for
  DINOv2 `backbone.predict(converter(pixels), batch_size=32)` with the preset loaded by
  `keras_hub.models.Backbone.from_preset`; for the applications `model.predict(
  preprocess_input(pixels), batch_size=32)` with `include_top=False, pooling="avg"`.

- probe_model: the backbone as probe's extraction runs it (`runtime.load_backbone`: on
  OpenVINO or TensorFlow) on the same in-memory pixels, batch by batch: the model-level
  comparison with keras, without decoding.

Every figure on its own line, `<scope> <figure> <value>`: the rates (images/s, median of
the rounds), probe's runtime, and the ratios probe_over_keras and probe_model_over_keras.
The keras figure leaves out decoding, which probe's includes: a probe_over_keras of 1 means
probe's whole extraction runs as fast as the plain recipe's model calls alone.

    python benchmarks/backbones.py --n 64 --rounds 3
    python benchmarks/backbones.py --tiny --n 4 --rounds 1      # a smoke run: tiny sizes
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import extract as bench  # noqa: E402  (the dataset, `emit` and `machine` of extract.py)

import probe  # noqa: E402
from probe import data  # noqa: E402

BACKBONES = ("dinov2_vits14", "convnext_tiny", "efficientnetv2b0")
BATCH_SIZE = 32
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def save_dinov2(directory: Path, tiny: bool) -> int:
    """A random DINOv2 with ViT-S/14's sizes (tiny: 1 layer, hidden 16, 28 pixels) and its
    converter (ImageNet mean and std), saved as a preset; returns its image size."""
    import keras
    import keras_hub

    size = 28 if tiny else 224
    sizes = (dict(num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32) if tiny else
             dict(num_layers=12, hidden_dim=384, num_heads=6, intermediate_dim=1536))
    keras.utils.set_random_seed(0)
    keras_hub.models.DINOV2Backbone(
        patch_size=14, image_shape=(size, size, 3), position_embedding_shape=(size, size, 3),
        layer_scale_init_value=1.0, **sizes).save_to_preset(str(directory))
    keras_hub.layers.DINOV2ImageConverter(
        image_size=(size, size), scale=list(1 / (255 * IMAGENET_STD)),
        offset=list(-IMAGENET_MEAN / IMAGENET_STD)).save_to_preset(str(directory))
    return size


def plain_recipe(name: str, preset: Path, size: int):
    """The plain recipe's model and input function: pixels (N, size, size, 3) -> what the
    model takes (the converter's output; the application's preprocess_input)."""
    import keras

    if name.startswith("dinov2"):
        import keras_hub

        backbone = keras_hub.models.Backbone.from_preset(str(preset))
        converter = keras_hub.layers.ImageConverter.from_preset(str(preset))
        return backbone, lambda pixels: {"images": converter(pixels)}
    spec = probe.backbones.get(name)
    constructor = getattr(keras.applications, spec.constructor)
    model = constructor(weights=None, include_top=False, input_shape=(size, size, 3),
                        pooling="avg")
    module = getattr(keras.applications, spec.module)
    return model, module.preprocess_input


def measure(name: str, root: Path, workdir: Path, rounds: int, tiny: bool,
            runtime: str) -> dict:
    """Both rates of one backbone (median over the rounds, alternating) and probe's runtime."""
    preset = workdir / f"{name}-preset"
    if name.startswith("dinov2"):
        size = save_dinov2(preset, tiny)
        options = dict(backbone=preset)
    else:
        size = 32 if tiny else probe.backbones.get(name).native_size
        options = dict(backbone=name, weights="none", image_size=size)
    cache_dir = workdir / f"{name}-caches"
    options.update(cache_dir=cache_dir, batch_size=BATCH_SIZE, val_fraction=0,
                   test_fraction=0, runtime=runtime)
    for cache in cache_dir.glob("*.h5"):  # left by an earlier run in the same --workdir
        cache.unlink()
    _, report = probe.extract_with_report(root, **options)  # warm-up: converts the model
    pixels = np.stack([data.load_image(path, size) for path in bench.samples_in_order(root)])
    pixels = pixels.astype("float32")
    model, inputs = plain_recipe(name, preset, size)
    model.predict(inputs(pixels[:BATCH_SIZE]), batch_size=BATCH_SIZE, verbose=0)  # warm-up
    backbone, batches = probe_model(options, pixels, cache_dir)
    backbone.predict_on_batch(batches[0])  # warm-up
    probe_rates, model_rates, keras_rates = [], [], []
    for _ in range(rounds):
        for cache in cache_dir.glob("*.h5"):  # a fresh cache: every image extracted again
            cache.unlink()
        start = time.perf_counter()
        probe.extract(root, **options)
        probe_rates.append(len(pixels) / (time.perf_counter() - start))
        start = time.perf_counter()
        for batch in batches:
            backbone.predict_on_batch(batch)
        model_rates.append(len(pixels) / (time.perf_counter() - start))
        start = time.perf_counter()
        model.predict(inputs(pixels), batch_size=BATCH_SIZE, verbose=0)
        keras_rates.append(len(pixels) / (time.perf_counter() - start))
    return {"probe": statistics.median(probe_rates), "keras": statistics.median(keras_rates),
            "model": statistics.median(model_rates), "runtime": report.runtime,
            "image_size": size}


def probe_model(options: dict, pixels: np.ndarray, cache_dir: Path) -> tuple:
    """The backbone as probe's extraction runs it (its runtime; the converted model read
    from `cache_dir`) and the pixels in batches, preprocessed for it."""
    from probe.features import runtime as runtime_mod
    from probe.settings import ExtractionSettings

    keys = ("backbone", "weights", "image_size", "batch_size", "runtime")
    extraction = ExtractionSettings.create(**{k: options[k] for k in keys if k in options})
    backbone = runtime_mod.load_backbone(extraction, cache_dir)
    inputs = np.asarray(extraction.spec.preprocess_input(pixels), np.float32)
    return backbone, [inputs[i:i + BATCH_SIZE] for i in range(0, len(inputs), BATCH_SIZE)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="images (generated JPEGs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--runtime", default="auto", help="probe's runtime (auto, tensorflow, "
                        "openvino)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    bench.emit("machine", "cpu", bench.machine())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="probe-backbones-"))
    root = bench.make_dataset(workdir / "photos", args.n)
    try:
        for name in [b.strip() for b in args.backbones.split(",") if b.strip()]:
            rates = measure(name, root, workdir, args.rounds, args.tiny, args.runtime)
            bench.emit(name, "image_size", rates["image_size"])
            bench.emit(name, "probe_runtime", rates["runtime"])
            bench.emit(name, "probe_img_per_s", float(rates["probe"]))
            bench.emit(name, "probe_model_img_per_s", float(rates["model"]))
            bench.emit(name, "keras_img_per_s", float(rates["keras"]))
            bench.emit(name, "probe_over_keras", float(rates["probe"] / rates["keras"]))
            bench.emit(name, "probe_model_over_keras", float(rates["model"] / rates["keras"]))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
