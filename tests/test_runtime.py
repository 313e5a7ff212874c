"""The extraction runtime (probe/features/runtime.py): OpenVINO gives TensorFlow's features within
float rounding, keeps its converted model beside the caches and reads it back, replaces a
damaged copy, and is refused in one line where it can not run."""

import os
import time

import numpy as np
import pytest
from click.testing import CliRunner

import probe
from conftest import make_tree
from probe import backbones, device
from probe.features import openvino_graph, runtime
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
    spec = probe.get_backbone(backbone)
    model = spec.build(weights="none", image_size=size, pooling=pooling, seed=0)
    inputs = spec.preprocess_input(
        np.random.default_rng(1).uniform(0, 255, (8, size, size, 3)).astype(np.float32))
    calibrate_batchnorms(model, inputs)
    expected = np.asarray(model.predict_on_batch(inputs))
    compiled = runtime.compile_for_cpu(openvino_graph.build(model))
    written = runtime.OpenVINOBackbone(compiled)
    got = written.predict_on_batch(inputs)
    assert got.shape == expected.shape and written.output_shape == model.output_shape
    assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))


@pytest.mark.parametrize("size", [8, 9])
def test_wide_3x3_convolutions_are_written_as_winograd_ones_with_the_same_output(
        size, monkeypatch):
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
        got = runtime.compile_for_cpu(graph)({0: images})[0]
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
    compiled = runtime.compile_for_cpu(runtime.convert(model, 16))
    expected = np.asarray(model.predict_on_batch(images))
    got = runtime.OpenVINOBackbone(compiled).predict_on_batch(images)
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_auto_takes_openvino_where_installed_for_float32_only(monkeypatch):
    monkeypatch.setattr(device, "_gpus", lambda: False)
    assert device.resolve("auto", "float32") == "openvino"
    assert device.resolve("auto", "bf16") == "tensorflow"
    assert device.resolve("tensorflow", "float32") == "tensorflow"
    monkeypatch.setattr(device, "_gpus", lambda: True)
    assert device.resolve("auto", "float32") == "tensorflow"
    monkeypatch.setattr(device, "_gpus", lambda: False)
    monkeypatch.setenv(device.RUNTIME_ENV, "tensorflow")
    assert device.resolve("auto", "float32") == "tensorflow"
    assert device.resolve("openvino", "float32") == "openvino"  # an explicit choice wins
    monkeypatch.setattr(device, "openvino_installed", lambda: False)
    monkeypatch.delenv(device.RUNTIME_ENV)
    assert device.resolve("auto", "float32") == "tensorflow"


def test_openvino_that_can_not_run_is_refused_in_one_line(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "images", per_class=3)
    installed = device.openvino_installed
    monkeypatch.setattr(device, "openvino_installed", lambda: False)
    result = CliRunner().invoke(main, ["extract", str(root), "--weights", "none",
                                       "--image-size", "32", "--runtime", "openvino", "-q"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "pip install 'probe[openvino]'" in result.output
    assert not (tmp_path / "cache").exists()  # refused before any work
    monkeypatch.setattr(device, "openvino_installed", installed)
    result = CliRunner().invoke(main, ["extract", str(root), "--weights", "none",
                                       "--backbone", "vgg16", "--image-size", "32",
                                       "--runtime", "openvino", "-q"])
    assert result.exit_code == 0, result.output
    assert "9 extracted, 0 reused (backbone on openvino)" in result.output
    monkeypatch.setattr(device, "openvino_capabilities", lambda: ("FP32", "INT8"))
    with pytest.raises(probe.ProbeError, match="list BF16 among its optimization capabilities"):
        device.check_runtime("openvino", "bf16")
    with pytest.raises(probe.ProbeError, match="one of auto, tensorflow, openvino"):
        device.check_runtime("onnx")


@pytest.mark.parametrize("weights_format", ["none", "keras", "legacy"])
def test_the_backbone_written_without_backend_variables_computes_the_keras_model(
        tmp_path, weights_format):
    """The first run's graph comes from a model built for reading (no TensorFlow
    variables): its weights, drawn by the seeded initialisers or read from either weights
    file layout, must be the ones `build` gives, layer by layer."""
    import h5py
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
    written = runtime.OpenVINOBackbone(
        runtime.compile_for_cpu(runtime.convert_backbone(extraction)))
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


# --- the kept converted model is checked before it is used ------------------------------


def vgg16_settings(size: int = 32, runtime_name: str = "openvino"):
    from probe.settings import ExtractionSettings

    return ExtractionSettings.create("vgg16", weights="none", image_size=size,
                                     runtime=runtime_name)


def tensorflow_features(size: int, inputs: np.ndarray) -> np.ndarray:
    keras_model = runtime.load_backbone(vgg16_settings(size, "tensorflow"), None)
    return np.asarray(keras_model.predict_on_batch(inputs))


def some_images(size: int) -> np.ndarray:
    """Preprocessed images other than the conversion's check batch."""
    pixels = np.random.default_rng(7).uniform(0, 255, (3, size, size, 3)).astype(np.float32)
    return probe.get_backbone("vgg16").preprocess_input(pixels)


@pytest.fixture(scope="module")
def saved_vgg16(tmp_path_factory):
    """A cache directory holding the converted vgg16 at 32 px (copied by each test that
    damages it) and that model's features of `some_images`."""
    cache_dir = tmp_path_factory.mktemp("models")
    model = runtime.load_backbone(vgg16_settings(32), cache_dir)
    (folder,) = (cache_dir / runtime.MODELS_DIR).iterdir()
    return folder, model.predict_on_batch(some_images(32))


def copy_model(folder, cache_dir, extraction):
    import shutil

    target = cache_dir / runtime.MODELS_DIR / runtime.model_key(extraction)
    shutil.copytree(folder, target)
    return target


def test_a_kept_model_is_read_back_with_its_manifest(saved_vgg16, tmp_path):
    import hashlib
    import json

    folder, features = saved_vgg16
    manifest = json.loads((folder / runtime.MANIFEST_FILE).read_text())
    assert manifest["input_shape"] == [None, 32, 32, 3] and manifest["key"] == folder.name
    assert sorted(manifest["files"]) == sorted(runtime.MODEL_FILES)
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    extraction = vgg16_settings(32)
    copy_model(folder, tmp_path, extraction)
    notes = []
    again = runtime.load_backbone(extraction, tmp_path, notes.append)
    assert again.runtime == "openvino" and not notes
    np.testing.assert_array_equal(again.predict_on_batch(some_images(32)), features)


def test_a_kept_model_with_edited_bytes_is_converted_again_never_used(saved_vgg16, tmp_path):
    folder, _ = saved_vgg16
    extraction = vgg16_settings(32)
    target = copy_model(folder, tmp_path, extraction)
    weights = target / runtime.WEIGHTS_FILE
    with open(weights, "r+b") as handle:  # 4 KB of weights overwritten: 1.0 is far off He's
        handle.seek(weights.stat().st_size // 2)
        handle.write(np.ones(1024, np.float32).tobytes())
    damaged = weights.read_bytes()
    notes = []
    again = runtime.load_backbone(extraction, tmp_path, notes.append)
    inputs = some_images(32)
    assert again.runtime == "openvino"
    assert_same_features({"x": tensorflow_features(32, inputs)},
                         {"x": again.predict_on_batch(inputs)})
    assert len(notes) == 1 and "Converted the OpenVINO model of vgg16 again" in notes[0]
    assert "model.bin that does not match its checksum" in notes[0]
    assert weights.read_bytes() != damaged  # replaced, and nothing left aside
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [*runtime.MODEL_FILES, runtime.MANIFEST_FILE])
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_a_model_of_another_image_size_in_the_folder_is_converted_again(saved_vgg16, tmp_path):
    folder, _ = saved_vgg16
    extraction = vgg16_settings(40)
    copy_model(folder, tmp_path, extraction)  # the 32 px model under the 40 px key
    notes = []
    again = runtime.load_backbone(extraction, tmp_path, notes.append)
    inputs = some_images(40)
    assert_same_features({"x": tensorflow_features(40, inputs)},
                         {"x": again.predict_on_batch(inputs)})
    assert len(notes) == 1 and "converted for other settings" in notes[0]
    assert runtime.load_backbone(extraction, tmp_path, notes.append).runtime == "openvino"
    assert len(notes) == 1  # the new copy is read back without a word


def tiny_model(size: int):
    """An OpenVINO model of (batch, size, size, 3) inputs, saved in milliseconds."""
    import openvino as ov
    from openvino import opset13 as ops

    parameter = ops.parameter([-1, size, size, 3], np.float32)
    scale = ops.constant(np.arange(1, 4, dtype=np.float32).reshape(1, 1, 1, 3))
    return ov.Model([ops.multiply(parameter, scale)], [parameter])


def edit_bytes(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {  # what is done to a kept model -> what the run says of it
    "model.bin edited": (lambda d: edit_bytes(d / "model.bin"), "model.bin that does not match"),
    "model.xml edited": (lambda d: edit_bytes(d / "model.xml"), "model.xml that does not match"),
    "model.bin missing": (lambda d: (d / "model.bin").unlink(), "does not hold the files"),
    "a file added": (lambda d: (d / "extra.bin").write_bytes(b"0"), "does not hold the files"),
    "manifest missing": (lambda d: (d / "manifest.json").unlink(), "has no manifest"),
    "manifest cut short": (lambda d: (d / "manifest.json").write_text('{"format'),
                           "manifest that can not be read"),
    "manifest of another key": (
        lambda d: (d / "manifest.json").write_text(
            (d / "manifest.json").read_text().replace('"tiny"', '"other"')),
        "converted for other settings"),
}


@pytest.mark.parametrize("damage", [None, *DAMAGES])
def test_a_kept_model_is_read_only_where_its_manifest_vouches_for_it(tmp_path, damage):
    directory = tmp_path / runtime.MODELS_DIR / "tiny"
    identity = runtime._identity("tiny", 4)
    runtime._save(tiny_model(4), directory, identity)
    if damage is not None:
        DAMAGES[damage][0](directory)
    model, problem = runtime._read_saved(directory, identity)
    if damage is None:
        assert model is not None and problem == ""
        return
    assert model is None and DAMAGES[damage][1] in problem
    assert not any(directory.parent.iterdir())  # removed, to be converted again


def test_a_kept_model_whose_graph_takes_another_size_is_not_read(tmp_path):
    """A manifest that vouches for files of another input size (written by hand)."""
    directory = tmp_path / "tiny"
    identity = runtime._identity("tiny", 4)
    runtime._save(tiny_model(5), directory, identity)
    model, problem = runtime._read_saved(directory, identity)
    assert model is None and "takes inputs of shape [None, 5, 5, 3]" in problem
    assert not directory.exists()


def test_a_converted_model_that_disagrees_with_keras_is_not_used_nor_kept(
        tmp_path, monkeypatch):
    root = make_tree(tmp_path / "images", per_class=3)
    settings = dict(weights="none", image_size=32)
    on_tf = probe.extract(root, "vgg16", cache_dir=tmp_path / "tf", runtime="tensorflow",
                          **settings)
    predict = runtime.OpenVINOBackbone.predict_on_batch
    monkeypatch.setattr(runtime.OpenVINOBackbone, "predict_on_batch",
                        lambda self, inputs: predict(self, inputs) * 1.01)  # 1% off
    events = []
    cache, report = probe.extract_with_report(root, "vgg16", cache_dir=tmp_path / "ov",
                                              runtime="openvino", progress=events.append,
                                              **settings)
    assert report.runtime == "tensorflow" and cache.attrs["extract_runtime"] == "tensorflow"
    assert_same_features(on_tf, cache)
    notes = [e.message for e in events if isinstance(e, probe.progress.RuntimeNote)]
    assert len(notes) == 1 and "ran on TensorFlow" in notes[0] and "1.0e-02" in notes[0]
    assert report.notes == notes
    assert not (tmp_path / "ov" / runtime.MODELS_DIR).exists()  # nothing kept


def test_a_converted_model_that_can_not_be_kept_is_used_from_memory(tmp_path, monkeypatch):
    import openvino as ov

    def failing_save(model, path, **options):
        with open(path, "w") as half:  # a half-written file, as a full disk leaves it
            half.write("<net")
        raise RuntimeError("Exception from src/core/src/pass/\nserialize.cpp:1: basic_ios::clear")

    monkeypatch.setattr(ov, "save_model", failing_save)
    root = make_tree(tmp_path / "images", per_class=3)
    cache_dir = tmp_path / "c"
    result = CliRunner().invoke(main, ["extract", str(root), "--weights", "none",
                                       "--backbone", "vgg16", "--image-size", "32",
                                       "--runtime", "openvino", "--cache-dir", str(cache_dir),
                                       "-q"])
    assert result.exit_code == 0, result.output
    assert "(backbone on openvino)" in result.output and "Traceback" not in result.output
    (notice,) = [line for line in result.output.splitlines() if "Could not keep" in line]
    assert "basic_ios::clear): this run used it from memory" in notice
    assert not any((cache_dir / runtime.MODELS_DIR).iterdir())  # no half-written folder


@pytest.mark.parametrize("failure", ["disk full", "no folder"])
def test_a_model_that_can_not_be_written_leaves_nothing_and_says_so(
        tmp_path, monkeypatch, failure):
    import openvino as ov

    directory = tmp_path / runtime.MODELS_DIR / "tiny"
    if failure == "disk full":
        save = ov.save_model

        def full_disk(model, path, **options):
            save(model, path, **options)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ov, "save_model", full_disk)
    else:
        directory.parent.write_text("a file where the folder of models goes")
    notes = []
    runtime._save(tiny_model(4), directory, runtime._identity("tiny", 4), notes.append)
    assert len(notes) == 1 and "Could not keep the converted OpenVINO model" in notes[0]
    assert ("No space left on device" if failure == "disk full" else "exists") in notes[0]
    leftovers = sorted(p.name for p in directory.parent.iterdir()) \
        if directory.parent.is_dir() else []
    assert leftovers == []


def test_every_openvino_compilation_names_its_precision():
    """OpenVINO's CPU plugin computes in bfloat16 by default on CPUs with AMX: every
    compilation goes through `runtime.compile_for_cpu`, which names the precision."""
    import ast
    from pathlib import Path

    call = "compile_model" + "("  # spelled apart so that this file does not match itself
    repository = Path(__file__).resolve().parents[1]
    source = (repository / "probe" / "features" / "runtime.py").read_text()
    (function,) = [node for node in ast.walk(ast.parse(source))
                   if isinstance(node, ast.FunctionDef) and node.name == "compile_for_cpu"]
    allowed = set(range(function.lineno, function.end_lineno + 1))
    found = []
    for path in sorted(repository.rglob("*.py")):
        if any(part.startswith(".") for part in path.relative_to(repository).parts):
            continue  # virtual environments, caches
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if call in line and not (path.name == "runtime.py" and path.parent.name == "features"
                                     and number in allowed):
                found.append(f"{path.relative_to(repository)}:{number}")
    assert not found, f"compile through runtime.compile_for_cpu instead: {found}"
    assert call in "\n".join(source.splitlines()[function.lineno - 1:function.end_lineno])
