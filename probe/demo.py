"""`probe demo`: the whole flow on a small real dataset that ships with the dependencies.

scikit-learn's handwritten digits (1797 images of 8x8 pixels, 16 grey levels, 10 classes)
are written as PNG files in class folders `digit_0/ ... digit_9/`, then the backbones are
compared on them with both heads. ImageNet weights are used when they can be loaded;
offline, the demo says so in one line and runs with random weights.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from . import backbones as backbones_mod, files, settings
from .features import cache as cache_mod
from .compare import Comparison, compare
from .errors import DatasetError, WeightsError
from .progress import DemoDataset, OfflineWeights, ProgressCallback, emit

__all__ = ["run_demo", "write_digits", "imagenet_available", "DEMO_BACKBONES", "DEMO_PER_CLASS", "DEMO_IMAGE_SIZE"]

# Chosen so that the default `probe demo` finishes in well under 3 minutes on a 2-core CPU,
# TensorFlow start-up included (see docs/compare.md).
DEMO_BACKBONES = ("vgg16", "resnet50", "densenet121")
DEMO_PER_CLASS = 60
DEMO_IMAGE_SIZE = 64
DIGIT_PIXELS = 32  # side of the written PNG files (the 8x8 digits upscaled, bilinear)
MIN_PER_CLASS = 4  # the smallest count that leaves each class a validation and a test image
OFFLINE_NOTE = ("ImageNet weights are not available offline; running with random weights "
                "(features are weaker than with ImageNet).")


def write_digits(out: str | os.PathLike, per_class: int = DEMO_PER_CLASS,
                 pixels: int = DIGIT_PIXELS) -> Path:
    """Write `per_class` digits of each class as RGB PNG files `out/digit_K/digit_K_NNNN.png`.

    The first `per_class` images of each class in scikit-learn's order are used. Files that
    already exist are left alone (their content is the same), so a second call changes
    nothing and the feature caches of the directory stay valid.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    available = int(np.bincount(digits.target).min())
    if not MIN_PER_CLASS <= int(per_class) <= available:
        raise DatasetError(
            f"expected a per-class count between {MIN_PER_CLASS} and {available} (the digits "
            f"dataset has {available} to {int(np.bincount(digits.target).max())} images per "
            f"class). Received: per_class={per_class}"
        )
    if pixels < 8:
        raise DatasetError(f"expected at least 8 pixels per side. Received: pixels={pixels}")
    root = Path(out).expanduser()
    if root.is_file():
        raise DatasetError(f"expected a directory to write the digits into; it is a file. "
                           f"Received: out='{out}'")
    foreign = [p.name for p in root.iterdir() if not p.name.startswith(("digit_", "."))] \
        if root.is_dir() else []
    if foreign:
        raise DatasetError(
            f"expected an empty directory or one written by `probe demo`; it holds other files "
            f"({', '.join(sorted(foreign)[:3])}). Choose another --out. Received: out='{out}'"
        )
    for label in range(10):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        indices = np.flatnonzero(digits.target == label)[: int(per_class)]
        for number, index in enumerate(indices):
            path = folder / f"digit_{label}_{number:04d}.png"
            if path.exists():
                continue
            grey = np.round(digits.images[index] * (255 / 16)).astype(np.uint8)
            image = Image.fromarray(grey, mode="L").resize((pixels, pixels), Image.BILINEAR)
            with files.atomic_path(path, durable=False) as partial:  # rewritten if lost
                image.convert("RGB").save(partial, format="PNG")
    return root


def default_out(cache_dir: str | os.PathLike | None, per_class: int) -> Path:
    """Where the demo writes its dataset by default: under the cache directory."""
    return cache_mod.resolve_cache_dir(cache_dir) / "demo" / f"digits-{per_class}"


def run_demo(
    out: str | os.PathLike | None = None,
    *,
    per_class: int = DEMO_PER_CLASS,
    backbones: str | Iterable[str] | None = None,
    heads: str | Iterable[str] | None = None,
    image_size: int = DEMO_IMAGE_SIZE,
    weights: str | os.PathLike | None = "auto",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    head_params: dict | None = None,
    progress: ProgressCallback | None = None,
) -> Comparison:
    """Write the digits dataset, extract, fit both heads on every backbone and compare.

    `weights="auto"` tries the ImageNet weights of the first backbone once and falls back
    to random weights when they can not be loaded, saying so with an `OfflineWeights` event
    (probe.progress; `DemoDataset` names the digits' folder). Any other
    value ("imagenet", "none", a weights file) is used as given.

    >>> table = probe.run_demo(per_class=20)
    >>> print(table.table())
    """
    names = settings.parse_names(backbones, DEMO_BACKBONES)
    root = write_digits(out if out is not None else default_out(cache_dir, per_class), per_class)
    emit(progress, DemoDataset(path=root, classes=10, per_class=per_class))
    if str(weights).lower() == "auto":
        weights = "imagenet" if names and imagenet_available(names[0], image_size) else "none"
        if weights == "none":
            emit(progress, OfflineWeights(message=OFFLINE_NOTE))
    return compare(root, names, heads, weights=weights, image_size=image_size, seed=seed,
                   cache_dir=cache_dir, head_params=head_params, progress=progress)


def imagenet_available(backbone: str, image_size: int | None = None) -> bool:
    """Whether the ImageNet weights of `backbone` can be loaded (from Keras' cache, or
    downloaded once). Offline, the download fails within a second or two."""
    try:
        # Keras prints "Downloading data from ..." (which build() sends to stderr)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            backbones_mod.get(backbone).build(weights="imagenet", image_size=image_size)
    except WeightsError:
        return False
    return True
