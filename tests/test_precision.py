"""--precision bf16: its own cache, float32 features that agree closely with float32."""

import numpy as np
import pytest

import probe
from probe.errors import ProbeError
from probe.device import bf16_support


def test_unknown_precision_is_an_error(image_tree):
    with pytest.raises(ProbeError, match="precision='float16'"):
        probe.extract(image_tree, "vgg16", weights="none", image_size=32, precision="float16")


@pytest.mark.skipif(bf16_support() is not None, reason="no native bfloat16 here")
def test_bf16_gets_its_own_cache_and_close_features(image_tree):
    import keras

    policy = keras.mixed_precision.global_policy().name
    full = probe.extract(image_tree, "resnet50", weights="none", image_size=32)
    half = probe.extract(image_tree, "resnet50", weights="none", image_size=32, precision="bf16")
    assert keras.mixed_precision.global_policy().name == policy
    assert half.path != full.path and "bf16" in half.path.name
    assert half.attrs["precision"] == "bf16" and "precision" not in full.attrs
    assert half.attrs["feature_key"] != full.attrs["feature_key"]
    a, b = full.features("train"), half.features("train")
    assert b.dtype == np.float32 and a.shape == b.shape
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.98


def test_bf16_is_offered_on_a_gpu_of_compute_capability_8_or_more(monkeypatch):
    from probe import device as local
    from probe._keras import keras

    backend = keras.config.backend()

    def gpus(*found):
        monkeypatch.setitem(local._GPU_LISTERS, backend, lambda: list(found))

    def broken():
        raise RuntimeError("no CUDA here")

    gpus()
    without_gpu = bf16_support()  # what the CPU alone allows
    gpus(local.GPU("NVIDIA H200", (9, 0)))
    assert local.backend_gpus() == [local.GPU("NVIDIA H200", (9, 0))]
    assert bf16_support() is None
    gpus(local.GPU("Tesla T4", (7, 5)), local.GPU("unnamed", None))
    assert bf16_support() == without_gpu
    monkeypatch.setitem(local._GPU_LISTERS, backend, broken)
    assert local.backend_gpus() == [] and bf16_support() == without_gpu
