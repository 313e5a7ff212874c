import numpy as np
import pytest

import probe
import probe.settings
from probe import backbones
from probe.errors import BackboneError, WeightsError

EXPECTED = {
    "vgg16": ("caffe", 224, 32, 512),
    "resnet50": ("caffe", 224, 32, 2048),
    "densenet121": ("torch", 224, 32, 1024),
    "xception": ("tf", 299, 71, 2048),
    "inceptionv3": ("tf", 299, 75, 2048),
}


def test_registry_lists_every_backbone():
    # the first five among all 40 of keras.applications (test_applications)
    assert set(EXPECTED) <= set(probe.list_backbones()) and len(probe.list_backbones()) == 40


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_spec_values(name):
    spec = backbones.get(name)
    assert (spec.preprocessing, spec.native_size, spec.min_size, spec.feature_size) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preprocess_input_is_the_backbones_own(name):
    import keras

    spec = backbones.get(name)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.float32)
    module = getattr(keras.applications, spec.module)
    expected = module.preprocess_input(pixels.copy())
    # the data on the spec gives exactly Keras' float32 results (same operations, same order)
    np.testing.assert_array_equal(spec.preprocess_input(pixels), expected)
    assert spec.preprocess_input(pixels).dtype == np.float32
    # and it is not the naive /255 scaling
    assert not np.allclose(spec.preprocess_input(pixels), pixels / 255.0)
    # the export's affine form (kernel, bias) is derived from the same data
    kernel, bias = spec.normalization.affine()
    np.testing.assert_allclose(pixels @ kernel + bias, expected, rtol=1e-5, atol=1e-4)


def test_image_size_has_an_upper_bound():
    with pytest.raises(BackboneError, match="at most 1024 pixels"):
        backbones.get("vgg16").check_image_size(100000)
    assert backbones.get("vgg16").check_image_size(1024) == 1024


def test_unknown_backbone_names_the_choices():
    with pytest.raises(BackboneError, match="expected one of: convnext_base.*Received: backbone='alexnet'"):
        backbones.get("alexnet")


def test_image_size_below_minimum_is_refused():
    with pytest.raises(BackboneError, match="at least 71.*Received: image_size=64"):
        backbones.get("xception").check_image_size(64)


def test_pooling_none_keeps_the_spatial_map():
    assert backbones.get("vgg16").feature_shape(64, "none") == (2, 2, 512)
    assert backbones.get("vgg16").feature_shape(64, "avg") == (512,)


def test_random_weights_are_seeded():
    spec = backbones.get("vgg16")
    first = spec.build("none", 32, seed=3).get_weights()[0]
    again = spec.build("none", 32, seed=3).get_weights()[0]
    other = spec.build("none", 32, seed=4).get_weights()[0]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def _global_draws() -> tuple:
    """One draw from each global generator: Python's, NumPy's, Keras' and TensorFlow's."""
    import random

    import keras
    import tensorflow as tf

    return (random.random(), np.random.random(), float(keras.random.uniform(())),
            float(tf.random.uniform(())))


def test_building_a_model_leaves_the_global_random_state_as_it_was():
    import random

    import keras

    spec = backbones.get("vgg16")
    keras.utils.set_random_seed(11)
    expected = _global_draws()
    keras.utils.set_random_seed(11)
    python, numpy = random.getstate(), np.random.get_state()
    spec.build("none", 32, seed=3)
    spec.feature_shape(32, "none")  # seed None
    assert random.getstate() == python
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy))
    assert _global_draws() == expected


def test_seeding_inside_global_random_state_kept_is_undone():
    import keras

    from probe._random_state import global_random_state_kept

    keras.utils.set_random_seed(11)
    expected = _global_draws()
    keras.utils.set_random_seed(11)
    with global_random_state_kept():
        keras.utils.set_random_seed(5)
        _global_draws()
    assert _global_draws() == expected


def test_failed_imagenet_download_names_all_three_options(monkeypatch):
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid: no network")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(WeightsError) as info:
        backbones.get("vgg16").build("imagenet", 32)
    message = str(info.value)
    assert "--weights imagenet" in message and "--weights PATH" in message
    assert "--weights none" in message and "~/.keras/models" in message


def test_weights_file_is_loaded(tmp_path):
    spec = backbones.get("vgg16")
    source = spec.build("none", 32, seed=7)
    path = tmp_path / "vgg16_notop.weights.h5"
    source.save_weights(path)
    loaded = spec.build(str(path), 32, seed=0)
    for a, b in zip(source.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    weights = probe.settings.Weights.parse(str(path))
    assert weights.identity.startswith("file:vgg16_notop.weights.h5:sha256=")
    assert weights.identity.endswith(weights.sha256[:16]) and len(weights.sha256) == 64


def test_missing_or_wrong_weights_file(tmp_path):
    import warnings

    with pytest.raises(WeightsError, match="no such file"):
        backbones.parse_weights(tmp_path / "missing.h5")
    wrong = tmp_path / "resnet.weights.h5"
    backbones.get("resnet50").build("none", 32).save_weights(wrong)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(WeightsError, match="could not load the weights file") as info:
            backbones.get("vgg16").build(str(wrong), 32)
    assert not caught  # Keras' per-layer warnings stay inside
    message = str(info.value).replace(str(wrong), "PATH")  # tmp paths vary in length
    assert len(message) < 500 and "\n" not in message


def test_keras3_weights_file_named_h5_is_loaded(tmp_path):
    spec = backbones.get("vgg16")
    source = spec.build("none", 32, seed=5)
    saved = tmp_path / "vgg.weights.h5"
    source.save_weights(saved)
    renamed = saved.rename(tmp_path / "vgg_notop.h5")
    loaded = spec.build(str(renamed), 32, seed=0)
    np.testing.assert_array_equal(source.get_weights()[0], loaded.get_weights()[0])
