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

from . import backbones, calibration, data, files, settings
from .errors import ProbeError, RunError
from .runs import MODEL_FILE, Run
from .task import Task


@dataclass
class Prediction:
    """One image's prediction, or the reason it could not be read."""

    path: str
    predicted: str | None  # multi-label: the predicted labels joined by ";"
    probabilities: dict[str, float] | None
    error: str | None = None
    labels: list[str] | None = None  # multi-label: the classes at or above their thresholds


def _prediction(path: Path, row: np.ndarray, classes: list[str], task: Task,
                thresholds: np.ndarray | None) -> Prediction:
    """One image's prediction: the most probable class, or (multi-label) every class whose
    probability reaches its threshold."""
    predicted, labels = task.decide(row, classes, thresholds)
    return Prediction(str(path), predicted, {c: float(v) for c, v in zip(classes, row)},
                      labels=labels)


def preprocessing_weights(mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Kernel (3, 3) and bias (3,) of Keras' `preprocess_input` for a mode, as one affine
    map on RGB pixels in 0..255 (derived from `backbones.PREPROCESSING`)."""
    if mode not in backbones.PREPROCESSING:
        raise ProbeError(f"expected preprocessing {', '.join(map(repr, backbones.PREPROCESSING))}. "
                         f"Received: mode='{mode}'")
    return backbones.PREPROCESSING[mode].affine()


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
    """The run's backbone with exactly the settings its cache was extracted with (read by
    `ExtractionSettings.from_attrs`: weights, their seed or file checksum, size, pooling)."""
    extraction = settings.ExtractionSettings.from_attrs(config)
    weights = extraction.weights
    return extraction.spec.build(weights=weights.source, image_size=extraction.image_size,
                                 pooling=extraction.pooling, seed=weights.seed)


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


def with_temperature(model, temperature: float):
    """`model` (images -> probabilities p) followed by the run's temperature:
    softmax(log max(p, 1e-30) / T), as `calibration.apply_temperature` computes it, in
    built-in operations and layers (log, Rescaling, Softmax), so that the exported model
    still loads in safe mode. T == 1 returns `model` itself."""
    if temperature == 1:
        return model
    from ._keras import keras

    logits = keras.ops.log(keras.ops.maximum(model.outputs[0], calibration.SMALLEST))
    scaled = keras.layers.Rescaling(1.0 / temperature, name="temperature")(logits)
    outputs = keras.layers.Softmax(name="calibrated_probabilities")(scaled)
    return keras.Model(model.inputs, outputs, name=model.name)


def load_model(run: Run):
    """The run's end-to-end model: the fine-tuned model, or backbone + head, and then the
    run's temperature (`with_temperature`)."""
    if run.is_finetuned:
        from ._keras import keras

        try:
            model = keras.saving.load_model(run.path / MODEL_FILE, safe_mode=True, compile=False)
        except Exception as error:
            raise RunError(
                f"the model file '{run.path / MODEL_FILE}' can not be loaded "
                f"({type(error).__name__}); re-run `probe finetune`."
            ) from None
        return with_temperature(model, run.temperature)
    return with_temperature(end_to_end(run.config, run.load_head()), run.temperature)


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


def load_images(paths: Iterable[str | os.PathLike], run: str | os.PathLike | Run) -> np.ndarray:
    """The pixels `probe predict` feeds a run's model, as one float32 array
    (N, size, size, 3), RGB 0-255: decoded exactly as predict and the cache decode
    (EXIF orientation, mode conversion, JPEG draft, bilinear resize to the run's size).
    Feed it to the model of `probe export` to reproduce `probe predict` outside probe.
    A file that can not be decoded raises `ProbeError` naming it.

    >>> pixels = probe.load_images(["cat.jpg"], ".probe/runs/20260101-120000-vgg16-logreg")
    >>> keras.saving.load_model("cats_dogs.keras").predict(pixels)
    """
    run = Run.open(run)  # verified again: its files may have changed since
    files = [Path(p) for p in paths]
    pixels, good, errors = _decode(files, int(run.config["image_size"]))
    if errors:
        path, reason = next(iter(errors.items()))
        raise ProbeError(f"expected image files that can be decoded; '{path}' can not be "
                         f"({reason}). Received: {len(errors)} of {len(files)} files failed")
    return pixels


def _decode(paths: list[Path], size: int) -> tuple[np.ndarray, list[Path], dict[str, str]]:
    """Pixels (float32, N x size x size x 3) of the files that decode, those files, and
    the reason of each file that does not."""
    pixels, good, errors = [], [], {}
    for path in paths:
        try:
            pixels.append(data.load_image(path, size))
            good.append(path)
        except data.BadImage as error:
            errors[str(path)] = str(error)
    stacked = (np.stack(pixels).astype(np.float32) if pixels
               else np.zeros((0, size, size, 3), np.float32))
    return stacked, good, errors


class _BackboneThenHead:
    """Preprocessing and backbone as a Keras model, then the head's own `predict_proba`:
    how `predict` runs a head whose Keras form does not fit in memory (a k-NN bank larger
    than memory, which `predict_proba` reads from disk a chunk at a time)."""

    def __init__(self, config: dict, head, temperature: float = 1.0) -> None:
        from ._keras import keras

        backbone_model = rebuild_backbone(config)
        size = int(config["image_size"])
        inputs = keras.Input(shape=(size, size, 3), name="image")
        x = backbone_model(preprocessing_layer(config["preprocessing"])(inputs), training=False)
        if len(backbone_model.output_shape) > 2:
            x = keras.layers.Flatten(name="flatten_features")(x)
        self.features = keras.Model(inputs, x, name=f"probe_{config['backbone']}_features")
        self.head = head
        self.temperature = temperature

    def predict_on_batch(self, pixels: np.ndarray) -> np.ndarray:
        proba = self.head.predict_proba(np.asarray(self.features.predict_on_batch(pixels)))
        return calibration.apply_temperature(proba, self.temperature)


def _predictor(run: Run):
    """What `predict` runs on each batch of pixels: the run's end-to-end Keras model, or
    the backbone then the head where the head's Keras form does not fit in memory."""
    if run.is_finetuned:
        return load_model(run)
    head = run.load_head()
    if head.keras_head_fits_in_memory():
        return with_temperature(end_to_end(run.config, head), run.temperature)
    return _BackboneThenHead(run.config, head, run.temperature)


def predict(
    run: str | os.PathLike | Run,
    inputs: Iterable[str | os.PathLike],
    batch_size: int = settings.DEFAULT_BATCH_SIZE,
    output: str | os.PathLike | None = None,
) -> list[Prediction]:
    """Predict the class of every image under `inputs` with a run's model (multi-label:
    `Prediction.labels`, the classes whose probability reaches the threshold recorded in
    the run, and every probability). The probabilities are the run's reported ones: the
    head's divided by the run's temperature (`Run.temperature`, `probe.calibration`).
    A file that can not be decoded gets a row with the reason; the others are still predicted. `output`
    is checked for writing before any work.

    >>> probe.predict(".probe/runs/20260101-120000-vgg16-logreg", ["new_photos/"])
    """
    settings.check_batch_size(batch_size)
    run = Run.open(run)  # verified again: its files may have changed since
    images = collect_images(inputs)
    if output is not None:
        _check_output(Path(output))
    model = _predictor(run)
    size = int(run.config["image_size"])
    classes = run.classes
    task, thresholds = run.task, run.thresholds
    results: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        pixels, good, errors = _decode(images[start:start + batch_size], size)
        results += [Prediction(path, None, None, reason) for path, reason in errors.items()]
        if not good:
            continue
        proba = np.asarray(model.predict_on_batch(pixels))
        results += [_prediction(path, row, classes, task, thresholds) for path, row in zip(good, proba)]
    order = {str(path): i for i, path in enumerate(images)}
    results.sort(key=lambda r: order[r.path])
    if output is not None:
        write_predictions(results, classes, output)
    return results


def _check_output(path: Path) -> None:
    """A ProbeError (one line) when the predictions can not be written to `path`: tried
    by opening it (an existing file is opened for appending, so it is not changed; a new
    one is removed again)."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a" if existed else "x", encoding="utf-8"):
            pass
        if not existed:
            path.unlink()
    except OSError as error:
        raise _output_error(path, error.strerror or str(error)) from None


def _output_error(path: Path, reason: str) -> ProbeError:
    return ProbeError(f"expected a writable file for the predictions; can not write '{path}' "
                      f"({reason}). Choose another file with --output/-o.")


def write_predictions(results: list[Prediction], classes: list[str], output: str | os.PathLike) -> Path:
    """CSV: path, predicted class, one probability column per class, error."""
    path = Path(output)
    try:
        with files.atomic_write(path, "w", newline="", encoding="utf-8",
                                errors="surrogateescape") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "predicted", *classes, "error"])
            for r in results:
                probabilities = ([f"{r.probabilities[c]:.6f}" for c in classes] if r.probabilities
                                 else [""] * len(classes))
                writer.writerow([r.path, r.predicted or "", *probabilities, r.error or ""])
    except OSError as error:
        raise _output_error(path, error.strerror or str(error)) from None
    return path


def export(run: str | os.PathLike | Run, out: str | os.PathLike) -> Path:
    """Write one Keras model: RGB image in (0-255, the run's input size), probabilities out
    (multi-label: one sigmoid probability per class; the decision thresholds are in the
    run's config.json, `Run.thresholds`). The run's temperature (`Run.temperature`) is
    part of the model (`with_temperature`), so it gives what `predict` gives.

    >>> probe.export(".probe/runs/20260101-120000-vgg16-logreg", "cats_dogs.keras")
    """
    run = Run.open(run)  # verified again: its files may have changed since
    out = Path(out).expanduser()
    if out.suffix != ".keras":
        raise ProbeError(f"expected an output file ending in .keras. Received: out='{out}'")
    model = load_model(run)
    with files.atomic_path(out, suffix=".keras") as temporary:
        model.save(temporary)
    return out
