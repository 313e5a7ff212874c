"""The accuracy cost of bfloat16 features: logistic and k-NN test accuracy on features
extracted in float32 and in bf16, the same images, split and weights, per backbone.

Data: scikit-learn's digits (1,797 handwritten 8x8 digits, 10 classes), upscaled
(nearest neighbour) to `--image-size` (default: each backbone's minimum size), grey as RGB,
fed as arrays through probe's frozen backbone (`build_model`: BatchNormalizations folded,
average pooling); one seeded stratified 70/15/15 split for both precisions. Weights:
random with a fixed seed (ImageNet weights are not downloaded here), the same for both
precisions, so the figures measure how bf16 rounding moves a linear probe's and a k-NN's
accuracy on the features of one network, not ImageNet quality.

bf16 runs through what `--precision bf16` resolves to (`probe.device.resolve`: OpenVINO's
bf16 hint or Keras' mixed_bfloat16 on TensorFlow) where the CPU or GPU computes bfloat16.
Elsewhere probe refuses bf16, and the script runs Keras' mixed_bfloat16 on TensorFlow
directly, which TensorFlow emulates: the same rounding of weights and activations to
bfloat16, slowly. The `bf16_path` line says which ran.

One `<scope> <figure> <value>` line per figure; `<backbone> logreg_diff_points` and
`knn_diff_points` are bf16 accuracy minus float32 accuracy in percentage points
(goal: within 0.5 point).

    PYTHONPATH=. python benchmarks/bf16_accuracy.py
    PYTHONPATH=. python benchmarks/bf16_accuracy.py --backbones resnet50 --n 300 --image-size 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import probe  # noqa: E402
from probe import device  # noqa: E402
from probe.heads import KNNHead, LogisticHead  # noqa: E402

DEFAULT_BACKBONES = "resnet50,densenet121,vgg16,inceptionv3"


def emit(scope: str, figure: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4g}"
    print(f"{scope} {figure} {value}", flush=True)


def digits_images(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` digits as (n, size, size, 3) RGB pixels 0-255 (nearest-neighbour
    upscaling of the 8x8 grey images) and their labels."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    grey = (X[:n].reshape(-1, 8, 8) * (255 / 16)).astype(np.float32)
    index = np.arange(size) * 8 // size  # the source pixel of each output pixel
    pixels = grey[:, index][:, :, index]
    return np.repeat(pixels[..., None], 3, axis=-1), y[:n]


def split(y: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded stratified 70/15/15 train/val/test indices."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(y.size)
    train, rest = train_test_split(indices, test_size=0.3, stratify=y, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    return {"train": train, "val": val, "test": test}


def bf16_path(backbone: str) -> tuple[str, str]:
    """The runtime bf16 runs on here and the path, in words: what `--precision bf16`
    resolves to where the CPU or GPU computes bfloat16, else Keras' mixed_bfloat16 on
    TensorFlow directly (emulated)."""
    reason = device.bf16_support()
    if reason is None:
        runtime = device.resolve("auto", "bf16", backbone)
        what = ("OpenVINO INFERENCE_PRECISION_HINT=bf16" if runtime == "openvino"
                else "TensorFlow mixed_bfloat16")
        return runtime, f"--precision bf16 resolves to {what} (native bfloat16)"
    return "tensorflow", ("TensorFlow mixed_bfloat16 run directly, emulated (--precision bf16 "
                          "is refused on this CPU: no bfloat16 instructions)")


def features_of(spec, size: int, precision: str, runtime: str, inputs: np.ndarray,
                batch_size: int) -> np.ndarray:
    """The pooled features of preprocessed `inputs` from probe's frozen backbone (random
    weights, seed 0: the same weights for every precision) on `runtime`."""
    from probe.features import fold
    from probe.features.engines.local import build_model

    if runtime == "openvino":
        from probe.features import runtime as ov

        os.environ[fold.FOLD_ENV] = "0"  # OpenVINO converts the unfolded float32 model
        try:
            keras_model = build_model(spec, "none", size, "avg", 0, "float32")
        finally:
            del os.environ[fold.FOLD_ENV]
        model = ov.OpenVINOBackbone(ov.compile_for_cpu(ov.convert(keras_model, size), precision))
    else:
        model = build_model(spec, "none", size, "avg", 0, precision)
    out = [np.asarray(model.predict_on_batch(inputs[i:i + batch_size]), dtype=np.float32)
           for i in range(0, len(inputs), batch_size)]
    return np.concatenate(out).reshape(len(inputs), -1)


def test_predictions(F: np.ndarray, y: np.ndarray, parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Test predictions of the logistic head (C chosen on val) and of the k-NN head (k and
    T chosen on val), both fitted on train."""
    train, val, test = parts["train"], parts["val"], parts["test"]
    result = {}
    for name, head in (("logreg", LogisticHead()), ("knn", KNNHead())):
        head.fit(F[train], y[train], X_val=F[val], y_val=y[val])
        result[name] = head.predict(F[test])
    return result


def measure(backbone: str, n: int, size: int, batch_size: int) -> dict[str, float]:
    """Extract float32 and bf16 features of the digits, fit both heads on each; the
    differences in points."""
    spec = probe.get_backbone(backbone)
    pixels, y = digits_images(n, size)
    inputs = spec.preprocess_input(pixels)
    parts = split(y)
    runtime, path = bf16_path(backbone)
    emit(backbone, "bf16_path", path)
    emit(backbone, "test_images", len(parts["test"]))  # one image: 100 / this points
    features, scores, predictions = {}, {}, {}
    for precision, chosen in (("float32", "tensorflow"), ("bf16", runtime)):
        started = time.perf_counter()
        features[precision] = features_of(spec, size, precision, chosen, inputs, batch_size)
        emit(backbone, f"extract_{precision}_s", time.perf_counter() - started)
        predictions[precision] = test_predictions(features[precision], y, parts)
        scores[precision] = {head: float(np.mean(p == y[parts["test"]]))
                             for head, p in predictions[precision].items()}
        for head, accuracy in scores[precision].items():
            emit(backbone, f"{head}_accuracy_{precision}", accuracy)
    a, b = features["float32"].astype(np.float64), features["bf16"].astype(np.float64)
    emit(backbone, "bf16_max_rel_diff", f"{np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30):.2e}")
    differences = {}
    for head in ("logreg", "knn"):
        differences[head] = 100 * (scores["bf16"][head] - scores["float32"][head])
        emit(backbone, f"{head}_diff_points", differences[head])
        # the share of test images both precisions' heads predict alike
        emit(backbone, f"{head}_same_predictions",
             float(np.mean(predictions["bf16"][head] == predictions["float32"][head])))
    return differences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=DEFAULT_BACKBONES)
    parser.add_argument("--n", type=int, default=1797, help="digits used (at most 1,797)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size [default: each backbone's minimum size]")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    from probe.device import cpu_name

    emit("machine", "cpu", f"{cpu_name()}, {os.cpu_count()} cores")
    emit("machine", "bf16", "native" if device.bf16_support() is None
         else f"emulated ({device.bf16_support()})")
    emit("setting", "command", " ".join(["bf16_accuracy.py"] + (argv if argv is not None else sys.argv[1:])))
    emit("setting", "weights", "random (seed 0): ImageNet weights are not downloaded")
    started, worst = time.perf_counter(), 0.0
    for backbone in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        spec = probe.get_backbone(backbone)
        size = args.image_size or spec.min_size
        emit(backbone, "image_size", size)
        differences = measure(backbone, min(args.n, 1797), size, args.batch_size)
        worst = max(worst, *(abs(d) for d in differences.values()))
    emit("all", "largest_abs_diff_points", worst)
    emit("total", "seconds", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
