"""Cached augmented views against no augmentation and against the Keras-guide recipe, on
scikit-learn's digits with few training images per class.

Data: the 8x8 digits, upscaled (bilinear) to `--image-size` px RGB PNGs in a temporary
folder. Per seed and shot count: `shots` training images per class, 5 validation images per
class (clean), and `--test-per-class` test images per class, each shifted by a random
offset of up to 10% of the image in x and y (zero fill, the digits' background) and
flipped horizontally with probability 0.5; train, val and test are disjoint and drawn by
the seed. Backbone: vgg16 at `--image-size` px with seeded random weights (`--weights
none`: ImageNet weights can not be downloaded here), which makes features less invariant
than pretrained ones and may make augmentation less useful.

Per seed and shot count, one `probe extract --augment 16` (timed as clean, then +4 views,
then +12 views: raising K extracts only the missing views); then, on the same cache:

* `logreg` / `dense` heads with no views, with the first 4 views, with all 16 views
  (dense: `--epochs`, selection of the epoch on the clean validation split, no refit);
* `dense_sample`: the dense head drawing one view per image per epoch (16 views);
* `recipe`: the Keras transfer-learning guide's recipe: frozen backbone (the same random
  weights) after augmentation layers (RandomFlip horizontal, RandomRotation 10 degrees,
  RandomZoom up to 30%, RandomContrast 0.2) and the dense head's layers, trained for the same
  epochs with the same optimiser, batch size and epoch selection.

Every figure is one line, `<scope> <figure> <value>`: accuracies as mean and standard
deviation over the seeds, times in seconds (mean over the seeds) and ratios measured in the
same run.

    PYTHONPATH=. python benchmarks/views.py
    PYTHONPATH=. python benchmarks/views.py --seeds 1 --shots 5 --epochs 3 --test-per-class 10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import probe  # noqa: E402
from probe import data  # noqa: E402
from probe.features.engines.local import build_model  # noqa: E402
from probe.inference import preprocessing_layer  # noqa: E402

VAL_PER_CLASS = 5
BACKBONE = "vgg16"


def write_dataset(root: Path, shots: int, test_per_class: int, size: int, seed: int) -> None:
    """train/val/test folders of upscaled digits; test images shifted and flipped."""
    from PIL import Image
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(y == label))
        groups = {"train": indices[:shots], "val": indices[shots:shots + VAL_PER_CLASS],
                  "test": indices[shots + VAL_PER_CLASS:shots + VAL_PER_CLASS + test_per_class]}
        for split, chosen in groups.items():
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                pixels = (X[index].reshape(8, 8) * (255 / 16)).astype(np.uint8)
                image = np.asarray(Image.fromarray(pixels).resize((size, size),
                                                                  Image.Resampling.BILINEAR))
                if split == "test":
                    image = shift_and_flip(image, rng)
                Image.fromarray(image).convert("RGB").save(folder / f"{index}.png")


def shift_and_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    limit = max(1, image.shape[0] // 10)
    dy, dx = (int(v) for v in rng.integers(-limit, limit + 1, 2))
    shifted = np.zeros_like(image)
    height, width = image.shape
    shifted[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        image[max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
    return shifted[:, ::-1] if rng.uniform() < 0.5 else shifted


def extract_timed(root: Path, cache_dir: Path, size: int, seed: int) -> tuple:
    """The cache with 16 views, and the seconds of: clean, +4 views, +12 views."""
    seconds = []
    for augment in (0, 4, 16):
        started = time.perf_counter()
        cache, report = probe.extract_with_report(
            root, BACKBONE, weights="none", image_size=size, seed=seed, cache_dir=cache_dir,
            augment=augment, batch_size=64)
        seconds.append(time.perf_counter() - started)
        assert report.views_extracted == {0: 0, 4: 4, 16: 12}[augment] * cache.counts["train"]
    return cache, seconds


def head_accuracies(cache, epochs: int, seed: int) -> dict[str, tuple[float, float]]:
    """(test accuracy, fit seconds) of each head and view setting."""
    train, val, test = cache.split("train"), cache.split("val"), cache.split("test")
    views = cache.views("train")
    settings = {
        "logreg_none": ("logreg", None, {}), "logreg_k4": ("logreg", views[:, :4], {}),
        "logreg_k16": ("logreg", views, {}),
        "dense_none": ("dense", None, {}), "dense_k4": ("dense", views[:, :4], {}),
        "dense_k16": ("dense", views, {}),
        "dense_sample_k16": ("dense", views, {"view_sampling": "sample"}),
    }
    results = {}
    for name, (head, chosen, params) in settings.items():
        if head == "dense":
            params = {"epochs": epochs, "patience": epochs, **params}
        model = probe.make_head(head, seed=seed, refit=False, **params)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(train.features, train.labels, val.features, val.labels,
                      classes=cache.classes, views=chosen)
        seconds = time.perf_counter() - started
        results[name] = (model.score(test.features, test.labels), seconds)
    return results


def keras_recipe(cache, root: Path, size: int, epochs: int, seed: int) -> tuple[float, float]:
    """The Keras guide's recipe on the same images: (test accuracy, training seconds)."""
    from probe._keras import keras

    spec = probe.get_backbone(BACKBONE)
    images = {split: (np.stack([data.load_image(root / p, size) for p in cache.paths(split)])
                      .astype(np.float32), cache.labels(split)) for split in cache.splits}
    train_features = cache.features("train")
    keras.utils.set_random_seed(seed)
    backbone = build_model(spec, "none", size, "avg", int(cache.attrs["weights_seed"]))
    backbone.trainable = False
    inputs = keras.Input((size, size, 3))
    x = keras.layers.RandomFlip("horizontal")(inputs)
    x = keras.layers.RandomRotation(10 / 360, fill_mode="constant")(x)
    x = keras.layers.RandomZoom((-0.3, 0.0), fill_mode="constant")(x)
    x = keras.layers.RandomContrast(0.2)(x)
    x = preprocessing_layer(spec.preprocessing)(x)  # what `probe export` puts in front
    x = backbone(x, training=False)
    variance = np.maximum(train_features.var(axis=0), 0.1 * train_features.var(axis=0).mean() + 1e-12)
    x = keras.layers.Normalization(mean=train_features.mean(axis=0), variance=variance)(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    x = keras.layers.Dropout(0.5)(x)
    outputs = keras.layers.Dense(len(cache.classes), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=epochs,
                                         restore_best_weights=True)
    started = time.perf_counter()
    model.fit(*images["train"], validation_data=images["val"], epochs=epochs, batch_size=32,
              callbacks=[stop], verbose=0)
    seconds = time.perf_counter() - started
    proba = model.predict(images["test"][0], batch_size=64, verbose=0)
    return float(np.mean(proba.argmax(axis=1) == images["test"][1])), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--shots", default="5,20")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--test-per-class", type=int, default=30)
    args = parser.parse_args()
    for shots in (int(s) for s in args.shots.split(",")):
        figures: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as work:
                root = Path(work) / "digits"
                write_dataset(root, shots, args.test_per_class, args.image_size, seed)
                cache, seconds = extract_timed(root, Path(work) / "cache", args.image_size, seed)
                for name, value in zip(("extract_clean_s", "extract_views4_s",
                                        "extract_views4to16_s"), seconds):
                    figures.setdefault(name, []).append(value)
                for name, (accuracy, fit) in head_accuracies(cache, args.epochs, seed).items():
                    figures.setdefault(f"{name}_accuracy", []).append(accuracy)
                    figures.setdefault(f"{name}_fit_s", []).append(fit)
                accuracy, fit = keras_recipe(cache, root, args.image_size, args.epochs, seed)
                figures.setdefault("recipe_accuracy", []).append(accuracy)
                figures.setdefault("recipe_fit_s", []).append(fit)
            print(f"# shots {shots} seed {seed}: " + ", ".join(  # progress, on stderr
                f"{name} {values[-1]:.3f}" for name, values in figures.items()),
                file=sys.stderr, flush=True)
        report(f"shots{shots}", figures, args.seeds)


def report(scope: str, figures: dict[str, list[float]], seeds: int) -> None:
    for name, values in figures.items():
        values = np.asarray(values)
        if name.endswith("_accuracy"):
            print(f"{scope} {name} {values.mean():.3f} ± {values.std():.3f} ({seeds} seeds)")
        else:
            print(f"{scope} {name} {values.mean():.2f}")
    mean = {name: float(np.mean(values)) for name, values in figures.items()}
    print(f"{scope} cached_dense_k16_total_over_recipe "
          f"{(mean['extract_views4_s'] + mean['extract_views4to16_s'] + mean['dense_k16_fit_s']) / mean['recipe_fit_s']:.2f}")
    print(f"{scope} views16_extract_over_clean_extract "
          f"{(mean['extract_views4_s'] + mean['extract_views4to16_s']) / mean['extract_clean_s']:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
