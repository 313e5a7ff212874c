"""The extraction benchmark runs, on a tiny setting, and prints every figure."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_extract_benchmark_runs_on_a_tiny_setting(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "extract.py"), "--n", "15",
         "--backbones", "vgg16", "--image-size", "32", "--heads", "logreg",
         "--memory-sizes", "15", "--memory-image-size", "32", "--workdir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = {}
    for line in result.stdout.splitlines():
        scope, figure, value = (line.split(" ", 2) + ["", ""])[:3]
        figures[f"{scope} {figure}"] = value
    for key in ("vgg16 limit_img_per_s", "vgg16 extract_img_per_s", "vgg16 keras_img_per_s",
                "vgg16 extract_over_limit", "vgg16 extract_over_keras", "vgg16 fit_logreg_s",
                "vgg16 extract_over_fit_logreg", "memory_15 peak_rss_mb"):
        assert float(figures[key]) > 0, key
    if figures["machine bf16"] == "supported":
        assert float(figures["vgg16 speedup_bf16"]) > 0
        assert 0.9 < float(figures["vgg16 cosine_bf16_vs_float32"]) <= 1.0 + 1e-6
        assert "vgg16 logreg_test_accuracy_bf16" in figures
    assert len(list((tmp_path / "photos-15").glob("*/*.jpg"))) == 15
