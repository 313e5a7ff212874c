"""The k-NN head: DINOv2's weighted k-nearest-neighbour classifier on L2-normalised features.

A query's k most similar bank features (cosine similarity) vote for their classes with
weight ``exp(similarity / T)``; the votes, normalised to sum to one, are the probabilities.
k and T are chosen on validation; the bank is then train + val (``refit=True``) or train
only. Similarities are float32 matrix products computed a block of queries at a time, so
memory stays bounded whatever the number of queries.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from probe.errors import ProbeError

from .estimator import Head
from .options import head_options
from .base import HEAD_NPZ, Curves, FitData, atomic_write_bytes, check_params, \
    is_int, is_real, read_npz

DEFAULT_KS = (1, 3, 5, 10, 20, 50)
DEFAULT_TEMPERATURES = (0.02, 0.07, 0.2)
UNVALIDATED = (20, 0.07)  # DINOv2's k and T, used when there is no validation data
_BLOCK_ELEMENTS = 1 << 22  # similarities held at once (16 MB of float32)
_NORM_FLOOR = 1e-12  # squared norm floor, as keras.layers.UnitNormalization


def l2_normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); all-zero rows stay zero."""
    X = np.asarray(X, dtype=np.float32)
    squared = np.einsum("ij,ij->i", X, X)
    return X / np.sqrt(np.maximum(squared, _NORM_FLOOR))[:, None]


def nearest(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest cosine similarities of each (normalised) query to the bank, in
    decreasing order, and their bank indices; blockwise float32 products."""
    k = min(int(k), bank.shape[0])
    block = max(1, _BLOCK_ELEMENTS // max(1, bank.shape[0]))
    sims = np.empty((queries.shape[0], k), dtype=np.float32)
    index = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], block):
        S = queries[start: start + block] @ bank.T
        if k < S.shape[1]:
            top = np.argpartition(-S, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(S.shape[1]), S.shape)
        values = np.take_along_axis(S, top, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        sims[start: start + block] = np.take_along_axis(values, order, axis=1)
        index[start: start + block] = np.take_along_axis(top, order, axis=1)
    return sims, index


def vote(sims: np.ndarray, labels: np.ndarray, k: int, temperature: float, n_classes: int) -> np.ndarray:
    """Class probabilities from the k nearest: votes weighted by exp(similarity / T).
    ``sims`` are sorted in decreasing order; ``labels`` the neighbours' classes."""
    top = sims[:, :k].astype(np.float64)
    # subtracting the largest similarity leaves the normalised votes unchanged and keeps
    # exp() finite for small temperatures
    weights = np.exp((top - top[:, :1]) / temperature)
    proba = np.zeros((sims.shape[0], n_classes))
    np.add.at(proba, (np.arange(sims.shape[0])[:, None], labels[:, :k]), weights)
    return proba / proba.sum(axis=1, keepdims=True)


def vote_multilabel(sims: np.ndarray, targets: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """Multi-label: per class, the similarity-weighted share of the k nearest that carry
    it (weights exp(similarity / T), normalised to sum to one). ``targets`` are the
    neighbours' (N, k_max, K) 0/1 rows."""
    top = sims[:, :k].astype(np.float64)
    weights = np.exp((top - top[:, :1]) / temperature)
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("nj,njc->nc", weights, targets[:, :k].astype(np.float64))


class KNNHead(Head):
    """Weighted k-nearest neighbours on L2-normalised features (DINOv2's k-NN protocol).

    Parameters
    ----------
    k : int or None
        Neighbours that vote; None chooses it from ``ks`` on validation data.
    temperature : float or None
        T of the vote weights ``exp(similarity / T)``; None chooses it from
        ``temperatures`` on validation data.
    ks, temperatures : sequences
        The candidates. Every pair is scored on val (best accuracy, ties: lower log loss,
        then smaller k and T). Without validation data k=20, T=0.07 (DINOv2's defaults).
    refit : bool
        With validation data: True puts train + val in the bank after the choice; False
        keeps train only.
    seed : int
        Unused by the algorithm (k-NN is deterministic); accepted so that every head takes
        the same ``--seed``.

    Learned attributes: ``classes_``, ``n_features_in_``, ``input_shape_``, ``bank_``
    (normalised float32 features), ``bank_labels_``, ``k_``, ``temperature_``,
    ``selection_`` (list of ``{"k", "T", "val_accuracy", "val_log_loss"}``).
    """

    name = "knn"
    options = head_options("knn")
    _fitted_attr = "bank_"

    def __init__(self, k: int | None = None, temperature: float | None = None, ks: Any = DEFAULT_KS,
                 temperatures: Any = DEFAULT_TEMPERATURES, refit: bool = True, seed: int = 0) -> None:
        self.k = k
        self.temperature = temperature
        self.ks = ks
        self.temperatures = temperatures
        self.refit = refit
        self.seed = seed

    def _check_params(self) -> None:
        check_params(refit=self.refit, seed=self.seed)
        ks = [self.k] if self.k is not None else list(np.ravel(np.asarray(self.ks, dtype=object)))
        if not ks or len(ks) > 100 or not all(is_int(k) and 1 <= k <= 10000 for k in ks):
            raise ProbeError(f"`k` (or every value of `ks`) must be an integer from 1 to 10000. "
                             f"Received: k={self.k!r}, ks={self.ks!r}")
        Ts = [self.temperature] if self.temperature is not None else list(
            np.ravel(np.asarray(self.temperatures, dtype=object)))
        if not Ts or len(Ts) > 100 or not all(is_real(t) and math.isfinite(t) and 0.001 <= t <= 100 for t in Ts):
            raise ProbeError(f"`temperature` (or every value of `temperatures`) must be a number from "
                             f"0.001 to 100. Received: temperature={self.temperature!r}, "
                             f"temperatures={self.temperatures!r}")

    def _grid(self, bank_size: int) -> tuple[list[int], list[float]]:
        ks = [self.k] if self.k is not None else [int(k) for k in np.ravel(self.ks)]
        Ts = [self.temperature] if self.temperature is not None else [float(t) for t in np.ravel(self.temperatures)]
        return sorted({min(k, bank_size) for k in ks}), sorted(set(Ts))

    def _select(self, bank, labels, data: FitData) -> list[dict]:
        """Score every (k, T) on validation with the train bank."""
        ks, Ts = self._grid(bank.shape[0])
        sims, index = nearest(l2_normalise(data.X_val), bank, max(ks))
        neighbour_labels = labels[index]
        rows = np.arange(data.y_val.size)
        records = []
        for k in ks:
            for T in Ts:
                proba = vote(sims, neighbour_labels, k, T, data.n_classes)
                true = np.clip(proba[rows, data.y_val], 1e-15, 1.0)
                records.append({"k": int(k), "T": float(T),
                                "val_accuracy": float(np.mean(proba.argmax(axis=1) == data.y_val)),
                                "val_log_loss": float(-np.mean(np.log(true)))})
        return records

    def _fit(self, data: FitData) -> None:
        bank, labels = l2_normalise(data.X), data.y
        selection = []
        if data.X_val is not None:
            selection = self._select(bank, labels, data)
            best = min(selection, key=lambda r: (-r["val_accuracy"], r["val_log_loss"], r["k"], r["T"]))
            k, T = best["k"], best["T"]
            if self.refit:
                bank = np.concatenate([bank, l2_normalise(data.X_val)])
                labels = np.concatenate([labels, data.y_val])
        else:
            k = self.k if self.k is not None else UNVALIDATED[0]
            T = self.temperature if self.temperature is not None else UNVALIDATED[1]
        self.k_, self.temperature_ = int(min(k, bank.shape[0])), float(T)
        self.selection_ = selection
        self.bank_labels_ = labels.astype(np.int64)
        self.bank_ = bank

    def _predict_flat(self, X: np.ndarray) -> np.ndarray:
        sims, index = nearest(l2_normalise(X), self.bank_, self.k_)
        if getattr(self, "multilabel_", False):
            return vote_multilabel(sims, self.bank_labels_[index], self.k_, self.temperature_)
        return vote(sims, self.bank_labels_[index], self.k_, self.temperature_, len(self.classes_))

    def keras_head(self):
        """Built-in layers only: UnitNormalization, the bank as a bias-free Dense layer's
        kernel (similarities), top-k, exp((s - max) / T) weights, and the neighbours' one-hot
        labels as an Embedding table summed under those weights."""
        from probe._keras import keras

        self._check_fitted("keras_head")
        ops, layers = keras.ops, keras.layers
        n, K = self.bank_.shape[0], len(self.classes_)
        inputs = keras.Input(shape=(self.n_features_in_,), name="features")
        unit = layers.UnitNormalization(axis=-1, name="l2_normalise")(inputs)
        bank = layers.Dense(n, use_bias=False, name="knn_bank")
        sims = bank(unit)
        bank.set_weights([self.bank_.T.astype(np.float32)])
        top, index = ops.top_k(sims, self.k_)
        weights = ops.exp((top - ops.max(top, axis=-1, keepdims=True)) / self.temperature_)
        label_table = layers.Embedding(n, K, trainable=False, name="knn_labels")
        one_hot = label_table(index)
        multilabel = getattr(self, "multilabel_", False)
        rows = self.bank_labels_ if multilabel else np.eye(K)[self.bank_labels_]
        label_table.set_weights([rows.astype(np.float32)])
        votes = ops.sum(one_hot * ops.expand_dims(weights, -1), axis=1)
        # single-label: votes normalised over the classes; multi-label: each class's
        # weighted share of the neighbours (the weights normalised)
        total = ops.sum(weights, axis=-1, keepdims=True) if multilabel else ops.sum(votes, axis=-1, keepdims=True)
        outputs = votes / total
        return keras.Model(inputs, outputs, name="knn_head")

    # -- multi-label: the weighted share of neighbours carrying each class ----------- #
    def _fit_multilabel(self, data: FitData) -> np.ndarray | None:
        """k and T by mean average precision on val (train bank); the bank is then
        train + val (refit) or train; the val probabilities of the train bank."""
        from probe.evaluate import mean_average_precision

        bank, targets = l2_normalise(data.X), data.y
        selection, val_proba = [], None
        if data.X_val is not None:
            ks, Ts = self._grid(bank.shape[0])
            sims, index = nearest(l2_normalise(data.X_val), bank, max(ks))
            neighbours = targets[index]
            scored = {}
            for k in ks:
                for T in Ts:
                    scored[k, T] = proba = vote_multilabel(sims, neighbours, k, T)
                    P = np.clip(proba, 1e-15, 1 - 1e-15)
                    selection.append({"k": int(k), "T": float(T),
                                      "val_map": mean_average_precision(data.y_val, proba),
                                      "val_log_loss": float(-np.mean(data.y_val * np.log(P)
                                                                     + (1 - data.y_val) * np.log(1 - P)))})
            best = min(selection, key=lambda r: (-r["val_map"], r["val_log_loss"], r["k"], r["T"]))
            k, T = best["k"], best["T"]
            val_proba = scored[k, T]
            if self.refit:
                bank = np.concatenate([bank, l2_normalise(data.X_val)])
                targets = np.concatenate([targets, data.y_val])
        else:
            k = self.k if self.k is not None else UNVALIDATED[0]
            T = self.temperature if self.temperature is not None else UNVALIDATED[1]
        self.k_, self.temperature_ = int(min(k, bank.shape[0])), float(T)
        self.selection_ = selection
        self.bank_labels_ = targets.astype(np.int64)
        self.bank_ = bank
        return val_proba

    def finetune_refusal(self) -> str | None:
        return ("fine-tuning needs a head that learns by gradient descent; a k-NN head only "
                "stores features. Fine-tune a run of `probe fit --head logreg` or `--head dense`.")

    def curves_(self) -> Curves | None:
        if not self.selection_:
            return None
        ks = sorted({r["k"] for r in self.selection_})
        Ts = sorted({r["T"] for r in self.selection_})
        score, title = (("val_map", "Validation mean average precision") if "val_map" in self.selection_[0]
                        else ("val_accuracy", "Validation accuracy"))
        table = {(r["k"], r["T"]): r[score] for r in self.selection_}
        series = {f"T={T:g}": [table[(k, T)] for k in ks] for T in Ts}
        return Curves(xlabel="k (neighbours)", x=[float(k) for k in ks],
                      panels={title: [(key, key) for key in series]},
                      series=series, chosen=float(self.k_),
                      chosen_label=f"chosen k = {self.k_}, T = {self.temperature_:g}", log_x=True)

    def summary_(self) -> dict[str, Any]:
        return {"k": int(self.k_), "T": float(self.temperature_)}

    # -- persistence ----------------------------------------------------- #
    def _save_arrays(self, directory: Path) -> None:
        arrays = dict(bank=self.bank_, labels=self.bank_labels_)
        atomic_write_bytes(directory / HEAD_NPZ, lambda handle: np.savez(handle, **arrays))

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "k_": self.k_, "T_": self.temperature_,
                "bank_size": int(self.bank_.shape[0]), "selection": self.selection_}

    def _load_arrays(self, directory: Path, meta: dict) -> None:
        n, D, K = meta["bank_size"], int(meta["n_features_in"]), len(meta["classes"])
        k, T = meta["k_"], meta["T_"]
        if not (is_int(n) and n >= 1 and is_int(k) and 1 <= k <= n
                and is_real(T) and math.isfinite(T) and 0.001 <= T <= 100):
            raise ValueError(f"'bank_size', 'k_' or 'T_' out of range: {n!r}, {k!r}, {T!r}")
        label_shape = (n, K) if self.multilabel_ else (n,)
        arrays = read_npz(directory / HEAD_NPZ, {"bank": ((n, D), "f"), "labels": (label_shape, "iu")})
        labels = arrays["labels"].astype(np.int64)
        if self.multilabel_ and not np.isin(labels, (0, 1)).all():
            raise ValueError("multi-label bank labels must be 0 or 1")
        if labels.min() < 0 or labels.max() >= K:
            raise ValueError(f"bank labels must be class indices 0..{K - 1}")
        self.k_, self.temperature_ = int(k), float(T)
        score = "val_map" if self.multilabel_ else "val_accuracy"
        self.selection_ = [{"k": int(r["k"]), "T": float(r["T"]), score: float(r[score]),
                            "val_log_loss": float(r["val_log_loss"])} for r in meta.get("selection", [])]
        self.bank_labels_ = labels
        self.bank_ = arrays["bank"].astype(np.float32)
