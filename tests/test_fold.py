"""BatchNormalization folding: same outputs, fewer layers, same cache."""

import numpy as np
import pytest

import probe
from probe import backbones
from probe.features import fold
from probe._keras import keras

TOLERANCE = 1e-4  # relative to the largest output, float32


def randomize_batchnorms(model, seed: int = 0) -> None:
    """Non-trivial moving statistics, scales and offsets (random-weight backbones start
    with mean 0, variance 1, gamma 1, beta 0, which a wrong fold could get right)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, n).astype("float32"))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            if layer.center:
                layer.beta.assign(rng.normal(0, 0.3, n).astype("float32"))


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def norms_after_convolutions(model) -> list[str]:
    """Names of the BatchNormalizations that read a convolution."""
    convs = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            for node in layer._inbound_nodes:
                if any(isinstance(t._keras_history[0], convs) for t in node.input_tensors):
                    found.append(layer.name)
    return found


def count_norms(model) -> int:
    return sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


# The first five backbones (a full build and two calls each): the other 35 fold through the
# same layer types, and their extraction is checked against Keras in test_applications.
FIVE = ["vgg16", "resnet50", "densenet121", "xception", "inceptionv3"]


@pytest.mark.parametrize("name", FIVE)
def test_folded_backbone_computes_the_same_features(name):
    spec = backbones.get(name)
    model = spec.build("none", spec.min_size, seed=1)
    randomize_batchnorms(model)
    folded = fold.fold_batchnorm(model)
    inputs = np.random.default_rng(2).uniform(-2, 2, (3, spec.min_size, spec.min_size, 3))
    expected = model.predict_on_batch(inputs.astype("float32"))
    got = folded.predict_on_batch(inputs.astype("float32"))
    assert got.shape == expected.shape
    assert relative_difference(expected, got) <= TOLERANCE
    assert norms_after_convolutions(folded) == []
    if name == "vgg16":
        assert folded is model  # nothing to fold
    else:
        assert count_norms(folded) < count_norms(model)
        assert not folded.trainable
    if name == "densenet121":
        # the pre-activation BatchNormalizations after a concatenation or pooling stay
        assert count_norms(folded) == count_norms(model) - len(norms_after_convolutions(model))
        assert count_norms(folded) > 0


def small_model(conv, shared_output: bool = False, norm=None):
    inputs = keras.Input((8, 8, 4))
    y = conv(inputs)
    z = (norm or keras.layers.BatchNormalization())(y)
    outputs = keras.layers.Add()([z, y]) if shared_output else z
    model = keras.Model(inputs, outputs)
    randomize_batchnorms(model, seed=3)
    return model


@pytest.mark.parametrize("conv", [
    lambda: keras.layers.Conv2D(6, 3, padding="same", use_bias=True),
    lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same"),
    lambda: keras.layers.SeparableConv2D(5, 3, depth_multiplier=3, use_bias=True),
], ids=["conv-bias", "depthwise-multiplier", "separable-bias"])
def test_each_convolution_kind_folds_exactly(conv):
    keras.utils.set_random_seed(4)
    model = small_model(conv(), norm=keras.layers.BatchNormalization(scale=False))
    for variable in model.trainable_variables:  # non-zero biases too
        if "bias" in variable.path:
            variable.assign(np.random.default_rng(5).normal(0, 1, variable.shape))
    folded = fold.fold_batchnorm(model)
    inputs = np.random.default_rng(6).normal(0, 1, (2, 8, 8, 4)).astype("float32")
    assert count_norms(folded) == 0
    assert relative_difference(model.predict_on_batch(inputs),
                               folded.predict_on_batch(inputs)) <= 1e-5


def test_convolution_read_elsewhere_is_not_folded():
    model = small_model(keras.layers.Conv2D(4, 3, padding="same"), shared_output=True)
    assert fold.fold_batchnorm(model) is model


def test_folding_can_be_turned_off(monkeypatch):
    model = small_model(keras.layers.Conv2D(4, 3, padding="same"))
    assert count_norms(fold.for_inference(model)) == 0
    monkeypatch.setenv(fold.FOLD_ENV, "0")
    assert fold.for_inference(model) is model


def test_folded_extraction_fills_the_same_cache(tmp_path, monkeypatch):
    """Folding is not part of the cache's identity: its features are the unfolded ones up
    to float rounding."""
    from conftest import make_tree

    root = make_tree(tmp_path / "images", per_class=3)
    monkeypatch.setenv(fold.FOLD_ENV, "0")
    plain = probe.extract(root, "resnet50", weights="none", image_size=32,
                          cache_dir=tmp_path / "plain")
    monkeypatch.setenv(fold.FOLD_ENV, "1")
    folded = probe.extract(root, "resnet50", weights="none", image_size=32,
                           cache_dir=tmp_path / "folded")
    assert plain.path.name == folded.path.name
    assert plain.attrs["feature_key"] == folded.attrs["feature_key"]
    for split in plain.splits:
        a, b = plain.features(split), folded.features(split)
        assert relative_difference(a, b) <= TOLERANCE
