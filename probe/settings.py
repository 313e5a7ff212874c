"""Typed settings, parsed and validated once where a call enters probe (the command line or
the Python API), then passed along as frozen values.

- `Weights`: where a backbone's weights come from (ImageNet, a seeded random initialisation,
  or a file identified by its sha256, computed once).
- `ExtractionSettings`: everything that defines the features (backbone, weights, input size,
  pooling, precision) plus the batch size; written to and read from a cache's attributes by
  `to_attrs` / `from_attrs`, so prediction, export and fine-tuning rebuild exactly the
  backbone that wrote the cache.
- `SplitSettings`: how samples get their split (label files per split, fractions, seed).

The random-weights seed (`Weights.seed`), the split seed (`SplitSettings.seed`) and a head's
seed are separate values; the command line's one `--seed` sets them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import backbones, device, hub_backbones, model_backbones
from .data import SPLITS
from .errors import BackboneError, CacheError, DatasetError, ProbeError, WeightsError
from .files import file_sha256
from .hub_backbones import HubPreset
from .model_backbones import ModelFile

VAL_FRACTION = 0.15  # the one place the split defaults are written
TEST_FRACTION = 0.15
DEFAULT_SEED = 0
MAX_SEED = 2**32 - 1  # NumPy's and Keras' seeds are 32-bit
DEFAULT_BATCH_SIZE = 32
MAX_BATCH_SIZE = 4096
PRECISIONS = ("float32", "bf16")
LABEL_SPLITS = (*SPLITS, "trainval")
# Batches held in memory at once while extracting: the one in the model, the ones decoded
# ahead (engines.local.PREFETCH_BATCHES) and the ones being decoded (DECODING_BATCHES).
BATCHES_IN_MEMORY = 4


# --- weights ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Weights:
    """Where the backbone's weights come from. Build with `Weights.parse`."""

    # "imagenet", "none" (seeded random initialisation), "file", or "model": the weights
    # inside a .keras model file backbone (`ModelFile`, which identifies them)
    kind: str
    path: Path | None = None  # the weights file (kind "file")
    sha256: str = ""  # of the file, computed once by `parse`
    seed: int = DEFAULT_SEED  # of the random initialisation (kind "none")

    @classmethod
    def parse(cls, value: "str | os.PathLike | Weights | None", seed: int = DEFAULT_SEED) -> "Weights":
        """'imagenet', 'none' (or None) or the path of a weights file; a file is hashed here,
        once."""
        if isinstance(value, Weights):
            return value
        kind, path = backbones.parse_weights(value)
        if kind == "none":
            return cls("none", seed=check_seed(seed))
        if kind == "imagenet":
            return cls("imagenet")
        return cls("file", path=path, sha256=file_sha256(path))

    @property
    def identity(self) -> str:
        """What the cache records as `weights`: a different string means different
        features (the format every cache has used, so existing cache keys stay valid)."""
        if self.kind == "none":
            return f"random(seed={self.seed})"
        if self.kind == "file":
            return f"file:{self.path.name}:sha256={self.sha256[:16]}"
        return "model" if self.kind == "model" else "imagenet"

    @property
    def source(self) -> str:
        """What `BackboneSpec.build` takes: "imagenet", "none" or the file's path."""
        return str(self.path) if self.kind == "file" else self.kind

    def to_attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"weights": self.identity, "weights_source": self.source}
        if self.kind == "none":
            attrs["weights_seed"] = self.seed
        if self.kind == "file":
            attrs["weights_sha256"] = self.sha256
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "Weights":
        """The weights a cache (or a run's config) records. A file must still be there with
        the same content; anything else is an error saying how to get it back."""
        identity = str(attrs.get("weights") or "imagenet")
        source = str(attrs.get("weights_source") or "")
        if source == "none":
            weights = cls("none", seed=_recorded_weights_seed(attrs))
        elif source == "model":
            weights = cls("model")
        elif source == "imagenet" or (not source and identity == "imagenet"):
            weights = cls("imagenet")
        else:
            weights = _recorded_file(identity, source)
        if weights.identity != identity:
            raise CacheError(
                f"the recorded weights ({identity!r}) do not match their source "
                f"({source!r}); the cache or run was edited. Extract again with `probe extract`."
            )
        return weights


def _recorded_weights_seed(attrs: Mapping[str, Any]) -> int:
    """The random-weights seed. Caches and runs written before `weights_seed` existed used
    the one seed for both the split and the weights, recorded as `seed` / `split_seed`."""
    for key in ("weights_seed", "seed", "split_seed"):
        if attrs.get(key) not in (None, ""):
            try:
                return check_seed(int(attrs[key]))
            except (TypeError, ValueError, ProbeError):
                break
    raise CacheError(
        f"expected a random-weights seed (0..{MAX_SEED}) in the cache or run; found "
        f"{attrs.get('weights_seed', attrs.get('seed'))!r}. Extract again with `probe extract`."
    )


def _recorded_file(identity: str, source: str) -> Weights:
    path = Path(source)
    if not source or not path.is_file():
        raise WeightsError(
            f"the backbone needs the weights file it was extracted with ({identity}); put it "
            f"back at '{source}' or extract again with other weights. Received: weights='{source}'"
        )
    return Weights("file", path=path, sha256=file_sha256(path))


# --- bounds -----------------------------------------------------------------------------


def check_seed(seed: Any, name: str = "seed") -> int:
    """A seed in 0 .. 2**32-1 (what NumPy and Keras accept)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ProbeError(f"expected {name} to be an integer from 0 to {MAX_SEED}. "
                         f"Received: {name}={seed!r}")
    return seed


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) \
            or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ProbeError(f"expected a batch size from 1 to {MAX_BATCH_SIZE}. "
                         f"Received: batch_size={batch_size!r}")
    return batch_size


def available_memory() -> int | None:
    """Bytes of memory available now (MemAvailable), or None where it can not be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def batch_bytes(batch_size: int, image_size: int) -> int:
    """Bytes of one batch of float32 RGB pixels."""
    return batch_size * image_size * image_size * 3 * 4


def check_batch_memory(batch_size: int, image_size: int) -> None:
    """Refuse a batch whose pixels (BATCHES_IN_MEMORY of them are in memory at once) do not
    fit in the memory available, before anything is allocated."""
    available = available_memory()
    needed = BATCHES_IN_MEMORY * batch_bytes(batch_size, image_size)
    if available is None or needed <= available:
        return
    fits = max(1, available // (BATCHES_IN_MEMORY * batch_bytes(1, image_size)))
    raise ProbeError(
        f"a batch of {batch_size} images of {image_size} px needs {needed / 2**30:.1f} GiB of "
        f"float32 pixels ({BATCHES_IN_MEMORY} batches in flight), more than the "
        f"{available / 2**30:.1f} GiB available; use --batch-size {min(fits, MAX_BATCH_SIZE)} "
        f"or less. Received: batch_size={batch_size}"
    )


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ProbeError(f"expected precision to be one of {', '.join(PRECISIONS)}. "
                         f"Received: precision='{precision}'")
    if precision == "bf16":

        reason = device.bf16_support()  # probes TensorFlow: only when asked for
        if reason is not None:
            raise ProbeError(f"bf16 is not available here: {reason}; use float32. "
                             f"Received: precision='{precision}'")
    return precision


def dataset_path(dataset: str | os.PathLike) -> Path:
    """The dataset directory; an empty argument is an error, not the current directory."""
    if not str(os.fspath(dataset)).strip():
        raise DatasetError("expected a dataset directory; got an empty path. Pass the folder "
                           "of class folders, e.g. `probe extract cats_vs_dogs/`. Received: ''")
    return Path(dataset).expanduser()


# --- extraction -------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractionSettings:
    """What defines the features, validated. Build with `ExtractionSettings.create`.

    New choices that change the features (augmented views, another layer) become fields
    here and enter `feature_settings` only when they differ from their default, so the
    keys of existing caches stay valid."""

    backbone: str  # a registry name, or the model file's name (`model_file`)
    weights: Weights
    image_size: int
    pooling: str = "avg"
    precision: str = "float32"
    batch_size: int = DEFAULT_BATCH_SIZE  # how, not what: not part of the features
    runtime: str = "auto"  # how, not what: probe.device (TensorFlow or OpenVINO)
    model_file: ModelFile | None = None  # a .keras backbone, identified by its sha256
    layers: tuple[str, ...] = ()  # the layers read (): the backbone's default output
    preprocess: str = ""  # a model file's preprocessing mode ("": the registry's)
    hub: HubPreset | None = None  # a KerasHub preset, identified by its files' sha256
    blocks: int = 0  # a hub transformer's last blocks read (0: its output)

    @classmethod
    def create(
        cls,
        backbone: "str | os.PathLike" = "vgg16",
        weights: "str | os.PathLike | Weights | None" = "imagenet",
        image_size: int | None = None,
        pooling: str = "avg",
        precision: str = "float32",
        batch_size: int = DEFAULT_BATCH_SIZE,
        seed: int = DEFAULT_SEED,
        runtime: str = "auto",
        layer: "str | Iterable[str] | None" = None,
        preprocess: str | None = None,
        blocks: int = 0,
    ) -> "ExtractionSettings":
        """Validate every value once; `seed` seeds random weights (`weights="none"`);
        `runtime` is what runs the backbone (`probe.device`: auto, tensorflow, openvino).
        `backbone` is a registry name or the path of a .keras model file (hashed here,
        once; `preprocess` says what its pixels need, default none); `layer` names the
        layer(s) whose pooled outputs are the features ("a,b": concatenated). "hub:NAME"
        or a preset directory is a KerasHub preset (`blocks`: its last transformer blocks)."""
        if hub_backbones.is_hub_value(backbone):
            return cls._create_hub(HubPreset.parse(backbone), weights, image_size, pooling,
                                   precision, batch_size, runtime, layer, preprocess, blocks)
        if blocks:
            raise BackboneError(f"--blocks reads the transformer blocks of a KerasHub preset "
                                f"(--backbone hub:NAME or a preset directory); leave it out for "
                                f"{backbone}. Received: blocks={blocks!r}")
        source, name, mode = parse_backbone(backbone, preprocess)
        layers = model_backbones.parse_layers(layer)
        spec = model_backbones.resolve(name, source, layers, mode)
        size = spec.check_image_size(image_size)
        backbones.check_pooling(pooling)
        check_batch_size(batch_size)
        check_precision(precision)
        device.check_runtime(runtime, precision)
        parsed = _model_weights(weights, name) if source else Weights.parse(weights, seed)
        made = cls(spec.name, parsed, size, pooling, precision, batch_size, runtime, source,
                   layers, mode)
        if layers:
            made.spec.feature_shape(size, pooling)  # an unknown layer is refused here
        return made

    @classmethod
    def _create_hub(cls, preset: HubPreset, weights, image_size, pooling: str, precision: str,
                    batch_size: int, runtime: str, layer, preprocess,
                    blocks: int) -> "ExtractionSettings":
        """`create` for a KerasHub preset: its converter preprocesses, its files hold the
        weights; avg on tokens is recorded as mean (`HubBackbone.check_pooling`)."""
        if layer or preprocess:
            raise BackboneError(
                f"--layer and --preprocess are not for a KerasHub preset ({preset.name}: its "
                f"image converter preprocesses; --blocks N reads its last blocks). Received: "
                f"layer={layer!r}, preprocess={preprocess!r}")
        spec = hub_backbones.resolve(preset, blocks)
        size = spec.check_image_size(image_size)
        pooling = spec.check_pooling(pooling)
        check_batch_size(batch_size)
        check_precision(precision)
        device.check_runtime(runtime, precision)
        made = cls(spec.name, _model_weights(weights, spec.name), size, pooling, precision,
                   batch_size, runtime, hub=preset, blocks=blocks)
        made.spec.feature_shape(size, pooling)  # too many --blocks are refused here
        return made

    @property
    def spec(self) -> "backbones.BackboneSpec | model_backbones.CustomBackbone":
        if self.hub is not None:
            return hub_backbones.resolve(self.hub, self.blocks)
        return model_backbones.resolve(self.backbone, self.model_file, self.layers,
                                       self.preprocess)

    def with_backbone(self, backbone: str, image_size: int | None = None) -> "ExtractionSettings":
        """The same settings for another registry backbone (weights are not hashed again)."""
        spec = backbones.get(backbone)
        return replace(self, backbone=spec.name, image_size=spec.check_image_size(image_size),
                       model_file=None, layers=(), preprocess="", hub=None, blocks=0)

    def feature_settings(self) -> dict[str, Any]:
        """The values that define the features (and the cache key). A model file enters as
        its content, so renaming or moving it keeps the key."""
        backbone = (self.hub.identity if self.hub else
                    self.model_file.identity if self.model_file else self.backbone)
        settings = {"backbone": backbone, "weights": self.weights.identity,
                    "image_size": self.image_size, "pooling": self.pooling,
                    "preprocessing": self.spec.preprocessing}
        if self.precision != "float32":  # float32 caches keep the key they always had
            settings["precision"] = self.precision
        if self.layers:  # caches of the default layer keep their key
            settings["layers"] = list(self.layers)
        if self.blocks:
            settings["blocks"] = self.blocks
        return settings

    def to_attrs(self) -> dict[str, Any]:
        """The cache attributes these settings write (a model file: its name, path at
        extraction and sha256)."""
        attrs = {**self.feature_settings(), **self.weights.to_attrs()}
        if self.model_file:
            attrs.update(backbone=self.backbone, backbone_source=str(self.model_file.path),
                         backbone_sha256=self.model_file.sha256)
        if self.hub:  # not backbone_sha256: older probes would read it as a model file
            attrs.update(backbone=self.backbone, hub_source=self.hub.source,
                         hub_sha256=self.hub.sha256)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], batch_size: int = DEFAULT_BATCH_SIZE) -> "ExtractionSettings":
        """The settings a cache (or a run's config, which copies them) was written with;
        bounds are checked again (the file may have been edited). A model file is read
        from its recorded path and must still have the recorded sha256."""
        if attrs.get("hub_sha256"):
            return cls._from_hub_attrs(attrs, batch_size)
        try:
            source, mode = _recorded_model(attrs)
            layers = model_backbones.parse_layers(attrs.get("layers") or None)
            spec = model_backbones.resolve(str(attrs["backbone"]), source, layers, mode)
            size = spec.check_image_size(int(attrs["image_size"]))
            pooling = backbones.check_pooling(str(attrs.get("pooling") or "avg"))
        except (KeyError, TypeError, ValueError, BackboneError) as error:
            raise CacheError(
                f"expected the extraction settings of a cache (backbone, image_size, pooling); "
                f"found unusable values ({error}). Extract again with `probe extract`."
            ) from None
        precision = _recorded_precision(attrs)
        return cls(spec.name, Weights.from_attrs(attrs), size, pooling, precision,
                   check_batch_size(batch_size), "auto", source, layers, mode)

    @classmethod
    def _from_hub_attrs(cls, attrs: Mapping[str, Any], batch_size: int) -> "ExtractionSettings":
        """`from_attrs` of a KerasHub preset: found again at its recorded source with the
        recorded files (`HubPreset.recorded`)."""
        preset = HubPreset.recorded(str(attrs.get("hub_source") or ""), str(attrs["hub_sha256"]))
        try:
            spec = hub_backbones.resolve(preset, int(attrs.get("blocks") or 0))
            size = spec.check_image_size(int(attrs["image_size"]))
            pooling = spec.check_pooling(str(attrs.get("pooling") or "avg"))
        except (KeyError, TypeError, ValueError, BackboneError) as error:
            raise CacheError(
                f"expected the extraction settings of a KerasHub backbone (image_size, "
                f"pooling, blocks); found unusable values ({error}). Extract again with "
                "`probe extract`.") from None
        precision = _recorded_precision(attrs)
        return cls(spec.name, Weights("model"), size, pooling, precision,
                   check_batch_size(batch_size), "auto", hub=preset, blocks=spec.blocks)

    def cache_stem(self, dataset_name: str) -> str:
        """`<dataset>-<backbone>-<size>-<pooling>[-<precision>]` of the cache file name."""
        cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset_name)
        # a model file by its content, so that a renamed file finds its cache
        backbone = (f"hub{self.hub.sha256[:8]}" if self.hub else
                    f"file{self.model_file.sha256[:8]}" if self.model_file else self.backbone)
        name = f"{cleaned.strip('_') or 'dataset'}-{backbone}-{self.image_size}-{self.pooling}"
        return name if self.precision == "float32" else f"{name}-{self.precision}"


def parse_backbone(backbone: "str | os.PathLike",
                   preprocess: str | None) -> tuple[ModelFile | None, str, str]:
    """(model file or None, name, preprocessing mode) of a --backbone value: a registry
    name, or a path ending in .keras (hashed once). --preprocess is for model files only."""
    if model_backbones.is_model_path(backbone):
        source = ModelFile.parse(backbone)
        return source, source.path.name, model_backbones.check_preprocess(preprocess or "none")
    name = backbones.get(str(backbone)).name
    if preprocess not in (None, ""):
        raise BackboneError(
            f"--preprocess is for a .keras model file; {name} preprocesses as Keras does "
            f"({backbones.get(name).preprocessing}). Leave it out. Received: preprocess='{preprocess}'")
    return None, name, ""


def backbone_spec(backbone: "str | os.PathLike", preprocess: str | None = None):
    """The spec of a --backbone value (a registry name, a .keras model file or a KerasHub
    preset)."""
    if hub_backbones.is_hub_value(backbone):
        return hub_backbones.resolve(HubPreset.parse(backbone))
    source, name, mode = parse_backbone(backbone, preprocess)
    return model_backbones.resolve(name, source, (), mode)


def _recorded_precision(attrs: Mapping[str, Any]) -> str:
    """The precision a cache records, checked (float32 for caches written before bf16)."""
    precision = str(attrs.get("precision") or "float32")
    if precision not in PRECISIONS:
        raise CacheError(f"expected precision to be one of {', '.join(PRECISIONS)}; the "
                         f"cache says {precision!r}. Extract again with `probe extract`.")
    return precision


def _model_weights(weights: Any, name: str) -> Weights:
    """A model file holds its weights: only the default (or "model") is accepted."""
    if isinstance(weights, Weights) and weights.kind in ("model", "imagenet"):
        return Weights("model")
    if weights is None or str(weights).lower() not in ("imagenet", "model"):
        raise WeightsError(
            f"{name} is a model file and holds its own weights; leave out --weights. "
            f"Received: weights='{weights}'")
    return Weights("model")


def _recorded_model(attrs: Mapping[str, Any]) -> tuple[ModelFile | None, str]:
    """The model file and preprocessing mode a cache or run records (None, "": a registry
    backbone)."""
    sha256 = attrs.get("backbone_sha256")
    if not sha256:
        return None, ""
    mode = model_backbones.check_preprocess(str(attrs.get("preprocessing") or "none"))
    return ModelFile.recorded(str(attrs.get("backbone_source") or ""), str(sha256)), mode


# --- splits -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSettings:
    """How samples get their split. `label_sources` pairs a split name ("" for a file that
    labels every split, optionally with a split column, or a VOC ImageSets/Main directory,
    whose list names give the splits) with a labels file path."""

    label_sources: tuple[tuple[str, str], ...] = ()
    val_fraction: float = VAL_FRACTION
    test_fraction: float = TEST_FRACTION
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        check_fractions(self.val_fraction, self.test_fraction)
        check_seed(self.seed)

    @classmethod
    def create(cls, labels: "str | os.PathLike | Iterable | Mapping | None" = None,
               val_fraction: float = VAL_FRACTION, test_fraction: float = TEST_FRACTION,
               seed: int = DEFAULT_SEED) -> "SplitSettings":
        """`labels`: None, one file, a {split: file} mapping, or `--labels` values."""
        # fractions are kept as given (0 stays 0): they enter the cache key as JSON
        return cls(parse_label_sources(labels), val_fraction, test_fraction, check_seed(seed))

    @property
    def labels(self) -> "str | dict[str, str] | None":
        """What `data.discover` takes: one path, a {split: path} mapping, or None."""
        if not self.label_sources:
            return None
        if self.label_sources[0][0] == "":
            return self.label_sources[0][1]
        return dict(self.label_sources)

    def to_attrs(self) -> dict[str, Any]:
        """The cache attributes these settings write (`label_sources` only when named)."""
        single = self.labels if isinstance(self.labels, str) else ""
        attrs: dict[str, Any] = {"labels_file": single, "seed": self.seed,
                                 "val_fraction": self.val_fraction,
                                 "test_fraction": self.test_fraction}
        if self.label_sources and not single:
            attrs["label_sources"] = [list(pair) for pair in self.label_sources]
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "SplitSettings":
        try:
            named = attrs.get("label_sources") or []
            sources = tuple((str(s), str(p)) for s, p in named) if named else \
                ((("", str(attrs["labels_file"])),) if attrs.get("labels_file") else ())
            return cls(sources, float(attrs.get("val_fraction", VAL_FRACTION)),
                       float(attrs.get("test_fraction", TEST_FRACTION)),
                       int(attrs.get("seed", DEFAULT_SEED)))
        except (TypeError, ValueError, ProbeError) as error:
            raise CacheError(f"expected the split settings of a cache (labels, fractions, "
                             f"seed); found unusable values ({error}). Extract again with "
                             "`probe extract`.") from None


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    numbers = all(isinstance(f, (int, float)) and not isinstance(f, bool)
                  for f in (val_fraction, test_fraction))
    if not numbers or not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError(
            "expected val and test fractions in [0, 1) that sum to less than 1. Received: "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}"
        )


def parse_label_sources(values: "str | os.PathLike | Iterable | Mapping | None") -> tuple[tuple[str, str], ...]:
    """`--labels` values (`FILE` or `SPLIT=FILE`, repeatable), one path, or a {split: path}
    mapping -> ((split, absolute path), ...), "" naming a file for every split.

    Two files for the same split (two unnamed files included) are an error, never one
    silently dropped; so is a file for every split next to per-split files."""
    if values is None:
        return ()
    if isinstance(values, Mapping):
        items = [(str(split), value) for split, value in values.items()]
    elif isinstance(values, (str, os.PathLike)):
        items = [_split_and_path(values)]
    else:
        items = [_split_and_path(value) for value in values]
    sources: dict[str, str] = {}
    for split, path in items:
        if split not in ("", *LABEL_SPLITS):
            raise DatasetError(f"expected --labels FILE or SPLIT=FILE with SPLIT one of "
                               f"{', '.join(LABEL_SPLITS)}. Received: '{split}={path}'")
        if split in sources:
            which = f"the {split} split" if split else "every split (no SPLIT= prefix)"
            raise DatasetError(
                f"expected one labels file for {which}; got two: '{sources[split]}' and "
                f"'{path}'. Name the split of each, e.g. --labels train=a.csv --labels "
                "test=b.csv."
            )
        sources[split] = str(Path(path).expanduser().resolve())
    if "" in sources and len(sources) > 1:
        raise DatasetError(
            "expected either one labels file for every split or one per split "
            f"(SPLIT=FILE); got both. Received: {['='.join(p).lstrip('=') for p in sources.items()]}"
        )
    return tuple(sources.items())


def _split_and_path(value: "str | os.PathLike") -> tuple[str, str]:
    text = os.fspath(value)
    if not str(text).strip():
        raise DatasetError("expected a labels file path; got an empty one. Received: --labels ''")
    split, equals, path = str(text).partition("=")
    if equals and split.strip().lower() in LABEL_SPLITS and path:
        return split.strip().lower(), path
    return "", str(text)  # a file name may contain "=" itself


def parse_names(value: str | Iterable[str] | None, default: Iterable[str],
                everything: Iterable[str] | None = None,
                keep_case: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Names from a comma-separated string or a list, lower case (except those `keep_case`
    accepts: file paths), without repeats; "all" stands for `everything` when it is
    given."""
    if value is None:
        items = list(default)
    elif isinstance(value, str):
        items = value.split(",")
    else:
        items = [str(v) for v in value]
    names = []
    for item in items:
        name = item.strip() if keep_case(item.strip()) else item.strip().lower()
        expanded = list(everything) if name == "all" and everything is not None else [name]
        names += [n for n in expanded if n and n not in names]
    return names
