"""Shared fixtures: tiny image trees in tmp_path and a cache directory there."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from PIL import Image

CLASSES = ("cat", "dog", "fox")


TINTS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200))


def make_image(path: Path, seed: int, size=(40, 30), mode="RGB", fmt=None,
               tint: int | None = None) -> Path:
    """A small random image; with `tint` (a class index) it is blended half and half with
    that class's colour, which makes classes separable."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if tint is not None:
        colour = np.array(TINTS[tint % len(TINTS)], dtype=np.uint16)
        pixels = ((pixels.astype(np.uint16) + colour) // 2).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def make_tree(root: Path, classes=CLASSES, per_class: int = 6, splits: bool = False) -> Path:
    """Class folders of small images in varied sizes and modes."""
    formats = [("jpg", "RGB"), ("png", "L"), ("png", "RGBA"), ("gif", "P"), ("bmp", "RGB"),
               ("JPEG", "RGB")]
    for c, name in enumerate(classes):
        for i in range(per_class):
            ext, mode = formats[i % len(formats)]
            split = ("train", "train", "train", "train", "val", "test")[i % 6] if splits else ""
            folder = root / split / name if split else root / name
            make_image(folder / f"{name}_{i}.{ext}", seed=100 * c + i,
                       size=(24 + 3 * i, 20 + 2 * c), mode=mode, tint=c)
    return root


@pytest.fixture(autouse=True)
def tensorflow_runtime(request, monkeypatch) -> None:
    """Extraction runs on TensorFlow (what every test but the runtime's own checks), also in
    the probe processes a test starts: converting each tiny model to OpenVINO would cost
    more than it saves. Tests marked `openvino` choose for themselves."""
    if request.node.get_closest_marker("openvino") is None:
        monkeypatch.setenv("PROBE_RUNTIME", "tensorflow")
    else:
        monkeypatch.delenv("PROBE_RUNTIME", raising=False)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("PROBE_CACHE_DIR", str(directory))
    return directory


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """Three classes of six images each, plus broken and non-image files."""
    root = make_tree(tmp_path / "images")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "text.jpg").write_text("this is not a picture")
    (root / "dog" / "notes.txt").write_text("ignored")
    (root / "fox" / ".hidden.jpg").write_bytes(b"hidden")
    return root


def make_separable_tree(root: Path, per_class: int = 10, classes=("blue", "red")) -> Path:
    """Classes of clearly different colours, so that even random-weight features separate
    them: heads trained on them must score high."""
    colours = {"blue": (20, 40, 220), "red": (220, 30, 20), "green": (30, 200, 40)}
    for name in classes:
        for i in range(per_class):
            # a stable seed: hash() of a str is salted per process
            rng = np.random.default_rng(zlib.crc32(f"{name}:{i}".encode()))
            pixels = np.clip(np.array(colours[name]) + rng.normal(0, 25, (28, 28, 3)), 0, 255)
            path = root / name / f"{name}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path)
    return root


@pytest.fixture
def separable_cache(tmp_path):
    """A vgg16 cache (random weights, 32 px) of a three-colour dataset."""
    import probe

    root = make_separable_tree(tmp_path / "colours", classes=("blue", "green", "red"))
    return probe.extract(root, "vgg16", weights="none", image_size=32)


def small_tree(root: Path) -> Path:
    """Two classes of three small images, in a train folder only."""
    for c, cls in enumerate(["a", "b"]):
        for i in range(3):
            make_image(root / "train" / cls / f"{i}.png", seed=10 * c + i, size=(30 + i, 20))
    return root


def assert_relative_close(got, expected, tolerance: float) -> None:
    """Same shape, and every difference within `tolerance` of the largest expected value."""
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    assert got.shape == expected.shape
    assert float(np.max(np.abs(got - expected))) / scale <= tolerance


def fit_and_check_export(root: Path, out: Path):
    """`probe fit` (logreg) on the newest cache; the exported `.keras`, loaded in safe mode,
    gives `probe predict`'s probabilities on three images of `root/red`. The run and those
    images."""
    import keras

    import probe

    run = probe.fit(head="logreg")
    images = [str(p) for p in sorted((root / "red").iterdir())[:3]]
    proba = np.array([[r.probabilities[c] for c in run.classes]
                      for r in probe.predict(run.path, images)])
    exported = keras.saving.load_model(probe.export(run.path, out), safe_mode=True)
    pixels = probe.load_images(images, run.path)
    np.testing.assert_allclose(exported.predict(pixels, verbose=0), proba, atol=1e-5)
    return run, images
