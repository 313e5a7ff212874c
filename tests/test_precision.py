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


# --- which runtime runs bf16, the bf16 hint, and the advice to use it -----------------------
# This suite's machines need not compute bfloat16: the CPU's flags (/proc/cpuinfo), its GPUs
# and OpenVINO's capability query are stand-ins here.

AMX_FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
OPENVINO_BF16 = ("FP32", "BF16", "INT8", "BIN", "EXPORT_IMPORT")
OPENVINO_F32 = ("FP32", "INT8", "BIN", "EXPORT_IMPORT")


def stand_in_cpu(monkeypatch, flags, capabilities=OPENVINO_BF16, installed=True):
    """A CPU with `flags`, no GPU, and an OpenVINO (installed or not) whose CPU device
    lists `capabilities`."""
    from probe import device

    monkeypatch.setattr(device, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(device, "backend_gpus", lambda: [])
    monkeypatch.setattr(device, "openvino_installed", lambda: installed)
    monkeypatch.setattr(device, "openvino_capabilities", lambda: tuple(capabilities))


def test_bf16_takes_openvino_where_its_cpu_device_computes_bf16(monkeypatch):
    from probe import device

    monkeypatch.delenv(device.RUNTIME_ENV, raising=False)
    stand_in_cpu(monkeypatch, AMX_FLAGS)
    assert device.resolve("auto", "bf16", "resnet50") == "openvino"
    assert device.resolve("auto", "bf16", "vgg16") == "tensorflow"  # measured faster there
    assert device.resolve("openvino", "bf16", "vgg16") == "openvino"  # an explicit choice wins
    assert device.resolve("tensorflow", "bf16", "resnet50") == "tensorflow"
    stand_in_cpu(monkeypatch, AMX_FLAGS, installed=False)
    assert device.resolve("auto", "bf16", "resnet50") == "tensorflow"
    stand_in_cpu(monkeypatch, {"avx512_bf16"}, OPENVINO_F32)  # an OpenVINO without BF16
    assert device.resolve("auto", "bf16", "resnet50") == "tensorflow"
    with pytest.raises(ProbeError, match="list BF16 among its optimization capabilities") as error:
        device.check_runtime("openvino", "bf16")
    assert len(str(error.value).splitlines()) == 1 and "FP32, INT8" in str(error.value)
    monkeypatch.setattr(device, "backend_gpus", lambda: [device.GPU("NVIDIA H200", (9, 0))])
    stand_in_cpu(monkeypatch, AMX_FLAGS)
    monkeypatch.setattr(device, "_gpus", lambda: True)  # a GPU: TensorFlow runs it there
    assert device.resolve("auto", "bf16", "resnet50") == "tensorflow"


def test_bf16_is_refused_in_one_line_on_a_cpu_without_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from conftest import make_tree
    from probe.cli import main

    root = make_tree(tmp_path / "images", per_class=2)
    stand_in_cpu(monkeypatch, {"avx2", "fma"}, OPENVINO_F32)
    for runtime in ("auto", "openvino"):
        result = CliRunner().invoke(main, ["extract", str(root), "--weights", "none",
                                           "--image-size", "32", "--precision", "bf16",
                                           "--runtime", runtime, "--cache-dir",
                                           str(tmp_path / "cache"), "-q"])
        assert result.exit_code == 1
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert "no AVX512_BF16, AMX_BF16 or BF16 instructions" in result.output
    assert not (tmp_path / "cache").exists()


def test_compile_for_cpu_names_the_bf16_hint(monkeypatch):
    pytest.importorskip("openvino")
    import openvino as ov
    from openvino import opset13 as ops

    from probe import device
    from probe.features import runtime

    parameter = ops.parameter([1, 4], np.float32)
    model = ov.Model([ops.relu(parameter)], [parameter])
    # what OpenVINO reports back: bf16 where its CPU device computes it, else it computes
    # (and says) f32 whatever the hint
    expected = "bf16" if device.openvino_bf16() else "f32"
    compiled = runtime.compile_for_cpu(model, "bf16")
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == getattr(ov.Type, expected)
    assert runtime.compile_for_cpu(model).get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32

    class Recording:  # what is asked of the CPU plugin, on any CPU
        @staticmethod
        def compile(model, name, config):
            return name, config

    # (named apart from OpenVINO's method, which only compile_for_cpu may call)
    setattr(Recording, "compile" + "_model", Recording.compile)
    monkeypatch.setattr(runtime, "_core", lambda: Recording)
    assert runtime.compile_for_cpu(model, "bf16") == (
        "CPU", {**runtime.OPENVINO_CONFIG, "INFERENCE_PRECISION_HINT": "bf16"})


@pytest.mark.openvino
def test_bf16_runs_on_openvino_checked_with_bf16s_tolerance(tmp_path, monkeypatch):
    """On an AMX-like stand-in, bf16 extracts on OpenVINO; its graph is checked against the
    float32 Keras model within BF16_FEATURES (a difference float32 would refuse is kept)
    and kept apart from float32's, with the precision in its manifest."""
    pytest.importorskip("openvino")
    import json

    from click.testing import CliRunner

    from conftest import make_tree
    from probe.cli import main
    from probe.features import runtime

    root = make_tree(tmp_path / "images", per_class=2)
    stand_in_cpu(monkeypatch, AMX_FLAGS)
    monkeypatch.setattr(runtime, "relative_difference", lambda got, expected: 1e-2)
    result = CliRunner().invoke(main, ["extract", str(root), "--weights", "none",
                                       "--backbone", "resnet50", "--image-size", "32",
                                       "--precision", "bf16", "--cache-dir",
                                       str(tmp_path / "cache"), "-q"])
    assert result.exit_code == 0, result.output
    assert "(backbone on openvino)" in result.output and "-bf16" in result.output
    [manifest] = (tmp_path / "cache" / runtime.MODELS_DIR).glob("*/manifest.json")
    assert json.loads(manifest.read_text())["precision"] == "bf16"
    assert runtime.BF16_FEATURES == 5e-2 and runtime.TOLERANCES["float32"] == 1e-4


def test_float32_on_a_bf16_cpu_advises_bf16_once_per_run(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from conftest import make_tree
    from probe import cli
    from probe.progress import Bf16Available

    root = make_tree(tmp_path / "images", per_class=2)
    stand_in_cpu(monkeypatch, AMX_FLAGS)
    result = CliRunner().invoke(cli.main, ["extract", str(root), "--weights", "none",
                                           "--image-size", "32", "--cache-dir",
                                           str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert result.stderr.count(cli.BF16_ADVICE) == 1
    said = []
    monkeypatch.setattr(cli, "_say", said.append)
    shown = cli._Events(quiet=False)  # a comparison: one advice for all its backbones
    shown(Bf16Available())
    shown(Bf16Available())
    cli._Events(quiet=True)(Bf16Available())  # advice, not a warning: --quiet hides it
    assert said == [cli.BF16_ADVICE]


def test_float32_elsewhere_gets_no_advice(image_tree, tmp_path, monkeypatch):
    from probe.progress import Bf16Available

    events = []
    stand_in_cpu(monkeypatch, {"avx2", "fma"}, OPENVINO_F32)
    probe.extract(image_tree, "vgg16", weights="none", image_size=32,
                  cache_dir=tmp_path / "a", progress=events.append)
    stand_in_cpu(monkeypatch, AMX_FLAGS)
    probe.extract(image_tree, "vgg16", weights="none", image_size=32, precision="bf16",
                  cache_dir=tmp_path / "b", progress=events.append)
    assert events and not any(isinstance(event, Bf16Available) for event in events)
