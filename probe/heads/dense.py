"""The dense head: a small network (standardise -> Dense(relu) -> Dropout -> softmax)
trained with Adam (in NumPy, see ``network.py``), the epoch chosen on validation by early
stopping; saved, exported and fine-tuned as a Keras model of built-in layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from probe.errors import ProbeError

from .. import files
from .estimator import Head
from . import network
from .stream import FeatureStream
from .options import head_options
from .base import PREDICT_CHUNK, Curves, FitData, balanced_label_weights, check_params, corrupt, \
    keras_class_weight
from .views import VIEW_SAMPLINGS, OneViewPerEpoch, candidates

HEAD_KERAS = "head.keras"
MAX_WEIGHTS = 200_000_000  # 800 MB of float32 in the first layer


def _source(parts: list[tuple]) -> "network.BatchSource":
    """Arrays in memory as one (concatenated) source; `FeatureStream` parts (features
    larger than memory) as a `network.Streamed` source that reads blocks of rows."""
    if not any(isinstance(X, FeatureStream) for X, _ in parts):
        if len(parts) == 1:
            return network.InMemory(*parts[0])
        return network.InMemory(np.concatenate([X for X, _ in parts]), np.concatenate([y for _, y in parts]))
    streams = [(X if isinstance(X, FeatureStream) else FeatureStream.of_array(X), y) for X, y in parts]
    return network.Streamed(streams, network.STREAM_CHUNK_BYTES, network.STREAM_BLOCK_ROWS)


class DenseHead(Head):
    """A small Keras classifier: standardise -> Dense(relu) -> Dropout -> Dense(softmax); with
    a multi-label ``y`` (an (N, K) 0/1 matrix) one sigmoid output per class and binary
    cross-entropy.

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
        Seeds the initial weights, the shuffling and the dropout masks, so that fits are
        repeatable.
    verbose : int
        0, 1 or 2; accepted so that scripts and saved heads that set it keep working.
        Training reports nothing itself (``history_`` holds every epoch).
    refit : bool
        With validation data: True trains again from scratch on train + val for the chosen
        number of epochs; False keeps the early-stopped model, fitted on train only.
    view_sampling : "all" or "sample"
        With augmented views (``fit(..., views=V)``): "all" trains on every view as a row
        of its own each epoch; "sample" sees each image once per epoch, as its clean
        features or one of its views drawn at random (seeded).

    Learned attributes: ``classes_``, ``n_features_in_``, ``input_shape_``, ``network_``
    (standardisation and weights as arrays), ``model_`` (the same as a Keras model, input
    ``(None, D)``, not compiled, built on first use), ``history_`` (Keras-style history dict
    of the run with validation: loss, accuracy, val_loss, val_accuracy), ``best_epoch_``
    (1-based epoch whose weights were kept).

    scikit-learn's estimator checks (``tests/test_sklearn_checks.py``) pass but for
    ``check_class_weight_classifiers``: ``class_weight`` takes None or "balanced" only, the
    choices of ``probe fit --class-weight``; a dict keyed by labels would not survive
    head.json, whose object keys are strings.
    """

    name = "dense"
    options = head_options("dense")
    _fitted_attr = "network_"
    streams_features = True  # features larger than memory are read a block at a time

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
        """"sample" keeps the views apart, drawn per epoch (`_training_source`)."""
        if self.view_sampling == "sample" and data.views is not None:
            return data
        return data.with_views_as_rows()

    def _check_size(self, n_features: int, n_classes: int) -> None:
        weights = n_features * max(int(self.hidden_units), n_classes)
        if weights > MAX_WEIGHTS:
            raise ProbeError(
                f"the dense head would have {weights:,} weights in its first layer "
                f"({n_features} features x {max(int(self.hidden_units), n_classes)} units); the "
                f"limit is {MAX_WEIGHTS:,}. Use a smaller --hidden-units or pooled features. "
                f"Received: hidden_units={self.hidden_units}"
            )

    def _schedule(self, epochs: int, y: np.ndarray, n_classes: int):
        return network.Schedule(
            batch_size=int(self.batch_size), dropout=float(self.dropout) if self.hidden_units else 0.0,
            learning_rate=float(self.learning_rate), epochs=int(epochs), patience=int(self.patience),
            class_weights=self._class_weights(y, n_classes))

    def _class_weights(self, y: np.ndarray, n_classes: int) -> np.ndarray | None:
        """None, the (K,) weight of each class's samples, or multi-label (a 2-D ``y``) the
        (2, K) weights of each class's negative and positive entries."""
        if y.ndim == 2:
            if self.class_weight != "balanced":
                return None
            positive, negative = balanced_label_weights(y)
            return np.stack([negative, positive]).astype(np.float32)
        weights = keras_class_weight(self.class_weight, y, n_classes)
        return None if weights is None else np.array([weights[k] for k in range(n_classes)],
                                                     dtype=np.float32)

    def _train(self, source, y, n_classes: int, epochs: int, validation=None):
        """A network trained from a fresh seed (standardised with the statistics of
        `source`); with validation, early-stopped on it."""
        rng = np.random.default_rng(int(self.seed))
        mean, variance = network.moments(source)
        sizes = [mean.size, *([int(self.hidden_units)] if self.hidden_units else []), n_classes]
        start = network.Network.initial(mean, variance, sizes, rng, multilabel=y.ndim == 2)
        from threadpoolctl import threadpool_limits

        # many small matrix products: a second BLAS thread costs more than it gives
        with threadpool_limits(1, user_api="blas"):
            return network.train(start, source, self._schedule(epochs, y, n_classes), rng, validation)

    def _fit(self, data: FitData) -> np.ndarray | None:
        return self._fit_network(data)

    def _fit_multilabel(self, data: FitData) -> np.ndarray | None:
        """Sigmoid outputs and binary cross-entropy; the validation probabilities of the
        early-stopped model that trained on train only (for the thresholds)."""
        return self._fit_network(data)

    def _fit_network(self, data: FitData) -> np.ndarray | None:
        """Train (early-stopped on val when given), refit on train + val for the chosen
        epochs when ``refit``; returns the train-only network's val probabilities."""
        K = data.n_classes
        self._check_size(data.X.shape[1], K)
        train = self._training_source(data, with_val=False)
        validation = None if data.X_val is None else _source([(data.X_val, data.y_val)])
        net, history, best_epoch = self._train(train, data.y, K, self.epochs, validation)
        self.history_ = {k: [float(v) for v in vals] for k, vals in history.items()}
        self.best_epoch_ = best_epoch if validation is not None else len(self.history_["loss"])
        val_proba = None if validation is None else self._proba_of(net, data.X_val)
        if validation is not None and self.refit:
            both = self._training_source(data, with_val=True)
            net, _, _ = self._train(both, np.concatenate([data.y, data.y_val]), K, self.best_epoch_)
        self._set_network(net)
        return val_proba

    def _training_source(self, data: FitData, with_val: bool) -> "network.BatchSource":
        """The training rows (with ``with_val``, the validation rows join them); views kept
        apart (view_sampling "sample") are drawn one per image per epoch."""
        if data.views is None:
            return _source([(data.X, data.y), *([(data.X_val, data.y_val)] if with_val else [])])
        blocks = [(candidates(data.X, data.views), data.y),
                  *([(candidates(data.X_val, None), data.y_val)] if with_val else [])]
        self.view_draws_ = 0
        return OneViewPerEpoch(blocks, on_draw=self._count_draw)

    def _count_draw(self) -> None:
        self.view_draws_ += 1

    def _set_network(self, net: "network.Network", model=None) -> None:
        self.network_ = net
        self.__dict__.pop("_model", None)
        if model is not None:
            self.__dict__["_model"] = model

    @property
    def model_(self):
        """The trained network as a Keras model of built-in layers (input ``(None, D)``,
        not compiled), built on first use."""
        if "network_" not in self.__dict__:
            raise AttributeError("model_")
        if "_model" not in self.__dict__:
            self.__dict__["_model"] = network.keras_model(self.network_, self.dropout if self.hidden_units else 0)
        return self.__dict__["_model"]

    def _predict_flat(self, X) -> np.ndarray:
        return self._proba_of(self.network_, X)

    @staticmethod
    def _proba_of(net: "network.Network", X) -> np.ndarray:
        if isinstance(X, FeatureStream):  # larger than memory: a chunk at a time
            chunks = (chunk for _, chunk in X.chunks(PREDICT_CHUNK))
        else:
            chunks = (X[i: i + PREDICT_CHUNK] for i in range(0, X.shape[0], PREDICT_CHUNK))
        return np.concatenate([net.proba(chunk) for chunk in chunks]).astype(np.float64)

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
        with files.atomic_path(directory / HEAD_KERAS, suffix=".keras") as temporary:
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
        self._set_network(network.from_keras(model), model)
