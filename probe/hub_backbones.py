"""KerasHub presets as backbones: `--backbone hub:NAME` (a preset name, downloaded once by
KerasHub) or `--backbone DIR` (a preset directory on disk, as `backbone.save_to_preset(DIR)`
and `image_converter.save_to_preset(DIR)` write it).

- Identity: a sha256 over the preset's files (config, weights, image converter), so a
  moved directory keeps its features and one changed weight changes them.
- Preprocessing is the preset's own `ImageConverter` (resizing, scale, offset), as the
  first layer of the built model: extraction, prediction and the exported model all run
  it (the exported model loads with `keras.saving.load_model` after `import keras_hub`).
  The image size is the converter's.
- Features: the backbone's output as KerasHub returns it; for an image-text preset (CLIP,
  SigLIP) its vision tower's output (before the projection into the shared space). A
  one-vector output (SigLIP's attention pooling) is kept as it is. A token output (N, tokens, D)
  of a vision transformer is pooled with `--pooling cls|mean|cls+mean` (avg is mean, the
  mean of the patch tokens; the class and register tokens are left out of it); a
  feature-map output with avg / max / none as any backbone.
- `--blocks N`: the pooled tokens of the last N transformer blocks, concatenated (DINOv2's
  linear evaluation uses 4), each block normalised by the backbone's final layer norm
  where its output has it; read from KerasHub's `pyramid_outputs` ("stage1"...).
- Fine-tuning (`--unfreeze N`) trains the last N transformer blocks and what follows them
  in the backbone (its final norm; SigLIP's pooling head); everything else stays frozen.
- keras_hub is imported only when such a backbone is used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from . import backbones
from .errors import BackboneError, WeightsError
from .files import display, file_sha256

if TYPE_CHECKING:
    import keras
    import numpy as np

HUB_PREFIX = "hub:"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
CONVERTER_FILE = "image_converter.json"
PRESET_FILES = (CONFIG_FILE, WEIGHTS_FILE, CONVERTER_FILE)  # what the identity hashes
TOKEN_POOLINGS = backbones.TOKEN_POOLINGS
DEFAULT_SIZE = 224  # a converter and backbone that take any size


def is_hub_value(value: object) -> bool:
    """True where a --backbone value names a KerasHub preset: hub:NAME or a directory."""
    text = str(value).strip()
    return text.lower().startswith(HUB_PREFIX) or Path(text).expanduser().is_dir()


def keras_hub():
    """The keras_hub module, imported here (only when a hub backbone is used)."""
    try:
        import keras_hub as module
    except ImportError:
        raise BackboneError("expected keras-hub to be installed for a KerasHub backbone; it "
                            "is not. Install it with `pip install 'probe[hub]'`.") from None
    return module


@dataclass(frozen=True)
class HubPreset:
    """A KerasHub preset, identified by the sha256 of its files (computed once by `parse`).
    `source` is what --backbone took: "hub:NAME" or the directory's absolute path."""

    source: str
    directory: Path
    sha256: str

    @classmethod
    def parse(cls, value: "str | Path") -> "HubPreset":
        text = str(value).strip()
        if text.lower().startswith(HUB_PREFIX):
            name = text[len(HUB_PREFIX):].strip()
            return cls(f"{HUB_PREFIX}{name}", _download(name), "")._hashed()
        directory = Path(text).expanduser().resolve()
        return cls(str(directory), directory, "")._hashed()

    def _hashed(self) -> "HubPreset":
        missing = [name for name in PRESET_FILES if not (self.directory / name).is_file()]
        if missing:
            raise BackboneError(
                f"expected a KerasHub preset directory holding {', '.join(PRESET_FILES)} (saved "
                f"with backbone.save_to_preset(DIR) and image_converter.save_to_preset(DIR)); "
                f"{display(self.directory)} lacks {', '.join(missing)}. Received: "
                f"backbone='{display(self.source)}'")
        digest = hashlib.sha256()
        for name in PRESET_FILES:  # the names too: two files swapped are another preset
            digest.update(f"{name}:{file_sha256(self.directory / name)}\n".encode())
        return HubPreset(self.source, self.directory, digest.hexdigest())

    @classmethod
    def recorded(cls, source: str, sha256: str) -> "HubPreset":
        """The preset a cache or run was extracted with, with the same files; anything else
        is an error saying how to get it back."""
        try:
            preset = cls.parse(source) if source else None
        except BackboneError:
            preset = None
        if preset is None or preset.sha256 != sha256:
            found = "is missing" if preset is None else "has changed"
            raise WeightsError(
                f"the KerasHub preset {found}: expected '{display(source)}' with sha256 "
                f"{sha256[:16]}...; put the preset directory it was extracted with back at "
                f"that path, or extract again. Received: backbone='{display(source)}'")
        return preset

    @property
    def name(self) -> str:
        return self.source if self.source.startswith(HUB_PREFIX) else self.directory.name

    @property
    def identity(self) -> str:
        """What the cache key holds: the files' content, not the name or place."""
        return f"hub:sha256={self.sha256[:16]}"


def _download(name: str) -> Path:
    """The local directory of preset `name` (KerasHub downloads it once and keeps it)."""
    from_utils = keras_hub().src.utils.preset_utils
    try:
        for file in PRESET_FILES:
            path = Path(from_utils.get_file(name, file))
    except Exception as error:  # offline, unknown name, no Kaggle access: many types
        reason = " ".join(str(error).split())[:160]
        raise BackboneError(
            f"could not get the KerasHub preset '{name}' ({reason}); where there is no "
            f"internet, save it once elsewhere with `keras_hub.models.Backbone.from_preset"
            f"('{name}').save_to_preset(DIR)` (and its ImageConverter) and pass "
            f"--backbone DIR. Received: backbone='hub:{name}'") from None
    return path.parent


@functools.lru_cache(maxsize=16)
def resolve(preset: HubPreset, blocks: int = 0) -> "HubBackbone":
    return HubBackbone(preset, check_blocks(blocks))


def check_blocks(blocks: int) -> int:
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 <= blocks <= 64:
        raise BackboneError(f"expected --blocks to be a whole number from 1 to 64 (0: the "
                            f"backbone's output only). Received: blocks={blocks!r}")
    return blocks


@dataclass(frozen=True)
class HubBackbone:
    """A KerasHub preset with the interface of `backbones.BackboneSpec` that extraction,
    prediction and export use (see the module)."""

    preset: HubPreset
    blocks: int = 0
    preprocessing: str = "none"  # the converter, inside the model, preprocesses

    @property
    def name(self) -> str:
        return self.preset.name

    @property
    def model_file(self) -> None:
        return None

    @property
    def normalization(self) -> "backbones.Preprocessing":
        return backbones.PREPROCESSING["none"]

    @property
    def preprocessed_in(self) -> str:
        return "model"

    def preprocess_input(self, images: "np.ndarray") -> "np.ndarray":
        return self.normalization.apply(images)

    def load(self, weights: bool = True) -> tuple["keras.Model", Any]:
        """The preset's backbone (frozen) and image converter, loaded by KerasHub."""
        hub = keras_hub()
        directory = str(self.preset.directory)
        try:
            backbone = hub.models.Backbone.from_preset(directory, load_weights=weights)
            converter = hub.layers.ImageConverter.from_preset(directory)
            backbone = _vision_tower(backbone)
        except Exception as error:  # KerasHub raises many types for a bad preset
            reason = " ".join(str(error).split())[:200]
            raise BackboneError(f"could not load the KerasHub preset {display(directory)}: "
                                f"{reason}. Received: backbone='{display(self.preset.source)}'"
                                ) from None
        backbone.trainable = False
        return backbone, converter

    @functools.cached_property
    def _layout(self) -> tuple[int, int, int]:
        """(image size, rank of the output, tokens before the patch tokens), read once
        from the preset without its weights."""
        backbone, converter = self.load(weights=False)
        size = getattr(converter, "image_size", None) or getattr(backbone, "image_shape", None)
        size = int(size[0]) if size and size[0] else DEFAULT_SIZE
        shape = backbone.output_shape
        return size, len(shape), _prefix_tokens(backbone, shape, size)

    @property
    def tokens(self) -> bool:
        """True where the backbone outputs tokens (N, tokens, D), not feature maps."""
        return self._layout[1] == 3

    @property
    def native_size(self) -> int:
        return self._layout[0]

    min_size = native_size

    def check_image_size(self, image_size: int | None) -> int:
        size = self.native_size
        if image_size is not None and image_size != size:
            raise BackboneError(
                f"{self.name} takes {size}x{size} images (its image converter's size); leave "
                f"out --image-size or pass {size}. Received: image_size={image_size}")
        return size

    def check_pooling(self, pooling: str) -> str:
        """The pooling these settings record: avg on tokens is mean (see the module)."""
        if pooling not in (*backbones.POOLINGS, *TOKEN_POOLINGS):
            backbones.check_pooling(pooling)  # the one-line message of an unknown name
        if self._layout[1] == 2:  # one pooled vector (SigLIP's attention pooling head)
            if pooling not in ("avg", "none"):
                raise BackboneError(
                    f"{self.name} outputs one pooled vector per image: expected --pooling avg "
                    f"(the vector as it is). Received: pooling='{pooling}'")
            return "avg"
        if not self.tokens:
            return backbones.check_pooling(pooling)
        pooling = "mean" if pooling == "avg" else pooling
        if pooling == "max":
            raise BackboneError(
                f"{self.name} outputs tokens: expected --pooling cls, mean, cls+mean (avg is "
                "mean, the patch tokens' mean) or none. Received: pooling='max'")
        if pooling in ("cls", "cls+mean") and self._layout[2] == 0:
            raise BackboneError(f"{self.name} has no class token: expected --pooling mean or "
                                f"none. Received: pooling='{pooling}'")
        if pooling == "none" and self.blocks:
            raise BackboneError("expected --pooling cls, mean or cls+mean with --blocks (the "
                                "blocks' tokens are concatenated after pooling). Received: "
                                "pooling='none'")
        return pooling

    @functools.cached_property
    def feature_size(self) -> int:
        return self.feature_shape(pooling="cls" if self.tokens else "avg")[0]

    def feature_shape(self, image_size: int | None = None, pooling: str = "avg") -> tuple[int, ...]:
        model = self.build(image_size=image_size, pooling=pooling, weights="none")
        return tuple(int(d) for d in model.output_shape[1:])

    def build(self, weights="model", image_size: int | None = None, pooling: str = "avg",
              seed: int | None = 0) -> "keras.Model":
        """Image (0-255, the converter's size) -> converter -> backbone -> pooled features;
        `weights` "none" skips loading them (for shapes only)."""
        keras = backbones._keras()
        size, pooling = self.check_image_size(image_size), self.check_pooling(pooling)
        backbone, converter = self.load(weights=weights != "none")
        inputs = keras.Input((size, size, 3), name="image")
        outputs = _call(_outputs(keras, backbone, self.blocks, self.name), converter(inputs))
        outputs = outputs if isinstance(outputs, list) else [outputs]
        pooled = [self._pool(keras, output, pooling, i) for i, output in enumerate(outputs)]
        joined = pooled[0] if len(pooled) == 1 else \
            keras.layers.Concatenate(name="probe_blocks")(pooled)
        model = keras.Model(inputs, joined, name=f"hub_{backbone.name}")
        model.trainable = False
        return model

    def _pool(self, keras, tensor, pooling: str, index: int):
        """One output pooled with built-in layers (the exported model loads safely)."""
        if pooling == "none" or len(tensor.shape) == 2:
            return tensor
        if not self.tokens:
            pool = (keras.layers.GlobalAveragePooling2D if pooling == "avg"
                    else keras.layers.GlobalMaxPooling2D)
            return pool(name=f"probe_{pooling}_{index}")(tensor)
        count, prefix = int(tensor.shape[1]), self._layout[2]
        parts = []
        if pooling in ("cls", "cls+mean"):
            cls = keras.layers.Cropping1D((0, count - 1), name=f"probe_cls_{index}")(tensor)
            parts.append(keras.layers.Flatten(name=f"probe_cls_flat_{index}")(cls))
        if pooling in ("mean", "cls+mean"):
            patches = keras.layers.Cropping1D((prefix, 0), name=f"probe_patches_{index}")(tensor)
            parts.append(keras.layers.GlobalAveragePooling1D(name=f"probe_mean_{index}")(patches))
        return parts[0] if len(parts) == 1 else \
            keras.layers.Concatenate(name=f"probe_cls_mean_{index}")(parts)

    @contextlib.contextmanager
    def build_for_reading(self, weights="model", image_size: int | None = None,
                          pooling: str = "avg", seed: int | None = 0) -> Iterator["keras.Model"]:
        yield self.build(weights=weights, image_size=image_size, pooling=pooling, seed=seed)

    @functools.cached_property
    def top_blocks(self) -> tuple[str, ...]:
        """The names of the transformer blocks fine-tuning can unfreeze, input to output
        (none: a backbone whose blocks probe does not find, see `transformer_blocks`)."""
        backbone, _ = self.load(weights=False)
        return tuple(layer.name for layer in transformer_blocks(backbone)[0])

    def check_unfreeze(self, n: int) -> int:
        """`n` if the backbone has that many transformer blocks, else a clear error."""
        count = len(self.top_blocks)
        if not count:
            raise BackboneError(
                f"fine-tuning needs the transformer blocks of {self.name}, which probe does "
                f"not find in it (a KerasHub backbone keeps them in encoder_layers, "
                f"transformer_layers or its encoder's layers); fit a head on its features "
                f"(`probe fit`) instead. Received: unfreeze={n!r}")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= count:
            raise BackboneError(
                f"{self.name} has {count} transformer blocks that can be unfrozen (1 = the "
                f"last, {self.top_blocks[-1]}, with the final norm); expected unfreeze between "
                f"1 and {count}. Received: unfreeze={n!r}")
        return n

    def unfreeze(self, model: "keras.Model", n: int) -> list[str]:
        """Make the last `n` transformer blocks of `model` (built by `build`) and what comes
        after them in the backbone (its final norm; SigLIP's pooling head) trainable,
        everything else frozen (`backbones.train_only`). Returns the blocks' names."""
        self.check_unfreeze(n)
        blocks, after = transformer_blocks(model)
        backbones.train_only(model, [*blocks[-n:], *after])
        return [layer.name for layer in blocks[-n:]]


BLOCK_LISTS = ("encoder_layers", "transformer_layers", "layers")  # KerasHub's names for them


def transformer_blocks(model: "keras.Model") -> tuple[list, list]:
    """(the transformer blocks of the KerasHub backbone in `model`, input to output; the
    layers with weights that follow them in the backbone: its final norm, a pooling head).
    CLIP and SigLIP keep the blocks in the backbone's `encoder_layers`; DINOv2 in its
    encoder layer's `layers`, ViT in its encoder's `encoder_layers` (with the final norm
    inside the encoder). ([], []) where no list of blocks is found."""
    keras = backbones._keras()
    for container in [model, *(layer for layer in model._flatten_layers(include_self=False)
                               if isinstance(layer, keras.Model))]:
        layers = container.layers
        # a nested Model is a container of its own, later in the loop
        for owner in [container, *(layer for layer in layers
                                   if not isinstance(layer, keras.Model))]:
            blocks = _block_list(keras, owner)
            if not blocks:
                continue
            inside = [] if owner is container else [
                layer for layer in owner._flatten_layers(include_self=False, recursive=False)
                if isinstance(layer, keras.layers.LayerNormalization)
                and all(layer is not block for block in blocks)]
            last = max((i for i, layer in enumerate(layers)
                        if layer is blocks[-1] or layer is owner), default=len(layers))
            return blocks, inside + [layer for layer in layers[last + 1:] if layer.weights]
    return [], []


def _block_list(keras, owner) -> list:
    """The list of layers `owner` keeps its transformer blocks in (a Model's own `layers`
    is every layer of it, not its blocks), or []."""
    for attribute in BLOCK_LISTS:
        if attribute == "layers" and isinstance(owner, keras.Model):
            continue
        blocks = getattr(owner, attribute, None)
        if isinstance(blocks, list) and blocks \
                and all(isinstance(block, keras.layers.Layer) and block.weights
                        for block in blocks):
            return blocks
    return []


def _vision_tower(backbone: "keras.Model") -> "keras.Model":
    """The image half of an image-text backbone (CLIP, SigLIP: `vision_encoder`, whose
    output is what their image embedding pools and projects); any other backbone as it is."""
    tower = getattr(backbone, "vision_encoder", None)
    return tower if tower is not None and hasattr(tower, "output_shape") else backbone


def _prefix_tokens(backbone, shape: tuple, size: int) -> int:
    """How many tokens come before the patch tokens (class and register tokens; DINOv2
    lays them out as [class, registers..., patches])."""
    if len(shape) != 3:
        return 0
    patch = getattr(backbone, "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if patch and shape[1]:
        return int(shape[1]) - (size // int(patch)) ** 2
    return 1 + int(getattr(backbone, "num_register_tokens", 0))


def _call(model: "keras.Model", images):
    """`model` on `images`, passed in its own input structure (KerasHub backbones take a
    dict {"images": ...}; a bare tensor works but warns)."""
    names = getattr(model, "_inputs_struct", None)
    if isinstance(names, dict) and len(names) == 1:
        return model({next(iter(names)): images})
    return model(images)


def _outputs(keras, backbone: "keras.Model", blocks: int, name: str) -> "keras.Model":
    """The backbone, or a model of it giving the last `blocks` blocks' outputs."""
    if not blocks:
        return backbone
    stages = [key for key in getattr(backbone, "pyramid_outputs", None) or {}
              if key.startswith("stage")]
    if len(backbone.output_shape) != 3 or len(stages) < blocks:
        raise BackboneError(
            f"expected --blocks from 1 to {len(stages)} for {name}: its transformer blocks' "
            f"outputs are {'not reachable' if not stages else f'{len(stages)}'} (KerasHub's "
            f"pyramid_outputs of a token backbone). Received: blocks={blocks}")
    norm = backbone.layers[-1]  # DINOv2's protocol normalises each block as the output
    normalise = (isinstance(norm, keras.layers.LayerNormalization)
                 and not getattr(backbone, "apply_layernorm", False))
    picked = [backbone.pyramid_outputs[key] for key in stages[-blocks:]]
    outputs = [norm(tensor) if normalise else tensor for tensor in picked]
    return keras.Model(backbone.inputs, outputs, name=f"{backbone.name}_blocks")
