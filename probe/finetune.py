"""Fine-tuning: the backbone and a trained head become one model, the top blocks of the
backbone are unfrozen, and the model trains end to end on the images.

Everything comes from the source run and its cache: the splits (the same train /
validation / test images, by their cached paths), the class names, the decoding
(`data.load_image`), the input size, the backbone weights and its preprocessing. The
result is a new run directory whose `model.keras` `probe predict` and `probe export` use.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import backbones, data, report
from .cache import FeatureCache
from .errors import DatasetError, FinetuneError, RunError
from .heads import check_params, keras_class_weight
from .runs import MODEL_FILE, Run, write_split_predictions, new_run_dir, run_config, write_run_files

Progress = Callable[[str, dict], None]

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "top5_accuracy")
_ESTIMATE_AFTER = 3  # batches: the first one also builds the training graph
_PIXEL_CACHE_BYTES = 512 * 2**20  # decoded images kept in memory between epochs


def finetune(
    run: str | os.PathLike | Run,
    unfreeze: int = 1,
    *,
    epochs: int = 10,
    learning_rate: float = 1e-5,
    batch_size: int = 16,
    augment: bool = True,
    patience: int = 3,
    seed: int = 0,
    runs_dir: str | os.PathLike | None = None,
    progress: Progress | bool | None = None,
) -> Run:
    """Fine-tune a run's backbone and head end to end on its images; a new run.

    The last `unfreeze` top blocks of the backbone train (1 = the last block), with every
    BatchNormalization layer frozen in inference mode; the head starts from the run's
    trained head's Keras form (`keras_head()`; a k-NN head is refused). Training uses
    Adam with a low `learning_rate`, random flips, small rotations and zooms
    (`augment=False`: none) and early stopping on validation loss that restores the best
    weights. `progress`: None prints a start line, a time estimate and one line per epoch
    to stderr; False prints nothing; a callable receives `(event, info)` for the events
    "start", "estimate", "batch", "epoch" and "end".

    >>> run = probe.finetune(".probe/runs/20260101-120000-vgg16-dense", unfreeze=1)
    >>> run.metrics["before"]["accuracy"], run.metrics["accuracy"]
    """
    from ._keras import keras

    source = run if isinstance(run, Run) else Run.load(run)
    check_params(FinetuneError, epochs=epochs, learning_rate=learning_rate,
                 batch_size=batch_size, patience=patience)
    if source.is_finetuned:
        raise FinetuneError(
            f"expected a run written by `probe fit`; '{source.path}' is already fine-tuned. "
            f"Fine-tune its source run ({source.config.get('finetune', {}).get('source_run')}) "
            f"with other settings instead. Received: run='{source.path}'"
        )
    config = source.config
    spec = backbones.get(config["backbone"])
    unfreeze = spec.check_unfreeze(unfreeze)
    report_to = _reporter(progress)

    cache = _open_cache(source)
    splits = {name: _images(cache, name) for name in ("train", "val", "test") if name in cache.counts}
    evaluation = "test" if "test" in splits else "val"
    if "val" not in splits:
        raise FinetuneError(
            f"expected a validation split for early stopping; the run's cache '{cache.path}' "
            "has none. Extract with --val-fraction > 0 or add a val/ folder."
        )

    from . import inference

    head = source.load_head()
    refusal = head.finetune_refusal()
    if refusal:
        raise FinetuneError(f"{refusal} Received: run='{source.path}' with head {config['head']!r}")
    backbone_model = inference.rebuild_backbone(config)
    unfrozen = spec.unfreeze(backbone_model, unfreeze)
    keras.utils.set_random_seed(int(seed))
    model = inference.end_to_end(config, head, backbone_model)
    size = int(config["image_size"])
    pixels = _PixelCache(size)
    classes = list(config["classes"])

    def sequence(split: str, training: bool):
        paths, labels = splits[split]
        return _ImageSequence(paths, labels, pixels, batch_size, shuffle=training, seed=seed)

    before = _evaluate(model, sequence(evaluation, False), splits[evaluation][1], classes)

    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = inputs
    if augment:
        x = keras.layers.RandomFlip("horizontal", seed=seed, name="augment_flip")(x)
        x = keras.layers.RandomRotation(0.05, seed=seed, name="augment_rotation")(x)
        x = keras.layers.RandomZoom(0.1, seed=seed, name="augment_zoom")(x)
    trainer = keras.Model(inputs, model(x), name="finetune_trainer")
    trainer.compile(optimizer=keras.optimizers.Adam(learning_rate=float(learning_rate)),
                    loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    trainable = int(sum(np.prod(w.shape) for w in trainer.trainable_weights))

    train_sequence, val_sequence, device = sequence("train", True), sequence("val", False), _device()
    report_to("start", {
        "backbone": spec.name, "blocks": unfrozen, "trainable_parameters": trainable,
        "train": len(splits["train"][0]), "val": len(splits["val"][0]), "epochs": int(epochs),
        "steps": len(train_sequence), "device": device,
    })
    class_weight = keras_class_weight((config.get("head_params") or {}).get("class_weight"),
                                      splits["train"][1], len(classes))
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=int(patience),
                                      restore_best_weights=True),
        _ProgressCallback(report_to, int(epochs), len(train_sequence), len(val_sequence), device),
    ]
    started = time.perf_counter()
    history = trainer.fit(train_sequence, validation_data=val_sequence,
                          epochs=int(epochs), class_weight=class_weight, callbacks=callbacks,
                          verbose=0)
    fit_seconds = time.perf_counter() - started
    history = {key: [float(v) for v in values] for key, values in history.history.items()}
    best_epoch = int(np.argmin(history["val_loss"])) + 1 if history.get("val_loss") else len(history["loss"])
    report_to("end", {"best_epoch": best_epoch, "epochs_run": len(history["loss"]),
                      "seconds": fit_seconds})

    paths, labels = splits[evaluation]
    proba = _predict(model, sequence(evaluation, False))
    after = report.compute_metrics(labels, proba, classes)
    metrics = {
        "split": evaluation,
        **after,
        "before": {key: before[key] for key in HEADLINE if key in before},
        "comparison": {key: {"before": before[key], "after": after[key]}
                       for key in HEADLINE if key in after},
        "fit_seconds": round(fit_seconds, 3),
        "best_epoch": best_epoch,
        "epochs_run": len(history["loss"]),
    }

    directory = new_run_dir(runs_dir or source.path.parent, spec.name,
                            f"{config['head']}-finetune{unfreeze}")
    settings = {
        "source_run": str(source.path.resolve()), "unfreeze": int(unfreeze),
        "blocks": unfrozen, "epochs": int(epochs), "learning_rate": float(learning_rate),
        "batch_size": int(batch_size), "augment": bool(augment), "patience": int(patience),
        "seed": int(seed), "trainable_parameters": trainable,
        "before": "the source run's head on the same images, recomputed end to end",
    }
    new_config = run_config(cache, head=config["head"], head_params=config.get("head_params"),
                            finetune=settings, fit_seconds=fit_seconds)
    model.save(directory / MODEL_FILE)
    write_run_files(directory, new_config, metrics, history)
    write_split_predictions(directory / "test_predictions.csv",
                            [str(p) for p in cache.paths(evaluation)], labels, proba, classes)
    return Run(directory, new_config, metrics)


def comparison_rows(metrics: dict) -> list[dict]:
    """Before / after rows of a fine-tuned run's metrics, for a table."""
    return [{"metric": key, "before": values["before"], "after": values["after"]}
            for key, values in metrics.get("comparison", {}).items()]


# --------------------------------------------------------------------------- #
# The images
# --------------------------------------------------------------------------- #


def _open_cache(source: Run) -> FeatureCache:
    path = source.config.get("cache")
    if not path:
        raise RunError(f"the run '{source.path}' does not name its cache; re-run `probe fit`.")
    cache = FeatureCache.open(path)
    if cache.attrs.get("feature_key") != source.config.get("feature_key"):
        raise FinetuneError(
            f"the cache '{cache.path}' was rebuilt with other settings since the run was fit; "
            f"run `probe fit` on it again, then fine-tune. Received: run='{source.path}'"
        )
    return cache


def _images(cache: FeatureCache, split: str) -> tuple[list[Path], np.ndarray]:
    """Absolute paths and labels of one split, as the cache recorded them."""
    root = Path(cache.attrs["dataset_root"])
    relative, labels = cache.index(split)
    paths = [root / p for p in relative]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(
            f"fine-tuning reads the images the cache was extracted from; {len(missing)} of the "
            f"{split} images are gone (first: '{missing[0]}'). Put them back under "
            f"'{root}' or extract again. Received: cache='{cache.path}'"
        )
    return paths, labels


class _PixelCache:
    """Decodes with `data.load_image` (the decoding of the cache) and keeps the pixels of
    up to `_PIXEL_CACHE_BYTES` between epochs."""

    def __init__(self, size: int):
        self.size = size
        self.pixels: dict[Path, np.ndarray] = {}
        self.bytes = 0

    def __call__(self, path: Path) -> np.ndarray:
        found = self.pixels.get(path)
        if found is not None:
            return found
        try:
            pixels = data.load_image(path, self.size)
        except data.BadImage as error:
            raise DatasetError(
                f"the image '{path}' can no longer be decoded ({error}); it was read when "
                "the cache was extracted. Restore it or extract again."
            ) from None
        if self.bytes + pixels.nbytes <= _PIXEL_CACHE_BYTES:
            self.pixels[path] = pixels
            self.bytes += pixels.nbytes
        return pixels


def _image_sequence_class():
    from ._keras import keras

    class ImageSequence(keras.utils.PyDataset):
        """Batches of (pixels 0-255 float32, labels) in a seeded order per epoch."""

        def __init__(self, paths, labels, pixels, batch_size, shuffle, seed):
            super().__init__(workers=1, use_multiprocessing=False)
            self.paths, self.labels, self.pixels = list(paths), np.asarray(labels), pixels
            self.batch_size, self.shuffle = int(batch_size), shuffle
            self.rng = np.random.default_rng(seed)
            self.order = np.arange(len(self.paths))
            self.on_epoch_end()

        def __len__(self):
            return -(-len(self.paths) // self.batch_size)

        def __getitem__(self, index):
            rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
            x = np.stack([self.pixels(self.paths[i]) for i in rows]).astype(np.float32)
            return x, self.labels[rows]

        def on_epoch_end(self):
            if self.shuffle:
                self.order = self.rng.permutation(len(self.paths))

    return ImageSequence


def _ImageSequence(*args, **kwargs):
    return _image_sequence_class()(*args, **kwargs)


def _predict(model, sequence) -> np.ndarray:
    from ._keras import keras

    chunks = [keras.ops.convert_to_numpy(model(sequence[i][0], training=False))
              for i in range(len(sequence))]
    return np.concatenate(chunks).astype(np.float64)


def _evaluate(model, sequence, labels, classes) -> dict:
    return report.compute_metrics(labels, _predict(model, sequence), classes)


# --------------------------------------------------------------------------- #
# Settings, progress and the time estimate
# --------------------------------------------------------------------------- #


def _device() -> str:
    from ._keras import keras  # noqa: F401  (imports TensorFlow quietly)
    import tensorflow as tf

    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def format_duration(seconds: float) -> str:
    """12 s, 3 min, 1.5 h."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def estimate_line(info: dict) -> str:
    """The time estimate as one sentence."""
    return (f"about {format_duration(info['seconds_per_epoch'])} per epoch on this machine "
            f"({info['device']}): about {format_duration(info['seconds_total'])} for "
            f"{_epochs(info['epochs'])}")


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def start_line(info: dict) -> str:
    slow = " On a CPU this is slow." if info["device"] == "CPU" else ""
    return (f"Fine-tuning {info['backbone']} with {', '.join(info['blocks'])} unfrozen "
            f"({info['trainable_parameters']:,} trainable parameters) on {info['train']} "
            f"training images, up to {_epochs(info['epochs'])}.{slow}")


def epoch_line(info: dict) -> str:
    logs = info["logs"]
    parts = [f"{key} {logs[key]:.4f}" for key in ("loss", "accuracy", "val_loss", "val_accuracy")
             if key in logs]
    return f"epoch {info['epoch']}/{info['epochs']}: " + ", ".join(parts)


def _reporter(progress: Progress | bool | None) -> Progress:
    if callable(progress):
        return progress
    if progress is False:
        return lambda event, info: None

    def to_stderr(event: str, info: dict) -> None:
        line = {"start": start_line, "estimate": estimate_line, "epoch": epoch_line}.get(event)
        if line is not None:
            print(line(info), file=sys.stderr, flush=True)

    return to_stderr


def _progress_callback_class():
    from ._keras import keras

    class ProgressCallback(keras.callbacks.Callback):
        """Reports batches and epochs, and after the first few batches an estimate of the
        time per epoch (training batches plus a validation pass)."""

        def __init__(self, report_to, epochs, steps, val_steps, device):
            super().__init__()
            self.report_to, self.epochs, self.steps = report_to, epochs, steps
            self.val_steps, self.device = val_steps, device
            self.epoch = 0
            self.times: list[float] = []
            self.estimated = False

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch + 1

        def on_train_batch_begin(self, batch, logs=None):
            self.batch_started = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self.batch_started)
            self.report_to("batch", {"epoch": self.epoch, "epochs": self.epochs,
                                     "step": batch + 1, "steps": self.steps})
            if not self.estimated and len(self.times) >= min(_ESTIMATE_AFTER, self.steps):
                self.estimated = True
                # the first batch also builds the graph: leave it out when there are others
                per_batch = float(np.mean(self.times[1:] or self.times))
                # a validation batch is a forward pass only: about a third of a training batch
                per_epoch = per_batch * (self.steps + self.val_steps / 3)
                self.report_to("estimate", {"seconds_per_epoch": per_epoch,
                                            "seconds_total": per_epoch * self.epochs,
                                            "epochs": self.epochs, "device": self.device})

        def on_epoch_end(self, epoch, logs=None):
            self.report_to("epoch", {"epoch": epoch + 1, "epochs": self.epochs,
                                     "logs": {k: float(v) for k, v in (logs or {}).items()}})

    return ProgressCallback


def _ProgressCallback(*args):
    return _progress_callback_class()(*args)
