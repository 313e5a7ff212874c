"""Finding the samples of a dataset, splitting them, and decoding images.

A dataset is class folders (`DIR/CLASS/*`), optionally under split folders
(`DIR/train/`, `DIR/validation/` or `DIR/val/`, `DIR/test/`), or labels files: a CSV
`path,label[,split]` or a whitespace list `name label` with labels 1/-1/0 (Pascal VOC's
per-class lists), one for the whole dataset or one per split (train, val, test, trainval).
Multi-label datasets (several classes per image) are a CSV `path,labels[,split]` whose
`labels` cell holds `;`-separated class names (empty: none), or a Pascal VOC
`ImageSets/Main` directory whose `<class>_<split>.txt` lists give each image the classes
where it is 1, with 0 ("difficult") kept as a per-class ignore mark.
Split roles: train fits, val selects, test reports. Without any split, a seeded stratified
split by fractions; with splits but no val, val is carved from train (or trainval).
Decoding never raises anything but `BadImage`: a file that can not be read or oriented
becomes a recorded skip.
"""

from __future__ import annotations

import csv
from collections import Counter
import errno
import hashlib
import io
import json
import os
import stat as stat_mod
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence, Union

import numpy as np

from .errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
# Names a labels source may be given for; trainval is train from which val is carved.
SOURCE_SPLITS = {**SPLIT_FOLDERS, "trainval": "trainval"}
LIST_LABELS = {"1": True, "-1": False, "0": None}  # VOC: 0 marks a "difficult" object
VOC_SPLITS = ("train", "val", "trainval", "test")  # the <class>_<split>.txt lists read
LABELS_SEPARATOR = ";"  # between the class names of a CSV `labels` cell
PATH_MAX = 4096  # Linux: longer paths can not be opened by name
# Every character Python's str.splitlines breaks a line at. A name holding one can not be
# written one per line: a CSV reader joins the pieces of a quoted one (`b/x<LF>y.png`
# was read as `b/xy.png`), and a list reader splits it into two lines.
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")

LabelsArg = Union[str, os.PathLike, Mapping[str, Union[str, os.PathLike]],
                  Sequence[tuple[str, Union[str, os.PathLike]]], None]


@dataclass(frozen=True)
class Sample:
    """One image: its path relative to the dataset root, class index and split.

    In a multi-label dataset `label` is -1 and `targets` holds the indices of the classes
    present (possibly none), `ignored` those marked difficult (VOC 0: neither present nor
    absent, left out of that class's metrics)."""

    path: str
    label: int
    split: str
    targets: tuple[int, ...] = ()
    ignored: tuple[int, ...] = ()

    def describe(self, classes: Sequence[str], multilabel: bool = False) -> str:
        """The labels as one string (for change records): the class name, or for a
        multi-label sample the `;`-joined present classes and the difficult ones."""
        if not multilabel:
            return classes[self.label]
        return labels_text(classes, self.targets, self.ignored)


def labels_text(classes: Sequence[str], targets: Sequence[int], ignored: Sequence[int]) -> str:
    """`a;b` for the classes present, `a;b|difficult:c` when some are marked difficult:
    one string that changes whenever a multi-label image's labels change."""
    text = LABELS_SEPARATOR.join(classes[i] for i in sorted(targets))
    if len(ignored):
        text += "|difficult:" + LABELS_SEPARATOR.join(classes[i] for i in sorted(ignored))
    return text


@dataclass
class Dataset:
    """The samples of a dataset, with class names sorted and what was left out."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    ignored: int = 0  # non-image files
    splits_given: bool = False  # by split folders, a split column or per-split labels files
    difficult: int = 0  # VOC list lines marked 0 ("difficult"): left out, or ignore marks
    val_carved: bool = False  # val was carved from train (or trainval) by val_fraction
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    links_skipped: list[str] = field(default_factory=list)  # links back into the tree
    missing_classes: dict[str, list[str]] = field(default_factory=dict)  # split -> absent
    label_sources: tuple[tuple[str, str], ...] = ()  # ((split or "", absolute path), ...)
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    multilabel: bool = False  # samples carry `targets` (and `ignored`) instead of `label`

    def split(self, name: str) -> list[Sample]:
        """The samples of one split, in a stable order."""
        return [sample for sample in self.samples if sample.split == name]

    def counts(self) -> dict[str, int]:
        """Number of samples per split."""
        return {name: len(self.split(name)) for name in SPLITS if self.split(name)}

    def split_identity(self) -> dict:
        """Exactly the values that decide which image lands in which split: the labels
        files, plus seed and fractions only where they were used (fractions splitting
        an unsplit dataset, or val carved from train). A cache key built from it changes
        only when the split can change."""
        identity: dict = {"labels_file": describe_labels(self.label_sources)}
        if not self.splits_given:
            identity.update(seed=self.seed, val_fraction=self.val_fraction,
                            test_fraction=self.test_fraction)
        elif self.val_carved:
            identity.update(seed=self.seed, val_fraction=self.val_fraction)
        return identity

    def notes(self) -> list[str]:
        """Sentences about what discovery left out or noticed, for the user."""
        notes = []
        if self.difficult and self.multilabel:
            notes.append(f"Kept {self.difficult} labels marked difficult (0) in the labels "
                         "lists as ignored: left out of that class's metrics")
        elif self.difficult:
            notes.append(f"Left out {self.difficult} images marked difficult (0) in the labels lists")
        if self.unreadable:
            path, reason = self.unreadable[0]
            notes.append(f"Could not read {len(self.unreadable)} files or folders, e.g. "
                         f"'{_shown(path)}': {reason}")
        if self.links_skipped:
            notes.append(f"Did not follow {len(self.links_skipped)} symbolic links that lead "
                         f"back into the dataset, e.g. '{_shown(self.links_skipped[0])}'")
        for split, absent in self.missing_classes.items():
            notes.append(f"The {split} split has no {'positive ' if self.multilabel else ''}images of {len(absent)} classes: "
                         + ", ".join(f"'{c}'" for c in absent[:5]))
        if self.val_carved:
            notes.append(f"No validation split given: carved {len(self.split('val'))} images "
                         f"from train (--val-fraction {self.val_fraction}, --seed {self.seed})")
        return notes


def _shown(path: str) -> str:
    """A file name fit for a message: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class _Entry(NamedTuple):
    path: str  # relative to the dataset root, as it will be recorded
    label: str  # the class name ("" in a multi-label dataset)
    split: str | None
    identity: str  # the file itself (real path), to find one file under two names
    given: str  # as the user wrote it (labels files) or found it
    targets: tuple[str, ...] | None = None  # multi-label: the classes present
    ignored: tuple[str, ...] = ()  # multi-label: the classes marked difficult


def discover(
    root: str | os.PathLike,
    labels: LabelsArg = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Dataset:
    """Find every sample of the dataset at `root`, with a label and a split.

    `labels` is None (class folders), one labels file, a mapping {split: file} with
    splits train / val / test / trainval, or a Pascal VOC `ImageSets/Main` directory
    (multi-label). Without any split given, the split is seeded and stratified by
    `val_fraction` and `test_fraction` (multi-label: on each image's rarest class); with
    splits but no val, val is carved from train (or trainval) by `val_fraction` (0 opts
    out). The same seed always gives the same split; adding images to a class moves at
    most a few images of that class.
    """
    root_path = _check_root(root)
    _check_fractions(val_fraction, test_fraction)
    sources = label_sources(labels)
    declared: list[str] = []  # classes named by VOC lists, with or without positives
    if sources:
        entries, ignored, difficult, declared = _read_label_sources(root_path, sources)
        unreadable: list[tuple[str, str]] = []
        links: list[str] = []
    else:
        walk = _walk_class_folders(root_path)
        entries, ignored, difficult = walk.entries, walk.ignored, 0
        unreadable, links = walk.unreadable, walk.links_skipped
        if not entries:
            _raise_no_images(root, root_path, ignored, unreadable)
    _check_once(entries, sources)
    multilabel = _is_multilabel(entries, sources)
    classes = _classes(entries, declared, multilabel, root, sources)
    splits, splits_given, carved = _assign_splits(entries, val_fraction, test_fraction, seed,
                                                  root, _strata(entries, multilabel))
    samples = _samples(entries, splits, classes)
    samples.sort(key=lambda s: (SPLITS.index(s.split), s.path))
    if not any(s.split == "train" for s in samples):
        raise DatasetError(
            f"expected a train split with images; found none. Received: splits="
            f"{sorted({s.split for s in samples})}"
        )
    if multilabel:
        missing = _check_multilabel_classes(samples, classes)
    else:
        missing = _check_class_sets(samples, classes) if splits_given else {}
    return Dataset(root_path, classes, samples, ignored, splits_given, difficult, carved,
                   unreadable, links, missing, tuple((s, str(p)) for s, p in sources),
                   seed, val_fraction, test_fraction, multilabel=multilabel)


def _is_multilabel(entries: list[_Entry], sources) -> bool:
    """Whether the labels are multi-label; every labels file must agree."""
    kinds = {entry.targets is not None for entry in entries}
    if len(kinds) > 1:
        raise DatasetError(
            "expected every labels file to be single-label (a CSV `label` column or a "
            "'name label' list) or every one multi-label (a CSV `labels` column or a VOC "
            "ImageSets/Main directory); got both. Received: "
            + ", ".join(f"'{p}'" for _, p in sources) + ". Write them all in one form."
        )
    return kinds == {True}


def _classes(entries: list[_Entry], declared: list[str], multilabel: bool, root,
             sources) -> list[str]:
    """The sorted class names: single-label at least 2, multi-label at least 1."""
    if multilabel:
        names = set(declared)
        for entry in entries:
            names.update(entry.targets or ())
            names.update(entry.ignored)
        if not names:
            raise DatasetError(
                "expected class names in the labels column; every row's labels cell is "
                "empty. Received: " + ", ".join(f"'{p}'" for _, p in sources)
                + ". Write the classes of each image as e.g. dog;person."
            )
        return sorted(names)
    classes = sorted({entry.label for entry in entries})
    if len(classes) < 2:
        raise DatasetError(
            f"needs images of at least 2 classes; got only one class: '{_shown(classes[0])}'. "
            f"Put each class in its own folder. Received: path='{root}'"
        )
    return classes


def _samples(entries: list[_Entry], splits: list[str], classes: list[str]) -> list[Sample]:
    index = {name: i for i, name in enumerate(classes)}
    return [Sample(e.path, index[e.label], split) if e.targets is None else
            Sample(e.path, -1, split, tuple(sorted(index[t] for t in e.targets)),
                   tuple(sorted(index[t] for t in e.ignored)))
            for e, split in zip(entries, splits)]


def _check_root(root) -> Path:
    if not str(root).strip():
        raise DatasetError(
            "expected a dataset directory; received an empty path. Name the directory, "
            "e.g. `probe extract cats_vs_dogs/` (or `.` for the current one)."
        )
    root_path = Path(root).expanduser()
    if not root_path.exists():
        # a link loop or a dangling link also "does not exist": say which
        what = ("it is a symbolic link that leads nowhere (a loop, or to a missing place)"
                if os.path.islink(root_path) else "it does not exist")
        raise DatasetError(
            f"expected a dataset directory; {what}. Received: path='{root}'"
        )
    if not root_path.is_dir():
        raise DatasetError(
            f"expected a dataset directory of class folders. Received: path='{root}' (a file)"
        )
    return root_path.resolve()


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError(
            "expected validation and test fractions in [0, 1) that leave images for training. "
            f"Received: val_fraction={val_fraction}, test_fraction={test_fraction}"
        )


def _raise_no_images(root, root_path: Path, ignored: int, unreadable) -> None:
    loose = sum(1 for entry in _list_dir(root_path)
                if _is_kind(entry, "file") and is_image_name(entry.name))
    if loose:
        found = f"found {loose} images directly in it; move them into one subfolder per class"
    else:
        found = f"found no images ({ignored} other files ignored"
        found += f", {len(unreadable)} unreadable)" if unreadable else ")"
    raise DatasetError(
        f"expected images in class folders (DIR/CLASS/*.jpg) or split folders "
        f"(DIR/train/CLASS/*.jpg); {found}. Received: path='{root}'"
    )


def _check_once(entries: list[_Entry], sources) -> None:
    """One file, one label, one split: a file reached under two names (`x`, `d/../x`, an
    absolute path, a link) would leak between splits or carry two labels."""
    counts = Counter(entry.identity for entry in entries)
    repeated = [identity for identity, n in counts.items() if n > 1]
    if not repeated:
        return
    names = [e.given for e in entries if e.identity == repeated[0]]
    where = (" Remove the repeated rows from " + ", ".join(f"'{p}'" for _, p in sources)
             if sources else " Remove the extra links or copies.")
    raise DatasetError(
        f"expected each image once; {len(repeated)} are listed more than once (e.g. "
        f"'{_shown(names[0])}', {len(names)} times, as "
        + ", ".join(f"'{_shown(n)}'" for n in names[:3])
        + "), which would put one image under two labels or in two splits." + where
    )


# --- splits ---------------------------------------------------------------------------


def _assign_splits(entries: list[_Entry], val_fraction: float, test_fraction: float,
                   seed: int, root, strata: list[str]) -> tuple[list[str], bool, bool]:
    """(split per entry, whether splits were given, whether val was carved from train).
    `strata` is each entry's stratum (its class; see `_strata`)."""
    given = [entry.split for entry in entries if entry.split is not None]
    if given and len(given) != len(entries):
        raise DatasetError(
            "expected either every image or none to have a split; some have one and "
            f"{len(entries) - len(given)} do not. Received: path='{root}'"
        )
    if not given:
        return _stratified_split(entries, val_fraction, test_fraction, seed, strata), False, False
    splits = [entry.split for entry in entries]
    has_val = "val" in splits
    pool = "trainval" if "trainval" in splits else "train"
    if has_val or val_fraction == 0:
        return ["train" if s == "trainval" else s for s in splits], True, False
    positions = [i for i, s in enumerate(splits) if s == pool]
    carved = _stratified_split([entries[i] for i in positions], val_fraction, 0.0, seed,
                               [strata[i] for i in positions])
    for i, split in zip(positions, carved):
        splits[i] = split
    splits = ["train" if s == "trainval" else s for s in splits]
    return splits, True, "val" in carved


def _check_class_sets(samples: list[Sample], classes: list[str]) -> dict[str, list[str]]:
    """A class with val or test images but none in train can not be learnt: an error.
    A class absent from val or test is allowed (a subset) and returned, to be noted."""
    present = {split: {s.label for s in samples if s.split == split} for split in SPLITS}
    missing: dict[str, list[str]] = {}
    for split in ("val", "test"):
        if not present[split]:
            continue
        unknown = sorted(classes[i] for i in present[split] - present["train"])
        if unknown:
            raise DatasetError(
                f"expected every class of the {split} split to have train images; "
                f"{len(unknown)} have none in train: " + ", ".join(f"'{_shown(c)}'" for c in unknown[:5])
                + f". Add train images of them, or remove them from {split}."
            )
        absent = sorted(classes[i] for i in present["train"] - present[split])
        if absent:
            missing[split] = absent
    return missing


def _strata(entries: list[_Entry], multilabel: bool) -> list[str]:
    """What the split is stratified on: the class of a single-label image; for a
    multi-label image its rarest class (fewest images in the whole dataset, then by name),
    so rare classes reach val and test too; images without any class form one stratum."""
    if not multilabel:
        return [entry.label for entry in entries]
    counts = Counter(name for entry in entries for name in entry.targets or ())
    return [min(entry.targets, key=lambda name: (counts[name], name)) if entry.targets
            else "" for entry in entries]


def _stratified_split(entries, val_fraction: float, test_fraction: float, seed: int,
                      strata: list[str]) -> list[str]:
    """Per stratum (class), order images by a seeded hash of their path and cut the order
    into test, validation and train. The hash makes the split independent of listing
    order; adding an image to a class shifts the cuts of that class by at most one place
    each, so a few of its images may change split and other classes never do."""
    by_class: dict[str, list[int]] = {}
    for i, stratum in enumerate(strata):
        by_class.setdefault(stratum, []).append(i)
    splits = ["train"] * len(entries)
    for indices in by_class.values():
        indices.sort(key=lambda i: hashlib.sha1(
            f"{seed}:{entries[i].path}".encode("utf-8", "surrogateescape")).digest())
        n = len(indices)
        n_test = _split_count(n, test_fraction)
        n_val = _split_count(n - n_test, val_fraction / (1 - test_fraction))
        for position, i in enumerate(indices):
            if position < n_test:
                splits[i] = "test"
            elif position < n_test + n_val:
                splits[i] = "val"
    return splits


def _check_multilabel_classes(samples: list[Sample], classes: list[str]) -> dict[str, list[str]]:
    """Every class needs train images with it and without it (a one-vs-rest model learns
    from both): an error otherwise. Classes without a positive image in val or test are
    returned, to be noted."""
    train = [s for s in samples if s.split == "train"]
    positives = Counter(i for s in train for i in s.targets)
    negatives = Counter(i for s in train for i in range(len(classes))
                        if i not in s.targets and i not in s.ignored)
    for counts, what, fix in ((positives, "with", "Add train images that carry them, or "
                               "remove them from the labels"),
                              (negatives, "without", "A class on every image can not be "
                               "learnt: remove it from the labels")):
        lacking = [classes[i] for i in range(len(classes)) if not counts[i]]
        if lacking:
            raise DatasetError(
                f"expected every class to have train images {what} it; {len(lacking)} have "
                f"none (of {len(train)} train images): "
                + ", ".join(f"'{_shown(c)}'" for c in lacking[:5]) + f". {fix}."
            )
    missing: dict[str, list[str]] = {}
    for split in ("val", "test"):
        present = {i for s in samples if s.split == split for i in s.targets}
        if any(s.split == split for s in samples) and len(present) < len(classes):
            missing[split] = [c for i, c in enumerate(classes) if i not in present]
    return missing


def _split_count(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 3:
        return 0
    return min(max(1, round(n * fraction)), n - 1)


# --- class folders --------------------------------------------------------------------


@dataclass
class _Walk:
    """What walking a tree found: images (as (display path, identity)), and what not."""

    images: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    links_skipped: list[str] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)


def _walk_class_folders(root: Path) -> _Walk:
    """Every image under root as an entry (relative path, class name, split or None)."""
    top = _list_dir(root)
    split_dirs = {
        entry.name: SPLIT_FOLDERS[entry.name.lower()]
        for entry in top
        if entry.name.lower() in SPLIT_FOLDERS and _is_kind(entry, "dir")
    }
    walk = _Walk()
    if split_dirs:
        walk.ignored += sum(1 for e in top if e.name not in split_dirs and not e.name.startswith("."))
        bases = [(root / name, split) for name, split in sorted(split_dirs.items())]
    else:
        bases = [(root, None)]
    for base, split in bases:
        listing = _list_dir(base)
        if split is not None:
            _refuse_loose_images(base, listing)
        for class_dir in listing:
            if class_dir.name.startswith("."):
                continue
            is_dir = _is_kind(class_dir, "dir", walk)
            if is_dir is None:  # recorded as unreadable
                continue
            if not is_dir:
                walk.ignored += 1
                continue
            _check_class_name(class_dir.name, base)
            start = len(walk.images)
            _walk_images(Path(class_dir.path), root, walk)
            for path, identity in walk.images[start:]:
                relative = os.path.relpath(path, root).replace(os.sep, "/")
                walk.entries.append(_Entry(relative, class_dir.name, split, identity, relative))
    return walk


def _refuse_loose_images(base: Path, listing: list[os.DirEntry]) -> None:
    loose = [e.name for e in listing if is_image_name(e.name) and _is_kind(e, "file")]
    if loose:
        raise DatasetError(
            f"expected class folders in the split folder '{base.name}/' ({base.name}/CLASS/"
            f"*.jpg); found {len(loose)} images directly in it, e.g. '{_shown(loose[0])}'. "
            f"Move them into one subfolder per class. Received: path='{base}'"
        )


def _check_class_name(name: str, base: Path) -> None:
    """Class names travel into caches, JSON and plots: they must be text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetError(
            f"expected class folder names in UTF-8; '{_shown(name)}' in '{_shown(str(base))}' "
            "is not (bytes shown as \\x..). Rename the folder, e.g. with `convmv -f latin1 "
            "-t utf-8`."
        ) from None


def _is_kind(entry: os.DirEntry, kind: str, walk: _Walk | None = None) -> bool | None:
    """Whether a listed entry is a directory ("dir") or a file ("file"), following links;
    None when that can not be told. DirEntry.is_dir raises on a link loop: such an entry
    is recorded as unreadable in `walk` when given (a note, not a traceback)."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as error:
        if walk is not None:
            walk.unreadable.append((entry.path, _os_reason(error)))
        return None


def _list_dir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as iterator:
            return sorted(iterator, key=lambda entry: entry.name)
    except OSError as error:
        raise DatasetError(
            f"expected a readable directory; {error.strerror}. Received: path='{path}'"
        ) from None


def find_images(directory: Path) -> tuple[list[Path], int]:
    """Image files below `directory` (recursively, sorted), and how many other files were
    ignored. Symbolic links are followed only where they lead outside `directory` and not
    to one of its ancestors, so no image is found twice and a link loop ends."""
    walk = _Walk()
    _walk_images(Path(directory), Path(directory), walk)
    return [Path(path) for path, _ in walk.images], walk.ignored


def _walk_images(directory: Path, tree: Path, walk: _Walk) -> None:
    """Add the images below `directory` to `walk`. Directories are opened relative to
    their parent (os.fwalk), so files whose full path is over PATH_MAX are found and
    counted as unreadable instead of vanishing. A link is followed only to a place
    outside `tree` that is not an ancestor of it, and each linked directory once."""
    tree_real = os.path.realpath(tree)
    followed = {tree_real}
    pending = [(str(directory), str(directory))]  # (place to walk, path it is shown as)
    if os.path.islink(directory) and Path(directory) != Path(tree):  # a linked class folder
        target = os.path.realpath(directory)
        if _leads_back(target, tree_real):
            walk.links_skipped.append(str(directory))
            return
        followed.add(target)
        pending = [(target, str(directory))]
    elif os.path.islink(directory):  # the tree itself given as a link: walk where it leads
        pending = [(tree_real, str(directory))]
    while pending:
        place, shown = pending.pop()
        for current, dirs, files, dir_fd in os.fwalk(place, follow_symlinks=False,
                                                     onerror=_collect_error(walk, place, shown)):
            current_shown = shown + current[len(place):]
            dirs.sort()
            for name in list(dirs):
                if name.startswith("."):
                    dirs.remove(name)
                elif _is_link(name, dir_fd):
                    dirs.remove(name)
                    target = os.path.realpath(os.path.join(current, name))
                    if _leads_back(target, tree_real) or target in followed:
                        walk.links_skipped.append(os.path.join(current_shown, name))
                    else:
                        followed.add(target)
                        pending.append((target, os.path.join(current_shown, name)))
            for name in sorted(files):
                _add_file(walk, current, current_shown, name, dir_fd, tree_real, place != str(directory))


def _add_file(walk: _Walk, current: str, current_shown: str, name: str, dir_fd: int,
              tree_real: str, through_link: bool) -> None:
    if name.startswith("."):
        return
    if not is_image_name(name):
        walk.ignored += 1
        return
    shown = os.path.join(current_shown, name)
    identity = shown
    if through_link or _is_link(name, dir_fd):
        identity = os.path.realpath(os.path.join(current, name))
        if _is_link(name, dir_fd) and _leads_back(identity, tree_real):
            walk.links_skipped.append(shown)
            return
    if len(os.fsencode(shown)) >= PATH_MAX:
        walk.unreadable.append((shown, f"path longer than PATH_MAX ({PATH_MAX} bytes)"))
        return
    walk.images.append((shown, identity))


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat_mod.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _leads_back(target: str, tree_real: str) -> bool:
    """Whether a link target is inside the tree or is the tree or one of its ancestors."""
    inside = target == tree_real or target.startswith(tree_real.rstrip(os.sep) + os.sep)
    ancestor = tree_real.startswith(target.rstrip(os.sep) + os.sep)
    return inside or ancestor


def _collect_error(walk: _Walk, place: str, shown: str):
    def record(error: OSError) -> None:
        path = str(error.filename or place)
        walk.unreadable.append((shown + path[len(place):] if path.startswith(place) else path,
                                error.strerror or type(error).__name__))
    return record


# --- labels files ---------------------------------------------------------------------


def label_sources(labels: LabelsArg) -> tuple[tuple[str, Path], ...]:
    """Normalise `labels` (None, one file, {split: file} or ((split, file), ...)) to
    ((split or "", absolute path), ...). Split names: train, val (validation), test,
    trainval; "" is a file for the whole dataset."""
    if labels is None:
        return ()
    if isinstance(labels, (str, os.PathLike)):
        pairs = [("", labels)]
    elif isinstance(labels, Mapping):
        pairs = list(labels.items())
    else:
        pairs = [tuple(pair) for pair in labels]
    sources: list[tuple[str, Path]] = []
    for split, path in pairs:
        name = SOURCE_SPLITS.get(str(split).strip().lower(), None) if split else ""
        if name is None:
            raise DatasetError(
                f"expected labels split names train, val, test or trainval. Received: "
                f"'{split}={path}'. Use e.g. --labels train=car_train.txt --labels val=car_val.txt"
            )
        if not str(path).strip():
            raise DatasetError(f"expected a labels file path. Received: an empty path for "
                               f"split '{split or 'all'}'")
        sources.append((name, _resolved_source(path)))
    _check_source_splits(sources)
    return tuple(sources)


def _resolved_source(path) -> Path:
    """The absolute path of a labels file or directory. Resolving a symbolic link loop
    raises (RuntimeError before Python 3.13, OSError after): a one-line error instead."""
    given = Path(path).expanduser()
    try:
        return given.resolve()
    except (OSError, RuntimeError):
        raise DatasetError(
            f"expected a labels file or directory that can be opened; '{_shown(str(given))}' "
            "is a symbolic link loop (it leads back to itself). Received: "
            f"labels='{_shown(str(path))}'. Point the link at the real file."
        ) from None


def _check_source_splits(sources: list[tuple[str, Path]]) -> None:
    names = [split for split, _ in sources]
    if "" in names and len(names) > 1:
        raise DatasetError(
            "expected one labels file for the whole dataset or one per split (SPLIT=FILE), "
            f"not both. Received: {len(names)} labels files, "
            f"{names.count('')} without a split name. Write each as SPLIT=FILE."
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DatasetError(
            f"expected one labels file per split; got several for '{repeated[0]}'. "
            "Give each split once (merge the files)."
        )
    if "trainval" in names and ({"train", "val"} & set(names)):
        raise DatasetError(
            "expected either trainval= (val is then carved from it) or train= and val=, "
            f"not both. Received: splits {sorted(names)}"
        )


def describe_labels(sources) -> str:
    """The labels setting as one string for cache attributes: "" for none, the absolute
    path of one file, or a JSON object {split: absolute path}: the cache key's part that
    names the labels files."""
    sources = label_sources(sources)
    if not sources:
        return ""
    if len(sources) == 1 and sources[0][0] == "":
        return str(sources[0][1])
    return json.dumps({split: str(path) for split, path in sources}, sort_keys=True)


def _read_label_sources(root: Path, sources) -> tuple[list[_Entry], int, int, list[str]]:
    """Entries of every labels file, each file's split applied; (entries, ignored,
    difficult, classes named by a VOC directory)."""
    entries: list[_Entry] = []
    ignored = difficult = 0
    declared: list[str] = []
    for split, path in sources:
        if path.is_dir():
            if split:
                raise DatasetError(
                    f"expected a labels file for the {split} split; '{path}' is a directory. "
                    f"A VOC ImageSets/Main directory holds every split: give it alone, as "
                    f"--labels {path}"
                )
            found, hard, declared = _read_voc_directory(root, path)
            entries += found
            difficult += hard
            continue
        found, skipped, hard = _read_labels_file(root, path)
        for entry in found:
            if split and entry.split not in (None, SPLIT_FOLDERS.get(split, split)):
                raise DatasetError(
                    f"expected the split column of '{path}' to agree with its split "
                    f"'{split}'; '{entry.given}' says '{entry.split}'. Drop the column or the "
                    f"SPLIT= name."
                )
            entries.append(entry._replace(split=split) if split else entry)
        ignored += skipped
        difficult += hard
    return entries, ignored, difficult, declared


def _read_labels_file(root: Path, labels_file: Path) -> tuple[list[_Entry], int, int]:
    if not os.path.lexists(labels_file):
        raise DatasetError(
            f"expected a labels file (CSV path,label[,split] or path,labels[,split], a "
            f"'name label' list, or a VOC ImageSets/Main directory); it does not exist. "
            f"Received: labels='{labels_file}'"
        )
    text = _read_text(labels_file)
    first = text.lstrip().split("\n", 1)[0]
    if labels_file.suffix.lower() == ".csv" or "," in first:
        entries, ignored, difficult = _read_csv(root, labels_file, text), 0, 0
    else:
        entries, ignored, difficult = _read_list(root, labels_file, text)
    if not entries:
        raise DatasetError(
            f"expected at least one labelled image in the labels file; it has none"
            f"{' (header only)' if labels_file.suffix.lower() == '.csv' or ',' in first else ''}"
            f"{f', {difficult} marked difficult' if difficult else ''}. Received: "
            f"labels='{labels_file}'"
        )
    return entries, ignored, difficult


def _read_text(labels_file: Path) -> str:
    """The text of a labels file or VOC list. Anything but a readable regular UTF-8 file
    (a directory, a link loop or a dangling link, a pipe that would block, no
    permission) is a `DatasetError` naming the file, never an OSError traceback."""
    try:
        mode = os.stat(labels_file).st_mode
        if not stat_mod.S_ISREG(mode):
            kind = ("a directory" if stat_mod.S_ISDIR(mode)
                    else "not a regular file (a pipe, socket or device)")
            raise DatasetError(
                f"expected a labels file to read; '{_shown(str(labels_file))}' is {kind}. "
                f"Received: labels='{_shown(str(labels_file))}'. Give a text file, or "
                "rename or remove this one."
            )
        raw = labels_file.read_bytes()
    except OSError as error:
        raise DatasetError(
            f"expected a readable labels file; could not read '{_shown(str(labels_file))}': "
            f"{_os_reason(error)}. Received: labels='{_shown(str(labels_file))}'. Fix its "
            "permissions or links, or remove it."
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"expected a UTF-8 labels file; byte 0x{raw[error.start]:02x} at offset "
            f"{error.start} is not UTF-8. Received: labels='{labels_file}'. Re-save it as "
            "UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None
    return text


def _os_reason(error: OSError) -> str:
    """Why a file could not be opened, in words."""
    if error.errno == errno.ELOOP:
        return "it is a symbolic link loop (it leads back to itself)"
    if error.errno == errno.ENOENT:
        return "it is a symbolic link to a file that does not exist"
    if error.errno == errno.EISDIR:
        return "it is a directory"
    return error.strerror or type(error).__name__


def _read_csv(root: Path, labels_file: Path, text: str) -> list[_Entry]:
    """`path,label[,split]` (one class per image) or `path,labels[,split]` (zero or more
    classes per image, separated by `;`)."""
    columns: list[str] | None = None
    multilabel = False
    rows = []
    for line, cells in _csv_rows(text, labels_file):
        if columns is None:
            columns = [c.strip().lower() for c in cells]
            multilabel = _csv_kind(columns, labels_file)
            continue
        # as csv.DictReader: missing cells are empty, cells beyond the header dropped
        row = {k: cell.strip() for k, cell in zip(columns, cells) if k}
        if not row.get("path"):
            continue
        _refuse_line_breaks(row, line, labels_file)
        split = _csv_split(row, labels_file)
        if multilabel:
            rows.append((row["path"], "", split, _csv_targets(row, line, labels_file), ()))
            continue
        if LABELS_SEPARATOR in row.get("label", ""):
            raise DatasetError(
                f"expected one class name in the label column; line {line} "
                f"('{row['path']}') has '{row['label']}'. For several classes per image name "
                f"the column labels (path,labels[,split]). Received: labels='{labels_file}'"
            )
        if not row.get("label"):
            raise DatasetError(
                f"expected a label on every row; line {line} ('{row['path']}') has "
                f"none. Give it a label or remove the row. Received: labels='{labels_file}'"
            )
        rows.append((row["path"], row["label"], split))
    if columns is None:
        _csv_kind([], labels_file)  # no header at all: the header error
    return _locate(root, labels_file, rows)


def _csv_rows(text: str, labels_file: Path) -> Iterator[tuple[int, list[str]]]:
    """(line the row starts on, cells) of every non-blank CSV row. The reader is given
    the text with its line ends kept (newline=""), so a quoted line break stays in its
    cell to be refused, instead of being dropped and joining two names into a third.
    The reader's own errors (a cell over its field size limit) become a `DatasetError`."""
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            limit = csv.field_size_limit()
            if "field larger than field limit" in str(error):
                problem = (f"has a cell longer than the CSV reader's limit of {limit:,} "
                           "characters (an unclosed quote reads the rest of the file as one "
                           "cell)")
            else:
                problem = f"can not be read as CSV ({error})"
            raise DatasetError(
                f"expected CSV rows of path, label(s) and split; line {reader.line_num} of "
                f"'{labels_file}' {problem}. Received: labels='{labels_file}'. Close the "
                "quote or shorten the cell."
            ) from None
        if cells:
            yield start, cells


def _refuse_line_breaks(row: dict[str, str], line: int, labels_file: Path) -> None:
    """A line break (any character str.splitlines breaks at) inside a cell: an error."""
    for column, cell in row.items():
        breaks = sorted({f"U+{ord(c):04X}" for c in cell if c in LINE_BREAKS})
        if breaks:
            raise DatasetError(
                f"expected no line breaks inside a CSV cell; the {column} cell of the row "
                f"starting on line {line} of '{labels_file}' holds {', '.join(breaks)}: "
                f"{cell!r}. Received: labels='{labels_file}'. Remove the line break (rename "
                "the file if its name holds one): a name must fit on one line."
            )


def _csv_kind(columns: list[str], labels_file: Path) -> bool:
    """Whether the CSV is multi-label (a `labels` column) or single-label (`label`)."""
    kinds = [c for c in ("label", "labels") if c in columns]
    if "path" not in columns or len(kinds) != 1 or set(columns) - {"path", "split", *kinds}:
        both = " (not both label and labels: keep one)" if len(kinds) == 2 else ""
        raise DatasetError(
            "expected a CSV header with the columns path,label (one class per image) or "
            "path,labels (classes separated by ';'), and optionally split"
            f"{both}. Received: columns={columns} in '{labels_file}'"
        )
    return kinds == ["labels"]


def _csv_split(row: dict, labels_file: Path) -> str | None:
    split = row.get("split") or None
    if split is not None:
        if split.lower() not in SPLIT_FOLDERS:
            raise DatasetError(
                f"expected split to be one of train, val, validation, test. "
                f"Received: split='{split}' for '{row['path']}' in '{labels_file}'"
            )
        split = SPLIT_FOLDERS[split.lower()]
    return split


def _csv_targets(row: dict, line: int, labels_file: Path) -> tuple[str, ...]:
    """The class names of a `labels` cell: `;`-separated, blanks dropped, each once."""
    cell = row.get("labels", "")
    if "," in cell:
        raise DatasetError(
            f"expected the class names of a labels cell separated by ';'; line {line} "
            f"('{row['path']}') has '{cell}'. Write e.g. dog;person. Received: "
            f"labels='{labels_file}'"
        )
    return tuple(sorted({name.strip() for name in cell.split(LABELS_SEPARATOR) if name.strip()}))


def _read_list(root: Path, labels_file: Path, text: str) -> tuple[list[_Entry], int, int]:
    positive = labels_file.stem.split("_")[0] or "positive"
    negative = f"not_{positive}"
    rows = []
    difficult = 0
    for _, name, flag in _list_lines(text, labels_file):
        if flag is None:
            difficult += 1
            continue
        rows.append((name, positive if flag else negative, None))
    return _locate(root, labels_file, rows), 0, difficult


def _list_lines(text: str, path: Path) -> Iterator[tuple[int, str, bool | None]]:
    """(line number, image name, flag) of every `name 1|-1|0` line of a VOC-style list:
    True for 1, False for -1, None for 0 (difficult)."""
    # Lines end at \n, \r\n or \r only (as an editor counts them), so the line number
    # in a message is the one the user sees; a rarer line break inside a line is refused.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for number, line in enumerate(lines, start=1):
        breaks = sorted({f"U+{ord(c):04X}" for c in line if c in LINE_BREAKS})
        if breaks:
            raise DatasetError(
                f"expected lines 'name label' without line breaks inside them; line {number} "
                f"of '{path}' holds {', '.join(breaks)}: {line!r}. Received: labels='{path}'. "
                "Remove the line break (rename the image if its name holds one)."
            )
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in LIST_LABELS:
            raise DatasetError(
                f"expected lines 'name label' with label 1, -1 or 0 (difficult). "
                f"Received: line {number} '{line.strip()}' in '{path}'"
            )
        yield number, parts[0], LIST_LABELS[parts[1]]


def _locate(root: Path, labels_file: Path, rows) -> list[_Entry]:
    """Entries for (name as listed, label, split[, targets, ignored]) rows: every file
    must exist inside root."""
    entries, missing, outside = [], [], []
    for name, label, split, *tags in rows:
        relative = _resolve_listed(root, name)
        if relative is None:
            missing.append(name)
        elif relative.startswith("../") or relative == "..":
            outside.append(name)
        else:
            identity = os.path.realpath(root / relative)
            entries.append(_Entry(relative, label, split, identity, name, *tags))
    if outside:
        raise DatasetError(
            f"expected every file named in '{labels_file}' inside the dataset directory "
            f"'{root}'; {len(outside)} are outside it, e.g. '{outside[0]}'. Give the common "
            f"parent directory as the dataset, with paths relative to it."
        )
    _raise_missing(missing, root, labels_file)
    return entries


# --- Pascal VOC ImageSets/Main: one list per class and split -> multi-label ------------


def _read_voc_directory(root: Path, directory: Path) -> tuple[list[_Entry], int, list[str]]:
    """Entries of a VOC `ImageSets/Main` directory (every `<class>_<split>.txt`): an
    image's targets are the classes whose list marks it 1, its ignored classes those
    marking it 0 (difficult). Returns (entries, difficult marks, classes)."""
    lists, classes = _voc_lists(directory)
    entries: list[_Entry] = []
    difficult = 0
    for split in _voc_used_splits(set(lists)):
        images: dict[str, tuple[set[str], set[str]]] = {}
        for name in classes:
            difficult += _read_voc_list(lists[split][name], name, images)
        rows = [(image, "", split, tuple(sorted(targets)), tuple(sorted(hard)))
                for image, (targets, hard) in images.items()]
        entries += _locate(root, directory, rows)
    return entries, difficult, classes


def _voc_lists(directory: Path) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """{split: {class: list file}} and the sorted classes; every class needs a list for
    every split found. Other files (VOC's train.txt, val.txt, ...) are not labels."""
    lists: dict[str, dict[str, Path]] = {}
    for entry in _list_dir(directory):
        stem, _, extension = entry.name.rpartition(".")
        name, _, split = stem.rpartition("_")
        # no is_file() test here: it raises on a link loop, and a directory or link named
        # like a list would silently drop that class's labels; _read_text explains them
        if extension.lower() == "txt" and name and split in VOC_SPLITS:
            lists.setdefault(split, {})[name] = Path(entry.path)
    if not lists:
        raise DatasetError(
            "expected Pascal VOC lists named <class>_<split>.txt (split train, val, trainval "
            f"or test) in the labels directory; found none. Received: labels='{directory}'. "
            "Give the ImageSets/Main directory, or a labels file."
        )
    classes = sorted({name for by_class in lists.values() for name in by_class})
    for split, by_class in sorted(lists.items()):
        absent = [name for name in classes if name not in by_class]
        if absent:
            raise DatasetError(
                f"expected a list for every class in every split; the {split} split has no "
                f"list of {len(absent)} classes, e.g. '{absent[0]}_{split}.txt'. Received: "
                f"labels='{directory}'. Add the missing lists or remove that class's others."
            )
    return lists, classes


def _voc_used_splits(found: set[str]) -> list[str]:
    """train and val when both are listed (trainval is their union); else trainval (val
    is then carved from it); else train (val carved) or val alone; test when listed."""
    if {"train", "val"} <= found:
        chosen = ["train", "val"]
    elif "trainval" in found:
        chosen = ["trainval"]
    else:
        chosen = [split for split in ("train", "val") if split in found]
    return chosen + (["test"] if "test" in found else [])


def _read_voc_list(path: Path, name: str, images: dict[str, tuple[set[str], set[str]]]) -> int:
    """Add one class's list (`image 1|-1|0` lines) to `images`; returns its 0 marks."""
    seen: set[str] = set()
    difficult = 0
    for number, image, flag in _list_lines(_read_text(path), path):
        if image in seen:
            raise DatasetError(
                f"expected each image once in a list; '{image}' is listed again on line "
                f"{number} of '{path}'. Remove the repeated line."
            )
        seen.add(image)
        targets, hard = images.setdefault(image, (set(), set()))
        if flag:
            targets.add(name)
        elif flag is None:
            hard.add(name)
            difficult += 1
    return difficult


def _resolve_listed(root: Path, name: str) -> str | None:
    """The normalised path, relative to root, of a listed image (`d/../x` and absolute
    paths are spelled as their plain relative path; outside root it starts with `..`).
    List files may leave out the extension and the JPEGImages folder, as Pascal VOC's do."""
    candidates = [name] + [name + ext for ext in (".jpg", ".jpeg", ".png")]
    candidates += ["JPEGImages/" + c for c in candidates]
    for candidate in candidates:
        full = os.path.normpath(os.path.join(root, candidate))
        if os.path.isfile(full):
            return os.path.relpath(full, root).replace(os.sep, "/")
    return None


def _raise_missing(missing: list[str], root: Path, labels_file: Path) -> None:
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:3])
        raise DatasetError(
            f"expected every file named in '{labels_file}' to exist under '{root}'; "
            f"{len(missing)} do not, e.g. {shown}. Fix the paths (relative to the dataset "
            f"directory) or remove those rows."
        )


# --- decoding -------------------------------------------------------------------------


class BadImage(Exception):
    """Raised inside decoding; its message becomes the recorded reason for a skip."""


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode an image file to RGB uint8 pixels of shape (size, size, 3).

    A JPEG at least twice the target size is decoded at reduced scale (Pillow's `draft`)
    before the resize. EXIF orientation is applied; every Pillow mode (L, P, RGBA, CMYK,
    I;16, ...) becomes RGB, with transparency composited onto white; animated files give
    their first frame.
    Raises `BadImage` with a readable reason for anything that can not be decoded or
    oriented, whatever Pillow raised (a malformed EXIF block can raise `struct.error`
    or `AttributeError`): one bad file is a skip, never the end of a run. Pillow's
    warnings and libtiff's messages are silenced (`_quiet_decoders`).
    """
    from PIL import Image

    _quiet_decoders()
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
        with Image.open(path) as image:
            return _decode(image, size)
    except BadImage:
        raise
    except Image.DecompressionBombError as error:
        raise BadImage(f"over Pillow's decompression bomb limit: {error}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image Pillow can identify") from None
    except PermissionError:
        raise BadImage("permission denied") from None
    except (OSError, ValueError, SyntaxError, MemoryError, IndexError, TypeError) as error:
        raise BadImage(f"could not decode: {error}") from None
    except Exception as error:  # noqa: BLE001 - any decoder failure is this file's problem
        raise BadImage(f"could not decode or orient ({type(error).__name__}: {error})") from None


def _decode(image, size: int) -> np.ndarray:
    from PIL import Image, ImageOps

    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise BadImage(f"over Pillow's decompression bomb limit: {image.width}x{image.height} "
                       f"pixels is more than {limit}")
    if image.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the target size: much
        # faster for large photos, nearly the same pixels.
        image.draft(image.mode, (size, size))
    image.load()
    image = ImageOps.exif_transpose(image)
    image = to_rgb(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


_DECODERS_QUIET = False


def _quiet_decoders() -> None:
    """Pillow warns (corrupt EXIF, truncated file read, palette transparency, bomb size)
    through Python's warnings, and the libtiff it bundles writes its warnings and errors
    straight to stderr: both would land in the middle of a progress bar. A file that
    decodes is used as decoded; one that does not becomes a skip with the reason Pillow
    raised; the bomb limit is checked in `_decode`. The filters are process-wide (a
    `catch_warnings` block is not thread-safe and decoding runs in threads), so they are
    installed once and match only warnings raised in Pillow or attributed to this module;
    libtiff's handlers are set to none (its failures still reach Pillow as errors)."""
    global _DECODERS_QUIET
    if _DECODERS_QUIET:
        return
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    warnings.filterwarnings("ignore", module=r"probe\.data$")
    _quiet_libtiff()
    _DECODERS_QUIET = True


def _quiet_libtiff() -> None:
    import ctypes

    from PIL import _imaging  # noqa: F401 - loads the libtiff Pillow uses

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "/libtiff" in line}
    except OSError:  # not Linux: libtiff keeps its default handlers
        return
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("TIFFSetWarningHandler", "TIFFSetErrorHandler"):
            setter = getattr(library, name, None)
            if setter is not None:
                setter.restype = ctypes.c_void_p
                setter.argtypes = [ctypes.c_void_p]
                setter(None)


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
