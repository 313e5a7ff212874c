"""Classification heads that train on cached backbone features.

Two heads share one scikit-learn style contract:

* the constructor only stores its arguments;
* ``fit(X, y, *, X_val=None, y_val=None, classes=None)`` validates the data,
  learns, and returns ``self``; everything learned ends in ``_``;
* ``predict_proba(X)``, ``predict(X)`` and ``score(X, y)`` use the learned state;
* ``save(directory)`` writes plain files (no pickle) and ``load(directory)``
  reads them back so that predictions are identical.

``X`` is a float array of shape ``(N, ...)``. Spatial feature maps such as
``(N, 5, 5, 512)`` are flattened to ``(N, D)``; a fitted head accepts either the
original per-sample shape or the flattened one. ``y`` holds integer class
indices ``0..K-1`` and ``classes`` the matching names.

``LogisticHead`` is a standardised multinomial logistic regression (scikit-learn)
that can be folded into a single Dense softmax layer; ``DenseHead`` is a small
Keras network whose ``model_`` can be stacked on a backbone.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from probe.errors import DatasetError, NotFittedError, ProbeError, RunError

__all__ = [
    "DenseHead",
    "HEADS",
    "LogisticHead",
    "load_head",
    "make_head",
]

HEAD_JSON = "head.json"
_PREDICT_CHUNK = 1024
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #


def _as_features(X: Any, name: str = "X") -> np.ndarray:
    """Return ``X`` as a float array of shape ``(N, ...)`` with finite values."""
    try:
        arr = np.asarray(X)
    except Exception as exc:  # ragged lists and the like
        raise DatasetError(
            f"`{name}` must be a numeric array of shape (N, ...). "
            f"Received: {name} that numpy can not convert ({exc})"
        ) from None
    if arr.dtype.kind not in "fiub":
        raise DatasetError(
            f"`{name}` must hold numbers (float features). Received: {name}.dtype={arr.dtype}"
        )
    if arr.ndim < 2:
        raise DatasetError(
            f"`{name}` must have shape (N, ...) with one row of features per sample; "
            f"reshape a single sample with x[None]. Received: {name}.shape={arr.shape}"
        )
    if arr.shape[0] == 0:
        raise DatasetError(f"`{name}` is empty; it needs at least one sample. Received: {name}.shape={arr.shape}")
    arr = arr.astype(np.float32 if arr.dtype == np.float32 else np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)).ravel()
        raise DatasetError(
            f"`{name}` contains NaN or infinite features in {bad.size} sample(s); the feature "
            f"cache may be corrupt, rebuild it with `probe extract`. "
            f"Received: rows {bad[:5].tolist()}{' ...' if bad.size > 5 else ''} of {name}"
        )
    return arr


def _as_labels(y: Any, n: int, name: str = "y") -> np.ndarray:
    """Return ``y`` as a 1-D int64 array of length ``n`` with non-negative values."""
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DatasetError(
            f"`{name}` must be a 1-D array of integer class indices. Received: {name}.shape={arr.shape}"
        )
    if arr.shape[0] != n:
        x_name = "X" if name == "y" else "X_val"
        raise DatasetError(
            f"`{x_name}` and `{name}` must have the same number of samples. "
            f"Received: {x_name} with {n} samples, {name} with {arr.shape[0]}"
        )
    if arr.dtype.kind == "f" and arr.size and np.all(np.mod(arr, 1) == 0):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iub":
        raise DatasetError(
            f"`{name}` must hold integer class indices 0..K-1 (map names to indices first). "
            f"Received: {name}.dtype={arr.dtype}"
        )
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise DatasetError(f"`{name}` must hold class indices >= 0. Received: {name}.min()={arr.min()}")
    return arr


def _flatten(X: np.ndarray) -> np.ndarray:
    return X.reshape(X.shape[0], -1)


def _resolve_classes(classes: Any, y: np.ndarray, y_val: np.ndarray | None) -> np.ndarray:
    """Class names as a str array; defaults to ``["0", "1", ...]``."""
    top = int(y.max())
    if y_val is not None and y_val.size:
        top = max(top, int(y_val.max()))
    if classes is None:
        return np.array([str(i) for i in range(top + 1)], dtype=str)
    if isinstance(classes, str):
        raise DatasetError(f"`classes` must be a list of class names, not a string. Received: classes={classes!r}")
    names = [str(c) for c in classes]
    if len(set(names)) != len(names):
        dup = sorted({c for c in names if names.count(c) > 1})
        raise DatasetError(f"`classes` must hold unique names. Received: duplicates {dup}")
    if top >= len(names):
        raise DatasetError(
            f"labels must be indices into `classes` (0..{len(names) - 1}). "
            f"Received: label {top} with {len(names)} classes {names}"
        )
    return np.array(names, dtype=str)


def _check_training_labels(
    y: np.ndarray, y_val: np.ndarray | None, classes: np.ndarray
) -> None:
    names = [str(c) for c in classes]  # plain str: repr() gives 'cat', not np.str_('cat')
    present = np.unique(y)
    if present.size < 2:
        raise DatasetError(
            "a classifier needs samples of at least 2 classes; "
            f"got only one class: {names[present[0]]!r}. Add images of another class. "
            f"Received: {y.size} training samples, all of class {names[present[0]]!r}"
        )
    seen = set(present.tolist())
    missing = [names[k] for k in range(len(names)) if k not in seen]
    if missing:
        raise DatasetError(
            f"every class needs training samples; class(es) {missing} have none in the training "
            "split. Add images to those classes or use a different split seed. "
            f"Received: training classes {[names[k] for k in present]}"
        )
    if y_val is not None:
        in_val = set(np.unique(y_val).tolist())
        absent = [names[k] for k in present if int(k) not in in_val]
        if absent:
            listed = ", ".join(repr(a) for a in absent)
            raise DatasetError(
                f"every class needs validation samples; {listed} "
                f"{'has' if len(absent) == 1 else 'have'} training samples but none in the "
                "validation split, so validation can not measure "
                f"{'it' if len(absent) == 1 else 'them'}. Add images (a class needs at least 3 "
                "for a seeded split), remove the class, or change the split seed or validation "
                f"fraction. Received: {y_val.size} validation samples of classes "
                f"{[names[k] for k in sorted(in_val)]}"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


# Training settings shared by the dense head and fine-tuning: (valid?, what is expected)
_PARAM_RULES = {
    "hidden_units": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "dropout": (lambda v: _is_real(v) and 0 <= v < 1, "a number in [0, 1)"),
    "epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "learning_rate": (lambda v: _is_real(v) and math.isfinite(v) and v > 0, "a positive number"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "patience": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
}


def check_params(error: type[ProbeError] = ProbeError, **values: Any) -> None:
    """Raise `error` for the first training setting out of range (see _PARAM_RULES)."""
    for name, value in values.items():
        valid, expected = _PARAM_RULES[name]
        if not valid(value):
            raise error(f"`{name}` must be {expected}. Received: {name}={value!r}")


def keras_class_weight(class_weight: str | None, y: np.ndarray, n_classes: int) -> dict | None:
    """Keras' `class_weight` dict for "balanced" (None otherwise)."""
    if class_weight != "balanced":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(n_classes), y=y)
    return {int(k): float(v) for k, v in enumerate(weights)}


def _check_class_weight(class_weight: Any) -> None:
    if class_weight not in (None, "balanced"):
        raise ProbeError(f"`class_weight` must be None or 'balanced'. Received: class_weight={class_weight!r}")


def _prepare_fit(
    X: Any, y: Any, X_val: Any, y_val: Any, classes: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray, tuple[int, ...]]:
    """Validate fit inputs; return flat X, y, flat X_val, y_val, classes, input shape."""
    X = _as_features(X, "X")
    y = _as_labels(y, X.shape[0], "y")
    input_shape = tuple(int(s) for s in X.shape[1:])
    if (X_val is None) != (y_val is None):
        raise DatasetError(
            "pass both `X_val` and `y_val`, or neither. "
            f"Received: X_val={'None' if X_val is None else 'array'}, y_val={'None' if y_val is None else 'array'}"
        )
    Xv = yv = None
    if X_val is not None:
        Xv = _as_features(X_val, "X_val")
        yv = _as_labels(y_val, Xv.shape[0], "y_val")
        if Xv.shape[1:] != X.shape[1:]:
            raise DatasetError(
                "`X_val` must have the same per-sample shape as `X`. "
                f"Received: X.shape={X.shape}, X_val.shape={Xv.shape}"
            )
        Xv = _flatten(Xv)
    names = _resolve_classes(classes, y, yv)
    _check_training_labels(y, yv, names)
    return _flatten(X), y, Xv, yv, names, input_shape


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _json_default(value: Any) -> Any:
    """Numpy scalars and arrays in parameters become plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_head_json(directory: str | os.PathLike) -> tuple[Path, dict]:
    directory = Path(directory)
    path = directory / HEAD_JSON
    if not path.is_file():
        raise RunError(
            f"no trained head in '{directory}': '{path}' is missing. Train one with `probe fit`. "
            f"Received: directory='{directory}'"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("top level is not an object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunError(
            f"the head file '{path}' is unreadable or was modified ({exc}); re-run `probe fit` "
            f"to write it again. Received: {path.name} in '{directory}'"
        ) from None
    return directory, meta


def _corrupt(path: Path, why: str) -> RunError:
    return RunError(
        f"the head file '{path}' is unreadable or was modified ({why}); re-run `probe fit` "
        f"to write it again. Received: {path.name} in '{path.parent}'"
    )


class _Head:
    """Behaviour shared by both heads: parameters, input checks, scoring."""

    kind = ""
    _learned = "classes_"

    # -- parameters ------------------------------------------------------ #
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, as given."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> "_Head":
        """Change constructor arguments (scikit-learn's contract); returns ``self``."""
        unknown = sorted(set(params) - set(self._param_names()))
        if unknown:
            raise ProbeError(f"{type(self).__name__} has no parameter(s) {', '.join(unknown)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- prediction helpers --------------------------------------------- #
    def _check_fitted(self, method: str) -> None:
        if not hasattr(self, self._learned):
            name = type(self).__name__
            raise NotFittedError(
                f"this {name} is not fitted yet; call `fit(X, y)` or `{name}.load(directory)` "
                f"before `{method}`. Received: an unfitted {name}"
            )

    def _check_X(self, X: Any) -> np.ndarray:
        X = _as_features(X, "X")
        shape = tuple(X.shape[1:])
        if shape != tuple(self.input_shape_) and shape != (self.n_features_in_,):
            raise DatasetError(
                f"`X` must have per-sample shape {tuple(self.input_shape_)} (or ({self.n_features_in_},) "
                "flattened), the shape this head was fitted on; use features from the same backbone. "
                f"Received: X.shape={X.shape}"
            )
        return _flatten(X)

    def predict_proba(self, X: Any) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class indices, shape ``(N,)``."""
        self._check_fitted("predict")
        return np.argmax(self.predict_proba(X), axis=1).astype(np.int64)

    def score(self, X: Any, y: Any) -> float:
        """Accuracy of ``predict(X)`` against ``y``."""
        self._check_fitted("score")
        X = _as_features(X, "X")
        y = _as_labels(y, X.shape[0], "y")
        return float(np.mean(self.predict(X) == y))

    def _base_meta(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "classes": [str(c) for c in self.classes_],
            "input_shape": [int(s) for s in self.input_shape_],
            "n_features_in": int(self.n_features_in_),
        }

    @staticmethod
    def _check_meta(meta: dict, path: Path, kind: str) -> None:
        if meta.get("kind") != kind:
            raise _corrupt(path, f"expected kind {kind!r}, found {meta.get('kind')!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise _corrupt(path, f"expected format_version {FORMAT_VERSION}, found {meta.get('format_version')!r}")
        for key in ("classes", "input_shape", "n_features_in", "params"):
            if key not in meta:
                raise _corrupt(path, f"the key {key!r} is missing")
        if not isinstance(meta["classes"], list) or len(meta["classes"]) < 2:
            raise _corrupt(path, "'classes' must list at least 2 class names")
        shape = meta["input_shape"]
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and s > 0 for s in shape)
            or math.prod(shape) != meta["n_features_in"]
        ):
            raise _corrupt(path, "'input_shape' does not match 'n_features_in'")


# --------------------------------------------------------------------------- #
# Logistic regression head
# --------------------------------------------------------------------------- #


# The linear-probe grid: 1e-6 ... 1e5, one value per decade (exact decimal values).
DEFAULT_CS = tuple(10.0 ** exponent for exponent in range(-6, 6))


class LogisticHead(_Head):
    """Standardised multinomial logistic regression (scikit-learn, lbfgs).

    Parameters
    ----------
    C : float or None
        Inverse L2 regularisation strength. ``None`` picks it: with validation
        data every value of ``Cs`` is fitted on the training split and the one
        with the best validation accuracy (ties: lower validation log loss,
        then smaller C) wins; without validation data ``C=1.0``.
    Cs : sequence of float
        Candidates for the sweep.
    class_weight : None or "balanced"
    max_iter : int
        lbfgs iterations.
    seed : int
        ``random_state`` of the solver.
    refit : bool
        With validation data and ``refit=True`` the final model is fitted on
        training plus validation data (with the chosen or given ``C``), so
        ``score`` on the validation split is meaningless; with ``refit=False``
        it is fitted on the training data only, and the validation score is
        that of the data C was chosen on (optimistic, but not memorised).

    Learned attributes: ``classes_``, ``n_features_in_``, ``input_shape_``,
    ``C_``, ``sweep_`` (list of ``{"C", "val_accuracy", "val_log_loss"}``),
    ``history_`` (the sweep as a dict of lists), ``mean_``, ``scale_``
    (standardisation), ``coef_`` (``(K, D)``, or ``(1, D)`` for two classes as in
    scikit-learn), ``intercept_``, ``n_iter_``, ``converged_``.
    ``predict_proba`` only uses these arrays, so a loaded head needs no
    scikit-learn objects.
    """

    kind = "logreg"
    _learned = "coef_"

    def __init__(
        self,
        C: float | None = None,
        Cs: Any = DEFAULT_CS,
        class_weight: str | None = None,
        max_iter: int = 1000,
        seed: int = 0,
        refit: bool = True,
    ) -> None:
        self.C = C
        self.Cs = Cs
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.seed = seed
        self.refit = refit

    def get_params(self) -> dict[str, Any]:
        params = super().get_params()
        params["Cs"] = [float(c) for c in np.ravel(params["Cs"])]
        return params

    # -- fitting --------------------------------------------------------- #
    def _check_params(self) -> list[float]:
        _check_class_weight(self.class_weight)
        if self.C is not None and not (_is_real(self.C) and math.isfinite(self.C) and self.C > 0):
            raise ProbeError(f"`C` must be a positive number or None. Received: C={self.C!r}")
        try:
            Cs = [float(c) for c in np.ravel(np.asarray(self.Cs, dtype=float))]
        except (TypeError, ValueError):
            raise ProbeError(f"`Cs` must be a sequence of positive numbers. Received: Cs={self.Cs!r}") from None
        if self.C is None and (not Cs or any(not (math.isfinite(c) and c > 0) for c in Cs)):
            raise ProbeError(f"`Cs` must be a non-empty sequence of positive numbers. Received: Cs={self.Cs!r}")
        if not (_is_int(self.max_iter) and self.max_iter >= 1):
            raise ProbeError(f"`max_iter` must be a positive integer. Received: max_iter={self.max_iter!r}")
        return Cs

    def _fit_sklearn(self, X: np.ndarray, y: np.ndarray, C: float | None):
        """A scaler fitted on X and a logistic model; fitted too when C is given."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X)
        model = LogisticRegression(
            C=1.0 if C is None else C,
            solver="lbfgs",
            class_weight=self.class_weight,
            max_iter=self.max_iter,
            random_state=self.seed,
            warm_start=C is None,
        )
        if C is not None:
            self._fit_model(model, scaler.transform(X), y)
        return scaler, model

    @staticmethod
    def _fit_model(model, Z: np.ndarray, y: np.ndarray) -> None:
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(Z, y)

    def fit(
        self,
        X: Any,
        y: Any,
        *,
        X_val: Any = None,
        y_val: Any = None,
        classes: list[str] | None = None,
    ) -> "LogisticHead":
        """Fit the head; returns ``self``. See the class docstring for how C is chosen."""
        from sklearn.metrics import log_loss

        Cs = self._check_params()
        X, y, Xv, yv, names, input_shape = _prepare_fit(X, y, X_val, y_val, classes)
        K = len(names)
        labels = list(range(K))

        sweep: list[dict[str, float]] = []
        if self.C is None and Xv is not None:
            scaler, model = self._fit_sklearn(X, y, None)
            Z, Zv = scaler.transform(X), scaler.transform(Xv)
            # From strong to weak regularisation, each fit starting from the previous
            # solution: the weakly regularised fits, the slow ones, start close to theirs.
            for C in sorted(Cs):
                model.set_params(C=C)
                self._fit_model(model, Z, y)
                proba = model.predict_proba(Zv)
                sweep.append(
                    {
                        "C": float(C),
                        "val_accuracy": float(np.mean(np.argmax(proba, axis=1) == yv)),
                        "val_log_loss": float(log_loss(yv, proba, labels=labels)),
                    }
                )
            best = min(sweep, key=lambda r: (-r["val_accuracy"], r["val_log_loss"], r["C"]))
            C_ = best["C"]
        else:
            C_ = 1.0 if self.C is None else float(self.C)

        if Xv is not None and self.refit:
            X_all, y_all = np.concatenate([X, Xv]), np.concatenate([y, yv])
        else:
            X_all, y_all = X, y
        scaler, model = self._fit_sklearn(X_all, y_all, C_)

        self.classes_ = names
        self.n_features_in_ = int(X.shape[1])
        self.input_shape_ = input_shape
        self.C_ = C_
        self.sweep_ = sweep
        self.history_ = {
            "C": [r["C"] for r in sweep],
            "val_accuracy": [r["val_accuracy"] for r in sweep],
            "val_log_loss": [r["val_log_loss"] for r in sweep],
        }
        self.mean_ = np.asarray(scaler.mean_, dtype=np.float64)
        self.scale_ = np.asarray(scaler.scale_, dtype=np.float64)
        self.intercept_ = np.asarray(model.intercept_, dtype=np.float64)
        self.n_iter_ = int(np.max(model.n_iter_))
        self.converged_ = self.n_iter_ < self.max_iter
        self.coef_ = np.asarray(model.coef_, dtype=np.float64)
        return self

    # -- prediction ------------------------------------------------------ #
    def _logits(self, X: np.ndarray) -> np.ndarray:
        z = (X.astype(np.float64) - self.mean_) / self.scale_
        raw = z @ self.coef_.T + self.intercept_
        if self.coef_.shape[0] == 1:  # binary: scikit-learn models P(class 1) = sigmoid(raw)
            raw = np.concatenate([np.zeros_like(raw), raw], axis=1)
        return raw

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, shape ``(N, K)``, float64."""
        self._check_fitted("predict_proba")
        return _softmax(self._logits(self._check_X(X)))

    def dense_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Fold standardisation and the logistic model into one Dense layer.

        Returns ``(W, b)`` with ``W`` of shape ``(D, K)`` and ``b`` of shape
        ``(K,)`` (float64) such that ``softmax(x @ W + b) == predict_proba(x)``
        for flattened features ``x``. For two classes the logits are
        ``[0, w.z + b]``, which gives scikit-learn's sigmoid probabilities.
        """
        self._check_fitted("dense_weights")
        coef = self.coef_ / self.scale_  # (K', D)
        W = coef.T.copy()
        b = self.intercept_ - coef @ self.mean_
        if self.coef_.shape[0] == 1:
            W = np.concatenate([np.zeros_like(W), W], axis=1)
            b = np.concatenate([[0.0], b])
        return W, b

    # -- persistence ----------------------------------------------------- #
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``head.npz`` (numeric arrays) and ``head.json`` into ``directory``."""
        self._check_fitted("save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        npz = directory / "head.npz"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".head.npz.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, mean=self.mean_, scale=self.scale_, coef=self.coef_, intercept=self.intercept_)
            os.replace(tmp, npz)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        meta = self._base_meta()
        meta.update(
            params=self.get_params(),
            C_=self.C_,
            sweep=self.sweep_,
            n_iter=self.n_iter_,
            converged=bool(self.converged_),
        )
        _atomic_write_text(directory / HEAD_JSON, json.dumps(meta, indent=2, default=_json_default))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "LogisticHead":
        """Read a head written by ``save``; no pickle is involved."""
        directory, meta = _read_head_json(directory)
        json_path = directory / HEAD_JSON
        cls._check_meta(meta, json_path, cls.kind)
        npz = directory / "head.npz"
        if not npz.is_file():
            raise RunError(f"the head file '{npz}' is missing; re-run `probe fit`. Received: directory='{directory}'")
        try:
            with np.load(npz, allow_pickle=False) as data:
                arrays = {k: np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "coef", "intercept")}
        except Exception as exc:
            raise _corrupt(npz, f"{type(exc).__name__}: {exc}") from None
        K, D = len(meta["classes"]), int(meta["n_features_in"])
        k_rows = 1 if K == 2 else K
        expected = {"mean": (D,), "scale": (D,), "coef": (k_rows, D), "intercept": (k_rows,)}
        for key, shape in expected.items():
            if arrays[key].shape != shape:
                raise _corrupt(npz, f"array {key!r} has shape {arrays[key].shape}, expected {shape}")
            if not np.all(np.isfinite(arrays[key])):
                raise _corrupt(npz, f"array {key!r} holds NaN or infinite values")
        try:
            head = cls(**meta["params"])
        except TypeError as exc:
            raise _corrupt(json_path, f"bad 'params': {exc}") from None
        head.classes_ = np.array(meta["classes"], dtype=str)
        head.n_features_in_ = D
        head.input_shape_ = tuple(meta["input_shape"])
        head.C_ = float(meta.get("C_", 1.0))
        head.sweep_ = list(meta.get("sweep", []))
        head.history_ = {
            "C": [r["C"] for r in head.sweep_],
            "val_accuracy": [r["val_accuracy"] for r in head.sweep_],
            "val_log_loss": [r["val_log_loss"] for r in head.sweep_],
        }
        head.n_iter_ = int(meta.get("n_iter", 0))
        head.converged_ = bool(meta.get("converged", True))
        head.mean_, head.scale_ = arrays["mean"], arrays["scale"]
        head.intercept_ = arrays["intercept"]
        head.coef_ = arrays["coef"]
        return head


# --------------------------------------------------------------------------- #
# Dense (Keras) head
# --------------------------------------------------------------------------- #


_VARIANCE_FLOOR = 0.1  # relative to the mean variance over the feature dimensions


class DenseHead(_Head):
    """A small Keras classifier: standardise -> Dense(relu) -> Dropout -> Dense(softmax).

    Parameters
    ----------
    hidden_units : int
        Width of the hidden layer; ``0`` means no hidden layer (and no
        dropout), i.e. a softmax regression trained with Adam.
    dropout : float in [0, 1)
    epochs, learning_rate, batch_size : training settings (Adam optimiser).
    patience : int
        With validation data, training stops when ``val_loss`` has not improved
        for ``patience`` epochs and the best weights are restored.
    class_weight : None or "balanced"
    seed : int
        Passed to ``keras.utils.set_random_seed`` before the model is built,
        so that fits are repeatable.
    verbose : int
        Keras ``fit`` verbosity.
    refit : bool
        Accepted for the common head interface; the network never trains on the
        validation data (it only stops early on it), so both values fit the same.

    Learned attributes: ``classes_``, ``n_features_in_``, ``input_shape_``,
    ``model_`` (the Keras model, input ``(None, D)``: flatten spatial features
    before it, e.g. with a ``Flatten`` layer when stacking on a backbone),
    ``history_`` (Keras history dict: loss, accuracy, val_loss, val_accuracy),
    ``best_epoch_`` (1-based epoch whose weights were kept).
    """

    kind = "dense"
    _learned = "model_"

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
    ) -> None:
        self.refit = refit
        self.hidden_units = hidden_units
        self.dropout = dropout
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.patience = patience
        self.class_weight = class_weight
        self.seed = seed
        self.verbose = verbose

    def _check_params(self) -> None:
        _check_class_weight(self.class_weight)
        check_params(hidden_units=self.hidden_units, dropout=self.dropout, epochs=self.epochs,
                     learning_rate=self.learning_rate, batch_size=self.batch_size,
                     patience=self.patience)

    def _build(self, X: np.ndarray, n_classes: int):
        from ._keras import keras

        inputs = keras.Input(shape=(X.shape[1],), name="features")
        # Standardise with the training statistics, inside the model so that it travels
        # with the saved head and the exported model: backbone features can have tiny or
        # wildly different scales per dimension, which Adam with one learning rate handles
        # badly. The variance floor keeps nearly constant dimensions (units that hardly
        # fire on a small training set) from being blown up into noise.
        variance = X.var(axis=0)
        variance = np.maximum(variance, _VARIANCE_FLOOR * variance.mean() + 1e-12)
        x = keras.layers.Normalization(
            mean=X.mean(axis=0), variance=variance, name="standardize")(inputs)
        if self.hidden_units:
            x = keras.layers.Dense(int(self.hidden_units), activation="relu", name="hidden")(x)
            if self.dropout:
                x = keras.layers.Dropout(float(self.dropout), name="dropout")(x)
        outputs = keras.layers.Dense(n_classes, activation="softmax", name="predictions")(x)
        model = keras.Model(inputs, outputs, name="dense_head")
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=float(self.learning_rate)),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        return model

    def fit(
        self,
        X: Any,
        y: Any,
        *,
        X_val: Any = None,
        y_val: Any = None,
        classes: list[str] | None = None,
    ) -> "DenseHead":
        """Train the network; returns ``self``. Validation data enables early stopping."""
        from ._keras import keras

        self._check_params()
        X, y, Xv, yv, names, input_shape = _prepare_fit(X, y, X_val, y_val, classes)
        K = len(names)

        keras.utils.set_random_seed(int(self.seed))
        model = self._build(X, K)

        weights = keras_class_weight(self.class_weight, y, K)

        callbacks = []
        validation = None
        if Xv is not None:
            validation = (Xv.astype(np.float32), yv)
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor="val_loss", patience=int(self.patience), restore_best_weights=True
                )
            )
        hist = model.fit(
            X.astype(np.float32),
            y,
            validation_data=validation,
            epochs=int(self.epochs),
            batch_size=int(self.batch_size),
            class_weight=weights,
            callbacks=callbacks,
            shuffle=True,
            verbose=self.verbose,
        )
        self.history_ = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
        if "val_loss" in self.history_ and self.history_["val_loss"]:
            self.best_epoch_ = int(np.argmin(self.history_["val_loss"])) + 1
        else:
            self.best_epoch_ = len(self.history_.get("loss", []))
        self.classes_ = names
        self.n_features_in_ = int(X.shape[1])
        self.input_shape_ = input_shape
        self.model_ = model
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, shape ``(N, K)``, float64 (computed in float32)."""
        self._check_fitted("predict_proba")
        from ._keras import keras

        X = self._check_X(X).astype(np.float32)
        # Direct (eager) calls in fixed-size chunks: no tf.function is traced per
        # model, which keeps many small heads in one process quiet and fast.
        chunks = [
            keras.ops.convert_to_numpy(self.model_(X[i : i + _PREDICT_CHUNK], training=False))
            for i in range(0, X.shape[0], _PREDICT_CHUNK)
        ]
        return np.concatenate(chunks).astype(np.float64)

    # -- persistence ----------------------------------------------------- #
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``head.keras`` (``model.save``) and ``head.json`` into ``directory``."""
        self._check_fitted("save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model_path = directory / "head.keras"
        tmp = directory / ".head.tmp.keras"
        try:
            self.model_.save(tmp)
            os.replace(tmp, model_path)
        finally:
            tmp.unlink(missing_ok=True)
        meta = self._base_meta()
        meta.update(params=self.get_params(), history=self.history_, best_epoch=self.best_epoch_)
        _atomic_write_text(directory / HEAD_JSON, json.dumps(meta, indent=2, default=_json_default))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DenseHead":
        """Read a head written by ``save``.

        The model is loaded with ``safe_mode=True`` and without its optimizer
        state (``compile=False``): it is ready for prediction; compile it again
        to continue training.
        """
        from ._keras import keras

        directory, meta = _read_head_json(directory)
        json_path = directory / HEAD_JSON
        cls._check_meta(meta, json_path, cls.kind)
        model_path = directory / "head.keras"
        if not model_path.is_file():
            raise RunError(
                f"the head file '{model_path}' is missing; re-run `probe fit`. Received: directory='{directory}'"
            )
        try:
            model = keras.saving.load_model(model_path, safe_mode=True, compile=False)
        except Exception as exc:
            raise _corrupt(model_path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        K, D = len(meta["classes"]), int(meta["n_features_in"])
        in_shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else None
        out_shape = tuple(model.outputs[0].shape) if getattr(model, "outputs", None) else None
        if in_shape != (None, D) or out_shape != (None, K):
            raise _corrupt(
                model_path,
                f"the model maps {in_shape} to {out_shape}, but head.json expects (None, {D}) to (None, {K})",
            )
        try:
            head = cls(**meta["params"])
        except TypeError as exc:
            raise _corrupt(json_path, f"bad 'params': {exc}") from None
        head.classes_ = np.array(meta["classes"], dtype=str)
        head.n_features_in_ = D
        head.input_shape_ = tuple(meta["input_shape"])
        head.history_ = {k: list(v) for k, v in dict(meta.get("history", {})).items()}
        head.best_epoch_ = int(meta.get("best_epoch", 0))
        head.model_ = model
        return head


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #

HEADS: dict[str, type[_Head]] = {"logreg": LogisticHead, "dense": DenseHead}


def make_head(name: str, **params: Any) -> LogisticHead | DenseHead:
    """Create the head registered as ``name`` with the given constructor parameters."""
    if name not in HEADS:
        raise ProbeError(
            f"unknown head: expected one of: {', '.join(sorted(HEADS))}. Received: head={name!r}"
        )
    cls = HEADS[name]
    allowed = cls._param_names()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ProbeError(
            f"the {name!r} head takes the parameters {', '.join(allowed)}. "
            f"Received: unknown parameter(s) {', '.join(unknown)}"
        )
    return cls(**params)


def load_head(directory: str | os.PathLike) -> LogisticHead | DenseHead:
    """Load whichever head ``directory/head.json`` describes."""
    directory, meta = _read_head_json(directory)
    kind = meta.get("kind")
    if kind not in HEADS:
        raise _corrupt(
            directory / HEAD_JSON, f"'kind' must be one of: {', '.join(sorted(HEADS))}; found {kind!r}"
        )
    return HEADS[kind].load(directory)
