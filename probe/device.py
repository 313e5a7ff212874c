"""What this machine offers, in one place: the Keras backend's GPUs, bfloat16 support, the
runtime an extraction runs on, and the versions of the packages that shape features.

Ground floor: nothing here imports another module of probe's but `errors`, so settings and
every stage above can ask.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import importlib.util
import os
from dataclasses import dataclass

from .errors import ProbeError

RUNTIMES = ("auto", "tensorflow", "openvino")
# What "auto" means where this is set to "tensorflow" or "openvino" (for every extraction of
# a process and its children, e.g. a machine where one runtime is known to be better).
RUNTIME_ENV = "PROBE_RUNTIME"


# --- the runtime ----------------------------------------------------------------------------


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
    if runtime == "openvino" and precision not in ("float32", "bf16"):
        raise ProbeError(f"expected --precision float32 or bf16 with --runtime openvino. "
                         f"Received: precision={precision!r}")
    if runtime == "openvino" and precision == "bf16" and not openvino_bf16():
        raise ProbeError("expected OpenVINO's CPU device to list BF16 among its optimization "
                         f"capabilities for --precision bf16 with --runtime openvino; it lists "
                         f"{', '.join(openvino_capabilities()) or 'none'}. Use --runtime auto "
                         "(Keras' mixed bfloat16 on TensorFlow). Received: runtime='openvino', "
                         "precision='bf16'")
    return runtime


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


# Backbones whose bfloat16 runs faster on TensorFlow's mixed_bfloat16 than on OpenVINO's bf16
# hint, so "auto" takes TensorFlow for them. Measured on an Intel Xeon with AMX (2 cores,
# batch 32, the model alone, each against TensorFlow float32): vgg16 7.66x on TensorFlow,
# 3.71x on OpenVINO; resnet50, densenet121 and inceptionv3 3.7-6.1x on OpenVINO, less on
# TensorFlow. A fixed table rather than a timing at first use: the choice is the same on
# every such CPU for these graphs, and a timing would build both models (tens of seconds)
# before the first image. Backbones not measured take OpenVINO.
BF16_TENSORFLOW_FASTER = frozenset({"vgg16"})


def resolve(runtime: str, precision: str, backbone: str = "") -> str:
    """The runtime that will run: "tensorflow" or "openvino". "auto" is PROBE_RUNTIME where
    that is set, else, where OpenVINO is installed and TensorFlow sees no GPU: OpenVINO for
    float32, and for bf16 where OpenVINO's CPU device runs BF16 and `backbone` is not one
    of BF16_TENSORFLOW_FASTER; TensorFlow otherwise (mixed_bfloat16 for bf16)."""
    if runtime == "auto" and os.environ.get(RUNTIME_ENV, "").strip() in ("tensorflow", "openvino"):
        runtime = os.environ[RUNTIME_ENV].strip()
    if check_runtime(runtime, precision) == "openvino":
        return "openvino"
    if runtime != "auto" or not openvino_installed() or _gpus():
        return "tensorflow"
    if precision == "float32":
        return "openvino"
    if precision == "bf16" and backbone not in BF16_TENSORFLOW_FASTER and openvino_bf16():
        return "openvino"
    return "tensorflow"


def _gpus() -> bool:
    """Whether the Keras backend computes on a GPU (where the backbone belongs on it)."""
    return bool(backend_gpus())


@functools.lru_cache(maxsize=1)
def openvino_core():
    """One OpenVINO Core per process (it holds the loaded plugins)."""
    import openvino as ov

    return ov.Core()


def openvino_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU device says it computes natively (FP32, BF16, INT8, ...); empty
    where OpenVINO is not installed or does not answer."""
    if not openvino_installed():
        return ()
    try:
        return tuple(openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # noqa: BLE001 (a plugin that does not load: no capability to offer)
        return ()


def openvino_bf16() -> bool:
    """Whether OpenVINO's CPU device computes bfloat16 natively (AMX or AVX512_BF16): only
    then does its bf16 hint take effect (elsewhere it computes float32)."""
    return "BF16" in openvino_capabilities()


# --- GPUs and bfloat16 ---------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    """A GPU the Keras backend computes on: its name and CUDA compute capability (None
    where the backend does not say)."""

    name: str
    capability: tuple[int, int] | None


def backend_gpus() -> list[GPU]:
    """The GPUs of the Keras backend in use (TensorFlow, JAX or PyTorch); empty where it
    computes on the CPU or its GPU support is missing."""
    from ._keras import keras  # imports TensorFlow quietly, where that is the backend

    try:
        return _GPU_LISTERS[keras.config.backend()]()
    except Exception:  # noqa: BLE001 (a backend without GPU support: the CPU computes)
        return []


def _tensorflow_gpus() -> list[GPU]:
    import tensorflow as tf

    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capability = details.get("compute_capability")
        gpus.append(GPU(details.get("device_name", gpu.name),
                        tuple(capability) if capability else None))
    return gpus


def _jax_gpus() -> list[GPU]:
    import jax

    return [GPU(device.device_kind, tuple(int(part) for part in
                                          str(device.compute_capability).split(".")[:2]))
            for device in jax.devices("gpu")]


def _torch_gpus() -> list[GPU]:
    import torch

    return [GPU(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
            for i in range(torch.cuda.device_count())]


_GPU_LISTERS = {"tensorflow": _tensorflow_gpus, "jax": _jax_gpus, "torch": _torch_gpus}


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512_BF16 and AMX; Arm BF16
# What a benchmark line names of a CPU: its vector width and bfloat16 / AMX instructions.
NOTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "bf16")


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists (x86 "flags", Arm "Features"); empty
    where it can not be read."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("flags", "features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    return flags


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor name elsewhere)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_support() -> str | None:
    """None where bfloat16 runs fast (a GPU of compute capability 8.0+, or a CPU with
    AVX512_BF16 / AMX_BF16 / Arm BF16), else the reason it is not offered."""
    if any(gpu.capability and gpu.capability >= (8, 0) for gpu in backend_gpus()):
        return None
    if cpu_flags() & set(BF16_CPU_FLAGS):
        return None
    return ("neither the CPU (no AVX512_BF16, AMX_BF16 or BF16 instructions) nor a GPU "
            "(compute capability 8.0+) runs bfloat16 natively")


def bf16_pays() -> bool:
    """Whether a float32 extraction here would run faster as bf16: the backbone computes on
    a CPU (no GPU) that runs bfloat16 natively."""
    return not backend_gpus() and bf16_support() is None


# --- versions -------------------------------------------------------------------------------

CACHE_PACKAGES = ("probe", "keras", "tensorflow", "tensorflow-cpu", "h5py", "numpy", "pillow")


def package_versions(packages: tuple[str, ...] = CACHE_PACKAGES) -> dict[str, str]:
    """The installed version of each of `packages` that is installed."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
