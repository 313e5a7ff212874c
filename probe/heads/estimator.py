"""The base class of every head: a scikit-learn estimator (``BaseEstimator`` +
``ClassifierMixin``) with probe's validation, prediction, scoring and saving."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError as _SklearnNotFitted
from sklearn.utils.validation import check_is_fitted

from probe.errors import DatasetError, NotFittedError, ProbeError

from .base import HEAD_JSON, FORMAT_VERSION, Curves, FitData, HeadOption, as_features, as_indicator, as_labels, \
    atomic_write_bytes, check_meta, corrupt, flatten, json_default, prepare_fit, read_head_json


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

    def _fit(self, data: FitData) -> None:
        """Learn from validated data (sets the head's own learned attributes)."""
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
            self._fit(data)
            self.multilabel_ = False
        self.classes_ = data.classes
        self.n_features_in_ = int(data.X.shape[1])
        self.input_shape_ = data.input_shape
        return self

    def _fit_with_thresholds(self, data: FitData) -> None:
        """Multi-label: fit, then one decision threshold per class, the best F1 on val of
        the model that never trained on val (0.5 without validation data)."""
        from probe.evaluate import best_f1_thresholds

        val_proba = self._fit_multilabel(data)
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
            raise NotFittedError(
                f"this {name} is not fitted yet; call `fit(X, y)` or `{name}.load(directory)` "
                f"before `{method}`. Received: an unfitted {name}"
            ) from None

    def _check_X(self, X: Any) -> np.ndarray:
        X = as_features(X, "X", stream=self.streams_features)
        shape = tuple(X.shape[1:])
        if shape != tuple(self.input_shape_) and shape != (self.n_features_in_,):
            raise DatasetError(
                f"`X` must have per-sample shape {tuple(self.input_shape_)} (or ({self.n_features_in_},) "
                "flattened), the shape this head was fitted on; use features from the same backbone. "
                f"Received: X.shape={X.shape}"
            )
        return flatten(X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, shape ``(N, K)``, float64."""
        self._check_fitted("predict_proba")
        return self._predict_flat(self._check_X(X))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class indices, shape ``(N,)``; multi-label: an (N, K) 0/1 matrix, 1
        where the probability reaches the class's threshold (``thresholds_``)."""
        self._check_fitted("predict")
        if getattr(self, "multilabel_", False):
            return (self.predict_proba(X) >= self.thresholds_).astype(np.int64)
        return np.argmax(self.predict_proba(X), axis=1).astype(np.int64)

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy of ``predict(X)`` against ``y`` (multi-label: exact-match accuracy,
        every class of the sample right, as scikit-learn's ``accuracy_score``)."""
        self._check_fitted("score")
        X = as_features(X, "X")
        if getattr(self, "multilabel_", False):
            y = as_indicator(y, X.shape[0], "y", len(self.classes_))
            hits = np.all(self.predict(X) == y, axis=1).astype(np.float64)
        else:
            y = as_labels(y, X.shape[0], "y")
            hits = (self.predict(X) == y).astype(np.float64)
        return float(np.average(hits, weights=sample_weight))

    # -- persistence ------------------------------------------------------ #
    def _params_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.get_params(), default=json_default))

    def _meta(self) -> dict[str, Any]:
        """What ``head.json`` records; heads add their learned settings."""
        return {
            "kind": self.name,
            "format_version": FORMAT_VERSION,
            "classes": [str(c) for c in self.classes_],
            "input_shape": [int(s) for s in self.input_shape_],
            "n_features_in": int(self.n_features_in_),
            "params": self._params_json(),
            **self._multilabel_meta(),
        }

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
        head.classes_ = np.array(meta["classes"], dtype=str)
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
