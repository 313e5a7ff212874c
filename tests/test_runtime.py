"""The extraction runtime (probe/runtime.py): OpenVINO gives TensorFlow's features within
float rounding, keeps its converted model beside the caches and reads it back, replaces a
damaged copy, and is refused in one line where it can not run."""

import os
import time

import numpy as np
import pytest
from click.testing import CliRunner

import probe
from conftest import make_tree
from probe import backbones, openvino_graph, runtime
from probe.cli import main

pytestmark = pytest.mark.openvino
pytest.importorskip("openvino")


def features_by_path(cache) -> dict[str, np.ndarray]:
    rows = {}
    for name in cache.splits:
        part = cache.split(name)
        rows.update(zip(part.paths, part.features))
    return rows


def assert_same_features(a, b) -> None:
    """The same images with features equal within the 1e-4 relative that probe treats as
    the same features (BatchNormalization folding is held to the same); `a` and `b` are
    caches or their `features_by_path`."""
    rows_a, rows_b = (x if isinstance(x, dict) else features_by_path(x) for x in (a, b))
    assert sorted(rows_a) == sorted(rows_b) and rows_a
    stacked_a = np.stack([rows_a[p] for p in sorted(rows_a)])
    stacked_b = np.stack([rows_b[p] for p in sorted(rows_a)])
    assert stacked_a.shape == stacked_b.shape
    assert np.max(np.abs(stacked_a - stacked_b)) <= 1e-4 * np.max(np.abs(stacked_a))


@pytest.mark.slow
@pytest.mark.parametrize("backbone,pooling", [("resnet50", "avg"), ("vgg16", "none")])
def test_openvino_gives_the_tensorflow_features_and_reuses_its_converted_model(
        tmp_path, monkeypatch, backbone, pooling):
    root = make_tree(tmp_path / "images", per_class=4)
    settings = dict(weights="none", image_size=32, pooling=pooling)
    on_tf = probe.extract(root, backbone, cache_dir=tmp_path / "tf", runtime="tensorflow",
                          **settings)
    on_ov = probe.extract(root, backbone, cache_dir=tmp_path / "ov", runtime="openvino",
                          **settings)
    assert on_tf.attrs["extract_runtime"] == "tensorflow"
    assert on_ov.attrs["extract_runtime"] == "openvino"
    assert on_ov.feature_shape == on_tf.feature_shape
    assert_same_features(on_tf, on_ov)
    saved = list((tmp_path / "ov" / runtime.MODELS_DIR).glob(f"{backbone}-*/model.xml"))
    assert len(saved) == 1

    # another dataset in the same cache directory: the saved model is read back, no Keras
    # model is built
    def no_build(*args, **kwargs):
        raise AssertionError("the backbone was built again instead of read back")

    monkeypatch.setattr(backbones.BackboneSpec, "build", no_build)
    other = make_tree(tmp_path / "other", per_class=4)
    again, report = probe.extract_with_report(other, backbone, cache_dir=tmp_path / "ov",
                                              runtime="openvino", **settings)
    assert report.runtime == "openvino" and report.extracted == len(features_by_path(on_ov))
    assert again.attrs["extract_runtime"] == "openvino"
    assert_same_features(on_ov, again)  # the same images under another root


@pytest.mark.slow
def test_a_damaged_converted_model_is_converted_again_and_stale_leftovers_go(tmp_path):
    root = make_tree(tmp_path / "images", per_class=3)
    settings = dict(weights="none", image_size=32, runtime="openvino")
    first = probe.extract(root, "vgg16", cache_dir=tmp_path / "c", **settings)
    (saved,) = (tmp_path / "c" / runtime.MODELS_DIR).glob("vgg16-*/model.xml")
    saved.write_text("<net> cut short")
    # a temporary folder left by a run killed while saving, and one being written now
    stale = saved.parent.with_name(f".{saved.parent.name}-killed")
    fresh = saved.parent.with_name(f".{saved.parent.name}-writing")
    for leftover in (stale, fresh):
        leftover.mkdir()
        (leftover / runtime.MODEL_FILE).write_text("half")
    long_ago = time.time() - 2 * runtime.STALE_SECONDS
    os.utime(stale, (long_ago, long_ago))
    first_rows = features_by_path(first)
    first.path.unlink()  # the next run extracts again and has to load the model
    second = probe.extract(root, "vgg16", cache_dir=tmp_path / "c", **settings)
    assert "cut short" not in saved.read_text()
    assert_same_features(first_rows, second)
    assert not stale.exists() and fresh.exists()


def calibrate_batchnorms(model, images: np.ndarray, seed: int = 0) -> None:
    """Random scales and offsets, and moving statistics measured on `images` (Keras' fresh
    ones are 0/1 and leave random-weight activations vanishingly small), so that every
    layer's output reaches the features: a layer written wrong anywhere changes them."""
    rng = np.random.default_rng(seed)
    norms = [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]
    for layer in norms:
        if layer.scale:
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape).astype(np.float32))
        if layer.center:
            layer.beta.assign(rng.normal(0.0, 0.2, layer.beta.shape).astype(np.float32))
        layer.trainable, layer.momentum = True, 0.0  # moving statistics := this batch's
    model(images, training=True)
    for layer in norms:
        layer.trainable, layer.momentum = False, 0.99
        # A channel nearly constant over these few images would amplify float rounding
        # through the deep random net; kept at the layer's mean variance or more, Keras'
        # own folded model stays within 5e-5 relative of the unfolded one.
        variance = np.asarray(layer.moving_variance)
        layer.moving_variance.assign(np.maximum(variance, variance.mean()))


@pytest.mark.parametrize("backbone,pooling,size", [
    ("resnet50", "none", 64), ("densenet121", "max", 45), ("inceptionv3", "avg", 75),
    ("xception", "none", 73), ("vgg16", "avg", 35)])
def test_the_written_graph_computes_the_keras_model(backbone, pooling, size):
    import openvino as ov

    spec = probe.get_backbone(backbone)
    model = spec.build(weights="none", image_size=size, pooling=pooling, seed=0)
    inputs = spec.preprocess_input(
        np.random.default_rng(1).uniform(0, 255, (8, size, size, 3)).astype(np.float32))
    calibrate_batchnorms(model, inputs)
    expected = np.asarray(model.predict_on_batch(inputs))
    compiled = ov.Core().compile_model(openvino_graph.build(model), "CPU",
                                       runtime.OPENVINO_CONFIG)
    written = runtime.OpenVINOBackbone(compiled)
    got = written.predict_on_batch(inputs)
    assert got.shape == expected.shape and written.output_shape == model.output_shape
    assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))


@pytest.mark.parametrize("size", [8, 9])
def test_wide_3x3_convolutions_are_written_as_winograd_ones_with_the_same_output(
        size, monkeypatch):
    import openvino as ov
    from probe._keras import keras

    inputs = keras.Input((size, size, 128))
    hidden = keras.layers.Conv2D(256, 3, padding="same", activation="relu")(inputs)
    narrow = keras.layers.Conv2D(64, 3, padding="same")(hidden)  # narrower: a plain one
    model = keras.Model(inputs, keras.layers.Conv2D(256, 3, padding="same")(narrow))
    images = np.random.default_rng(3).normal(size=(2, size, size, 128)).astype(np.float32)
    expected = np.asarray(model.predict_on_batch(images))
    for enabled, written in (("1", 1), ("0", 0)):
        monkeypatch.setenv(openvino_graph.WINOGRAD_ENV, enabled)
        graph = openvino_graph.build(model)
        kinds = [op.get_type_name() for op in graph.get_ops()]
        assert kinds.count("DepthToSpace") == written and kinds.count("Convolution") == 3 - written
        got = ov.Core().compile_model(graph, "CPU", runtime.OPENVINO_CONFIG)({0: images})[0]
        assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_a_model_with_a_layer_the_graph_does_not_write_is_converted_by_tracing():
    from probe._keras import keras

    inputs = keras.Input((16, 16, 3))
    hidden = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inputs))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Activation("relu")(hidden))
    model = keras.Model(inputs, keras.layers.Dense(2)(pooled))
    images = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
    calibrate_batchnorms(model, images)
    with pytest.raises(openvino_graph.UnsupportedLayer, match="Dense"):
        openvino_graph.build(model)
    import openvino as ov

    compiled = ov.Core().compile_model(runtime.convert(model, 16), "CPU")
    expected = np.asarray(model.predict_on_batch(images))
    got = runtime.OpenVINOBackbone(compiled).predict_on_batch(images)
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_auto_takes_openvino_where_installed_for_float32_only(monkeypatch):
    monkeypatch.setattr(runtime, "_gpus", lambda: False)
    assert runtime.resolve("auto", "float32") == "openvino"
    assert runtime.resolve("auto", "bf16") == "tensorflow"
    assert runtime.resolve("tensorflow", "float32") == "tensorflow"
    monkeypatch.setattr(runtime, "_gpus", lambda: True)
    assert runtime.resolve("auto", "float32") == "tensorflow"
    monkeypatch.setattr(runtime, "_gpus", lambda: False)
    monkeypatch.setenv(runtime.RUNTIME_ENV, "tensorflow")
    assert runtime.resolve("auto", "float32") == "tensorflow"
    assert runtime.resolve("openvino", "float32") == "openvino"  # an explicit choice wins
    monkeypatch.setattr(runtime, "openvino_installed", lambda: False)
    monkeypatch.delenv(runtime.RUNTIME_ENV)
    assert runtime.resolve("auto", "float32") == "tensorflow"


def test_openvino_that_can_not_run_is_refused_in_one_line(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "images", per_class=3)
    installed = runtime.openvino_installed
    monkeypatch.setattr(runtime, "openvino_installed", lambda: False)
    result = CliRunner().invoke(main, ["extract", str(root), "--weights", "none",
                                       "--image-size", "32", "--runtime", "openvino", "-q"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "pip install 'probe[openvino]'" in result.output
    assert not (tmp_path / "cache").exists()  # refused before any work
    monkeypatch.setattr(runtime, "openvino_installed", installed)
    result = CliRunner().invoke(main, ["extract", str(root), "--weights", "none",
                                       "--backbone", "vgg16", "--image-size", "32",
                                       "--runtime", "openvino", "-q"])
    assert result.exit_code == 0, result.output
    assert "9 extracted, 0 reused (backbone on openvino)" in result.output
    with pytest.raises(probe.ProbeError, match="--precision float32 with --runtime openvino"):
        runtime.check_runtime("openvino", "bf16")
    with pytest.raises(probe.ProbeError, match="one of auto, tensorflow, openvino"):
        runtime.check_runtime("onnx")


@pytest.mark.parametrize("weights_format", ["none", "keras", "legacy"])
def test_the_backbone_written_without_backend_variables_computes_the_keras_model(
        tmp_path, weights_format):
    """The first run's graph comes from a model built for reading (no TensorFlow
    variables): its weights, drawn by the seeded initialisers or read from either weights
    file layout, must be the ones `build` gives, layer by layer."""
    import h5py
    import openvino as ov
    from keras.src.backend.common import global_state
    from keras.src.legacy.saving import legacy_h5_format

    from probe.settings import ExtractionSettings, Weights

    spec, size = probe.get_backbone("resnet50"), 32
    inputs = spec.preprocess_input(
        np.random.default_rng(1).uniform(0, 255, (4, size, size, 3)).astype(np.float32))
    source = "none"
    model = spec.build(weights="none", image_size=size, seed=5)
    if weights_format != "none":
        calibrate_batchnorms(model, inputs)  # weights a wrong mapping would show in
        source = tmp_path / ("w.weights.h5" if weights_format == "keras" else "w.h5")
        if weights_format == "keras":
            model.save_weights(source)
        else:
            with h5py.File(source, "w") as file:  # the layout of Keras' ImageNet files
                legacy_h5_format.save_weights_to_hdf5_group(file, model)
    expected = np.asarray(model.predict_on_batch(inputs))
    extraction = ExtractionSettings("resnet50", Weights.parse(source, seed=5), size)
    written = runtime.OpenVINOBackbone(ov.Core().compile_model(
        runtime.convert_backbone(extraction), "CPU", runtime.OPENVINO_CONFIG))
    got = written.predict_on_batch(inputs)
    assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))
    assert np.max(np.abs(expected)) > 0
    # Keras would otherwise create the read model's variables at the next scope's end
    assert not global_state.get_global_attribute("uninitialized_variables", None)


def test_a_weights_file_that_does_not_fit_fails_the_written_graph_in_one_line(tmp_path):
    from probe.errors import WeightsError
    from probe.settings import ExtractionSettings, Weights

    wrong = tmp_path / "vgg.weights.h5"
    probe.get_backbone("vgg16").build("none", 32).save_weights(wrong)
    extraction = ExtractionSettings("resnet50", Weights.parse(wrong), 32)
    with pytest.raises(WeightsError, match="could not load the weights file"):
        runtime.convert_backbone(extraction)
