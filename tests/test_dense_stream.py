"""The dense head on features larger than memory: read from the cache a block of rows at a
time, shuffled across the whole split, with the same results as in memory."""

from __future__ import annotations

import numpy as np
import pytest

import probe
from probe import settings
from probe.heads import DenseHead, FeatureStream, network

FAST = dict(hidden_units=16, epochs=30, patience=5, learning_rate=3e-3, seed=0)


def sorted_clusters(n_per_class=40, n_classes=3, dim=24, seed=0):
    """Gaussian clusters stored one class after another, as a cache stores its rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 2.5
    y = np.repeat(np.arange(n_classes), n_per_class)
    return (centres[y] + rng.normal(size=(y.size, dim))).astype(np.float32), y


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows made of blocks of 4: a toy set becomes many chunks."""
    monkeypatch.setattr(network, "STREAM_CHUNK_BYTES", 16 * 24 * 4)
    monkeypatch.setattr(network, "STREAM_BLOCK_ROWS", 4)


def test_a_shuffled_epoch_sees_every_row_once_in_chunks_that_mix_the_classes(small_chunks):
    X, y = sorted_clusters()
    source = network.Streamed([(FeatureStream.of_array(X), y)], network.STREAM_CHUNK_BYTES,
                              network.STREAM_BLOCK_ROWS)
    chunks = list(source.chunks(np.random.default_rng(0)))
    assert len(chunks) == 120 // 16 + 1 and all(len(c) <= 16 for _, c in chunks)
    seen = np.concatenate([chunk for chunk, _ in chunks])
    assert sorted(map(bytes, seen)) == sorted(map(bytes, X))  # each row once
    labels = np.concatenate([labels for _, labels in chunks])
    np.testing.assert_array_equal(labels, [int(np.flatnonzero((X == row).all(axis=1))[0] // 40)
                                           for row in seen])  # labels travel with their rows
    # blocks from all over the split: most chunks hold more than one class
    assert np.mean([len(set(c.tolist())) > 1 for _, c in chunks]) > 0.5
    # in order (statistics, scores): the rows as stored
    np.testing.assert_array_equal(np.concatenate([c for c, _ in source.chunks(None)]), X)


def test_streamed_moments_equal_the_in_memory_ones(small_chunks):
    X, y = sorted_clusters(seed=1)
    X = X * 10 + 5
    streamed = network.moments(network.Streamed([(FeatureStream.of_array(X), y)], 16 * 24 * 4, 4))
    whole = network.moments(network.InMemory(X, y))
    for a, b in zip(streamed, whole):
        np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("refit", [True, False])
def test_dense_head_on_streams_reaches_the_in_memory_accuracy(small_chunks, refit):
    X, y = sorted_clusters(n_per_class=60, seed=2)
    rng = np.random.default_rng(3)
    order = rng.permutation(y.size)
    test, val, train = order[:60], order[60:90], np.sort(order[90:])  # train stays class-sorted
    in_memory = DenseHead(**FAST, refit=refit).fit(X[train], y[train], X_val=X[val], y_val=y[val])
    streamed = DenseHead(**FAST, refit=refit).fit(
        FeatureStream.of_array(X[train]), y[train],
        X_val=FeatureStream.of_array(X[val]), y_val=y[val])
    assert in_memory.score(X[test], y[test]) > 0.9
    assert streamed.score(X[test], y[test]) >= in_memory.score(X[test], y[test]) - 0.05
    # predictions of a stream, a chunk at a time, are those of the array
    np.testing.assert_allclose(streamed.predict_proba(FeatureStream.of_array(X[test])),
                               streamed.predict_proba(X[test]), rtol=1e-6)


def test_fit_streams_the_dense_head_when_the_features_exceed_memory(separable_cache, monkeypatch,
                                                                     small_chunks):
    monkeypatch.setattr(network, "STREAM_CHUNK_BYTES", 8 * 512 * 4)
    params = dict(hidden_units=16, epochs=40, learning_rate=3e-3)
    in_memory = probe.fit(separable_cache, "dense", html_report=False, **params)
    needed = sum(separable_cache.counts.values()) * 512 * 4
    monkeypatch.setattr(settings, "available_memory", lambda: needed - 1)
    monkeypatch.setattr(type(separable_cache), "split", lambda self, name: pytest.fail("read whole"))
    streamed = probe.fit(separable_cache, "dense", **params)
    assert any("in chunks" in note for note in streamed.notes)
    assert in_memory.metrics["accuracy"] > 0.8
    assert streamed.metrics["accuracy"] >= in_memory.metrics["accuracy"] - 0.1
    # the logistic head needs every feature in memory: refused, naming the heads that stream
    with pytest.raises(probe.ProbeError, match=r"fit in memory.*in chunks \(.*--head dense"):
        probe.fit(separable_cache, "logreg")
