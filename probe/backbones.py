"""The backbone registry: one frozen `BackboneSpec` per name knows everything about a
backbone (its Keras constructor, its own `preprocess_input`, input sizes, feature size and
where its top blocks start). Keras is imported lazily so `probe --help` stays instant."""

from __future__ import annotations

import contextlib
import functools
import numbers
import os
import random
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .errors import BackboneError, WeightsError

if TYPE_CHECKING:
    import keras
    import numpy as np

POOLINGS = ("avg", "max", "none")
# the tokens of a transformer (a KerasHub preset, `probe.hub_backbones`)
TOKEN_POOLINGS = ("cls", "mean", "cls+mean")
# The largest input size probe accepts: the pixels of one 32-image batch at this size take
# 400 MB, and the backbones' activations many times more.
MAX_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class Preprocessing:
    """Keras' `preprocess_input` of one mode as data: on RGB pixels in 0..255, channel c
    of the output is `(x[..., channel_order[c]] / divisor - mean[c]) / std[c]`, in that
    order of float32 operations (the order Keras uses, so the results are identical)."""

    mode: str
    channel_order: tuple[int, int, int]
    divisor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def apply(self, images: "np.ndarray") -> "np.ndarray":
        """The preprocessed float32 copy of RGB `images` (..., 3)."""
        import numpy as np

        x = np.asarray(images, dtype=np.float32)[..., list(self.channel_order)]
        if self.divisor != 1:
            x /= np.float32(self.divisor)
        x -= np.asarray(self.mean, dtype=np.float32)
        if self.std != (1.0, 1.0, 1.0):
            x /= np.asarray(self.std, dtype=np.float32)
        return x

    def affine(self) -> tuple["np.ndarray", "np.ndarray"]:
        """Kernel (3, 3) and bias (3,) of the same map as one affine map, out[c] =
        sum_k x[k] * kernel[k, c] + bias[c] (the export's frozen 1x1 convolution)."""
        import numpy as np

        kernel = np.zeros((3, 3))
        for c, k in enumerate(self.channel_order):
            kernel[k, c] = 1.0 / (self.divisor * self.std[c])
        bias = -np.asarray(self.mean) / np.asarray(self.std)
        return kernel.astype(np.float32), bias.astype(np.float32)


PREPROCESSING = {
    # RGB -> BGR, then subtract the ImageNet means (BGR order)
    "caffe": Preprocessing("caffe", (2, 1, 0), 1.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0)),
    # to [-1, 1]
    "tf": Preprocessing("tf", (0, 1, 2), 127.5, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
    # to [0, 1], then standardise with the ImageNet mean and std
    "torch": Preprocessing("torch", (0, 1, 2), 255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # pixels in 0..255 as they are: the model preprocesses them itself (EfficientNet,
    # EfficientNetV2, ConvNeXt and MobileNetV3 begin with Rescaling / Normalization layers,
    # and their `preprocess_input` passes the pixels through); the export's affine map is
    # the identity
    "none": Preprocessing("none", (0, 1, 2), 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


@dataclass(frozen=True)
class BackboneSpec:
    """Everything probe needs to know about one Keras application backbone."""

    name: str
    constructor: str  # attribute of keras.applications, e.g. "VGG16"
    module: str  # submodule of keras.applications holding preprocess_input
    # Keras' preprocess_input mode: "caffe", "torch", "tf", or "none" where the model
    # preprocesses the pixels itself
    preprocessing: str
    native_size: int
    min_size: int
    feature_size: int  # channels of the last feature map = pooled feature length
    # The blocks that fine-tuning can unfreeze, lowest first, each named by a marker: a
    # layer belongs to the block when its name is the marker or starts with marker + "_".
    # Layers Keras names automatically (add_3, conv2d_7, ...) get their block from the
    # graph, see `block_layers`.
    top_blocks: tuple[str, ...]
    # (pattern, replacement) applied with `re.sub` to a layer name before it is matched
    # against the markers, where Keras spells a block in several ways: EfficientNet's
    # block2a_..., block2b_... are block2; MobileNet's conv_dw_5_... and conv_pw_5_... are
    # block5; ConvNeXt's convnext_tiny_stage_1_... is stage_1.
    block_names: tuple[str, str] | None = None
    # The file Keras caches the ImageNet "notop" weights in (~/.keras/models/<file>), where
    # it is not <name>_weights_tf_dim_ordering_tf_kernels_notop.h5
    imagenet_file: str = ""

    @property
    def imagenet_weights_file(self) -> str:
        """The name of the file Keras caches this backbone's ImageNet notop weights in."""
        return self.imagenet_file or f"{self.name}_weights_tf_dim_ordering_tf_kernels_notop.h5"

    @property
    def normalization(self) -> Preprocessing:
        """The backbone's `preprocess_input` as data (see `Preprocessing`)."""
        return PREPROCESSING[self.preprocessing]

    @property
    def preprocessed_in(self) -> str:
        """Where the pixels are preprocessed: "input" (probe applies `preprocess_input`
        before the model) or "model" (the model's own first layers do it)."""
        return "model" if self.preprocessing == "none" else "input"

    def preprocess_input(self, images: "np.ndarray") -> "np.ndarray":
        """The backbone's own Keras `preprocess_input` on RGB pixels in 0..255 (the same
        float32 operations, without importing Keras)."""
        return self.normalization.apply(images)

    def check_image_size(self, image_size: int | None) -> int:
        """Return the input size to use; raise if it is below the backbone's minimum or
        above MAX_IMAGE_SIZE."""
        size = self.native_size if image_size is None else image_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise BackboneError(f"expected an image size in pixels (an integer). "
                                f"Received: image_size={image_size!r}")
        size = int(size)
        if size > MAX_IMAGE_SIZE:
            raise BackboneError(
                f"{self.name} takes images of at most {MAX_IMAGE_SIZE} pixels in probe; use "
                f"--image-size {MAX_IMAGE_SIZE} or less (native: {self.native_size}). "
                f"Received: image_size={size}"
            )
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
        with _stateless_scope(_keras()):  # no weights needed: none are created or drawn
            model = self.build(weights="none", image_size=size, pooling="none", seed=None)
        return tuple(int(d) for d in model.output_shape[1:])

    def build(
        self,
        weights: str | os.PathLike | None = "imagenet",
        image_size: int | None = None,
        pooling: str = "avg",
        seed: int | None = 0,
    ) -> "keras.Model":
        """The headless Keras model, frozen, with the given weights.

        `weights` is "imagenet" (downloaded once into Keras' cache under ~/.keras/models),
        "none" for a random initialisation drawn from `seed` (None: fresh entropy), or the
        path of a local weights file. The caller's random state is left as it was.
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
        # Keras prints its download progress on stdout, which holds probe's results.
        quiet = contextlib.redirect_stdout(sys.stderr) if kind == "imagenet" \
            else contextlib.nullcontext()
        try:
            with seeded(seed), quiet:
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
                _load_weights_file(model, path)
            except Exception as error:
                reason = " ".join(str(error).split())
                reason = reason if len(reason) <= 200 else reason[:200] + " ..."
                raise WeightsError(
                    f"could not load the weights file {path} into {self.name} "
                    f"(include_top=False): {reason.rstrip('.')}. Use a {self.name} 'notop' "
                    "weights file (one written by Keras 3 `save_weights` is named "
                    "*.weights.h5), --weights imagenet or --weights none. "
                    f"Received: weights='{path}'"
                ) from None
        model.trainable = False
        return model

    @contextlib.contextmanager
    def build_for_reading(
        self,
        weights: str | os.PathLike | None = "imagenet",
        image_size: int | None = None,
        pooling: str = "avg",
        seed: int | None = 0,
    ) -> Iterator["keras.Model"]:
        """The model `build` makes, with the same weights, for reading its layers and
        weights (`layer.get_weights()`) inside this context, not for calling it.

        Its variables hold no backend variable: it is built in a `keras.StatelessScope`
        that keeps their values (loaded from the weights, or drawn by their initialisers
        as `build` draws them). Creating and tracking TensorFlow's variables is about half
        the time `build` takes, so this takes about half of it (ResNet50: 0.8 s against
        1.5 s on two cores; DenseNet121: 1.4 s against 2.7 s). Outside the context the
        model has no weights.
        """
        keras = _keras()
        with _stateless_scope(keras) as scope:
            model = self.build(weights=weights, image_size=image_size, pooling=pooling,
                               seed=seed)
            for variable in model.weights:
                if scope.get_current_value(variable) is None:  # not loaded from a file
                    scope.add_update((variable, variable.value))  # drawn once, here
            yield model

    def block_layers(self, model: "keras.Model") -> list[list["keras.Layer"]]:
        """The layers of each top block of `model` (built by `build`), lowest block first.

        The model is cut into segments at the layers every later layer depends on (a block's
        output, e.g. `block5_pool`, `conv4_block6_out`, `mixed7` or Xception's residual
        `add`). A segment belongs to the block that its last layer names, else to the one
        block its other layers name; a segment naming none (VGG's and ResNet's global
        pooling, DenseNet's transition `pool4_*` and its final `bn` / `relu`) joins the
        block before it. Segments before the first block (the stem: `conv1_*`, `pool1_*`,
        InceptionV3's first convolutions) belong to no block and always stay frozen.
        """
        layers = [layer for layer in model.layers if not _is_input_layer(layer)]
        position = {id(layer): i for i, layer in enumerate(layers)}
        inbound = _inbound_positions(model, position)
        # position i is a cut when no layer after it reads a layer before it
        cuts, lowest = [], len(layers)
        for i in range(len(layers) - 1, -1, -1):
            if lowest >= i:
                cuts.append(i)
            lowest = min([lowest, *inbound.get(i, ())])
        cuts.reverse()
        blocks: list[list] = [[] for _ in self.top_blocks]
        current, start = -1, 0
        for end in cuts:
            segment = layers[start:end + 1]
            start = end + 1
            found = self._block_of(segment[-1].name)
            if found is None:
                named = {self._block_of(layer.name) for layer in segment} - {None}
                if len(named) > 1:
                    raise BackboneError(
                        f"{self.name}: layers {[layer.name for layer in segment]} mix the blocks "
                        f"{sorted(self.top_blocks[i] for i in named)}; the registry's top_blocks "
                        f"do not fit this model. Received: top_blocks={self.top_blocks}"
                    )
                found = named.pop() if named else None
            if found is not None and found < current:
                raise BackboneError(
                    f"{self.name}: block {self.top_blocks[found]} comes after "
                    f"{self.top_blocks[current]} in the model; the registry's top_blocks do not "
                    f"fit this model. Received: top_blocks={self.top_blocks}"
                )
            current = current if found is None else found
            if current >= 0:
                blocks[current].extend(segment)
        empty = [self.top_blocks[i] for i, block in enumerate(blocks) if not block]
        if empty:
            raise BackboneError(
                f"{self.name}: no layers found for the blocks {empty}; the registry's top_blocks "
                f"do not fit this model. Received: top_blocks={self.top_blocks}"
            )
        return blocks

    def _block_of(self, layer_name: str) -> int | None:
        """The index of the marker naming the layer; the longest marker wins, so that
        MobileNetV3's expanded_conv_1_expand is in expanded_conv_1, not expanded_conv."""
        if self.block_names is not None:
            layer_name = _renamer(self.block_names)(layer_name)
        found, length = None, -1
        for index, marker in enumerate(self.top_blocks):
            if (layer_name == marker or layer_name.startswith(marker + "_")) \
                    and len(marker) > length:
                found, length = index, len(marker)
        return found

    def check_unfreeze(self, n: int) -> int:
        """`n` if it is a number of top blocks this backbone has, else a clear error."""
        count = len(self.top_blocks)
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= count:
            zero = (" (0 would train nothing: `probe fit` trains the head alone)"
                    if n == 0 else "")
            raise BackboneError(
                f"{self.name} has {count} blocks that can be unfrozen ({self.top_blocks[0]} ... "
                f"{self.top_blocks[-1]}; 1 = {self.top_blocks[-1]}); expected unfreeze between 1 "
                f"and {count}{zero}. Received: unfreeze={n!r}"
            )
        return int(n)

    def unfreeze(self, model: "keras.Model", n: int) -> list[str]:
        """Make the last `n` top blocks of `model` trainable, everything below frozen.

        BatchNormalization layers stay frozen everywhere, also inside the unfrozen blocks:
        a frozen BatchNormalization runs in inference mode in Keras 3, so its moving mean
        and variance (and its scale and offset) are never changed by training. Returns the
        names of the unfrozen blocks, lowest first.
        """
        keras = _keras()
        self.check_unfreeze(n)
        count = len(self.top_blocks)
        blocks = self.block_layers(model)
        model.trainable = True  # in Keras 3 this sets every layer; then freeze per layer
        for layer in model.layers:
            layer.trainable = False
        for block in blocks[count - n:]:
            for layer in block:
                if not isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = True
        return list(self.top_blocks[count - n:])


def train_only(model: "keras.Model", layers: list) -> None:
    """Make the weights of `layers` (sublayers of `model`, at any depth) the only trainable
    weights of `model`; BatchNormalization layers stay frozen everywhere (a frozen one runs
    in inference mode and keeps its statistics, scale and offset).

    Per weight, not per layer: a KerasHub backbone holds its transformer blocks inside
    layers of its own (DINOv2's encoder), and Keras' `trainable` on a layer sets every
    sublayer, so only the weights' own flags can train a block inside a frozen container."""
    keras = _keras()
    model.trainable = True  # every container on the way to a chosen layer stays trainable
    norms = [layer for layer in model._flatten_layers(include_self=False)
             if isinstance(layer, keras.layers.BatchNormalization)]
    frozen = {id(weight) for layer in norms for weight in layer.weights}
    chosen = {id(weight) for layer in layers for weight in layer.trainable_weights} - frozen
    for weight in model.weights:
        weight.trainable = id(weight) in chosen
    for layer in norms:
        layer.trainable = False


@functools.lru_cache(maxsize=None)
def _renamer(block_names: tuple[str, str]):
    """`re.sub` of one compiled (pattern, replacement) pair, on one name."""
    pattern, replacement = re.compile(block_names[0]), block_names[1]
    return lambda name: pattern.sub(replacement, name, count=1)


def _is_input_layer(layer) -> bool:
    return type(layer).__name__ == "InputLayer"


def _inbound_positions(model, position: dict[int, int]) -> dict[int, list[int]]:
    """For each layer position, the positions of the layers it reads, following the
    model's own graph back from its outputs (a layer also used in another model has nodes
    of that model too, which are not followed)."""
    inbound: dict[int, list[int]] = {}
    seen: set[int] = set()
    stack = list(model.outputs)
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        operation, node_index, _ = tensor._keras_history
        node = operation._inbound_nodes[node_index]
        parents = list(node.input_tensors)
        if id(operation) in position:
            inbound.setdefault(position[id(operation)], []).extend(
                position[id(p._keras_history[0])] for p in parents
                if id(p._keras_history[0]) in position)
        stack.extend(parents)
    return inbound


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Keras layers made inside draw their initial weights from `seed` (None: fresh
    entropy); Python's `random` is put back as it was when the context ends.

    Keras takes each initialiser's and `SeedGenerator`'s seed from Python's global `random`
    when the layer is made (`keras.random.SeedGenerator`), so seeding it alone draws the
    same weights as `keras.utils.set_random_seed(seed)`, without changing the caller's
    random state (NumPy's and TensorFlow's global generators are never touched)."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


@contextlib.contextmanager
def _stateless_scope(keras) -> Iterator[Any]:
    """A `keras.StatelessScope` whose variables stay uninitialised when it ends.

    Keras lists the variables made in such a scope and initialises them all when the next
    initialising stateless scope ends (a training step may open one): that would create
    this model's backend variables after all, and keep the model alive. The list is put
    back as it was."""
    from keras.src.backend.common import global_state

    listed = "uninitialized_variables"  # Keras' name for that list
    before = list(global_state.get_global_attribute(listed, None) or [])
    try:
        with keras.StatelessScope(initialize_variables=False) as scope:
            yield scope
    finally:
        global_state.set_global_attribute(listed, before)


def _load_weights_file(model: "keras.Model", path: Path) -> None:
    """Load a weights file into the model, quietly: Keras warns once per layer that does
    not fit before it fails, and the one-line error says it better."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model.load_weights(str(path))
        except Exception:
            if path.name.endswith(".weights.h5") or path.suffix not in (".h5", ".hdf5"):
                raise
            # Keras reads a plain .h5 name in the legacy layout; a Keras 3 `save_weights`
            # file renamed to .h5 is read correctly under a .weights.h5 name.
            with tempfile.TemporaryDirectory() as directory:
                alias = Path(directory) / "model.weights.h5"
                alias.symlink_to(path)
                try:
                    model.load_weights(str(alias))
                    return
                except Exception:
                    pass
            raise


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


def check_pooling(pooling: str) -> str:
    if pooling in TOKEN_POOLINGS:
        raise BackboneError(
            f"--pooling {pooling} pools the tokens of a transformer (a KerasHub preset, "
            f"--backbone hub:NAME); this backbone outputs feature maps: use avg, max or none. "
            f"Received: pooling='{pooling}'")
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
    from ._keras import keras

    return keras


register(BackboneSpec(
    name="vgg16", constructor="VGG16", module="vgg16", preprocessing="caffe",
    native_size=224, min_size=32, feature_size=512,
    top_blocks=("block1", "block2", "block3", "block4", "block5"),
))
register(BackboneSpec(
    name="resnet50", constructor="ResNet50", module="resnet50", preprocessing="caffe",
    native_size=224, min_size=32, feature_size=2048,
    top_blocks=("conv2", "conv3", "conv4", "conv5"),
))
register(BackboneSpec(
    name="densenet121", constructor="DenseNet121", module="densenet", preprocessing="torch",
    native_size=224, min_size=32, feature_size=1024,
    top_blocks=("conv2", "conv3", "conv4", "conv5"),
))
register(BackboneSpec(
    name="xception", constructor="Xception", module="xception", preprocessing="tf",
    native_size=299, min_size=71, feature_size=2048,
    top_blocks=tuple(f"block{i}" for i in range(1, 15)),
))
register(BackboneSpec(
    name="inceptionv3", constructor="InceptionV3", module="inception_v3", preprocessing="tf",
    native_size=299, min_size=75, feature_size=2048,
    top_blocks=tuple(f"mixed{i}" for i in range(11)),
    imagenet_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
))

# The rest of keras.applications, measured on Keras 3.15: the minimum size is the smallest
# square input each model builds at (include_top=False), the features are the channels of
# its last feature map, the markers its stages by layer name.
_STAGES = ("conv2", "conv3", "conv4", "conv5")
_EFFICIENTNET = (r"^(block\d)[a-z]_", r"\1_")  # block2a_expand_conv -> block2_expand_conv
for _name, _constructor, _features in [("resnet101", "ResNet101", 2048),
                                       ("resnet152", "ResNet152", 2048)]:
    register(BackboneSpec(_name, _constructor, "resnet", "caffe", 224, 32, _features, _STAGES))
for _name, _constructor in [("resnet50v2", "ResNet50V2"), ("resnet101v2", "ResNet101V2"),
                            ("resnet152v2", "ResNet152V2")]:
    # post_bn / post_relu after conv5 go with conv5
    register(BackboneSpec(_name, _constructor, "resnet_v2", "tf", 224, 32, 2048, _STAGES))
for _name, _constructor, _features in [("densenet169", "DenseNet169", 1664),
                                       ("densenet201", "DenseNet201", 1920)]:
    register(BackboneSpec(_name, _constructor, "densenet", "torch", 224, 32, _features, _STAGES))
register(BackboneSpec(
    name="vgg19", constructor="VGG19", module="vgg19", preprocessing="caffe",
    native_size=224, min_size=32, feature_size=512,
    top_blocks=("block1", "block2", "block3", "block4", "block5"),
))
register(BackboneSpec(
    # the layers up to each mixed_* concatenation, the repeated residual units block35_N,
    # block17_N and block8_N by kind, and the final 1x1 convolution conv_7b
    name="inceptionresnetv2", constructor="InceptionResNetV2", module="inception_resnet_v2",
    preprocessing="tf", native_size=299, min_size=75, feature_size=1536,
    top_blocks=("mixed_5b", "block35", "mixed_6a", "block17", "mixed_7a", "block8", "conv_7b"),
    imagenet_file="inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
))
register(BackboneSpec(
    # the 13 depthwise-separable blocks: conv_pad_N, conv_dw_N_*, conv_pw_N_*
    name="mobilenet", constructor="MobileNet", module="mobilenet", preprocessing="tf",
    native_size=224, min_size=32, feature_size=1024,
    top_blocks=tuple(f"block{i}" for i in range(1, 14)),
    block_names=(r"^conv_(?:dw|pw|pad)_(\d+)", r"block\1"),
    imagenet_file="mobilenet_1_0_224_tf_no_top.h5",  # at its native size (Keras: by rows)
))
register(BackboneSpec(
    # the 17 inverted residual blocks; Conv_1 / out_relu go with block_16
    name="mobilenetv2", constructor="MobileNetV2", module="mobilenet_v2", preprocessing="tf",
    native_size=224, min_size=32, feature_size=1280,
    top_blocks=("expanded_conv", *(f"block_{i}" for i in range(1, 17))),
    imagenet_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
))
for _name, _constructor, _features, _count in [("mobilenetv3small", "MobileNetV3Small", 576, 11),
                                               ("mobilenetv3large", "MobileNetV3Large", 960, 15)]:
    register(BackboneSpec(
        _name, _constructor, "mobilenet_v3", "none", 224, 32, _features,
        ("expanded_conv", *(f"expanded_conv_{i}" for i in range(1, _count))),
        imagenet_file=(f"weights_mobilenet_v3_{_name[len('mobilenetv3'):]}"
                       "_224_1.0_float_no_top_v2.h5"),
    ))
for _name, _constructor, _native, _features in [("nasnetmobile", "NASNetMobile", 224, 1056),
                                                ("nasnetlarge", "NASNetLarge", 331, 4032)]:
    # Each NASNet cell reads the two cells before it, so no layer cuts the model between
    # cells: its cells form one block (unfreeze 1 trains all of them, the stem stays frozen).
    # The ImageNet weights have the same shapes at every size from 32 up, and Keras loads
    # them whatever the input size.
    register(BackboneSpec(
        _name, _constructor, "nasnet", "tf", _native, 32, _features, ("cells",),
        block_names=(r"^(?!stem_).*$", "cells"),
        imagenet_file=f"nasnet_{_name[len('nasnet'):]}_no_top.h5",
    ))
for _index, (_native, _features) in enumerate([(224, 1280), (240, 1280), (260, 1408), (300, 1536),
                                              (380, 1792), (456, 2048), (528, 2304), (600, 2560)]):
    register(BackboneSpec(
        f"efficientnetb{_index}", f"EfficientNetB{_index}", "efficientnet", "none", _native, 32,
        _features, tuple(f"block{i}" for i in range(1, 8)), block_names=_EFFICIENTNET,
        imagenet_file=f"efficientnetb{_index}_notop.h5",
    ))
for _suffix, _native, _features, _stages in [("b0", 224, 1280, 6), ("b1", 240, 1280, 6),
                                             ("b2", 260, 1408, 6), ("b3", 300, 1536, 6),
                                             ("s", 384, 1280, 6), ("m", 480, 1280, 7),
                                             ("l", 480, 1280, 7)]:
    register(BackboneSpec(
        f"efficientnetv2{_suffix}", f"EfficientNetV2{_suffix.upper()}", "efficientnet_v2", "none",
        _native, 32, _features, tuple(f"block{i}" for i in range(1, _stages + 1)),
        block_names=_EFFICIENTNET, imagenet_file=f"efficientnetv2-{_suffix}_notop.h5",
    ))
for _size, _constructor, _features in [("tiny", "Tiny", 768), ("small", "Small", 768),
                                       ("base", "Base", 1024), ("large", "Large", 1536),
                                       ("xlarge", "XLarge", 2048)]:
    # convnext_tiny_stage_1_block_0_... is stage_1; each downsampling_block_N goes with the
    # stage before it, the final layer_normalization with stage_3
    register(BackboneSpec(
        f"convnext_{_size}", f"ConvNeXt{_constructor}", "convnext", "none", 224, 32,
        _features, ("stage_0", "stage_1", "stage_2", "stage_3"),
        block_names=(r"^convnext_[a-z]+_", ""), imagenet_file=f"convnext_{_size}_notop.h5",
    ))
del _name, _constructor, _features, _count, _native, _index, _suffix, _stages, _size
