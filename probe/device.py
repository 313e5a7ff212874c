"""What this machine offers, in one place: the Keras backend's GPUs, bfloat16 support, the
runtime an extraction runs on, and the versions of the packages that shape features.

Ground floor: nothing here imports another module of probe's but `errors`, so settings and
every stage above can ask.
"""

from __future__ import annotations

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
    return bool(backend_gpus())


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


def bf16_support() -> str | None:
    """None where bfloat16 runs fast (a GPU of compute capability 8.0+, or a CPU with
    AVX512_BF16 / AMX_BF16 / Arm BF16), else the reason it is not offered."""
    if any(gpu.capability and gpu.capability >= (8, 0) for gpu in backend_gpus()):
        return None
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("flags", "features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        return None
    return ("neither the CPU (no AVX512_BF16, AMX_BF16 or BF16 instructions) nor a GPU "
            "(compute capability 8.0+) runs bfloat16 natively")


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
