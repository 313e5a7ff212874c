"""The runtime the frozen backbone runs on while extracting: TensorFlow (Keras' own) or
OpenVINO.

OpenVINO (a dependency of probe) runs the same float32 graph faster than
TensorFlow on the CPU (1.2-1.4x on the five backbones, benchmarks/RESULTS.md), with the same
features up to float rounding (largest relative difference about 1e-6, inside the 1e-4 that
probe treats as the same features, as for BatchNormalization folding), so its features share
TensorFlow's caches. "auto" takes OpenVINO where it is installed and the Keras backend sees
no GPU, for float32, and for bf16 where OpenVINO's CPU device runs BF16 (AMX or
AVX512_BF16) and the backbone is not one that runs faster on TensorFlow's mixed_bfloat16
(`device.resolve`); the Keras model otherwise. Only extraction uses it: prediction, export
and fine-tuning keep the Keras model.

bf16 compiles the same graph with OpenVINO's bf16 inference precision hint: a converted
model is checked against the float32 Keras model within `BF16_FEATURES` instead of
`SAME_FEATURES`, kept under a key of its own (the precision is part of the settings that
define it), and its features go into the bf16 cache, apart from float32's.

The OpenVINO graph is written from the Keras model's layers and weights
(`probe.openvino_graph`: BatchNormalizations folded, wide 3x3 convolutions as Winograd
ones), in a fraction of a second, from a Keras model built without backend variables
(`BackboneSpec.build_for_reading`, half the time of a full build); a model with a layer
that module does not write is traced and converted instead (seconds, like a first call).
A converted model is used only once it computed what the Keras model computes on a small
seeded batch (`SAME_FEATURES`); one that does not is neither used nor kept, and the backbone
runs on TensorFlow. It is kept on disk next to the caches (`<cache dir>/models/<key>/`),
under a key made of everything that defines it (backbone, weights, size, pooling, how it is
written, the library versions), with a manifest of the sha256 of its files and what it was
converted for: a later extraction with the same backbone checks the files against it before
OpenVINO reads them, and builds no Keras model at all; a damaged or foreign copy is
converted again and replaced. Where it can not be kept (a full disk, a read-only folder),
the run uses it from memory and says so.

Every OpenVINO compilation goes through `compile_for_cpu`, which names the inference
precision: OpenVINO's CPU plugin would otherwise compute in bfloat16 on CPUs with AMX.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .. import device
from ..errors import ProbeError
from ..files import display, file_sha256, json_default, replace_directory, write_text
from .fold import for_inference

if TYPE_CHECKING:
    from ..settings import ExtractionSettings

MODELS_DIR = "models"
MODEL_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
MODEL_FILES = (MODEL_FILE, WEIGHTS_FILE)  # what OpenVINO writes; nothing else belongs there
MANIFEST_FILE = "manifest.json"  # the sha256 of MODEL_FILES and what they were converted for
MANIFEST_FORMAT = 1
# A temporary folder of a model being saved that is older than this was left by a killed
# run (saving takes seconds): the next save of that model removes it.
STALE_SECONDS = 3600
# OpenVINO's CPU plugin: float32 arithmetic (no bfloat16 or float16 downcast where the CPU
# has it) and one stream using every core, for one batch at a time.
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
PRECISION_HINTS = {"float32": "f32", "bf16": "bf16", "float16": "f16"}
# The largest difference from the Keras model's features, relative to their largest
# magnitude, that probe treats as the same features (BatchNormalization folding is held to
# the same). Float32 rounds each product and sum to 2**-24 (6e-8) relative; a backbone's
# ~50 layers of sums over a few thousand terms, taken in another order, stay near 1e-6
# (measured: 2e-7 for ResNet50), so 1e-4 leaves a hundredfold margin without depending on
# the CPU, while a bfloat16 (2**-9 rounding) or float16 (2**-12) computation, or a weight
# written wrong, lands far outside it.
SAME_FEATURES = 1e-4
# The same check for a graph compiled with the bf16 hint, against the float32 Keras model:
# bfloat16 keeps 8 significant bits, so each rounding of a weight or an activation is off by
# up to 2**-9 (0.2%) relative, 2**-8 (0.4%) per op with the sums accumulated in float32.
# Over ~50 layers such errors mostly cancel (a random walk: sqrt(50) * 2**-9 = 1.4%);
# features differ by about 0.5% of their largest magnitude in practice. 5e-2 leaves a
# tenfold margin over that, while a weight written wrong or a layer left out moves features
# by their own size (order 1).
BF16_FEATURES = 5e-2
TOLERANCES = {"float32": SAME_FEATURES, "bf16": BF16_FEATURES}
# The batch a converted model is checked on against the Keras model before it is used:
# seeded random pixels, preprocessed as the backbone's images are; two images keep the
# check to about one batch's time.
CHECK_IMAGES = 2
CHECK_SEED = 0

Notify = Callable[[str], None]  # receives one sentence for the user (progress notes)


def runtime_of(model) -> str:
    """The runtime a model from `load_backbone` runs on (recorded with the cache's speed);
    TensorFlow for a Keras model, and for None (the Ray engine's workers build their own)."""
    return getattr(model, "runtime", "tensorflow")


class OpenVINOBackbone:
    """A compiled OpenVINO model with the two things extraction asks of a Keras model:
    `predict_on_batch` and `output_shape`."""

    runtime = "openvino"

    def __init__(self, compiled) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        shape = compiled.output(0).get_partial_shape()
        self.output_shape = (None, *(dim.get_length() for dim in list(shape)[1:]))

    def predict_on_batch(self, inputs: np.ndarray) -> np.ndarray:
        """The backbone's features of one batch (float32; the array is the caller's)."""
        self._request.infer({0: np.ascontiguousarray(inputs, dtype=np.float32)})
        return self._request.get_output_tensor(0).data.copy()


def compile_for_cpu(model, precision: str = "float32"):
    """`model` (an OpenVINO model or the path of one) compiled for the CPU with the inference
    precision named (float32 unless asked otherwise), never the CPU plugin's default, which
    is bfloat16 where the CPU has AMX. The one place probe, its tests and benchmarks
    compile."""
    if precision not in PRECISION_HINTS:
        raise ProbeError(f"expected precision to be one of {', '.join(PRECISION_HINTS)}. "
                         f"Received: precision={precision!r}")
    config = {**OPENVINO_CONFIG, "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}
    return _core().compile_model(model, "CPU", config)


def _core():
    """One OpenVINO Core per process (it holds the loaded plugins; `device` asks it too)."""
    return device.openvino_core()


def load_backbone(extraction: "ExtractionSettings", cache_dir: Path,
                  notify: Notify | None = None):
    """The frozen backbone of `extraction` on its runtime: the (folded) Keras model, or an
    `OpenVINOBackbone` read from `cache_dir/models/` (checked against its manifest) or
    converted, checked against the Keras model and kept there. A converted model that
    disagrees with the Keras model gives the Keras model; `notify` hears of that, of a kept
    copy that was damaged and of a copy that could not be kept."""
    from .engines.local import build_model

    weights = extraction.weights
    if device.resolve(extraction.runtime, extraction.precision,
                      extraction.backbone) == "tensorflow":
        return build_model(extraction.spec, weights.source, extraction.image_size,
                           extraction.pooling, weights.seed, extraction.precision)
    key = model_key(extraction)
    directory = Path(cache_dir) / MODELS_DIR / key
    identity = _identity(key, extraction.image_size, extraction.precision)
    model, problem = _read_saved(directory, identity)
    if model is not None:
        return OpenVINOBackbone(compile_for_cpu(model, extraction.precision))
    if problem:
        _tell(notify, f"Converted the OpenVINO model of {extraction.backbone} again: the copy "
                      f"in '{display(directory)}' {problem}")
    converted = convert_checked(extraction)
    if converted.failure:
        _tell(notify, f"OpenVINO could not convert {extraction.backbone} "
                      f"({converted.failure}): the backbone ran on TensorFlow")
    elif not converted.agrees:
        _tell(notify, f"The OpenVINO model converted from {extraction.backbone} computed "
                      f"features {converted.difference:.1e} away from the Keras model's "
                      f"(relative; at most {converted.tolerance:g} expected) on a check "
                      "batch: it "
                      "was neither used nor kept, the backbone ran on TensorFlow")
    if not converted.agrees:
        if converted.keras_model is not None:
            return converted.keras_model
        return build_model(extraction.spec, weights.source, extraction.image_size,
                           extraction.pooling, weights.seed, extraction.precision)
    _save(converted.model, directory, identity, notify)
    return converted.backbone


@dataclass(frozen=True)
class Converted:
    """A converted backbone, compiled, and how it compares with the Keras model."""

    model: Any  # the OpenVINO model (what is saved)
    backbone: OpenVINOBackbone | None  # compiled for the CPU (None: the conversion failed)
    difference: float  # largest difference on the check batch, relative (inf: not comparable)
    keras_model: Any = None  # the folded Keras model, where converting built one (traced)
    tolerance: float = SAME_FEATURES  # the largest difference that agrees (its precision's)
    failure: str = ""  # why tracing and converting failed (then nothing was converted)

    @property
    def agrees(self) -> bool:
        return self.difference <= self.tolerance


def convert_checked(extraction: "ExtractionSettings") -> Converted:
    """`convert_backbone`'s model, compiled at the extraction's precision, with its
    difference from the (float32) Keras model on `check_batch`. The Keras output comes from the model the conversion reads (called in
    its stateless scope, or the one built for tracing): no second Keras model is built."""
    from . import openvino_graph

    spec, options = extraction.spec, _build_options(extraction)
    inputs = check_batch(extraction)
    keras_model = None
    try:
        with spec.build_for_reading(**options) as reading:
            model = openvino_graph.build(reading)
            expected = np.asarray(reading(inputs, training=False))
    except openvino_graph.UnsupportedLayer:
        keras_model = for_inference(spec.build(**options))
        try:  # a KerasHub or user model may hold an operation OpenVINO does not convert
            model = convert_traced(keras_model, extraction.image_size)
        except Exception as error:  # noqa: BLE001 - OpenVINO and TensorFlow raise many types
            return Converted(None, None, float("inf"), keras_model,
                             failure=_reason(error))
        expected = np.asarray(keras_model.predict_on_batch(inputs))
    backbone = OpenVINOBackbone(compile_for_cpu(model, extraction.precision))
    difference = relative_difference(backbone.predict_on_batch(inputs), expected)
    return Converted(model, backbone, difference, keras_model,
                     TOLERANCES[extraction.precision])


def check_batch(extraction: "ExtractionSettings") -> np.ndarray:
    """The fixed batch a converted model is checked on: CHECK_IMAGES images of seeded
    random pixels at the extraction's size, preprocessed for its backbone."""
    size = extraction.image_size
    pixels = np.random.default_rng(CHECK_SEED).uniform(0, 255, (CHECK_IMAGES, size, size, 3))
    return np.asarray(extraction.spec.preprocess_input(pixels.astype(np.float32)), np.float32)


def relative_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """The largest absolute difference relative to the largest magnitude of `expected`
    (inf for other shapes or values that are not finite)."""
    got, expected = np.asarray(got), np.asarray(expected)
    if got.shape != expected.shape:
        return float("inf")
    difference = float(np.max(np.abs(got - expected), initial=0.0))
    scale = float(np.max(np.abs(expected), initial=0.0))
    if not (np.isfinite(difference) and np.isfinite(scale)):
        return float("inf")
    if scale == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / scale


def convert_backbone(extraction: "ExtractionSettings"):
    """The OpenVINO model of the extraction's backbone with its weights, its
    BatchNormalizations folded: written from the layers of a model built for reading
    (`BackboneSpec.build_for_reading`, no backend variables: about half the time of
    building the Keras model), or where it has a layer `probe.openvino_graph` does not
    write, traced from the Keras model (`convert_traced`)."""
    from . import openvino_graph

    spec, options = extraction.spec, _build_options(extraction)
    try:
        with spec.build_for_reading(**options) as keras_model:
            return openvino_graph.build(keras_model)
    except openvino_graph.UnsupportedLayer:
        return convert_traced(for_inference(spec.build(**options)), extraction.image_size)


def _build_options(extraction: "ExtractionSettings") -> dict:
    """The arguments of `BackboneSpec.build` (and `build_for_reading`) for `extraction`."""
    weights = extraction.weights
    return dict(weights=weights.source, image_size=extraction.image_size,
                pooling=extraction.pooling, seed=weights.seed)


def convert(keras_model, image_size: int):
    """The OpenVINO model of a Keras model taking (batch, size, size, 3) float32 inputs (any
    batch size), its BatchNormalizations folded: written from its layers
    (`probe.openvino_graph`), or where it has a layer that module does not write, converted
    from the TensorFlow function of its inference call."""
    from . import openvino_graph

    try:
        return openvino_graph.build(keras_model)
    except openvino_graph.UnsupportedLayer:
        return convert_traced(for_inference(keras_model), image_size)


def convert_traced(keras_model, image_size: int):
    """The OpenVINO model of a Keras model through the TensorFlow function of its inference
    call, as `openvino.convert_model` reads it (seconds: it is traced like a first call)."""
    import openvino as ov
    import tensorflow as tf

    function = tf.function(lambda inputs: keras_model(inputs, training=False))
    concrete = function.get_concrete_function(
        tf.TensorSpec((None, image_size, image_size, 3), tf.float32))
    return ov.convert_model(concrete)


def model_key(extraction: "ExtractionSettings") -> str:
    """Everything that defines the converted model, hashed: the settings that define the
    features, whether BatchNormalizations are folded and which convolutions are Winograd
    ones, and the versions of the libraries that built and converted it."""
    from . import cache as cache_mod, fold, openvino_graph

    versions = device.package_versions(("probe", "keras", "tensorflow", "tensorflow-cpu", "openvino"))
    identity = {**extraction.feature_settings(), "fold": fold.enabled(), "versions": versions,
                "winograd": openvino_graph.winograd_enabled() and (
                    openvino_graph.WINOGRAD_MIN_CHANNEL_PRODUCT, openvino_graph.WINOGRAD_MIN_SIZE)}
    return f"{extraction.backbone}-{cache_mod.fingerprint(identity)[:16]}"


def _identity(key: str, image_size: int, precision: str = "float32") -> dict:
    """What a saved model was converted for, as its manifest records it (the precision only
    where it is not float32, so float32 copies kept before keep matching)."""
    identity = {"format": MANIFEST_FORMAT, "key": key,
                "input_shape": [None, image_size, image_size, 3]}
    return identity if precision == "float32" else {**identity, "precision": precision}


def _read_saved(directory: Path, identity: dict) -> tuple[Any, str]:
    """The model saved in `directory` and "", its files checked against its manifest
    before OpenVINO reads them (read once and handed over as bytes: what is checked is what
    is read); or None and what is wrong with the copy ("" where there is none). A copy that
    is there but wrong is removed, for the caller to convert again."""
    if not directory.exists():
        return None, ""
    files, problem = _verified_files(directory, identity)
    model = None
    if files is not None:
        try:
            model = _core().read_model(files[MODEL_FILE], files[WEIGHTS_FILE])
            shape = model.input(0).get_partial_shape()
            dims = [dim.get_length() if dim.is_static else None for dim in shape]
        except Exception:  # noqa: BLE001 (anything OpenVINO can not read: convert again)
            model, problem = None, "can not be read by OpenVINO"
        else:
            if dims != identity["input_shape"]:
                model, problem = None, f"takes inputs of shape {dims}"
    if model is None:
        _discard(directory)
    return model, problem


def _verified_files(directory: Path, identity: dict) -> tuple[dict[str, bytes] | None, str]:
    """The contents of the saved model's files where they match its manifest (what they
    were converted for, which files, their sha256), or None and what does not match."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        return None, "has no manifest"
    except (OSError, ValueError):
        return None, "has a manifest that can not be read"
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in identity.items()):
        return None, "was converted for other settings"
    digests = manifest.get("files")
    try:
        present = sorted(path.name for path in directory.iterdir() if path.name != MANIFEST_FILE)
    except OSError:
        return None, "can not be listed"
    if not isinstance(digests, dict) or sorted(digests) != sorted(MODEL_FILES) \
            or present != sorted(MODEL_FILES):
        return None, f"does not hold the files its manifest lists ({', '.join(MODEL_FILES)})"
    files = {}
    for name in MODEL_FILES:
        try:
            files[name] = (directory / name).read_bytes()
        except OSError:
            return None, f"has a {name} that can not be read"
        if hashlib.sha256(files[name]).hexdigest() != digests[name]:
            return None, f"has a {name} that does not match its checksum (damaged)"
    return files, ""


def _discard(directory: Path) -> None:
    """Remove a saved model that must not be used: renamed out of the way first (a reader
    sees the whole copy or none), then deleted. Where that fails (another process removed
    it first, a read-only folder) the next run checks it again."""
    aside = None
    try:
        if not directory.is_dir():
            directory.unlink()
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        replace_directory(directory, aside)  # over the empty folder: one rename
    except OSError:
        pass
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _save(model, directory: Path, identity: dict, notify: Notify | None = None) -> None:
    """Write the model's files and their manifest into a temporary folder and rename it
    into place, so a reader never sees half a model; a concurrent writer's copy is as good
    as ours. A folder that can not be written (full disk, read-only, OpenVINO's own write
    error) leaves nothing behind and only costs the next run a conversion: `notify` hears
    of it in one sentence."""
    import openvino as ov


    _remove_stale_temporaries(directory)
    temporary = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        # weights stay float32: save_model would otherwise store them as float16
        ov.save_model(model, str(temporary / MODEL_FILE), compress_to_fp16=False)
        digests = {name: file_sha256(temporary / name) for name in MODEL_FILES}
        write_text(temporary / MANIFEST_FILE, json.dumps(
            {**identity, "files": digests}, indent=1, default=json_default))
    except (OSError, RuntimeError) as error:  # OpenVINO raises RuntimeError for its writes
        _tell(notify, f"Could not keep the converted OpenVINO model in "
                      f"'{display(directory.parent)}' ({_reason(error)}): this run used it "
                      "from memory, the next one converts it again")
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        return
    try:
        replace_directory(temporary, directory)
    except OSError:
        pass  # another process put its copy there first
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _reason(error: Exception) -> str:
    """An error's message on one line, cut short (OpenVINO's carry source locations)."""
    reason = " ".join(str(getattr(error, "strerror", None) or error).split())
    return reason if len(reason) <= 200 else reason[:200] + " ..."


def _tell(notify: Notify | None, message: str) -> None:
    if notify is not None:
        notify(message)


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary folders of this model left by killed runs (see STALE_SECONDS)."""
    for leftover in directory.parent.glob(f".{directory.name}-*"):
        try:
            if time.time() - leftover.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue
