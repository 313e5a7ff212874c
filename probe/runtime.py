"""The runtime the frozen backbone runs on while extracting: TensorFlow (Keras' own) or
OpenVINO.

OpenVINO (`pip install 'probe[openvino]'`) runs the same float32 graph faster than
TensorFlow on the CPU (1.2-1.4x on the five backbones, benchmarks/RESULTS.md), with the same
features up to float rounding (largest relative difference about 1e-6, inside the 1e-4 that
probe treats as the same features, as for BatchNormalization folding), so its features share
TensorFlow's caches. "auto" takes OpenVINO where it is installed, the precision is float32
and the Keras backend sees no GPU; the Keras model otherwise. Only extraction uses it:
prediction, export and fine-tuning keep the Keras model.

The OpenVINO graph is written from the Keras model's layers and weights
(`probe.openvino_graph`: BatchNormalizations folded, wide 3x3 convolutions as Winograd
ones), in a fraction of a second, from a Keras model built without backend variables
(`BackboneSpec.build_for_reading`, half the time of a full build); a model with a layer
that module does not write is traced and converted instead (seconds, like a first call).
Either way the converted model is kept on disk next to the caches
(`<cache dir>/models/<key>/`), under a key made of everything that defines it (backbone,
weights, size, pooling, how it is written, the library versions): a later extraction with
the same backbone reads it back and builds no Keras model at all.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ProbeError
from .fold import for_inference

if TYPE_CHECKING:
    from .settings import ExtractionSettings

RUNTIMES = ("auto", "tensorflow", "openvino")
# What "auto" means where this is set to "tensorflow" or "openvino" (for every extraction of
# a process and its children, e.g. a machine where one runtime is known to be better).
RUNTIME_ENV = "PROBE_RUNTIME"
MODELS_DIR = "models"
MODEL_FILE = "model.xml"  # and model.bin beside it
# A temporary folder of a model being saved that is older than this was left by a killed
# run (saving takes seconds): the next save of that model removes it.
STALE_SECONDS = 3600
# OpenVINO's CPU plugin: float32 arithmetic (no bfloat16 or float16 downcast where the CPU
# has it) and one stream using every core, for one batch at a time.
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}


def check_runtime(runtime: str, precision: str = "float32") -> str:
    """A known runtime name that can run here with `precision` (the choice: "auto" is
    resolved when the backbone is built, by `resolve`)."""
    if runtime not in RUNTIMES:
        raise ProbeError(f"expected runtime to be one of {', '.join(RUNTIMES)}. "
                         f"Received: runtime={runtime!r}")
    if runtime == "openvino" and not openvino_installed():
        raise ProbeError("expected OpenVINO to be installed for --runtime openvino; it is "
                         "not. Install it with `pip install 'probe[openvino]'`, or use "
                         "--runtime tensorflow. Received: runtime='openvino'")
    if runtime == "openvino" and precision != "float32":
        raise ProbeError(f"expected --precision float32 with --runtime openvino (bf16 runs on "
                         f"TensorFlow). Received: precision={precision!r}")
    return runtime


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve(runtime: str, precision: str) -> str:
    """The runtime that will run: "tensorflow" or "openvino". "auto" is PROBE_RUNTIME where
    that is set, else OpenVINO where it is installed, the precision is float32 and
    TensorFlow sees no GPU."""
    if runtime == "auto" and os.environ.get(RUNTIME_ENV, "").strip() in ("tensorflow", "openvino"):
        runtime = os.environ[RUNTIME_ENV].strip()
    if check_runtime(runtime, precision) == "openvino":
        return "openvino"
    if runtime == "auto" and precision == "float32" and openvino_installed() and not _gpus():
        return "openvino"
    return "tensorflow"


def _gpus() -> bool:
    """Whether the Keras backend computes on a GPU (where the backbone belongs on it)."""
    from .engines.local import backend_gpus

    return bool(backend_gpus())


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


def load_backbone(extraction: "ExtractionSettings", cache_dir: Path):
    """The frozen backbone of `extraction` on its runtime: the (folded) Keras model, or an
    `OpenVINOBackbone` read from `cache_dir/models/` or converted and kept there."""
    from .engines.local import build_model

    weights = extraction.weights
    if resolve(extraction.runtime, extraction.precision) == "tensorflow":
        return build_model(extraction.spec, weights.source, extraction.image_size,
                           extraction.pooling, weights.seed, extraction.precision)
    import openvino as ov

    core = ov.Core()
    directory = Path(cache_dir) / MODELS_DIR / model_key(extraction)
    model = _read_saved(core, directory)
    if model is None:
        model = convert_backbone(extraction)
        _save(model, directory)
    return OpenVINOBackbone(core.compile_model(model, "CPU", OPENVINO_CONFIG))


def convert_backbone(extraction: "ExtractionSettings"):
    """The OpenVINO model of the extraction's backbone with its weights, its
    BatchNormalizations folded: written from the layers of a model built for reading
    (`BackboneSpec.build_for_reading`, no backend variables: about half the time of
    building the Keras model), or where it has a layer `probe.openvino_graph` does not
    write, traced from the Keras model (`convert_traced`)."""
    from . import openvino_graph

    spec, weights = extraction.spec, extraction.weights
    options = dict(weights=weights.source, image_size=extraction.image_size,
                   pooling=extraction.pooling, seed=weights.seed)
    try:
        with spec.build_for_reading(**options) as keras_model:
            return openvino_graph.build(keras_model)
    except openvino_graph.UnsupportedLayer:
        return convert_traced(for_inference(spec.build(**options)), extraction.image_size)


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
    from .extract import package_versions

    versions = package_versions(("probe", "keras", "tensorflow", "tensorflow-cpu", "openvino"))
    identity = {**extraction.feature_settings(), "fold": fold.enabled(), "versions": versions,
                "winograd": openvino_graph.winograd_enabled() and (
                    openvino_graph.WINOGRAD_MIN_CHANNEL_PRODUCT, openvino_graph.WINOGRAD_MIN_SIZE)}
    return f"{extraction.backbone}-{cache_mod.fingerprint(identity)[:16]}"


def _read_saved(core, directory: Path):
    """The model saved in `directory`, or None when there is none or it can not be read
    (a damaged copy is converted again and replaced)."""
    if not (directory / MODEL_FILE).is_file():
        return None
    try:
        return core.read_model(str(directory / MODEL_FILE))
    except Exception:  # noqa: BLE001 (any reading failure means: convert again)
        shutil.rmtree(directory, ignore_errors=True)
        return None


def _save(model, directory: Path) -> None:
    """Write the model's two files into a temporary folder and rename it into place, so a
    reader never sees half a model; a concurrent writer's copy is as good as ours. A
    directory that can not be written only costs the next run a conversion."""
    import openvino as ov

    from .store import replace_directory

    _remove_stale_temporaries(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    except OSError:
        return
    try:
        # weights stay float32: save_model would otherwise store them as float16
        ov.save_model(model, str(temporary / MODEL_FILE), compress_to_fp16=False)
        replace_directory(temporary, directory)
    except OSError:
        pass  # another process put its copy there first, or the disk is full
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary folders of this model left by killed runs (see STALE_SECONDS)."""
    for leftover in directory.parent.glob(f".{directory.name}-*"):
        try:
            if time.time() - leftover.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            continue
