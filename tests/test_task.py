"""The task object: each task's columns, ranking score, metrics, recorded thresholds and
prediction files, read back."""

import csv
from pathlib import Path

import numpy as np
import pytest

from probe.errors import RunError
from probe.task import MULTI_LABEL, SINGLE_LABEL, Task

CLASSES = ["cat", "dog", "fox"]


def single_label_data():
    labels = np.array([0, 1, 2, 0, 1, 2])
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6],
                      [0.3, 0.6, 0.1], [0.1, 0.5, 0.4], [0.1, 0.1, 0.8]])
    return labels, proba, None


def multi_label_data():
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0]])
    proba = np.array([[0.9, 0.1, 0.7], [0.2, 0.8, 0.3], [0.6, 0.4, 0.1],
                      [0.1, 0.2, 0.9], [0.3, 0.1, 0.2], [0.45, 0.6, 0.1]])
    return labels, proba, np.array([0.5, 0.5, 0.5])


TASKS = [(SINGLE_LABEL, single_label_data), (MULTI_LABEL, multi_label_data)]


def test_the_task_is_obtained_once_from_labels_flags_records_and_rows():
    assert Task.of_labels(np.zeros(4, dtype=int)) is SINGLE_LABEL
    assert Task.of_labels(np.zeros((4, 3), dtype=int)) is MULTI_LABEL
    assert Task.of_flag(False) is SINGLE_LABEL and Task.of_flag(True) is MULTI_LABEL
    assert Task.of_record({}) is SINGLE_LABEL and Task.of_record({"multilabel": True}) is MULTI_LABEL
    assert Task.of_row({"accuracy": 0.9}) is SINGLE_LABEL
    assert Task.of_row({"mean_average_precision": ""}) is MULTI_LABEL  # a compare.csv cell
    assert SINGLE_LABEL.flag() == {} and MULTI_LABEL.flag() == {"multilabel": True}


def test_each_task_names_a_label():
    assert SINGLE_LABEL.label_name(np.int64(1), CLASSES) == "dog"
    assert MULTI_LABEL.label_name(np.array([1, 0, 1]), CLASSES) == "cat;fox"
    assert MULTI_LABEL.label_name(np.array([0, 0, 0]), CLASSES) == "none"


@pytest.mark.parametrize("task, expected", [
    (SINGLE_LABEL, ("accuracy", "accuracy", ["accuracy", "accuracy_95%", "tied", "balanced_acc"])),
    (MULTI_LABEL, ("mean_average_precision", "mean average precision",
                   ["mAP", "mAP_95%", "tied", "micro_f1", "macro_f1", "exact_match"])),
])
def test_each_task_has_its_columns_and_ranking_score(task, expected):
    score, name, headers = expected
    assert (task.score, task.score_name) == (score, name)
    table_headers = [header for _, header in task.table_columns]
    assert table_headers[:3] == ["rank", "backbone", "head"]
    assert table_headers[3:3 + len(headers)] == headers
    keys = [key for key, _ in task.table_columns]
    assert task.csv_columns[:len(keys)] == keys  # the CSV starts with the table
    assert set(task.scores) | set(task.interval_keys) <= set(task.csv_columns)
    assert task.scores[0] == task.score and f"{score}_ci" in task.interval_keys


@pytest.mark.parametrize("task, data", TASKS)
def test_each_task_scores_and_keeps_its_row_scores(task, data):
    labels, proba, thresholds = data()
    metrics = task.metrics(labels, proba, CLASSES, thresholds)
    assert Task.of_record(metrics) is task  # metrics.json names its task
    row = task.row_scores(metrics)
    assert list(row) == [*task.scores, *task.interval_keys]
    assert 0 <= row[task.score] <= 1 and len(row[f"{task.score}_ci"]) == 2
    assert Task.of_row(row) is task
    assert set(task.headline) - {"top5_accuracy"} <= set(metrics)  # top-5: over 5 classes


@pytest.mark.parametrize("task, data", TASKS)
def test_prediction_files_read_back(task, data, tmp_path):
    labels, proba, thresholds = data()
    paths = [f"img{i}.jpg" for i in range(len(labels))]
    metrics = {**task.metrics(labels, proba, CLASSES, thresholds), "split": "test"}
    task.write_predictions(tmp_path, paths, labels, proba, CLASSES, metrics, thresholds)

    with open(tmp_path / "test_predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "true", "predicted", *CLASSES]
    assert [r[0] for r in rows[1:]] == paths
    assert np.allclose(np.array([[float(v) for v in r[3:]] for r in rows[1:]]), proba, atol=1e-6)
    if task is SINGLE_LABEL:
        assert [CLASSES.index(r[1]) for r in rows[1:]] == labels.tolist()
        assert [CLASSES.index(r[2]) for r in rows[1:]] == proba.argmax(axis=1).tolist()
        assert (tmp_path / "confusion_matrix.png").is_file()
    else:
        def matrix(column):
            return np.array([[c in r[column].split(";") for c in CLASSES] for r in rows[1:]])
        assert (matrix(1) == labels.astype(bool)).all()
        assert (matrix(2) == (proba >= thresholds)).all()
        assert rows[5][1] == ""  # an image without a label: an empty set
        assert (tmp_path / "precision_recall.png").is_file()


@pytest.mark.parametrize("task, data", TASKS)
def test_thresholds_recorded_in_a_config_read_back(task, data):
    _, proba, thresholds = data()
    config = {"classes": CLASSES, **task.config(CLASSES, thresholds)}
    assert Task.of_record(config) is task
    read = task.recorded_thresholds(config, CLASSES, Path("config.json"))
    if thresholds is None:
        assert read is None and task.config(CLASSES, None) == {}
        assert task.decide(proba[0], CLASSES, read) == ("cat", None)
    else:
        assert np.array_equal(read, thresholds)
        assert task.decide(proba[0], CLASSES, read) == ("cat;fox", ["cat", "fox"])
        with pytest.raises(RunError, match="no decision threshold per class"):
            task.recorded_thresholds({"multilabel": True}, CLASSES, Path("config.json"))


def test_both_tasks_have_label_efficiency_curves_with_their_strata_and_chance():
    labels = np.array([0, 2, 2, 1, 2])
    assert SINGLE_LABEL.curve_strata(labels).tolist() == labels.tolist()
    assert SINGLE_LABEL.class_matrix(labels, 3).sum(axis=0).tolist() == [1, 1, 3]
    assert SINGLE_LABEL.chance_levels(labels) == {"accuracy": 3 / 5, "balanced_accuracy": 1 / 3}
    # classes of 3, 2 and 1 images: an image's stratum is its rarest class; 3: no class
    Y = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 0], [0, 0, 0]])
    assert MULTI_LABEL.curve_strata(Y).tolist() == [1, 2, 1, 3]
    assert MULTI_LABEL.curve_scores == ("mean_average_precision",)


def test_the_cache_summary_counts_classes_in_words():
    assert SINGLE_LABEL.cache_summary(["a", "b"]) == ""
    assert MULTI_LABEL.cache_summary(["a"]) == "; multi-label, 1 class"
    assert MULTI_LABEL.cache_summary(["a", "b"]) == "; multi-label, 2 classes"
