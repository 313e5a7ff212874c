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
Writes are crash safe: the finished file is written under a temporary name and renamed
over the old one, and work in progress lives in `.parts-<key>/` as one atomically renamed
file per batch, so a kill at any instant loses at most the batch being computed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import CacheError, CacheMismatchError, SourceChangedError

FORMAT = "probe-feature-cache"
FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
SETTINGS = ("backbone", "weights", "image_size", "pooling", "preprocessing")
ASSEMBLE_ROWS = 512  # rows copied at a time when writing a cache: bounds memory
TEMP_PREFIX = "."  # a cache being written is ".<name>.tmp-<pid>": never listed, never read


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
        self.report: dict = {}  # filled by extraction: what this run did

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
                        f"{attrs['format_version']}); upgrade probe or rebuild it with "
                        f"`probe extract --rebuild`. Received: path='{path}'"
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
        from .errors import DatasetError

        old = self.source_records()
        problem = ""
        try:
            found = data.discover(
                self.attrs["dataset_root"], self.attrs.get("labels_file") or None,
                float(self.attrs.get("val_fraction", 0.15)),
                float(self.attrs.get("test_fraction", 0.15)), int(self.attrs.get("seed", 0)),
            )
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


# --- writing ------------------------------------------------------------------------


class CacheLock:
    """An exclusive lock on one cache key, held by one extraction at a time."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None

    def __enter__(self) -> "CacheLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as error:
            raise CacheError(
                f"expected a writable cache directory; {error.strerror}. Pass a writable "
                f"--cache-dir or set PROBE_CACHE_DIR. Received: lock='{display(self.path)}'"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise CacheError(
                f"another probe extract (pid {holder}) is writing this cache; wait for it to "
                f"finish and run again. Received: lock='{self.path}'"
            ) from None
        except OSError as error:
            handle.close()
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise CacheError(
                    f"file locking is not available on this file system ({error.strerror}); "
                    "put the cache on a local disk with --cache-dir or PROBE_CACHE_DIR. "
                    f"Received: lock='{self.path}'"
                ) from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class PartStore:
    """Batches of finished work, one atomically written .npz each, so an interrupted
    extraction resumes where it stopped. Holds only numbers and byte strings: loaded with
    allow_pickle=False."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._indexes: dict[Path, dict] = {}  # parts already read and checked
        self._next: int | None = None  # number of the next part to write

    def write(
        self,
        features: np.ndarray,
        paths: list[str],
        sizes: list[int],
        mtimes: list[int],
        skipped: list[tuple[str, str, int, int]],
    ) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._next is None:  # once per run, not per batch
            self._next = len(list(self.directory.glob("part-*.npz")))
        while (self.directory / f"part-{self._next:06d}.npz").exists():
            self._next += 1
        final = self.directory / f"part-{self._next:06d}.npz"
        self._next += 1
        temporary = final.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            np.savez(
                handle,
                features=features.astype(np.float32, copy=False),
                paths=_encode(paths),
                sizes=np.asarray(sizes, dtype=np.int64),
                mtimes=np.asarray(mtimes, dtype=np.int64),
                skipped_paths=_encode([s[0] for s in skipped]),
                skipped_reasons=_encode([s[1] for s in skipped]),
                skipped_sizes=np.asarray([s[2] for s in skipped], dtype=np.int64),
                skipped_mtimes=np.asarray([s[3] for s in skipped], dtype=np.int64),
            )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        return final

    def parts(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("part-*.npz"))

    def rows(self) -> Iterator[tuple[str, Row, int, int]]:
        for part, index in self._scan():
            for i, (path, size, mtime) in enumerate(
                zip(index["paths"], index["sizes"], index["mtimes"])
            ):
                yield path, Row(str(part), "", i), size, mtime

    def skip_records(self) -> Iterator[tuple[str, str, int, int]]:
        for _, index in self._scan():
            yield from index["skipped"]

    def _scan(self) -> list[tuple[Path, dict]]:
        """The readable parts with their paths, sizes, mtimes and skip records. A part that
        can not be read completely (damaged on disk) is deleted: its images are extracted
        again instead of being trusted."""
        scanned = []
        for part in self.parts():
            if part not in self._indexes:
                try:
                    self._indexes[part] = _read_part_index(part)
                except (zipfile.BadZipFile, ValueError, KeyError, EOFError):
                    part.unlink(missing_ok=True)  # damaged: zip, npy header, lengths
                    continue
                except OSError as error:  # unreadable now, maybe not damaged: keep it
                    raise CacheError(
                        f"could not read the finished batch '{display(part)}' "
                        f"({error.strerror}); fix the cause and run again."
                    ) from None
            scanned.append((part, self._indexes[part]))
        return scanned

    def remove_temporary(self) -> None:
        """Delete half-written parts left by a killed run."""
        if self.directory.is_dir():
            for path in self.directory.glob("part-*.tmp"):
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                path.unlink()
            self.directory.rmdir()


def _read_part_index(part: Path) -> dict:
    import zipfile

    with np.load(part, allow_pickle=False) as data:
        index = {
            "paths": _decode(data["paths"]),
            "sizes": [int(v) for v in data["sizes"]],
            "mtimes": [int(v) for v in data["mtimes"]],
            "skipped": list(zip(
                _decode(data["skipped_paths"]), _decode(data["skipped_reasons"]),
                (int(v) for v in data["skipped_sizes"]), (int(v) for v in data["skipped_mtimes"]),
            )),
        }
    with zipfile.ZipFile(part) as archive:
        if archive.testzip() is not None:
            raise ValueError("checksum mismatch")
        with archive.open("features.npy") as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape = np.lib.format.read_array_header_1_0(member)[0]
            else:
                shape = np.lib.format.read_array_header_2_0(member)[0]
    n = len(index["paths"])
    if shape[0] != n or len(index["sizes"]) != n or len(index["mtimes"]) != n:
        raise ValueError("inconsistent part")
    return index


@dataclass
class Entry:
    """One row of the cache to be written: a sample and where its features are."""

    path: str
    label: int
    split: str
    size: int
    mtime: int
    row: Row


def write_cache(
    target: Path,
    attrs: dict,
    entries: list[Entry],
    skipped: list[tuple[str, str, int, int, int, str]],
    feature_shape: tuple[int, ...],
) -> None:
    """Write a complete cache file under a temporary name, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{TEMP_PREFIX}{target.name}.tmp-{os.getpid()}")
    try:
        with _h5open(temporary, "w") as handle:
            for key, value in attrs.items():
                handle.attrs[key] = _attr(value)
            readers = _RowReader()  # one for every split: parts and caches opened once
            try:
                for split in SPLIT_NAMES:
                    rows = [entry for entry in entries if entry.split == split]
                    if rows:
                        _write_split(handle, split, rows, feature_shape, readers)
            finally:
                readers.close()
            group = handle.create_group("skipped")
            _strings(group, "paths", [s[0] for s in skipped])
            _strings(group, "reasons", [s[1] for s in skipped])
            _numbers(group, "sizes", [s[2] for s in skipped], np.int64)
            _numbers(group, "mtimes", [s[3] for s in skipped], np.int64)
            _numbers(group, "labels", [s[4] for s in skipped], np.int32)
            _strings(group, "splits", [s[5] for s in skipped])
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        _fsync_directory(target.parent)
    finally:
        if temporary.exists():
            temporary.unlink()


def _write_split(handle, split: str, rows: list[Entry], feature_shape: tuple[int, ...],
                 readers: "_RowReader") -> None:
    group = handle.create_group(split)
    n = len(rows)
    chunk_rows = max(1, min(n, (1 << 20) // max(1, 4 * int(np.prod(feature_shape)))))
    features = group.create_dataset(
        "features", shape=(n, *feature_shape), dtype=np.float32,
        chunks=(chunk_rows, *feature_shape), maxshape=(None, *feature_shape), fletcher32=True,
    )
    _numbers(group, "labels", [r.label for r in rows], np.int32)
    _strings(group, "paths", [r.path for r in rows])
    _numbers(group, "sizes", [r.size for r in rows], np.int64)
    _numbers(group, "mtimes", [r.mtime for r in rows], np.int64)
    for start in range(0, n, ASSEMBLE_ROWS):
        block = rows[start:start + ASSEMBLE_ROWS]
        features[start:start + len(block)] = readers.read([r.row for r in block], feature_shape)


class _RowReader:
    """Reads feature rows from cache files and parts, keeping files open across blocks."""

    def __init__(self):
        self._h5: dict[str, object] = {}
        self._parts: dict[str, np.ndarray] = {}

    def read(self, rows: list[Row], feature_shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty((len(rows), *feature_shape), dtype=np.float32)
        by_source: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for position, row in enumerate(rows):
            by_source.setdefault((row.source, row.group), []).append((row.index, position))
        for (source, group), pairs in by_source.items():
            pairs.sort()
            indices = [index for index, _ in pairs]
            positions = [position for _, position in pairs]
            if group:
                try:
                    if source not in self._h5:
                        self._h5[source] = _h5open(source, "r")
                    out[positions] = self._h5[source][group]["features"][indices]
                except (OSError, KeyError, ValueError) as error:
                    raise _read_error(source, error) from None
            else:
                if source not in self._parts:
                    if len(self._parts) > 8:
                        self._parts.clear()
                    with np.load(source, allow_pickle=False) as data:
                        self._parts[source] = data["features"]
                out[positions] = self._parts[source][indices]
        return out

    def close(self) -> None:
        for handle in self._h5.values():
            handle.close()
        self._h5.clear()
        self._parts.clear()


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


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _has_hdf5_signature(path) -> bool:
    """Whether the file starts like an HDF5 file. A file that neither does nor is named
    like a cache (*.h5), a photo say, must never be called a damaged cache to delete."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    except OSError:
        return True  # unreadable: keep the damaged-cache message, which names the error


def display(path) -> str:
    """A path for messages: bytes that are not UTF-8 are shown escaped (\\xff) instead of
    failing to print."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def _encode(strings: Iterable[str]) -> np.ndarray:
    """Paths as bytes: file names that are not valid UTF-8 survive the round trip."""
    encoded = [os.fsencode(s) for s in strings]
    return np.array(encoded, dtype=bytes) if encoded else np.zeros(0, dtype="S1")


def _decode(array: np.ndarray) -> list[str]:
    return [os.fsdecode(bytes(value)) for value in array]


def _numbers(group, name: str, values: list[int], dtype) -> None:
    """An integer dataset with a Fletcher-32 checksum per chunk, so a damaged file is an
    error when read instead of wrong labels."""
    data = np.asarray(values, dtype=dtype)
    if len(data):
        group.create_dataset(name, data=data, chunks=True, fletcher32=True)
    else:
        group.create_dataset(name, data=data)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: not every platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _strings(group, name: str, values: list[str]) -> None:
    dtype = _h5py().string_dtype("utf-8")
    data = np.array([os.fsencode(v) for v in values], dtype=object)
    group.create_dataset(name, shape=(len(values),), dtype=dtype, data=data if values else None)


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
