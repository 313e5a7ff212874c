"""The feature cache: one HDF5 file per (dataset, backbone, extraction settings).

Layout (documented in the README so anyone with h5py can read it):

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
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import CacheError, CacheMismatchError, SourceChangedError, UnsealedCacheError
from ..files import display

FORMAT = "probe-feature-cache"
FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
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
        self._identity = identity
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
        with _guard(path):
            identity, header = _read_header(path, check_body=True)
            if header is None and not allow_unsealed:
                raise unsealed_error(path)
            cache = cls(path, {}, {}, identity, sealed=header is not None, checked=False)
            with _h5open(path, "r") as handle:
                cache._same_file(handle)
                cache.attrs, cache.counts = _check_layout(path, handle, identity[2])
            if header is not None and (header["attrs"], header["counts"]) != \
                    (cache.attrs, cache.counts):
                raise _damaged(path, "its header does not match its contents")
            cache._checked = True
        return cache

    @classmethod
    def _listed(cls, path: Path) -> "FeatureCache":
        """A cache known from its header alone (no HDF5, no full read): enough to list it.
        Its contents are checked on first read. `UnsealedCacheError` without a header."""
        with _guard(path):
            identity, header = _read_header(path, check_body=False)
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
                        _check_features(self.path, group[key], name, key)
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
        current = _identity(os.fstat(handle.id.get_vfd_handle()))
        if self._identity is not None and current != self._identity:
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
                    raise _damaged(self.path, f"'{split}/features' holds NaN or infinite values")
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
            raise _damaged(self.path, f"'{split}/features' holds NaN or infinite values")
        return block

    def _datasets(self, split: str, *names: str) -> list:
        if split not in self.counts:
            raise CacheError(
                f"expected one of the cache's splits {self.splits}. Received: split='{split}'"
            )
        with self._read() as handle:
            group = handle[split]
            return [_read_strings(group[name]) if name == "paths"
                    else group[name][()].astype(np.int64) if name == "labels"
                    else (group[name][()].astype(bool) if name in group else None)
                    if name == "ignore"
                    else _check_features(self.path, group[name], split, name) for name in names]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(relative path, reason) of every file that could not be decoded."""
        with self._read() as handle:
            if "skipped" not in handle:
                return []
            group = handle["skipped"]
            return list(zip(_read_strings(group["paths"]), _read_strings(group["reasons"])))

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
            "size_bytes": self._identity[2] if self._identity else self.path.stat().st_size,
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
                paths = _read_strings(group["paths"])
                labels = self._label_texts(group)
                splits = _read_strings(group["splits"]) if name == "skipped" else [name] * len(paths)
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
                paths = _read_strings(group["paths"])
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
            paths = _read_strings(group["paths"])
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
                    _read_strings(group["paths"]),
                    _read_strings(group["reasons"]),
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
            if opened._identity != self._identity:
                raise CacheError(
                    f"cache file '{display(self.path)}' changed while it was read (another "
                    "`probe extract` replaced it); run the command again."
                )
            self.attrs, self.counts, self._checked = opened.attrs, opened.counts, True
        with _guard(self.path):
            with _h5open(self.path, "r") as handle:
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


def is_unsealed(path: str | os.PathLike) -> bool:
    """Whether the file is an HDF5 file without probe's header: it starts with HDF5's
    signature, where a sealed cache starts with the header."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return False


def unsealed_error(path: str | os.PathLike) -> UnsealedCacheError:
    shown = display(path)
    return UnsealedCacheError(
        f"expected a sealed cache; '{shown}' carries no checksum (written by an older probe "
        "or another program), so probe does not read it in its own process. Rewrite it "
        f"sealed with `probe cache reseal '{shown}'` (rows whose images changed since are "
        "left out; `probe extract` extracts them again)."
    )


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


# --- integrity: the seal, the format's promises, the guard ------------------------------
#
# A finished cache starts with a header in the HDF5 user block (bytes HDF5 itself never
# reads): the attributes and row counts for listing, and a sha256 of everything after the
# header. `FeatureCache.open` checks that digest before HDF5 parses a single byte, so one
# damaged byte anywhere can not crash HDF5, hang it or change a number: it is an error.
# HDF5's own metadata checksums (object header v2, libver >= v110) and Fletcher-32 on the
# data chunks are the second line, and the only one for caches written before the header.

SEAL_MAGIC = b"probe-feature-cache-seal 1 "
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MIN_HEADER, MAX_HEADER = 4096, 1 << 24
HASH_BLOCK = 1 << 20
MAX_IMAGE_SIZE = 16384
VERIFY_BYTES = 64 << 20  # features read at a time by `verify`: bounds memory
SPLIT_DATASETS = {"features": "<f4", "labels": "<i4", "paths": str, "sizes": "<i8",
                  "mtimes": "<i8"}
SKIPPED_DATASETS = {"paths": str, "reasons": str, "sizes": "<i8", "mtimes": "<i8",
                    "labels": "<i4", "splits": str}


def attrs_checksum(attrs: dict) -> str:
    """A sha256 of the attributes as a reader gets them back (JSON values decoded, the
    checksum itself left out), stored by the writer as the attribute `attrs_checksum`."""
    canonical = {key: _plain(_attr(value)) for key, value in attrs.items()
                 if key != "attrs_checksum"}
    text = json.dumps(canonical, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def header_size(attrs: dict) -> int:
    """Bytes to reserve for the header (HDF5 user block: a power of two, >= 512): room for
    the attributes as JSON, the counts and the digests."""
    need = len(json.dumps({key: _plain(_attr(value)) for key, value in attrs.items()},
                          ensure_ascii=True, default=str)) + 1024
    size = MIN_HEADER
    while size < need:
        size *= 2
    return size


def seal(path: Path) -> None:
    """Write the header into the user block reserved by `_h5open(..., userblock=...)`,
    then fsync: the last step before a finished cache is renamed into place."""
    with _h5open(path, "r") as handle:
        size = int(handle.userblock_size)
        attrs = {key: _plain(value) for key, value in handle.attrs.items()}
        counts = {split: int(handle[split]["labels"].shape[0])
                  for split in SPLIT_NAMES if split in handle}
    with open(path, "r+b") as handle:
        total = os.fstat(handle.fileno()).st_size
        payload = {"file_size": total, "body_sha256": _body_digest(handle.fileno(), size, total),
                   "attrs": attrs, "counts": counts}
        magic = SEAL_MAGIC + str(size).encode() + b"\n"
        body = json.dumps(payload, sort_keys=True, ensure_ascii=True).encode("ascii") + b"\n"
        if size < len(magic) + 65 + len(body):
            raise CacheError(f"internal error: the cache header needs more than {size} bytes")
        rest = body + b"\0" * (size - len(magic) - 65 - len(body))
        handle.write(magic + hashlib.sha256(magic + rest).hexdigest().encode() + b"\n" + rest)
        handle.flush()
        os.fsync(handle.fileno())


def _identity(stat: os.stat_result) -> tuple:
    """What changes when a file is replaced (inode) or written in place (size, times)."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _read_header(path: Path, check_body: bool) -> tuple[tuple, dict | None]:
    """The file's identity and its checked header (None for a cache written before
    headers existed); with `check_body`, every byte after it is checked against its
    digest too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = os.fstat(fd)
        first = os.pread(fd, 64, 0)
        if first.startswith(HDF5_SIGNATURE):
            return _identity(stat), None
        if not first.startswith(SEAL_MAGIC):
            raise _damaged(path, "it starts with neither a probe header nor an HDF5 signature")
        header = _parse_header(path, fd, first, stat.st_size)
        if header["file_size"] != stat.st_size:
            raise _damaged(path, f"{stat.st_size} bytes, its header says {header['file_size']}")
        if check_body:
            digest = _body_digest(fd, header["size"], stat.st_size)
            if digest != header["body_sha256"]:
                raise _damaged(path, "its contents do not match their checksum")
            if _identity(os.fstat(fd)) != _identity(stat):
                raise _damaged(path, "it was written to while it was checked")
        return _identity(stat), header
    finally:
        os.close(fd)


def _parse_header(path: Path, fd: int, first: bytes, file_size: int) -> dict:
    end = first.find(b"\n")
    digits = first[len(SEAL_MAGIC):end] if end > 0 else b""
    size = int(digits) if digits.isdigit() and len(digits) < 10 else 0
    if not MIN_HEADER <= size <= MAX_HEADER or size & (size - 1) or size >= file_size:
        raise _damaged(path, "its header is damaged")
    block = os.pread(fd, size, 0)
    magic, digest, rest = block[:end + 1], block[end + 1:end + 66], block[end + 66:]
    if len(block) != size or hashlib.sha256(magic + rest).hexdigest().encode() + b"\n" != digest:
        raise _damaged(path, "its header does not match its checksum")
    payload = json.loads(rest[:rest.index(b"\n")])
    if not (isinstance(payload, dict) and isinstance(payload.get("attrs"), dict)
            and isinstance(payload.get("counts"), dict) and _is_count(payload.get("file_size"))
            and isinstance(payload.get("body_sha256"), str)):
        raise _damaged(path, "its header is damaged")
    _check_attrs(path, payload["attrs"])
    return {**payload, "size": size}


def _body_digest(fd: int, start: int, end: int) -> str:
    digest = hashlib.sha256()
    while start < end:
        block = os.pread(fd, min(HASH_BLOCK, end - start), start)
        if not block:
            break
        digest.update(block)
        start += len(block)
    return digest.hexdigest()


def _check_layout(path: Path, handle, file_size: int) -> tuple[dict, dict[str, int]]:
    """The attributes and row counts, after checking every attribute, group and dataset
    against the format: names, dtypes, shapes (before anything is allocated: no size may
    exceed the file's), labels within the classes, skipped files in known splits."""
    h5py = _h5py()
    attrs = {key: _plain(value) for key, value in handle.attrs.items()}
    _check_attrs(path, attrs)
    names = set(handle.keys())
    unknown = names - {*SPLIT_NAMES, "skipped"}
    splits = [split for split in SPLIT_NAMES if split in names]
    if unknown or not splits:
        raise _damaged(path, f"it holds the groups {sorted(names)}; expected some of "
                             f"{[*SPLIT_NAMES, 'skipped']}")
    counts = {}
    n_classes = len(attrs["classes"])
    multilabel = attrs.get("multilabel") is True
    for name in [*splits, *(["skipped"] if "skipped" in names else [])]:
        group = handle[name]
        spec = _group_spec(name, multilabel, isinstance(group, h5py.Group) and "ignore" in group)
        if name == "train" and attrs.get("views"):
            spec = {**spec, "views": "<f4"}
        if not isinstance(group, h5py.Group) or set(group.keys()) != set(spec):
            raise _damaged(path, f"'{name}' does not hold the datasets {sorted(spec)}")
        rows = {key: _check_dataset(path, group[key], f"{name}/{key}", kind,
                                    _dataset_tail(attrs, key, multilabel), file_size)
                for key, kind in spec.items()}
        if len(set(rows.values())) != 1 or (name != "skipped" and not rows["labels"]):
            raise _damaged(path, f"the datasets of '{name}' have {rows} rows")
        _check_labels(path, group, name, n_classes, multilabel)
        if name == "skipped":
            if not set(_read_strings(group["splits"])) <= set(SPLIT_NAMES):
                raise _damaged(path, "'skipped/splits' holds an unknown split name")
        else:
            counts[name] = rows["labels"]
    return attrs, counts


def _group_spec(name: str, multilabel: bool, has_ignore: bool) -> dict:
    """The datasets a group holds: multi-label caches store labels as an (N, K) uint8
    matrix, with an `ignore` matrix of the same shape where some label is difficult."""
    spec = dict(SKIPPED_DATASETS if name == "skipped" else SPLIT_DATASETS)
    if multilabel:
        spec["labels"] = "|u1"
        if has_ignore:
            spec["ignore"] = "|u1"
    return spec


def _check_labels(path: Path, group, name: str, n_classes: int, multilabel: bool) -> None:
    """Class indices within the classes; a multi-label matrix (and its ignore mask) 0/1."""
    labels = group["labels"][()]
    if not len(labels):
        return
    if multilabel:
        for key in ("labels", "ignore"):
            if key in group and group[key][()].max() > 1:
                raise _damaged(path, f"'{name}/{key}' holds values other than 0 and 1")
    elif labels.min() < 0 or labels.max() >= n_classes:
        raise _damaged(path, f"'{name}/labels' holds class indices outside 0..{n_classes - 1}")
def _dataset_tail(attrs: dict, key: str, multilabel: bool) -> tuple:
    """The shape of one row of a split's dataset `key`."""
    if key == "features":
        return tuple(attrs["feature_shape"])
    if key == "views":
        return (int(attrs["views"]), *attrs["feature_shape"])
    if multilabel and key in ("labels", "ignore"):
        return (len(attrs["classes"]),)
    return ()


def _check_dataset(path: Path, dataset, name: str, kind, tail: tuple, file_size: int) -> int:
    """The number of rows of a dataset whose dtype and shape are what the format says."""
    h5py = _h5py()
    if not isinstance(dataset, h5py.Dataset):
        raise _damaged(path, f"'{name}' is not a dataset")
    if kind is str:
        info = h5py.check_string_dtype(dataset.dtype)
        ok, itemsize = info is not None and info.encoding == "utf-8" and info.length is None, 16
    else:
        ok, itemsize = dataset.dtype == np.dtype(kind), np.dtype(kind).itemsize
    if not ok:
        raise _damaged(path, f"'{name}' has dtype {dataset.dtype}; expected {kind}")
    shape = dataset.shape
    if shape is None or len(shape) != 1 + len(tail) or tuple(shape[1:]) != tail:
        raise _damaged(path, f"'{name}' has shape {shape}; expected (N, {', '.join(map(str, tail))})")
    if shape[0] * int(np.prod(tail, dtype=np.int64)) * itemsize > file_size:
        raise _damaged(path, f"'{name}' claims {shape[0]} rows, more than the file holds")
    if dataset.chunks and shape[0]:  # every row was written: a lost chunk would read as zeros
        stored: list[tuple] = []
        dataset.id.chunk_iter(lambda info: stored.append(tuple(info.chunk_offset)))
        grid = itertools.product(*(range(0, size, chunk)
                                   for size, chunk in zip(shape, dataset.chunks)))
        if sorted(stored) != sorted(grid):
            raise _damaged(path, f"'{name}' has lost some of its stored rows")
    return int(shape[0])


def _check_features(path: Path, dataset, split: str, key: str = "features") -> np.ndarray:
    """All features of a split, read in blocks that bound memory; NaN or infinity is
    damage (a backbone never produces it)."""
    rows = max(1, VERIFY_BYTES // max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))))
    out = dataset[()] if dataset.shape[0] <= rows else np.empty(dataset.shape, np.float32)
    for start in range(0, dataset.shape[0], rows):
        if dataset.shape[0] > rows:
            out[start:start + rows] = dataset[start:start + rows]
        if not np.isfinite(out[start:start + rows]).all():
            raise _damaged(path, f"'{split}/{key}' holds NaN or infinite values")
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return _is_int(value) and value >= 0


def _is_text(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_hex(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


def _is_classes(value) -> bool:
    return (isinstance(value, list) and len(value) >= 1 and all(_is_text(c) for c in value)
            and len(set(value)) == len(value))


ATTR_RULES = {  # attribute: (required, rule, what the format promises)
    "format_version": (True, lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "feature_key": (True, _is_hex, "a sha256"),
    "source_fingerprint": (True, _is_hex, "a sha256"),
    "backbone": (True, _is_text, "a backbone name"),
    "weights": (True, _is_text, "a weights name"),
    "image_size": (True, lambda v: _is_int(v) and 1 <= v <= MAX_IMAGE_SIZE,
                   f"an integer in 1..{MAX_IMAGE_SIZE}"),
    "pooling": (True, lambda v: v in ("avg", "max", "none"), "avg, max or none"),
    "preprocessing": (True, _is_text, "a preprocessing name"),
    "feature_shape": (True, lambda v: isinstance(v, list) and 1 <= len(v) <= 3 and all(
        _is_int(d) and 1 <= d <= 1 << 20 for d in v), "a list of 1 to 3 positive integers"),
    "classes": (True, _is_classes, "a JSON list of distinct non-empty names"),
    "multilabel": (False, lambda v: v is True, "true (written on multi-label caches only)"),
    "dataset_root": (True, _is_text, "a folder"),
    "labels_file": (False, lambda v: isinstance(v, str), "a path or empty"),
    "seed": (False, _is_int, "an integer"),
    "val_fraction": (False, _is_fraction, "a fraction in [0, 1)"),
    "test_fraction": (False, _is_fraction, "a fraction in [0, 1)"),
    "ignored_files": (False, _is_count, "a count"),
    "weights_source": (False, _is_text, "a weights source"),
    "created": (False, lambda v: isinstance(v, str), "a date"),
    "versions": (False, lambda v: isinstance(v, dict), "a JSON object"),
    "attrs_checksum": (False, _is_hex, "a sha256"),
    "views": (False, lambda v: _is_int(v) and 1 <= v <= 4096, "an integer from 1 to 4096"),
    "views_policy": (False, _is_text, "a policy name"),
    "views_seed": (False, _is_count, "a seed"),
    "extract_runtime": (False, lambda v: v in ("tensorflow", "openvino"), "tensorflow or openvino"),
    **{key: (False, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
             and 0 <= v < float("inf"), "a non-negative number")
       for key in ("extract_images", "extract_seconds", "extract_images_per_second")},
}


def _check_attrs(path: Path, attrs: dict) -> None:
    """The root attributes are what the format promises, and match their checksum."""
    if attrs.get("format") != FORMAT:
        raise CacheError(
            "expected a probe feature cache (HDF5 written by `probe extract`); this file "
            f"has no probe header. Received: path='{display(path)}'"
        )
    version = attrs.get("format_version")
    if _is_int(version) and version > FORMAT_VERSION:
        raise CacheError(
            f"this cache was written by a newer probe (format {version}); upgrade probe, or "
            f"run `probe extract` with its dataset to rebuild it. Received: path='{display(path)}'"
        )
    for key, (required, rule, promise) in ATTR_RULES.items():
        if (key in attrs or required) and not rule(attrs.get(key)):
            shown = repr(attrs.get(key))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise _damaged(path, f"attribute {key} is {shown}; expected {promise}")
    if "attrs_checksum" in attrs and attrs["attrs_checksum"] != attrs_checksum(attrs):
        raise _damaged(path, "its attributes do not match their checksum")


@contextlib.contextmanager
def _guard(path: Path):
    """Whatever HDF5, h5py or a damaged header raise while a cache is read becomes one
    `CacheError` naming the file and the fix, never a traceback."""
    try:
        yield
    except CacheError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError,
            IndexError, OverflowError, MemoryError) as error:
        raise _read_error(path, error) from None


def _damaged(path, detail: str) -> CacheError:
    return _read_error(path, detail)


# --- helpers ------------------------------------------------------------------------


def _h5py():
    import h5py

    return h5py


def _h5open(path, mode: str, userblock: int = 0):
    """h5py.File with HDF5's own file locking used where the file system has it. probe
    never writes a finished cache in place (it renames a new file over it), so a reader does
    not need the lock, and a file system without locks only loses that safety net.
    A new file reserves `userblock` bytes for the header (`seal`) and uses the HDF5 1.10
    format, whose object headers carry checksums (measured: with the 1.8 format a flipped
    byte in a datatype message reads features back as float64 or big-endian without error)."""
    if mode == "r":
        return _h5py().File(path, mode, locking="best-effort")
    return _h5py().File(path, mode, locking="best-effort", libver=("v110", "latest"),
                        userblock_size=userblock or None)


def _is_lock_error(error) -> bool:
    text = str(error).lower()
    return any(phrase in text for phrase in
               ("unable to lock file", "file locking", "no locks available"))


def _read_error(path, error: BaseException | str) -> CacheError:
    """The one-line error for a cache file that can not be read (or a description of
    the damage found)."""
    error = " ".join(str(error).split())
    if _is_lock_error(error):
        return CacheError(
            f"HDF5 could not lock the cache file '{display(path)}' ({error}); file locking is "
            "not available on this file system (often a network file system). Set "
            "HDF5_USE_FILE_LOCKING=FALSE, or put the cache on a local disk with --cache-dir "
            "or PROBE_CACHE_DIR."
        )
    if Path(path).suffix.lower() != ".h5" and not _has_hdf5_signature(path):
        return CacheError(
            f"expected a probe feature cache (an HDF5 file written by `probe extract`); "
            f"'{display(path)}' is not one. Pass a cache file (see `probe cache ls`), or "
            "extract the dataset first with `probe extract DATASET`."
        )
    return CacheError(
        f"cache file '{display(path)}' is corrupt or truncated ({error}); delete it and run "
        "`probe extract` again to rebuild it (it is rebuilt from the images, reusing nothing "
        "from the damaged file)."
    )


def _has_hdf5_signature(path) -> bool:
    """Whether the file starts like an HDF5 file. A file that neither does nor is named
    like a cache (*.h5), a photo say, must never be called a damaged cache to delete."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return True  # unreadable: keep the damaged-cache message, which names the error


def _read_strings(dataset) -> list[str]:
    return [os.fsdecode(value) for value in dataset[()]] if dataset.shape[0] else []



def _attr(value):
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a path with bytes that are not UTF-8
            return np.bytes_(os.fsencode(value))
    return value


def _plain(value):
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
