"""KerasHub presets as backbones: a tiny random DINOv2 saved as a preset directory."""

import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import probe
from conftest import assert_relative_close, make_separable_tree, small_tree
from probe import data
from probe.cli import main
from probe.errors import BackboneError, WeightsError

pytest.importorskip("keras_hub")

SIZE = 28  # 2x2 patches of 14 pixels
REGISTERS = 1  # tokens: [class, register, 4 patches]


def save_preset(directory, seed=0):
    """A 2-block DINOv2 (hidden 16, 2 heads) with random weights and its image converter
    (ImageNet mean/std), saved as a KerasHub preset directory."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.DINOV2Backbone(
        patch_size=14, num_layers=2, hidden_dim=16, num_heads=2, intermediate_dim=32,
        layer_scale_init_value=1.0, num_register_tokens=REGISTERS,
        image_shape=(SIZE, SIZE, 3), position_embedding_shape=(SIZE, SIZE, 3))
    std = np.array([0.229, 0.224, 0.225])
    converter = keras_hub.layers.DINOV2ImageConverter(
        image_size=(SIZE, SIZE), scale=list(1 / (255 * std)),
        offset=list(-np.array([0.485, 0.456, 0.406]) / std))
    backbone.save_to_preset(str(directory))
    converter.save_to_preset(str(directory))
    return backbone, converter


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hub") / "tiny_dinov2"
    backbone, converter = save_preset(directory)
    return directory, backbone, converter


def relative_close(got, expected, tolerance=1e-4):
    assert_relative_close(got, expected, tolerance)


def tokens_of(root, cache, backbone, converter):
    """The backbone's own output on the converter's output of the cache's images."""
    pixels = np.stack([data.load_image(root / p, SIZE) for p in cache.split("train").paths])
    return np.asarray(backbone({"images": converter(pixels.astype("float32"))}))


def test_token_poolings_are_the_backbones_own_tokens(tmp_path, preset):
    directory, backbone, converter = preset
    root = small_tree(tmp_path / "ds")
    caches = {pooling: probe.extract(root, directory, pooling=pooling, val_fraction=0)
              for pooling in ("cls", "mean", "cls+mean", "avg")}
    tokens = tokens_of(root, caches["cls"], backbone, converter)
    assert tokens.shape[1:] == (1 + REGISTERS + 4, 16)
    cls, mean = tokens[:, 0], tokens[:, 1 + REGISTERS:].mean(axis=1)  # registers left out
    relative_close(caches["cls"].split("train").features, cls)
    relative_close(caches["mean"].split("train").features, mean)
    relative_close(caches["cls+mean"].split("train").features, np.concatenate([cls, mean], 1))
    assert caches["cls+mean"].feature_shape == (32,) and caches["cls"].attrs["image_size"] == SIZE
    assert caches["avg"].path == caches["mean"].path  # avg on tokens is mean


def test_blocks_concatenate_the_last_blocks_normalised(tmp_path, preset):
    import keras

    directory, backbone, converter = preset
    root = small_tree(tmp_path / "ds")
    cache = probe.extract(root, directory, pooling="cls", blocks=2, val_fraction=0)
    assert cache.feature_shape == (32,) and cache.attrs["blocks"] == 2
    norm = backbone.layers[-1]
    blocks = keras.Model(backbone.inputs, [norm(backbone.pyramid_outputs[f"stage{i}"])
                                           for i in (1, 2)])
    pixels = np.stack([data.load_image(root / p, SIZE) for p in cache.split("train").paths])
    first, last = (np.asarray(t) for t in blocks(converter(pixels.astype("float32"))))
    relative_close(cache.split("train").features, np.concatenate([first[:, 0], last[:, 0]], 1))
    relative_close(last, tokens_of(root, cache, backbone, converter))  # the last is the output


def test_moved_preset_reuses_the_cache_and_a_changed_weight_extracts_again(tmp_path):
    backbone, _ = save_preset(tmp_path / "a")
    root = small_tree(tmp_path / "ds")
    first, _ = probe.extract_with_report(root, tmp_path / "a", pooling="cls", val_fraction=0)
    shutil.move(tmp_path / "a", tmp_path / "b")
    again, report = probe.extract_with_report(root, tmp_path / "b", pooling="cls", val_fraction=0)
    assert report.status == "up to date" and again.path == first.path
    layer = backbone.layers[-1]
    layer.set_weights([w + 1 for w in layer.get_weights()])
    backbone.save_to_preset(str(tmp_path / "b"))
    changed, report = probe.extract_with_report(root, tmp_path / "b", pooling="cls",
                                                val_fraction=0)
    assert report.extracted == 6 and changed.path != first.path


def test_refusals_are_one_line(tmp_path, preset, monkeypatch):
    directory = preset[0]
    root = small_tree(tmp_path / "ds")
    (tmp_path / "empty").mkdir()
    cases = [
        (dict(backbone=directory, pooling="max"), "outputs tokens"),
        (dict(backbone=directory, blocks=3), "expected --blocks from 1 to 2"),
        (dict(backbone=directory, image_size=56), "takes 28x28 images"),
        (dict(backbone=directory, layer="x"), "not for a KerasHub preset"),
        (dict(backbone="vgg16", pooling="cls", weights="none", image_size=32), "outputs feature"),
        (dict(backbone="vgg16", blocks=2, weights="none", image_size=32), "--blocks reads"),
        (dict(backbone=tmp_path / "empty"), "lacks config.json"),
        (dict(backbone="hub:no_such_preset_here"), "--backbone DIR"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(BackboneError, match=expected) as error:
            probe.extract(root, **kwargs)
        assert "\n" not in str(error.value)
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # as if not installed
    result = CliRunner().invoke(main, ["extract", str(root), "--backbone", str(directory)])
    assert result.exit_code != 0 and "pip install 'probe[hub]'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_fit_predict_export_and_a_changed_preset_is_refused(tmp_path):
    import keras_hub  # noqa: F401  (the exported model holds its layers)
    from conftest import fit_and_check_export

    backbone, _ = save_preset(tmp_path / "preset")
    root = make_separable_tree(tmp_path / "colours", classes=("blue", "red"))
    probe.extract(root, tmp_path / "preset", pooling="cls+mean")
    run, images = fit_and_check_export(root, tmp_path / "out.keras")
    with pytest.raises(BackboneError, match=r"has 2 transformer blocks .* between 1 and 2"):
        probe.finetune(run.path, unfreeze=0)
    layer = backbone.layers[-1]
    layer.set_weights([w + 1 for w in layer.get_weights()])
    backbone.save_to_preset(str(tmp_path / "preset"))
    with pytest.raises(WeightsError, match="KerasHub preset has changed") as error:
        probe.predict(run.path, images)
    assert "\n" not in str(error.value)


def save_image_text_preset(directory, family="CLIP", seed=0):
    """A tiny random CLIP or SigLIP (a 2-block vision tower, hidden 16, and a 1-block text
    tower, as the real presets hold both) and its image converter, saved as a preset."""
    import keras
    import keras_hub

    models = keras_hub.models
    keras.utils.set_random_seed(seed)
    vision = getattr(models, f"{family}VisionEncoder")(
        patch_size=14, hidden_dim=16, num_layers=2, num_heads=2, intermediate_dim=32,
        image_shape=(SIZE, SIZE, 3))
    text_sizes = dict(vocabulary_size=10, embedding_dim=8, hidden_dim=8, num_layers=1,
                      num_heads=2, intermediate_dim=16, max_sequence_length=4)
    if family == "CLIP":
        backbone = models.CLIPBackbone(vision, models.CLIPTextEncoder(**text_sizes),
                                       projection_dim=8)
    else:
        text_sizes["embedding_dim"] = 16  # SigLIP's logits compare the two towers' outputs
        text_sizes["hidden_dim"] = 16
        backbone = models.SigLIPBackbone(vision, models.SigLIPTextEncoder(**text_sizes))
    converter = getattr(keras_hub.layers, f"{family}ImageConverter")(
        image_size=(SIZE, SIZE), scale=1 / 127.5, offset=-1.0)
    backbone.save_to_preset(str(directory))
    converter.save_to_preset(str(directory))
    return vision, converter


def test_clip_features_are_its_vision_towers_tokens(tmp_path):
    vision, converter = save_image_text_preset(tmp_path / "clip")
    root = small_tree(tmp_path / "ds")
    caches = {pooling: probe.extract(root, tmp_path / "clip", pooling=pooling, val_fraction=0)
              for pooling in ("cls", "mean")}
    tokens = tokens_of(root, caches["cls"], vision, converter)
    assert tokens.shape[1:] == (1 + 4, 16)  # [class, 4 patches]: CLIP has no registers
    relative_close(caches["cls"].split("train").features, tokens[:, 0])
    relative_close(caches["mean"].split("train").features, tokens[:, 1:].mean(axis=1))


def test_siglip_features_are_its_vision_towers_pooled_vector(tmp_path):
    vision, converter = save_image_text_preset(tmp_path / "siglip", family="SigLIP")
    root = small_tree(tmp_path / "ds")
    cache = probe.extract(root, tmp_path / "siglip", val_fraction=0)
    expected = tokens_of(root, cache, vision, converter)
    assert expected.shape[1:] == (16,) and cache.attrs["pooling"] == "avg"
    relative_close(cache.split("train").features, expected)
    with pytest.raises(BackboneError, match="one pooled vector per image"):
        probe.extract(root, tmp_path / "siglip", pooling="cls", val_fraction=0)


def test_compare_mixes_a_registry_name_a_preset_and_a_model_file(tmp_path):
    import keras
    import keras_hub

    from test_own_backbone import tiny_model

    keras.utils.set_random_seed(0)  # a 32-pixel DINOv2 (2x2 patches of 16): one --image-size
    keras_hub.models.DINOV2Backbone(
        patch_size=16, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32,
        layer_scale_init_value=1.0, image_shape=(32, 32, 3),
        position_embedding_shape=(32, 32, 3)).save_to_preset(str(tmp_path / "Tiny"))
    keras_hub.layers.DINOV2ImageConverter(image_size=(32, 32), scale=1 / 255).save_to_preset(
        str(tmp_path / "Tiny"))
    tiny_model(tmp_path / "Mine.keras")
    root = make_separable_tree(tmp_path / "colours", classes=("blue", "red"), per_class=6)
    result = probe.compare(root, f"vgg16,{tmp_path / 'Tiny'},{tmp_path / 'Mine.keras'}",
                           "logreg", weights="none", image_size=32, runs_dir=tmp_path / "cmp")
    assert [r["backbone"] for r in result] == ["vgg16", "Tiny", "Mine.keras"]
    assert all(r["status"] == "ok" for r in result), [r.get("error") for r in result]
    assert [r["feature_size"] for r in result] == [512, 16, 16]


@pytest.mark.openvino
def test_openvino_runs_a_preset_and_a_model_file_or_says_it_fell_back(tmp_path, preset,
                                                                       monkeypatch):
    """Both convert (traced: the graph writer knows no KerasHub layer) and agree with
    TensorFlow; a conversion that fails runs on TensorFlow and says so in one line."""
    pytest.importorskip("openvino")
    from probe.features import runtime
    from probe.progress import RuntimeNote
    from test_own_backbone import tiny_model

    tiny_model(tmp_path / "mine.keras")
    root = small_tree(tmp_path / "ds")
    for backbone in (preset[0], tmp_path / "mine.keras"):
        on_tf = probe.extract(root, backbone, cache_dir=tmp_path / "tf", runtime="tensorflow",
                              val_fraction=0)
        on_ov, report = probe.extract_with_report(root, backbone, cache_dir=tmp_path / "ov",
                                                  runtime="openvino", val_fraction=0)
        assert report.runtime == "openvino" and on_ov.attrs["extract_runtime"] == "openvino"
        relative_close(on_ov.split("train").features, on_tf.split("train").features)

    def fails(*args):
        raise RuntimeError("Cannot convert\nthis operation")

    monkeypatch.setattr(runtime, "convert_traced", fails)
    notes = []
    fell_back, report = probe.extract_with_report(
        root, preset[0], cache_dir=tmp_path / "fell", runtime="openvino", val_fraction=0,
        progress=lambda event: notes.append(event) if isinstance(event, RuntimeNote) else None)
    assert report.runtime == "tensorflow" and fell_back.attrs["extract_runtime"] == "tensorflow"
    assert [n.message for n in notes] == [
        f"OpenVINO could not convert {preset[0].name} (Cannot convert this operation): the "
        "backbone ran on TensorFlow"]
    relative_close(fell_back.split("train").features,
                   probe.extract(root, preset[0], cache_dir=tmp_path / "tf",
                                 val_fraction=0).split("train").features)


def finetuned_and_exported(tmp_path, backbone, **extract):
    """A dense run on `backbone`, fine-tuned 1 epoch with the last block unfrozen (a trained
    epoch is kept: epoch 0's loss is made unbeatable); (run, its model.keras loaded, the
    run's test images, their probabilities by predict, by the exported model)."""
    import importlib

    import keras

    finetune_module = importlib.import_module("probe.finetune")  # probe.finetune: the function
    root = make_separable_tree(tmp_path / "colours", per_class=8,
                               classes=("blue", "green", "red"))
    probe.extract(root, backbone, **extract)
    source = probe.fit(head="dense", epochs=1, hidden_units=16, learning_rate=1e-6)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune_module, "_baseline_loss", lambda job: float("inf"))
        run = probe.finetune(source, unfreeze=1, epochs=1, learning_rate=1e-3, batch_size=8,
                             augment=False)
    assert run.metrics["best_epoch"] == 1
    images = [str(p) for p in sorted((root / "red").iterdir())[:3]]
    proba = np.array([[r.probabilities[c] for c in run.classes]
                      for r in probe.predict(run.path, images)])
    exported = keras.saving.load_model(probe.export(run.path, tmp_path / "out.keras"),
                                       safe_mode=True)
    exported_proba = exported.predict(probe.load_images(images, run.path), verbose=0)
    tuned = keras.saving.load_model(run.path / "model.keras", safe_mode=True)
    return run, tuned, proba, exported_proba


def changed_weights(model, original) -> set[str]:
    """The paths of `original`'s weights whose values differ in its copy inside `model`
    (the layer of the same class and name; weights in the same order, as Keras saves them)."""
    (copy,) = [layer for layer in model._flatten_layers()
               if type(layer) is type(original) and layer.name == original.name]
    return {weight.path for weight, tuned in zip(original.weights, copy.weights, strict=True)
            if not np.array_equal(np.asarray(tuned), np.asarray(weight))}


@pytest.mark.slow
def test_finetune_a_preset_trains_its_last_block_and_final_norm_only(tmp_path):
    import keras_hub  # noqa: F401  (the fine-tuned and exported models hold its layers)

    backbone, _ = save_preset(tmp_path / "preset")
    run, tuned, proba, exported_proba = finetuned_and_exported(
        tmp_path, tmp_path / "preset", pooling="cls")
    assert run.config["finetune"]["blocks"] == ["layers_1"]
    changed = changed_weights(tuned, backbone)
    encoder = backbone.get_layer("encoder")
    last_block = {w.path for w in encoder.layers[1].weights}
    final_norm = {w.path for w in backbone.get_layer("layernorm").weights}
    assert changed & last_block and changed <= last_block | final_norm
    np.testing.assert_allclose(exported_proba, proba, atol=1e-5)
    with pytest.raises(BackboneError, match=r"2 transformer blocks .* Received: unfreeze=3"):
        probe.finetune(probe.Run.open(run.config["finetune"]["source_run"]), unfreeze=3)


@pytest.mark.slow
def test_finetune_a_model_file_trains_its_last_weighted_layer_only(tmp_path):
    from test_own_backbone import tiny_model

    model = tiny_model(tmp_path / "mine.keras")
    run, tuned, proba, exported_proba = finetuned_and_exported(
        tmp_path, tmp_path / "mine.keras", preprocess="tf")
    assert run.config["finetune"]["blocks"] == ["c2"]  # c1, c2 read; the classifier is not
    assert changed_weights(tuned, model.get_layer("c2")) == {"c2/kernel", "c2/bias"}
    assert not changed_weights(tuned, model.get_layer("c1"))
    np.testing.assert_allclose(exported_proba, proba, atol=1e-5)
