"""The extraction benchmark runs on a tiny setting and prints well-formed, consistent
figures: one `<scope> <figure> <value>` line each, ratios that match the rates they are
made of, and folded features equal to the unfolded ones within 1e-4 relative."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(\w+) (\w+) (\S.*)$")


def run_benchmark(tmp_path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "extract.py"), "--n", "15",
         "--backbones", "resnet50", "--image-size", "32", "--heads", "logreg",
         "--memory-sizes", "15", "--memory-image-size", "32", "--workdir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures: dict[str, str] = {}
    for line in result.stdout.splitlines():
        match = LINE.match(line)
        assert match, f"not a '<scope> <figure> <value>' line: {line!r}"
        key = f"{match[1]} {match[2]}"
        assert key not in figures, f"{key} printed twice"
        figures[key] = match[3]
    return figures


def number(figures: dict[str, str], key: str) -> float:
    value = float(figures[key])
    assert math.isfinite(value), key
    return value


def close(a: float, b: float, rel: float = 0.01) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.mark.slow
def test_backbones_benchmark_prints_both_rates_and_their_ratio(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "backbones.py"), "--tiny", "--n", "4",
         "--rounds", "1", "--backbones", "dinov2_vits14", "--runtime",
         "tensorflow", "--workdir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = {}
    for line in result.stdout.splitlines():
        match = LINE.match(line)
        assert match, f"not a '<scope> <figure> <value>' line: {line!r}"
        figures[f"{match[1]} {match[2]}"] = match[3]
    assert list(figures)[0] == "machine cpu"
    for scope, size in (("dinov2_vits14", "28"),):
        assert figures[f"{scope} image_size"] == size
        assert figures[f"{scope} probe_runtime"] == "tensorflow"
        rates = [number(figures, f"{scope} {kind}_img_per_s")
                 for kind in ("probe", "probe_model", "keras")]
        assert all(rate > 0 for rate in rates)
        assert close(number(figures, f"{scope} probe_over_keras"), rates[0] / rates[2])
        assert close(number(figures, f"{scope} probe_model_over_keras"), rates[1] / rates[2])


def test_extract_benchmark_prints_consistent_figures(tmp_path):
    figures = run_benchmark(tmp_path)
    scope = "resnet50"
    rates = {key: number(figures, f"{scope} {key}") for key in (
        "limit_unfolded_img_per_s", "limit_img_per_s", "extract_img_per_s", "keras_img_per_s",
        "decode_img_per_s_per_core")}
    assert all(rate > 0 for rate in rates.values()), rates
    # every ratio is the quotient of the rates printed with it
    assert close(number(figures, f"{scope} fold_speedup"),
                 rates["limit_img_per_s"] / rates["limit_unfolded_img_per_s"])
    assert close(number(figures, f"{scope} extract_over_keras"),
                 rates["extract_img_per_s"] / rates["keras_img_per_s"])
    assert close(number(figures, f"{scope} extract_over_limit"),
                 rates["extract_img_per_s"] / rates["limit_img_per_s"])
    assert close(number(figures, f"{scope} decode_img_per_s_per_core"),
                 1e3 / number(figures, f"{scope} decode_ms_per_image_one_core"))
    # the batch loop's ceiling, and the decoding cores the model alone would need
    decode_s = number(figures, f"{scope} decode_ms_per_image_one_core") / 1e3
    pipeline = number(figures, f"{scope} pipeline_img_per_s")
    threads = number(figures, f"{scope} pipeline_threads")
    assert pipeline > 0 and threads == min(8, os.cpu_count())
    assert close(number(figures, f"{scope} pipeline_over_decode_cores"),
                 pipeline * decode_s / threads)
    assert close(number(figures, f"{scope} pipeline_over_limit"),
                 pipeline / rates["limit_img_per_s"])
    assert close(number(figures, f"{scope} decode_cores_to_feed_limit"),
                 rates["limit_img_per_s"] * decode_s)
    assert figures["machine accelerator"] and " on tensorflow " in figures["machine versions"]
    # the CPU named first: its model, then the flags that decide bf16's speed
    assert list(figures)[:2] == ["machine cpu", "machine cpu_flags"]
    assert re.fullmatch(r"has .+; lacks .+", figures["machine cpu_flags"])
    assert all(flag in figures["machine cpu_flags"] for flag in ("avx512f", "amx_bf16"))
    # resnet50 has BatchNormalizations to fold: the same features up to float rounding
    difference = number(figures, f"{scope} fold_max_rel_diff")
    assert 0 < difference <= 1e-4
    for key in ("build_s", "fold_s", "fit_logreg_s"):
        assert number(figures, f"{scope} {key}") > 0, key
    assert number(figures, "memory_15 peak_rss_mb") > 100
    assert number(figures, "machine load_average_1min") >= 0
    if figures["machine bf16"] == "supported":
        assert number(figures, f"{scope} speedup_bf16") > 0
        assert number(figures, f"{scope} limit_speedup_bf16") > 0
        assert figures[f"{scope} runtime_bf16"] in ("openvino", "tensorflow")
        assert 0.9 < number(figures, f"{scope} cosine_bf16_vs_float32") <= 1.0 + 1e-6
    else:
        assert figures["machine bf16"].startswith("unsupported: ")
        assert f"{scope} speedup_bf16" not in figures
        # said again where the backbone's bf16 figures would be, with the reason
        reason = figures["machine bf16"].removeprefix("unsupported: ")
        assert figures[f"{scope} bf16"] == f"not available here: {reason}"
    assert len(list((tmp_path / "photos-15").glob("*/*.jpg"))) == 15
    if importlib.util.find_spec("openvino") is not None:  # the OpenVINO runtime's lines
        openvino = {key: number(figures, f"{scope} {key}") for key in (
            "limit_openvino_img_per_s", "extract_openvino_img_per_s")}
        assert close(number(figures, f"{scope} openvino_over_tensorflow"),
                     openvino["limit_openvino_img_per_s"] / rates["limit_img_per_s"])
        assert close(number(figures, f"{scope} extract_openvino_over_keras"),
                     openvino["extract_openvino_img_per_s"] / rates["keras_img_per_s"])
        assert 0 < number(figures, f"{scope} openvino_max_rel_diff") <= 1e-4
        assert number(figures, f"{scope} convert_openvino_s") > 0


def test_pipeline_benchmark_prints_a_rate_and_its_scaling_per_thread_count(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pipeline.py"), "--n", "12",
         "--backbones", "vgg16", "--image-size", "32", "--threads", "1,2", "--repeats", "1",
         "--batch-size", "4", "--workdir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = dict(LINE.match(line).group(2, 3) for line in result.stdout.splitlines()
                   if line.startswith("vgg16 "))
    per_core = float(figures["decode_img_per_s_per_core"])
    for threads in (1, 2):
        rate = float(figures[f"pipeline_threads_{threads}_img_per_s"])
        assert rate > 0
        assert close(float(figures[f"pipeline_threads_{threads}_scaling"]),
                     rate / per_core / threads)


def test_ceiling_benchmark_counts_the_convolutions_work_and_what_the_goal_needs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ceiling.py"), "--n", "12",
         "--backbones", "resnet50", "--image-size", "32", "--repeats", "1",
         "--batch-size", "4", "--workdir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [LINE.match(line) for line in result.stdout.splitlines()]
    assert all(lines), result.stdout
    figures = {f"{m[1]} {m[2]}": m[3] for m in lines}
    value = {key: float(v) for key, v in figures.items() if re.fullmatch(r"[-+0-9.e]+", v)}

    # the work of the Keras model's convolutions, counted on its layers
    import probe
    from probe._keras import keras

    model = probe.get_backbone("resnet50").build(weights="none", image_size=32)
    expected = sum(
        2 * math.prod(layer.kernel.shape) * math.prod(layer.output.shape[1:3])
        for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert close(value["resnet50 gflop_per_image"], expected / 1e9)
    gflop, recipe = value["resnet50 gflop_per_image"], value["resnet50 recipe_img_per_s"]
    plain = value["resnet50 openvino_plain_img_per_s"]
    assert close(value["resnet50 openvino_plain_gflop_per_s"], plain * gflop)
    assert close(value["resnet50 recipe_gflop_per_s"], recipe * gflop)
    assert close(value["resnet50 openvino_over_plain"],
                 value["resnet50 openvino_img_per_s"] / plain)
    assert close(value["resnet50 needed_over_openvino_plain"], 1.3 * recipe / plain)
    assert close(value["resnet50 needed_over_matmul"],
                 1.3 * recipe * gflop / value["machine matmul_gflop_per_s"])


@pytest.mark.slow
def test_bf16_accuracy_benchmark_prints_both_accuracies_and_their_difference():
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bf16_accuracy.py"), "--backbones", "vgg16",
         "--n", "100", "--image-size", "32", "--batch-size", "50"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [LINE.match(line) for line in result.stdout.splitlines()]
    assert all(lines), result.stdout
    figures = {f"{m[1]} {m[2]}": m[3] for m in lines}
    assert figures["vgg16 bf16_path"].startswith(("TensorFlow mixed_bfloat16", "--precision bf16"))
    assert int(figures["vgg16 test_images"]) == 15  # 15% of 100, stratified
    worst = 0.0
    for head in ("logreg", "knn"):
        fp32, bf16 = (float(figures[f"vgg16 {head}_accuracy_{p}"]) for p in ("float32", "bf16"))
        assert 0 < fp32 <= 1 and 0 < bf16 <= 1
        assert abs(float(figures[f"vgg16 {head}_diff_points"]) - 100 * (bf16 - fp32)) < 0.01
        assert 0 <= float(figures[f"vgg16 {head}_same_predictions"]) <= 1
        worst = max(worst, abs(100 * (bf16 - fp32)))
    assert abs(float(figures["all largest_abs_diff_points"]) - worst) < 0.01
    assert 0 < float(figures["vgg16 bf16_max_rel_diff"]) < 0.1  # bfloat16 rounding, not equality


def test_bf16_accuracy_digits_are_upscaled_rgb_and_split_once():
    spec = importlib.util.spec_from_file_location("bf16_accuracy", ROOT / "benchmarks" / "bf16_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pixels, y = module.digits_images(20, 32)
    assert pixels.shape == (20, 32, 32, 3) and y.shape == (20,)
    from sklearn.datasets import load_digits

    first = load_digits().images[0] * (255 / 16)
    # nearest neighbour: every 4x4 block is one source pixel, the same in each channel
    assert np.allclose(pixels[0, ::4, ::4, 0], first) and np.allclose(pixels[0, 3::4, 3::4, 2], first)
    parts = module.split(np.arange(100) % 10)
    together = np.concatenate(list(parts.values()))
    assert sorted(together.tolist()) == list(range(100))
    assert [len(parts[k]) for k in ("train", "val", "test")] == [70, 15, 15]
    assert parts["test"].tolist() == module.split(np.arange(100) % 10)["test"].tolist()


def test_the_reports_map_takes_the_exact_principal_axes():
    """The report's 2-D map uses a randomized SVD above 50 features (three quarters of a
    logistic fit's time went to the full SVD): it must draw the exact principal axes."""
    from probe.html import pca_2d

    rng = np.random.default_rng(0)
    # pooled-CNN-like: non-negative, correlated, two dominant directions
    X = np.maximum(rng.normal(size=(300, 3)) * [5, 3, 1] @ rng.normal(size=(3, 400))
                   + rng.normal(size=(300, 400)), 0).astype(np.float32)
    centred = X - X.mean(axis=0)
    axes = np.linalg.svd(centred, full_matrices=False)[2][:2]
    axes = axes * np.sign(axes[np.arange(2), np.abs(axes).argmax(axis=1)])[:, None]
    exact, randomized = centred @ axes.T, pca_2d(X)
    assert randomized.shape == exact.shape == (300, 2)
    assert np.allclose(randomized, exact, atol=1e-3 * np.abs(exact).max())
