"""What each head shows on the command line: its description and the constructor
parameters it exposes as options. Kept apart from the head classes, which need
scikit-learn, so that the command line can build its options without importing it."""

from __future__ import annotations

from .base import HeadOption

_CLASS_WEIGHT = HeadOption("class_weight", "--class-weight", str,
                           "logreg, dense: 'balanced' for imbalanced classes", ("none", "balanced"))

DEFAULT_HEAD = "logreg"  # the head `fit` trains unless told otherwise

# name: (module, class name, description, options)
CATALOG: dict[str, tuple[str, str, str, tuple[HeadOption, ...]]] = {
    "logreg": ("probe.heads.logistic", "LogisticHead", "logistic regression, C chosen on validation", (
        HeadOption("C", "--C", float, "logreg: fix the regularisation strength [default: chosen on val]"),
        _CLASS_WEIGHT,
    )),
    "dense": ("probe.heads.dense", "DenseHead", "a small dense network, epochs chosen on validation", (
        HeadOption("hidden_units", "--hidden-units", int, "dense: hidden layer width, 0: none [default: 256]"),
        HeadOption("dropout", "--dropout", float, "dense [default: 0.5]"),
        HeadOption("epochs", "--epochs", int, "dense: at most this many epochs [default: 50]"),
        HeadOption("learning_rate", "--learning-rate", float, "dense [default: 0.001]"),
        HeadOption("batch_size", "--head-batch-size", int, "dense: training batch size [default: 32]"),
        HeadOption("patience", "--patience", int,
                   "dense: early-stopping patience on validation loss [default: 5]"),
        _CLASS_WEIGHT,
        HeadOption("view_sampling", "--views", str,
                   "dense, with a cache of augmented views: 'all' views every epoch, or "
                   "'sample' one random view (or the clean image) per image per epoch "
                   "[default: all]", ("all", "sample")),
    )),
    "knn": ("probe.heads.knn", "KNNHead", "weighted k nearest neighbours, k and T chosen on validation", (
        HeadOption("k", "--k", int, "knn: fix the number of neighbours [default: chosen on val]"),
        HeadOption("temperature", "--temperature", float,
                   "knn: fix the vote temperature T [default: chosen on val]"),
    )),
}


def head_options(name: str) -> tuple[HeadOption, ...]:
    """The options the head ``name`` exposes."""
    return CATALOG[name][3]
