"""Exact and near duplicates in a feature cache, and the pairs that cross splits.

Two images are *exact* duplicates when their files have the same content (SHA-256), and
*near* duplicates when the cosine similarity of their cached features, measured after
subtracting the cache's mean feature vector, is at least `threshold`. A pair whose images
sit in different splits (train and test, train and val) inflates every score measured on
the later split: those pairs are listed first.

A fixed threshold means different things in different feature spaces (random weights put
distinct images at cosine 0.95 and above), so by default the threshold is set from the
cache's own similarities (`calibrate_threshold`): halfway to 1 from the closest that
distinct images come, measured twice (the 99.9th percentile of pairs sharing no class;
the median similarity of an image to its nearest neighbour, for classes whose images are
all alike), never below `THRESHOLD_FLOOR` nor above `THRESHOLD_CEILING`. A threshold
given by the caller is used as it is.

Similarities are computed blockwise in float32 (a block of rows against a block of
columns, upper triangle only), so memory stays bounded whatever the number of images.
Beyond `EXACT_BUDGET` multiply-adds, a first pass compares `PROJECTED_DIMS`-dimensional
seeded Gaussian projections with a margin below the threshold that a pair at the
threshold falls under with probability about 1e-12, and every candidate pair is then
verified on the full features: the reported similarities are always exact, and the first
pass makes 100,000 x 2,048 features a matter of seconds (benchmarks/duplicates.py
measures its speed and its recall). `exact=True` (`--exact`) skips the first pass.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from . import files
from .features.cache import FeatureCache
from .files import display, file_sha256
from .errors import ProbeError
from .progress import Advanced, DuplicatesFinished, DuplicatesStarted, ProgressCallback, Stage, emit
from .task import Task

__all__ = ["THRESHOLD_FLOOR", "DuplicateImage", "DuplicatePair", "DuplicateGroup",
           "Duplicates", "Calibration", "find_duplicates", "calibrate_threshold",
           "similar_pairs", "cached_duplicates", "leakage_warning"]

# The lowest threshold the calibration gives (and the fixed one of earlier versions):
# with random-weight vgg16, resnet50 and densenet121 features it keeps every identical
# file and re-encoded copy and 66-88 % of resized or cropped copies, but also flags
# 0.2-1.4 % of pairs of distinct but alike images (benchmarks/duplicates.py --calibrate;
# docs/report.md "Duplicates and leakage"), hence the calibration above it.
THRESHOLD_FLOOR = 0.95
DEFAULT_THRESHOLD = THRESHOLD_FLOOR  # the name earlier versions exported
THRESHOLD_CEILING = 0.9999  # near-identical copies stay findable in a crowded space
REFERENCE_PERCENTILE = 99.9  # of the similarities of pairs taken as distinct
REFERENCE_PAIRS = 200_000  # sampled beyond this many pairs (all of them below)
MIN_CROSS_CLASS_PAIRS = 100  # fewer pairs sharing no class: any pairs are the reference
NEIGHBOUR_ROWS = 256  # images whose nearest neighbour is looked for (a seeded sample)
CALIBRATED = "calibrated-1"  # the key of a remembered check at the calibrated threshold
BLOCK_ROWS = 2048  # rows per block: a 2,048 x 8,192 float32 block is 64 MB
BLOCK_COLUMNS = 8192
EXACT_BUDGET = 4e10  # n * n * d below this: one exact pass (a second or two)
PROJECTED_DIMS = 64
MAX_PAIRS = 2_000_000  # beyond this the threshold is far too low to mean "duplicate"
SIDECAR_SUFFIX = ".duplicates.json"


@dataclass(frozen=True)
class DuplicateImage:
    """One image of the cache: its split, path (relative to the dataset root) and class."""

    split: str
    path: str
    label: str


@dataclass(frozen=True)
class DuplicatePair:
    """Two images whose features are at least `threshold` similar (`similarity`, cosine
    of the centred features); `exact` when their files have the same content."""

    first: DuplicateImage
    second: DuplicateImage
    similarity: float
    exact: bool

    @property
    def cross_split(self) -> bool:
        return self.first.split != self.second.split

    @property
    def splits(self) -> str:
        """e.g. "train-test" (in train, val, test order)."""
        order = {"train": 0, "val": 1, "test": 2}
        names = sorted({self.first.split, self.second.split}, key=lambda s: order.get(s, 3))
        return "-".join(names) if len(names) > 1 else names[0]


@dataclass(frozen=True)
class DuplicateGroup:
    """Images joined by duplicate pairs (connected components); `exact` when every file
    has the same content."""

    images: tuple[DuplicateImage, ...]
    exact: bool
    min_similarity: float

    @property
    def cross_split(self) -> bool:
        return len({image.split for image in self.images}) > 1


@dataclass(frozen=True)
class Calibration:
    """How a threshold was set from a cache's own similarities: `reference` pairs
    ("cross-class pairs": sharing no class; "random pairs") and their similarity at the
    `percentile`; the median similarity of `images` images to their nearest neighbour;
    and the threshold, halfway to 1 from the higher of the two, clipped."""

    threshold: float
    reference: str
    pairs: int
    percentile: float
    similarity: float
    images: int
    neighbour_similarity: float

    def describe(self) -> str:
        """e.g. "set from this cache: halfway to 1 from 0.9728 (99.9th percentile of
        72,900 cross-class pairs; median nearest neighbour 0.8125)"."""
        bound = ("; the floor" if self.threshold == THRESHOLD_FLOOR else
                 "; the ceiling" if self.threshold == THRESHOLD_CEILING else "")
        return (f"set from this cache: halfway to 1 from "
                f"{max(self.similarity, self.neighbour_similarity):.4f} ({self.percentile:g}th "
                f"percentile of {self.pairs:,} {self.reference} {self.similarity:.4f}; median "
                f"nearest neighbour of {self.images:,} images {self.neighbour_similarity:.4f}){bound}")


@dataclass
class Duplicates:
    """What `find_duplicates` found: groups and pairs, cross-split ones first;
    `calibration` says how the threshold was set (None: given by the caller)."""

    cache: str
    threshold: float
    n_images: int
    groups: list[DuplicateGroup]
    pairs: list[DuplicatePair]
    hashed_all_files: bool  # False: only files of near pairs were hashed
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    method: str = "exact"
    seconds: float = 0.0
    calibration: Calibration | None = None

    @property
    def cross_split_pairs(self) -> list[DuplicatePair]:
        return [pair for pair in self.pairs if pair.cross_split]

    def counts(self) -> dict[str, int]:
        """Pairs by kind and split crossing, e.g. {"train-test": 2, "exact": 1, ...}."""
        counts = {"pairs": len(self.pairs), "groups": len(self.groups),
                  "exact_pairs": sum(p.exact for p in self.pairs),
                  "near_pairs": sum(not p.exact for p in self.pairs),
                  "cross_split_pairs": len(self.cross_split_pairs)}
        for pair in self.cross_split_pairs:
            counts[pair.splits] = counts.get(pair.splits, 0) + 1
        return counts

    def to_dict(self) -> dict:
        """A JSON-serialisable form (groups and pairs as lists of dicts)."""
        return {"cache": self.cache, "threshold": self.threshold, "n_images": self.n_images,
                "calibration": None if self.calibration is None else asdict(self.calibration),
                "method": self.method, "seconds": self.seconds,
                "hashed_all_files": self.hashed_all_files, "counts": self.counts(),
                "groups": [asdict(g) for g in self.groups],
                "pairs": [asdict(p) for p in self.pairs],
                "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable]}


def find_duplicates(
    cache: str | os.PathLike | FeatureCache,
    threshold: float | None = None,
    *,
    hash_all_files: bool = True,
    exact: bool | None = None,
    progress: ProgressCallback | None = None,
) -> Duplicates:
    """Exact and near duplicates among every image of a cache, cross-split pairs first.

    `threshold` is the cosine similarity (of features centred on the cache's mean) from
    which two images count as near duplicates; None sets it from the cache's own
    similarities (`calibrate_threshold`, said in `Duplicates.calibration`). With
    `hash_all_files` every image file is
    read and hashed, so identical files are found even where their features differ;
    without it only the files of near pairs are hashed (identical files have identical
    features, so they are near pairs too) and no image is read otherwise. `exact=True`
    compares every pair on the full features even for a large cache (see `similar_pairs`).

    >>> found = probe.find_duplicates(".probe/flowers-vgg16-224-avg-1a2b3c4d5e.h5")
    >>> [(p.first.path, p.second.path, p.splits) for p in found.cross_split_pairs]
    """
    started = time.perf_counter()
    chosen = cache if isinstance(cache, FeatureCache) else FeatureCache.open(cache)
    if threshold is not None:
        check_threshold(threshold)
    images, features, members = _read_all(chosen)
    emit(progress, DuplicatesStarted(total=len(images), cache=chosen.path))
    X = centre(features)
    calibration = calibrate_threshold(X, members) if threshold is None else None
    threshold = calibration.threshold if calibration else threshold
    first, second, similarity, method = similar_pairs(X, threshold, exact=exact, progress=progress)
    root = Path(chosen.attrs.get("dataset_root") or ".")
    wanted = range(len(images)) if hash_all_files else sorted(set(first) | set(second))
    digests, unreadable = _hash_files(root, images, wanted)
    first, second, similarity = _add_exact_pairs(first, second, similarity, digests, features)
    pairs = _pairs(images, first, second, similarity, digests)
    groups = _groups(images, first, second, similarity, digests)
    result = Duplicates(str(chosen.path), float(threshold), len(images), groups, pairs,
                        hash_all_files, unreadable, method,
                        round(time.perf_counter() - started, 3), calibration)
    emit(progress, DuplicatesFinished(counts=result.counts()))
    return result


def check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float)) and 0.0 < float(threshold) < 1.0):
        raise ProbeError(
            f"expected a cosine similarity threshold between 0 and 1 (exclusive), e.g. "
            f"--threshold 0.98, or none (set from the cache). Received: threshold={threshold!r}"
        )
    return float(threshold)


def calibrate_threshold(X: np.ndarray, members: np.ndarray | None = None, *,
                        seed: int = 0) -> Calibration:
    """The near-duplicate threshold of centred unit rows `X`, from their own similarities.

    How close distinct images come is measured twice, each robust to the few duplicates:
    the `REFERENCE_PERCENTILE`th percentile similarity of pairs that share no class
    (`members`: the (N, K) bool class matrix; a duplicate is one image with one label;
    any pairs when fewer than `MIN_CROSS_CLASS_PAIRS` share none), over every pair of a
    small cache or about `REFERENCE_PAIRS` seeded ones; and the median similarity of an
    image to its nearest neighbour (`NEIGHBOUR_ROWS` seeded images against all), which
    catches classes whose images are all alike (plain colours), where pairs across classes
    say nothing. The threshold is 1 - (1 - q) / 2 for the higher q, clipped to
    [THRESHOLD_FLOOR, THRESHOLD_CEILING]: in a random-weight space it rises above the
    alike but distinct images, and re-encoded or resized copies, far closer to 1, stay
    above it (the calibration run of benchmarks/duplicates.py)."""
    if len(X) < 2:  # nothing to compare, nothing to find
        return Calibration(THRESHOLD_FLOOR, "random pairs", 0, REFERENCE_PERCENTILE, -1.0, len(X), -1.0)
    similarities, cross = _reference_similarities(X, members, seed)
    reference = "random pairs"
    if cross is not None and cross.sum() >= MIN_CROSS_CLASS_PAIRS:
        similarities, reference = similarities[cross], "cross-class pairs"
    q = float(np.percentile(similarities, REFERENCE_PERCENTILE))
    rows, nearest = _nearest_similarities(X, seed)
    neighbour = float(np.median(nearest))
    threshold = float(np.clip(1.0 - (1.0 - max(q, neighbour)) / 2.0, THRESHOLD_FLOOR,
                              THRESHOLD_CEILING))
    return Calibration(round(threshold, 6), reference, int(similarities.size), REFERENCE_PERCENTILE,
                       round(q, 6), rows, round(neighbour, 6))


def _sample(n: int, size: int, seed: list[int]) -> np.ndarray:
    """All of range(n), or `size` of it drawn without replacement (sorted)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _reference_similarities(X: np.ndarray, members: np.ndarray | None,
                            seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The similarities of every pair (i < j) of a small cache, or of seeded rows against
    seeded columns (one small product), and which of them share no class (None without
    `members`)."""
    n = len(X)
    if n * (n - 1) // 2 <= REFERENCE_PAIRS:
        rows = columns = np.arange(n)
        keep = np.triu(np.ones((n, n), dtype=bool), 1)
    else:
        rows = _sample(n, NEIGHBOUR_ROWS, [seed, n, 1])
        columns = _sample(n, REFERENCE_PAIRS // NEIGHBOUR_ROWS, [seed, n, 2])
        keep = rows[:, None] != columns[None, :]
    similarities = (X[rows] @ X[columns].T)[keep]
    if members is None:
        return similarities, None
    M = np.asarray(members, dtype=np.float32)
    return similarities, (M[rows] @ M[columns].T)[keep] == 0


def _nearest_similarities(X: np.ndarray, seed: int) -> tuple[int, np.ndarray]:
    """The similarity of (a seeded sample of) the rows to their nearest other row."""
    n = len(X)
    rows = _sample(n, NEIGHBOUR_ROWS, [seed, n, 1])
    best = np.full(len(rows), -np.inf, dtype=np.float32)
    for b in range(0, n, BLOCK_COLUMNS):
        block = X[rows] @ X[b:b + BLOCK_COLUMNS].T
        own = (rows >= b) & (rows < b + BLOCK_COLUMNS)
        block[np.flatnonzero(own), rows[own] - b] = -np.inf  # a row is not its own neighbour
        best = np.maximum(best, block.max(axis=1))
    return len(rows), best


# --- similarity -----------------------------------------------------------------------


def centre(features: np.ndarray) -> np.ndarray:
    """Rows minus their mean, scaled to unit length (float32). Centring removes the
    component every image shares (post-ReLU features are all positive), which otherwise
    makes distinct images look alike (see the calibration in docs/report.md)."""
    X = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    if len(X) > 1:
        X = X - X.mean(axis=0, dtype=np.float64).astype(np.float32)
    return normalise(X)


def normalise(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def similar_pairs(
    X: np.ndarray,
    threshold: float,
    *,
    exact: bool | None = None,
    dims: int = PROJECTED_DIMS,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Every pair (i < j) of unit rows of `X` with `X[i] @ X[j] >= threshold`.

    Returns (first, second, similarity, method); similarities are always the exact ones.
    `exact=None` chooses: one exact pass when `n * n * d <= EXACT_BUDGET`, else candidates
    from a seeded Gaussian projection to `dims` dimensions, verified on the full rows
    ("projected"); a block where candidates are not rare is computed exactly instead.
    """
    n, d = X.shape
    if exact is None:
        exact = n * n * d <= EXACT_BUDGET or d <= 2 * dims
    if exact:
        return (*_blockwise_pairs(X, threshold, progress), "exact")
    Y = project(X, dims, seed)
    found = _blockwise_pairs(Y, candidate_threshold(threshold, dims), progress, full=X,
                             threshold=threshold)
    return (*found, f"projected to {dims} dimensions, verified exactly")


def candidate_threshold(threshold: float, dims: int, sigmas: float = 7.0) -> float:
    """The projected similarity from which a pair is verified. Under a Gaussian random
    projection the projected cosine of two unit vectors of cosine c behaves like a sample
    correlation of `dims` pairs with correlation c: Fisher's z = atanh(r) is close to
    normal with standard deviation 1 / sqrt(dims - 3). Seven of them below the threshold's
    z: a pair at the threshold is missed with probability about 1e-12."""
    z = math.atanh(min(threshold, 0.999999)) - sigmas / math.sqrt(max(dims - 3, 1))
    return math.tanh(z)


def project(X: np.ndarray, dims: int, seed: int = 0) -> np.ndarray:
    """Rows multiplied by a seeded Gaussian (d x dims) matrix, then scaled to unit length."""
    rng = np.random.default_rng(seed)
    return normalise(X @ rng.standard_normal((X.shape[1], dims), dtype=np.float32))


def _blockwise_pairs(X: np.ndarray, cut: float, progress: ProgressCallback | None,
                     full: np.ndarray | None = None, threshold: float | None = None):
    """(i, j, similarity) with i < j of every row pair of X at or above `cut`; with
    `full`, those pairs are then verified on `full` against `threshold`."""
    n = len(X)
    found_i, found_j, found_s = [], [], []
    total = 0
    for a in range(0, n, BLOCK_ROWS):
        rows = X[a:a + BLOCK_ROWS]
        for b in range(a, n, BLOCK_COLUMNS):
            block = rows @ X[b:b + BLOCK_COLUMNS].T
            if b == a:
                np.fill_diagonal(block, -np.inf)  # a row is not its own duplicate
            if block.max() < cut:  # most blocks: a max is ten times cheaper than nonzero
                continue
            i, j = np.nonzero(block >= cut)
            if full is not None:
                i, j, s = _verify(full, a, b, i, j, block.shape, threshold)
            else:
                s = block[i, j]
            i, j = i + a, j + b
            keep = i < j
            found_i.append(i[keep].astype(np.int64))
            found_j.append(j[keep].astype(np.int64))
            found_s.append(s[keep].astype(np.float32))
            total += int(keep.sum())
            if total > MAX_PAIRS:
                raise ProbeError(
                    f"expected duplicates to be rare; more than {MAX_PAIRS:,} pairs of "
                    f"images are at least {threshold or cut:.3f} similar. Raise --threshold, "
                    "or leave it out to set it from the cache."
                )
        emit(progress, Advanced(Stage.DUPLICATES, done=min(n, a + BLOCK_ROWS), total=n))
    if not found_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)


def _verify(full: np.ndarray, a: int, b: int, i: np.ndarray, j: np.ndarray, shape, threshold):
    """The candidates of one block checked on the full rows; when they are not rare
    (more than 2 % of the block), the whole block is computed exactly instead."""
    if len(i) > 0.02 * shape[0] * shape[1]:
        block = full[a:a + shape[0]] @ full[b:b + shape[1]].T
        i, j = np.nonzero(block >= threshold)
        return i, j, block[i, j]
    s = _row_dots(full, i + a, j + b)
    keep = s >= threshold
    return i[keep], j[keep], s[keep]


def _row_dots(X: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 65536) -> np.ndarray:
    out = np.empty(len(i), dtype=np.float32)
    for start in range(0, len(i), chunk):
        a, b = i[start:start + chunk], j[start:start + chunk]
        out[start:start + chunk] = np.einsum("ij,ij->i", X[a], X[b])
    return out


# --- files, pairs and groups ----------------------------------------------------------


def _read_all(cache: FeatureCache) -> tuple[list[DuplicateImage], np.ndarray, np.ndarray]:
    """The images, their features and their (N, K) bool class matrix."""
    classes, task = cache.classes, Task.of_flag(cache.multilabel)
    images: list[DuplicateImage] = []
    blocks, members = [], []
    for split in cache.splits:
        part = cache.split(split)
        # multi-label: a (K,) 0/1 row, named by its classes joined with ';'
        images += [DuplicateImage(split, path, task.label_name(label, classes))
                   for path, label in zip(part.paths, part.labels)]
        blocks.append(np.asarray(part.features, dtype=np.float32).reshape(len(part), -1))
        members.append(task.class_matrix(part.labels, len(classes)))
    if not blocks:
        return [], np.zeros((0, 1), dtype=np.float32), np.zeros((0, len(classes)), dtype=bool)
    return images, np.concatenate(blocks), np.concatenate(members)


def _hash_files(root: Path, images: list[DuplicateImage], wanted: Iterable[int]):
    digests: dict[int, str] = {}
    unreadable: list[tuple[str, str]] = []
    for index in wanted:
        try:
            digests[int(index)] = file_sha256(root / images[index].path)
        except OSError as error:
            unreadable.append((images[index].path, error.strerror or type(error).__name__))
    return digests, unreadable


def _add_exact_pairs(first, second, similarity, digests: dict[int, str], features):
    """Identical files whose features were not similar enough (e.g. extracted with other
    settings into a merged cache) still make a pair."""
    by_digest: dict[str, list[int]] = {}
    for index, digest in digests.items():
        by_digest.setdefault(digest, []).append(index)
    known = set(zip(first.tolist(), second.tolist()))
    extra = [(a, b) for members in by_digest.values() if len(members) > 1
             for x, a in enumerate(sorted(members)) for b in sorted(members)[x + 1:]
             if (a, b) not in known]
    if not extra:
        return first, second, similarity
    a, b = (np.array(v, dtype=np.int64) for v in zip(*extra))
    X = centre(features)
    return (np.concatenate([first, a]), np.concatenate([second, b]),
            np.concatenate([similarity, _row_dots(X, a, b)]))


def _is_exact(digests: dict[int, str], a: int, b: int) -> bool:
    return a in digests and digests.get(a) == digests.get(b)


def _pairs(images, first, second, similarity, digests) -> list[DuplicatePair]:
    pairs = [DuplicatePair(images[a], images[b], round(float(s), 6), _is_exact(digests, a, b))
             for a, b, s in zip(first.tolist(), second.tolist(), similarity.tolist())]
    pairs.sort(key=lambda p: (not p.cross_split, not p.exact, -p.similarity, p.first.path))
    return pairs


def _groups(images, first, second, similarity, digests) -> list[DuplicateGroup]:
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(first.tolist(), second.tolist()):
        parent[root(a)] = root(b)
    members: dict[int, list[int]] = {}
    for x in list(parent):
        members.setdefault(root(x), []).append(x)
    lowest: dict[int, float] = {}
    for a, s in zip(first.tolist(), similarity.tolist()):
        r = root(a)
        lowest[r] = min(lowest.get(r, 1.0), float(s))
    groups = []
    for r, indices in members.items():
        indices.sort()
        exact = all(_is_exact(digests, indices[0], x) for x in indices[1:])
        groups.append(DuplicateGroup(tuple(images[x] for x in indices), exact,
                                     round(lowest.get(r, 1.0), 6)))
    groups.sort(key=lambda g: (not g.cross_split, not g.exact, -len(g.images),
                               g.images[0].path))
    return groups


# --- the check at fit time ------------------------------------------------------------


STORED_PAIRS = 200  # pairs kept in the remembered result (cross-split first)


def cached_duplicates(cache: FeatureCache, threshold: float | None = None) -> dict:
    """The near duplicates of a cache from its features alone (no image read but the
    files of near pairs, hashed to tell identical files), as the dict of
    `Duplicates.to_dict()` with at most `STORED_PAIRS` pairs and no groups.

    The result is remembered next to the cache in `<cache>.duplicates.json`, keyed by the
    cache file's size and modification time and the threshold (`CALIBRATED` for the
    threshold set from the cache, None), so the check `probe fit` makes and the report's
    section cost a file read after the first time.
    """
    sidecar = cache.path.with_name(cache.path.name + SIDECAR_SUFFIX)
    stat = cache.path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
           "threshold": CALIBRATED if threshold is None else float(threshold)}
    try:
        stored = json.loads(sidecar.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return stored["result"]
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    found = find_duplicates(cache, threshold, hash_all_files=False).to_dict()
    found["pairs"] = found["pairs"][:STORED_PAIRS]
    found["groups"] = []
    try:
        files.write_text(sidecar, json.dumps({"key": key, "result": found}))
    except OSError:  # a read-only cache directory: the check simply runs again next time
        pass
    return found


def leakage_warning(cache: FeatureCache, threshold: float | None = None) -> str | None:
    """The one-line warning of `probe fit` when the cache has cross-split duplicates: how
    many pairs cross splits, and between which (e.g. "2 train-test, 1 train-val")."""
    found = cached_duplicates(cache, threshold)
    counts = found["counts"]
    if not counts.get("cross_split_pairs"):
        return None
    where = ", ".join(f"{v} {k}" for k, v in counts.items() if "-" in k)
    level = found.get("threshold")
    at = f" at cosine >= {level:.4f}" if isinstance(level, (int, float)) else ""
    return (f"warning: {counts['cross_split_pairs']} near-duplicate image pairs cross splits "
            f"({where}){at}; scores may be inflated. See `probe duplicates {display(cache.path)}`")
