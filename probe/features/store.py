"""Writing, in one place: atomic file writes, the lock of a cache key, the parts of work in
progress, and the final cache file.

Every file probe writes goes through `atomic_path` / `atomic_write`: written under a
temporary name next to its target, flushed to disk, then renamed over it, so a reader (or a
kill at any instant) sees the old file or the new one, never half of one. Work in progress
lives in `.parts-<key>/` as one atomically written file per batch, so a kill loses at most
the batch being computed; the finished cache is assembled from parts and existing caches.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import CacheError
from ..files import TEMP_PREFIX, atomic_path, atomic_write, display
from ..isolated import IsolationError, run_isolated
from . import cache as cache_mod
from .cache import FeatureCache, Row, ViewRow
from .format import (SPLIT_NAMES, attr_value, attrs_checksum, h5open, h5py_module, header_size,
                     is_unsealed, read_error, read_strings, seal)
from .plan import Entry

ASSEMBLE_ROWS = 512  # rows copied at a time when writing a cache: bounds memory


@contextlib.contextmanager
def write_errors_as_cache_error(directory: Path) -> Iterator[None]:
    """A full disk or a directory that turned read-only is one line, not a traceback;
    the finished batches stay for the next run."""
    try:
        yield
    except OSError as error:
        failure = _write_failure(directory, error)
    else:
        return
    raise failure  # outside the except block: no chained traceback holding HDF5 objects


def _write_failure(directory: Path, error: Exception) -> CacheError:
    reason = " ".join(str(getattr(error, "strerror", None) or error).split())
    if len(reason) > 200:  # HDF5 may put its whole error stack in the message
        reason = reason[:200] + " ..."
    error.__traceback__ = None  # drop the frames (and HDF5 objects) the error still holds
    return CacheError(
        f"could not write the cache in '{display(directory)}' ({reason}); finished batches "
        "are kept. Free space or fix the permissions and run again, or pass another "
        "--cache-dir."
    )


# --- the lock and the parts ---------------------------------------------------------------


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
        name: str | None = None,
        views: list[int] | None = None,
    ) -> Path:
        """Write one batch as `part-NNNNNN.npz`, or `part-<name>.npz` when several
        processes write into the directory at once (the Ray engine's shards). `views`:
        the view index of each row, in a part of augmented views."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if name is not None:
            final = self.directory / f"part-{name}.npz"
        else:
            final = self._next_numbered()
        with atomic_write(final) as handle:
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
                **({} if views is None else {"views": np.asarray(views, dtype=np.int64)}),
            )
        return final

    def _next_numbered(self) -> Path:
        if self._next is None:  # once per run, not per batch
            self._next = len(list(self.directory.glob("part-*.npz")))
        while (self.directory / f"part-{self._next:06d}.npz").exists():
            self._next += 1
        self._next += 1
        return self.directory / f"part-{self._next - 1:06d}.npz"

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

    def view_rows(self) -> Iterator[tuple[str, int, ViewRow, int, int]]:
        """(path, view index, row, size, mtime) of every row of the parts of views."""
        for part, index in self._scan():
            for i, (path, view, size, mtime) in enumerate(
                zip(index["paths"], index["views"], index["sizes"], index["mtimes"])
            ):
                yield path, view, ViewRow(str(part), "", i, view), size, mtime

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
        """Delete half-written parts left by a killed run (and the older part-*.tmp names)."""
        if self.directory.is_dir():
            for pattern in (f"{TEMP_PREFIX}part-*.tmp-*", "part-*.tmp"):
                for path in self.directory.glob(pattern):
                    path.unlink(missing_ok=True)

    def remove_covered(self, saved: set[tuple[str, int, int]]) -> None:
        """Delete the parts whose every row and skip record is in `saved` (what a finished
        cache holds): left by a kill while a finished run was cleaning up. Parts with other
        work (an interrupted extraction of other splits) stay for it to resume."""
        for part, index in self._scan():
            keys = set(zip(index["paths"], index["sizes"], index["mtimes"]))
            keys |= {(path, size, mtime) for path, _, size, mtime in index["skipped"]}
            if keys <= saved:
                part.unlink(missing_ok=True)
        if self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()

    def clear(self) -> None:
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                path.unlink()
            self.directory.rmdir()


def _read_part_index(part: Path) -> dict:
    with np.load(part, allow_pickle=False) as data:
        index = {
            "paths": _decode(data["paths"]),
            "sizes": [int(v) for v in data["sizes"]],
            "mtimes": [int(v) for v in data["mtimes"]],
            "skipped": list(zip(
                _decode(data["skipped_paths"]), _decode(data["skipped_reasons"]),
                (int(v) for v in data["skipped_sizes"]), (int(v) for v in data["skipped_mtimes"]),
            )),
            "views": [int(v) for v in data["views"]] if "views" in data.files else [],
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
    if shape[0] != n or len(index["sizes"]) != n or len(index["mtimes"]) != n \
            or len(index["views"]) not in (0, n):
        raise ValueError("inconsistent part")
    return index


def remove_leftovers(directory: Path, target: Path, parts: PartStore) -> None:
    """Half-written files of a killed run of this cache (the lock is held, so no live
    process is writing them)."""
    parts.remove_temporary()
    for path in directory.glob(f"{TEMP_PREFIX}{target.name}.tmp-*"):
        path.unlink(missing_ok=True)


def tidy_up_to_date(directory: Path, lock: Path, parts: PartStore, cache: FeatureCache) -> None:
    """For an up-to-date cache: remove parts whose work it already holds (a kill during the
    clean-up of a finished run leaves them). Skipped while another extraction holds the
    lock; a failure here never stops the run that found the cache up to date."""
    if not parts.directory.is_dir():
        return
    saved = {(path, size, mtime) for path, _, size, mtime in cache.rows()}
    saved |= {(path, size, mtime) for path, _, size, mtime in cache.skip_records()}
    try:
        with CacheLock(lock):
            remove_leftovers(directory, cache.path, parts)
            parts.remove_covered(saved)
    except (CacheError, OSError):
        pass


def open_existing(path: Path) -> tuple[FeatureCache | None, str]:
    """The existing cache file, or None and why it can not be used (empty if missing)."""
    if not path.exists():
        return None, ""
    try:
        cache = FeatureCache.open(path)
        damage = cache.damage()  # reads it all: a flipped byte or a NaN is not "up to date"
    except CacheError as error:
        return None, str(error)  # corrupt: rebuilt from scratch, it is replaced atomically
    return (None, damage) if damage else (cache, "")


# --- caches written before the seal ---------------------------------------------------

RESEAL_SECONDS = 120  # time limit of a reseal: this, plus one second per RESEAL_BYTES_PER_S
RESEAL_BYTES_PER_S = 5 << 20


def reseal(path: str | os.PathLike) -> dict[str, int]:
    """Rewrite a cache file without the checksum header (written by an older probe) sealed,
    keeping only the rows (and skip records) whose source file is still there with the same
    path, size, modification time, labels and split: damage a flipped byte made (another
    path, another label) is left out, never sealed. Those rows are extracted again by the
    next `probe extract`.

    HDF5 parses the unsealed file only in a child process with a time limit: a damaged
    byte that crashes or hangs it is one `CacheError` here, and the file is left as it was.
    Returns {"kept": rows, "left_out": rows, "skipped_kept": skip records}; a cache that is
    already sealed is only checked ({"kept": rows, "left_out": 0, ...})."""
    path = Path(path).expanduser()
    if not is_unsealed(path):
        cache = FeatureCache.open(path)
        return {"kept": sum(cache.counts.values()), "left_out": 0,
                "skipped_kept": len(cache.skipped)}
    size = path.stat().st_size
    try:
        return run_isolated(_reseal_unsealed, str(path),
                            timeout=RESEAL_SECONDS + size / RESEAL_BYTES_PER_S,
                            what=f"reading cache file '{display(path)}'")
    except IsolationError as error:
        raise CacheError(
            f"expected a readable older-format cache; {error}, so the file is damaged. Delete "
            f"it and run `probe extract` again to rebuild it from the images."
        ) from None


def _reseal_unsealed(path: str) -> dict[str, int]:
    """The child's side of `reseal` (HDF5 reads the unsealed file here, and only here)."""
    cache = FeatureCache._open(Path(path), allow_unsealed=True)
    cache.verify()  # every checksum HDF5 has (Fletcher-32 on the numbers)
    current, problem = cache_mod.current_source_records(cache.attrs)
    if problem:
        raise CacheError(
            f"expected the dataset of cache '{display(path)}' to reseal it against its images; "
            f"{problem} Put the dataset back where it was, or delete the cache and run "
            "`probe extract` again."
        )
    still = {p for p, record in cache.source_records().items() if current.get(p) == record}
    entries, skipped, left_out = _rows_to_keep(cache, still)
    if not entries:
        raise CacheError(
            f"expected rows to keep in cache '{display(path)}'; none of its {left_out} rows "
            "matches an image of its dataset as it is now. Delete it and run `probe extract` "
            "again."
        )
    attrs = {key: value for key, value in cache.attrs.items() if key != "attrs_checksum"}
    if left_out:  # never "up to date": the next extraction fills the rows left out
        attrs["source_fingerprint"] = cache_mod.fingerprint(["resealed", attrs.get(
            "source_fingerprint"), left_out])
    views = None
    if cache.view_count:
        views = {(e.path, e.size, e.mtime): [ViewRow(path, "train", e.row.index, v)
                                             for v in range(cache.view_count)]
                 for e in entries if e.split == "train"}
    write_cache(Path(path), attrs, entries, skipped, cache.feature_shape, views)
    return {"kept": len(entries), "left_out": left_out, "skipped_kept": len(skipped)}


def _rows_to_keep(cache: FeatureCache, still: set[str]) -> tuple[list[Entry], list, int]:
    """The entries and skip records of `cache` whose path is in `still`, and how many rows
    were left out."""
    entries, skipped, left_out = [], [], 0
    with cache._read() as handle:
        for split in [*cache.splits, "skipped"]:
            if split not in handle:
                continue
            group = handle[split]
            paths = read_strings(group["paths"])
            labels = group["labels"][()]
            ignore = group["ignore"][()] if "ignore" in group else None
            splits = read_strings(group["splits"]) if split == "skipped" \
                else [split] * len(paths)
            reasons = read_strings(group["reasons"]) if split == "skipped" else None
            for i, (name, size, mtime) in enumerate(zip(paths, group["sizes"][()],
                                                        group["mtimes"][()])):
                if name not in still:
                    left_out += split != "skipped"
                    continue
                label, targets, ignored = _label_of(labels[i], None if ignore is None
                                                    else ignore[i])
                if reasons is not None:
                    skipped.append((name, reasons[i], int(size), int(mtime), label, splits[i],
                                    targets, ignored))
                else:
                    entries.append(Entry(name, label, split, int(size), int(mtime),
                                         Row(str(cache.path), split, i), targets, ignored))
    return entries, skipped, left_out


def _label_of(label: np.ndarray, ignore: np.ndarray | None) -> tuple[int, tuple, tuple]:
    """(class index, targets, ignored) of one stored row, as `Entry` takes them."""
    if np.ndim(label) == 0:
        return int(label), (), ()
    ignored = tuple(int(k) for k in np.flatnonzero(ignore)) if ignore is not None else ()
    return -1, tuple(int(k) for k in np.flatnonzero(label)), ignored


def reusable_rows(directory: Path, feature_key: str, parts: PartStore):
    """Feature rows and skip records already computed with the same settings: in any
    cache of this dataset and backbone settings, and in parts of an interrupted run."""
    rows: dict[tuple[str, int, int], Row] = {}
    skips: dict[tuple[str, int, int], str] = {}
    for existing in cache_mod.list_caches(directory):
        if existing.attrs.get("feature_key") != feature_key:
            continue
        try:
            found_rows = list(existing.rows())
            found_skips = list(existing.skip_records())
        except CacheError:
            continue  # damaged: nothing in it is trusted
        for path, row, size, mtime in found_rows:
            rows.setdefault((path, size, mtime), row)
        for path, reason, size, mtime in found_skips:
            skips.setdefault((path, size, mtime), reason)
    for path, row, size, mtime in parts.rows():
        rows[(path, size, mtime)] = row
    for path, reason, size, mtime in parts.skip_records():
        skips[(path, size, mtime)] = reason
    return rows, skips


ViewKey = tuple[str, int, int, int]  # (relative path, size, mtime_ns, view index)


def reusable_view_rows(directory: Path, feature_key: str, views_policy: str, views_seed: int,
                       parts: PartStore) -> dict[ViewKey, ViewRow]:
    """Views already computed with the same features, policy and seed: in any cache of this
    dataset (every view index it holds) and in parts of an interrupted run."""
    found: dict[ViewKey, ViewRow] = {}
    for existing in cache_mod.list_caches(directory):
        attrs = existing.attrs
        if (attrs.get("feature_key"), attrs.get("views_policy"), attrs.get("views_seed")) != \
                (feature_key, views_policy, views_seed):
            continue
        try:
            rows = list(existing.view_rows())
        except CacheError:
            continue  # damaged: nothing in it is trusted
        for path, view, row, size, mtime in rows:
            found.setdefault((path, size, mtime, view), row)
    for path, view, row, size, mtime in parts.view_rows():
        found[(path, size, mtime, view)] = row
    return found


# --- the final cache file ---------------------------------------------------------------


def write_cache(
    target: Path,
    attrs: dict,
    entries: list[Entry],
    skipped: list[tuple[str, str, int, int, int, str]],
    feature_shape: tuple[int, ...],
    views: "dict[tuple[str, int, int], list[ViewRow]] | None" = None,
) -> None:
    """Write a complete cache file under a temporary name, then rename it into place.
    `views` (with the attribute `views` = V): the V view rows of every training image,
    keyed by (path, size, mtime), written as `train/views`.
    The attributes carry their checksum (`cache.attrs_checksum`) where the reader checks
    one. A write error (full disk, read-only directory) is one `CacheError`, raised after
    every HDF5 object is closed."""
    attrs = {**attrs, "attrs_checksum": attrs_checksum(attrs)}
    try:
        with atomic_path(target) as temporary:
            _write_file(temporary, attrs, entries, skipped, feature_shape, views)
            seal(temporary)  # the whole-file checksum header, checked before HDF5 reads
    except (OSError, RuntimeError) as error:  # HDF5 reports some write failures as RuntimeError
        failure = _write_failure(target.parent, error)
    else:
        return
    raise failure  # outside the except block: no chained traceback holding HDF5 objects


def _write_file(path: Path, attrs: dict, entries: list[Entry], skipped: list,
                feature_shape: tuple[int, ...], views=None) -> None:
    """The HDF5 file itself; every HDF5 object it opens is closed when it returns or
    raises."""
    readers = _RowReader()  # one for every split: parts and caches opened once
    # multi-label: the number of classes (labels are an (N, K) 0/1 matrix); else None
    classes = len(attrs["classes"]) if attrs.get("multilabel") else None
    try:
        with h5open(path, "w", userblock=header_size(attrs)) as handle:
            for key, value in attrs.items():
                handle.attrs[key] = attr_value(value)
            for split in SPLIT_NAMES:
                rows = [entry for entry in entries if entry.split == split]
                if rows:
                    _write_split(handle, split, rows, feature_shape, readers, classes)
                if rows and split == "train" and views:
                    _write_views(handle[split], rows, feature_shape, views, readers)
            group = handle.create_group("skipped")
            _strings(group, "paths", [s[0] for s in skipped])
            _strings(group, "reasons", [s[1] for s in skipped])
            _numbers(group, "sizes", [s[2] for s in skipped], np.int64)
            _numbers(group, "mtimes", [s[3] for s in skipped], np.int64)
            _write_labels(group, [s[4] for s in skipped], [s[6] for s in skipped],
                          [s[7] for s in skipped], classes)
            _strings(group, "splits", [s[5] for s in skipped])
            del group
    finally:
        readers.close()


def _write_split(handle, split: str, rows: list[Entry], feature_shape: tuple[int, ...],
                 readers: "_RowReader", classes: int | None = None) -> None:
    group = handle.create_group(split)
    n = len(rows)
    chunk_rows = max(1, min(n, (1 << 20) // max(1, 4 * int(np.prod(feature_shape)))))
    features = group.create_dataset(
        "features", shape=(n, *feature_shape), dtype=np.float32,
        chunks=(chunk_rows, *feature_shape), maxshape=(None, *feature_shape), fletcher32=True,
    )
    _write_labels(group, [r.label for r in rows], [r.targets for r in rows],
                  [r.ignored for r in rows], classes)
    _strings(group, "paths", [r.path for r in rows])
    _numbers(group, "sizes", [r.size for r in rows], np.int64)
    _numbers(group, "mtimes", [r.mtime for r in rows], np.int64)
    for start in range(0, n, ASSEMBLE_ROWS):
        block = rows[start:start + ASSEMBLE_ROWS]
        features[start:start + len(block)] = readers.read([r.row for r in block], feature_shape)
    del features, group  # no HDF5 object outlives the file, even in a traceback


def _write_views(group, rows: list[Entry], feature_shape: tuple[int, ...], views: dict,
                 readers: "_RowReader") -> None:
    """`train/views` (N, V, *feature_shape): the views of each training row, in its order."""
    n, count = len(rows), len(views[(rows[0].path, rows[0].size, rows[0].mtime)])
    per_image = count * max(1, 4 * int(np.prod(feature_shape)))
    dataset = group.create_dataset(
        "views", shape=(n, count, *feature_shape), dtype=np.float32,
        chunks=(max(1, min(n, (1 << 20) // per_image)), count, *feature_shape),
        fletcher32=True)
    block_rows = max(1, ASSEMBLE_ROWS // count)
    for start in range(0, n, block_rows):
        block = rows[start:start + block_rows]
        flat = [row for r in block for row in views[(r.path, r.size, r.mtime)]]
        dataset[start:start + len(block)] = readers.read_views(flat, feature_shape).reshape(
            len(block), count, *feature_shape)
    del dataset


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
                        self._h5[source] = h5open(source, "r")
                    out[positions] = self._h5[source][group]["features"][indices]
                except (OSError, KeyError, ValueError) as error:
                    raise read_error(source, error) from None
            else:
                if source not in self._parts:
                    if len(self._parts) > 8:
                        self._parts.clear()
                    with np.load(source, allow_pickle=False) as data:
                        self._parts[source] = data["features"]
                out[positions] = self._parts[source][indices]
        return out

    def read_views(self, rows: list[ViewRow], feature_shape: tuple[int, ...]) -> np.ndarray:
        """The features of view rows: from parts as rows, from caches as (image, view)."""
        out = np.empty((len(rows), *feature_shape), dtype=np.float32)
        by_source: dict[tuple[str, str], list[tuple[int, int, int]]] = {}
        for position, row in enumerate(rows):
            by_source.setdefault((row.source, row.group), []).append(
                (row.index, row.view, position))
        for (source, group), triples in by_source.items():
            if not group:
                out[[p for _, _, p in triples]] = self.read(
                    [Row(source, "", i) for i, _, _ in triples], feature_shape)
                continue
            images = sorted({i for i, _, _ in triples})
            try:
                if source not in self._h5:
                    self._h5[source] = h5open(source, "r")
                block = self._h5[source][group]["views"][images]
            except (OSError, KeyError, ValueError) as error:
                raise read_error(source, error) from None
            where = {image: k for k, image in enumerate(images)}
            for index, view, position in triples:
                out[position] = block[where[index], view]
        return out

    def close(self) -> None:
        for handle in self._h5.values():
            handle.close()
        self._h5.clear()
        self._parts.clear()


# --- helpers ----------------------------------------------------------------------------


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


def _write_labels(group, labels: list[int], targets: list[tuple[int, ...]],
                  ignored: list[tuple[int, ...]], classes: int | None) -> None:
    """`labels`: class indices (int32, N) of a single-label cache; for a multi-label one
    (`classes` = K) an (N, K) uint8 0/1 matrix, plus `ignore`, the same shape, 1 where a
    label is marked difficult, written only when some label is."""
    if classes is None:
        _numbers(group, "labels", labels, np.int32)
        return
    _numbers(group, "labels", _indicator(targets, classes), np.uint8)
    if any(ignored):
        _numbers(group, "ignore", _indicator(ignored, classes), np.uint8)


def _indicator(indices: list[tuple[int, ...]], classes: int) -> np.ndarray:
    """(N, K) uint8 with row i set to 1 at the class indices of `indices[i]`."""
    matrix = np.zeros((len(indices), classes), dtype=np.uint8)
    for row, columns in enumerate(indices):
        matrix[row, list(columns)] = 1
    return matrix


def _strings(group, name: str, values: list[str]) -> None:
    dtype = h5py_module().string_dtype("utf-8")
    data = np.array([os.fsencode(v) for v in values], dtype=object)
    group.create_dataset(name, shape=(len(values),), dtype=dtype, data=data if values else None)


