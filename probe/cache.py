"""The feature cache: one HDF5 file per (dataset, backbone, extraction settings).

Layout (documented in the README so anyone with h5py can read it):

    /                 attributes: format, format_version, feature_key, source_fingerprint,
                      backbone, weights, image_size, pooling, preprocessing, feature_shape,
                      classes (JSON), dataset_root, labels_file, seed, val_fraction,
                      test_fraction, ignored_files, created, versions (JSON)
    /<split>/features float32 (N, *feature_shape)     split in train, val, test
    /<split>/labels   int32 (N,)                      index into classes
    /<split>/paths    UTF-8 strings (N,)              relative to dataset_root
    /<split>/sizes    int64 (N,)  /<split>/mtimes int64 (N,) nanoseconds
    /skipped/{paths, reasons, sizes, mtimes, labels, splits}

Numeric datasets carry Fletcher-32 checksums, so damage is a read error, not wrong data.
This module only reads; `store.py` writes (parts, the final file, the lock).
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

from .errors import CacheError, CacheMismatchError, SourceChangedError

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
    """One split read back from a cache; row i of each array is the same image."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Row:
    """Where a computed feature vector lives: a cache file's split and row, or a part."""

    source: str  # path of an .h5 cache or a part .npz
    group: str  # split name in a cache; "" in a part
    index: int


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
    """Read access to a finished cache file. Use `FeatureCache.open(path)`."""

    def __init__(self, path: Path, attrs: dict, counts: dict[str, int]):
        self.path = Path(path)
        self.attrs = attrs
        self.counts = counts

    @classmethod
    def open(cls, path: str | os.PathLike) -> "FeatureCache":
        """Open and validate a cache file; a clear `CacheError` if it is not one."""
        path = Path(path).expanduser()
        if not path.is_file():
            what = "it is a directory (caches are its *.h5 files; see `probe cache ls`)" \
                if path.is_dir() else "it does not exist"
            raise CacheError(
                f"expected a feature cache file; {what}. Run `probe extract` "
                f"first or pass an existing file. Received: path='{path}'"
            )
        try:
            with _h5open(path, "r") as handle:
                attrs = {key: _plain(value) for key, value in handle.attrs.items()}
                if attrs.get("format") != FORMAT:
                    raise CacheError(
                        f"expected a probe feature cache (HDF5 written by `probe extract`); "
                        f"this file has no probe header. Received: path='{path}'"
                    )
                if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
                    raise CacheError(
                        f"this cache was written by a newer probe (format "
                        f"{attrs['format_version']}); upgrade probe, or run `probe extract` "
                        f"with its dataset to rebuild it. Received: path='{path}'"
                    )
                counts = {}
                for split in SPLIT_NAMES:
                    if split in handle:
                        group = handle[split]
                        n = group["labels"].shape[0]
                        if group["features"].shape[0] != n or group["paths"].shape[0] != n:
                            raise CacheError(
                                f"cache '{path}' is inconsistent: split '{split}' has "
                                f"{group['features'].shape[0]} feature rows but {n} labels. "
                                "Delete it and run `probe extract` again."
                            )
                        counts[split] = n
        except CacheError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise _read_error(path, error) from None
        return cls(path, attrs, counts)

    # --- what it holds ---------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def splits(self) -> list[str]:
        return [split for split in SPLIT_NAMES if self.counts.get(split)]

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
        features, labels, paths = self._datasets(name, "features", "labels", "paths")
        return Split(name, features, labels, paths)

    def features(self, split: str) -> np.ndarray:
        """The features of one split (N, *feature_shape)."""
        return self._datasets(split, "features")[0]

    def labels(self, split: str) -> np.ndarray:
        """The class indices of one split (N,), without reading the features."""
        return self._datasets(split, "labels")[0]

    def paths(self, split: str) -> list[str]:
        """The relative paths of one split, without reading the features."""
        return self._datasets(split, "paths")[0]

    def index(self, split: str) -> tuple[list[str], np.ndarray]:
        """Relative paths and class indices of one split, row-aligned, without features."""
        paths, labels = self._datasets(split, "paths", "labels")
        return paths, labels

    def _datasets(self, split: str, *names: str) -> list:
        if split not in self.counts:
            raise CacheError(
                f"expected one of the cache's splits {self.splits}. Received: split='{split}'"
            )
        with self._read() as handle:
            group = handle[split]
            return [_read_strings(group[name]) if name == "paths"
                    else group[name][()].astype(np.int64) if name == "labels"
                    else group[name][()] for name in names]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(relative path, reason) of every file that could not be decoded."""
        with self._read() as handle:
            if "skipped" not in handle:
                return []
            group = handle["skipped"]
            return list(zip(_read_strings(group["paths"]), _read_strings(group["reasons"])))

    def info(self) -> dict:
        """A JSON-serialisable summary: settings, splits, counts, skipped files, size."""
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
            "splits": {split: self.counts[split] for split in self.splits},
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "ignored_files": self.attrs.get("ignored_files", 0),
            "created": self.attrs.get("created"),
            "versions": self.attrs.get("versions"),
            "size_bytes": self.path.stat().st_size,
        }

    def source_records(self) -> SourceRecords:
        """{relative path: (class name, split, size, mtime_ns)} of every source file the
        cache was built from, skipped files included."""
        classes = self.classes
        records = {}
        with self._read() as handle:
            for name in [*self.splits, "skipped"]:
                if name not in handle:
                    continue
                group = handle[name]
                paths = _read_strings(group["paths"])
                labels = group["labels"][()]
                splits = _read_strings(group["splits"]) if name == "skipped" else [name] * len(paths)
                for path, label, split, size, mtime in zip(
                    paths, labels, splits, group["sizes"][()], group["mtimes"][()]
                ):
                    label = int(label)
                    records[path] = (classes[label] if 0 <= label < len(classes) else "",
                                     split, int(size), int(mtime))
        return records

    def check_source(self, strict: bool = False) -> "SourceChanges":
        """Compare the cache with its dataset as it is now on disk.

        Finds the samples again with the settings the cache was built with (dataset root,
        labels file, seed, fractions) and returns the files added, removed and modified
        (size or modification time) since, and those whose class or split changed. With
        `strict=True` any change raises `SourceChangedError` instead.

        >>> changes = cache.check_source()
        >>> if changes: print(changes.message())
        """
        from . import data
        from .settings import SplitSettings
        from .errors import DatasetError

        old = self.source_records()
        problem = ""
        try:
            split = SplitSettings.from_attrs(self.attrs)  # label files per split, too
            found = data.discover(self.attrs["dataset_root"], split.labels, split.val_fraction,
                                  split.test_fraction, split.seed)
        except DatasetError as error:
            new: SourceRecords = {}
            problem = str(error)
        else:
            new = {}
            for sample in found.samples:
                try:
                    stat = os.stat(found.root / sample.path)
                    size, mtime = int(stat.st_size), int(stat.st_mtime_ns)
                except OSError:
                    size, mtime = -1, -1
                new[sample.path] = (found.classes[sample.label], sample.split, size, mtime)
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
        """(relative path, row, size, mtime) of every stored feature row."""
        with self._read() as handle:
            for split in self.splits:
                group = handle[split]
                paths = _read_strings(group["paths"])
                for i, (path, size, mtime) in enumerate(
                    zip(paths, group["sizes"][()], group["mtimes"][()])
                ):
                    yield path, Row(str(self.path), split, i), int(size), int(mtime)

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
        """The open HDF5 file; a read error anywhere inside (a truncated file, a checksum
        that does not match) becomes a `CacheError` naming the file and the fix."""
        try:
            with _h5open(self.path, "r") as handle:
                yield handle
        except CacheError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise _read_error(self.path, error) from None

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"FeatureCache('{self.path}', backbone={self.backbone!r}, {counts})"


def list_caches(cache_dir: str | os.PathLike | None = None) -> list[FeatureCache]:
    """Every readable cache in the directory, most recently written first."""
    directory = resolve_cache_dir(cache_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob("*.h5"):
        try:
            found.append((path.stat().st_mtime, path))
        except OSError:  # removed since the listing
            continue
    caches = []
    for _, path in sorted(found, reverse=True):
        try:
            caches.append(FeatureCache.open(path))
        except CacheError:
            continue
    return caches


# --- helpers ------------------------------------------------------------------------


def _h5py():
    import h5py

    return h5py


def _h5open(path, mode: str):
    """h5py.File with HDF5's own file locking used where the file system has it. probe
    never writes a finished cache in place (it renames a new file over it), so a reader does
    not need the lock, and a file system without locks only loses that safety net."""
    return _h5py().File(path, mode, locking="best-effort")


def _is_lock_error(error) -> bool:
    text = str(error).lower()
    return any(phrase in text for phrase in
               ("unable to lock file", "file locking", "no locks available"))


def _read_error(path, error: BaseException) -> CacheError:
    """The one-line error for a cache file that can not be read."""
    error = " ".join(str(error).split())
    if _is_lock_error(error):
        return CacheError(
            f"HDF5 could not lock the cache file '{display(path)}' ({error}); file locking is "
            "not available on this file system (often a network file system). Set "
            "HDF5_USE_FILE_LOCKING=FALSE, or put the cache on a local disk with --cache-dir "
            "or PROBE_CACHE_DIR."
        )
    return CacheError(
        f"cache file '{display(path)}' is corrupt or truncated ({error}); delete it and run "
        "`probe extract` again to rebuild it (it is rebuilt from the images, reusing nothing "
        "from the damaged file)."
    )


def display(path) -> str:
    """A path for messages: bytes that are not UTF-8 are shown escaped (\\xff) instead of
    failing to print."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def _read_strings(dataset) -> list[str]:
    return [os.fsdecode(value) for value in dataset[()]] if dataset.shape[0] else []


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
