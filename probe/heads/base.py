"""What every head shares: input validation, parameter rules, the estimator contract and
persistence without pickle.

(The estimator base class itself is in ``estimator.py``: scikit-learn is imported only
when a head is used, so that the command line starts fast.)

A head is a scikit-learn estimator (``BaseEstimator`` + ``ClassifierMixin``): the
constructor only stores its arguments; ``fit(X, y, X_val=None, y_val=None, classes=None)``
validates, learns and returns ``self``; learned state ends in ``_``. ``X`` is a float array
``(N, ...)``: spatial feature maps are flattened, and a fitted head accepts either the
per-sample shape it was fitted on or the flattened one. ``y`` holds any class labels
(integers, strings): ``classes_`` is ``np.unique(y)`` and ``predict`` returns those labels
(internally the heads work on class indices). With ``classes`` (names; what probe itself
passes) ``y`` holds indices ``0..K-1`` into it, so ``classes_`` is ``[0, ..., K-1]`` and
predictions are indices. Either way ``class_names_`` holds the names (``str``). A
multi-label ``y`` is an (N, K) 0/1 matrix; ``classes_`` is then ``[0, ..., K-1]``.

Bad input raises `InputError`, a `DatasetError` and a `ValueError`; a head used before
``fit`` raises `HeadNotFittedError`, probe's and scikit-learn's `NotFittedError`.

With validation data a head chooses its settings on it (C, k and T, the epoch) and, when
``refit=True``, fits again on train + val; with ``refit=False`` the fitted model has seen
train only, so a score on val is from a model that never trained on it.

Saved heads are a directory: ``head.json`` (kind, class names, shapes, parameters,
curves; ``labels`` only when the label values are not ``0..K-1``) plus ``head.npz`` (read with ``allow_pickle=False``) or ``head.keras`` (safe mode).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from probe.errors import InputError, InputTypeError, ProbeError, RunError

from .. import files
from ..files import json_default  # noqa: F401 (the one default of every JSON file)
from .stream import FeatureStream

HEAD_JSON = "head.json"
HEAD_NPZ = "head.npz"
FORMAT_VERSION = 1
PREDICT_CHUNK = 1024
MAX_SEED = 2**32 - 1  # numpy's and Keras' seeds are unsigned 32-bit


# --------------------------------------------------------------------------- #
# Input validation
# --------------------------------------------------------------------------- #


def _is_sparse(X: Any) -> bool:
    """Whether X is a SciPy sparse matrix or array (without importing SciPy: a sparse
    object exists only when its module was imported)."""
    sparse = sys.modules.get("scipy.sparse")
    return sparse is not None and sparse.issparse(X)


def as_features(X: Any, name: str = "X", stream: bool = False) -> np.ndarray:
    """Return ``X`` as a float array of shape ``(N, ...)`` with finite values (a
    `FeatureStream` as it is with ``stream``: it checks its chunks as they are read).
    Raises `InputError` (a `ValueError`), with the phrases scikit-learn's own checks use."""
    if isinstance(X, FeatureStream) and stream:
        return X
    if _is_sparse(X):
        raise InputError(
            f"`{name}` must be a dense array: sparse data is not supported (features from a "
            f"backbone are dense). Convert it with {name}.toarray(). Received: {type(X).__name__}")
    try:
        arr = np.asarray(X)
    except Exception as exc:  # ragged lists and the like
        raise InputError(
            f"`{name}` must be a numeric array of shape (N, ...). "
            f"Received: {name} that numpy can not convert ({exc})"
        ) from None
    if arr.dtype.kind == "c":
        raise InputError(f"`{name}` must hold real numbers: Complex data not supported. "
                         f"Take the real part or the magnitude first. Received: {name}.dtype={arr.dtype}")
    if arr.dtype.kind == "O":  # numbers held as Python objects (lists of mixed types, pandas)
        try:
            arr = arr.astype(np.float64)
        except TypeError as exc:
            raise InputTypeError(f"`{name}` must hold numbers; an object array converts only when "
                                 f"every entry is one ({exc}). Received: {name}.dtype=object") from None
        except ValueError as exc:
            raise InputError(f"`{name}` must hold numbers; an object array converts only when "
                             f"every entry is one ({exc}). Received: {name}.dtype=object") from None
    if arr.dtype.kind not in "fiub":
        raise InputError(
            f"`{name}` must hold numbers (float features). Received: {name}.dtype={arr.dtype}"
        )
    if arr.ndim < 2:
        raise InputError(
            f"`{name}` must have shape (N, ...) with one row of features per sample. Reshape "
            f"your data: x[None] (x.reshape(1, -1)) for a single sample, x.reshape(-1, 1) for "
            f"a single feature. Received: {name}.shape={arr.shape}"
        )
    if arr.shape[0] == 0:
        raise InputError(f"`{name}` is empty; it needs at least one sample. "
                         f"Received: {name} with 0 sample(s) (shape={arr.shape})")
    if arr[0].size == 0:
        raise InputError(
            f"`{name}` has no features; every sample needs at least one (features from `probe "
            f"extract`). Received: {name} with 0 feature(s) (shape={arr.shape}) while a minimum "
            "of 1 is required.")
    arr = arr.astype(np.float32 if arr.dtype == np.float32 else np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)).ravel()
        raise InputError(
            f"`{name}` contains NaN or infinite features in {bad.size} sample(s); the feature "
            f"cache may be corrupt, rebuild it with `probe extract`. "
            f"Received: rows {bad[:5].tolist()}{' ...' if bad.size > 5 else ''} of {name}"
        )
    return arr


def _same_length(n: int, m: int, name: str) -> None:
    if m != n:
        x_name = "X" if name == "y" else "X_val"
        raise InputError(
            f"`{x_name}` and `{name}` must have the same number of samples. "
            f"Received: {x_name} with {n} samples, {name} with {m}"
        )


def as_label_array(y: Any, n: int, name: str = "y") -> np.ndarray:
    """Return ``y`` as a 1-D array of ``n`` class labels (integers, strings, ...: any
    discrete values). A column vector ``(n, 1)`` is raveled with scikit-learn's
    `DataConversionWarning`; continuous or NaN targets raise `InputError`."""
    if y is None:
        raise InputError(f"a head requires y to be passed, but the target y is None. Pass the "
                         f"class label of every row of X. Received: {name}=None")
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        from sklearn.exceptions import DataConversionWarning

        # scikit-learn's wording: code that filters this warning by message keeps working
        warnings.warn(DataConversionWarning(
            "A column-vector y was passed when a 1d array was expected. Please change the "
            "shape of y to (n_samples, ), for example using ravel()."), stacklevel=2)
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise InputError(
            f"`{name}` should be a 1d array of class labels (or, multi-label, an (N, K) 0/1 "
            f"matrix). Received: {name}.shape={arr.shape}")
    _same_length(n, arr.shape[0], name)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise InputError(f"`{name}` must hold class labels; it contains NaN or infinity in {bad} "
                         f"sample(s). Fix or drop those samples. Received: {name}.dtype={arr.dtype}")
    from sklearn.utils.multiclass import type_of_target

    try:
        kind = type_of_target(arr, input_name=name)
    except ValueError as exc:  # strings mixed with numbers, say
        raise InputError(f"`{name}` must hold class labels ({exc}). Fix or drop those "
                         f"samples. Received: {name}.dtype={arr.dtype}") from None
    if kind not in ("binary", "multiclass"):
        raise InputError(
            f"Unknown label type: {kind!r}. `{name}` must hold class labels (integers or "
            "strings); continuous values are regression targets. "
            f"Received: {name} values such as {arr[:3].tolist()}")
    return arr


def as_labels(y: Any, n: int, name: str = "y") -> np.ndarray:
    """Return ``y`` as a 1-D int64 array of ``n`` class indices ``0..K-1`` (the labels
    probe itself passes, with the class names apart)."""
    arr = as_label_array(y, n, name)
    if arr.dtype.kind == "f":  # integral floats: type_of_target let only those through
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iub":
        raise InputError(
            f"`{name}` must hold integer class indices 0..K-1 when `classes` names the "
            f"classes (or leave `classes` out to use these labels as they are). "
            f"Received: {name}.dtype={arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise InputError(f"`{name}` must hold class indices >= 0. Received: {name}.min()={arr.min()}")
    return arr


def flatten(X: np.ndarray) -> np.ndarray:
    return X.flat() if isinstance(X, FeatureStream) else X.reshape(X.shape[0], -1)


def resolve_classes(classes: Any, y: np.ndarray, y_val: np.ndarray | None) -> np.ndarray:
    """Class names as a str array for class indices ``y`` (and ``y_val``); defaults to
    ``["0", "1", ...]``."""
    top = int(y.max())
    if y_val is not None and y_val.size:
        top = max(top, int(y_val.max()))
    if classes is None:
        return np.array([str(i) for i in range(top + 1)], dtype=str)
    if isinstance(classes, str):
        raise InputError(f"`classes` must be a list of class names, not a string. Received: classes={classes!r}")
    names = [str(c) for c in classes]
    if len(set(names)) != len(names):
        dup = sorted({c for c in names if names.count(c) > 1})
        raise InputError(f"`classes` must hold unique names. Received: duplicates {dup}")
    if top >= len(names):
        raise InputError(
            f"labels must be indices into `classes` (0..{len(names) - 1}). "
            f"Received: label {top} with {len(names)} classes {names}"
        )
    return np.array(names, dtype=str)


def encode_labels(y: Any, n: int, y_val: Any, n_val: int | None,
                  classes: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """The label values, class indices of ``y`` (and ``y_val``) and class names.

    Without ``classes`` any labels go in: the label values are ``np.unique(y)`` (as
    scikit-learn's ``classes_``) and the names their ``str``. With ``classes`` (names,
    what probe passes) ``y`` holds indices into it and the label values are ``0..K-1``."""
    if classes is not None:
        y = as_labels(y, n, "y")
        yv = None if y_val is None else as_labels(y_val, n_val, "y_val")
        names = resolve_classes(classes, y, yv)
        return np.arange(len(names)), y, yv, names
    labels = as_label_array(y, n, "y")
    values, indices = np.unique(labels, return_inverse=True)
    names = np.array([str(v) for v in values], dtype=str)
    yv = None
    if y_val is not None:
        val_labels = as_label_array(y_val, n_val, "y_val")
        try:
            yv = np.searchsorted(values, val_labels)
            known = values[np.minimum(yv, values.size - 1)] == val_labels
        except TypeError:  # labels numpy can not compare with y's (strings and numbers)
            known = np.zeros(val_labels.shape, dtype=bool)
        if not known.all():
            unseen = [str(v) for v in np.unique(val_labels[~known].astype(str))]
            raise InputError(
                f"every class needs training samples; the class(es) {unseen[:5]} of `y_val` "
                "have none in `y`. Add training samples of those classes or drop them from the "
                f"validation split. Received: training classes {names.tolist()}")
    return values, indices.reshape(-1).astype(np.int64), yv, names


def check_training_labels(y: np.ndarray, y_val: np.ndarray | None, classes: np.ndarray) -> None:
    """Every class has training samples, and validation samples when there is validation."""
    names = [str(c) for c in classes]  # plain str: repr() gives 'cat', not np.str_('cat')
    present = np.unique(y)
    if present.size < 2:
        raise InputError(
            "a classifier needs samples of at least 2 classes; "
            f"got only one class: {names[present[0]]!r}. Add images of another class. "
            f"Received: {y.size} training samples, all of class {names[present[0]]!r}"
        )
    seen = set(present.tolist())
    missing = [names[k] for k in range(len(names)) if k not in seen]
    if missing:
        raise InputError(
            f"every class needs training samples; class(es) {missing} have none in the training "
            "split. Add images to those classes or use a different split seed. "
            f"Received: training classes {[names[k] for k in present]}"
        )
    if y_val is not None:
        in_val = set(np.unique(y_val).tolist())
        absent = [names[k] for k in present if int(k) not in in_val]
        if absent:
            listed = ", ".join(repr(a) for a in absent)
            raise InputError(
                f"every class needs validation samples; {listed} "
                f"{'has' if len(absent) == 1 else 'have'} training samples but none in the "
                "validation split, so validation can not measure "
                f"{'it' if len(absent) == 1 else 'them'}. Add images (a class needs at least 3 "
                "for a seeded split), remove the class, or change the split seed or validation "
                f"fraction. Received: {y_val.size} validation samples of classes "
                f"{[names[k] for k in sorted(in_val)]}"
            )


@dataclass(frozen=True)
class FitData:
    """Validated fit inputs: flat train (and validation) features, labels, class names."""

    X: np.ndarray
    y: np.ndarray
    X_val: np.ndarray | None
    y_val: np.ndarray | None
    classes: np.ndarray  # the class names (str)
    input_shape: tuple[int, ...]
    multilabel: bool = False  # y is an (N, K) 0/1 matrix: several classes per sample
    views: np.ndarray | None = None  # (N, V, D): augmented views of each training row
    labels: np.ndarray | None = None  # the label value of each class (``classes_``)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_views(self) -> int:
        """Augmented views per training row (0: none)."""
        return 0 if self.views is None else int(self.views.shape[1])

    def with_views_as_rows(self) -> "FitData":
        """Every view as a training row of its own with its image's label (clean rows
        first, then the views image by image); no views left apart."""
        if not self.n_views:
            return replace(self, views=None)
        n, count = self.views.shape[:2]
        X = np.concatenate([self.X, self.views.reshape(n * count, -1)])
        return replace(self, X=X, y=np.concatenate([self.y, np.repeat(self.y, count, axis=0)]),
                       views=None)

    def train_and_val(self) -> tuple[np.ndarray, np.ndarray]:
        """Train + val (train alone without validation)."""
        if self.X_val is None:
            return self.X, self.y
        return np.concatenate([self.X, self.X_val]), np.concatenate([self.y, self.y_val])


def prepare_fit(X: Any, y: Any, X_val: Any, y_val: Any, classes: Any, views: Any = None,
                stream: bool = False) -> FitData:
    """Validate fit inputs once, for every head (``stream``: the head reads a
    `FeatureStream` chunk by chunk itself; `views`: (N, V, ...) augmented views of the
    training rows, or None)."""
    X = as_features(X, "X", stream)
    if is_indicator(y):
        return prepare_multilabel_fit(X, y, X_val, y_val, classes, views)
    input_shape = tuple(int(s) for s in X.shape[1:])
    if (X_val is None) != (y_val is None):
        raise InputError(
            "pass both `X_val` and `y_val`, or neither. "
            f"Received: X_val={'None' if X_val is None else 'array'}, y_val={'None' if y_val is None else 'array'}"
        )
    Xv = yv = None
    if X_val is not None:
        Xv = as_features(X_val, "X_val", stream)
        if Xv.shape[1:] != X.shape[1:]:
            raise InputError(
                "`X_val` must have the same per-sample shape as `X`. "
                f"Received: X.shape={X.shape}, X_val.shape={Xv.shape}"
            )
        Xv = flatten(Xv)
    values, y, yv, names = encode_labels(y, X.shape[0], y_val, None if Xv is None else Xv.shape[0], classes)
    check_training_labels(y, yv, names)
    return FitData(flatten(X), y, Xv, yv, names, input_shape, views=check_views(views, X), labels=values)


def check_views(views: Any, X: np.ndarray) -> np.ndarray | None:
    """`views` as a float array (N, V, D) whose row i holds the views of training row i."""
    if views is None:
        return None
    arr = np.asarray(views)
    if arr.ndim < 3 or arr.shape[0] != X.shape[0] or arr.shape[2:] != X.shape[1:]:
        raise InputError(
            f"`views` must have shape (N, V, *per-sample shape) = ({X.shape[0]}, V, "
            f"{', '.join(map(str, X.shape[1:]))}): V augmented views of each row of X, in "
            f"its order (`cache.views('train')`). Received: views.shape={arr.shape}"
        )
    if arr.shape[1] == 0:
        return None
    arr = as_features(arr, "views")
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


# --------------------------------------------------------------------------- #
# Multi-label: y is an (N, K) 0/1 matrix (scikit-learn's multilabel-indicator convention)
# --------------------------------------------------------------------------- #


def is_indicator(y: Any) -> bool:
    """Whether ``y`` is a multi-label target: a 2-D array with more than one column."""
    # np.asarray, not np.shape: array-likes (pandas, scikit-learn's test wrappers) convert
    # through __array__ but need not implement numpy's shape function
    shape = np.asarray(y).shape if y is not None else ()
    return len(shape) == 2 and shape[1] > 1


def as_indicator(y: Any, n: int, name: str = "y", K: int | None = None) -> np.ndarray:
    """Return ``y`` as an (n, K) int64 0/1 matrix (one column per class)."""
    arr = np.asarray(y)
    if arr.ndim != 2 or arr.shape[0] != n:
        x_name = "X" if name == "y" else "X_val"
        raise InputError(
            f"`{x_name}` and `{name}` must have the same number of samples, `{name}` one 0/1 column "
            f"per class. Received: {x_name} with {n} samples, {name}.shape={arr.shape}")
    if K is not None and arr.shape[1] != K:
        raise InputError(f"`{name}` must have one column per class ({K}). Received: {name}.shape={arr.shape}")
    if arr.dtype.kind not in "fiub" or not np.isin(arr, (0, 1)).all():
        raise InputError(
            f"a 2-D `{name}` is a multi-label target and must hold only 0 and 1 (1: the sample "
            f"carries that class). Received: values {np.unique(arr)[:5].tolist()}")
    return arr.astype(np.int64)


def check_multilabel_training(y: np.ndarray, classes: np.ndarray) -> None:
    """Every class has training samples with and without it (one binary problem each)."""
    names = [str(c) for c in classes]
    positives = y.sum(axis=0)
    never = [names[k] for k in np.flatnonzero(positives == 0)]
    always = [names[k] for k in np.flatnonzero(positives == y.shape[0])]
    if never or always:
        raise InputError(
            "every class of a multi-label dataset needs training samples with and without it; "
            + (f"class(es) {never} are on no training sample" if never else "")
            + ("; " if never and always else "")
            + (f"class(es) {always} are on every training sample" if always else "")
            + ". Add images, remove the class, or change the split seed. "
            f"Received: {y.shape[0]} training samples, positives per class {positives.tolist()}")


def prepare_multilabel_fit(X: np.ndarray, y: Any, X_val: Any, y_val: Any, classes: Any,
                           views: Any = None) -> FitData:
    """Validate multi-label fit inputs: ``y`` and ``y_val`` (N, K) 0/1 matrices."""
    Y = as_indicator(y, X.shape[0], "y")
    K = Y.shape[1]
    if (X_val is None) != (y_val is None):
        raise InputError(
            "pass both `X_val` and `y_val`, or neither. "
            f"Received: X_val={'None' if X_val is None else 'array'}, y_val={'None' if y_val is None else 'array'}")
    Xv = Yv = None
    if X_val is not None:
        Xv = as_features(X_val, "X_val")
        Yv = as_indicator(y_val, Xv.shape[0], "y_val", K)
        if Xv.shape[1:] != X.shape[1:]:
            raise InputError("`X_val` must have the same per-sample shape as `X`. "
                               f"Received: X.shape={X.shape}, X_val.shape={Xv.shape}")
        Xv = flatten(Xv)
    if classes is None:
        names = np.array([str(i) for i in range(K)], dtype=str)
    else:
        names = resolve_classes(classes, np.array([K - 1]), None)
        if len(names) != K:
            raise InputError(f"`classes` must name the {K} columns of `y`. Received: {len(names)} classes")
    check_multilabel_training(Y, names)
    return FitData(flatten(X), Y, Xv, Yv, names, tuple(int(s) for s in X.shape[1:]),
                   multilabel=True, views=check_views(views, X), labels=np.arange(K))


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow for large negative logits."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(logits, dtype=np.float64)))


def balanced_label_weights(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the weights of its positive and negative samples under "balanced"
    (each class its own binary problem: n / (2 n_positive), n / (2 n_negative))."""
    n = y.shape[0]
    positives = y.sum(axis=0).astype(np.float64)
    return n / (2 * np.maximum(positives, 1)), n / (2 * np.maximum(n - positives, 1))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


# --------------------------------------------------------------------------- #
# Parameter rules (shared by the heads and fine-tuning)
# --------------------------------------------------------------------------- #


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _int_in(low: int, high: int):
    return lambda v: is_int(v) and low <= v <= high


# name: (valid?, what is expected). Upper bounds keep a typo from allocating gigabytes.
PARAM_RULES = {
    "hidden_units": (_int_in(0, 16384), "an integer from 0 to 16384"),
    "dropout": (lambda v: is_real(v) and 0 <= v < 1, "a number in [0, 1)"),
    "epochs": (_int_in(1, 10000), "an integer from 1 to 10000"),
    "learning_rate": (lambda v: is_real(v) and math.isfinite(v) and 0 < v <= 10, "a number in (0, 10]"),
    "batch_size": (_int_in(1, 65536), "an integer from 1 to 65536"),
    "patience": (_int_in(0, 10000), "an integer from 0 to 10000"),
    "seed": (_int_in(0, MAX_SEED), f"an integer from 0 to {MAX_SEED}"),
    "max_iter": (_int_in(1, 100000), "an integer from 1 to 100000"),
    "refit": (lambda v: isinstance(v, (bool, np.bool_)), "True or False"),
    "class_weight": (lambda v: v in (None, "balanced"), "None or 'balanced'"),
}


def check_params(error: type[ProbeError] = ProbeError, **values: Any) -> None:
    """Raise `error` for the first setting out of range (see PARAM_RULES)."""
    for name, value in values.items():
        valid, expected = PARAM_RULES[name]
        if not valid(value):
            raise error(f"`{name}` must be {expected}. Received: {name}={value!r}")


def keras_class_weight(class_weight: str | None, y: np.ndarray, n_classes: int) -> dict | None:
    """Keras' `class_weight` dict for "balanced" (None otherwise)."""
    if class_weight != "balanced":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(n_classes), y=y)
    return {int(k): float(v) for k, v in enumerate(weights)}


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(handle)`` on a temporary file next to ``path``, then move it in place
    (`files.atomic_write`: every file probe writes goes through it)."""
    with files.atomic_write(path, "wb") as handle:
        write(handle)


def corrupt(path: Path, why: str) -> RunError:
    return RunError(
        f"the head file '{path}' is unreadable or was modified ({why}); re-run `probe fit` "
        f"to write it again. Received: {path.name} in '{path.parent}'"
    )


def read_head_json(directory: str | os.PathLike) -> tuple[Path, dict]:
    """The directory and its parsed ``head.json``."""
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
        raise corrupt(path, str(exc)) from None
    return directory, meta


def check_meta(meta: dict, path: Path, kind: str) -> None:
    """The keys and shapes every ``head.json`` must have."""
    if meta.get("kind") != kind:
        raise corrupt(path, f"expected kind {kind!r}, found {meta.get('kind')!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise corrupt(path, f"expected format_version {FORMAT_VERSION}, found {meta.get('format_version')!r}")
    for key in ("classes", "input_shape", "n_features_in", "params"):
        if key not in meta:
            raise corrupt(path, f"the key {key!r} is missing")
    classes = meta["classes"]
    if (not isinstance(classes, list) or len(classes) < 2
            or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes)):
        raise corrupt(path, "'classes' must list at least 2 unique class names")
    shape, n_features = meta["input_shape"], meta["n_features_in"]
    if (
        not isinstance(shape, list)
        or not all(is_int(s) and s > 0 for s in shape)
        or not is_int(n_features)
        or math.prod(shape) != n_features
    ):
        raise corrupt(path, "'input_shape' does not match 'n_features_in'")
    if not isinstance(meta["params"], dict):
        raise corrupt(path, "'params' must be an object")


def read_npz(path: Path, expected: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    """Arrays of ``path`` (no pickle), each checked against its (shape, dtype kind)."""
    if not path.is_file():
        raise RunError(f"the head file '{path}' is missing; re-run `probe fit`. Received: directory='{path.parent}'")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in expected}
    except Exception as exc:
        raise corrupt(path, f"{type(exc).__name__}: {exc}") from None
    for key, (shape, kind) in expected.items():
        array = arrays[key]
        if array.shape != shape:
            raise corrupt(path, f"array {key!r} has shape {array.shape}, expected {shape}")
        if array.dtype.kind not in kind:
            raise corrupt(path, f"array {key!r} has dtype {array.dtype}")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise corrupt(path, f"array {key!r} holds NaN or infinite values")
    return arrays


# --------------------------------------------------------------------------- #
# The head contract
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class HeadOption:
    """A constructor parameter a head exposes on the command line.

    ``flag`` is the option (``--hidden-units``), ``kind`` its Python type, ``choices`` the
    allowed strings (the string "none" stands for None); the default is the head's own."""

    param: str
    flag: str
    kind: type
    help: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Curves:
    """A head's training-curve data for ``report.plot_curves``.

    ``x`` the horizontal values (C, epoch, k), ``series`` named curves drawn in panels
    (``panels``: title -> list of (series key, label)), ``chosen`` the x value that was
    chosen (marked on the plot), ``log_x`` whether x is on a log axis."""

    xlabel: str
    x: list[float]
    panels: dict[str, list[tuple[str, str]]]
    series: dict[str, list[float]]
    chosen: float | None
    chosen_label: str
    log_x: bool = False
