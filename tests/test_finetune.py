"""Fine-tuning: the blocks of every backbone, unfreezing, BatchNorm kept frozen, the run
directory, prediction and export of the fine-tuned model, refused settings."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import probe
from probe import backbones, data
from probe.cli import main
from probe.errors import BackboneError, FinetuneError, ProbeError, SourceChangedError
from probe.progress import (BatchDone, EpochDone, Estimate, FinetuneFinished, FinetuneStarted, NoImprovement,
                            SourceChanged)

from conftest import make_separable_tree


def _is_bn(layer):
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


_BUILT = {}


def _built(name):
    """Each backbone built once (random weights, minimum size) for the block tests."""
    if name not in _BUILT:
        spec = backbones.get(name)
        _BUILT[name] = spec.build("none", spec.min_size)
    return _BUILT[name]


def _trainable_count(layers):
    return sum(len(layer.trainable_weights) for layer in layers)


# The first five backbones, fully built; one model of every other family is cut into blocks
# in test_applications.
@pytest.mark.parametrize("name", ["vgg16", "resnet50", "densenet121", "xception", "inceptionv3"])
def test_blocks_and_unfreeze_per_backbone(name):
    spec = backbones.get(name)
    model = _built(name)
    blocks = spec.block_layers(model)
    assert len(blocks) == len(spec.top_blocks)
    in_blocks = {id(layer) for block in blocks for layer in block}
    assert len(in_blocks) == sum(len(block) for block in blocks)  # no layer in two blocks
    for marker, block in zip(spec.top_blocks, blocks):
        assert any(layer.weights for layer in block), marker
        # every layer named after a block is in that block (InceptionV3: the mixedN
        # concatenation only; mixed9_1 is inside mixed10, see the next test)
        named = {layer.name for layer in model.layers
                 if layer.name == marker
                 or (name != "inceptionv3" and layer.name.startswith(marker + "_"))}
        assert named <= {layer.name for layer in block}, marker
    # the layers outside every block are the stem, below the first block
    first = model.layers.index(blocks[0][0])
    outside = [layer for layer in model.layers if id(layer) not in in_blocks]
    assert all(model.layers.index(layer) < first for layer in outside)

    n = 2
    assert spec.unfreeze(model, n) == list(spec.top_blocks[-n:])
    for block in blocks[:-n]:
        assert _trainable_count(block) == 0
    for block in blocks[-n:]:
        expected = sum(len(layer.weights) for layer in block if not _is_bn(layer))
        assert _trainable_count(block) == expected > 0
        assert all(not layer.trainable for layer in block if _is_bn(layer))
    assert _trainable_count(outside) == 0
    assert len(model.trainable_weights) == sum(_trainable_count(b) for b in blocks[-n:])


def test_top_blocks_where_names_mislead():
    """mixed1 is not mixed10; InceptionV3's blocks hold the unnamed layers before each
    mixedN; DenseNet's final bn/relu and Xception's last add and residual belong to blocks."""
    inception = backbones.get("inceptionv3")
    blocks = inception.block_layers(_built("inceptionv3"))
    assert blocks[1][-1].name == "mixed1" and blocks[-1][-2].name == "mixed10"
    assert "mixed9_1" in [layer.name for layer in blocks[-1]]
    assert "mixed9_0" in [layer.name for layer in blocks[-2]]
    assert sum(1 for layer in blocks[-1] if "Conv2D" in type(layer).__name__) == 9

    densenet = backbones.get("densenet121")
    top = [layer.name for layer in densenet.block_layers(_built("densenet121"))[-1]]
    assert top[-3:-1] == ["bn", "relu"] and not any(n.startswith("pool4") for n in top)

    xception = backbones.get("xception")
    blocks = xception.block_layers(_built("xception"))
    assert type(blocks[-2][-1]).__name__ == "Add"  # block13 ends with its residual add
    assert sum(1 for layer in blocks[-2] if type(layer).__name__ == "Conv2D") == 1
    assert blocks[-1][0].name == "block14_sepconv1"


@pytest.mark.parametrize("n", [0, 6, -1])
def test_unfreeze_out_of_range_is_refused(n):
    spec = backbones.get("vgg16")
    with pytest.raises(BackboneError, match=rf"vgg16 has 5 blocks.*between 1 and 5.*Received: unfreeze={n}"):
        spec.unfreeze(spec.build("none", 32), n)


def _dense_run(tmp_path, backbone="vgg16", untrained=False):
    """A dense run; `untrained`: its head has barely moved from its initial weights, so
    that fine-tuning has room to beat epoch 0."""
    root = make_separable_tree(tmp_path / "colours", per_class=8, classes=("blue", "green", "red"))
    probe.extract(root, backbone, weights="none", image_size=32)
    if untrained:
        return probe.fit(head="dense", epochs=1, hidden_units=16, learning_rate=1e-6)
    return probe.fit(head="dense", epochs=3, hidden_units=16)


def test_finetune_vgg16_run_predict_and_export(tmp_path):
    import keras

    source = _dense_run(tmp_path, untrained=True)
    events = []
    run = probe.finetune(source, unfreeze=1, epochs=2, learning_rate=1e-4, batch_size=8,
                         augment=False, progress=events.append)

    # the run directory is complete and says what was done
    for name in ("config.json", "metrics.json", "confusion_matrix.png", "curves.png",
                 "test_predictions.csv", "model.keras"):
        assert (run.path / name).is_file(), name
    loaded = probe.Run.load(run.path)
    assert loaded.is_finetuned
    config = json.loads((run.path / "config.json").read_text())
    for key in ("head", "backbone", "classes", "image_size", "preprocessing", "pooling", "cache"):
        assert config[key] == source.config[key], key
    assert config["finetune"]["blocks"] == ["block5"]
    assert config["finetune"]["source_run"] == str(source.path.resolve())

    # the validation metric is computed each epoch; before / after on the test split
    assert all(event.stage == "finetune" for event in events)
    assert isinstance(events[0], FinetuneStarted) and isinstance(events[-1], FinetuneFinished)
    assert events[0].blocks == ("block5",) and events[0].total == 2
    epochs = [e for e in events if isinstance(e, EpochDone)]
    assert 1 <= len(epochs) <= 2 and {"val_loss", "val_accuracy"} <= set(epochs[0].logs)
    assert [e.done for e in epochs] == list(range(1, len(epochs) + 1))
    estimates = [e for e in events if isinstance(e, Estimate)]
    assert len(estimates) == 1  # said once; the batches carry the updates
    assert estimates[0].seconds_per_epoch > 0 and estimates[0].device == "CPU"
    batches = [e for e in events if isinstance(e, BatchDone)]
    assert [(e.epoch, e.done) for e in batches] == [
        (epoch, batch) for epoch in range(1, len(epochs) + 1)
        for batch in range(1, batches[0].total + 1)]
    # no estimate from the first (graph-building) batch alone; measured ones after it
    assert batches[0].remaining is None and all(e.remaining >= 0 for e in batches[1:])
    assert epochs[-1].remaining == 0 or len(epochs) < 2
    metrics = run.metrics
    assert metrics["split"] == "test" and metrics["split_role"] == "test"
    test_labels = probe.FeatureCache.open(source.config["cache"]).split("test").labels
    assert metrics["n_samples"] == len(test_labels)
    low, high = metrics["accuracy_ci"]
    assert low <= metrics["accuracy"] <= high and high - low > 0
    # epoch 0 is the baseline: the kept epoch is the one with the lowest validation loss,
    # epoch 0 included
    losses = [metrics["baseline_val_loss"]] + [e.logs["val_loss"] for e in epochs]
    assert metrics["best_epoch"] == int(np.argmin(losses))
    assert metrics["kept_baseline"] == (metrics["best_epoch"] == 0)
    # the source head was refit on train + val: training started from the same head fit
    # on train only, and "before" is that head
    assert config["finetune"]["start_head"]["trained_on"] == "train"
    assert config["finetune"]["start_head"]["chosen_settings"] == {"epochs": 1}
    assert metrics["start_head_trained_on"] == "train"
    train_only = probe.fit(head="dense", epochs=1, hidden_units=16, learning_rate=1e-6,
                           refit=False, html_report=False)
    assert metrics["before"]["accuracy"] == pytest.approx(train_only.metrics["accuracy"])
    assert metrics["before"]["log_loss"] == pytest.approx(train_only.metrics["log_loss"], abs=1e-3)
    assert metrics["comparison"]["accuracy"]["after"] == metrics["accuracy"]

    # the trainable weights were exactly block5's and the head's; the kept weights are an
    # epoch's that beat epoch 0, or epoch 0's (the source backbone, unchanged). Which one
    # depends on CPU training, not bit-for-bit repeatable: both outcomes are checked.
    model = keras.saving.load_model(run.path / "model.keras", safe_mode=True)
    rebuilt = backbones.get("vgg16").build("none", 32)
    tuned = model.get_layer(rebuilt.name)
    trainable = {layer.name for layer in tuned.layers if layer.trainable_weights}
    assert trainable == {"block5_conv1", "block5_conv2", "block5_conv3"}
    changed = {layer.name for layer in tuned.layers
               if layer.weights and not all(
                   np.array_equal(a, b) for a, b in zip(layer.get_weights(),
                                                        rebuilt.get_layer(layer.name).get_weights()))}
    assert changed <= trainable and bool(changed) == (metrics["best_epoch"] > 0)

    # predict and export use the fine-tuned model
    cache = probe.FeatureCache.open(source.config["cache"])
    root = cache.attrs["dataset_root"]
    images = [f"{root}/{p}" for p in cache.split("test").paths]
    results = probe.predict(run.path, images)
    proba = np.array([[r.probabilities[c] for c in run.classes] for r in results])
    pixels = np.stack([data.load_image(p, 32) for p in images]).astype("float32")
    np.testing.assert_allclose(model.predict(pixels, verbose=0), proba, atol=1e-5)
    exported = keras.saving.load_model(probe.export(run.path, tmp_path / "ft.keras"))
    np.testing.assert_allclose(exported.predict(pixels, verbose=0), proba, atol=1e-5)
    assert len(exported.layers) == len(model.layers)  # no augmentation layers inside

    with pytest.raises(FinetuneError, match="already fine-tuned"):
        probe.finetune(run, unfreeze=1)


def test_no_epoch_better_than_epoch_0_keeps_the_source_model(tmp_path):
    from conftest import make_image

    source = _dense_run(tmp_path)
    events = []
    # a learning rate this large wrecks the unfrozen block: no epoch beats epoch 0
    run = probe.finetune(source, unfreeze=1, epochs=2, learning_rate=10.0, batch_size=8,
                         patience=1, augment=False, progress=events.append)
    metrics = run.metrics
    assert metrics["best_epoch"] == 0 and metrics["kept_baseline"] is True
    notes = [e for e in events if isinstance(e, NoImprovement)]
    assert len(notes) == 1 and notes[0].baseline_val_loss == metrics["baseline_val_loss"]
    # the saved model is the baseline: it scores exactly as the source run's head fit on
    # train only (the source head was refit on train + val)
    assert metrics["accuracy"] == metrics["before"]["accuracy"]
    assert metrics["log_loss"] == pytest.approx(metrics["before"]["log_loss"], abs=1e-5)
    train_only = probe.fit(head="dense", epochs=3, hidden_units=16, refit=False, html_report=False)
    assert metrics["log_loss"] == pytest.approx(train_only.metrics["log_loss"], abs=1e-3)

    # the source images are checked as `fit` checks them
    root = probe.FeatureCache.open(source.config["cache"]).attrs["dataset_root"]
    make_image(tmp_path / "colours" / "red" / "added.png", seed=3)
    assert str(tmp_path / "colours") == root


    class Noted(Exception):
        """Raised by the listener at the note: the fine-tuning after it is not needed here."""

    def stop_at_the_note(event):
        if isinstance(event, SourceChanged):
            raise Noted(event.message)

    with pytest.raises(Noted, match="1 added"):  # a note, not an error, without strict
        probe.finetune(source, unfreeze=1, epochs=1, batch_size=8, progress=stop_at_the_note)
    with pytest.raises(SourceChangedError, match="1 added"):
        probe.finetune(source, unfreeze=1, epochs=1, strict=True)


def test_epoch_0_is_judged_on_val_images_no_head_was_fit_on(tmp_path):
    """Random labels: a head refit on train + val has memorised val, so its val loss is
    far below chance. Scoring epoch 0 with it gave every honestly judged epoch an
    impossible target. The baseline is the val loss of the same head fit on train only."""
    from conftest import make_image

    classes = 4
    for c in range(classes):  # pure noise: the labels say nothing about the pixels
        for i in range(10):
            make_image(tmp_path / "noise" / f"c{c}" / f"{i}.png", seed=100 * c + i, size=(12, 12))
    cache = probe.extract(tmp_path / "noise", "vgg16", weights="none", image_size=32,
                          val_fraction=0.3, test_fraction=0.2)
    params = dict(head="dense", hidden_units=64, learning_rate=1e-2, epochs=20, html_report=False)
    refit = probe.fit(cache, **params)
    train_only = probe.fit(cache, **params, refit=False)
    val = cache.split("val")

    def val_loss(run):  # cross-entropy as Keras computes it (clipped at 1e-7)
        proba = run.load_head().predict_proba(val.features)[np.arange(len(val.labels)), val.labels]
        return float(-np.mean(np.log(np.clip(proba, 1e-7, 1.0))))

    events = []
    run = probe.finetune(refit, unfreeze=1, epochs=1, batch_size=16, augment=False,
                         progress=events.append)
    baseline = run.metrics["baseline_val_loss"]
    assert baseline == pytest.approx(val_loss(train_only), abs=2e-3)
    assert val_loss(refit) < baseline - 0.5  # the refit head's loss is not the baseline
    # chance is ln 4 = 1.39; 12 val images: a loss far below it would be memorised val
    assert baseline > np.log(classes) - 0.3
    assert events[0].baseline_val_loss == baseline
    assert run.config["finetune"]["start_head"]["trained_on"] == "train"


def test_batchnorm_statistics_unchanged_resnet50(tmp_path, monkeypatch):
    import keras

    import importlib

    finetune_mod = importlib.import_module("probe.finetune")  # probe.finetune is the function

    source = _dense_run(tmp_path, "resnet50", untrained=True)
    # any trained epoch beats this epoch 0, so the saved weights are trained ones
    monkeypatch.setattr(finetune_mod, "_baseline_loss", lambda job: float("inf"))
    run = probe.finetune(source, unfreeze=1, epochs=1, learning_rate=1e-4, batch_size=8,
                         augment=False)
    assert run.metrics["best_epoch"] == 1

    model = keras.saving.load_model(run.path / "model.keras", safe_mode=True)
    rebuilt = backbones.get("resnet50").build("none", 32)
    tuned = model.get_layer(rebuilt.name)
    bn = [layer for layer in tuned.layers if _is_bn(layer)]
    assert any(layer.name.startswith("conv5_") for layer in bn)
    for layer in bn:
        for before, after in zip(rebuilt.get_layer(layer.name).get_weights(), layer.get_weights()):
            np.testing.assert_array_equal(before, after, err_msg=layer.name)
    kernel = tuned.get_layer("conv5_block3_3_conv").get_weights()[0]
    assert not np.array_equal(kernel, rebuilt.get_layer("conv5_block3_3_conv").get_weights()[0])
    np.testing.assert_array_equal(tuned.get_layer("conv4_block6_3_conv").get_weights()[0],
                                  rebuilt.get_layer("conv4_block6_3_conv").get_weights()[0])


def test_cli_finetune_a_logistic_run(tmp_path):
    root = make_separable_tree(tmp_path / "colours", per_class=8)
    runner = CliRunner()
    assert runner.invoke(main, ["extract", "--weights", "none", "--image-size", "32", "-q",
                                str(root)]).exit_code == 0
    result = runner.invoke(main, ["fit", "--head", "logreg", "--C", "1"])
    assert result.exit_code == 0, result.output
    run_dir = result.output.strip().splitlines()[-1].removeprefix("Run: ")

    for value, message in [("0", "0 would train nothing"), ("6", "between 1 and 5")]:
        refused = runner.invoke(main, ["finetune", run_dir, "--unfreeze", value])
        assert refused.exit_code == 1
        assert message in refused.output and "Traceback" not in refused.output
        assert len(refused.output.strip().splitlines()) == 1

    result = runner.invoke(main, ["finetune", run_dir, "--unfreeze", "2", "--epochs", "1",
                                  "--no-augment", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "block4, block5 unfrozen" in result.output
    assert "baseline: validation loss " in result.output
    assert "per epoch on this machine (CPU): about" in result.output  # stderr, mixed in
    # not a terminal: no batch lines, the epoch said once
    assert result.output.count("epoch 1/1") == 1 and "batch" not in result.output
    assert "metric" in result.output and "before" in result.output and "after" in result.output
    new_run = result.output.strip().splitlines()[-1].removeprefix("Run: ")
    assert probe.Run.load(new_run).config["finetune"]["augment"] is False
    predicted = runner.invoke(main, ["predict", new_run, str(root / "red")])
    assert predicted.exit_code == 0 and "red_0.png" in predicted.output

    cache = probe.FeatureCache.open(probe.Run.load(run_dir).config["cache"])
    gone = root / cache.split("train").paths[0]
    gone.unlink()
    refused = runner.invoke(main, ["finetune", run_dir, "--quiet"])
    assert refused.exit_code == 1 and "train images are gone" in refused.output
    assert str(gone) in refused.output


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ProbeError, match="config.json"):
        probe.finetune(tmp_path, unfreeze=1)
    help_text = CliRunner().invoke(main, ["finetune", "--help"]).output
    assert "Example: probe finetune" in help_text and "--no-augment" in help_text
