import csv

import numpy as np
import pytest

import probe
from probe import calibration, data, heads, inference
from probe.errors import ProbeError, RunError
from probe.inference import preprocessing_weights
from probe.run_files import write_manifest


@pytest.mark.parametrize("name", ["vgg16", "densenet121", "xception"])
def test_preprocessing_layer_equals_preprocess_input(name):
    spec = probe.get_backbone(name)
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 5, 3)).astype(np.float32)
    kernel, bias = preprocessing_weights(spec.preprocessing)
    np.testing.assert_allclose(pixels @ kernel + bias, spec.preprocess_input(pixels), rtol=1e-5, atol=1e-4)


def _force_temperature(monkeypatch, T: float) -> None:
    """Runs fitted from now on get temperature T (the separable validation images are all
    predicted right, which keeps T = 1 otherwise)."""
    monkeypatch.setattr(calibration, "choose_temperature",
                        lambda y, proba, where="validation": calibration.Temperature(T))


@pytest.mark.parametrize("head", probe.list_heads())
def test_predict_matches_the_cache_and_export_matches_predict(separable_cache, head, tmp_path,
                                                              monkeypatch):
    import keras

    _force_temperature(monkeypatch, 20.0)  # large: the k-NN votes are one-hot here
    run = probe.fit(head=head, **({"epochs": 10} if head == "dense" else {}))
    assert run.config["temperature"] == run.metrics["temperature"] == 20.0
    test = separable_cache.split("test")
    root = separable_cache.attrs["dataset_root"]
    images = [f"{root}/{p}" for p in test.paths]
    results = probe.predict(run.path, images, output=tmp_path / "out.csv")
    assert [r.path for r in results] == images
    proba = np.array([[r.probabilities[c] for c in separable_cache.classes] for r in results])
    raw = run.load_head().predict_proba(test.features)
    expected = calibration.apply_temperature(raw, 20.0)  # predict applies the temperature
    np.testing.assert_allclose(proba, expected, atol=1e-4)
    assert np.abs(proba - raw).max() > 1e-3
    with open(run.path / "test_predictions.csv", newline="") as handle:  # the run reports them
        written = np.array([[float(v) for v in row[3:]] for row in list(csv.reader(handle))[1:]])
    np.testing.assert_allclose(written, proba, atol=1e-4)
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == "path,predicted,blue,green,red,error"

    out = probe.export(run.path, tmp_path / "model.keras")
    model = keras.saving.load_model(out)
    pixels = probe.load_images(images, run.path)  # what the README's export section does
    assert pixels.dtype == np.float32 and pixels.shape == (len(images), 32, 32, 3)
    np.testing.assert_array_equal(pixels, np.stack([data.load_image(p, 32) for p in images]))
    np.testing.assert_allclose(model.predict(pixels, verbose=0), proba, atol=1e-4)


def test_predict_without_a_keras_head_applies_the_temperature(separable_cache, monkeypatch):
    """A head whose Keras form does not fit in memory: backbone, then `predict_proba`,
    then the temperature, as the Keras model does it."""
    _force_temperature(monkeypatch, 20.0)
    run = probe.fit(head="knn")
    root = separable_cache.attrs["dataset_root"]
    test = separable_cache.split("test")
    images = [f"{root}/{p}" for p in test.paths[:4]]
    monkeypatch.setattr(heads.HEADS["knn"], "keras_head_fits_in_memory", lambda self: False)
    assert isinstance(inference._predictor(probe.Run.load(run.path)), inference._BackboneThenHead)
    proba = np.array([[r.probabilities[c] for c in run.classes] for r in probe.predict(run, images)])
    expected = calibration.apply_temperature(run.load_head().predict_proba(test.features[:4]), 20.0)
    np.testing.assert_allclose(proba, expected, atol=1e-4)


def test_export_with_spatial_features_and_dense_head(tmp_path):
    import keras

    from conftest import make_separable_tree

    root = make_separable_tree(tmp_path / "ds")
    probe.extract(root, "vgg16", weights="none", image_size=64, pooling="none")
    run = probe.fit(head="dense", epochs=3)
    images = [str(p) for p in sorted((root / "red").iterdir())[:3]]
    results = probe.predict(run, images)
    model = keras.saving.load_model(probe.export(run, tmp_path / "spatial.keras"))
    pixels = np.stack([data.load_image(p, 64) for p in images]).astype("float32")
    proba = np.array([[r.probabilities[c] for c in run.classes] for r in results])
    np.testing.assert_allclose(model.predict(pixels, verbose=0), proba, atol=1e-4)


def test_predict_reports_bad_files_and_goes_on(separable_cache, tmp_path):
    run = probe.fit(head="logreg", C=1.0)
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "broken.jpg").write_text("not an image")
    good = sorted((separable_cache.path.parent.parent / "colours" / "red").iterdir())[0]
    (folder / "good.png").write_bytes(good.read_bytes())
    results = probe.predict(run, [folder])
    by_name = {r.path.split("/")[-1]: r for r in results}
    assert by_name["broken.jpg"].error == "not an image Pillow can identify"
    assert by_name["broken.jpg"].predicted is None
    assert by_name["good.png"].predicted == "red"


def test_predict_and_export_errors(separable_cache, tmp_path):
    run = probe.fit(head="logreg", C=1.0)
    with pytest.raises(ProbeError, match="no such path"):
        probe.predict(run, [tmp_path / "missing"])
    with pytest.raises(ProbeError, match="ending in .keras"):
        probe.export(run, tmp_path / "model.h5")
    with pytest.raises(RunError, match="config.json"):
        probe.predict(tmp_path, [tmp_path])


def test_tampered_head_file_is_a_clear_error(separable_cache):
    run = probe.fit(head="dense", epochs=2)
    (run.path / "head" / "head.keras").write_bytes(b"PK\x03\x04 tampered")
    with pytest.raises(RunError, match="run file 'head/head.keras' .* does not match its checksum"):
        probe.predict(run.path, [separable_cache.attrs["dataset_root"]])
    write_manifest(run.path)  # past the manifest, the head's loader still refuses
    with pytest.raises(RunError, match="re-run `probe fit`"):
        probe.predict(run.path, [separable_cache.attrs["dataset_root"]])


def test_load_images_names_a_file_that_can_not_be_decoded(separable_cache, tmp_path):
    run = probe.fit(head="logreg", C=1.0)
    (tmp_path / "broken.jpg").write_text("not an image")
    with pytest.raises(ProbeError, match="broken.jpg' can not be.*not an image Pillow"):
        probe.load_images([tmp_path / "broken.jpg"], run)


def test_predict_cli_fails_when_no_file_decodes_and_on_an_unwritable_output(separable_cache,
                                                                          tmp_path):
    from click.testing import CliRunner

    from probe.cli import main

    run = probe.fit(head="logreg", C=1.0)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_text("not an image")
    (folder / "b.png").write_bytes(b"")
    runner = CliRunner()
    result = runner.invoke(main, ["predict", str(run.path), str(folder)])
    assert result.exit_code == 1, result.output
    assert "none of the 2 files could be decoded" in result.output
    good = sorted((separable_cache.path.parent.parent / "colours" / "red").iterdir())[0]
    (folder / "good.png").write_bytes(good.read_bytes())
    result = runner.invoke(main, ["predict", str(run.path), str(folder)])
    assert result.exit_code == 0 and "2 of 3 files could not be decoded" in result.output

    (tmp_path / "a-file").write_text("x")
    for target in ("/proc/x.csv", str(tmp_path / "a-file" / "x.csv")):
        result = runner.invoke(main, ["predict", str(run.path), str(folder), "-o", target])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.startswith("Error: expected a writable file for the predictions")
        assert len(result.output.strip().splitlines()) == 1
    existing = tmp_path / "kept.csv"
    existing.write_text("old")
    probe.predict(run, [folder / "good.png"], output=existing)  # checked, then written
    assert existing.read_text().startswith("path,predicted")
