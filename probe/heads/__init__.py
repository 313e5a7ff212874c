"""Classification heads that train on cached backbone features, and their registry.

Every head is a scikit-learn estimator (``clone``, ``set_params``, ``GridSearchCV`` and
``cross_val_score`` work) that owns what differs between heads: its Keras form
(``keras_head()``, for export and fine-tuning), its training curves (``curves_()``), its
chosen settings (``summary_()``), its command-line options (``options``) and its files.
Nothing outside this package asks which head it is.

The head classes are imported on first use (they need scikit-learn, which takes seconds
to import); names, descriptions and options are available without it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from probe.errors import ProbeError, RunError

from .base import (HEAD_JSON, Curves, HeadOption, check_params, corrupt, keras_class_weight,
                   read_head_json)
from .options import CATALOG, DEFAULT_HEAD, head_options
from .stream import FeatureStream

__all__ = [
    "DEFAULT_CS", "DEFAULT_HEAD", "Curves", "DenseHead", "FeatureStream", "HEADS", "Head", "HeadOption", "KNNHead", "LogisticHead",
    "check_params", "describe_heads", "head_options", "keras_class_weight", "list_heads",
    "load_head", "make_head",
]


class _Registry(Mapping):
    """name -> head class, importing a head's module when it is first looked up."""

    def __getitem__(self, name: str) -> type:
        module, cls, _, _ = CATALOG[name]
        return getattr(importlib.import_module(module), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(CATALOG)

    def __len__(self) -> int:
        return len(CATALOG)

    def __repr__(self) -> str:
        return f"HEADS({', '.join(CATALOG)})"


HEADS: Mapping[str, type] = _Registry()

_LAZY = {"LogisticHead": "logreg", "DenseHead": "dense", "KNNHead": "knn"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return HEADS[_LAZY[name]]
    if name == "Head":
        return importlib.import_module(".estimator", __name__).Head
    if name == "DEFAULT_CS":
        return importlib.import_module(".logistic", __name__).DEFAULT_CS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def list_heads() -> list[str]:
    """The registered head names, in registry order."""
    return list(CATALOG)


def describe_heads() -> dict[str, str]:
    """Each head's one-line description."""
    return {name: entry[2] for name, entry in CATALOG.items()}


def head_class(name: str) -> type:
    """The class registered as ``name``."""
    if name not in CATALOG:
        raise ProbeError(f"unknown head: expected one of: {', '.join(sorted(CATALOG))}. Received: head={name!r}")
    return HEADS[name]


def make_head(name: str, **params: Any):
    """Create the head registered as ``name`` with the given constructor parameters."""
    cls = head_class(name)
    allowed = list(cls().get_params())
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ProbeError(
            f"the {name!r} head takes the parameters {', '.join(allowed)}. "
            f"Received: unknown parameter(s) {', '.join(unknown)}"
        )
    return cls(**params)


def load_head(directory: str | os.PathLike, classes: list[str] | None = None):
    """Load whichever head ``directory/head.json`` describes; with ``classes``, refuse a
    head whose class names (in order) differ, rather than relabel its predictions."""
    directory, meta = read_head_json(directory)
    kind = meta.get("kind")
    if not isinstance(kind, str) or kind not in CATALOG:
        raise corrupt(Path(directory) / HEAD_JSON, f"'kind' must be one of: {', '.join(sorted(CATALOG))}; found {kind!r}")
    head = HEADS[kind].load(directory)
    if classes is not None and [str(c) for c in classes] != [str(c) for c in head.class_names_]:
        raise RunError(
            f"the head in '{directory}' was trained on the classes {list(map(str, head.class_names_))} but "
            f"the run lists {list(map(str, classes))}; its predictions would be mislabelled. Re-run "
            f"`probe fit` to write the run again. Received: classes {list(map(str, classes))}"
        )
    return head
