"""Training on augmented views one draw at a time: each epoch, every image is seen once,
as its clean features or one of its views drawn at random (the cached equivalent of
augmenting on the fly). Used by the dense head's ``view_sampling="sample"``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

VIEW_SAMPLINGS = ("all", "sample")


def candidates(X: np.ndarray, views: np.ndarray | None) -> np.ndarray:
    """(N, 1 + V, D): each row's clean features followed by its views."""
    if views is None:
        return X[:, None, :]
    return np.concatenate([X[:, None, :], views], axis=1)


@dataclass
class OneViewPerEpoch:
    """A training source of the dense head's network (`network.BatchSource`) over
    ``blocks`` of (candidates (n, c, D), labels): shuffled, each row is one of its c
    candidates drawn at random (seeded by the training's generator) and the rows are
    shuffled; in order (the standardisation statistics), every candidate of every row."""

    blocks: list[tuple[np.ndarray, np.ndarray]]
    on_draw: Callable[[], None] | None = None

    @property
    def n_rows(self) -> int:
        return sum(len(labels) for _, labels in self.blocks)

    def chunks(self, rng: np.random.Generator | None = None):
        if rng is None:
            for block, labels in self.blocks:
                yield block.reshape(-1, block.shape[2]), np.repeat(labels, block.shape[1], axis=0)
            return
        X = np.concatenate([block[np.arange(len(block)), rng.integers(0, block.shape[1], len(block))]
                            for block, _ in self.blocks])
        y = np.concatenate([labels for _, labels in self.blocks])
        if self.on_draw is not None:
            self.on_draw()
        order = rng.permutation(len(y))
        yield X[order], y[order]
