import numpy as np
import pytest

import probe
from probe import data
from probe.errors import ProbeError, RunError
from probe.inference import preprocessing_weights


@pytest.mark.parametrize("name", ["vgg16", "densenet121", "xception"])
def test_preprocessing_layer_equals_preprocess_input(name):
    spec = probe.get_backbone(name)
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 5, 3)).astype(np.float32)
    kernel, bias = preprocessing_weights(spec.preprocessing)
    np.testing.assert_allclose(pixels @ kernel + bias, spec.preprocess_input(pixels), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("head", probe.list_heads())
def test_predict_matches_the_cache_and_export_matches_predict(separable_cache, head, tmp_path):
    import keras

    run = probe.fit(head=head, **({"epochs": 10} if head == "dense" else {}))
    test = separable_cache.split("test")
    root = separable_cache.attrs["dataset_root"]
    images = [f"{root}/{p}" for p in test.paths]
    results = probe.predict(run.path, images, output=tmp_path / "out.csv")
    assert [r.path for r in results] == images
    proba = np.array([[r.probabilities[c] for c in separable_cache.classes] for r in results])
    expected = run.load_head().predict_proba(test.features)
    np.testing.assert_allclose(proba, expected, atol=1e-4)
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == "path,predicted,blue,green,red,error"

    out = probe.export(run.path, tmp_path / "model.keras")
    model = keras.saving.load_model(out)
    pixels = np.stack([data.load_image(p, 32) for p in images]).astype("float32")
    np.testing.assert_allclose(model.predict(pixels, verbose=0), proba, atol=1e-4)


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
    with pytest.raises(RunError, match="re-run `probe fit`"):
        probe.predict(run.path, [separable_cache.attrs["dataset_root"]])
