"""Backbones beyond the registry's defaults: your own Keras model file (`--backbone
model.keras`) and the output of chosen layers of any backbone (`--layer NAME[,NAME]`).

`CustomBackbone` has the interface of `backbones.BackboneSpec` that extraction,
prediction and export use (`build`, `build_for_reading`, `preprocess_input`, sizes), so
everything downstream treats it as a backbone. `resolve` is the one place that turns the
typed settings (registry name or `ModelFile`, layers, preprocessing) into a spec.

- A model file is loaded with `keras.saving.load_model(path, safe_mode=True,
  compile=False)`: a model that needs unsafe deserialisation (a Lambda layer) is refused.
  Its default layer is the input of its last Dense layer (the features its classifier
  read), or its output where it has no Dense layer. Its input size is the model's.
- Chosen layers are pooled one by one (avg / max over the spatial axes; a vector is kept
  as it is) and concatenated in the order given.
- Fine-tuning (`--unfreeze N`) trains the last N layers with weights up to the chosen
  layer(s) (BatchNormalization layers are not counted and stay frozen).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from . import backbones
from .errors import BackboneError, WeightsError
from .files import display, file_sha256

if TYPE_CHECKING:
    import keras
    import numpy as np

MODEL_SUFFIX = ".keras"
# The input size of a model file that takes any size, when --image-size is not given.
ANY_SIZE_DEFAULT = 224
ANY_SIZE_MIN = 32


def is_model_path(value: object) -> bool:
    """True where a --backbone value names a Keras model file rather than a registry name."""
    return str(value).strip().lower().endswith(MODEL_SUFFIX)


@dataclass(frozen=True)
class ModelFile:
    """A Keras model file, identified by its content (sha256, computed once by `parse`):
    renaming or moving it keeps its features; changing one weight changes them."""

    path: Path
    sha256: str

    @classmethod
    def parse(cls, value: "str | Path") -> "ModelFile":
        path = Path(str(value).strip()).expanduser()
        if not path.is_file():
            raise BackboneError(
                f"expected a registry backbone name or an existing .keras model file; no such "
                f"file. Received: backbone='{display(value)}'")
        return cls(path.resolve(), file_sha256(path))

    @classmethod
    def recorded(cls, source: str, sha256: str) -> "ModelFile":
        """The file a cache or run was extracted with, at its recorded path, with the same
        content; anything else is an error saying how to get it back."""
        path = Path(source)
        if not source or not path.is_file() or file_sha256(path) != sha256:
            found = "is missing" if not source or not path.is_file() else "has changed"
            raise WeightsError(
                f"the backbone model file {found}: expected '{display(source)}' with sha256 "
                f"{sha256[:16]}...; copy or link the model file it was extracted with back to "
                f"that path, or extract again with --backbone NEW.keras. Received: "
                f"backbone='{display(source)}'")
        return cls(path, sha256)

    @property
    def identity(self) -> str:
        """What the cache key holds: the content, not the name or place."""
        return f"file:sha256={self.sha256[:16]}"


def parse_layers(value: "str | tuple | list | None") -> tuple[str, ...]:
    """`--layer a,b` (or a list) -> ("a", "b"); None or "" -> () (the backbone's default)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    layers = tuple(item.strip() for item in items if item.strip())
    if len(set(layers)) != len(layers):
        raise BackboneError(f"expected each layer once. Received: layer='{','.join(layers)}'")
    return layers


def check_preprocess(preprocess: str) -> str:
    if preprocess not in backbones.PREPROCESSING:
        raise BackboneError(
            f"expected --preprocess to be one of {', '.join(backbones.PREPROCESSING)} (what the "
            f"model expects; none: it preprocesses itself). Received: preprocess='{preprocess}'")
    return preprocess


@functools.lru_cache(maxsize=64)
def resolve(name: str, model_file: ModelFile | None = None, layers: tuple[str, ...] = (),
            preprocess: str = "") -> "backbones.BackboneSpec | CustomBackbone":
    """The spec of a backbone: the registry's own where nothing is customised."""
    if model_file is None and not layers:
        return backbones.get(name)
    base = None if model_file is not None else backbones.get(name)
    return CustomBackbone(base, model_file, layers, preprocess or
                          (base.preprocessing if base is not None else "none"))


@dataclass(frozen=True)
class CustomBackbone:
    """A model file or a registry backbone, cut at chosen layers (see the module)."""

    base: "backbones.BackboneSpec | None"  # None: `model_file`
    model_file: ModelFile | None
    layers: tuple[str, ...]
    preprocessing: str

    @property
    def name(self) -> str:
        return self.base.name if self.base is not None else self.model_file.path.name

    @property
    def normalization(self) -> "backbones.Preprocessing":
        return backbones.PREPROCESSING[self.preprocessing]

    @property
    def preprocessed_in(self) -> str:
        return "model" if self.preprocessing == "none" else "input"

    def preprocess_input(self, images: "np.ndarray") -> "np.ndarray":
        return self.normalization.apply(images)

    @functools.cached_property
    def _input_size(self) -> int | None:
        """The model file's input size (None: any size)."""
        return _input_size(self._load_file(), self.model_file)

    @property
    def native_size(self) -> int:
        if self.base is not None:
            return self.base.native_size
        return self._input_size or ANY_SIZE_DEFAULT

    @property
    def min_size(self) -> int:
        if self.base is not None:
            return self.base.min_size
        return self._input_size or ANY_SIZE_MIN

    def check_image_size(self, image_size: int | None) -> int:
        if self.base is not None:
            return self.base.check_image_size(image_size)
        fixed = self._input_size
        if fixed is not None and image_size is not None and image_size != fixed:
            raise BackboneError(
                f"{self.name} takes {fixed}x{fixed} images (its input layer); leave out "
                f"--image-size or pass {fixed}. Received: image_size={image_size}")
        size = fixed or (ANY_SIZE_DEFAULT if image_size is None else image_size)
        if isinstance(size, bool) or not isinstance(size, int) \
                or not ANY_SIZE_MIN <= size <= backbones.MAX_IMAGE_SIZE:
            raise BackboneError(f"expected an image size from {ANY_SIZE_MIN} to "
                                f"{backbones.MAX_IMAGE_SIZE} pixels. Received: image_size={size!r}")
        return size

    @functools.cached_property
    def feature_size(self) -> int:
        """Length of the pooled features (the model is built once to read it)."""
        model = self.build(weights="none", image_size=self.native_size, pooling="avg", seed=0)
        return int(model.output_shape[-1])

    def feature_shape(self, image_size: int | None = None, pooling: str = "avg") -> tuple[int, ...]:
        model = self.build(weights="none", image_size=self.check_image_size(image_size),
                           pooling=pooling, seed=0)
        return tuple(int(d) for d in model.output_shape[1:])

    def _load_file(self) -> "keras.Model":
        return load_model_file(self.model_file.path)

    def full_model(self, weights="imagenet", image_size: int | None = None,
                   seed: int | None = 0) -> "keras.Model":
        """The whole model, unpooled, before any cut."""
        if self.base is not None:
            return self.base.build(weights=weights, image_size=image_size, pooling="none",
                                   seed=seed)
        return self._load_file()

    def build(self, weights="imagenet", image_size: int | None = None, pooling: str = "avg",
              seed: int | None = 0) -> "keras.Model":
        """The frozen model whose output is the pooled, concatenated layer outputs."""
        backbones.check_pooling(pooling)
        size = self.check_image_size(image_size)
        cut = cut_model(self.full_model(weights, size, seed), self.layers, pooling, self.name)
        if self.base is None and self._input_size is None:  # any size: fix it to `size`
            cut = _at_size(cut, size)
        cut.trainable = False
        return cut

    @contextlib.contextmanager
    def build_for_reading(self, weights="imagenet", image_size: int | None = None,
                          pooling: str = "avg", seed: int | None = 0) -> Iterator["keras.Model"]:
        """`build`'s model (no stateless shortcut: the cut adds layers of its own)."""
        yield self.build(weights=weights, image_size=image_size, pooling=pooling, seed=seed)

    @functools.cached_property
    def top_blocks(self) -> tuple[str, ...]:
        """The layers fine-tuning can unfreeze, input to output: the layers with trainable
        weights (BatchNormalization's left out: they stay frozen) from the input up to the
        chosen layer(s), read from the model built once without its weights."""
        model = self.build(weights="none", image_size=self.native_size, pooling="avg", seed=0)
        return tuple(layer.name for layer in weighted_layers(model))

    def check_unfreeze(self, n: int) -> int:
        """`n` if the model has that many weighted layers up to the chosen layer(s)."""
        count = len(self.top_blocks)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= count:
            cut = f"--layer {','.join(self.layers)}" if self.layers else "its default layer"
            raise BackboneError(
                f"{self.name} has {count} layers with weights up to {cut} that can be unfrozen "
                f"(1 = the last, {self.top_blocks[-1] if count else 'none'}); expected "
                f"unfreeze between 1 and {count}. Received: unfreeze={n!r}")
        return n

    def unfreeze(self, model: "keras.Model", n: int) -> list[str]:
        """Make the last `n` weighted layers of `model` (built by `build`) trainable,
        everything else frozen, BatchNormalization included (`backbones.train_only`).
        Returns their names, lowest first."""
        self.check_unfreeze(n)
        chosen = weighted_layers(model)[-n:]
        backbones.train_only(model, chosen)
        return [layer.name for layer in chosen]


def weighted_layers(model: "keras.Model") -> list:
    """The layers of `model` (at any depth, in order) with trainable weights, without
    BatchNormalization; makes `model` trainable to read them (the caller freezes again)."""
    keras = backbones._keras()
    model.trainable = True  # a frozen layer lists no trainable weights
    return [layer for layer in model._flatten_layers(include_self=False)
            if not isinstance(layer, (keras.Model, keras.layers.BatchNormalization))
            and layer.trainable_weights]


def argument(spec) -> str:
    """What `--backbone` takes to name `spec` again: a model file's path, a KerasHub
    preset's source (hub:NAME or its directory), else its name."""
    model_file = getattr(spec, "model_file", None)
    if model_file is not None:
        return str(model_file.path)
    preset = getattr(spec, "preset", None)
    return preset.source if preset is not None else spec.name


def holds_weights(spec) -> bool:
    """True where the backbone's files hold its weights (a model file, a KerasHub preset),
    so --weights (imagenet, none, a file) is not for it."""
    return getattr(spec, "model_file", None) is not None \
        or getattr(spec, "preset", None) is not None


def load_model_file(path: Path) -> "keras.Model":
    """The model in a .keras file, loaded safely (no arbitrary code), frozen."""
    keras = backbones._keras()
    try:
        model = keras.saving.load_model(str(path), safe_mode=True, compile=False)
    except Exception as error:  # Keras raises ValueError / TypeError for many reasons
        reason = " ".join(str(error).split())
        unsafe = "safe_mode" in reason or "Lambda" in reason
        why = ("it needs unsafe deserialisation (a Lambda layer or custom code), which probe "
               "never enables; rebuild the model without Lambda layers" if unsafe else
               f"{reason[:200]}; save it with Keras 3 `model.save('model.keras')`")
        raise BackboneError(f"could not load the model file {display(path)}: {why}. "
                            f"Received: backbone='{display(path)}'") from None
    if not isinstance(model, keras.Model) or len(model.inputs) != 1:
        raise BackboneError(f"expected a Keras model with one image input in {display(path)}. "
                            f"Received: backbone='{display(path)}'")
    model.trainable = False
    return model


def _input_size(model: "keras.Model", model_file: ModelFile | None) -> int | None:
    """The square input size of a (size, size, 3) model; None where it takes any size."""
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or shape[-1] != 3 or shape[0] != shape[1]:
        where = display(model_file.path) if model_file else "the model"
        raise BackboneError(
            f"expected a model taking square RGB images (height, width, 3) with the channels "
            f"last; {where} takes {shape}. Received: input_shape={shape}")
    return None if shape[0] is None else int(shape[0])


def _at_size(model: "keras.Model", size: int) -> "keras.Model":
    """A model taking any size, fixed to `size` (so its feature shapes are known)."""
    keras = backbones._keras()
    inputs = keras.Input((size, size, 3))
    return keras.Model(inputs, model(inputs), name=model.name)


def default_output(model: "keras.Model"):
    """The input of the model's last Dense layer (what its classifier read), else its
    output."""
    keras = backbones._keras()
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    return dense[-1].input if dense else model.outputs[0]


def cut_model(model: "keras.Model", layers: tuple[str, ...], pooling: str,
              name: str) -> "keras.Model":
    """`model` from its input to the named layers' outputs (none: `default_output`), each
    pooled (`pooling` over the spatial axes; vectors kept), concatenated."""
    keras = backbones._keras()
    outputs = ([_layer_output(model, layer, name) for layer in layers] if layers
               else [default_output(model)])
    if pooling == "none" and len(outputs) > 1:
        raise BackboneError(
            f"expected --pooling avg or max with several layers (their feature maps differ in "
            f"size and can not be concatenated). Received: layer='{','.join(layers)}', "
            "pooling='none'")
    pooled = [_pool(keras, output, pooling) for output in outputs]
    joined = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="probe_layers")(pooled)
    return keras.Model(model.inputs[0], joined, name=f"{model.name}_cut")


def _pool(keras, tensor, pooling: str):
    """One layer's output, pooled over its spatial (or sequence) axes."""
    rank = len(tensor.shape)
    if pooling == "none" or rank == 2:
        return tensor
    pools = {4: (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D),
             3: (keras.layers.GlobalAveragePooling1D, keras.layers.GlobalMaxPooling1D)}
    if rank not in pools:
        raise BackboneError(f"expected a layer output of rank 2 to 4 to pool; got shape "
                            f"{tuple(tensor.shape)}. Choose another --layer.")
    return pools[rank][0 if pooling == "avg" else 1]()(tensor)


def _layer_output(model: "keras.Model", layer: str, name: str):
    try:
        return model.get_layer(layer).output
    except ValueError:
        raise BackboneError(
            f"{name} has no layer named '{layer}'; list them with `probe backbones {name} "
            f"--layers`. Received: layer='{layer}'") from None


def candidate_layers(spec, image_size: int | None = None) -> list[tuple[str, tuple]]:
    """(layer name, output shape without the batch axis) of every layer of the backbone
    that `--layer` can name, input to output."""
    if isinstance(spec, CustomBackbone):
        model = spec.full_model("none", spec.check_image_size(image_size), 0)
    else:
        with backbones._stateless_scope(backbones._keras()):
            model = spec.build(weights="none", image_size=image_size, pooling="none", seed=None)
    rows = []
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        try:
            shape = tuple(layer.output.shape[1:])
        except (AttributeError, ValueError):  # a layer used more than once: no single output
            continue
        rows.append((layer.name, shape))
    return rows
