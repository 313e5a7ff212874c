"""The k-NN head against a hand-written reference, its selection, export and files."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import probe
from probe.errors import FinetuneError, RunError
from probe.heads import KNNHead, load_head
from probe.heads.knn import nearest


def reference_proba(bank, bank_labels, queries, k, T, n_classes):
    """DINOv2's weighted k-NN written out with loops: cosine similarity, the k nearest,
    votes exp(similarity / T), normalised."""
    out = []
    for q in queries:
        sims = []
        for x, label in zip(bank, bank_labels):
            cosine = float(np.dot(q, x) / (math.sqrt(np.dot(q, q)) * math.sqrt(np.dot(x, x))))
            sims.append((cosine, label))
        sims.sort(key=lambda pair: -pair[0])
        votes = [0.0] * n_classes
        for cosine, label in sims[:k]:
            votes[label] += math.exp(cosine / T)
        total = sum(votes)
        out.append([v / total for v in votes])
    return np.array(out)


def toy(n=40, dim=6, classes=3, seed=0, sep=1.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * sep
    y = rng.integers(0, classes, n)
    y[:classes] = np.arange(classes)
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


@pytest.mark.parametrize("classes,k,T", [(3, 5, 0.1), (2, 1, 0.07), (4, 7, 1.0)])
def test_knn_equals_the_hand_written_reference(classes, k, T):
    X, y = toy(classes=classes, seed=classes)
    Q, _ = toy(n=15, classes=classes, seed=10 + classes)
    head = KNNHead(k=k, temperature=T).fit(X, y)
    np.testing.assert_allclose(head.predict_proba(Q), reference_proba(X, y, Q, k, T, classes), atol=1e-5)
    assert head.summary_() == {"k": k, "T": T}


def test_blockwise_neighbours_equal_the_full_product(monkeypatch):
    from probe.heads import knn

    rng = np.random.default_rng(1)
    bank, queries = knn.l2_normalise(rng.normal(size=(50, 8))), knn.l2_normalise(rng.normal(size=(23, 8)))
    full = nearest(queries, bank, 4)
    monkeypatch.setattr(knn, "_BLOCK_ELEMENTS", 50 * 3)  # three queries per product
    monkeypatch.setattr(knn, "_TOP_ELEMENTS", 50 * 2)  # the top k of two queries at a time
    blocked = nearest(queries, bank, 4)
    np.testing.assert_allclose(blocked[0], full[0], atol=1e-6)
    np.testing.assert_array_equal(blocked[1], full[1])
    np.testing.assert_allclose(full[0], -np.sort(-(queries @ bank.T), axis=1)[:, :4], atol=1e-6)


def test_k_and_t_are_chosen_on_validation_then_the_bank_grows():
    X, y = toy(n=60, seed=2, sep=0.6)
    Xv, yv = toy(n=30, seed=3, sep=0.6)
    head = KNNHead(ks=(1, 3, 9), temperatures=(0.05, 0.5)).fit(X, y, X_val=Xv, y_val=yv)
    accuracy = {}
    for k in (1, 3, 9):
        for T in (0.05, 0.5):
            accuracy[(k, T)] = np.mean(reference_proba(X, y, Xv, k, T, 3).argmax(axis=1) == yv)
    assert accuracy[(head.k_, head.temperature_)] == max(accuracy.values())
    assert len(head.selection_) == 6
    assert head.bank_.shape[0] == 90  # refit: train + val
    train_only = KNNHead(ks=(1, 3, 9), temperatures=(0.05, 0.5), refit=False).fit(X, y, X_val=Xv, y_val=yv)
    assert train_only.bank_.shape[0] == 60
    assert (train_only.k_, train_only.temperature_) == (head.k_, head.temperature_)
    curves = head.curves_()
    assert curves.chosen == head.k_ and curves.x == [1.0, 3.0, 9.0]


def test_without_validation_dinov2_defaults_clipped_to_the_bank():
    X, y = toy(n=12)
    head = KNNHead().fit(X, y)
    assert (head.k_, head.temperature_) == (12, 0.07)
    assert head.curves_() is None


def test_keras_head_of_built_in_layers_loads_in_safe_mode(tmp_path):
    import keras

    X, y = toy(n=50, dim=10)
    Q, _ = toy(n=9, dim=10, seed=5)
    head = KNNHead(k=4, temperature=0.05).fit(X, y)
    path = tmp_path / "knn.keras"
    head.keras_head().save(path)
    model = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(model.predict(Q, verbose=0)), head.predict_proba(Q), atol=1e-5)


def test_save_load_round_trip_and_tampering(tmp_path):
    X, y = toy(n=30)
    Q, _ = toy(n=5, seed=9)
    head = KNNHead(ks=(1, 5), temperatures=(0.1,)).fit(X[:20], y[:20], X_val=X[20:], y_val=y[20:],
                                                       classes=["a", "b", "c"])
    head.save(tmp_path / "h")
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["head.json", "head.npz"]
    loaded = load_head(tmp_path / "h")
    np.testing.assert_array_equal(loaded.predict_proba(Q), head.predict_proba(Q))
    assert loaded.selection_ == head.selection_ and loaded.summary_() == head.summary_()

    meta = json.loads((tmp_path / "h" / "head.json").read_text())
    for key, value in (("k_", 10**6), ("T_", -1.0), ("T_", "x")):
        (tmp_path / "h" / "head.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(RunError, match="head.json.*probe fit"):
            load_head(tmp_path / "h")
    (tmp_path / "h" / "head.json").write_text(json.dumps(meta))
    np.savez(tmp_path / "h" / "head.npz", bank=head.bank_, labels=head.bank_labels_ + 5)
    with pytest.raises(RunError, match="probe fit"):
        load_head(tmp_path / "h")


def test_fit_knn_run_and_finetune_refuses_it(separable_cache):
    run = probe.fit(head="knn")
    assert run.metrics["accuracy"] >= 0.99
    assert {"k", "T"} <= set(run.metrics) and run.metrics["chosen"]["k"] == run.metrics["k"]
    assert (run.path / "curves.png").stat().st_size > 1000
    with pytest.raises(FinetuneError, match="k-NN head only stores features"):
        probe.finetune(run.path, epochs=1)


def _streams(monkeypatch, rows=7, block=40):
    """Force the streamed paths to work in small pieces: `rows` rows (of 16 features) per
    chunk read, 11 queries per pass over the bank, `block` similarities per product."""
    from probe import settings
    from probe.heads import knn

    monkeypatch.setattr(knn, "_CHUNK_BYTES", 4 * 16 * rows)
    monkeypatch.setattr(settings, "available_memory", lambda: 4 * 4 * 16 * 11)
    monkeypatch.setattr(knn, "_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(knn, "_TOP_ELEMENTS", block // 2)


@pytest.mark.parametrize("refit", [True, False])
def test_streamed_fit_equals_the_in_memory_fit(monkeypatch, tmp_path, refit):
    from probe.heads import FeatureStream

    X, y = toy(n=120, dim=16, seed=4, sep=0.5)
    Xv, yv = toy(n=45, dim=16, seed=5, sep=0.5)
    Q, _ = toy(n=33, dim=16, seed=6, sep=0.5)
    params = dict(ks=(1, 3, 10, 25), temperatures=(0.05, 0.5), refit=refit)
    in_memory = KNNHead(**params).fit(X, y, X_val=Xv, y_val=yv)
    _streams(monkeypatch)
    streamed = KNNHead(**params).fit(FeatureStream.of_array(X), y, X_val=FeatureStream.of_array(Xv), y_val=yv)
    assert isinstance(streamed.bank_, np.memmap) and not isinstance(in_memory.bank_, np.memmap)
    # products of other shapes may round the last bit of a similarity differently
    assert [{**r, "val_log_loss": pytest.approx(r["val_log_loss"], rel=1e-6)} for r in in_memory.selection_] \
        == streamed.selection_
    assert (streamed.k_, streamed.temperature_) == (in_memory.k_, in_memory.temperature_)
    np.testing.assert_array_equal(np.asarray(streamed.bank_), in_memory.bank_)
    expected = in_memory.predict_proba(Q)
    np.testing.assert_allclose(streamed.predict_proba(Q), expected, atol=1e-6)
    np.testing.assert_allclose(streamed.predict_proba(FeatureStream.of_array(Q)), expected, atol=1e-6)
    np.testing.assert_array_equal(streamed.predict(Q), in_memory.predict(Q))

    streamed.save(tmp_path / "h")
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["bank.npy", "head.json", "head.npz"]
    loaded = load_head(tmp_path / "h")
    assert isinstance(loaded.bank_, np.memmap) and loaded.bank_.shape == in_memory.bank_.shape
    np.testing.assert_allclose(loaded.predict_proba(Q), expected, atol=1e-6)


def test_a_damaged_memory_mapped_bank_is_refused(monkeypatch, tmp_path):
    from probe.heads import FeatureStream

    X, y = toy(n=30, dim=16)
    _streams(monkeypatch)
    KNNHead(k=3, temperature=0.1).fit(FeatureStream.of_array(X), y).save(tmp_path / "h")
    bank = np.load(tmp_path / "h" / "bank.npy")
    np.save(tmp_path / "h" / "bank.npy", bank[:-1])
    with pytest.raises(RunError, match="bank.npy.*probe fit"):
        load_head(tmp_path / "h")
    bank[3, 2] = np.nan
    np.save(tmp_path / "h" / "bank.npy", bank)
    with pytest.raises(RunError, match="NaN"):
        load_head(tmp_path / "h")


def test_export_of_a_bank_larger_than_memory_is_refused_in_one_line(monkeypatch):
    from probe import settings

    X, y = toy(n=30, dim=16)
    head = KNNHead(k=3, temperature=0.1).fit(X, y)
    monkeypatch.setattr(settings, "available_memory", lambda: 2 * head.bank_.nbytes - 1)
    with pytest.raises(RunError, match=r"fits in memory.*`probe predict`") as raised:
        head.keras_head()
    assert "\n" not in str(raised.value)


def test_iter_features_reads_a_split_in_chunks(separable_cache):
    from probe.errors import CacheError

    whole = separable_cache.features("train")
    chunks = list(separable_cache.iter_features("train", 5))
    assert [rows.start for rows, _ in chunks] == list(range(0, whole.shape[0], 5))
    assert all(chunk.shape[0] == rows.stop - rows.start <= 5 for rows, chunk in chunks)
    np.testing.assert_array_equal(np.concatenate([chunk for _, chunk in chunks]), whole)
    with pytest.raises(CacheError, match="splits"):
        next(separable_cache.iter_features("nope", 5))


def test_fit_streams_the_knn_head_when_the_features_exceed_memory(separable_cache, monkeypatch):
    from probe import settings

    in_memory = probe.fit(separable_cache, "knn", ks=(1, 3, 5), html_report=False)
    images = sorted(Path(separable_cache.attrs["dataset_root"]).rglob("*.png"))[:6]
    expected = probe.predict(in_memory.path, images)  # the end-to-end Keras model
    needed = sum(separable_cache.counts.values()) * 512 * 4
    _streams(monkeypatch, rows=3)
    monkeypatch.setattr(settings, "available_memory", lambda: needed - 1)
    monkeypatch.setattr(type(separable_cache), "split", lambda self, name: pytest.fail("read whole"))
    streamed = probe.fit(separable_cache, "knn", ks=(1, 3, 5))
    assert any("in chunks" in note for note in streamed.notes)
    assert (streamed.path / "head" / "bank.npy").is_file()
    assert streamed.metrics["chosen"] == in_memory.metrics["chosen"]
    assert streamed.metrics["accuracy"] == in_memory.metrics["accuracy"]
    rows = [(run.path / "test_predictions.csv").read_text().splitlines() for run in (streamed, in_memory)]
    assert [line.split(",")[:3] for line in rows[0]] == [line.split(",")[:3] for line in rows[1]]
    assert len(rows[0]) == 1 + separable_cache.counts["test"]
    assert [r["val_accuracy"] for r in streamed.load_head().selection_] == \
        [r["val_accuracy"] for r in in_memory.load_head().selection_]
    with pytest.raises(probe.ProbeError, match="fit in memory"):
        probe.fit(separable_cache, "logreg")

    # predict: the backbone in Keras, then the memory-mapped bank a chunk at a time
    from probe import inference

    monkeypatch.setattr(settings, "available_memory", lambda: 1000)
    with pytest.raises(probe.ProbeError, match="`probe predict`"):
        probe.export(streamed.path, streamed.path.parent / "knn.keras")
    monkeypatch.setattr(inference, "end_to_end", lambda *a, **k: pytest.fail("Keras head built"))
    got = probe.predict(streamed.path, images)
    assert [p.predicted for p in got] == [p.predicted for p in expected]
    for a, b in zip(got, expected):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
