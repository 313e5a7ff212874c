"""Fine-tuning: the backbone and a trained head become one model, the top blocks of the
backbone are unfrozen, and the model trains end to end on the images.

Everything comes from the source run and its cache: the splits (the same train /
validation / test images, by their cached paths), the class names, the decoding
(`data.load_image`), the input size, the backbone weights and its preprocessing. The
result is a new run directory whose `model.keras` `probe predict` and `probe export` use.

Fine-tuning never silently makes things worse: epoch 0 (the starting head on the
backbone, before any training) is the baseline of the early-stopping choice on validation
loss; when no epoch beats it, the new run says so and its model is that baseline.

The baseline and every epoch are judged on validation images that nothing was fit on: the
starting head has seen train only. A source head refit on train + val (`refit=True`, the
default) would score epoch 0 on images it was trained on, an optimistic baseline that
every honestly judged epoch loses to; it is fit again on the cached train features alone,
with the settings the run chose on val (`_starting_head`), and the new run records which
head it started from (`config["finetune"]["start_head"]`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import data, evaluate, hub_backbones, model_backbones
from ._random_state import global_random_state_kept
from .features.cache import FeatureCache
from .errors import DatasetError, FinetuneError, RunError
from .heads import check_params, make_head
from .progress import (BatchDone, Clock, EpochDone, Estimate, FinetuneFinished, FinetuneStarted,
                       NoImprovement, ProgressCallback, Rate, SourceChanged, ValidationScores,
                       emit)
from .runs import (MODEL_FILE, Run, SplitRoles, check_features_fit_in_memory, check_writable,
                   run_config, save_run, train_head, write_run_files)
from .runs import task_temperature, uncalibrated_error, write_reliability  # calibration
from .task import Objective, Task

_PIXEL_CACHE_BYTES = 512 * 2**20  # decoded images kept in memory between epochs


@dataclass(frozen=True)
class FinetuneSettings:
    """The training settings of one fine-tuning, checked once."""

    unfreeze: int
    epochs: int
    learning_rate: float
    batch_size: int
    augment: bool
    patience: int
    seed: int


@dataclass
class _Job:
    """What the training steps share: the source, the images and the models."""

    source: Run
    spec: Any
    cache: FeatureCache
    splits: dict[str, tuple[list[Path], np.ndarray]]
    evaluation: str
    settings: FinetuneSettings
    model: Any = None  # image -> probabilities, saved as model.keras
    trainer: Any = None  # the model behind the augmentation layers, compiled
    blocks: list[str] | None = None
    pixels: Any = None
    start_head: dict | None = None  # which head training started from (`_starting_head`)
    objective: Objective | None = None  # the task's loss, metrics and class weights

    @property
    def classes(self) -> list[str]:
        return list(self.source.config["classes"])

    @property
    def task(self) -> Task:
        """Single- or multi-label, as the training labels are."""
        return Task.of_labels(self.splits["train"][1])

    def ignore(self, split: str) -> np.ndarray | None:
        """Multi-label: the entries left out of a class's metrics (VOC's difficult); None
        when none is (always for single-label)."""
        return self.cache.ignore_mask(split)

    def sequence(self, split: str, training: bool = False):
        paths, labels = self.splits[split]
        return _ImageSequence(paths, labels, self.pixels, self.settings.batch_size,
                              shuffle=training, seed=self.settings.seed)


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
    strict: bool = False,
    progress: ProgressCallback | None = None,
) -> Run:
    """Fine-tune a run's backbone and head end to end on its images; a new run.

    The last `unfreeze` top blocks of the backbone train (1 = the last block), with every
    BatchNormalization layer frozen in inference mode; the head starts from the run's
    trained head's Keras form (`keras_head()`; a k-NN head is refused), fit again on train
    only when the run's head was refit on train + val (`_starting_head`, recorded in
    `config["finetune"]["start_head"]`): val judges every epoch. Training uses
    Adam with a low `learning_rate`, random flips, small rotations and zooms
    (`augment=False`: none) and early stopping on validation loss whose baseline is epoch
    0 (the model before training): the best epoch's weights are kept, and when no epoch
    beats epoch 0 the model stays the starting one (`metrics["best_epoch"] == 0`, and a
    `NoImprovement` event). The source images are checked like `fit` does: a change is a
    `SourceChanged` event, or `SourceChangedError` with `strict=True`. `progress` receives
    the events of the stage "finetune" (probe.progress): `FinetuneStarted`, `BatchDone`
    per batch, `EpochDone` per epoch (with the logs), the notes `Estimate`,
    `SourceChanged`, `ValidationScores`, `NoImprovement`, then `FinetuneFinished`.

    >>> run = probe.finetune(".probe/runs/20260101-120000-vgg16-dense", unfreeze=1)
    >>> run.metrics["before"]["accuracy"], run.metrics["accuracy"]
    """
    source = Run.open(run)  # verified again: its files may have changed since
    settings, spec = _check_settings(source, unfreeze, epochs, learning_rate, batch_size,
                                     augment, patience, seed)
    cache = _open_cache(source)
    _check_source(cache, strict, progress)
    job = _Job(source, spec, cache, *_read_splits(cache, progress), settings)
    runs = Path(runs_dir) if runs_dir else source.path.parent
    check_writable(runs)
    with global_random_state_kept():  # _build_models seeds the globals training draws from
        _build_models(job)
        before = _metrics_of(job, job.evaluation)
        baseline = _baseline_loss(job)
        history, best, fit_seconds = _train(job, baseline, progress)
    return _save(job, runs, before, history, best, baseline, fit_seconds)


def _check_settings(source: Run, unfreeze, epochs, learning_rate, batch_size, augment,
                    patience, seed) -> tuple[FinetuneSettings, Any]:
    """Refuse settings out of range and a run that is already fine-tuned."""
    check_params(FinetuneError, epochs=epochs, learning_rate=learning_rate,
                 batch_size=batch_size, patience=patience)
    if source.is_finetuned:
        raise FinetuneError(
            f"expected a run written by `probe fit`; '{source.path}' is already fine-tuned. "
            f"Fine-tune its source run ({source.config.get('finetune', {}).get('source_run')}) "
            f"with other settings instead. Received: run='{source.path}'"
        )
    spec = _run_spec(source.config)
    settings = FinetuneSettings(spec.check_unfreeze(unfreeze), int(epochs), float(learning_rate),
                                int(batch_size), bool(augment), int(patience), int(seed))
    return settings, spec


def _run_spec(config: dict):
    """The run's backbone spec; a .keras file or a KerasHub preset is found again at its
    recorded path with its recorded sha256 (else an error saying how to get it back), as
    its blocks are read from it (`check_unfreeze`)."""
    if config.get("hub_sha256"):
        preset = hub_backbones.HubPreset.recorded(str(config.get("hub_source") or ""),
                                                  str(config["hub_sha256"]))
        return hub_backbones.resolve(preset, int(config.get("blocks") or 0))
    layers = model_backbones.parse_layers(config.get("layers") or None)
    model_file = None
    if config.get("backbone_sha256"):
        model_file = model_backbones.ModelFile.recorded(str(config.get("backbone_source") or ""),
                                                        str(config["backbone_sha256"]))
    return model_backbones.resolve(str(config["backbone"]), model_file, layers,
                                   str(config.get("preprocessing") or "") if model_file else "")


def _check_source(cache: FeatureCache, strict: bool, progress: ProgressCallback | None) -> None:
    """As `fit`: images changed since extraction are a Note, or an error with `strict`."""
    changes = cache.check_source(strict=strict)
    if changes:
        emit(progress, SourceChanged(message=changes.message()))


def _read_splits(cache: FeatureCache, progress: ProgressCallback | None) -> tuple[dict, str]:
    """The images of every split, and the split that reports (test, else val)."""
    splits = {name: _images(cache, name) for name in data.SPLITS if cache.counts.get(name)}
    if "val" not in splits:
        raise FinetuneError(
            f"expected a validation split for early stopping; the run's cache '{cache.path}' "
            "has none (it was extracted with --val-fraction 0, or by an older probe). Extract "
            "again with --val-fraction 0.15, fit, then fine-tune that run."
        )
    evaluation = "test" if "test" in splits else "val"
    if evaluation == "val":
        emit(progress, ValidationScores(split_role=evaluate.split_role("val")))
    return splits, evaluation


def _build_models(job: _Job) -> None:
    """The end-to-end model (backbone with its top blocks unfrozen, then the head) and
    the compiled trainer that puts the augmentation in front of it."""
    from ._keras import keras

    from . import inference

    config, settings = job.source.config, job.settings
    head = _starting_head(job)
    backbone_model = inference.rebuild_backbone(config)
    job.blocks = job.spec.unfreeze(backbone_model, settings.unfreeze)
    keras.utils.set_random_seed(settings.seed)
    job.model = inference.end_to_end(config, head, backbone_model)
    size = int(config["image_size"])
    job.pixels = _PixelCache(size)
    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = inputs
    if settings.augment:
        x = keras.layers.RandomFlip("horizontal", seed=settings.seed, name="augment_flip")(x)
        x = keras.layers.RandomRotation(0.05, seed=settings.seed, name="augment_rotation")(x)
        x = keras.layers.RandomZoom(0.1, seed=settings.seed, name="augment_zoom")(x)
    job.trainer = keras.Model(inputs, job.model(x), name="finetune_trainer")
    # the task's loss, metrics and class weights, with the source head's class_weight
    job.objective = job.task.objective(
        (config.get("head_params") or {}).get("class_weight"), job.splits["train"][1],
        len(job.classes))
    job.trainer.compile(optimizer=keras.optimizers.Adam(learning_rate=settings.learning_rate),
                        loss=job.objective.loss, metrics=job.objective.metrics)


def _starting_head(job: _Job):
    """The head fine-tuning starts from, one that has seen the train images only, so that
    epoch 0 and every epoch are scored on validation images nothing was fit on. A head
    that never saw val (`refit=False`) is the run's own; a head refit on train + val is
    fit again on the cached train features alone, with the settings the run chose on
    val (`summary_()`: the dense head's epochs, the logistic head's C), its own other
    parameters and seed, and the augmented views it trained on. Sets `job.start_head`."""
    config = job.source.config
    head = job.source.load_head()
    refusal = head.finetune_refusal()
    if refusal:
        raise FinetuneError(f"{refusal} Received: run='{job.source.path}' with head {config['head']!r}")
    params = head.get_params()
    if not params.get("refit"):
        job.start_head = {"trained_on": "train", "head": "the source run's head (refit=False)"}
        return head
    chosen = head.summary_()
    train_only = make_head(config["head"], **{**params, **chosen, "refit": False})
    views = bool((config.get("views") or {}).get("per_image"))
    stream = check_features_fit_in_memory(job.cache, streams=train_only.streams_features,
                                          views=views)
    # select=None: no validation features reach the fit; the report split is not read
    seconds = train_head(train_only, job.cache, SplitRoles(None, job.evaluation), stream,
                         views and not stream)
    job.start_head = {
        "trained_on": "train",
        "head": "the source run's head refit on train only (the source head was refit on "
                "train + val)",
        "chosen_settings": chosen, "views": views and not stream, "fit_seconds": round(seconds, 3)}
    return train_only


def _score(job: _Job, split: str, proba: np.ndarray, thresholds: np.ndarray | None) -> dict:
    """Metrics of ``proba`` on one split (multi-label: at ``thresholds``)."""
    return job.task.metrics(job.splits[split][1], proba, job.classes, thresholds,
                            ignore=job.ignore(split), seed=job.settings.seed)


def _metrics_of(job: _Job, split: str) -> dict:
    """Metrics of the model as it is now on one split (multi-label: at the source run's
    thresholds)."""
    return _score(job, split, _predict(job.model, job.sequence(split)), job.source.thresholds)


def _baseline_loss(job: _Job) -> float:
    """Epoch 0: the validation loss before any training, measured as Keras measures it,
    of the starting head (which has seen train only, see `_starting_head`)."""
    return float(job.trainer.evaluate(job.sequence("val"), verbose=0, return_dict=True)["loss"])


def _train(job: _Job, baseline: float, progress: ProgressCallback | None) -> tuple[dict, dict, float]:
    """Train with early stopping against the epoch-0 baseline; the history, the kept
    epoch ({"epoch", "val_loss"}) and the seconds it took."""
    settings = job.settings
    train_sequence, val_sequence = job.sequence("train", True), job.sequence("val")
    device = _device()
    trainable = int(sum(np.prod(w.shape) for w in job.trainer.trainable_weights))
    emit(progress, FinetuneStarted(
        total=settings.epochs, backbone=job.spec.name, blocks=tuple(job.blocks),
        trainable_parameters=trainable, train=len(job.splits["train"][0]),
        val=len(job.splits["val"][0]), epochs=settings.epochs, steps=len(train_sequence),
        device=device, baseline_val_loss=baseline, start_head=job.start_head))
    class_weight = job.objective.class_weight
    keeper = _BestWeights(job.model, baseline, settings.patience)
    callbacks = [keeper, _ProgressCallback(progress, settings.epochs, len(train_sequence),
                                           len(val_sequence), device)]
    started = time.perf_counter()
    fitted = job.trainer.fit(train_sequence, validation_data=val_sequence, epochs=settings.epochs,
                             class_weight=class_weight, callbacks=callbacks, verbose=0)
    seconds = time.perf_counter() - started
    history = {key: [float(v) for v in values] for key, values in fitted.history.items()}
    best = {"epoch": keeper.best_epoch, "val_loss": keeper.best_loss}
    if keeper.best_epoch == 0:
        emit(progress, NoImprovement(baseline_val_loss=baseline,
                                     epochs_run=len(history.get("loss", []))))
    emit(progress, FinetuneFinished(best_epoch=keeper.best_epoch,
                                    epochs_run=len(history.get("loss", [])), seconds=seconds))
    return history, best, seconds


def _save(job: _Job, runs: Path, before: dict, history: dict, best: dict, baseline: float,
          fit_seconds: float) -> Run:
    """The new run directory: model.keras, the report of `fit`, before / after."""
    settings, config = job.settings, job.source.config
    labels = job.splits[job.evaluation][1]
    raw = _predict(job.model, job.sequence(job.evaluation))
    task = job.task

    def val_proba() -> np.ndarray:
        return raw if job.evaluation == "val" else _predict(job.model, job.sequence("val"))

    # multi-label: chosen again on val, which also chose the epoch
    thresholds = task.choose_thresholds(job.splits["val"][1], val_proba, job.ignore("val"))
    # the temperature: on val too, which the model was early-stopped on but never fit on
    temperature = task_temperature(task, job.splits["val"][1], val_proba,
                                   "the validation predictions of the fine-tuned model")
    proba = temperature.apply(raw)
    after = _score(job, job.evaluation, proba, thresholds)
    headline, interval = task.headline, f"{task.score}_ci"
    metrics = {
        "split": job.evaluation, "split_role": evaluate.split_role(job.evaluation),
        "selected_on": "val", **after,
        "before": {key: before[key] for key in (*headline, interval) if key in before},
        "comparison": {key: {"before": before[key], "after": after[key]}
                       for key in headline if key in after},
        "fit_seconds": round(fit_seconds, 3),
        "best_epoch": best["epoch"], "epochs_run": len(history.get("loss", [])),
        "baseline_val_loss": baseline, "kept_baseline": best["epoch"] == 0,
        "start_head_trained_on": job.start_head["trained_on"],
        **uncalibrated_error(task, labels, raw, job.ignore(job.evaluation), job.settings.seed),
        **temperature.record(),
    }
    finetune_settings = {
        "source_run": str(job.source.path.resolve()), "unfreeze": settings.unfreeze,
        "blocks": job.blocks, "epochs": settings.epochs, "learning_rate": settings.learning_rate,
        "batch_size": settings.batch_size, "augment": settings.augment,
        "patience": settings.patience, "seed": settings.seed,
        "trainable_parameters": int(sum(np.prod(w.shape) for w in job.trainer.trainable_weights)),
        "before": "the starting head (start_head) on the same images, recomputed end to end",
        "start_head": job.start_head,
    }
    new_config = run_config(job.cache, head=config["head"], head_params=config.get("head_params"),
                            finetune=finetune_settings, fit_seconds=fit_seconds,
                            **task.config(job.classes, thresholds), temperature=temperature.value)

    def write(directory: Path) -> None:
        job.model.save(directory / MODEL_FILE)
        write_run_files(directory, new_config, metrics, history)
        paths = [str(p) for p in job.cache.paths(job.evaluation)]
        task.write_predictions(directory, paths, labels, proba, job.classes, metrics, thresholds,
                               job.ignore(job.evaluation))
        write_reliability(directory, task, labels, raw, proba, metrics, job.ignore(job.evaluation))

    labels_ = (job.spec.name, f"{config['head']}-finetune{settings.unfreeze}")
    return Run(save_run(runs, labels_, write), new_config, metrics)


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


# --------------------------------------------------------------------------- #
# Training callbacks: the epoch-0 baseline, progress events and the time estimate
# --------------------------------------------------------------------------- #


def _device() -> str:
    from ._keras import keras  # noqa: F401  (imports TensorFlow quietly)
    import tensorflow as tf

    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def _best_weights_class():
    from ._keras import keras

    class BestWeights(keras.callbacks.Callback):
        """Early stopping on validation loss with epoch 0 as the baseline: keeps the
        weights of the best epoch (epoch 0, the model before training, included), stops
        after `patience` epochs without improvement and restores the kept weights."""

        def __init__(self, model, baseline_loss: float, patience: int):
            super().__init__()
            self.target = model  # the end-to-end model; the trainer adds augmentation only
            self.best_loss, self.best_epoch = float(baseline_loss), 0
            self.best_weights = model.get_weights()
            self.patience, self.wait = patience, 0

        def on_epoch_end(self, epoch, logs=None):
            loss = (logs or {}).get("val_loss")
            if loss is not None and float(loss) < self.best_loss:
                self.best_loss, self.best_epoch, self.wait = float(loss), epoch + 1, 0
                self.best_weights = self.target.get_weights()
                return
            self.wait += 1
            if self.wait >= self.patience:
                self.model.stop_training = True

        def on_train_end(self, logs=None):
            self.target.set_weights(self.best_weights)

    return BestWeights


def _BestWeights(*args):
    return _best_weights_class()(*args)


class TrainingPace:
    """The time left of a fine-tuning, from measured rates (`progress.Rate`): seconds per
    training batch, per first batch of an epoch (which also pays the epoch's set-up: the
    data pipeline restarting, the kept weights copied) and per validation batch, times
    the batches still to go in every epoch up to the last. The very first training and
    validation batches, which build and compile their graphs, are left out. Until measured,
    an epoch's first batch counts as a plain one, and a validation batch as a third of a
    training batch (a forward pass only). Every second counts: a batch's time runs from
    the end of the step before, whatever happened in between. `clock`: a monotonic clock
    in seconds (tests pass a fake one)."""

    def __init__(self, epochs: int, steps: int, val_steps: int,
                 clock: Clock = time.perf_counter):
        self.epochs, self.steps, self.val_steps, self.clock = epochs, steps, val_steps, clock
        self.train, self.starts, self.val = Rate(warm_up=0), Rate(), Rate()
        self.started = self.last = clock()
        self.epoch, self.batch, self.val_batch = 1, 0, 0

    def epoch_begins(self, epoch: int) -> None:
        """Epoch `epoch` (from 1) starts its training batches."""
        self.epoch, self.batch, self.val_batch = epoch, 0, 0

    def train_batch_done(self, batch: int) -> tuple[float, float | None]:
        """Training batch `batch` (from 1) of the epoch ended: (elapsed, seconds left)."""
        now = self._measure(self.starts if batch == 1 else self.train)
        self.batch = batch
        return now - self.started, self.remaining()

    def validation_begins(self) -> None:
        self.val_batch = 0

    def val_batch_done(self, batch: int) -> tuple[float, float | None]:
        """Validation batch `batch` (from 1) of the epoch ended: (elapsed, seconds left)."""
        now = self._measure(self.val)
        self.val_batch = batch
        return now - self.started, self.remaining()

    def _measure(self, rate: Rate) -> float:
        """The time since the last step, added to `rate`; returns the clock's time."""
        now = self.clock()
        rate.add(now - self.last)
        self.last = now
        return now

    def elapsed(self) -> float:
        return self.clock() - self.started

    def per_batch(self) -> tuple[float, float, float] | None:
        """Seconds per (training, first of an epoch, validation) batch; None before a
        training batch after the very first was measured."""
        train, start = self.train.per_unit, self.starts.per_unit
        if train is None and start is None:
            return None
        train = start if train is None else train
        start = train if start is None else start
        val = self.val.per_unit
        return train, start, (train / 3 if val is None else val)

    def seconds_per_epoch(self) -> float | None:
        rates = self.per_batch()
        if rates is None:
            return None
        train, start, val = rates
        return start + train * (self.steps - 1) + val * self.val_steps

    def remaining(self) -> float | None:
        """Estimated seconds left if every epoch runs (early stopping may end sooner)."""
        rates = self.per_batch()
        if rates is None:
            return None
        train, start, val = rates
        later = self.epochs - self.epoch
        starts_left = later + (self.batch == 0)
        train_left = (self.steps - 1) * later + (self.steps - max(self.batch, 1))
        val_left = self.val_steps * later + (self.val_steps - self.val_batch)
        return train * train_left + start * starts_left + val * val_left


def _progress_callback_class():
    from ._keras import keras

    class ProgressCallback(keras.callbacks.Callback):
        """Emits an event per training batch and per epoch with the time elapsed and the
        estimated time left (`TrainingPace`, recomputed at every batch), and once, as soon
        as there is a measured rate, an `Estimate` note."""

        def __init__(self, progress, epochs, steps, val_steps, device, clock=time.perf_counter):
            super().__init__()
            self.progress, self.epochs, self.steps, self.device = progress, epochs, steps, device
            self.pace = TrainingPace(epochs, steps, val_steps, clock)
            self.estimated = False

        def on_epoch_begin(self, epoch, logs=None):
            self.pace.epoch_begins(epoch + 1)

        def on_train_batch_end(self, batch, logs=None):
            elapsed, remaining = self.pace.train_batch_done(batch + 1)
            emit(self.progress, BatchDone(done=batch + 1, total=self.steps,
                                          epoch=self.pace.epoch, epochs=self.epochs,
                                          elapsed=elapsed, remaining=remaining))
            per_epoch = self.pace.seconds_per_epoch()
            if not self.estimated and per_epoch is not None and remaining is not None:
                self.estimated = True
                emit(self.progress, Estimate(seconds_per_epoch=per_epoch,
                                             seconds_total=elapsed + remaining,
                                             epochs=self.epochs, device=self.device))

        def on_test_begin(self, logs=None):  # the validation pass at the end of an epoch
            self.pace.validation_begins()

        def on_test_batch_end(self, batch, logs=None):
            self.pace.val_batch_done(batch + 1)

        def on_epoch_end(self, epoch, logs=None):
            emit(self.progress, EpochDone(done=epoch + 1, total=self.epochs,
                                          logs={k: float(v) for k, v in (logs or {}).items()},
                                          elapsed=self.pace.elapsed(),
                                          remaining=self.pace.remaining()))

    return ProgressCallback


def _ProgressCallback(*args):
    return _progress_callback_class()(*args)
