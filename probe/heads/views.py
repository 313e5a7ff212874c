"""Training on augmented views one draw at a time: each epoch, every image is seen once,
as its clean features or one of its views drawn at random (the cached equivalent of
augmenting on the fly). Used by the dense head's ``view_sampling="sample"``."""

from __future__ import annotations

import math

import numpy as np

VIEW_SAMPLINGS = ("all", "sample")


def candidates(X: np.ndarray, views: np.ndarray | None) -> np.ndarray:
    """(N, 1 + V, D): each row's clean features followed by its views."""
    if views is None:
        return X[:, None, :]
    return np.concatenate([X[:, None, :], views], axis=1)


def one_view_per_epoch(blocks: list[tuple[np.ndarray, np.ndarray]], batch_size: int,
                       seed: int, class_weight: dict | None = None):
    """A Keras ``PyDataset`` over ``blocks`` of (candidates (n, c, D), labels (n,)): each
    epoch draws one of its c candidates per row (seeded) and shuffles the rows."""
    from probe._keras import keras

    class OneViewPerEpoch(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.labels = np.concatenate([labels for _, labels in blocks])
            self.weights = None if class_weight is None else np.array(
                [class_weight[int(k)] for k in self.labels], dtype=np.float32)
            self.draws = 0
            self._draw()

        def _draw(self) -> None:
            chosen = [block[np.arange(len(block)), self.rng.integers(0, block.shape[1], len(block))]
                      for block, _ in blocks]
            order = self.rng.permutation(len(self.labels))
            self.X = np.concatenate(chosen).astype(np.float32)[order]
            self.y = self.labels[order]
            self.w = None if self.weights is None else self.weights[order]
            self.draws += 1

        def __len__(self) -> int:
            return math.ceil(len(self.y) / batch_size)

        def __getitem__(self, index: int):
            part = slice(index * batch_size, (index + 1) * batch_size)
            if self.w is None:
                return self.X[part], self.y[part]
            return self.X[part], self.y[part], self.w[part]

        def on_epoch_end(self) -> None:
            self._draw()

    return OneViewPerEpoch()
