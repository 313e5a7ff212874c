"""The feature cache: one HDF5 file per (dataset, backbone, extraction settings).

Layout (documented in docs/cache.md so anyone with h5py can read it):

    /                 attributes: format, format_version, feature_key, source_fingerprint,
                      backbone, weights, image_size, pooling, preprocessing, feature_shape,
                      classes (JSON), dataset_root, labels_file, seed, val_fraction,
                      test_fraction, ignored_files, created, versions (JSON), attrs_checksum
    /<split>/features float32 (N, *feature_shape)     split in train, val, test
    /<split>/labels   int32 (N,)                      index into classes
                      multi-label caches (attribute multilabel = true): uint8 (N, K) 0/1,
                      K = len(classes), column k = classes[k]
    /<split>/ignore   uint8 (N, K), multi-label only, present only when some label is
                      marked difficult (1: left out of that class's metrics)
    /<split>/paths    UTF-8 strings (N,)              relative to dataset_root
    /<split>/sizes    int64 (N,)  /<split>/mtimes int64 (N,) nanoseconds
    /<split>/views    float32 (N, V, *feature_shape)  train only, with `probe extract --augment V`:
                      V augmented views of each training image (attributes views,
                      views_policy, views_seed); never mixed into features
    /skipped/{paths, reasons, sizes, mtimes, labels, splits[, ignore]}  labels as above

A header in the HDF5 user block carries a sha256 of the whole file, checked before HDF5
reads a byte; the datasets and attributes are checked against this layout on open, and
numeric datasets carry Fletcher-32 checksums: damage is an error, never other numbers.
This module only reads (and seals what `store.py` writes); `store.py` writes (parts, the
final file, the lock).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import CacheError, CacheMismatchError, SourceChangedError
from ..files import display
from .format import (SPLIT_NAMES, check_features, check_layout, damaged, file_identity, guard,
                     h5open, is_unsealed, read_header, read_strings, unsealed_error)

SETTINGS = ("backbone", "weights", "image_size", "pooling", "preprocessing")


def default_cache_dir() -> Path:
    """`$PROBE_CACHE_DIR`, else `./.probe`."""
    return Path(os.environ.get("PROBE_CACHE_DIR") or ".probe")


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def fingerprint(payload: object) -> str:
    """A sha256 of a JSON-serialisable value (keys sorted)."""
    text = json.dumps(payload, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class Split:
    """One split read back from a cache; row i of each array is the same image.
    `labels` is (N,) class indices, or for a multi-label cache an (N, K) 0/1 matrix;
    `ignore` is None, or (N, K) bool: True where a label is marked difficult."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    ignore: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Row:
    """Where a computed feature vector lives: a cache file's split and row, or a part."""

    source: str  # path of an .h5 cache or a part .npz
    group: str  # split name in a cache; "" in a part
    index: int


@dataclass(frozen=True)
class ViewRow:
    """Where the features of one augmented view live: view `view` of row `index` of a
    cache's train split (`group` "train"), or row `index` of a views part (`group` "")."""

    source: str
    group: str
    index: int
    view: int = 0


@dataclass
class SourceChanges:
    """How a cache's source files differ from the dataset on disk now. True when anything
    changed; `counts()` and `message()` summarise it."""

    cache: str
    added: list[str]
    removed: list[str]
    modified: list[str]  # size or modification time differs
    relabelled: list[str]  # same file, other class or split
    problem: str = ""  # the dataset could not be read at all (e.g. its folder is gone)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.modified or self.relabelled or self.problem)

    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "removed": len(self.removed),
                "modified": len(self.modified), "relabelled": len(self.relabelled)}

    def message(self) -> str:
        """One line: what changed and how to bring the cache up to date."""
        if not self:
            return f"the source files of cache '{display(self.cache)}' are unchanged"
        counts = ", ".join(f"{n} {kind}" for kind, n in self.counts().items() if n)
        example = (self.added + self.modified + self.removed + self.relabelled)[:1]
        detail = f" (e.g. '{display(example[0])}')" if example else ""
        reason = f"; {self.problem}" if self.problem else ""
        return (
            f"the dataset changed since cache '{display(self.cache)}' was written: "
            f"{counts or 'dataset unreadable'}{detail}{reason}. Run `probe extract` again to "
            "update the cache (only new and changed files are extracted)"
        )


SourceRecords = dict[str, tuple[str, str, int, int]]  # path: (class, split, size, mtime_ns)


def diff_sources(cache: str, old: SourceRecords, new: SourceRecords,
                 problem: str = "") -> SourceChanges:
    """What was added, removed, modified (size or mtime) and relabelled (class or split)
    between the source records a cache was built from and those of the dataset now."""
    return SourceChanges(
        cache=cache,
        added=sorted(p for p in new if p not in old),
        removed=sorted(p for p in old if p not in new),
        modified=sorted(p for p in new if p in old and new[p][2:] != old[p][2:]),
        relabelled=sorted(p for p in new if p in old and new[p][2:] == old[p][2:]
                          and new[p][:2] != old[p][:2]),
        problem=problem,
    )


class FeatureCache:
    """Read access to a finished cache file. Use `FeatureCache.open(path)`.

    Every read goes to the file that was checked when the cache was opened (same inode,
    size and times): a cache replaced by another `probe extract` meanwhile is a
    `CacheError`, never a mix of two versions."""

    def __init__(self, path: Path, attrs: dict, counts: dict[str, int],
                 identity: tuple | None = None, sealed: bool = False, checked: bool = True):
        self.path = Path(path)
        self.attrs = attrs
        self.counts = counts
        self.sealed = sealed  # carries the whole-file checksum (see `seal`)
        self.file_identity = identity
        self._checked = checked  # False when only the header was read (`list_caches`)
        self._verified = False

    @classmethod
    def open(cls, path: str | os.PathLike) -> "FeatureCache":
        """Open and check a sealed cache file: its checksums, and the type and shape of every
        dataset and attribute against the format. A clear `CacheError` if it is not a
        cache, is damaged or changes while it is checked; an `UnsealedCacheError` for a file
        without the checksum header, which HDF5 never parses in this process."""
        return cls._open(_existing_file(path), allow_unsealed=False)

    @classmethod
    def _open(cls, path: Path, allow_unsealed: bool) -> "FeatureCache":
        """`open`; with `allow_unsealed`, an unsealed file is parsed as well: only ever in a
        child process (`store.reseal`), where a crash or hang in HDF5 costs nothing."""
        with guard(path):
            identity, header = read_header(path, check_body=True)
            if header is None and not allow_unsealed:
                raise unsealed_error(path)
            cache = cls(path, {}, {}, identity, sealed=header is not None, checked=False)
            with h5open(path, "r") as handle:
                cache._same_file(handle)
                cache.attrs, cache.counts = check_layout(path, handle, identity[2])
            if header is not None and (header["attrs"], header["counts"]) != \
                    (cache.attrs, cache.counts):
                raise damaged(path, "its header does not match its contents")
            cache._checked = True
        return cache

    @classmethod
    def _listed(cls, path: Path) -> "FeatureCache":
        """A cache known from its header alone (no HDF5, no full read): enough to list it.
        Its contents are checked on first read. `UnsealedCacheError` without a header."""
        with guard(path):
            identity, header = read_header(path, check_body=False)
        if header is None:
            raise unsealed_error(path)
        return cls(path, header["attrs"], header["counts"], identity, sealed=True, checked=False)

    def verify(self) -> None:
        """Read every byte: the whole-file checksum, every dataset through its Fletcher-32
        checksums, features finite, labels within the classes. `CacheError` on damage."""
        if self._verified:
            return
        with self._read() as handle:
            for name in [*self.splits, "skipped"]:
                if name not in handle:
                    continue
                group = handle[name]
                for key in group:
                    if key in ("features", "views"):
                        check_features(self.path, group[key], name, key)
                    else:
                        group[key][()]
        self._verified = True

    def damage(self) -> str:
        """Why this cache can not be trusted as it is ("" when it can): damage found by
        `verify()`."""
        try:
            self.verify()
        except CacheError as error:
            return str(error)
        return ""

    def _same_file(self, handle) -> None:
        """The open HDF5 file is the one checked at open (an extraction replaces a cache
        by renaming a new file over it, which changes the inode)."""
        current = file_identity(os.fstat(handle.id.get_vfd_handle()))
        if self.file_identity is not None and current != self.file_identity:
            raise CacheError(
                f"cache file '{display(self.path)}' changed while it was read (another "
                "`probe extract` replaced it); run the command again."
            )

    # --- what it holds ---------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def splits(self) -> list[str]:
        return [split for split in SPLIT_NAMES if self.counts.get(split)]

    @property
    def multilabel(self) -> bool:
        """Whether images carry several classes (labels are an (N, K) 0/1 matrix)."""
        return self.attrs.get("multilabel") is True

    @property
    def backbone(self) -> str:
        return self.attrs["backbone"]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.attrs["feature_shape"])

    @property
    def settings(self) -> dict:
        """The extraction settings that define the features."""
        return {key: self.attrs[key] for key in SETTINGS}

    def split(self, name: str) -> Split:
        """Features, labels and relative paths of one split, row-aligned (read through one
        open file: a cache replaced meanwhile can not mix two versions)."""
        features, labels, paths, ignore = self._datasets(name, "features", "labels", "paths",
                                                         "ignore")
        return Split(name, features, labels, paths, ignore)

    def features(self, split: str) -> np.ndarray:
        """The features of one split (N, *feature_shape)."""
        return self._datasets(split, "features")[0]

    def iter_features(self, split: str, chunk_rows: int) -> Iterator[tuple[slice, np.ndarray]]:
        """The features of one split a chunk of at most `chunk_rows` rows at a time, as
        (rows, float32 array (rows, *feature_shape)), in order: memory stays bounded
        whatever the cache's size. Read through one open file (a cache replaced meanwhile
        can not mix two versions); a chunk with NaN or infinity is a `CacheError`."""
        if not (isinstance(chunk_rows, int) and chunk_rows >= 1):
            raise ValueError(f"chunk_rows must be a positive integer. Received: {chunk_rows!r}")
        if split not in self.counts:
            raise CacheError(
                f"expected one of the cache's splits {self.splits}. Received: split='{split}'"
            )
        with self._read() as handle:
            dataset = handle[split]["features"]
            for start in range(0, dataset.shape[0], chunk_rows):
                rows = slice(start, min(start + chunk_rows, dataset.shape[0]))
                chunk = np.asarray(dataset[rows], dtype=np.float32)
                if not np.isfinite(chunk).all():
                    raise damaged(self.path, f"'{split}/features' holds NaN or infinite values")
                yield rows, chunk

    def labels(self, split: str) -> np.ndarray:
        """The labels of one split without reading the features: class indices (N,) int64,
        or for a multi-label cache an (N, K) int64 0/1 matrix (column k: classes[k])."""
        return self._datasets(split, "labels")[0]

    def ignore_mask(self, split: str) -> np.ndarray | None:
        """(N, K) bool, True where a label of a multi-label cache is marked difficult (to be
        left out of that class's metrics); None when none is (and for single-label)."""
        return self._datasets(split, "ignore")[0]

    def paths(self, split: str) -> list[str]:
        """The relative paths of one split, without reading the features."""
        return self._datasets(split, "paths")[0]

    def index(self, split: str) -> tuple[list[str], np.ndarray]:
        """Relative paths and class indices of one split, row-aligned, without features."""
        paths, labels = self._datasets(split, "paths", "labels")
        return paths, labels

    def read_rows(self, split: str, rows: slice) -> np.ndarray:
        """The features of a contiguous range of rows of one split (float32); NaN or
        infinity is a `CacheError`. What a head that shuffles features larger than memory
        reads, a block at a time in random order."""
        if split not in self.counts:
            raise CacheError(
                f"expected one of the cache's splits {self.splits}. Received: split='{split}'"
            )
        with self._read() as handle:
            block = np.asarray(handle[split]["features"][rows], dtype=np.float32)
        if not np.isfinite(block).all():
            raise damaged(self.path, f"'{split}/features' holds NaN or infinite values")
        return block

    def _datasets(self, split: str, *names: str) -> list:
        if split not in self.counts:
            raise CacheError(
                f"expected one of the cache's splits {self.splits}. Received: split='{split}'"
            )
        with self._read() as handle:
            group = handle[split]
            return [read_strings(group[name]) if name == "paths"
                    else group[name][()].astype(np.int64) if name == "labels"
                    else (group[name][()].astype(bool) if name in group else None)
                    if name == "ignore"
                    else check_features(self.path, group[name], split, name) for name in names]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(relative path, reason) of every file that could not be decoded."""
        with self._read() as handle:
            if "skipped" not in handle:
                return []
            group = handle["skipped"]
            return list(zip(read_strings(group["paths"]), read_strings(group["reasons"])))

    def info(self) -> dict:
        """A JSON-serialisable summary: settings, splits, counts, skipped files, size;
        for a multi-label cache, images per class and split (`label_counts`)."""
        return {
            "path": str(self.path),
            "backbone": self.backbone,
            "weights": self.attrs["weights"],
            "image_size": self.attrs["image_size"],
            "pooling": self.attrs["pooling"],
            "preprocessing": self.attrs["preprocessing"],
            **{key: self.attrs[key] for key in ("backbone_source", "backbone_sha256", "layers",
                                "hub_source", "hub_sha256", "blocks")
               if key in self.attrs},
            "feature_shape": list(self.feature_shape),
            "dataset_root": self.attrs["dataset_root"],
            "classes": self.classes,
            "multilabel": self.multilabel,
            **({"label_counts": self.label_counts()} if self.multilabel else {}),
            "splits": {split: self.counts[split] for split in self.splits},
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "ignored_files": self.attrs.get("ignored_files", 0),
            "created": self.attrs.get("created"),
            "versions": self.attrs.get("versions"),
            "size_bytes": self.file_identity[2] if self.file_identity else self.path.stat().st_size,
            **self._views_info(),
        }

    def label_counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: images carrying it}}: positives per class of a multi-label cache
        (images per class of a single-label one)."""
        counts = {}
        for split in self.splits:
            labels = self.labels(split)
            per_class = (labels.sum(axis=0) if labels.ndim == 2
                         else np.bincount(labels, minlength=len(self.classes)))
            counts[split] = {name: int(n) for name, n in zip(self.classes, per_class)}
        return counts
    def _views_info(self) -> dict:
        """The augmented views, when the cache has some."""
        if not self.view_count:
            return {}
        return {"views": {"per_image": self.view_count, "policy": self.attrs["views_policy"],
                          "seed": self.attrs["views_seed"], "split": "train",
                          "rows": self.view_count * self.counts.get("train", 0)}}

    def source_records(self) -> SourceRecords:
        """{relative path: (class name, split, size, mtime_ns)} of every source file the
        cache was built from, skipped files included."""
        records = {}
        with self._read() as handle:
            for name in [*self.splits, "skipped"]:
                if name not in handle:
                    continue
                group = handle[name]
                paths = read_strings(group["paths"])
                labels = self._label_texts(group)
                splits = read_strings(group["splits"]) if name == "skipped" else [name] * len(paths)
                for path, label, split, size, mtime in zip(
                    paths, labels, splits, group["sizes"][()], group["mtimes"][()]
                ):
                    records[path] = (label, split, int(size), int(mtime))
        return records

    def _label_texts(self, group) -> list[str]:
        """Each row's labels as `Sample.describe` writes them: the class name, or the
        present and difficult classes of a multi-label row."""
        from ..data import labels_text

        classes = self.classes
        labels = group["labels"][()]
        if labels.ndim == 1:
            return [classes[int(label)] if 0 <= label < len(classes) else "" for label in labels]
        ignore = group["ignore"][()] if "ignore" in group else np.zeros_like(labels)
        return [labels_text(classes, np.flatnonzero(row), np.flatnonzero(hard))
                for row, hard in zip(labels, ignore)]

    def check_source(self, strict: bool = False) -> "SourceChanges":
        """Compare the cache with its dataset as it is now on disk.

        Finds the samples again with the settings the cache was built with (dataset root,
        labels file, seed, fractions) and returns the files added, removed and modified
        (size or modification time) since, and those whose class or split changed. With
        `strict=True` any change raises `SourceChangedError` instead.

        >>> changes = cache.check_source()
        >>> if changes: print(changes.message())
        """
        old = self.source_records()
        new, problem = current_source_records(self.attrs)
        changes = diff_sources(str(self.path), old, new, problem)
        if strict and changes:
            raise SourceChangedError(changes.message() + " (--strict)", changes)
        return changes

    def check_settings(self, **expected) -> None:
        """Raise `CacheMismatchError` naming every setting that differs."""
        changed = [
            f"{key}: cache has {self.attrs.get(key)!r}, asked for {value!r}"
            for key, value in expected.items()
            if value is not None and self.attrs.get(key) != value
        ]
        if changed:
            raise CacheMismatchError(
                f"cache '{self.path}' was built with other settings ({'; '.join(changed)}). "
                "Run `probe extract` with these settings to build a matching cache."
            )

    def rows(self) -> Iterator[tuple[str, Row, int, int]]:
        """(relative path, row, size, mtime) of every stored feature row, after reading
        the whole cache (`verify`): rows of a damaged cache are never reused."""
        self.verify()
        with self._read() as handle:
            for split in self.splits:
                group = handle[split]
                paths = read_strings(group["paths"])
                for i, (path, size, mtime) in enumerate(
                    zip(paths, group["sizes"][()], group["mtimes"][()])
                ):
                    yield path, Row(str(self.path), split, i), int(size), int(mtime)

    @property
    def view_count(self) -> int:
        """Augmented views per training image (0: the cache has none)."""
        return int(self.attrs.get("views") or 0)

    def views(self, split: str = "train") -> np.ndarray | None:
        """The features of the augmented views of a split's images, (N, V, *feature_shape)
        row-aligned with `split(name)`; None when it has none (val and test never do)."""
        if split != "train" or not self.view_count:
            return None
        return self._datasets(split, "views")[0]

    def view_rows(self) -> Iterator[tuple[str, int, ViewRow, int, int]]:
        """(relative path, view index, row, size, mtime) of every stored view, after reading
        the whole cache (`verify`): views of a damaged cache are never reused."""
        if not self.view_count:
            return
        self.verify()
        with self._read() as handle:
            group = handle["train"]
            paths = read_strings(group["paths"])
            for i, (path, size, mtime) in enumerate(zip(paths, group["sizes"][()],
                                                        group["mtimes"][()])):
                for view in range(self.view_count):
                    yield path, view, ViewRow(str(self.path), "train", i, view), int(size), int(mtime)

    def skip_records(self) -> Iterator[tuple[str, str, int, int]]:
        """(relative path, reason, size, mtime) of every skipped file."""
        with self._read() as handle:
            if "skipped" in handle:
                group = handle["skipped"]
                yield from zip(
                    read_strings(group["paths"]),
                    read_strings(group["reasons"]),
                    (int(v) for v in group["sizes"][()]),
                    (int(v) for v in group["mtimes"][()]),
                )

    @contextlib.contextmanager
    def _read(self):
        """The open HDF5 file, checked first when only its header was read; a read error
        anywhere inside (a truncated file, a checksum that does not match) becomes a
        `CacheError` naming the file and the fix."""
        if not self._checked:
            opened = FeatureCache._open(self.path, allow_unsealed=not self.sealed)
            if opened.file_identity != self.file_identity:
                raise CacheError(
                    f"cache file '{display(self.path)}' changed while it was read (another "
                    "`probe extract` replaced it); run the command again."
                )
            self.attrs, self.counts, self._checked = opened.attrs, opened.counts, True
        with guard(self.path):
            with h5open(self.path, "r") as handle:
                self._same_file(handle)
                yield handle

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"FeatureCache('{self.path}', backbone={self.backbone!r}, {counts})"


def list_caches(cache_dir: str | os.PathLike | None = None) -> list[FeatureCache]:
    """Every readable sealed cache in the directory, most recently written first (unsealed
    ones: `list_unsealed`)."""
    caches = []
    for path in _cache_files(cache_dir):
        try:  # the header only: a damaged or unrelated file costs nothing and breaks nothing
            caches.append(FeatureCache._listed(path))
        except CacheError:
            continue
    return caches


def list_unsealed(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """The cache files in the directory without the checksum header (written by an older
    probe), most recently written first: found from their first bytes alone, HDF5 never
    parses them here. `probe cache reseal` rewrites them sealed."""
    return [path for path in _cache_files(cache_dir) if is_unsealed(path)]


def _cache_files(cache_dir: str | os.PathLike | None) -> list[Path]:
    """The *.h5 files of the cache directory, most recently written first."""
    directory = resolve_cache_dir(cache_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob("*.h5"):
        try:
            found.append((path.stat().st_mtime, path))
        except OSError:  # removed since the listing
            continue
    return [path for _, path in sorted(found, reverse=True)]


def current_source_records(attrs: dict) -> tuple[SourceRecords, str]:
    """The source records of the dataset a cache was built from, as it is on disk now
    (found again with the cache's own split settings), and why it could not be read ("")."""
    from .. import data
    from ..errors import DatasetError
    from ..settings import SplitSettings

    try:
        split = SplitSettings.from_attrs(attrs)  # label files per split, too
        found = data.discover(attrs["dataset_root"], split.labels, split.val_fraction,
                              split.test_fraction, split.seed)
    except DatasetError as error:
        return {}, str(error)
    records = {}
    for sample in found.samples:
        try:
            stat = os.stat(found.root / sample.path)
            size, mtime = int(stat.st_size), int(stat.st_mtime_ns)
        except OSError:
            size, mtime = -1, -1
        records[sample.path] = (sample.describe(found.classes, found.multilabel),
                                sample.split, size, mtime)
    return records, ""


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        what = "it is a directory (caches are its *.h5 files; see `probe cache ls`)" \
            if path.is_dir() else "it does not exist"
        raise CacheError(
            f"expected a feature cache file; {what}. Run `probe extract` "
            f"first or pass an existing file. Received: path='{path}'"
        )
    return path
