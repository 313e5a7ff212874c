"""Features read a chunk of rows at a time: what a head whose ``streams_features`` is True
accepts in place of an array, so that it can fit on (and predict) features larger than
memory.

A `FeatureStream` knows its shape and reads its rows in order, in chunks of a size the head
chooses; every chunk is checked (finite float32) as it is read. Other heads receive it
whole (``np.asarray(stream)`` reads every chunk), which is what they need anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np

from probe.errors import DatasetError

Chunks = Iterator[tuple[slice, np.ndarray]]


@dataclass(frozen=True)
class FeatureStream:
    """``shape`` is (N, *per-sample shape); ``read(chunk_rows)`` yields (rows, features of
    those rows) in order. ``flat`` streams give (rows, n_features) chunks."""

    shape: tuple[int, ...]
    read: Callable[[int], Chunks]
    source: str = "features"
    # random access to a range of rows (a head that shuffles reads blocks in random order)
    read_rows: Callable[[slice], np.ndarray] | None = None

    @classmethod
    def of_cache(cls, cache: Any, split: str) -> "FeatureStream":
        """One split of a `FeatureCache`, read with `FeatureCache.iter_features` (in order)
        and `FeatureCache.read_rows` (any range of rows)."""
        return cls((int(cache.counts[split]), *cache.feature_shape),
                   lambda rows: cache.iter_features(split, rows), f"{cache.path}:{split}",
                   lambda rows: cache.read_rows(split, rows))

    @classmethod
    def of_array(cls, X: np.ndarray) -> "FeatureStream":
        """An array read as a stream (the same rows, in chunks)."""
        X = np.asarray(X)

        def read(rows: int) -> Chunks:
            for start in range(0, X.shape[0], rows):
                yield slice(start, min(start + rows, X.shape[0])), X[start: start + rows]

        return cls(tuple(int(s) for s in X.shape), read, "array", lambda rows: X[rows])

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def n_features(self) -> int:
        return math.prod(self.shape[1:])

    def flat(self) -> "FeatureStream":
        """The same rows, each flattened to (n_features,)."""
        return replace(self, shape=(self.shape[0], self.n_features))

    def block(self, rows: slice) -> np.ndarray:
        """Flat float32 features of a range of rows (needs ``read_rows``), checked as
        chunks are."""
        if self.read_rows is None:
            raise DatasetError(f"`{self.source}` can only be read in order, not by ranges of rows")
        return self._checked(rows, self.read_rows(rows))

    def chunks(self, chunk_rows: int) -> Chunks:
        """(rows, flat float32 features of those rows), at most ``chunk_rows`` rows each."""
        for rows, chunk in self.read(max(1, int(chunk_rows))):
            yield rows, self._checked(rows, chunk)

    def _checked(self, rows: slice, chunk: Any) -> np.ndarray:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(rows.stop - rows.start, -1)
        if chunk.shape[1] != self.n_features:
            raise DatasetError(f"expected chunks of {self.n_features} features per row from "
                               f"{self.source}. Received: {chunk.shape[1]}")
        if not np.isfinite(chunk).all():
            raise DatasetError(f"`{self.source}` contains NaN or infinite features in rows "
                               f"{rows.start}..{rows.stop - 1}; the feature cache may be "
                               "corrupt, rebuild it with `probe extract`.")
        return chunk

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.float32)
        flat = out.reshape(self.shape[0], -1)
        for rows, chunk in self.chunks(max(1, (64 << 20) // max(1, 4 * self.n_features))):
            flat[rows] = chunk
        return out if dtype is None else out.astype(dtype, copy=False)
