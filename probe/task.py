"""What differs between a single-label and a multi-label dataset, in one place.

A single-label dataset labels each image with one class (labels: (N,) class indices); a
multi-label one with a set of classes (labels: an (N, K) 0/1 matrix, VOC or CSV tags).
Everything downstream of the labels that depends on which it is lives here: the metrics
and their intervals (`probe.evaluate`), the scores a comparison row keeps and its table
columns, the ranking score and its name, the prediction files and figure of a run, the
decision of a prediction (argmax, or each class at its threshold), the thresholds a run
records, and how fine-tuning trains. The rest of probe obtains the task once, from the
labels (`Task.of_labels`), the recorded flag (`Task.of_flag`: a cache's or a dataset's
`multilabel`), a run's config.json or metrics.json (`Task.of_record`) or a comparison row
(`Task.of_row`), and asks it.

On disk the task is the flag `multilabel: true`, written on multi-label caches, run
configurations, metrics and comparison settings only (`Task.flag`): single-label files
stay as they were before multi-label datasets existed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from . import evaluate, files, report
from .errors import RunError

__all__ = ["Task", "SingleLabel", "MultiLabel", "SINGLE_LABEL", "MULTI_LABEL", "Objective",
           "TABLE_COLUMNS", "CSV_COLUMNS", "INTERVAL_KEYS", "ML_TABLE_COLUMNS", "ML_CSV_COLUMNS",
           "ML_SCORES", "ML_INTERVAL_KEYS", "PREDICTIONS_FILE"]

PREDICTIONS_FILE = "test_predictions.csv"
CONFUSION_FIGURE = "confusion_matrix.png"
PR_FIGURE = "precision_recall.png"

# The columns of a comparison after the scores: what every row has, whatever the task.
_TAIL_COLUMNS = [("feature_size", "features"), ("images_per_second", "extract_img/s"),
                 ("fit_seconds", "fit_s"), ("status", "status")]
_CSV_TAIL = ["expected_calibration_error", "temperature", "split", "split_role", "n_samples",
             "extraction", "image_size", "weights", "run", "cache", "error"]

# (record key, table header) of a ranked single-label comparison, in order.
TABLE_COLUMNS = [
    ("rank", "rank"), ("backbone", "backbone"), ("head", "head"),
    ("accuracy", "accuracy"), ("accuracy_ci", "accuracy_95%"), ("tied", "tied"),
    ("balanced_accuracy", "balanced_acc"), ("macro_f1", "macro_f1"),
    *_TAIL_COLUMNS,
]
CSV_COLUMNS = [key for key, _ in TABLE_COLUMNS] + [
    "balanced_accuracy_ci", "macro_f1_ci", *_CSV_TAIL]
SCORES = ("accuracy", "balanced_accuracy", "macro_f1")
INTERVAL_KEYS = ("accuracy_ci", "balanced_accuracy_ci", "macro_f1_ci")

# a multi-label comparison: ranked by mean average precision (threshold-free), with the F1
# scores and exact-match accuracy at each head's thresholds
ML_TABLE_COLUMNS = [
    ("rank", "rank"), ("backbone", "backbone"), ("head", "head"),
    ("mean_average_precision", "mAP"), ("mean_average_precision_ci", "mAP_95%"), ("tied", "tied"),
    ("micro_f1", "micro_f1"), ("macro_f1", "macro_f1"), ("exact_match_accuracy", "exact_match"),
    *_TAIL_COLUMNS,
]
ML_CSV_COLUMNS = [key for key, _ in ML_TABLE_COLUMNS] + [
    "micro_f1_ci", "macro_f1_ci", "exact_match_accuracy_ci", *_CSV_TAIL]
ML_SCORES = ("mean_average_precision", "micro_f1", "macro_f1", "exact_match_accuracy")
ML_INTERVAL_KEYS = tuple(f"{key}_ci" for key in ML_SCORES)


@dataclass(frozen=True)
class Objective:
    """How Keras trains a model of the task end to end: its loss, its metrics (the
    history's "accuracy" either way) and the `class_weight` argument of `fit`."""

    loss: Any
    metrics: list
    class_weight: dict | None


class Task:
    """What a kind of labels decides. Use the two instances, `SINGLE_LABEL` and
    `MULTI_LABEL`, obtained with the `of_*` constructors."""

    multilabel: bool
    score: str  # the record key comparisons rank by
    score_name: str  # how the ranking score is named in sentences
    exact_score_name: str  # the score whose interval is Wilson's (the others: bootstrap)
    scores: tuple[str, ...]  # the scores a comparison row keeps
    interval_keys: tuple[str, ...]
    table_columns: list[tuple[str, str]]
    csv_columns: list[str]
    headline: tuple[str, ...]  # the scores fine-tuning compares before / after
    ranking_notes: tuple[str, ...] = ()  # lines a comparison's Markdown adds

    # --- obtaining the task, once ------------------------------------------------------

    @staticmethod
    def of_flag(multilabel: Any) -> "Task":
        """The task a recorded flag names (a cache's or a dataset's `multilabel`)."""
        return MULTI_LABEL if multilabel else SINGLE_LABEL

    @staticmethod
    def of_labels(labels: Any) -> "Task":
        """The task of a split's labels: an (N, K) 0/1 matrix is multi-label."""
        return Task.of_flag(np.ndim(labels) == 2)

    @staticmethod
    def of_record(record: Mapping) -> "Task":
        """The task of a run's config.json or metrics.json, or of a comparison's settings
        (the key "multilabel", written on multi-label ones only)."""
        return Task.of_flag(record.get("multilabel"))

    @staticmethod
    def of_row(row: Mapping) -> "Task":
        """The task of a comparison row (a record, or a row of compare.csv): multi-label
        rows carry a mean average precision."""
        return Task.of_flag(row.get(MULTI_LABEL.score) is not None)

    # --- what the files record -----------------------------------------------------------

    def flag(self) -> dict:
        """The flag of the task as JSON files record it (nothing for single-label)."""
        return {"multilabel": True} if self.multilabel else {}

    def config(self, classes: list[str], thresholds: np.ndarray | None) -> dict:
        """What config.json records of the task: the flag, and multi-label decision
        thresholds per class (probability >= threshold: the class is predicted)."""
        raise NotImplementedError

    def recorded_thresholds(self, config: Mapping, classes: list[str],
                            where: Path) -> np.ndarray | None:
        """The decision thresholds a run's config.json (`where`) records, in class order;
        None for a single-label run."""
        raise NotImplementedError

    def head_thresholds(self, head: Any) -> np.ndarray | None:
        """A fitted head's decision thresholds (None for single-label)."""
        raise NotImplementedError

    # --- scores --------------------------------------------------------------------------

    def metrics(self, labels: Any, proba: Any, classes: list[str], thresholds: Any = None,
                ignore: Any = None, seed: int = 0) -> dict:
        """The metrics of `proba` against `labels` with their 95% intervals
        (`probe.evaluate`); multi-label: at `thresholds`, the entries of `ignore` left out."""
        raise NotImplementedError

    def row_scores(self, metrics: Mapping) -> dict:
        """The scores and intervals of a run's metrics that a comparison row keeps."""
        return {**{key: metrics[key] for key in self.scores},
                **{key: metrics.get(key) for key in self.interval_keys}}

    def choose_thresholds(self, labels: Any, proba: Callable[[], np.ndarray],
                          ignore: Any = None) -> np.ndarray | None:
        """Multi-label: the per-class thresholds of best F1 on `labels` and the
        probabilities `proba()` gives (only called then); None for single-label."""
        raise NotImplementedError

    # --- predictions ---------------------------------------------------------------------

    def decide(self, row: np.ndarray, classes: list[str],
               thresholds: np.ndarray | None) -> tuple[str, list[str] | None]:
        """One image's prediction as text, and (multi-label) its predicted classes."""
        raise NotImplementedError

    def label_text(self, label: Any, classes: list[str]) -> str:
        """One image's label as text: its class, or its classes joined by ';'."""
        raise NotImplementedError

    def label_name(self, label: Any, classes: list[str]) -> str:
        """`label_text` where it is shown on its own: "none" for an image without a class."""
        return self.label_text(label, classes) or "none"

    def write_predictions(self, directory: Path, paths: list[str], labels: Any, proba: np.ndarray,
                          classes: list[str], metrics: Mapping, thresholds: Any = None,
                          ignore: Any = None) -> None:
        """test_predictions.csv (path, the true and the predicted label, every
        probability) and the task's figure of the reported split."""
        rows = [(p, self.label_text(truth, classes), self.decide(row, classes, thresholds)[0],
                 *(f"{v:.6f}" for v in row)) for p, truth, row in zip(paths, labels, proba)]
        with files.atomic_write(directory / PREDICTIONS_FILE, "w", newline="", encoding="utf-8",
                                errors="surrogateescape") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "true", "predicted", *classes])
            writer.writerows(rows)
        role = metrics.get("split_role") or metrics.get("split", "test")
        self._draw(directory, labels, proba, classes, metrics, ignore, role)

    def _draw(self, directory: Path, labels: Any, proba: np.ndarray, classes: list[str],
              metrics: Mapping, ignore: Any, role: str) -> None:
        raise NotImplementedError

    # --- label-efficiency curves and fine-tuning -------------------------------------------

    curve_scores: tuple[str, ...]  # the scores of a label-efficiency curve; the first is plotted

    def curve_strata(self, labels: np.ndarray) -> np.ndarray:
        """Each training image's stratum for a curve's subsets (shots per stratum): its
        class index; multi-label: its rarest class (see `MultiLabel`)."""
        raise NotImplementedError

    def class_matrix(self, labels: np.ndarray, n_classes: int) -> np.ndarray:
        """(N, K) bool: whether each image carries each class."""
        raise NotImplementedError

    def curve_score_values(self, head: Any, features: np.ndarray, labels: np.ndarray,
                           ignore: Any = None) -> dict[str, float]:
        """The `curve_scores` of a fitted head on a split."""
        raise NotImplementedError

    def chance_levels(self, labels: np.ndarray, ignore: Any = None) -> dict[str, float]:
        """What each of `curve_scores` is on `labels` without any learning."""
        raise NotImplementedError

    def objective(self, class_weight: str | None, train_labels: np.ndarray,
                  n_classes: int) -> Objective:
        """How fine-tuning trains: loss, metrics and class weights (`class_weight`: the
        source head's setting, "balanced" or None)."""
        raise NotImplementedError

    def cache_summary(self, classes: list[str]) -> str:
        """What `probe extract` adds to a cache's counts (nothing for single-label)."""
        return ""

    def label_count_lines(self, info: Mapping) -> list[str]:
        """`probe cache info`'s lines on the labels (multi-label: images per class)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SingleLabel(Task):
    """One class per image: accuracy ranks, argmax decides, a confusion matrix shows."""

    multilabel = False
    score = "accuracy"
    score_name = "accuracy"
    exact_score_name = "accuracy"
    scores = SCORES
    interval_keys = INTERVAL_KEYS
    table_columns = TABLE_COLUMNS
    csv_columns = CSV_COLUMNS
    headline = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "top5_accuracy")
    curve_scores = ("accuracy", "balanced_accuracy")

    def config(self, classes: list[str], thresholds: np.ndarray | None) -> dict:
        return {}

    def recorded_thresholds(self, config: Mapping, classes: list[str],
                            where: Path) -> np.ndarray | None:
        return None

    def head_thresholds(self, head: Any) -> np.ndarray | None:
        return None

    def metrics(self, labels: Any, proba: Any, classes: list[str], thresholds: Any = None,
                ignore: Any = None, seed: int = 0) -> dict:
        return evaluate.compute_metrics(labels, proba, classes, seed=seed)

    def choose_thresholds(self, labels: Any, proba: Callable[[], np.ndarray],
                          ignore: Any = None) -> np.ndarray | None:
        return None

    def decide(self, row: np.ndarray, classes: list[str],
               thresholds: np.ndarray | None) -> tuple[str, list[str] | None]:
        return classes[int(np.argmax(row))], None

    def label_text(self, label: Any, classes: list[str]) -> str:
        return classes[int(label)]

    def _draw(self, directory: Path, labels: Any, proba: np.ndarray, classes: list[str],
              metrics: Mapping, ignore: Any, role: str) -> None:
        report.plot_confusion_matrix(metrics["confusion_matrix"], classes,
                                     directory / CONFUSION_FIGURE,
                                     title=f"Confusion matrix ({role})")

    def curve_strata(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(labels)

    def class_matrix(self, labels: np.ndarray, n_classes: int) -> np.ndarray:
        return np.arange(n_classes)[None, :] == np.asarray(labels)[:, None]

    def curve_score_values(self, head: Any, features: np.ndarray, labels: np.ndarray,
                           ignore: Any = None) -> dict[str, float]:
        predicted = head.predict(features)
        recalls = [np.mean(predicted[labels == c] == c) for c in np.unique(labels)]
        return {"accuracy": float(np.mean(predicted == labels)),
                "balanced_accuracy": float(np.mean(recalls))}

    def chance_levels(self, labels: np.ndarray, ignore: Any = None) -> dict[str, float]:
        """Accuracy: the share of the most frequent class (always predicting it);
        balanced accuracy: 1 / the number of classes present."""
        counts = np.bincount(np.asarray(labels, dtype=np.int64))
        present = counts[counts > 0]
        return {"accuracy": float(present.max() / present.sum()) if present.size else 0.0,
                "balanced_accuracy": 1.0 / present.size if present.size else 0.0}

    def objective(self, class_weight: str | None, train_labels: np.ndarray,
                  n_classes: int) -> Objective:
        from .heads.base import keras_class_weight

        return Objective("sparse_categorical_crossentropy", ["accuracy"],
                         keras_class_weight(class_weight, train_labels, n_classes))


class MultiLabel(Task):
    """A set of classes per image: mean average precision ranks (threshold-free), each
    class is predicted at its own threshold, precision-recall curves show."""

    multilabel = True
    score = "mean_average_precision"
    score_name = "mean average precision"
    exact_score_name = "exact match"
    scores = ML_SCORES
    interval_keys = ML_INTERVAL_KEYS
    table_columns = ML_TABLE_COLUMNS
    csv_columns = ML_CSV_COLUMNS
    headline = ("mean_average_precision", "micro_f1", "macro_f1", "exact_match_accuracy",
                "log_loss")
    curve_scores = ("mean_average_precision",)
    ranking_notes = ("Multi-label: ranked by mean average precision (threshold-free); the F1 "
                     "scores and exact match are at each head's per-class thresholds, chosen "
                     "on validation.",)

    def config(self, classes: list[str], thresholds: np.ndarray | None) -> dict:
        return {**self.flag(),
                "thresholds": {str(c): float(t) for c, t in zip(classes, thresholds)}}

    def recorded_thresholds(self, config: Mapping, classes: list[str],
                            where: Path) -> np.ndarray | None:
        try:
            return np.array([float(config.get("thresholds")[c]) for c in classes])
        except (KeyError, TypeError, ValueError):
            raise RunError(f"'{where}' records no decision threshold per class for this "
                           "multi-label run; re-run `probe fit`.") from None

    def head_thresholds(self, head: Any) -> np.ndarray | None:
        return head.thresholds_

    def metrics(self, labels: Any, proba: Any, classes: list[str], thresholds: Any = None,
                ignore: Any = None, seed: int = 0) -> dict:
        return evaluate.compute_multilabel_metrics(labels, proba, classes, thresholds,
                                                   ignore=ignore, seed=seed)

    def choose_thresholds(self, labels: Any, proba: Callable[[], np.ndarray],
                          ignore: Any = None) -> np.ndarray | None:
        return evaluate.best_f1_thresholds(labels, proba(), ignore)

    def decide(self, row: np.ndarray, classes: list[str],
               thresholds: np.ndarray | None) -> tuple[str, list[str] | None]:
        labels = [c for c, v, t in zip(classes, row, thresholds) if v >= t]
        return ";".join(labels), labels

    def label_text(self, label: Any, classes: list[str]) -> str:
        return ";".join(c for c, present in zip(classes, label) if present)

    def _draw(self, directory: Path, labels: Any, proba: np.ndarray, classes: list[str],
              metrics: Mapping, ignore: Any, role: str) -> None:
        report.plot_precision_recall(labels, proba, classes, directory / PR_FIGURE, ignore=ignore,
                                     title=f"Precision-recall per class ({role})")

    def curve_strata(self, labels: np.ndarray) -> np.ndarray:
        """The rarest class of each image (fewest training images, then the lower index),
        as the dataset's splits are stratified (`probe.data`); K for an image without a
        class, so rare classes reach every subset."""
        Y = np.asarray(labels, dtype=bool)
        counts = Y.sum(axis=0)
        # classes ranked rarest first; an image's stratum is its class of lowest rank
        rank = np.empty(Y.shape[1], dtype=np.int64)
        rank[np.lexsort((np.arange(Y.shape[1]), counts))] = np.arange(Y.shape[1])
        ranked = np.where(Y, rank[None, :], Y.shape[1])
        by_rank = np.append(np.argsort(rank), Y.shape[1])
        return by_rank[ranked.min(axis=1, initial=Y.shape[1])]

    def class_matrix(self, labels: np.ndarray, n_classes: int) -> np.ndarray:
        return np.asarray(labels, dtype=bool)

    def curve_score_values(self, head: Any, features: np.ndarray, labels: np.ndarray,
                           ignore: Any = None) -> dict[str, float]:
        return {"mean_average_precision": evaluate.mean_average_precision(
            labels, head.predict_proba(features), ignore)}

    def chance_levels(self, labels: np.ndarray, ignore: Any = None) -> dict[str, float]:
        """The mean average precision of a random ranking: per class with a positive, the
        expectation of its average precision (`expected_random_average_precision`:
        the positive rate, plus a term that vanishes as the split grows)."""
        Y = np.asarray(labels)
        keep = np.ones(Y.shape, dtype=bool) if ignore is None else ~np.asarray(ignore, dtype=bool)
        values = [expected_random_average_precision(int(Y[keep[:, k], k].sum()), int(keep[:, k].sum()))
                  for k in range(Y.shape[1]) if Y[keep[:, k], k].any()]
        return {"mean_average_precision": float(np.mean(values)) if values else 0.0}

    def objective(self, class_weight: str | None, train_labels: np.ndarray,
                  n_classes: int) -> Objective:
        from ._keras import keras

        # independent sigmoid outputs: binary cross-entropy; "balanced" weighs each
        # class's positives and negatives apart (as the dense head trains)
        loss = ("binary_crossentropy" if class_weight != "balanced"
                else _weighted_binary_crossentropy(train_labels))
        return Objective(loss, [keras.metrics.BinaryAccuracy(name="accuracy")], None)

    def cache_summary(self, classes: list[str]) -> str:
        return f"; multi-label, {len(classes)} class{'' if len(classes) == 1 else 'es'}"

    def label_count_lines(self, info: Mapping) -> list[str]:
        return [f"{'labels:':15} multi-label (images per class)",
                *(f"  {split}: " + ", ".join(f"{c} {n}" for c, n in counts.items())
                  for split, counts in info["label_counts"].items())]


def expected_random_average_precision(positives: int, n: int) -> float:
    """The expected average precision of a class with `positives` of `n` images under a
    uniformly random ranking: a positive at rank r has on average (r - 1)(P - 1)/(n - 1)
    other positives above it, so E[AP] = (1/n) sum_r (1 + (r - 1)(P - 1)/(n - 1)) / r
    = (P - 1)/(n - 1) + H_n/n (1 - (P - 1)/(n - 1)), H_n the n-th harmonic number.
    It tends to the positive rate P/n as n grows (0.40 for 10 of 30, against 0.33)."""
    if positives <= 0 or n <= 0:
        return 0.0
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    others = (positives - 1) / (n - 1) if n > 1 else 0.0
    return others + harmonic / n * (1.0 - others)


def _weighted_binary_crossentropy(train_labels: np.ndarray):
    """Binary cross-entropy with per-class weights of the positive and negative entries
    (for training only: the saved model is not compiled, so it loads in safe mode)."""
    from ._keras import keras
    from .heads.base import balanced_label_weights

    positive, negative = balanced_label_weights(train_labels)
    ops = keras.ops
    pos, neg = positive.astype(np.float32), negative.astype(np.float32)

    def loss(y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        p = ops.clip(y_pred, 1e-7, 1 - 1e-7)
        weights = y_true * pos + (1 - y_true) * neg
        return ops.mean(-weights * (y_true * ops.log(p) + (1 - y_true) * ops.log(1 - p)), axis=-1)

    return loss


SINGLE_LABEL = SingleLabel()
MULTI_LABEL = MultiLabel()
