"""Finding the samples of a dataset, splitting them, and decoding images.

A dataset is class folders (`DIR/CLASS/*`), optionally under split folders
(`DIR/train/`, `DIR/validation/` or `DIR/val/`, `DIR/test/`), or a labels file: a CSV
`path,label[,split]` or a whitespace list `name label` with labels 1/-1 (Pascal VOC's
per-class lists). Decoding never raises: a file that can not be read becomes a recorded skip.
"""

from __future__ import annotations

import csv
from collections import Counter
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
LIST_LABELS = {"1": True, "-1": False, "0": None}  # VOC: 0 marks a "difficult" object


@dataclass(frozen=True)
class Sample:
    """One image: its path relative to the dataset root, class index and split."""

    path: str
    label: int
    split: str


@dataclass
class Dataset:
    """The samples of a dataset, with class names sorted and what was left out."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    ignored: int = 0  # non-image files and unreadable directory entries
    splits_given: bool = False  # by split folders or a split column, not by fractions

    def split(self, name: str) -> list[Sample]:
        """The samples of one split, in a stable order."""
        return [sample for sample in self.samples if sample.split == name]

    def counts(self) -> dict[str, int]:
        """Number of samples per split."""
        return {name: len(self.split(name)) for name in SPLITS if self.split(name)}


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def discover(
    root: str | os.PathLike,
    labels_file: str | os.PathLike | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Dataset:
    """Find every sample of the dataset at `root`, with a label and a split.

    Without split folders (or a split column), the split is seeded and stratified: the same
    seed always gives the same split, and adding images leaves existing ones where they were.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DatasetError(
            f"expected a dataset directory; it does not exist. Received: path='{root}'"
        )
    if not root_path.is_dir():
        raise DatasetError(
            f"expected a dataset directory of class folders. Received: path='{root}' (a file)"
        )
    root_path = root_path.resolve()
    _check_fractions(val_fraction, test_fraction)
    if labels_file is not None:
        entries, ignored = _read_labels_file(root_path, Path(labels_file).expanduser())
    else:
        entries, ignored = _walk_class_folders(root_path)
    if not entries:
        loose = sum(1 for entry in _list_dir(root_path) if entry.is_file() and is_image_name(entry.name))
        found = (f"found {loose} images directly in it; move them into one subfolder per class"
                 if loose else f"found no images ({ignored} other files ignored)")
        raise DatasetError(
            f"expected images in class folders (DIR/CLASS/*.jpg) or split folders "
            f"(DIR/train/CLASS/*.jpg); {found}. Received: path='{root}'"
        )
    counts = Counter(path for path, _, _ in entries)
    repeated = [path for path, n in counts.items() if n > 1]
    if repeated:
        raise DatasetError(
            f"expected each image once; {len(repeated)} are listed more than once (e.g. "
            f"'{repeated[0]}', {counts[repeated[0]]} times), which would put one image under "
            f"two labels or in two splits. Remove the repeated rows from '{labels_file}'."
        )
    classes = sorted({label for _, label, _ in entries})
    if len(classes) < 2:
        raise DatasetError(
            f"needs images of at least 2 classes; got only one class: '{classes[0]}'. "
            f"Put each class in its own folder. Received: path='{root}'"
        )
    index = {name: i for i, name in enumerate(classes)}
    given = [split for _, _, split in entries if split is not None]
    if given and len(given) != len(entries):
        raise DatasetError(
            "expected either every image or none to have a split; some have one and "
            f"{len(entries) - len(given)} do not. Received: path='{root}'"
        )
    splits_given = bool(given)
    if splits_given:
        splits = [split for _, _, split in entries]
    else:
        splits = _stratified_split(entries, val_fraction, test_fraction, seed)
    samples = [
        Sample(path, index[label], split) for (path, label, _), split in zip(entries, splits)
    ]
    samples.sort(key=lambda s: (SPLITS.index(s.split), s.path))
    if not any(s.split == "train" for s in samples):
        raise DatasetError(
            f"expected a train split with images; found none. Received: splits="
            f"{sorted({s.split for s in samples})}"
        )
    return Dataset(root_path, classes, samples, ignored, splits_given=splits_given)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError(
            "expected validation and test fractions in [0, 1) that leave images for training. "
            f"Received: val_fraction={val_fraction}, test_fraction={test_fraction}"
        )


def _walk_class_folders(root: Path) -> tuple[list[tuple[str, str, str | None]], int]:
    """(relative path, class name, split or None) for every image under root."""
    top = _list_dir(root)
    split_dirs = {
        entry.name: SPLIT_FOLDERS[entry.name.lower()]
        for entry in top
        if entry.is_dir() and entry.name.lower() in SPLIT_FOLDERS
    }
    entries: list[tuple[str, str, str | None]] = []
    ignored = 0
    if split_dirs:
        for entry in top:
            if entry.name not in split_dirs:
                ignored += 1 if not entry.name.startswith(".") else 0
        bases = [(root / name, split) for name, split in sorted(split_dirs.items())]
    else:
        bases = [(root, None)]
    for base, split in bases:
        for class_dir in _list_dir(base):
            if class_dir.name.startswith("."):
                continue
            if not class_dir.is_dir():
                ignored += 1
                continue
            images, skipped = find_images(Path(class_dir.path))
            ignored += skipped
            for path in images:
                entries.append((path.relative_to(root).as_posix(), class_dir.name, split))
    return entries, ignored


def _list_dir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as iterator:
            return sorted(iterator, key=lambda entry: entry.name)
    except OSError as error:
        raise DatasetError(
            f"expected a readable directory; {error.strerror}. Received: path='{path}'"
        ) from None


def find_images(directory: Path) -> tuple[list[Path], int]:
    """Image files below a class folder (recursively), and how many files were ignored.
    Symlinked directories are followed once: a symlink loop can not recurse forever."""
    images: list[Path] = []
    ignored = 0
    seen: set[tuple[int, int]] = set()
    for current, dirs, files in os.walk(directory, followlinks=True, onerror=lambda e: None):
        try:
            stat = os.stat(current)
        except OSError:
            dirs[:] = []
            continue
        key = (stat.st_dev, stat.st_ino)
        if key in seen:
            dirs[:] = []
            continue
        seen.add(key)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if is_image_name(name):
                images.append(Path(current) / name)
            elif not name.startswith("."):
                ignored += 1
    return images, ignored


def _read_labels_file(root: Path, labels_file: Path) -> tuple[list[tuple[str, str, str | None]], int]:
    if not labels_file.is_file():
        raise DatasetError(
            f"expected a labels file (CSV path,label[,split] or a 'name label' list); "
            f"it does not exist. Received: labels='{labels_file}'"
        )
    text = labels_file.read_text(encoding="utf-8-sig")
    first = text.lstrip().split("\n", 1)[0]
    if labels_file.suffix.lower() == ".csv" or "," in first:
        return _read_csv(root, labels_file, text)
    return _read_list(root, labels_file, text)


def _read_csv(root: Path, labels_file: Path, text: str):
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    known = {"path", "label", "split"}
    if "path" not in columns or "label" not in columns or set(columns) - known:
        raise DatasetError(
            "expected a CSV header with the columns path,label and optionally split. "
            f"Received: columns={columns} in '{labels_file}'"
        )
    entries = []
    missing = []
    for row in reader:
        row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
        if not row.get("path"):
            continue
        split = row.get("split") or None
        if split is not None:
            if split.lower() not in SPLIT_FOLDERS:
                raise DatasetError(
                    f"expected split to be one of train, val, validation, test. "
                    f"Received: split='{split}' for '{row['path']}' in '{labels_file}'"
                )
            split = SPLIT_FOLDERS[split.lower()]
        path = _resolve_listed(root, row["path"])
        if path is None:
            missing.append(row["path"])
            continue
        entries.append((path, row["label"], split))
    _raise_missing(missing, root, labels_file)
    return entries, 0


def _read_list(root: Path, labels_file: Path, text: str):
    positive = labels_file.stem.split("_")[0] or "positive"
    negative = f"not_{positive}"
    entries = []
    missing = []
    ignored = 0
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in LIST_LABELS:
            raise DatasetError(
                f"expected lines 'name label' with label 1, -1 or 0 (difficult, ignored). "
                f"Received: line {number} '{line.strip()}' in '{labels_file}'"
            )
        flag = LIST_LABELS[parts[1]]
        if flag is None:
            ignored += 1
            continue
        path = _resolve_listed(root, parts[0])
        if path is None:
            missing.append(parts[0])
            continue
        entries.append((path, positive if flag else negative, None))
    _raise_missing(missing, root, labels_file)
    return entries, ignored


def _resolve_listed(root: Path, name: str) -> str | None:
    """The relative path of a listed image; list files may leave out the extension and
    the JPEGImages folder, as Pascal VOC's do."""
    candidates = [name] + [name + ext for ext in (".jpg", ".jpeg", ".png")]
    candidates += ["JPEGImages/" + c for c in candidates]
    for candidate in candidates:
        if (root / candidate).is_file():
            return Path(candidate).as_posix()
    return None


def _raise_missing(missing: list[str], root: Path, labels_file: Path) -> None:
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:3])
        raise DatasetError(
            f"expected every file named in '{labels_file}' to exist under '{root}'; "
            f"{len(missing)} do not, e.g. {shown}. Fix the paths (relative to the dataset "
            f"directory) or remove those rows."
        )


def _stratified_split(entries, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Per class, order images by a seeded hash of their path and cut the order into
    test, validation and train. The hash makes the split independent of listing order and
    stable when images are added."""
    by_class: dict[str, list[int]] = {}
    for i, (_, label, _) in enumerate(entries):
        by_class.setdefault(label, []).append(i)
    splits = ["train"] * len(entries)
    for indices in by_class.values():
        indices.sort(key=lambda i: hashlib.sha1(
            f"{seed}:{entries[i][0]}".encode("utf-8", "surrogateescape")).digest())
        n = len(indices)
        n_test = _split_count(n, test_fraction)
        n_val = _split_count(n - n_test, val_fraction / (1 - test_fraction))
        for position, i in enumerate(indices):
            if position < n_test:
                splits[i] = "test"
            elif position < n_test + n_val:
                splits[i] = "val"
    return splits


def _split_count(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 3:
        return 0
    return min(max(1, round(n * fraction)), n - 1)


# --- decoding -------------------------------------------------------------------------


class BadImage(Exception):
    """Raised inside decoding; its message becomes the recorded reason for a skip."""


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode an image file to RGB uint8 pixels of shape (size, size, 3).

    A JPEG at least twice the target size is decoded at reduced scale (Pillow's `draft`)
    before the resize. EXIF orientation is applied; every Pillow mode (L, P, RGBA, CMYK,
    I;16, ...) becomes RGB, with transparency composited onto white; animated files give
    their first frame.
    Raises `BadImage` with a readable reason for anything that can not be decoded.
    """
    from PIL import Image, ImageOps

    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format == "JPEG":
                    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the target
                    # size: much faster for large photos, nearly the same pixels.
                    image.draft(image.mode, (size, size))
                image.load()
                image = ImageOps.exif_transpose(image)
                image = to_rgb(image)
                if image.size != (size, size):
                    image = image.resize((size, size), Image.Resampling.BILINEAR)
                return np.asarray(image, dtype=np.uint8)
    except BadImage:
        raise
    except Image.DecompressionBombError as error:
        raise BadImage(f"over Pillow's decompression bomb limit: {error}") from None
    except Image.DecompressionBombWarning as error:
        raise BadImage(f"over Pillow's decompression bomb limit: {error}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image Pillow can identify") from None
    except PermissionError:
        raise BadImage("permission denied") from None
    except (OSError, ValueError, SyntaxError, MemoryError, IndexError, TypeError) as error:
        raise BadImage(f"could not decode: {error}") from None


def to_rgb(image):
    """Convert any Pillow image to RGB: 16-bit and float modes are scaled, alpha is
    composited onto white (what a viewer shows), CMYK and palettes converted."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
            pixels = pixels / 257.0
        gray = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
