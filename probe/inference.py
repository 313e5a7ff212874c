"""Prediction on new images and export of one end-to-end Keras model.

Both use exactly what the run's cache used: the same decoding (`data.load_image`), input
size, backbone weights, pooling and the backbone's own preprocessing.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from . import backbones, data
from .errors import ProbeError, RunError, WeightsError
from .runs import MODEL_FILE, Run

# Keras' preprocess_input as an affine map per channel: out[c] = sum_k x[k] * W[k, c] + b[c]
_MEANS_CAFFE_BGR = (103.939, 116.779, 123.68)
_MEANS_TORCH = (0.485, 0.456, 0.406)
_STDS_TORCH = (0.229, 0.224, 0.225)


@dataclass
class Prediction:
    """One image's prediction, or the reason it could not be read."""

    path: str
    predicted: str | None
    probabilities: dict[str, float] | None
    error: str | None = None


def preprocessing_weights(mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Kernel (3, 3) and bias (3,) of Keras' `preprocess_input` for a mode, as one affine
    map on RGB pixels in 0..255."""
    if mode == "caffe":  # RGB -> BGR, then subtract the ImageNet means
        kernel = np.eye(3)[:, ::-1]
        bias = -np.asarray(_MEANS_CAFFE_BGR)
    elif mode == "torch":  # /255, then standardise with the ImageNet mean and std
        kernel = np.diag(1.0 / (255.0 * np.asarray(_STDS_TORCH)))
        bias = -np.asarray(_MEANS_TORCH) / np.asarray(_STDS_TORCH)
    elif mode == "tf":  # to [-1, 1]
        kernel = np.eye(3) / 127.5
        bias = -np.ones(3)
    else:
        raise ProbeError(f"expected preprocessing 'caffe', 'torch' or 'tf'. Received: mode='{mode}'")
    return kernel.astype(np.float32), bias.astype(np.float32)


def preprocessing_layer(mode: str):
    """A frozen 1x1 convolution doing the backbone's `preprocess_input`: a built-in layer,
    so the exported model loads with plain `keras.saving.load_model`."""
    from ._keras import keras

    kernel, bias = preprocessing_weights(mode)
    layer = keras.layers.Conv2D(3, 1, name=f"preprocess_input_{mode}", trainable=False)
    layer.build((None, None, None, 3))
    layer.set_weights([kernel.reshape(1, 1, 3, 3), bias])
    return layer


def rebuild_backbone(config: dict):
    """The run's backbone with the weights its cache was extracted with."""
    spec = backbones.get(config["backbone"])
    identity = str(config.get("weights") or "imagenet")
    seed = int(config.get("split_seed") or 0)
    if identity.startswith("file:"):
        weights = config.get("weights_source") or ""
        if not Path(weights).is_file() or backbones.weights_identity(weights, seed) != identity:
            raise WeightsError(
                f"the run's backbone needs the weights file it was extracted with ({identity}); "
                f"put it back at '{weights}' or extract again with other weights. "
                f"Received: weights='{weights}'"
            )
    else:
        weights = "none" if identity.startswith("random") else "imagenet"
    return spec.build(weights=weights, image_size=config["image_size"],
                      pooling=config["pooling"], seed=seed)


def end_to_end(config: dict, head, backbone_model=None):
    """RGB image (0-255, the run's input size) -> class probabilities, as one Keras model:
    preprocessing, backbone, and the head's Keras form (`head.keras_head()`)."""
    from ._keras import keras

    backbone_model = backbone_model or rebuild_backbone(config)
    size = int(config["image_size"])
    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = preprocessing_layer(config["preprocessing"])(inputs)
    x = backbone_model(x, training=False)
    if len(backbone_model.output_shape) > 2:
        x = keras.layers.Flatten(name="flatten_features")(x)
    outputs = head.keras_head()(x)
    return keras.Model(inputs, outputs, name=f"probe_{config['backbone']}_{config['head']}")


def load_model(run: Run):
    """The run's end-to-end model: the fine-tuned model, or backbone + head."""
    if run.is_finetuned:
        from ._keras import keras

        try:
            return keras.saving.load_model(run.path / MODEL_FILE, safe_mode=True, compile=False)
        except Exception as error:
            raise RunError(
                f"the model file '{run.path / MODEL_FILE}' can not be loaded "
                f"({type(error).__name__}); re-run `probe finetune`."
            ) from None
    return end_to_end(run.config, run.load_head())


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named directly or found under directories, in a stable order."""
    images: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found, _ = data.find_images(path)
            images.extend(found)
        elif path.exists():
            images.append(path)
        else:
            raise ProbeError(f"expected image files or directories; no such path. Received: '{item}'")
    if not images:
        raise ProbeError(
            f"expected at least one image file; found none. Received: {[str(i) for i in inputs]}"
        )
    return images


def predict(
    run: str | os.PathLike | Run,
    inputs: Iterable[str | os.PathLike],
    batch_size: int = 32,
    output: str | os.PathLike | None = None,
) -> list[Prediction]:
    """Predict the class of every image under `inputs` with a run's model. A file that can
    not be decoded gets a row with the reason; the others are still predicted.

    >>> probe.predict(".probe/runs/20260101-120000-vgg16-logreg", ["new_photos/"])
    """
    run = run if isinstance(run, Run) else Run.load(run)
    images = collect_images(inputs)
    model = load_model(run)
    size = int(run.config["image_size"])
    classes = run.classes
    results: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        pixels, good = [], []
        for path in batch:
            try:
                pixels.append(data.load_image(path, size))
                good.append(path)
            except data.BadImage as error:
                results.append(Prediction(str(path), None, None, str(error)))
        if not good:
            continue
        proba = np.asarray(model.predict_on_batch(np.stack(pixels).astype(np.float32)))
        for path, row in zip(good, proba):
            results.append(Prediction(str(path), classes[int(np.argmax(row))],
                                      {c: float(v) for c, v in zip(classes, row)}))
    order = {str(path): i for i, path in enumerate(images)}
    results.sort(key=lambda r: order[r.path])
    if output is not None:
        write_predictions(results, classes, output)
    return results


def write_predictions(results: list[Prediction], classes: list[str], output: str | os.PathLike) -> Path:
    """CSV: path, predicted class, one probability column per class, error."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "predicted", *classes, "error"])
        for r in results:
            probabilities = [f"{r.probabilities[c]:.6f}" for c in classes] if r.probabilities else [""] * len(classes)
            writer.writerow([r.path, r.predicted or "", *probabilities, r.error or ""])
    return path


def export(run: str | os.PathLike | Run, out: str | os.PathLike) -> Path:
    """Write one Keras model: RGB image in (0-255, the run's input size), probabilities out.

    >>> probe.export(".probe/runs/20260101-120000-vgg16-logreg", "cats_dogs.keras")
    """
    run = run if isinstance(run, Run) else Run.load(run)
    out = Path(out).expanduser()
    if out.suffix != ".keras":
        raise ProbeError(f"expected an output file ending in .keras. Received: out='{out}'")
    model = load_model(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp.keras")
    try:
        model.save(temporary)
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return out
