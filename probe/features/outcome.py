"""What one extraction did: its status and its report. A module of its own, below both the
extraction and the progress events that carry its report."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class ExtractionStatus(str, enum.Enum):
    """What an extraction did with the cache; the value is the word files and --json write."""

    EXTRACTED = "extracted"  # the cache was written (some or all rows may be reused)
    UP_TO_DATE = "up to date"  # the cache was already complete: nothing was written

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ExtractionReport:
    """What one extraction did."""

    status: ExtractionStatus
    extracted: int  # images the backbone read in this run
    reused: int  # rows taken from existing caches or parts
    skipped: int  # files that could not be decoded (recorded in the cache)
    ignored: int  # non-image files found
    changes: dict[str, int] = field(default_factory=dict)  # added / removed / modified
    damaged: str = ""  # why the previous cache was rebuilt
    notes: list[str] = field(default_factory=list)  # discovery notes, runtime fallbacks
    views_extracted: int = 0  # augmented views the backbone read in this run
    views_reused: int = 0  # views taken from existing caches or parts
    runtime: str = ""  # what ran the backbone in this run ("tensorflow", "openvino"; "": nothing ran)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (the status as its word), ready for JSON."""
        return {**asdict(self), "status": self.status.value}
