"""Your own .keras model as a backbone, and chosen layers of any backbone."""

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import probe
from conftest import assert_relative_close, make_separable_tree, small_tree
from probe import backbones, data
from probe.cli import main
from probe.errors import BackboneError, WeightsError


def tiny_model(path, lambda_layer=False, seed=0):
    """A few convolutions, global pooling and a Dense classifier, random weights, 32x32x3."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="c1")(inputs)
    if lambda_layer:
        x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    x = keras.layers.Conv2D(16, 3, activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="classifier")(x)
    model = keras.Model(inputs, outputs)
    model.save(path)
    return model


def relative_close(got, expected, tolerance=1e-5):
    assert_relative_close(got, expected, tolerance)


def pixels_of(root, cache, size=32):
    paths = cache.split("train").paths
    return np.stack([data.load_image(root / p, size) for p in paths]).astype("float32")


def test_model_file_features_are_the_input_of_its_last_dense_layer(tmp_path):
    import keras

    model = tiny_model(tmp_path / "mine.keras")
    root = small_tree(tmp_path / "ds")
    cache = probe.extract(root, tmp_path / "mine.keras", preprocess="tf", val_fraction=0)
    assert cache.attrs["image_size"] == 32 and cache.feature_shape == (16,)
    inside = keras.Model(model.inputs, model.get_layer("classifier").input)
    expected = inside.predict(backbones.PREPROCESSING["tf"].apply(pixels_of(root, cache)), verbose=0)
    relative_close(cache.split("train").features, expected)


def test_layer_of_a_registry_backbone_and_two_layers_concatenated(tmp_path):
    import keras

    root = small_tree(tmp_path / "ds")
    one = probe.extract(root, "vgg16", weights="none", image_size=32, layer="block3_pool",
                        val_fraction=0)
    two = probe.extract(root, "vgg16", weights="none", image_size=32,
                        layer="block3_pool,block4_conv1", pooling="max", val_fraction=0)
    keras.utils.set_random_seed(0)  # what --weights none --seed 0 means
    vgg = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    cut = keras.Model(vgg.input, [vgg.get_layer("block3_pool").output,
                                  vgg.get_layer("block4_conv1").output])
    pixels = keras.applications.vgg16.preprocess_input(pixels_of(root, one))
    block3, block4 = cut.predict(pixels, verbose=0)
    relative_close(one.split("train").features, block3.mean(axis=(1, 2)))
    relative_close(two.split("train").features,
                   np.concatenate([block3.max(axis=(1, 2)), block4.max(axis=(1, 2))], axis=1))
    assert one.attrs["layers"] == ["block3_pool"] and one.path != two.path


def test_renamed_file_reuses_the_cache_and_a_changed_weight_extracts_again(tmp_path):
    model = tiny_model(tmp_path / "a.keras")
    root = small_tree(tmp_path / "ds")
    first, _ = probe.extract_with_report(root, tmp_path / "a.keras", val_fraction=0)
    (tmp_path / "moved").mkdir()
    shutil.move(tmp_path / "a.keras", tmp_path / "moved" / "b.keras")
    again, report = probe.extract_with_report(root, tmp_path / "moved" / "b.keras", val_fraction=0)
    assert report.status == "up to date" and again.path == first.path
    weights = model.get_layer("c2").get_weights()
    weights[0][0, 0, 0, 0] += 1.0
    model.get_layer("c2").set_weights(weights)
    model.save(tmp_path / "moved" / "b.keras")
    changed, report = probe.extract_with_report(root, tmp_path / "moved" / "b.keras", val_fraction=0)
    assert report.extracted == 6 and changed.path != first.path
    info = CliRunner().invoke(main, ["cache", "info", str(changed.path)])
    assert f"source:         {tmp_path / 'moved' / 'b.keras'} (sha256 " in info.output


def test_refusals_are_one_line(tmp_path):
    tiny_model(tmp_path / "lambda.keras", lambda_layer=True)
    tiny_model(tmp_path / "mine.keras")
    root = small_tree(tmp_path / "ds")
    cases = [
        (dict(backbone=tmp_path / "lambda.keras"), "unsafe deserialisation"),
        (dict(backbone=tmp_path / "mine.keras", image_size=64), "takes 32x32 images"),
        (dict(backbone=tmp_path / "mine.keras", weights="none"), "leave out --weights"),
        (dict(backbone="vgg16", layer="nope", weights="none", image_size=32), "no layer named"),
        (dict(backbone="vgg16", preprocess="tf"), "--preprocess is for a .keras"),
    ]
    for kwargs, expected in cases:
        with pytest.raises((BackboneError, WeightsError), match=expected) as error:
            probe.extract(root, **kwargs)
        assert "\n" not in str(error.value)


def test_fit_predict_export_on_a_model_file_and_a_changed_file_is_refused(tmp_path):
    from conftest import fit_and_check_export

    model = tiny_model(tmp_path / "mine.keras")
    root = make_separable_tree(tmp_path / "colours", classes=("blue", "red"))
    probe.extract(root, tmp_path / "mine.keras")
    run, images = fit_and_check_export(root, tmp_path / "out.keras")
    with pytest.raises(BackboneError, match=r"2 layers with weights up to its default layer"
                                            r" .*\(1 = the last, c2\)"):
        probe.finetune(run.path, unfreeze=3)
    model.get_layer("c1").set_weights([w + 1 for w in model.get_layer("c1").get_weights()])
    model.save(tmp_path / "mine.keras")
    for job in (probe.predict, probe.finetune):
        with pytest.raises(WeightsError, match="model file has changed: .*copy or link") as error:
            job(run.path, images) if job is probe.predict else job(run.path, unfreeze=1)
        assert "\n" not in str(error.value)


def test_backbones_layers_lists_the_layers_with_their_shapes(tmp_path):
    result = CliRunner().invoke(main, ["backbones", "vgg16", "--layers", "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert "block3_pool   4x4x256" in result.output
    tiny_model(tmp_path / "mine.keras")
    result = CliRunner().invoke(main, ["backbones", str(tmp_path / "mine.keras"), "--layers"])
    assert "gap" in result.output and "c2          28x28x16" in result.output


def test_compare_mixes_a_registry_name_and_a_model_file(tmp_path):
    tiny_model(tmp_path / "Mine.keras")
    root = make_separable_tree(tmp_path / "colours", classes=("blue", "red"), per_class=6)
    result = probe.compare(root, f"vgg16,{tmp_path / 'Mine.keras'}", "logreg", weights="none",
                           image_size=32, runs_dir=tmp_path / "cmp")
    assert sorted(r["backbone"] for r in result) == ["Mine.keras", "vgg16"]
    assert all(r["status"] == "ok" for r in result), [r.get("error") for r in result]
