"""The backbone registry: one frozen `BackboneSpec` per name knows everything about a
backbone (its Keras constructor, its own `preprocess_input`, input sizes, feature size and
where its top blocks start). Keras is imported lazily so `probe --help` stays instant."""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BackboneError, WeightsError

if TYPE_CHECKING:
    import keras
    import numpy as np

POOLINGS = ("avg", "max", "none")


@dataclass(frozen=True)
class BackboneSpec:
    """Everything probe needs to know about one Keras application backbone."""

    name: str
    constructor: str  # attribute of keras.applications, e.g. "VGG16"
    module: str  # submodule of keras.applications holding preprocess_input
    preprocessing: str  # Keras' preprocess_input mode: "caffe", "torch" or "tf"
    native_size: int
    min_size: int
    feature_size: int  # channels of the last feature map = pooled feature length
    top_blocks: tuple[str, ...]  # layer-name prefixes of the top blocks, lowest first

    def preprocess_input(self, images: "np.ndarray") -> "np.ndarray":
        """The backbone's own Keras `preprocess_input` on RGB pixels in 0..255."""
        keras = _keras()
        module = getattr(keras.applications, self.module)
        return module.preprocess_input(images.astype("float32", copy=True))

    def check_image_size(self, image_size: int | None) -> int:
        """Return the input size to use; raise if it is below the backbone's minimum."""
        size = self.native_size if image_size is None else int(image_size)
        if size < self.min_size:
            raise BackboneError(
                f"{self.name} needs an image size of at least {self.min_size} pixels; "
                f"use --image-size {self.min_size} or more (native: {self.native_size}). "
                f"Received: image_size={size}"
            )
        return size

    def feature_shape(self, image_size: int | None = None, pooling: str = "avg") -> tuple[int, ...]:
        """Shape of one image's features: (D,) when pooled, (h, w, D) for pooling='none'."""
        check_pooling(pooling)
        if pooling != "none":
            return (self.feature_size,)
        size = self.check_image_size(image_size)
        model = self.build(weights="none", image_size=size, pooling="none")
        return tuple(int(d) for d in model.output_shape[1:])

    def build(
        self,
        weights: str | os.PathLike | None = "imagenet",
        image_size: int | None = None,
        pooling: str = "avg",
        seed: int = 0,
    ) -> "keras.Model":
        """The headless Keras model, frozen, with the given weights.

        `weights` is "imagenet" (downloaded once into Keras' cache under ~/.keras/models),
        "none" for a seeded random initialisation, or the path of a local weights file.
        """
        keras = _keras()
        size = self.check_image_size(image_size)
        check_pooling(pooling)
        kind, path = parse_weights(weights)
        constructor = getattr(keras.applications, self.constructor)
        kwargs: dict[str, Any] = dict(
            include_top=False,
            input_shape=(size, size, 3),
            pooling=None if pooling == "none" else pooling,
        )
        if kind == "none":
            keras.utils.set_random_seed(seed)
        try:
            model = constructor(weights="imagenet" if kind == "imagenet" else None, **kwargs)
        except Exception as error:  # Keras raises plain Exception on a failed download
            if kind != "imagenet":
                raise
            raise WeightsError(
                f"could not load the ImageNet weights of {self.name} ({error}). "
                "Keras downloads them once into ~/.keras/models; without a connection use "
                "--weights imagenet on a machine that has them cached, --weights PATH for a "
                "local weights file (include_top=False), or --weights none for random "
                "initialisation. Received: weights='imagenet'"
            ) from None
        if kind == "file":
            try:
                model.load_weights(str(path))
            except Exception as error:
                raise WeightsError(
                    f"could not load the weights file {path} into {self.name} "
                    f"(include_top=False): {error}. Use a {self.name} 'notop' weights file, "
                    f"--weights imagenet or --weights none. Received: weights='{path}'"
                ) from None
        model.trainable = False
        return model


def parse_weights(weights: str | os.PathLike | None) -> tuple[str, Path | None]:
    """Split a weights argument into ("imagenet" | "none" | "file", path)."""
    if weights is None or str(weights).lower() == "none":
        return "none", None
    if str(weights).lower() == "imagenet":
        return "imagenet", None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"expected 'imagenet', 'none' or the path of an existing weights file; "
            f"no such file. Received: weights='{weights}'"
        )
    return "file", path.resolve()


def weights_identity(weights: str | os.PathLike | None, seed: int = 0) -> str:
    """A string that identifies the weights, recorded in the cache: a different string
    means different features."""
    kind, path = parse_weights(weights)
    if kind == "imagenet":
        return "imagenet"
    if kind == "none":
        return f"random(seed={seed})"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"file:{path.name}:sha256={digest.hexdigest()[:16]}"


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise BackboneError(
            f"expected pooling to be one of {', '.join(POOLINGS)}. Received: pooling='{pooling}'"
        )
    return pooling


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (names are lower case)."""
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> BackboneSpec:
    """The spec of a registered backbone; a clear error for an unknown name."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise BackboneError(
            f"unknown backbone; expected one of: {', '.join(list_backbones())}. "
            f"Received: backbone='{name}'"
        )
    return _REGISTRY[key]


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_REGISTRY)


def _keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return importlib.import_module("keras")


register(BackboneSpec(
    name="vgg16", constructor="VGG16", module="vgg16", preprocessing="caffe",
    native_size=224, min_size=32, feature_size=512,
    top_blocks=("block1_", "block2_", "block3_", "block4_", "block5_"),
))
register(BackboneSpec(
    name="resnet50", constructor="ResNet50", module="resnet50", preprocessing="caffe",
    native_size=224, min_size=32, feature_size=2048,
    top_blocks=("conv2_", "conv3_", "conv4_", "conv5_"),
))
register(BackboneSpec(
    name="densenet121", constructor="DenseNet121", module="densenet", preprocessing="torch",
    native_size=224, min_size=32, feature_size=1024,
    top_blocks=("conv2_", "conv3_", "conv4_", "conv5_"),
))
register(BackboneSpec(
    name="xception", constructor="Xception", module="xception", preprocessing="tf",
    native_size=299, min_size=71, feature_size=2048,
    top_blocks=tuple(f"block{i}_" for i in range(1, 15)),
))
register(BackboneSpec(
    name="inceptionv3", constructor="InceptionV3", module="inception_v3", preprocessing="tf",
    native_size=299, min_size=75, feature_size=2048,
    top_blocks=tuple(f"mixed{i}" for i in range(11)),
))
