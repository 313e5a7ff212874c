"""Tests of probe.report: metrics against scikit-learn, plots, tables."""

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss

from probe.errors import DatasetError, ProbeError
from probe.evaluate import wilson_interval
from probe.report import (compute_metrics, format_interval, format_table, plot_confusion_matrix,
                          plot_curves, printable)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def noisy_predictions(n=200, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5  # mostly right, sometimes wrong
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


@pytest.mark.parametrize("k", [3, 8])
def test_metrics_agree_with_sklearn(k):
    y, proba = noisy_predictions(k=k)
    classes = [f"c{i}" for i in range(k)]
    pred = proba.argmax(axis=1)
    m = compute_metrics(y, proba, classes)

    assert m["n_samples"] == 200
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert m["log_loss"] == pytest.approx(log_loss(y, proba))
    assert set(m["per_class"]) == set(classes)
    for i, name in enumerate(classes):
        assert m["per_class"][name]["support"] == int(np.sum(y == i))
        assert m["per_class"][name]["f1"] == pytest.approx(f1_score(y, pred, average=None)[i])
    assert m["accuracy_ci"] == pytest.approx(list(wilson_interval(int(np.sum(pred == y)), 200)))
    # rows of the confusion matrix are true classes
    assert [sum(row) for row in m["confusion_matrix"]] == [int(np.sum(y == i)) for i in range(k)]
    # plain Python types only
    assert json.loads(json.dumps(m)) == m
    assert ("top5_accuracy" in m) == (k > 5)
    if k > 5:
        top5 = np.argsort(-proba, axis=1)[:, :5]
        assert m["top5_accuracy"] == pytest.approx(np.mean((top5 == y[:, None]).any(axis=1)))
        assert m["top5_accuracy"] >= m["accuracy"]


def test_metrics_with_class_absent_from_test_split():
    # class 2 never appears in y_true and is never predicted
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1]], dtype=np.float32)
    m = compute_metrics(y, proba, ["a", "b", "c"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert np.isfinite(m["log_loss"])


def test_metrics_reject_bad_input():
    y, proba = noisy_predictions()
    with pytest.raises(DatasetError, match="shape"):
        compute_metrics(y, proba, ["a", "b"])
    with pytest.raises(DatasetError, match="one label per row"):
        compute_metrics(y[:-1], proba, ["a", "b", "c"])
    with pytest.raises(DatasetError, match="probabilities"):
        compute_metrics(y, proba * 3, ["a", "b", "c"])


def test_plot_confusion_matrix_writes_png(tmp_path):
    matrix = [[5, 1, 0], [2, 7, 1], [0, 0, 9]]
    out = plot_confusion_matrix(matrix, ["cat", "dog", "owl"], tmp_path / "plots" / "cm.png")
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ProbeError, match="3x3"):
        plot_confusion_matrix([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "bad.png")


def test_plot_curves_writes_png(tmp_path):
    history = {
        "loss": [1.0, 0.6, 0.4],
        "accuracy": [0.5, 0.7, 0.8],
        "val_loss": [1.1, 0.7, 0.6],
        "val_accuracy": [0.4, 0.6, 0.7],
    }
    out = plot_curves(history, tmp_path / "curves.png")
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == PNG_MAGIC
    # without validation series, and the sweep of a logistic head
    assert plot_curves({"loss": [1.0, 0.5], "accuracy": [0.5, 0.9]}, tmp_path / "train.png").stat().st_size > 0
    with pytest.raises(ProbeError, match="no series"):
        plot_curves({}, tmp_path / "empty.png")


def test_format_table():
    rows = [
        {"backbone": "resnet50", "head": "logreg", "accuracy": 10.91234567, "n": 120},
        {"backbone": "mobilenet_v3_small", "head": "dense", "accuracy": 0.5, "n": 7},
        {"backbone": "efficientnet_b0", "head": "dense"},
    ]
    text = format_table(rows, ["backbone", "head", "accuracy", "n"])
    lines = text.splitlines()
    assert len(lines) == 5
    assert lines[0].split() == ["backbone", "head", "accuracy", "n"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert "10.9123" in lines[2] and "0.5000" in lines[3]
    assert lines[4].split() == ["efficientnet_b0", "dense", "-", "-"]
    # numbers are right-aligned: values of different widths end at the same offset
    assert lines[2].index("10.9123") + len("10.9123") == lines[3].index("0.5000") + len("0.5000")
    assert lines[2].index("10.9123") != lines[3].index("0.5000")
    assert lines[2].endswith("120") and lines[3].endswith("  7")
    # text columns are left-aligned
    assert lines[2].index("logreg") == lines[3].index("dense")
    assert not text.endswith("\n")
    assert format_table([], ["a", "b"]).splitlines()[0].split() == ["a", "b"]


def test_interval_text_and_class_names_that_are_not_utf8(tmp_path):
    assert format_interval([0.81234, 0.9]) == "[0.8123, 0.9000]" and format_interval(None) == "-"
    name = b"caf\xe9".decode("utf-8", "surrogateescape")  # a Latin-1 folder name
    assert printable(name) == "caf\ufffd"
    out = plot_confusion_matrix([[1, 0], [0, 1]], [name, "b"], tmp_path / "cm.png", title="Confusion matrix (test)")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_reliability_draws_both_series_with_their_ece(tmp_path, monkeypatch):
    from probe import calibration, report

    y, proba = noisy_predictions()
    after = calibration.top_label(y, calibration.apply_temperature(proba, 2.0))
    before = calibration.top_label(y, proba)
    drawn = []
    real_new_figure = report._new_figure

    def keep(*args):
        drawn.append(real_new_figure(*args))
        return drawn[-1]

    monkeypatch.setattr(report, "_new_figure", keep)
    out = report.plot_reliability(after, tmp_path / "reliability.png", before=before,
                                  temperature=2.0, title="Reliability (test)")
    assert out.read_bytes()[:8] == PNG_MAGIC
    top = drawn[0].axes[0]
    labels = [line.get_label() for line in top.get_lines()]
    expected = calibration.expected_calibration_error(y, proba)
    assert labels[0] == "perfect calibration"
    assert f"before (the head's own): ECE {expected:.4f}" in labels
    assert any(label.startswith("after temperature: ECE") and "T = 2" in label for label in labels)
    # the points are the bins' mean confidence and accuracy
    table = calibration.reliability_table(*before)
    line = next(line for line in top.get_lines() if line.get_label().startswith("before"))
    np.testing.assert_allclose(line.get_xdata(), [r["confidence"] for r in table])
    np.testing.assert_allclose(line.get_ydata(), [r["accuracy"] for r in table])


def test_the_run_page_states_the_temperature_and_the_ece_before_and_after():
    from probe import html

    text = html._calibration_text({"expected_calibration_error": 0.031,
                                   "expected_calibration_error_uncalibrated": 0.2125,
                                   "temperature": 1.8,
                                   "temperature_from": "the validation predictions <b>"})
    assert "T = 1.8" in text and "0.2125 before, 0.0310 after" in text
    assert "&lt;b&gt;" in text and "<b>" not in text  # escaped
    plain = html._calibration_text({"expected_calibration_error": 0.05, "temperature": 1.0,
                                    "temperature_note": "no validation split: ..."})
    assert "no temperature applied (T = 1)" in plain and "No validation split" in plain
    assert html._calibration_text({"accuracy": 1.0}) == ""
