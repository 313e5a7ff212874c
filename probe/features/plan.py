"""What an extraction has to do, decided without touching the disk or the model.

From the settings, the samples with their file sizes and modification times, and what is
already on disk (the previous cache, rows of other caches of the same features, parts of an
interrupted run), `make_plan` says which cache file to write, what changed since it was
written, which rows can be reused and which images still need the backbone. `assemble` then
lists every row of the new cache from the rows found or computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .. import files
from . import cache as cache_mod
from .. import data
from .cache import Row
from ..errors import CacheMismatchError, ProbeError
from .augment import ViewSettings
from ..settings import ExtractionSettings, SplitSettings

RowKey = tuple[str, int, int]  # (relative path, size, mtime_ns): a file's content as probe sees it


@dataclass(frozen=True)
class Source:
    """A sample with its file's size and modification time (ns)."""

    sample: data.Sample
    size: int
    mtime: int

    @property
    def key(self) -> RowKey:
        return (self.sample.path, self.size, self.mtime)


@dataclass(frozen=True)
class ViewSource:
    """One augmented view still to extract: view `view` of a training source."""

    source: Source
    view: int

    @property
    def sample(self) -> data.Sample:
        return self.source.sample

    @property
    def size(self) -> int:
        return self.source.size

    @property
    def mtime(self) -> int:
        return self.source.mtime

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (*self.source.key, self.view)


@dataclass
class Entry:
    """One row of the cache to be written: a sample and where its features are
    (multi-label: `targets` and `ignored` are class indices, `label` is -1)."""

    path: str
    label: int
    split: str
    size: int
    mtime: int
    row: Row
    targets: tuple[int, ...] = ()
    ignored: tuple[int, ...] = ()


@dataclass(frozen=True)
class CacheTarget:
    """The cache file that holds these features with these splits, and the key of the
    features alone (shared by every split of the same images)."""

    path: Path
    feature_key: str

    @property
    def short_key(self) -> str:
        """Names the lock and the parts directory of the features."""
        return self.feature_key[:16]


@dataclass(frozen=True)
class ExtractionPlan:
    target: CacheTarget
    source_fingerprint: str
    sources: tuple[Source, ...]
    unreadable: tuple[tuple[data.Sample, str], ...]  # files that could not even be stat'ed
    todo: tuple[Source, ...]  # what the backbone still has to read
    changes: dict[str, int]  # added / removed / modified since the previous cache
    resumed_parts: int  # finished batches of an interrupted run
    damaged: str  # why the previous cache could not be used ("" when it could or was none)


def cache_target(extraction: ExtractionSettings, split: SplitSettings, found: data.Dataset,
                 directory: Path) -> CacheTarget:
    """`<dir>/<dataset>-<backbone>-<size>-<pooling>[-<precision>]-<key>.h5`."""
    feature_key = cache_mod.fingerprint({"dataset_root": str(found.root),
                                         **extraction.feature_settings()})
    key = cache_mod.fingerprint([feature_key, found.split_identity()])[:10]
    return CacheTarget(directory / f"{extraction.cache_stem(found.root.name)}-{key}.h5",
                       feature_key)


def source_fingerprint(found: data.Dataset, sources: list[Source], unreadable) -> str:
    """Changes when a file is added, removed, relabelled, moved to another split, or
    changes size or modification time.

    The inode change time (st_ctime) is left out on purpose: it also changes on chmod,
    chown, a new hard link, a rename and every copy or restore of a dataset, which would
    re-extract whole datasets whose pixels did not change. A rewrite that keeps both the
    size and the nanosecond mtime has to set the mtime back deliberately (`touch -d`,
    `os.utime`); delete the cache file to extract such files again."""
    if found.multilabel:  # every label of every image, and the difficult marks
        return cache_mod.fingerprint(
            [found.classes, "multilabel",
             [(s.sample.path, s.sample.targets, s.sample.ignored, s.sample.split, s.size,
               s.mtime) for s in sources], unreadable])
    return cache_mod.fingerprint(
        [found.classes, [(s.sample.path, s.sample.label, s.sample.split, s.size, s.mtime)
                         for s in sources], unreadable]
    )


def check_previous(previous_attrs: Mapping[str, Any] | None, target: CacheTarget,
                   extraction: ExtractionSettings) -> None:
    """A file at the target path that holds other features was renamed or copied there:
    never overwritten."""
    if previous_attrs is None or previous_attrs.get("feature_key") == target.feature_key:
        return
    a = previous_attrs
    raise CacheMismatchError(
        f"cache file '{files.display(target.path)}' holds features of other settings "
        f"(backbone {a.get('backbone')!r}, weights {a.get('weights')!r}, size "
        f"{a.get('image_size')!r}, pooling {a.get('pooling')!r}) than asked for "
        f"({extraction.backbone!r}, {extraction.weights.identity!r}, {extraction.image_size}, "
        f"{extraction.pooling!r}); it was renamed or copied there. Move it away or use "
        "another --cache-dir; probe will not overwrite it."
    )


def is_up_to_date(previous_attrs: Mapping[str, Any] | None, fingerprint: str,
                  views: ViewSettings = ViewSettings()) -> bool:
    """The cache holds these source files, and exactly the views asked for."""
    return (previous_attrs is not None
            and previous_attrs.get("source_fingerprint") == fingerprint
            and ViewSettings.from_attrs(previous_attrs) == views)


def views_todo(sources: tuple[Source, ...], done: Mapping[RowKey, Any],
               known_views: Mapping[tuple[str, int, int, int], Any],
               count: int) -> tuple[ViewSource, ...]:
    """The views 0..count-1 of every training source in `done` (with clean features, or
    not known to be undecodable) that no cache or part holds yet, the views of one image
    together."""
    return tuple(ViewSource(s, view) for s in sources
                 if s.sample.split == "train" and s.key in done
                 for view in range(count) if (*s.key, view) not in known_views)


def make_plan(target: CacheTarget, fingerprint: str, found: data.Dataset, sources: list[Source],
              unreadable, previous_records: cache_mod.SourceRecords | None,
              known_rows: Mapping[RowKey, Row], known_skips: Mapping[RowKey, str],
              resumed_parts: int, damaged: str) -> ExtractionPlan:
    """What to extract: every source whose (path, size, mtime) has neither a computed row
    nor a skip record."""
    todo = tuple(s for s in sources if s.key not in known_rows and s.key not in known_skips)
    return ExtractionPlan(target, fingerprint, tuple(sources), tuple(unreadable), todo,
                          _changes(previous_records, found, sources, unreadable),
                          resumed_parts, damaged)


def _changes(previous_records, found: data.Dataset, sources: list[Source],
             unreadable) -> dict[str, int]:
    """Counts of added, removed and modified source files against the previous cache (a
    new class or split alone needs no extraction, so it is not counted here)."""
    if previous_records is None:
        return {}
    describe = lambda sample: sample.describe(found.classes, found.multilabel)  # noqa: E731
    new = {s.sample.path: (describe(s.sample), s.sample.split, s.size, s.mtime) for s in sources}
    new.update({sample.path: (describe(sample), sample.split, -1, -1) for sample, _ in unreadable})
    counts = cache_mod.diff_sources("", previous_records, new).counts()
    return {key: counts[key] for key in ("added", "removed", "modified")}


def assemble(plan: ExtractionPlan, rows: Mapping[RowKey, Row], skips: Mapping[RowKey, str],
             root: Path) -> tuple[list[Entry], list[tuple]]:
    """Every row of the new cache (in the samples' order) and every skipped file
    (path, reason, size, mtime, label, split, targets, ignored)."""
    entries, skipped = [], []
    for s in plan.sources:
        sample = s.sample
        if s.key in rows:
            entries.append(Entry(sample.path, sample.label, sample.split, s.size, s.mtime,
                                 rows[s.key], sample.targets, sample.ignored))
        else:
            skipped.append((sample.path, skips[s.key], s.size, s.mtime, sample.label,
                            sample.split, sample.targets, sample.ignored))
    skipped += [(s.path, reason, -1, -1, s.label, s.split, s.targets, s.ignored)
                for s, reason in plan.unreadable]
    if not entries:
        raise ProbeError(
            f"no image of '{root}' could be decoded ({len(skipped)} skipped, e.g. "
            f"'{skipped[0][0]}': {skipped[0][1]}); check the files."
        )
    return entries, skipped
