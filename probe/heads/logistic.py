"""The logistic head: standardised multinomial logistic regression (scikit-learn, lbfgs),
with C chosen on validation by a warm-started sweep, foldable into one Dense softmax layer."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from probe.errors import ProbeError

from .estimator import Head
from .options import head_options
from .base import HEAD_NPZ, Curves, FitData, atomic_write_bytes, check_params, \
    is_real, read_npz, sigmoid, softmax

# The linear-probe grid: 1e-6 ... 1e5, one value per decade (exact decimal values).
DEFAULT_CS = tuple(10.0 ** exponent for exponent in range(-6, 6))
SWEEPS = ("fast", "full")
_PATIENCE = 1  # coarse points worse than the best in a row that end the fast sweep
_SWEEP_TOL = 1e-3  # the sweep only ranks candidates: looser than the final fit's 1e-4
_FINAL_TOL = 1e-4


_SPAN_RATIO = 4  # the span basis pays when the images are at most a quarter of the dimensions


def span_basis(Z: np.ndarray) -> np.ndarray | None:
    """An orthonormal basis (D, N) of the span of the N training rows when N <= D / 4,
    else None.

    With an L2 penalty the optimal coefficients lie in that span (any component outside it
    adds penalty and changes no training logit), so fitting on the N coordinates ``Z @ Q``
    and mapping back with ``Q.T`` gives the same model as fitting on the D features, at a
    fraction of the cost per iteration when there are far fewer images than dimensions.
    The QR decomposition itself costs about 4 D N^2 operations: with 1,050 images of 2,048
    dimensions it took four times as long as the whole sweep without it, hence the bound."""
    if _SPAN_RATIO * Z.shape[0] > Z.shape[1]:
        return None
    Q, _ = np.linalg.qr(Z.T)
    return Q


class LogisticHead(Head):
    """Standardised multinomial logistic regression (scikit-learn, lbfgs).

    Parameters
    ----------
    C : float or None
        Inverse L2 regularisation strength. ``None`` chooses it on validation data: the
        candidates ``Cs`` are fitted on the training split from strong to weak
        regularisation, each fit warm-started from the previous solution, and the best
        validation accuracy wins (ties: lower validation log loss, then smaller C). Without
        validation data ``C=1.0``.
    Cs : sequence of float
        Candidates for the sweep.
    sweep : "fast" or "full"
        "full" fits every candidate. "fast" fits every other candidate, stops at the first
        one that ranks below the best so far (the weakly regularised fits, the slow ones,
        are then skipped), and fits the skipped neighbours of the best. Sweep fits stop at a
        looser tolerance (1e-3) than the final fit (1e-4): they only rank candidates. With
        far fewer training images than dimensions (at most a quarter) every fit works in the span of the images
        (see ``span_basis``): the same model, cheaper iterations.
    class_weight : None or "balanced"
    max_iter : int
        lbfgs iterations.
    seed : int
        ``random_state`` of the solver.
    refit : bool
        With validation data: True fits the chosen C again on train + val; False on train
        only (the model has not seen val). Either final fit is warm-started from the sweep's
        solution.

    Learned attributes: ``classes_``, ``n_features_in_``, ``input_shape_``, ``C_``,
    ``sweep_`` (list of ``{"C", "val_accuracy", "val_log_loss"}`` in increasing C),
    ``history_`` (the sweep as a dict of lists), ``mean_``, ``scale_`` (standardisation),
    ``coef_`` (``(K, D)``, or ``(1, D)`` for two classes as in scikit-learn),
    ``intercept_``, ``n_iter_``, ``converged_``. ``predict_proba`` only uses these arrays,
    so a loaded head needs no scikit-learn objects.

    scikit-learn's estimator checks (``tests/test_sklearn_checks.py``) pass but for
    ``check_class_weight_classifiers``: ``class_weight`` takes None or "balanced" only, the
    choices of ``probe fit --class-weight``; a dict keyed by labels would not survive
    head.json, whose object keys are strings.
    """

    name = "logreg"
    options = head_options("logreg")
    _fitted_attr = "coef_"

    def __init__(
        self,
        C: float | None = None,
        Cs: Any = DEFAULT_CS,
        sweep: str = "fast",
        class_weight: str | None = None,
        max_iter: int = 1000,
        seed: int = 0,
        refit: bool = True,
    ) -> None:
        self.C = C
        self.Cs = Cs
        self.sweep = sweep
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.seed = seed
        self.refit = refit

    # -- fitting --------------------------------------------------------- #
    def _candidates(self) -> list[float]:
        try:
            return sorted(float(c) for c in np.ravel(np.asarray(self.Cs, dtype=float)))
        except (TypeError, ValueError):
            raise ProbeError(f"`Cs` must be a sequence of positive numbers. Received: Cs={self.Cs!r}") from None

    def _check_params(self) -> None:
        check_params(class_weight=self.class_weight, max_iter=self.max_iter, seed=self.seed,
                     refit=self.refit)
        if self.C is not None and not (is_real(self.C) and math.isfinite(self.C) and self.C > 0):
            raise ProbeError(f"`C` must be a positive number or None. Received: C={self.C!r}")
        Cs = self._candidates()
        if not Cs or len(Cs) > 100 or any(not (math.isfinite(c) and c > 0) for c in Cs):
            raise ProbeError(f"`Cs` must be 1 to 100 positive numbers. Received: Cs={self.Cs!r}")
        if self.sweep not in SWEEPS:
            raise ProbeError(f"`sweep` must be one of {', '.join(SWEEPS)}. Received: sweep={self.sweep!r}")

    def _model(self, C: float, tol: float = _FINAL_TOL):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=C, solver="lbfgs", class_weight=self.class_weight, tol=tol,
                                  max_iter=int(self.max_iter), random_state=int(self.seed),
                                  warm_start=True)

    @staticmethod
    def _fit_model(model, Z: np.ndarray, y: np.ndarray, start=None) -> tuple:
        """Fit (from ``start``: coefficients and intercept); the solution and iterations."""
        from sklearn.exceptions import ConvergenceWarning

        if start is not None:  # warm start from a stored solution
            model.coef_, model.intercept_ = start[0].copy(), start[1].copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(Z, y)
        return model.coef_.copy(), model.intercept_.copy(), int(np.max(model.n_iter_))

    def _evaluate(self, C: float, model, Zv: np.ndarray, yv: np.ndarray, K: int) -> dict:
        from sklearn.metrics import log_loss

        proba = model.predict_proba(Zv)
        return {"C": float(C), "val_accuracy": float(np.mean(np.argmax(proba, axis=1) == yv)),
                "val_log_loss": float(log_loss(yv, proba, labels=list(range(K))))}

    @staticmethod
    def _rank(record: dict) -> tuple:
        return (-record["val_accuracy"], record["val_log_loss"], record["C"])

    def _run_sweep(self, Z, y, Zv, yv, K) -> tuple[list[dict], dict[float, tuple]]:
        """Fit the candidates (all, or coarse-to-fine); the records and each solution."""
        Cs = self._candidates()
        coarse = Cs if self.sweep == "full" else Cs[::2]
        model = self._model(Cs[0], _SWEEP_TOL)
        records, solutions = [], {}
        worse_in_a_row = 0
        for C in coarse:  # strong to weak regularisation, each fit from the previous one
            solutions[C] = self._fit_model(model.set_params(C=C), Z, y)
            records.append(self._evaluate(C, model, Zv, yv, K))
            worse_in_a_row = 0 if min(records, key=self._rank) is records[-1] else worse_in_a_row + 1
            if self.sweep == "fast" and worse_in_a_row >= _PATIENCE:
                break
        if self.sweep == "fast":  # the skipped neighbours of the best coarse value
            i = Cs.index(min(records, key=self._rank)["C"])
            for C in (Cs[j] for j in (i - 1, i + 1) if 0 <= j < len(Cs) and Cs[j] not in solutions):
                start = solutions[min(solutions, key=lambda c: abs(math.log(c / C)))]
                solutions[C] = self._fit_model(model.set_params(C=C), Z, y, start)
                records.append(self._evaluate(C, model, Zv, yv, K))
        return sorted(records, key=lambda r: r["C"]), solutions

    def _fit_at(self, X: np.ndarray, y: np.ndarray, C: float, start_full=None) -> tuple:
        """Standardise X and fit at C (in the span of the rows when N < D), optionally from
        full-space coefficients; the scaler and the full-space solution."""
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X)
        Z = scaler.transform(X)
        Q = span_basis(Z)
        start = None
        if start_full is not None:
            start = (start_full[0] if Q is None else start_full[0] @ Q, start_full[1])
        coef, intercept, n_iter = self._fit_model(self._model(C), Z if Q is None else Z @ Q, y, start)
        return scaler, (coef if Q is None else coef @ Q.T, intercept, n_iter)

    def _fit(self, data: FitData) -> np.ndarray | None:
        from threadpoolctl import threadpool_limits

        # lbfgs makes many small matrix products: BLAS threads spinning for them cost far
        # more than they give (a fit on 420 x 2,048 features took 17x longer with two
        # OpenBLAS threads than with one on a busy 2-core machine)
        with threadpool_limits(1, user_api="blas"):
            return self._fit_single_threaded(data)

    def _fit_single_threaded(self, data: FitData) -> np.ndarray | None:
        """Sweep C on val (when C is not given), then the final fit; the val probabilities
        of the sweep's train-only solution at the chosen C (None without a sweep)."""
        from sklearn.preprocessing import StandardScaler

        start, sweep, val_proba = None, [], None
        if self.C is None and data.X_val is not None:
            scaler = StandardScaler().fit(data.X)
            Z, Zv = scaler.transform(data.X), scaler.transform(data.X_val)
            Q = span_basis(Z)
            if Q is not None:
                Z, Zv = Z @ Q, Zv @ Q
            sweep, solutions = self._run_sweep(Z, data.y, Zv, data.y_val, data.n_classes)
            C_ = min(sweep, key=self._rank)["C"]
            coef, intercept, _ = solutions[C_]
            val_proba = _class_probabilities(Zv @ coef.T + intercept)
            start = (coef if Q is None else coef @ Q.T, intercept)
        else:
            C_ = 1.0 if self.C is None else float(self.C)
        # the final fit: train + val (refit) or train, warm-started from the sweep's solution
        X, y = data.train_and_val() if self.refit else (data.X, data.y)
        scaler, (coef, intercept, n_iter) = self._fit_at(X, y, C_, start)
        self.C_ = float(C_)
        self.sweep_ = sweep
        self.history_ = {key: [r[key] for r in sweep] for key in ("C", "val_accuracy", "val_log_loss")}
        self.mean_ = np.asarray(scaler.mean_, dtype=np.float64)
        self.scale_ = np.asarray(scaler.scale_, dtype=np.float64)
        self.intercept_ = np.asarray(intercept, dtype=np.float64)
        self.n_iter_ = int(n_iter)
        self.converged_ = self.n_iter_ < int(self.max_iter)
        self.coef_ = np.asarray(coef, dtype=np.float64)
        return val_proba

    # -- prediction ------------------------------------------------------ #
    def _predict_flat(self, X: np.ndarray) -> np.ndarray:
        z = (X.astype(np.float64) - self.mean_) / self.scale_
        raw = z @ self.coef_.T + self.intercept_
        if getattr(self, "multilabel_", False):  # one independent probability per class
            return sigmoid(raw)
        return _class_probabilities(raw)

    def dense_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Fold standardisation and the logistic model into one Dense layer.

        Returns ``(W, b)`` with ``W`` of shape ``(D, K)`` and ``b`` of shape ``(K,)``
        (float64) such that ``softmax(x @ W + b) == predict_proba(x)`` for flattened
        features ``x``. For two classes the logits are ``[0, w.z + b]``, which gives
        scikit-learn's sigmoid probabilities.
        """
        self._check_fitted("dense_weights")
        coef = self.coef_ / self.scale_  # (K', D)
        W = coef.T.copy()
        b = self.intercept_ - coef @ self.mean_
        if self.coef_.shape[0] == 1 and not getattr(self, "multilabel_", False):
            W = np.concatenate([np.zeros_like(W), W], axis=1)
            b = np.concatenate([[0.0], b])
        return W, b

    def keras_head(self):
        """One Dense softmax layer (multi-label: sigmoid) holding the folded standardisation and coefficients."""
        from probe._keras import keras

        self._check_fitted("keras_head")
        kernel, bias = self.dense_weights()
        inputs = keras.Input(shape=(self.n_features_in_,), name="features")
        activation = "sigmoid" if getattr(self, "multilabel_", False) else "softmax"
        layer = keras.layers.Dense(kernel.shape[1], activation=activation, name="logistic_head")
        outputs = layer(inputs)
        layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
        return keras.Model(inputs, outputs, name="logistic_head")

    def curves_(self) -> Curves | None:
        if not self.sweep_:
            return None
        return Curves(
            xlabel="C (inverse regularisation)", x=list(self.history_["C"]),
            panels={"Log loss": [("val_log_loss", "validation")],
                    **({"Mean average precision": [("val_map", "validation")]}
                       if "val_map" in self.history_ else {"Accuracy": [("val_accuracy", "validation")]})},
            series={k: list(v) for k, v in self.history_.items() if k != "C"},
            chosen=self.C_, chosen_label=f"chosen C = {self.C_:g}", log_x=True)

    def summary_(self) -> dict[str, Any]:
        return {"C": float(self.C_)}

    # -- persistence ----------------------------------------------------- #
    def _save_arrays(self, directory: Path) -> None:
        arrays = dict(mean=self.mean_, scale=self.scale_, coef=self.coef_, intercept=self.intercept_)
        atomic_write_bytes(directory / HEAD_NPZ, lambda handle: np.savez(handle, **arrays))

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "C_": self.C_, "sweep": self.sweep_, "n_iter": self.n_iter_,
                "converged": bool(self.converged_)}

    def _load_arrays(self, directory: Path, meta: dict) -> None:
        K, D = len(meta["classes"]), int(meta["n_features_in"])
        rows = 1 if K == 2 and not self.multilabel_ else K
        arrays = read_npz(directory / HEAD_NPZ, {
            "mean": ((D,), "f"), "scale": ((D,), "f"), "coef": ((rows, D), "f"), "intercept": ((rows,), "f")})
        if not np.all(arrays["scale"] > 0):
            raise ValueError("'scale' must be positive")
        C_ = float(meta.get("C_", 1.0))
        if not (math.isfinite(C_) and C_ > 0):
            raise ValueError(f"'C_' must be a positive number, found {C_!r}")
        keys = _ML_SWEEP_KEYS if self.multilabel_ else ("C", "val_accuracy", "val_log_loss")
        sweep = [{k: float(r[k]) for k in keys} for r in meta.get("sweep", [])]
        self.C_, self.sweep_ = C_, sweep
        self.history_ = {key: [r[key] for r in sweep] for key in keys}
        self.n_iter_ = int(meta.get("n_iter", 0))
        self.converged_ = bool(meta.get("converged", True))
        self.mean_, self.scale_ = arrays["mean"].astype(np.float64), arrays["scale"].astype(np.float64)
        self.intercept_ = arrays["intercept"].astype(np.float64)
        self.coef_ = arrays["coef"].astype(np.float64)

    # -- multi-label: one standardised binary logistic regression per class ---------- #
    def _fit_multilabel(self, data: FitData) -> np.ndarray | None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):  # as `_fit`
            return self._fit_multilabel_single_threaded(data)

    def _fit_per_class(self, models: list, Z: np.ndarray, Y: np.ndarray, start=None) -> tuple:
        """Fit each class's binary model on its column of ``Y`` (warm: from its previous
        solution, or from ``start``); the stacked (K, D) coefficients, (K,) intercepts and
        the most iterations any class took."""
        parts = [self._fit_model(model, Z, Y[:, k],
                                 None if start is None else (start[0][k:k + 1], start[1][k:k + 1]))
                 for k, model in enumerate(models)]
        return (np.vstack([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                max(p[2] for p in parts))

    def _run_multilabel_sweep(self, Z, Y, Zv, Yv, Cs: list[float]) -> tuple[list[dict], dict]:
        """As `_run_sweep` (all candidates, or coarse-to-fine), ranking each C by the mean
        average precision on val of its K per-class models."""
        from probe.evaluate import mean_average_precision

        coarse = Cs if self.sweep == "full" else Cs[::2]
        models = [self._model(Cs[0], _SWEEP_TOL) for _ in range(Y.shape[1])]
        records, solutions = [], {}

        def fit_at(C: float, start=None) -> None:
            for model in models:
                model.set_params(C=C)
            solutions[C] = self._fit_per_class(models, Z, Y, start)
            proba = sigmoid(Zv @ solutions[C][0].T + solutions[C][1])
            records.append({"C": float(C), "val_map": mean_average_precision(Yv, proba),
                            "val_log_loss": _binary_log_loss(Yv, proba)})

        worse_in_a_row = 0
        for C in coarse:
            fit_at(C)
            worse_in_a_row = 0 if min(records, key=_ml_rank) is records[-1] else worse_in_a_row + 1
            if self.sweep == "fast" and worse_in_a_row >= _PATIENCE:
                break
        if self.sweep == "fast":
            i = Cs.index(min(records, key=_ml_rank)["C"])
            for C in (Cs[j] for j in (i - 1, i + 1) if 0 <= j < len(Cs) and Cs[j] not in solutions):
                fit_at(C, solutions[min(solutions, key=lambda c: abs(math.log(c / C)))])
        return sorted(records, key=lambda r: r["C"]), solutions

    def _fit_multilabel_single_threaded(self, data: FitData) -> np.ndarray | None:
        """C by val mean average precision (the candidates, or the fixed C), then the final
        fit; the val probabilities of the train-only model at the chosen C."""
        from sklearn.preprocessing import StandardScaler

        start, sweep, val_proba = None, [], None
        if data.X_val is not None:
            scaler = StandardScaler().fit(data.X)
            Z, Zv = scaler.transform(data.X), scaler.transform(data.X_val)
            Q = span_basis(Z)
            if Q is not None:
                Z, Zv = Z @ Q, Zv @ Q
            Cs = self._candidates() if self.C is None else [float(self.C)]
            records, solutions = self._run_multilabel_sweep(Z, data.y, Zv, data.y_val, Cs)
            C_ = min(records, key=_ml_rank)["C"]
            sweep = records if self.C is None else []
            coef, intercept, _ = solutions[C_]
            val_proba = sigmoid(Zv @ coef.T + intercept)
            start = (coef if Q is None else coef @ Q.T, intercept)
        else:
            C_ = 1.0 if self.C is None else float(self.C)
        X, Y = data.train_and_val() if self.refit else (data.X, data.y)
        scaler = StandardScaler().fit(X)
        Z = scaler.transform(X)
        Q = span_basis(Z)
        models = [self._model(C_) for _ in range(Y.shape[1])]
        if start is not None and Q is not None:
            start = (start[0] @ Q, start[1])
        coef, intercept, n_iter = self._fit_per_class(models, Z if Q is None else Z @ Q, Y, start)
        self.C_, self.sweep_ = float(C_), sweep
        self.history_ = {key: [r[key] for r in sweep] for key in _ML_SWEEP_KEYS}
        self.mean_ = np.asarray(scaler.mean_, dtype=np.float64)
        self.scale_ = np.asarray(scaler.scale_, dtype=np.float64)
        self.coef_ = np.asarray(coef if Q is None else coef @ Q.T, dtype=np.float64)
        self.intercept_ = np.asarray(intercept, dtype=np.float64)
        self.n_iter_ = int(n_iter)
        self.converged_ = self.n_iter_ < int(self.max_iter)
        if val_proba is not None and not self.refit:  # the final model is the train-only one
            val_proba = sigmoid(((data.X_val - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_)
        return val_proba


_ML_SWEEP_KEYS = ("C", "val_map", "val_log_loss")


def _class_probabilities(raw: np.ndarray) -> np.ndarray:
    """Single-label probabilities of a linear model's scores, as scikit-learn's."""
    if raw.shape[1] == 1:  # binary: scikit-learn models P(class 1) = sigmoid(raw)
        raw = np.concatenate([np.zeros_like(raw), raw], axis=1)
    return softmax(raw)


def _ml_rank(record: dict) -> tuple:
    return (-record["val_map"], record["val_log_loss"], record["C"])


def _binary_log_loss(Y: np.ndarray, proba: np.ndarray) -> float:
    """Mean binary cross-entropy over every (sample, class) entry."""
    P = np.clip(np.asarray(proba, dtype=np.float64), 1e-15, 1 - 1e-15)
    return float(-np.mean(Y * np.log(P) + (1 - Y) * np.log(1 - P)))
