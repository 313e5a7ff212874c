"""The dense head: a small Keras network (standardise -> Dense(relu) -> Dropout -> softmax)
trained with Adam, the epoch chosen on validation by early stopping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from probe.errors import ProbeError

from .estimator import Head
from .options import head_options
from .base import PREDICT_CHUNK, Curves, FitData, check_params, corrupt, \
    keras_class_weight
from .views import VIEW_SAMPLINGS, candidates, one_view_per_epoch

HEAD_KERAS = "head.keras"
_VARIANCE_FLOOR = 0.1  # relative to the mean variance over the feature dimensions
MAX_WEIGHTS = 200_000_000  # 800 MB of float32 in the first layer


class DenseHead(Head):
    """A small Keras classifier: standardise -> Dense(relu) -> Dropout -> Dense(softmax).

    Parameters
    ----------
    hidden_units : int
        Width of the hidden layer; ``0`` means no hidden layer (and no dropout), i.e. a
        softmax regression trained with Adam.
    dropout : float in [0, 1)
    epochs, learning_rate, batch_size : training settings (Adam optimiser).
    patience : int
        With validation data, training stops when ``val_loss`` has not improved for
        ``patience`` epochs and the best weights are restored: the epoch is chosen on val.
    class_weight : None or "balanced"
    seed : int
        Passed to ``keras.utils.set_random_seed`` before the model is built, so that fits
        are repeatable.
    verbose : int
        Keras ``fit`` verbosity.
    refit : bool
        With validation data: True trains again from scratch on train + val for the chosen
        number of epochs; False keeps the early-stopped model, fitted on train only.
    view_sampling : "all" or "sample"
        With augmented views (``fit(..., views=V)``): "all" trains on every view as a row
        of its own each epoch; "sample" sees each image once per epoch, as its clean
        features or one of its views drawn at random (seeded).

    Learned attributes: ``classes_``, ``n_features_in_``, ``input_shape_``, ``model_``
    (the Keras model, input ``(None, D)``, not compiled), ``history_`` (Keras history dict
    of the run with validation: loss, accuracy, val_loss, val_accuracy), ``best_epoch_``
    (1-based epoch whose weights were kept).
    """

    name = "dense"
    options = head_options("dense")
    _fitted_attr = "model_"

    def __init__(
        self,
        hidden_units: int = 256,
        dropout: float = 0.5,
        epochs: int = 50,
        learning_rate: float = 1e-3,
        batch_size: int = 32,
        patience: int = 5,
        class_weight: str | None = None,
        seed: int = 0,
        verbose: int = 0,
        refit: bool = True,
        view_sampling: str = "all",
    ) -> None:
        self.hidden_units = hidden_units
        self.dropout = dropout
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.patience = patience
        self.class_weight = class_weight
        self.seed = seed
        self.verbose = verbose
        self.refit = refit
        self.view_sampling = view_sampling

    def _check_params(self) -> None:
        check_params(class_weight=self.class_weight, hidden_units=self.hidden_units,
                     dropout=self.dropout, epochs=self.epochs, learning_rate=self.learning_rate,
                     batch_size=self.batch_size, patience=self.patience, seed=self.seed,
                     refit=self.refit)
        if self.verbose not in (0, 1, 2):
            raise ProbeError(f"`verbose` must be 0, 1 or 2. Received: verbose={self.verbose!r}")
        if self.view_sampling not in VIEW_SAMPLINGS:
            raise ProbeError(f"`view_sampling` must be one of {', '.join(VIEW_SAMPLINGS)}. "
                             f"Received: view_sampling={self.view_sampling!r}")

    def _use_views(self, data: FitData) -> FitData:
        """"sample" keeps the views apart, drawn per epoch (`_train_sampled`)."""
        if self.view_sampling == "sample" and data.views is not None:
            return data
        return data.with_views_as_rows()

    def _train_sampled(self, data: FitData, epochs: int, validation=None, with_val=False):
        """`_train` drawing one of (clean, views...) per image per epoch
        (`views.one_view_per_epoch`); with `with_val`, the validation rows join (clean)."""
        from probe._keras import keras

        keras.utils.set_random_seed(int(self.seed))
        blocks = [(candidates(data.X, data.views), data.y)]
        if with_val:
            blocks.append((candidates(data.X_val, None), data.y_val))
        every = np.concatenate([block.reshape(-1, block.shape[2]) for block, _ in blocks])
        model = self._build(every, data.n_classes)
        labels = np.concatenate([y for _, y in blocks])
        dataset = one_view_per_epoch(blocks, int(self.batch_size), int(self.seed),
                                     keras_class_weight(self.class_weight, labels, data.n_classes))
        callbacks = []
        if validation is not None:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=int(self.patience), restore_best_weights=True))
        history = model.fit(dataset, validation_data=validation, epochs=int(epochs),
                            callbacks=callbacks, verbose=self.verbose)
        self.view_draws_ = dataset.draws
        return keras.Model(model.inputs[0], model.outputs[0], name="dense_head"), history.history

    def _check_size(self, n_features: int, n_classes: int) -> None:
        weights = n_features * max(int(self.hidden_units), n_classes)
        if weights > MAX_WEIGHTS:
            raise ProbeError(
                f"the dense head would have {weights:,} weights in its first layer "
                f"({n_features} features x {max(int(self.hidden_units), n_classes)} units); the "
                f"limit is {MAX_WEIGHTS:,}. Use a smaller --hidden-units or pooled features. "
                f"Received: hidden_units={self.hidden_units}"
            )

    def _build(self, X: np.ndarray, n_classes: int):
        from probe._keras import keras

        inputs = keras.Input(shape=(X.shape[1],), name="features")
        # Standardise with the training statistics, inside the model so that it travels
        # with the saved head and the exported model: backbone features can have tiny or
        # wildly different scales per dimension, which Adam with one learning rate handles
        # badly. The variance floor keeps nearly constant dimensions (units that hardly
        # fire on a small training set) from being blown up into noise.
        variance = X.var(axis=0)
        variance = np.maximum(variance, _VARIANCE_FLOOR * variance.mean() + 1e-12)
        x = keras.layers.Normalization(mean=X.mean(axis=0), variance=variance, name="standardize")(inputs)
        if self.hidden_units:
            x = keras.layers.Dense(int(self.hidden_units), activation="relu", name="hidden")(x)
            if self.dropout:
                x = keras.layers.Dropout(float(self.dropout), name="dropout")(x)
        outputs = keras.layers.Dense(n_classes, activation="softmax", name="predictions")(x)
        model = keras.Model(inputs, outputs, name="dense_head")
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=float(self.learning_rate)),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def _train(self, X, y, n_classes: int, epochs: int, validation=None):
        """A model trained from a fresh seed; with validation, early-stopped on it."""
        from probe._keras import keras

        keras.utils.set_random_seed(int(self.seed))
        model = self._build(X, n_classes)
        callbacks = []
        if validation is not None:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=int(self.patience), restore_best_weights=True))
        history = model.fit(X.astype(np.float32), y, validation_data=validation, epochs=int(epochs),
                            batch_size=int(self.batch_size),
                            class_weight=keras_class_weight(self.class_weight, y, n_classes),
                            callbacks=callbacks, shuffle=True, verbose=self.verbose)
        # a plain (uncompiled) model of the same layers: saved without optimizer state
        return keras.Model(model.inputs[0], model.outputs[0], name="dense_head"), history.history

    def _fit(self, data: FitData) -> None:
        K = data.n_classes
        self._check_size(data.X.shape[1], K)
        validation = None if data.X_val is None else (data.X_val.astype(np.float32), data.y_val)
        if data.views is not None:  # view_sampling "sample" (`_use_views`)
            return self._fit_sampled(data, validation)
        model, history = self._train(data.X, data.y, K, self.epochs, validation)
        self.history_ = {k: [float(v) for v in vals] for k, vals in history.items()}
        if self.history_.get("val_loss"):
            self.best_epoch_ = int(np.argmin(self.history_["val_loss"])) + 1
            if self.refit:
                X, y = data.train_and_val()
                model, _ = self._train(X, y, K, self.best_epoch_)
        else:
            self.best_epoch_ = len(self.history_.get("loss", []))
        self.model_ = model

    def _fit_sampled(self, data: FitData, validation) -> None:
        """`_fit` with one view drawn per image per epoch."""
        model, history = self._train_sampled(data, self.epochs, validation)
        self.history_ = {k: [float(v) for v in vals] for k, vals in history.items()}
        self.best_epoch_ = len(self.history_.get("loss", []))
        if self.history_.get("val_loss"):
            self.best_epoch_ = int(np.argmin(self.history_["val_loss"])) + 1
            if self.refit:
                model, _ = self._train_sampled(data, self.best_epoch_, with_val=True)
        self.model_ = model

    def _predict_flat(self, X: np.ndarray) -> np.ndarray:
        from probe._keras import keras

        X = X.astype(np.float32)
        # Direct (eager) calls in fixed-size chunks: no tf.function is traced per
        # model, which keeps many small heads in one process quiet and fast.
        chunks = [keras.ops.convert_to_numpy(self.model_(X[i: i + PREDICT_CHUNK], training=False))
                  for i in range(0, X.shape[0], PREDICT_CHUNK)]
        return np.concatenate(chunks).astype(np.float64)

    def keras_head(self):
        """The trained network itself (fine-tuning trains these very layers)."""
        self._check_fitted("keras_head")
        return self.model_

    def curves_(self) -> Curves | None:
        history = self.history_
        if not history.get("loss"):
            return None
        with_val = bool(history.get("val_loss"))
        return Curves(
            xlabel="Epoch", x=list(range(1, len(history["loss"]) + 1)),
            panels={"Loss": [("loss", "train"), ("val_loss", "validation")],
                    "Accuracy": [("accuracy", "train"), ("val_accuracy", "validation")]},
            series={k: list(v) for k, v in history.items()},
            chosen=self.best_epoch_ if with_val else None,
            chosen_label=f"restored epoch {self.best_epoch_}")

    def summary_(self) -> dict[str, Any]:
        return {"epochs": int(self.best_epoch_)}

    # -- persistence ----------------------------------------------------- #
    def _save_arrays(self, directory: Path) -> None:
        from .. import store

        with store.atomic_path(directory / HEAD_KERAS, suffix=".keras") as temporary:
            self.model_.save(temporary)

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "history": self.history_, "best_epoch": self.best_epoch_}

    def _load_arrays(self, directory: Path, meta: dict) -> None:
        """The model loads with ``safe_mode=True`` and without optimizer state."""
        from probe._keras import keras

        model_path = directory / HEAD_KERAS
        if not model_path.is_file():
            raise corrupt(model_path, "the file is missing")
        try:
            model = keras.saving.load_model(model_path, safe_mode=True, compile=False)
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise corrupt(model_path, f"{type(exc).__name__}: {first}") from None
        K, D = len(meta["classes"]), int(meta["n_features_in"])
        in_shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else None
        out_shape = tuple(model.outputs[0].shape) if getattr(model, "outputs", None) else None
        if in_shape != (None, D) or out_shape != (None, K):
            raise corrupt(model_path, f"the model maps {in_shape} to {out_shape}, but head.json "
                                      f"expects (None, {D}) to (None, {K})")
        history = meta.get("history", {})
        if not isinstance(history, dict):
            raise ValueError("'history' must be an object")
        self.history_ = {str(k): [float(x) for x in v] for k, v in history.items()}
        self.best_epoch_ = int(meta.get("best_epoch", 0))
        self.model_ = model
