"""compare on a multi-label dataset: rows ranked by mean average precision."""

from pathlib import Path

from probe.compare import ML_CSV_COLUMNS, Comparison, headline, rank


def row(head, mean_ap, interval, macro_f1, micro_f1=0.5):
    return {"backbone": "vgg16", "head": head, "status": "ok", "error": None,
            "mean_average_precision": mean_ap, "mean_average_precision_ci": interval,
            "micro_f1": micro_f1, "macro_f1": macro_f1, "exact_match_accuracy": 0.4,
            "split_role": "test", "run": f"/runs/{head}"}


def test_multilabel_rows_are_ranked_by_mean_average_precision_with_its_interval():
    records = [row("logreg", 0.80, [0.75, 0.85], 0.9, micro_f1=0.95),
               row("dense", 0.90, [0.86, 0.94], 0.5, micro_f1=0.40),
               row("knn", 0.84, [0.80, 0.88], 0.7)]
    ranked = rank(records, multilabel=True)
    assert [r["head"] for r in ranked] == ["dense", "knn", "logreg"]
    # no predictions to pair (tests/test_significance.py pairs them)
    assert [r["tied"] for r in ranked] == ["best", "not comparable", "not comparable"]
    assert list(ranked[0]) == ML_CSV_COLUMNS
    table = Comparison(ranked, Path("."), {"multilabel": True})
    assert table.score == "mean_average_precision"
    assert table.table().splitlines()[0].split()[:5] == ["rank", "backbone", "head", "mAP", "mAP_95%"]
    assert headline(table.best) == ("mean average precision", 0.90, [0.86, 0.94])


def test_single_label_rows_keep_their_accuracy_ranking():
    records = [{"backbone": "vgg16", "head": h, "status": "ok", "accuracy": a, "accuracy_ci": None,
                "macro_f1": f} for h, a, f in (("logreg", 0.7, 0.9), ("dense", 0.8, 0.1))]
    ranked = rank(records)
    assert [r["head"] for r in ranked] == ["dense", "logreg"]
    assert "mean_average_precision" not in ranked[0]
    assert headline(ranked[0])[0] == "accuracy"
