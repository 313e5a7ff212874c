"""Files, in one place: atomic writes, JSON values, checksums and paths for messages.

Every file probe writes goes through `atomic_path` / `atomic_write`: written under a
temporary name next to its target, flushed to disk, then renamed over it, so a reader (or a
kill at any instant) sees the old file or the new one, never half of one. This module is the
ground floor: it imports nothing of probe's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

TEMP_PREFIX = "."  # a file being written is ".<name>.tmp-<pid>": never listed, never read


# --- atomic writes ----------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "", durable: bool = True) -> Iterator[Path]:
    """A temporary path next to `target` to write the whole file to (by any library);
    on success it is flushed to disk (unless `durable` is False: files that can simply be
    written again) and renamed over `target`; on failure it is deleted. `suffix` keeps an
    extension a writer insists on (Keras: ".keras")."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{TEMP_PREFIX}{target.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield temporary
        if durable and temporary.is_file():
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, target)
        if durable:
            fsync_directory(target.parent)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike, mode: str = "wb", encoding: str | None = None,
                 newline: str | None = None, errors: str | None = None) -> Iterator[IO]:
    """`open(target, mode)` that replaces `target` only once everything is written."""
    with atomic_path(target) as temporary:
        with open(temporary, mode, encoding=encoding, newline=newline, errors=errors) as handle:
            yield handle


def json_default(value: Any) -> Any:
    """The `default` of `json.dumps` for every JSON file probe writes: NumPy scalars and
    arrays, tuples and paths become plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def replace_directory(temporary: str | os.PathLike, target: str | os.PathLike) -> None:
    """Give a fully written directory its final name (over an empty one), durably."""
    os.replace(temporary, target)
    fsync_directory(Path(target).parent)


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Replace `target` with `text` (UTF-8) atomically."""
    with atomic_write(target, "w", encoding="utf-8", errors="surrogateescape") as handle:
        handle.write(text)
    return Path(target)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's content, read a chunk at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def display(path) -> str:
    """A path for messages: bytes that are not UTF-8 are shown escaped (\\xff) instead of
    failing to print."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def fsync_directory(directory: Path) -> None:
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
