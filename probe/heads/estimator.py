"""The base class of every head: a scikit-learn estimator (``BaseEstimator`` +
``ClassifierMixin``) with probe's validation, prediction, scoring and saving."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError as _SklearnNotFitted
from sklearn.utils.validation import check_is_fitted

from probe.errors import InputError, NotFittedError, ProbeError

from .base import HEAD_JSON, FORMAT_VERSION, Curves, FitData, HeadOption, as_features, as_indicator, \
    as_label_array, atomic_write_bytes, check_meta, corrupt, flatten, json_default, prepare_fit, read_head_json


class HeadNotFittedError(NotFittedError, _SklearnNotFitted):
    """A head used before ``fit`` (or ``load``): probe's `NotFittedError` and
    scikit-learn's (so also a `ValueError` and an `AttributeError`)."""


def saved_labels(meta: dict, path: Path) -> np.ndarray:
    """The label values of a saved head: ``labels`` when head.json has it, else the class
    indices 0..K-1 (every head saved before labels were recorded was fitted on those)."""
    K = len(meta["classes"])
    if "labels" not in meta:
        return np.arange(K)
    labels = meta["labels"]
    if (not isinstance(labels, list) or len(labels) != K
            or not all(isinstance(v, (str, int, float)) for v in labels)):
        raise corrupt(path, f"'labels' must list one label (string or number) per class ({K})")
    values = np.asarray(labels)
    if np.unique(values).size != K:
        raise corrupt(path, "'labels' must be unique")
    return values


class Head(ClassifierMixin, BaseEstimator):
    """Behaviour every head shares: validation, prediction, scoring, saving."""

    name: ClassVar[str] = ""
    options: ClassVar[tuple[HeadOption, ...]] = ()
    _fitted_attr: ClassVar[str] = "classes_"
    # True: fit and predict read a `FeatureStream` chunk by chunk (features larger than
    # memory); other heads receive it whole
    streams_features: ClassVar[bool] = False

    # -- to be provided by each head ------------------------------------- #
    def _check_params(self) -> None:
        """Raise ProbeError for a parameter out of range."""
        raise NotImplementedError

    def _fit(self, data: FitData) -> np.ndarray | None:
        """Learn from validated data (sets the head's own learned attributes). With
        validation data, return the validation probabilities of the model chosen on val
        and fit on train only, where selection computed them (kept as
        ``validation_proba_``); else None."""
        raise NotImplementedError

    def _predict_flat(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities of flat, validated features."""
        raise NotImplementedError

    def _fit_multilabel(self, data: FitData) -> np.ndarray | None:
        """Learn a multi-label model (``data.y`` (N, K) 0/1; sigmoid-like outputs). With
        validation data, return the validation probabilities of the model chosen on val
        and fit on train only (the per-class thresholds are chosen on them); else None."""
        raise ProbeError(f"the {self.name!r} head does not support multi-label targets. "
                         f"Received: y of shape {data.y.shape}")

    def keras_head(self):
        """A Keras model of built-in layers: flat features (None, D) -> probabilities (None, K)."""
        raise NotImplementedError

    def keras_head_fits_in_memory(self) -> bool:
        """Whether ``keras_head()`` can be built in the memory available (False: predict
        runs the backbone, then ``predict_proba``)."""
        return True

    def curves_(self) -> Curves | None:
        """The training-curve data, or None when there is nothing to draw."""
        return None

    def summary_(self) -> dict[str, Any]:
        """The chosen settings, for metrics.json (e.g. {"C": 1.0})."""
        return {}

    def _use_views(self, data: FitData) -> FitData:
        """How this head trains on augmented views: by default each view is one more
        training row with its image's label (a head may keep them apart instead)."""
        return data.with_views_as_rows()

    def finetune_refusal(self) -> str | None:
        """Why fine-tuning can not start from this head (None: it can)."""
        return None

    # -- the estimator contract ------------------------------------------ #
    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None,
            classes: list[str] | None = None, views: Any = None) -> "Head":
        """Validate, choose settings on (X_val, y_val) when given, learn; returns ``self``.

        ``views`` (N, V, ...): V augmented views of each row of ``X`` (``cache.views``),
        trained on with their row's label; selection still uses the clean ``X_val``.
        Being indexed like ``X``, they follow their rows through ``GridSearchCV`` and
        ``cross_val_score`` splits (``params={"views": V}``)."""
        self._check_params()
        data = prepare_fit(X, y, X_val, y_val, classes, stream=self.streams_features, views=views)
        self.n_views_ = data.n_views
        data = self._use_views(data)
        if data.multilabel:
            self._fit_with_thresholds(data)
        else:
            # the validation probabilities of the model fit on train only with the chosen
            # settings, which selection computed anyway (None: no val, or a head without
            # them); runs fit the temperature on them without a second fit
            self.validation_proba_ = self._fit(data)
            self.multilabel_ = False
        self.classes_ = data.labels
        self.class_names_ = data.classes
        self.n_features_in_ = int(data.X.shape[1])
        self.input_shape_ = data.input_shape
        return self

    def _fit_with_thresholds(self, data: FitData) -> None:
        """Multi-label: fit, then one decision threshold per class, the best F1 on val of
        the model that never trained on val (0.5 without validation data)."""
        from probe.evaluate import best_f1_thresholds

        val_proba = self.validation_proba_ = self._fit_multilabel(data)
        self.multilabel_ = True
        if val_proba is None:
            self.thresholds_ = np.full(data.n_classes, 0.5)
        else:
            self.thresholds_ = best_f1_thresholds(data.y_val, val_proba)

    def _check_fitted(self, method: str) -> None:
        try:
            check_is_fitted(self, self._fitted_attr)
        except _SklearnNotFitted:
            name = type(self).__name__
            raise HeadNotFittedError(
                f"this {name} is not fitted yet; call `fit(X, y)` or `{name}.load(directory)` "
                f"before `{method}`. Received: an unfitted {name}"
            ) from None

    def _check_X(self, X: Any) -> np.ndarray:
        X = as_features(X, "X", stream=self.streams_features)
        shape = tuple(X.shape[1:])
        if shape != tuple(self.input_shape_) and shape != (self.n_features_in_,):
            n = math.prod(shape)
            # scikit-learn's wording when the number differs (its checks and users look for it)
            found = (f"X has {n} features, but {type(self).__name__} is expecting "
                     f"{self.n_features_in_} features as input" if n != self.n_features_in_
                     else f"X has per-sample shape {shape}")
            raise InputError(
                f"{found}: `X` must have per-sample shape {tuple(self.input_shape_)} (or "
                f"({self.n_features_in_},) flattened), the shape this head was fitted on; use "
                f"features from the same backbone. Received: X.shape={X.shape}"
            )
        return flatten(X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, shape ``(N, K)``, float64; column k is ``classes_[k]``."""
        self._check_fitted("predict_proba")
        return self._predict_flat(self._check_X(X))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels (values of ``classes_``: the class indices when fitted with
        ``classes``), shape ``(N,)``; multi-label: an (N, K) 0/1 matrix, 1 where the
        probability reaches the class's threshold (``thresholds_``)."""
        self._check_fitted("predict")
        if getattr(self, "multilabel_", False):
            return (self.predict_proba(X) >= self.thresholds_).astype(np.int64)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy of ``predict(X)`` against ``y`` (multi-label: exact-match accuracy,
        every class of the sample right, as scikit-learn's ``accuracy_score``)."""
        self._check_fitted("score")
        predicted = self.predict(X)
        n = predicted.shape[0]
        if getattr(self, "multilabel_", False):
            y = as_indicator(y, n, "y", len(self.classes_))
            hits = np.all(predicted == y, axis=1).astype(np.float64)
        else:
            hits = (predicted == as_label_array(y, n, "y")).astype(np.float64)
        return float(np.average(hits, weights=sample_weight))

    # -- persistence ------------------------------------------------------ #
    def _params_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.get_params(), default=json_default))

    def _meta(self) -> dict[str, Any]:
        """What ``head.json`` records; heads add their learned settings."""
        return {
            "kind": self.name,
            "format_version": FORMAT_VERSION,
            "classes": [str(c) for c in self.class_names_],
            **self._labels_meta(),
            "input_shape": [int(s) for s in self.input_shape_],
            "n_features_in": int(self.n_features_in_),
            "params": self._params_json(),
            **self._multilabel_meta(),
        }

    def _labels_meta(self) -> dict[str, Any]:
        """The label values when they are not the class indices 0..K-1 (a head fitted on
        strings, say); files without them load with index labels, as before."""
        if np.array_equal(self.classes_, np.arange(len(self.class_names_))) and self.classes_.dtype.kind in "iu":
            return {}
        return {"labels": [v.item() if isinstance(v, np.generic) else v for v in self.classes_]}

    def _multilabel_meta(self) -> dict[str, Any]:
        """Multi-label heads record it and their thresholds (single-label: nothing)."""
        if not getattr(self, "multilabel_", False):
            return {}
        return {"multilabel": True, "thresholds": [float(t) for t in self.thresholds_]}

    def _save_arrays(self, directory: Path) -> None:
        """Write the learned arrays (``head.npz`` or ``head.keras``)."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the head's files and ``head.json`` into ``directory``."""
        self._check_fitted("save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_arrays(directory)
        text = json.dumps(self._meta(), indent=2, default=json_default)
        atomic_write_bytes(directory / HEAD_JSON, lambda handle: handle.write(text.encode("utf-8")))
        return directory

    @classmethod
    def _from_meta(cls, meta: dict, path: Path) -> "Head":
        """A head with the saved parameters (checked like at fit) and the shared learned state."""
        check_meta(meta, path, cls.name)
        try:
            head = cls(**meta["params"])
            head._check_params()
        except (TypeError, ProbeError) as exc:
            raise corrupt(path, f"bad 'params': {exc}") from None
        head.class_names_ = np.array(meta["classes"], dtype=str)
        head.classes_ = saved_labels(meta, path)
        head.n_features_in_ = int(meta["n_features_in"])
        head.input_shape_ = tuple(int(s) for s in meta["input_shape"])
        head.multilabel_ = meta.get("multilabel", False) is True
        if head.multilabel_:
            thresholds = np.asarray(meta.get("thresholds"), dtype=np.float64)
            if thresholds.shape != (len(head.classes_),) or not np.all((thresholds >= 0) & (thresholds <= 1)):
                raise corrupt(path, "'thresholds' must hold one number in [0, 1] per class")
            head.thresholds_ = thresholds
        return head

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Head":
        """Read a head written by ``save``; no pickle is involved."""
        directory, meta = read_head_json(directory)
        head = cls._from_meta(meta, directory / HEAD_JSON)
        try:
            head._load_arrays(directory, meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise corrupt(directory / HEAD_JSON, f"{type(exc).__name__}: {exc}") from None
        return head

    def _load_arrays(self, directory: Path, meta: dict) -> None:
        raise NotImplementedError
