"""Label-efficiency curves: how a score grows with the number of labelled images per
class, for several heads, from one feature cache: accuracy (and balanced accuracy) for a
single-label cache, mean average precision for a multi-label one.

For every shot count and repeat a seeded, stratified subset of the training split is
drawn: ``shots`` images per class (a class with fewer images contributes all it has, and
the records say so). Within one repeat the subsets are nested: each class's images are
put in one seeded random order and the n-shot subset is the first n of it, so the 5-shot
subset contains the 1-shot one. Every head gets the same subset.

Multi-label: an image counts for its rarest class (its stratum, as the dataset's splits
are stratified; images without a class form one more stratum), and the subsets hold
``shots`` images of each stratum. A class that the 1-shot subset leaves without a positive
(or a negative) image gets the first one of its seeded order in every subset of the
repeat, so that every class's one-vs-rest model has both and the subsets stay nested.

Model selection uses no labels outside the budget (never the cache's validation split):

* when every class of the subset has at least ``SELECTION_MIN_PER_CLASS`` images, a
  seeded stratified quarter of the subset (at least one image per class) is held out as
  the head's validation data, which chooses C, k and T, or the epoch; the head is then
  refit on the whole subset;
* below that (e.g. 1 or 2 shots) a fixed protocol applies: each head's settings without
  validation data (logistic C = 1; k-NN k = 20 clipped to the subset, T = 0.07; dense head
  all its epochs).

Evaluation is on the full reporting split: test when the cache has one, else val (which
the curve never uses for selection; the records say which).

Every curve records its chance level on that split, what the score is without learning
(accuracy: the share of the most frequent class; balanced accuracy: 1 / classes; mean
average precision: its expectation under a random ranking, about each class's positive
rate): `<score>_chance` in the records and `curve.csv`, and a labelled line on the figure,
whose y axis runs from 0 to 1 so that noise can not look like a learning curve.
"""

from __future__ import annotations

import csv
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import files, heads as heads_mod, report, run_files
from .features.cache import FeatureCache, Split
from .errors import CacheError, ProbeError
from .progress import CurveFinished, CurveNote, CurveStarted, ProgressCallback, SubsetFitted, emit
from .settings import parse_names
from .task import SINGLE_LABEL, Task

DEFAULT_SHOTS = (1, 2, 5, 10, 25, "all")
DEFAULT_HEADS = ("logreg", "knn")
SELECTION_MIN_PER_CLASS = 4
HOLDOUT_FRACTION = 0.25
MAX_SHOTS = 1_000_000
MAX_REPEATS = 1000
MAX_WORKERS = 4
SCORE_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
               "mean_average_precision": "mean average precision"}
CHANCE_MEANING = {"accuracy": "most frequent class", "balanced_accuracy": "1 / classes",
                  "mean_average_precision": "random ranking"}


def csv_columns(task: Task) -> tuple[str, ...]:
    """The columns of curve.csv for a task: its scores, then their chance levels."""
    return ("head", "shots", "repeat", "n_train", "short_classes", *task.curve_scores,
            *(f"{score}_chance" for score in task.curve_scores),
            "selection", "chosen", "split", "split_role")


CSV_COLUMNS = csv_columns(SINGLE_LABEL)


@dataclass
class Curve:
    """The records of a curve (one per head, shot count and repeat), their summary (mean
    and standard deviation per head and shot count) and the run directory."""

    path: Path | None
    records: list[dict]
    summary: list[dict]
    split: str
    notes: list[str] = field(default_factory=list)
    seconds: float | None = None  # the time the fits and scores took
    task: Task = SINGLE_LABEL

    @property
    def score(self) -> str:
        """The record key the figure plots: "accuracy" or "mean_average_precision"."""
        return self.task.curve_scores[0]

    @property
    def chance(self) -> dict[str, float]:
        """Each score's chance level on the evaluated split (the first row's: a curve, and
        a comparison's curves, are scored on one split)."""
        first = self.summary[0] if self.summary else {}
        return {score: first[f"{score}_chance"] for score in self.task.curve_scores
                if f"{score}_chance" in first}


def parse_shots(shots: str | Iterable[Any] | None) -> list[int | str]:
    """Shot counts from "1,5,all" or a list; increasing, "all" last."""
    if shots is None:
        shots = DEFAULT_SHOTS
    items = [s.strip() for s in shots.split(",")] if isinstance(shots, str) else list(shots)
    parsed: list[int | str] = []
    for item in items:
        if isinstance(item, str) and item.lower() == "all":
            parsed.append("all")
            continue
        try:
            value = int(item)
            if str(item).strip() not in (str(value), f"{value}.0") and not isinstance(item, (int, np.integer)):
                raise ValueError(item)
        except (TypeError, ValueError):
            value = 0
        if not 1 <= value <= MAX_SHOTS:
            raise ProbeError(f"each shot count must be an integer from 1 to {MAX_SHOTS:,} or 'all', e.g. "
                             f"--shots 1,5,10,all. Received: shots={shots!r}")
        parsed.append(value)
    if not parsed:
        raise ProbeError(f"expected at least one shot count, e.g. --shots 1,5,all. Received: shots={shots!r}")
    numbers = sorted({s for s in parsed if s != "all"})
    return [*numbers, *(["all"] if "all" in parsed else [])]


def nested_orders(strata: np.ndarray, repeats: int, seed: int) -> list[dict[int, np.ndarray]]:
    """Per repeat, each stratum's (class's) training indices in one seeded random order."""
    strata = np.asarray(strata)
    return [{int(c): np.random.default_rng([seed, repeat, int(c)]).permutation(np.flatnonzero(strata == c))
             for c in np.unique(strata)} for repeat in range(repeats)]


def subset(order: dict[int, np.ndarray], shots: int | str,
           always: np.ndarray | None = None) -> np.ndarray:
    """The first `shots` indices of every stratum's order (all of them for "all"), and the
    indices `always` (see `anchors`), sorted."""
    parts = [indices if shots == "all" else indices[:shots] for indices in order.values()]
    extra = np.zeros(0, dtype=np.int64) if always is None else np.asarray(always, dtype=np.int64)
    return np.union1d(np.concatenate(parts).astype(np.int64), extra)


def anchors(members: np.ndarray, order: dict[int, np.ndarray], seed: list[int]) -> np.ndarray:
    """The indices every subset of a repeat adds so that each class has a positive and a
    negative image: for a class the 1-shot subset leaves without one (a multi-label class
    whose images all carry a rarer class, or one on every image), the first image of the
    missing kind in a seeded order. `members` is the (N, K) bool class matrix of the
    training split. Empty for a single-label split, whose strata are its classes; fixed
    per repeat, so the subsets stay nested."""
    chosen = subset(order, 1)
    added: list[int] = []
    for k in range(members.shape[1]):
        for wanted in (True, False):
            column = members[:, k]
            if (column[np.union1d(chosen, added).astype(np.int64)] == wanted).any():
                continue
            candidates = np.flatnonzero(column == wanted)
            if candidates.size:  # else the class can not be learnt at all: the head says so
                added.append(int(np.random.default_rng([*seed, k, int(wanted)]).choice(candidates)))
    return np.array(sorted(set(added)), dtype=np.int64)


def selection_split(strata: np.ndarray, seed: int,
                    members: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Positions (into `strata`: a subset's classes or strata) of the fitting part and the
    held-out quarter, stratified; None (the fixed protocol) when a stratum has fewer than
    SELECTION_MIN_PER_CLASS images, or when the fitting part would leave a class of
    `members` (the subset's (N, K) class matrix) without the positive or the negative
    images the subset has."""
    strata = np.asarray(strata)
    values, counts = np.unique(strata, return_counts=True)
    if counts.min() < SELECTION_MIN_PER_CLASS:
        return None
    rng = np.random.default_rng([seed, 1])
    held = []
    for c in values:
        group = rng.permutation(np.flatnonzero(strata == c))
        held.append(group[: max(1, int(round(HOLDOUT_FRACTION * group.size)))])
    held_out = np.sort(np.concatenate(held))
    fit_part = np.setdiff1d(np.arange(strata.size), held_out)
    if members is not None:  # the fitting part must keep both kinds the subset has
        part = members[fit_part]
        if (part.any(axis=0) != members.any(axis=0)).any() or (part.all(axis=0) != members.all(axis=0)).any():
            return None
    return fit_part, held_out


def _fit_one(name: str, params: dict, X: np.ndarray, y: np.ndarray, classes: list[str],
             seed: int, task: Task) -> tuple[Any, str]:
    """A head fitted on one subset, with settings chosen inside it (or the fixed protocol)."""
    head = heads_mod.make_head(name, **{"seed": seed, **params, "refit": True})
    split = selection_split(task.curve_strata(y), seed, task.class_matrix(y, len(classes)))
    if split is None:
        return head.fit(X, y, classes=classes), "fixed"
    fit_part, held_out = split
    head.fit(X[fit_part], y[fit_part], X_val=X[held_out], y_val=y[held_out], classes=classes)
    return head, "held-out quarter"


def _records_for(shots, repeat, subset_index, train, evaluated, names, params, classes, seed,
                 split_role, chance) -> list[dict]:
    task = Task.of_labels(train.labels)
    X, y = train.features[subset_index], train.labels[subset_index]
    counts = np.bincount(task.curve_strata(train.labels), minlength=len(classes))[:len(classes)]
    short = 0 if shots == "all" else int(np.sum((counts > 0) & (counts < shots)))
    records = []
    for name in names:
        head, selection = _fit_one(name, params.get(name, {}), X, y, classes, seed + repeat, task)
        scores = task.curve_score_values(head, evaluated.features, evaluated.labels, evaluated.ignore)
        records.append({
            "head": name, "shots": shots, "repeat": repeat, "n_train": int(y.shape[0]),
            "short_classes": short, **scores,
            **{f"{score}_chance": chance[score] for score in task.curve_scores},
            "selection": selection, "chosen": head.summary_(), "split": evaluated.name,
            "split_role": split_role,
        })
    return records


def summarise(records: list[dict]) -> list[dict]:
    """Mean and standard deviation over repeats, per head and shot count (and backbone,
    when the records name one: a comparison's curves), with the chance levels."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record.get("backbone"), record["head"], record["shots"]), []).append(record)
    rows = []
    for (backbone, name, shots), group in groups.items():
        row = {**({"backbone": backbone} if backbone is not None else {}),
               "head": name, "shots": shots, "repeats": len(group),
               "n_train": int(np.mean([r["n_train"] for r in group]))}
        for key in (key for key in SCORE_NAMES if key in group[0]):
            values = np.array([r[key] for r in group])
            row.update({key: float(values.mean()), f"{key}_std": float(values.std()),
                        f"{key}_chance": group[0].get(f"{key}_chance")})
        rows.append({**row, "short_classes": group[0]["short_classes"]})
    return rows


def curve_records(train: Split, evaluated: Split, classes: list[str], shots: list[int | str],
                  repeats: int, names: list[str], *, seed: int = 0,
                  head_params: dict[str, dict[str, Any]] | None = None, split_role: str = "test",
                  progress: ProgressCallback | None = None) -> list[dict]:
    """Fit every head on every subset of `train` and score it on `evaluated` (see the
    module docstring); one record per head, shot count and repeat."""
    task = Task.of_labels(train.labels)
    orders = nested_orders(task.curve_strata(train.labels), repeats, seed)
    members = task.class_matrix(train.labels, len(classes))
    always = [anchors(members, order, [seed, repeat]) for repeat, order in enumerate(orders)]
    chance = task.chance_levels(evaluated.labels, evaluated.ignore)
    jobs = [(repeat, shots_value) for repeat in range(repeats) for shots_value in shots]
    emit(progress, CurveStarted(total=len(jobs), heads=tuple(names)))

    def run(job: tuple[int, int | str]) -> list[dict]:
        repeat, shots_value = job
        return _records_for(shots_value, repeat, subset(orders[repeat], shots_value, always[repeat]),
                            train, evaluated, names, head_params or {}, classes, seed, split_role,
                            chance)

    records: list[dict] = []
    # The subsets are independent and the heads' work is NumPy and BLAS calls that release
    # the interpreter lock: a few threads keep every core busy. Each BLAS call runs on one
    # thread (many small products: spinning BLAS threads cost more than they give), and the
    # warnings filter is set here once: it is process-wide, not per thread.
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"), \
            ThreadPoolExecutor(max_workers=curve_workers()) as pool:
        warnings.simplefilter("ignore")
        # the largest subsets first, so that no thread is left with a long one at the end
        futures = {job: pool.submit(run, job) for job in sorted(jobs, key=_task_cost, reverse=True)}
        for done, job in enumerate(jobs, 1):
            records += futures[job].result()
            emit(progress, SubsetFitted(done=done, total=len(jobs), shots=job[1], repeat=job[0]))
    return records


def curve_workers() -> int:
    """Threads for the subsets: the cores this process may use, at most MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def _task_cost(task: tuple[int, int | str]) -> float:
    return float("inf") if task[1] == "all" else float(task[1])


def curve(
    cache: str | os.PathLike | FeatureCache | None = None,
    shots: str | Iterable[Any] | None = None,
    repeats: int = 5,
    heads: str | Iterable[str] | None = None,
    *,
    seed: int = 0,
    head_params: dict[str, dict[str, Any]] | None = None,
    backbone: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    runs_dir: str | os.PathLike | None = None,
    write: bool = True,
    progress: ProgressCallback | None = None,
) -> Curve:
    """A score against labelled images per class, for each head, on one feature cache:
    accuracy for a single-label cache, mean average precision for a multi-label one.

    `shots` ("1,2,5,10,25,all" or a list), `repeats` seeded subsets per shot count and
    `heads` ("logreg,knn" or a list of `probe.list_heads()` names). See the module
    docstring for the subsets, the selection protocol and the chance level. Writes
    `curve.csv` and `curve.png` in a run directory (`write=False`: nothing written) and
    returns a `Curve`.

    >>> result = probe.curve(shots="1,5,all", repeats=3, heads="logreg,knn")
    >>> result.summary[0]["accuracy"], result.path
    """
    from .runs import new_run_dir, resolve_cache

    shot_counts, names, repeats, params = check_settings(shots, repeats, heads, seed, head_params)
    chosen, note = resolve_cache(cache, backbone, cache_dir)
    result = cache_curve(chosen, shot_counts, repeats, names, seed=seed, head_params=params,
                         progress=progress)
    if note:
        result.notes.insert(0, note)
        emit(progress, CurveNote(message=note))
    if write:
        result.path = new_run_dir(runs_dir or (chosen.path.parent / "runs"), chosen.backbone, "curve")
        write_curve_csv(result.path / "curve.csv", result.records, csv_columns(result.task))
        plot_curve(result, result.path / "curve.png", len(chosen.classes),
                   title=f"{chosen.backbone}: {SCORE_NAMES[result.score]} on {result.split}")
        run_files.write_manifest(result.path, "curve")
    emit(progress, CurveFinished(seconds=result.seconds, path=result.path))
    return result


def check_settings(shots, repeats, heads, seed, head_params) -> tuple[list, list[str], int, dict]:
    """Shot counts, head names, repeats and head parameters, refused before any work when
    wrong (an unknown head or parameter, a shot count or repeats out of range)."""

    shot_counts = parse_shots(shots)
    names = parse_names(heads, DEFAULT_HEADS)
    unknown = [n for n in names if n not in heads_mod.list_heads()]
    if unknown or not names:
        raise ProbeError(f"unknown head: expected one of: {', '.join(heads_mod.list_heads())}. "
                         f"Received: heads={heads!r}")
    if not (isinstance(repeats, (int, np.integer)) and 1 <= repeats <= MAX_REPEATS):
        raise ProbeError(f"`repeats` must be an integer from 1 to {MAX_REPEATS}. Received: repeats={repeats!r}")
    params = dict(head_params or {})
    for name in names:
        heads_mod.make_head(name, **{"seed": seed, **params.get(name, {})})._check_params()
    return shot_counts, names, int(repeats), params


def cache_curve(cache: FeatureCache, shot_counts: list[int | str], repeats: int, names: list[str], *,
                seed: int = 0, head_params: dict[str, dict[str, Any]] | None = None,
                progress: ProgressCallback | None = None) -> Curve:
    """The curve of one cache (checked settings, see `check_settings`), scored on its test
    split, else its validation split (said in the notes); nothing written."""
    task = Task.of_flag(cache.multilabel)
    reporting = "test" if cache.counts.get("test") else ("val" if cache.counts.get("val") else None)
    if reporting is None:
        raise CacheError(f"expected a test or validation split to evaluate on; cache '{cache.path}' has "
                         "only train. Extract with --test-fraction > 0 or add a test/ folder.")
    split_role = "test" if reporting == "test" else "validation (not used for selection by the curve)"
    notes = []
    if reporting == "val":
        notes.append("no test split: the curve is scored on the validation split, which it never "
                     "uses for selection")
    train, evaluated = cache.split("train"), cache.split(reporting)
    started = time.perf_counter()
    records = curve_records(train, evaluated, cache.classes, shot_counts, repeats, names,
                            seed=int(seed), head_params=head_params or {}, split_role=split_role,
                            progress=progress)
    result = Curve(None, records, summarise(records), reporting, notes, task=task)
    result.seconds = round(time.perf_counter() - started, 3)
    for note_text in notes:
        emit(progress, CurveNote(message=note_text))
    return result


def write_comparison_curves(directory: Path, curves: dict[str, Curve], n_classes: int) -> Curve:
    """The curves of several backbones as one: `curve.csv` (a `backbone` column first) and
    `curve.png` (one line per backbone and head) in `directory`."""
    records = [{"backbone": backbone, **record} for backbone, one in curves.items()
               for record in one.records]
    splits = sorted({one.split for one in curves.values()})
    notes = list(dict.fromkeys(note for one in curves.values() for note in one.notes))
    task = next(iter(curves.values())).task if curves else SINGLE_LABEL
    result = Curve(directory, records, summarise(records), "/".join(splits) or "test", notes,
                   task=task)
    write_curve_csv(directory / "curve.csv", records, ("backbone", *csv_columns(task)))
    plot_curve(result, directory / "curve.png", n_classes,
               title=f"Backbones: {SCORE_NAMES[result.score]} on {result.split}")
    return result


def write_curve_csv(path: Path, records: list[dict], columns: tuple[str, ...] = CSV_COLUMNS) -> None:
    """One row per head, shot count and repeat (and backbone); `chosen` as JSON."""
    with files.atomic_write(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for record in records:
            writer.writerow([json.dumps(record[c], sort_keys=True) if c == "chosen" else record[c]
                             for c in columns])


def curve_figure(result: Curve, n_classes: int, title: str = ""):
    """The figure of a curve (a matplotlib `Figure`, not saved): the plotted score's mean ±
    standard deviation against images per class on a log axis, one line per head (per
    backbone and head for a comparison's curves); the chance level as a dashed line
    labelled "chance ..." (`gid` "chance"); a y axis from 0 to 1 at least; ticks at the
    shot counts with plain labels, "all" at the mean training images per class, labelled
    "all (N)"."""
    score = result.score
    fig = report._new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    low, high, ticks = 0.0, 1.0, {}
    for name in dict.fromkeys(_line_name(r) for r in result.summary):
        rows = [r for r in result.summary if _line_name(r) == name]
        xs = [_x_position(r, n_classes) for r in rows]
        means = np.array([r[score] for r in rows])
        stds = np.array([r[f"{score}_std"] for r in rows])
        ax.plot(xs, means, marker="o", label=name)
        ax.fill_between(xs, means - stds, means + stds, alpha=0.2)
        low, high = min(low, float(np.min(means - stds))), max(high, float(np.max(means + stds)))
        ticks.update({x: _tick_label(r, x) for x, r in zip(xs, rows)})
    chance = result.chance.get(score)
    if chance is not None:
        ax.axhline(chance, linestyle="--", color="0.35", linewidth=1.2, gid="chance",
                   label=f"chance {chance:.2f} ({CHANCE_MEANING[score]})")
    ax.set_ylim(low - 0.02, high + 0.02)  # never zoomed onto noise: 0 to 1 at least
    ax.set_xscale("log")
    _plain_ticks(ax, ticks)
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel(f"{SCORE_NAMES[score]} on {result.split}" + (" (validation)" if result.split == "val" else ""))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title="backbone + head" if any("backbone" in r for r in result.summary) else "head",
              fontsize=8)
    return fig


def plot_curve(result: Curve, path: Path, n_classes: int, title: str = "") -> Path:
    """Write `curve_figure` as a PNG."""
    return report._save(curve_figure(result, n_classes, title), path)


def _x_position(row: dict, n_classes: int) -> float:
    """A summary row's place on the x axis: its shot count; "all": the mean number of
    training images per class."""
    return float(row["shots"]) if row["shots"] != "all" else row["n_train"] / max(1, n_classes)


def _tick_label(row: dict, x: float) -> str:
    return str(row["shots"]) if row["shots"] != "all" else f"all ({x:.0f})"


def _plain_ticks(ax, ticks: dict[float, str]) -> None:
    """Ticks at the given positions with the given labels and no minor ticks: a log axis
    would otherwise label 2 and 3 as "2x10^0" and "3x10^0". Where "all" falls on a shot
    count (every class short of it), the two share one tick."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    merged: dict[float, list[str]] = {}
    for x in sorted(ticks):
        near = next((p for p in merged if abs(np.log(x / p)) < 0.05), None) if x > 0 else None
        merged.setdefault(near if near is not None else x, []).append(ticks[x])
    positions = list(merged)
    ax.xaxis.set_major_locator(FixedLocator(positions))
    ax.xaxis.set_major_formatter(FixedFormatter([" / ".join(merged[p]) for p in positions]))
    ax.xaxis.set_minor_locator(NullLocator())


def _line_name(row: dict) -> str:
    return f"{row['backbone']} + {row['head']}" if "backbone" in row else row["head"]
