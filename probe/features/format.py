"""The feature cache's file format: the HDF5 layout, the seal (a header in HDF5's user block
with a sha256 of everything after it, checked before HDF5 reads a byte), the rules every
attribute, group and dataset must follow, and the one guard that turns what HDF5 or a damaged
header raise into a `CacheError`. `cache` reads files of this format; `store` writes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np

from ..data import SPLITS
from ..errors import CacheError, UnsealedCacheError
from ..files import display

FORMAT = "probe-feature-cache"
FORMAT_VERSION = 1
SPLIT_NAMES = SPLITS  # the groups of a cache file, in this order


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
    canonical = {key: plain_value(attr_value(value)) for key, value in attrs.items()
                 if key != "attrs_checksum"}
    text = json.dumps(canonical, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def header_size(attrs: dict) -> int:
    """Bytes to reserve for the header (HDF5 user block: a power of two, >= 512): room for
    the attributes as JSON, the counts and the digests."""
    need = len(json.dumps({key: plain_value(attr_value(value)) for key, value in attrs.items()},
                          ensure_ascii=True, default=str)) + 1024
    size = MIN_HEADER
    while size < need:
        size *= 2
    return size


def seal(path: Path) -> None:
    """Write the header into the user block reserved by `h5open(..., userblock=...)`,
    then fsync: the last step before a finished cache is renamed into place."""
    with h5open(path, "r") as handle:
        size = int(handle.userblock_size)
        attrs = {key: plain_value(value) for key, value in handle.attrs.items()}
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


def file_identity(stat: os.stat_result) -> tuple:
    """What changes when a file is replaced (inode) or written in place (size, times)."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def read_header(path: Path, check_body: bool) -> tuple[tuple, dict | None]:
    """The file's identity and its checked header (None for a cache written before
    headers existed); with `check_body`, every byte after it is checked against its
    digest too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = os.fstat(fd)
        first = os.pread(fd, 64, 0)
        if first.startswith(HDF5_SIGNATURE):
            return file_identity(stat), None
        if not first.startswith(SEAL_MAGIC):
            raise damaged(path, "it starts with neither a probe header nor an HDF5 signature")
        header = _parse_header(path, fd, first, stat.st_size)
        if header["file_size"] != stat.st_size:
            raise damaged(path, f"{stat.st_size} bytes, its header says {header['file_size']}")
        if check_body:
            digest = _body_digest(fd, header["size"], stat.st_size)
            if digest != header["body_sha256"]:
                raise damaged(path, "its contents do not match their checksum")
            if file_identity(os.fstat(fd)) != file_identity(stat):
                raise damaged(path, "it was written to while it was checked")
        return file_identity(stat), header
    finally:
        os.close(fd)


def _parse_header(path: Path, fd: int, first: bytes, file_size: int) -> dict:
    end = first.find(b"\n")
    digits = first[len(SEAL_MAGIC):end] if end > 0 else b""
    size = int(digits) if digits.isdigit() and len(digits) < 10 else 0
    if not MIN_HEADER <= size <= MAX_HEADER or size & (size - 1) or size >= file_size:
        raise damaged(path, "its header is damaged")
    block = os.pread(fd, size, 0)
    magic, digest, rest = block[:end + 1], block[end + 1:end + 66], block[end + 66:]
    if len(block) != size or hashlib.sha256(magic + rest).hexdigest().encode() + b"\n" != digest:
        raise damaged(path, "its header does not match its checksum")
    payload = json.loads(rest[:rest.index(b"\n")])
    if not (isinstance(payload, dict) and isinstance(payload.get("attrs"), dict)
            and isinstance(payload.get("counts"), dict) and _is_count(payload.get("file_size"))
            and isinstance(payload.get("body_sha256"), str)):
        raise damaged(path, "its header is damaged")
    check_attrs(path, payload["attrs"])
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


def check_layout(path: Path, handle, file_size: int) -> tuple[dict, dict[str, int]]:
    """The attributes and row counts, after checking every attribute, group and dataset
    against the format: names, dtypes, shapes (before anything is allocated: no size may
    exceed the file's), labels within the classes, skipped files in known splits."""
    h5py = h5py_module()
    attrs = {key: plain_value(value) for key, value in handle.attrs.items()}
    check_attrs(path, attrs)
    names = set(handle.keys())
    unknown = names - {*SPLIT_NAMES, "skipped"}
    splits = [split for split in SPLIT_NAMES if split in names]
    if unknown or not splits:
        raise damaged(path, f"it holds the groups {sorted(names)}; expected some of "
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
            raise damaged(path, f"'{name}' does not hold the datasets {sorted(spec)}")
        rows = {key: _check_dataset(path, group[key], f"{name}/{key}", kind,
                                    _dataset_tail(attrs, key, multilabel), file_size)
                for key, kind in spec.items()}
        if len(set(rows.values())) != 1 or (name != "skipped" and not rows["labels"]):
            raise damaged(path, f"the datasets of '{name}' have {rows} rows")
        _check_labels(path, group, name, n_classes, multilabel)
        if name == "skipped":
            if not set(read_strings(group["splits"])) <= set(SPLIT_NAMES):
                raise damaged(path, "'skipped/splits' holds an unknown split name")
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
                raise damaged(path, f"'{name}/{key}' holds values other than 0 and 1")
    elif labels.min() < 0 or labels.max() >= n_classes:
        raise damaged(path, f"'{name}/labels' holds class indices outside 0..{n_classes - 1}")
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
    h5py = h5py_module()
    if not isinstance(dataset, h5py.Dataset):
        raise damaged(path, f"'{name}' is not a dataset")
    if kind is str:
        info = h5py.check_string_dtype(dataset.dtype)
        ok, itemsize = info is not None and info.encoding == "utf-8" and info.length is None, 16
    else:
        ok, itemsize = dataset.dtype == np.dtype(kind), np.dtype(kind).itemsize
    if not ok:
        raise damaged(path, f"'{name}' has dtype {dataset.dtype}; expected {kind}")
    shape = dataset.shape
    if shape is None or len(shape) != 1 + len(tail) or tuple(shape[1:]) != tail:
        raise damaged(path, f"'{name}' has shape {shape}; expected (N, {', '.join(map(str, tail))})")
    if shape[0] * int(np.prod(tail, dtype=np.int64)) * itemsize > file_size:
        raise damaged(path, f"'{name}' claims {shape[0]} rows, more than the file holds")
    if dataset.chunks and shape[0]:  # every row was written: a lost chunk would read as zeros
        stored: list[tuple] = []
        dataset.id.chunk_iter(lambda info: stored.append(tuple(info.chunk_offset)))
        grid = itertools.product(*(range(0, size, chunk)
                                   for size, chunk in zip(shape, dataset.chunks)))
        if sorted(stored) != sorted(grid):
            raise damaged(path, f"'{name}' has lost some of its stored rows")
    return int(shape[0])


def check_features(path: Path, dataset, split: str, key: str = "features") -> np.ndarray:
    """All features of a split, read in blocks that bound memory; NaN or infinity is
    damage (a backbone never produces it)."""
    rows = max(1, VERIFY_BYTES // max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))))
    out = dataset[()] if dataset.shape[0] <= rows else np.empty(dataset.shape, np.float32)
    for start in range(0, dataset.shape[0], rows):
        if dataset.shape[0] > rows:
            out[start:start + rows] = dataset[start:start + rows]
        if not np.isfinite(out[start:start + rows]).all():
            raise damaged(path, f"'{split}/{key}' holds NaN or infinite values")
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
    "pooling": (True, lambda v: v in ("avg", "max", "none", "cls", "mean", "cls+mean"),
                "avg, max, none, cls, mean or cls+mean"),
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
    "backbone_source": (False, _is_text, "the path of a .keras model file"),
    "backbone_sha256": (False, _is_hex, "a sha256"),
    "hub_source": (False, _is_text, "a KerasHub preset (hub:NAME or its directory)"),
    "hub_sha256": (False, _is_hex, "a sha256"),
    "blocks": (False, lambda v: _is_int(v) and 1 <= v <= 64, "a count of blocks, 1 to 64"),
    "layers": (False, lambda v: isinstance(v, list) and len(v) >= 1 and all(
        _is_text(n) for n in v), "a list of layer names"),
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


def check_attrs(path: Path, attrs: dict) -> None:
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
            raise damaged(path, f"attribute {key} is {shown}; expected {promise}")
    if "attrs_checksum" in attrs and attrs["attrs_checksum"] != attrs_checksum(attrs):
        raise damaged(path, "its attributes do not match their checksum")


@contextlib.contextmanager
def guard(path: Path):
    """Whatever HDF5, h5py or a damaged header raise while a cache is read becomes one
    `CacheError` naming the file and the fix, never a traceback."""
    try:
        yield
    except CacheError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError,
            IndexError, OverflowError, MemoryError) as error:
        raise read_error(path, error) from None


def damaged(path, detail: str) -> CacheError:
    return read_error(path, detail)


# --- helpers ------------------------------------------------------------------------


def h5py_module():
    import h5py

    return h5py


def h5open(path, mode: str, userblock: int = 0):
    """h5py.File with HDF5's own file locking used where the file system has it. probe
    never writes a finished cache in place (it renames a new file over it), so a reader does
    not need the lock, and a file system without locks only loses that safety net.
    A new file reserves `userblock` bytes for the header (`seal`) and uses the HDF5 1.10
    format, whose object headers carry checksums (measured: with the 1.8 format a flipped
    byte in a datatype message reads features back as float64 or big-endian without error)."""
    if mode == "r":
        return h5py_module().File(path, mode, locking="best-effort")
    return h5py_module().File(path, mode, locking="best-effort", libver=("v110", "latest"),
                        userblock_size=userblock or None)


def _is_lock_error(error) -> bool:
    text = str(error).lower()
    return any(phrase in text for phrase in
               ("unable to lock file", "file locking", "no locks available"))


def read_error(path, error: BaseException | str) -> CacheError:
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


def read_strings(dataset) -> list[str]:
    return [os.fsdecode(value) for value in dataset[()]] if dataset.shape[0] else []



def attr_value(value):
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


def plain_value(value):
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
