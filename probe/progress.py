"""Progress events: how long library calls tell their caller what is happening.

The library never prints. `extract`, `fit`, `compare`, `curve` and `finetune` take
`progress`, a callable that receives one `Event` at a time; the command line turns events
into bars and sentences, a notebook can collect them, tests can assert on them. Every event
names its `stage` ("extract", "fit", "compare", "curve", "finetune") so one callable can
follow a job that runs several stages (a comparison extracts, then fits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Event:
    """Base class of every progress event."""

    stage: str


@dataclass(frozen=True)
class Started(Event):
    """A stage begins: `total` units of work (images, epochs, runs; None when unknown) and
    the facts a caller may want to show first (target file, what changed, device...)."""

    total: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Advanced(Event):
    """`done` of `total` units are finished; `details` carries per-step figures (an epoch's
    losses, the current backbone)."""

    done: int = 0
    total: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Note(Event):
    """Something the user should know that is not an error: `kind` is a stable key
    ("no-validation", "source-changed", "estimate", "resumed", ...) the caller words."""

    kind: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Finished(Event):
    """A stage ended; `details` holds its summary figures."""

    details: Mapping[str, Any] = field(default_factory=dict)


ProgressCallback = Callable[[Event], None]


def emit(progress: ProgressCallback | None, event: Event) -> None:
    """Send `event` to `progress` when there is a listener."""
    if progress is not None:
        progress(event)
