"""Progress events: how long library calls tell their caller what is happening.

The library never prints. `extract`, `fit`, `compare`, `curve` and `finetune` take
`progress`, a callable that receives one `Event` at a time; the command line turns events
into bars and sentences, a notebook can collect them, tests can assert on them. Every event
names its `stage` (a `Stage`: "extract", "views", "compare", "curve", "finetune", ...) so
one callable can follow a job that runs several stages (a comparison extracts, then fits).

Events are small frozen dataclasses. The four shapes, `Started`, `Advanced`, `Note` and
`Finished`, are base classes a listener may test with `isinstance`; what a stage has to say
beyond `total` and `done` is a subclass with typed fields (`SourceChanged(message)`,
`NoImprovement(baseline_val_loss, epochs_run)`, `ExtractionFinished(path, report)`, ...),
read as attributes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .features.outcome import ExtractionReport, ExtractionStatus


__all__ = [
    "Stage", "Event", "Started", "Advanced", "Note", "Finished", "ProgressCallback", "emit",
    "RuntimeNote", "Bf16Available", "ExtractionStarted", "ExtractionFinished", "ViewsStarted", "ViewsFinished",
    "DemoDataset", "OfflineWeights", "ComparisonStarted", "NextBackbone", "BackboneExtracted",
    "ExtractionFailed", "HeadFitted", "CurveFailed", "ComparisonFinished", "CurveStarted",
    "SubsetFitted", "CurveNote", "CurveFinished", "SourceChanged", "ValidationScores",
    "FinetuneStarted", "BatchDone", "EpochDone", "Estimate", "NoImprovement",
    "FinetuneFinished", "ReportStarted", "ReportWithoutCache", "ReportFinished",
    "DuplicatesStarted", "DuplicatesFinished",
]


class Stage(str, enum.Enum):
    """The part of the work an event belongs to (a str: `Stage.EXTRACT == "extract"`)."""

    EXTRACT = "extract"
    VIEWS = "views"  # augmented views of the training images, after the clean features
    DEMO = "demo"
    COMPARE = "compare"
    CURVE = "curve"
    FINETUNE = "finetune"
    REPORT = "report"
    DUPLICATES = "duplicates"

    def __str__(self) -> str:
        return self.value


# --- the four shapes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Base class of every progress event."""

    stage: Stage


@dataclass(frozen=True)
class Started(Event):
    """A stage begins: `total` units of work (images, epochs, runs; None when unknown)."""

    total: int | None = None


@dataclass(frozen=True)
class Advanced(Event):
    """`done` of `total` units are finished."""

    done: int = 0
    total: int | None = None


@dataclass(frozen=True)
class Note(Event):
    """Something the user should know that is not an error (each kind is a subclass)."""


@dataclass(frozen=True)
class Finished(Event):
    """A stage ended (its summary figures are the fields of a subclass)."""


ProgressCallback = Callable[[Event], None]


def emit(progress: ProgressCallback | None, event: Event) -> None:
    """Send `event` to `progress` when there is a listener."""
    if progress is not None:
        progress(event)


# --- extraction (probe.features.extract) --------------------------------------------------
# Subclasses fix their stage (a default) and take their own fields by keyword.


@dataclass(frozen=True, kw_only=True)
class RuntimeNote(Note):
    """The runtime could not run the backbone as asked (e.g. OpenVINO fell back)."""

    stage: Stage = Stage.EXTRACT
    message: str


@dataclass(frozen=True, kw_only=True)
class Bf16Available(Note):
    """Advice: this float32 extraction runs on a CPU (no GPU) that computes bfloat16
    natively, where `precision="bf16"` would run several times faster."""

    stage: Stage = Stage.EXTRACT


@dataclass(frozen=True, kw_only=True)
class ExtractionStarted(Started):
    """The backbone is about to read `total` of the dataset's `images` into `target`."""

    stage: Stage = Stage.EXTRACT
    target: Path
    images: int  # every image of the dataset, reused ones included
    changes: Mapping[str, int] = field(default_factory=dict)  # added / removed / modified
    resumed_parts: int = 0  # finished batches of an interrupted run, reused
    damaged: str = ""  # why the previous cache is rebuilt ("" when it is not)


@dataclass(frozen=True, kw_only=True)
class ExtractionFinished(Finished):
    """The cache at `path` is complete; `report` says what this run did."""

    stage: Stage = Stage.EXTRACT
    path: Path
    report: ExtractionReport


@dataclass(frozen=True, kw_only=True)
class ViewsStarted(Started):
    """`total` augmented views of `images` training images (`per_image` each) are next."""

    stage: Stage = Stage.VIEWS
    images: int
    per_image: int
    policy: str


@dataclass(frozen=True, kw_only=True)
class ViewsFinished(Finished):
    stage: Stage = Stage.VIEWS
    extracted: int


# --- the demo (probe.demo) ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DemoDataset(Note):
    """The digits were written to `path`."""

    stage: Stage = Stage.DEMO
    path: Path
    classes: int
    per_class: int


@dataclass(frozen=True, kw_only=True)
class OfflineWeights(Note):
    """ImageNet weights could not be loaded: the demo runs with random weights."""

    stage: Stage = Stage.DEMO
    message: str


# --- comparisons (probe.compare) ----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ComparisonStarted(Started):
    stage: Stage = Stage.COMPARE
    backbones: tuple[str, ...]
    heads: tuple[str, ...]
    path: Path  # the comparison directory


@dataclass(frozen=True, kw_only=True)
class NextBackbone(Note):
    """Backbone number `index` (from 0) of `count` starts."""

    stage: Stage = Stage.COMPARE
    backbone: str
    index: int
    count: int


@dataclass(frozen=True, kw_only=True)
class BackboneExtracted(Note):
    """The backbone's cache is ready at `path` (`status`: extracted now, or up to date)."""

    stage: Stage = Stage.COMPARE
    backbone: str
    path: Path
    status: ExtractionStatus

    @property
    def up_to_date(self) -> bool:
        return self.status is ExtractionStatus.UP_TO_DATE


@dataclass(frozen=True, kw_only=True)
class ExtractionFailed(Note):
    """The backbone's extraction failed: every head of it gets a failed row."""

    stage: Stage = Stage.COMPARE
    backbone: str
    error: str


@dataclass(frozen=True, kw_only=True)
class HeadFitted(Advanced):
    """One row of the comparison is done: a fit (`error` None) or a failure (`error`).
    `row` is the comparison's record of it (`probe.compare.headline` reads its score)."""

    stage: Stage = Stage.COMPARE
    backbone: str
    head: str
    error: str | None = None
    split_role: str | None = None
    fit_seconds: float | None = None
    row: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class CurveFailed(Note):
    """The backbone's label-efficiency curve failed (its fits are still ranked)."""

    stage: Stage = Stage.COMPARE
    backbone: str
    error: str


@dataclass(frozen=True, kw_only=True)
class ComparisonFinished(Finished):
    stage: Stage = Stage.COMPARE
    path: Path
    runs: int
    failed: int


# --- label-efficiency curves (probe.curve) ------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CurveStarted(Started):
    stage: Stage = Stage.CURVE
    heads: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class SubsetFitted(Advanced):
    """Every head was fit on one subset: `shots` per class, repeat `repeat`."""

    stage: Stage = Stage.CURVE
    shots: int | str
    repeat: int


@dataclass(frozen=True, kw_only=True)
class CurveNote(Note):
    stage: Stage = Stage.CURVE
    message: str


@dataclass(frozen=True, kw_only=True)
class CurveFinished(Finished):
    stage: Stage = Stage.CURVE
    seconds: float
    path: Path | None  # None when nothing was written


# --- fine-tuning (probe.finetune) ---------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SourceChanged(Note):
    """The images changed since the cache was written (`message` says how)."""

    stage: Stage = Stage.FINETUNE
    message: str


@dataclass(frozen=True, kw_only=True)
class ValidationScores(Note):
    """There is no test split: the scores are on the validation split that chose the epoch."""

    stage: Stage = Stage.FINETUNE
    split_role: str


@dataclass(frozen=True, kw_only=True)
class FinetuneStarted(Started):
    """Training of up to `total` epochs begins, from `baseline_val_loss` (epoch 0)."""

    stage: Stage = Stage.FINETUNE
    backbone: str
    blocks: tuple[str, ...]
    trainable_parameters: int
    train: int  # training images
    val: int  # validation images
    epochs: int
    steps: int  # batches per epoch
    device: str
    baseline_val_loss: float
    start_head: str


@dataclass(frozen=True, kw_only=True)
class BatchDone(Advanced):
    """Batch `done` of `total` of epoch `epoch` (of `epochs`) is trained."""

    stage: Stage = Stage.FINETUNE
    epoch: int
    epochs: int


@dataclass(frozen=True, kw_only=True)
class EpochDone(Advanced):
    """Epoch `done` of `total` ended with these losses and scores (`loss`, `val_loss`, ...)."""

    stage: Stage = Stage.FINETUNE
    logs: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Estimate(Note):
    """How long the fine-tuning will take, measured on its first batches."""

    stage: Stage = Stage.FINETUNE
    seconds_per_epoch: float
    seconds_total: float
    epochs: int
    device: str


@dataclass(frozen=True, kw_only=True)
class NoImprovement(Note):
    """No epoch beat epoch 0: the new run keeps the starting head."""

    stage: Stage = Stage.FINETUNE
    baseline_val_loss: float
    epochs_run: int


@dataclass(frozen=True, kw_only=True)
class FinetuneFinished(Finished):
    stage: Stage = Stage.FINETUNE
    best_epoch: int
    epochs_run: int
    seconds: float


# --- reports (probe.html) -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ReportStarted(Started):
    stage: Stage = Stage.REPORT
    directory: Path


@dataclass(frozen=True, kw_only=True)
class ReportWithoutCache(Note):
    """The run's cache can not be read: the report leaves out what needs it."""

    stage: Stage = Stage.REPORT
    problem: str


@dataclass(frozen=True, kw_only=True)
class ReportFinished(Finished):
    stage: Stage = Stage.REPORT
    path: Path
    size: int  # bytes written


# --- duplicates (probe.duplicates) --------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DuplicatesStarted(Started):
    stage: Stage = Stage.DUPLICATES
    cache: Path


@dataclass(frozen=True, kw_only=True)
class DuplicatesFinished(Finished):
    stage: Stage = Stage.DUPLICATES
    counts: Mapping[str, int] = field(default_factory=dict)
