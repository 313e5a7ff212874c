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

Long work measures its own pace: `Advanced` carries the seconds `elapsed` and the
estimated seconds `remaining`, from the measured rate of the finished steps, the first
(warm-up: graph building, compilation, workers starting) left out (`Pace`, `Rate`).
"""

from __future__ import annotations

import enum
import time
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
    "DuplicatesStarted", "DuplicatesFinished", "Rate", "Pace",
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
    """`done` of `total` units are finished, `elapsed` seconds after the stage began;
    `remaining`: the seconds still to go, estimated from the measured pace (None when
    there is no estimate yet, or none is made)."""

    done: int = 0
    total: int | None = None
    elapsed: float | None = None
    remaining: float | None = None


@dataclass(frozen=True)
class Note(Event):
    """Something the user should know that is not an error (each kind is a subclass)."""


@dataclass(frozen=True)
class Finished(Event):
    """A stage ended (its summary figures are the fields of a subclass)."""


ProgressCallback = Callable[[Event], None]
Clock = Callable[[], float]


def emit(progress: ProgressCallback | None, event: Event) -> None:
    """Send `event` to `progress` when there is a listener."""
    if progress is not None:
        progress(event)


# --- measured pace ------------------------------------------------------------------------


class Rate:
    """Seconds per unit of work, measured: the mean over the steps after the first
    `warm_up` ones (which also build graphs, compile, start workers: their cost is paid
    once, and counting it would inflate every later estimate)."""

    def __init__(self, warm_up: int = 1):
        self.warm_up = max(0, int(warm_up))
        self.steps = 0
        self.seconds = 0.0
        self.units = 0

    def add(self, seconds: float, units: int = 1) -> None:
        """One step took `seconds` for `units` units of work."""
        self.steps += 1
        if self.steps > self.warm_up and units > 0:
            self.seconds += max(0.0, seconds)
            self.units += units

    @property
    def per_unit(self) -> float | None:
        """Seconds per unit after the warm-up; None before a step past it was measured."""
        return self.seconds / self.units if self.units else None


class Pace:
    """The time left of a job of `total` units done in steps, from the measured time per
    unit (`Rate`), recomputed at every step. `clock` is a monotonic clock in seconds
    (tests pass a fake one)."""

    def __init__(self, total: int, warm_up: int = 1, clock: Clock = time.perf_counter):
        self.total, self.clock = int(total), clock
        self.rate = Rate(warm_up)
        self.started = self.last = clock()
        self.done = 0

    def advance(self, done: int) -> tuple[float, float | None]:
        """`done` units are finished (cumulative); (seconds elapsed, estimated seconds
        left: None until a step after the warm-up was measured)."""
        now = self.clock()
        self.rate.add(now - self.last, done - self.done)
        self.last, self.done = now, done
        return now - self.started, self.remaining()

    def remaining(self) -> float | None:
        """Estimated seconds left (None without a measured rate)."""
        per_unit = self.rate.per_unit
        return None if per_unit is None else per_unit * max(0, self.total - self.done)


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
    """Batch `done` of `total` of epoch `epoch` (of `epochs`) is trained; `remaining`:
    the estimated seconds left for every epoch up to `epochs` (validation passes included)."""

    stage: Stage = Stage.FINETUNE
    epoch: int
    epochs: int


@dataclass(frozen=True, kw_only=True)
class EpochDone(Advanced):
    """Epoch `done` of `total` ended with these losses and scores (`loss`, `val_loss`, ...);
    `remaining`: the estimated seconds for the epochs left (early stopping may skip them)."""

    stage: Stage = Stage.FINETUNE
    logs: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Estimate(Note):
    """How long the fine-tuning will take if every epoch runs, from its first measured
    batches (the first one, which builds the graph, left out): sent once, as soon as there
    is a measured rate. `seconds_total` counts the time already spent; the `BatchDone` and
    `EpochDone` events that follow carry the estimate of the time left, kept up to date."""

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
