"""The registry holds all of keras.applications: every model's preprocessing is its module's
own `preprocess_input` (all 40, cheap); feature size, minimum size and fine-tuning blocks
are checked on one small model per family (built without backend variables); one small
model per family extracts the plain Keras model's features."""

import numpy as np
import pytest

import probe
from probe import backbones, data
from probe.backbones import _keras, _stateless_scope

from conftest import make_image

# One small model per keras.applications module that the first five backbones (tested in
# test_backbones, test_finetune, test_fold) do not cover.
FAMILIES = ["vgg19", "resnet50v2", "inceptionresnetv2", "mobilenet", "mobilenetv2",
            "mobilenetv3small", "nasnetmobile", "efficientnetb0", "efficientnetv2b0",
            "convnext_tiny"]
# Their extraction is checked against the plain Keras model (a full build and a first call
# each, 5 to 16 s on two cores): MobileNet preprocesses the input ("tf"), MobileNetV3 and
# EfficientNet in the model (Rescaling, Normalization layers).
EXTRACTED = ["mobilenet", "mobilenetv3small", "efficientnetb0"]


def test_the_registry_is_keras_applications():
    keras = _keras()
    constructors = {name for name in dir(keras.applications) if name[0].isupper()}
    registered = [backbones.get(name) for name in probe.list_backbones()]
    assert len(constructors) == len(registered) == 40
    assert {spec.constructor for spec in registered} == constructors
    for spec in registered:
        assert spec.name == spec.constructor.lower().replace("convnext", "convnext_")
        assert spec.native_size >= spec.min_size and len(spec.top_blocks) == len(set(spec.top_blocks))


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_preprocessing_is_the_modules_own(name):
    keras = _keras()
    spec = backbones.get(name)
    module = getattr(keras.applications, spec.module)
    # the preprocess_input defined beside the constructor
    constructor = getattr(keras.applications, spec.constructor)
    assert module.preprocess_input.__module__ == constructor.__module__
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    expected = np.asarray(module.preprocess_input(pixels.copy()))
    np.testing.assert_array_equal(spec.preprocess_input(pixels), expected)
    kernel, bias = spec.normalization.affine()  # the export's 1x1 convolution
    np.testing.assert_allclose(pixels @ kernel + bias, expected, rtol=1e-5, atol=1e-4)
    # "none": the model preprocesses the pixels itself, Keras' function passes them through
    assert (spec.preprocessing == "none") == np.array_equal(expected, pixels)
    assert spec.preprocessed_in == ("model" if spec.preprocessing == "none" else "input")


def _marked(spec, layer) -> int | None:
    return spec._block_of(layer.name)


@pytest.mark.parametrize("name", FAMILIES)
def test_size_features_and_blocks_per_family(name):
    """Built at its minimum size without backend variables: the feature size is the last
    map's channels, one pixel less is refused by Keras, and `block_layers` cuts the model
    into the registry's blocks, each holding every layer its marker names."""
    keras = _keras()
    spec = backbones.get(name)
    constructor = getattr(keras.applications, spec.constructor)
    with _stateless_scope(keras):
        with pytest.raises(ValueError, match=str(spec.min_size)):
            constructor(weights=None, include_top=False,
                        input_shape=(spec.min_size - 1, spec.min_size - 1, 3))
        model = spec.build("none", spec.min_size, pooling="none", seed=None)
        assert model.output_shape[-1] == spec.feature_size
        blocks = spec.block_layers(model)
    assert len(blocks) == len(spec.top_blocks)
    in_blocks = {id(layer): index for index, block in enumerate(blocks) for layer in block}
    assert len(in_blocks) == sum(len(block) for block in blocks)
    for index, block in enumerate(blocks):
        assert any(layer.weights for layer in block), spec.top_blocks[index]
    for layer in model.layers[1:]:  # after the input layer
        marked = _marked(spec, layer)
        if marked is not None:
            assert in_blocks.get(id(layer)) == marked, layer.name
    # outside every block: the stem (and the input), below the first block
    first = model.layers.index(blocks[0][0])
    assert all(model.layers.index(layer) < first
               for layer in model.layers if id(layer) not in in_blocks)
    assert spec.unfreeze(model, 1) == [spec.top_blocks[-1]]


@pytest.mark.parametrize("name", EXTRACTED)
def test_extraction_per_family_equals_plain_keras(name, tmp_path):
    keras = _keras()
    root = tmp_path / "ds"
    for c, cls in enumerate(["a", "b"]):
        for i in range(2):
            make_image(root / "train" / cls / f"{i}.png", seed=10 * c + i, size=(30 + i, 20))
    spec = backbones.get(name)
    size = spec.min_size
    cache = probe.extract(root, name, weights="none", image_size=size, batch_size=4,
                          val_fraction=0)
    train = cache.split("train")
    assert cache.attrs["preprocessing"] == spec.preprocessing
    keras.utils.set_random_seed(0)  # what --weights none --seed 0 means
    model = getattr(keras.applications, spec.constructor)(
        weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")
    pixels = np.stack([data.load_image(root / p, size) for p in train.paths]).astype("float32")
    module = getattr(keras.applications, spec.module)
    expected = model.predict_on_batch(module.preprocess_input(pixels))
    assert train.features.shape == (4, spec.feature_size)
    # relative to the largest feature: random-weight features can be far below 1e-4
    assert np.max(np.abs(expected)) > 0
    assert np.max(np.abs(train.features - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_backbones_table_says_where_the_pixels_are_preprocessed():
    from click.testing import CliRunner

    from probe.cli import main

    result = CliRunner().invoke(main, ["backbones"])
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:] if line.strip()}
    assert len(rows) >= 40
    assert rows["efficientnetb0"][1:] == ["224", "32", "1280", "none", "in", "model", "7"]
    assert rows["vgg19"][1:] == ["224", "32", "512", "caffe", "input", "5"]
