"""The k-NN head: DINOv2's weighted k-nearest-neighbour classifier on L2-normalised features.

A query's k most similar bank features (cosine similarity) vote for their classes with
weight ``exp(similarity / T)``; the votes, normalised to sum to one, are the probabilities.
k and T are chosen on validation; the bank is then train + val (``refit=True``) or train
only. Similarities are float32 matrix products computed a block of queries at a time, so
memory stays bounded whatever the number of queries. Fit on `FeatureStream`s (features
larger than memory), the bank is memory-mapped on a temporary file and read a part at a
time, each part's top k merged into the running top k; it is saved as ``bank.npy``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from probe import settings
from probe.errors import ProbeError, RunError

from .estimator import Head
from .options import head_options
from .base import HEAD_NPZ, Curves, FitData, atomic_write_bytes, check_params, corrupt, \
    is_int, is_real, read_npz
from .stream import FeatureStream

DEFAULT_KS = (1, 3, 5, 10, 20, 50)
DEFAULT_TEMPERATURES = (0.02, 0.07, 0.2)
UNVALIDATED = (20, 0.07)  # DINOv2's k and T, used when there is no validation data
BANK_NPY = "bank.npy"  # the bank of a head fit on streamed features, memory-mapped to predict
_BLOCK_ELEMENTS = 1 << 24  # similarities of one product (64 MB of float32): few, large products
_TOP_ELEMENTS = 1 << 20  # similarities whose top k is taken at once (bounds argpartition's indices)
_CHUNK_BYTES = 64 << 20  # features read (from a stream or a memory-mapped bank) at a time
_NORM_FLOOR = 1e-12  # squared norm floor, as keras.layers.UnitNormalization


def l2_normalise(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a new float32 array); all-zero rows stay zero."""
    return normalise_in_place(np.array(X, dtype=np.float32))


def normalise_in_place(X: np.ndarray) -> np.ndarray:
    """Scale the rows of a float32 array to unit length in place (no copy); returns it."""
    norms = np.einsum("ij,ij->i", X, X)
    np.sqrt(np.maximum(norms, _NORM_FLOOR, out=norms), out=norms)
    X /= norms[:, None]
    return X


def chunk_rows(n_features: int) -> int:
    """Rows of features read at a time from a stream or a memory-mapped bank."""
    return max(1, _CHUNK_BYTES // (4 * max(1, n_features)))


def query_rows(n_features: int) -> int:
    """Queries scored per pass over a memory-mapped bank: as many as a quarter of the
    memory available holds (each pass reads the whole bank), at least one chunk."""
    available = settings.available_memory() or 0
    return max(chunk_rows(n_features), available // 4 // (4 * max(1, n_features)))


def _top(S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest values of each row of S (in no order) and their columns."""
    n = S.shape[1]
    if k < n:
        columns = np.argpartition(S, n - k, axis=1)[:, n - k:]
    else:
        columns = np.broadcast_to(np.arange(n), S.shape)
    return np.take_along_axis(S, columns, axis=1), columns


def nearest(queries: np.ndarray, bank: np.ndarray, k: int,
            bank_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k largest cosine similarities of each (normalised) query to the bank, in
    decreasing order (ties: lower bank index first), and their bank indices.

    One pass over the bank, ``bank_rows`` rows at a time (all at once when None; a
    memory-mapped bank is read once): one float32 product of each part with a block of
    queries, whose top k per row (taken a few rows at a time, so that the indices
    `argpartition` returns stay small) is merged into the running top k."""
    n = bank.shape[0]
    k = min(int(k), n)
    bank_rows = n if bank_rows is None else max(1, int(bank_rows))
    sims = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
    index = np.zeros((queries.shape[0], k), dtype=np.int64)
    for offset in range(0, n, bank_rows):
        part = np.asarray(bank[offset: offset + bank_rows])
        block = max(1, _BLOCK_ELEMENTS // part.shape[0])
        step = max(1, _TOP_ELEMENTS // part.shape[0])
        for start in range(0, queries.shape[0], block):
            S = queries[start: start + block] @ part.T
            for first in range(0, S.shape[0], step):
                part_sims = S[first: first + step]
                rows = slice(start + first, start + first + part_sims.shape[0])
                _merge_top(sims[rows], index[rows], part_sims, offset)
    order = np.lexsort((index, -sims), axis=1)
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(index, order, axis=1)


def _merge_top(sims: np.ndarray, index: np.ndarray, S: np.ndarray, offset: int) -> None:
    """Replace the running top k (sims, index: views, updated in place) of some queries by
    the top k of them and of S, their similarities to bank rows offset, offset + 1, ..."""
    k = sims.shape[1]
    values, columns = _top(S, min(k, S.shape[1]))
    if offset or values.shape[1] < k:  # merge with the top k of the parts before
        values = np.concatenate([sims, values], axis=1)
        columns = np.concatenate([index, columns + offset], axis=1)
        values, kept = _top(values, k)
        columns = np.take_along_axis(columns, kept, axis=1)
    sims[...], index[...] = values, columns


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
def _chunks(X: np.ndarray | FeatureStream, rows: int) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, flat float32 features) of an array or a stream, ``rows`` at a time."""
    if isinstance(X, FeatureStream):
        yield from X.chunks(rows)
        return
    for start in range(0, X.shape[0], rows):
        yield slice(start, min(start + rows, X.shape[0])), X[start: start + rows]


def _bank_storage(n: int, n_features: int, in_memory: bool) -> np.ndarray:
    """Room for n normalised rows: in memory, or a float32 array memory-mapped on an
    anonymous temporary file (TMPDIR; gone when the head is) whose space is reserved first,
    so that a full disk is an error now rather than a crash on a later write."""
    if in_memory:
        return np.empty((n, n_features), dtype=np.float32)
    size = n * n_features * 4
    try:
        with tempfile.TemporaryFile(prefix="probe-knn-bank-") as handle:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle.fileno(), 0, size)
            return np.memmap(handle, dtype=np.float32, mode="w+", shape=(n, n_features))
    except OSError as error:
        raise ProbeError(
            f"the k-NN bank of features larger than memory is kept on disk while it is fit: "
            f"it needs {size / 2**30:.1f} GiB in the temporary directory "
            f"'{tempfile.gettempdir()}' ({error.strerror or error}). Free space there or point "
            "TMPDIR to a disk with room.") from None


def _fill(bank: np.ndarray, offset: int, X: np.ndarray | FeatureStream) -> None:
    """Copy the rows of X into bank[offset:] and normalise them there, a chunk at a time."""
    for rows, chunk in _chunks(X, chunk_rows(bank.shape[1])):
        target = bank[offset + rows.start: offset + rows.stop]
        if chunk.dtype == np.float32:  # divided straight into the bank: one pass less
            norms = np.einsum("ij,ij->i", chunk, chunk)
            np.sqrt(np.maximum(norms, _NORM_FLOOR, out=norms), out=norms)
            np.divide(chunk, norms[:, None], out=target)
        else:
            target[...] = chunk
            normalise_in_place(target)


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
    (normalised float32 features; an ``np.memmap`` when fit on streams or loaded from
    ``bank.npy``),
    ``bank_labels_``, ``k_``, ``temperature_``,
    ``selection_`` (list of ``{"k", "T", "val_accuracy", "val_log_loss"}``).

    scikit-learn's estimator checks (``tests/test_sklearn_checks.py``) pass but for
    ``check_methods_subset_invariance``: similarities are float32 products (half the memory
    and time of float64 on large banks) whose rounding depends on how many queries share a
    product, so the probabilities of a batch and of its rows one at a time differ by about
    1e-7 relative, above the check's 1e-7 absolute. The predictions agree.
    """

    name = "knn"
    options = head_options("knn")
    _fitted_attr = "bank_"
    streams_features = True  # a FeatureStream goes to a memory-mapped bank (features > memory)

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

    def _select(self, bank: np.ndarray, labels: np.ndarray, queries: np.ndarray,
                data: FitData) -> tuple[list[dict], dict[tuple[int, float], np.ndarray]]:
        """Score every (k, T) on validation with the train bank: one pass over the bank
        for the top max(k), then every vote from that same list; the records and each
        (k, T)'s val probabilities."""
        ks, Ts = self._grid(bank.shape[0])
        sims, index = self._neighbours(queries, bank, max(ks))
        neighbour_labels = labels[index]
        rows = np.arange(data.y_val.size)
        records, probabilities = [], {}
        for k in ks:
            for T in Ts:
                proba = probabilities[int(k), float(T)] = vote(sims, neighbour_labels, k, T, data.n_classes)
                true = np.clip(proba[rows, data.y_val], 1e-15, 1.0)
                records.append({"k": int(k), "T": float(T),
                                "val_accuracy": float(np.mean(proba.argmax(axis=1) == data.y_val)),
                                "val_log_loss": float(-np.mean(np.log(true)))})
        return records, probabilities

    @staticmethod
    def _neighbours(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`nearest`, reading a memory-mapped bank (and queries) a chunk at a time."""
        if not isinstance(bank, np.memmap):
            return nearest(queries, bank, k)
        rows, group = chunk_rows(bank.shape[1]), query_rows(bank.shape[1])
        parts = [nearest(np.asarray(queries[start: start + group]), bank, k, bank_rows=rows)
                 for start in range(0, queries.shape[0], group)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _fit(self, data: FitData) -> np.ndarray | None:
        """The bank is allocated once (train, then val when it joins) and normalised in
        place; the val rows of the bank are the selection's queries, so nothing is copied
        or computed twice. Streamed features go to a memory-mapped bank. Returns the val
        probabilities of the train bank at the chosen (k, T) (None without val)."""
        n, n_features = data.X.shape
        streamed = isinstance(data.X, FeatureStream)
        with_val = data.X_val is not None
        joins = with_val and self.refit
        bank = _bank_storage(n + (data.X_val.shape[0] if joins else 0), n_features, not streamed)
        _fill(bank, 0, data.X)
        labels, selection, val_proba = data.y, [], None
        if with_val:
            if joins:
                _fill(bank, n, data.X_val)
                queries = bank[n:]
            else:
                queries = _bank_storage(data.X_val.shape[0], n_features,
                                        not isinstance(data.X_val, FeatureStream))
                _fill(queries, 0, data.X_val)
            selection, probabilities = self._select(bank[:n], labels, queries, data)
            best = min(selection, key=lambda r: (-r["val_accuracy"], r["val_log_loss"], r["k"], r["T"]))
            k, T = best["k"], best["T"]
            val_proba = probabilities[k, T]
            if joins:
                labels = np.concatenate([labels, data.y_val])
        else:
            k, T = self._unvalidated()
        self._keep(bank, labels, k, T, selection)
        return val_proba

    def _predict_flat(self, X: np.ndarray | FeatureStream) -> np.ndarray:
        if not isinstance(X, FeatureStream) and not isinstance(self.bank_, np.memmap):
            return self._proba(l2_normalise(X))
        proba = np.empty((X.shape[0], len(self.classes_)))
        for rows, chunk in _chunks(X, query_rows(self.n_features_in_)):
            proba[rows] = self._proba(l2_normalise(chunk))
        return proba

    def _proba(self, queries: np.ndarray) -> np.ndarray:
        sims, index = self._neighbours(queries, self.bank_, self.k_)
        if getattr(self, "multilabel_", False):
            return vote_multilabel(sims, self.bank_labels_[index], self.k_, self.temperature_)
        return vote(sims, self.bank_labels_[index], self.k_, self.temperature_, len(self.classes_))

    def keras_head(self):
        """Built-in layers only: UnitNormalization, the bank as a bias-free Dense layer's
        kernel (similarities), top-k, exp((s - max) / T) weights, and the neighbours' one-hot
        labels as an Embedding table summed under those weights."""
        from probe._keras import keras

        self._check_fitted("keras_head")
        self._check_bank_fits_in_memory()
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
            k, T = self._unvalidated()
        self._keep(bank, targets, k, T, selection)
        return val_proba

    def _unvalidated(self) -> tuple[int, float]:
        """k and T without validation data: the ones given, else DINOv2's."""
        return (self.k if self.k is not None else UNVALIDATED[0],
                self.temperature if self.temperature is not None else UNVALIDATED[1])

    def _keep(self, bank: np.ndarray, labels: np.ndarray, k: int, T: float,
              selection: list[dict]) -> None:
        """The fitted state: the bank, its labels, the chosen k (at most the bank's size)
        and T, and the selection table."""
        self.k_, self.temperature_ = int(min(k, bank.shape[0])), float(T)
        self.selection_ = selection
        self.bank_labels_ = labels.astype(np.int64)
        self.bank_ = bank

    def keras_head_fits_in_memory(self) -> bool:
        """A Keras model holds its weights in memory (and TensorFlow a second copy while it
        builds them): the bank must fit twice in the memory available."""
        self._check_fitted("keras_head_fits_in_memory")
        available = settings.available_memory()
        return available is None or 2 * self.bank_.nbytes <= available

    def _check_bank_fits_in_memory(self) -> None:
        """Refuse, in one line, a Keras form whose bank does not fit in memory."""
        if not self.keras_head_fits_in_memory():
            needed, available = self.bank_.nbytes, settings.available_memory()
            raise RunError(
                f"expected a k-NN bank that fits in memory to export it as a Keras model; this "
                f"bank is {needed / 2**30:.1f} GiB ({self.bank_.shape[0]} x {self.bank_.shape[1]} "
                f"float32) and a model holds it twice, with {available / 2**30:.1f} GiB "
                "available. Use `probe predict` with the run instead: it reads the bank from "
                "disk a chunk at a time.")

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
        """A bank in memory goes into head.npz; a memory-mapped one (fit on streamed
        features) into bank.npy, written a chunk at a time and memory-mapped when loaded."""
        if not isinstance(self.bank_, np.memmap):
            arrays = dict(bank=self.bank_, labels=self.bank_labels_)
            atomic_write_bytes(directory / HEAD_NPZ, lambda handle: np.savez(handle, **arrays))
            return
        atomic_write_bytes(directory / BANK_NPY, self._write_bank)
        atomic_write_bytes(directory / HEAD_NPZ, lambda handle: np.savez(handle, labels=self.bank_labels_))

    def _write_bank(self, handle) -> None:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False,
                                                      "shape": self.bank_.shape})
        for start in range(0, self.bank_.shape[0], chunk_rows(self.bank_.shape[1])):
            handle.write(np.ascontiguousarray(self.bank_[start: start + chunk_rows(self.bank_.shape[1])],
                                              dtype="<f4").tobytes())

    def _meta(self) -> dict[str, Any]:
        bank_file = {"bank_file": BANK_NPY} if isinstance(self.bank_, np.memmap) else {}
        return {**super()._meta(), "k_": self.k_, "T_": self.temperature_,
                "bank_size": int(self.bank_.shape[0]), **bank_file, "selection": self.selection_}

    def _load_arrays(self, directory: Path, meta: dict) -> None:
        n, D, K = meta["bank_size"], int(meta["n_features_in"]), len(meta["classes"])
        k, T = meta["k_"], meta["T_"]
        if not (is_int(n) and n >= 1 and is_int(k) and 1 <= k <= n
                and is_real(T) and math.isfinite(T) and 0.001 <= T <= 100):
            raise ValueError(f"'bank_size', 'k_' or 'T_' out of range: {n!r}, {k!r}, {T!r}")
        if meta.get("bank_file", None) not in (None, BANK_NPY):
            raise ValueError(f"'bank_file' must be {BANK_NPY!r}")
        mapped = meta.get("bank_file") == BANK_NPY
        label_shape = (n, K) if self.multilabel_ else (n,)
        expected = ({"labels": (label_shape, "iu")} if mapped
                    else {"bank": ((n, D), "f"), "labels": (label_shape, "iu")})
        arrays = read_npz(directory / HEAD_NPZ, expected)
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
        self.bank_ = _mapped_bank(directory / BANK_NPY, (n, D)) if mapped else arrays["bank"].astype(np.float32)


def _mapped_bank(path: Path, shape: tuple[int, int]) -> np.memmap:
    """bank.npy memory-mapped read-only, checked (shape, float32, finite, a chunk at a
    time) like every saved array."""
    try:
        bank = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise corrupt(path, f"{type(error).__name__}: {error}") from None
    if not isinstance(bank, np.memmap) or bank.shape != shape or bank.dtype != np.dtype("<f4"):
        raise corrupt(path, f"expected a float32 array of shape {shape}")
    for start in range(0, shape[0], chunk_rows(shape[1])):
        if not np.isfinite(bank[start: start + chunk_rows(shape[1])]).all():
            raise corrupt(path, "the bank holds NaN or infinite values")
    return bank
