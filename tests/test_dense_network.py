"""The dense head's NumPy training against Keras' own arithmetic: the gradients of one
batch and the loss, for softmax (single-label) and sigmoid (multi-label) outputs, with and
without class weights."""

import numpy as np
import pytest

from probe.heads import network


class _Recorder:
    """An optimiser that keeps the gradients it is given instead of applying them."""

    def apply(self, net, gradients):
        self.gradients = [(W.copy(), b.copy()) for W, b in gradients]


def _keras_gradients(net, X, y, multilabel, class_weights):
    import tensorflow as tf

    from probe._keras import keras

    model = network.keras_model(net, dropout=0.0)
    target = tf.constant(y, dtype=tf.float32 if multilabel else tf.int64)
    with tf.GradientTape() as tape:
        proba = model(tf.constant(X), training=True)
        if multilabel:
            p = tf.clip_by_value(proba, 1e-7, 1 - 1e-7)
            entry = -(target * tf.math.log(p) + (1 - target) * tf.math.log(1 - p))
            if class_weights is not None:
                entry *= tf.where(target > 0.5, class_weights[1], class_weights[0])
            loss = tf.reduce_mean(tf.reduce_mean(entry, axis=1))
        else:
            per_sample = keras.losses.sparse_categorical_crossentropy(target, proba)
            if class_weights is not None:
                per_sample *= tf.gather(class_weights, target)
            loss = tf.reduce_mean(per_sample)
    dense = [layer for layer in model.layers if layer.name in ("hidden", "predictions")]
    variables = [v for layer in dense for v in (layer.kernel, layer.bias)]
    grads = tape.gradient(loss, variables)
    return float(loss), [(grads[i].numpy(), grads[i + 1].numpy()) for i in range(0, len(grads), 2)]


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("hidden", [0, 8])
@pytest.mark.parametrize("weighted", [False, True])
def test_one_batch_gradients_equal_keras(multilabel, hidden, weighted):
    rng = np.random.default_rng(0)
    n, d, k = 12, 6, 3
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (rng.random((n, k)) < 0.4).astype(np.int64) if multilabel else rng.integers(0, k, n)
    mean, variance = X.mean(axis=0), X.var(axis=0) + 0.5
    sizes = [d, *([hidden] if hidden else []), k]
    net = network.Network.initial(mean, variance, sizes, np.random.default_rng(1), multilabel)
    class_weights = None
    if weighted:
        class_weights = (np.array([[0.5, 1.0, 2.0], [3.0, 1.5, 0.7]], np.float32) if multilabel
                         else np.array([0.5, 1.0, 2.0], np.float32))
    schedule = network.Schedule(batch_size=n, dropout=0.0, learning_rate=0.01, epochs=1,
                                patience=1, class_weights=class_weights)
    recorder = _Recorder()
    buffers = [np.empty_like(W, order="F") for W, _ in net.layers]
    loss_sum, _ = network._train_batch(net, recorder, net.standardise(X), y, schedule,
                                       np.random.default_rng(2), buffers)
    keras_loss, keras_grads = _keras_gradients(net, X, y, multilabel, class_weights)
    assert loss_sum / n == pytest.approx(keras_loss, rel=1e-4)
    for (W, b), (kW, kb) in zip(recorder.gradients, keras_grads):
        np.testing.assert_allclose(W, kW, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(b, kb, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("multilabel", [False, True])
def test_keras_form_gives_the_same_probabilities(multilabel):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(20, 5)).astype(np.float32)
    net = network.Network.initial(X.mean(axis=0), X.var(axis=0), [5, 7, 4],
                                  np.random.default_rng(4), multilabel)
    model = network.keras_model(net, dropout=0.2)
    np.testing.assert_allclose(model.predict(X, verbose=0), net.proba(X), rtol=1e-4, atol=1e-6)
    again = network.from_keras(model)
    assert again.multilabel == multilabel
    np.testing.assert_allclose(again.proba(X), net.proba(X), rtol=1e-6)
    if multilabel:
        assert not np.allclose(net.proba(X).sum(axis=1), 1.0)  # independent sigmoids
