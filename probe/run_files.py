"""What probe trusts when it reads a run (or comparison) directory back.

Every directory `probe fit`, `probe finetune`, `probe compare` and `probe curve` write ends
with `manifest.json`, written last and atomically: the size and SHA-256 of every file the
directory held when probe finished writing it, by path relative to the directory, e.g.

    {"format": "probe-run-manifest", "version": 1, "kind": "run",
     "files": {"config.json": {"size": 1234, "sha256": "..."},
               "head/head.npz": {"size": 5678, "sha256": "..."}, ...}}

Outside the manifest: `report.html` (a page probe writes again whenever asked, and never reads
back), hidden files (the temporaries of atomic writes) and, in a comparison, its run
directories, which carry manifests of their own. Reading a directory back
(`verify_directory`) refuses, in one line naming the file, a listed file that is missing or
whose size or checksum differ, a file probe reads back that the manifest does not list (a
`model.keras` added to a fit run would turn it into a fine-tuned one), and a directory
without a manifest: written by an older probe, or with its manifest deleted; accepting
those would let anyone skip every check by deleting one file.

The second line of defence is `read_json`: config.json and metrics.json are checked key by
key against the types probe uses (`CONFIG_SHAPE`, `METRICS_SHAPE`) before any of it is used.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import heads
from .errors import RunError
from .files import display, file_sha256, write_text
from .task import Task

MANIFEST = "manifest.json"
FORMAT = "probe-run-manifest"
VERSION = 1
REPORT_FILE = "report.html"  # html.REPORT_FILE: rewritten by `probe report`, never read back
CHUNK = 1 << 20

# Files probe reads back, so that one not listed in the manifest is refused rather than
# ignored. Everything under a subdirectory of a run (head/) is read back too.
READ_BACK = {
    "run": {"config.json", "metrics.json", "model.keras", "test_predictions.csv",
            "confusion_matrix.png", "curves.png", "precision_recall.png", "reliability.png"},
    "comparison": {"compare.csv", "compare.png"},
    "curve": {"curve.csv", "curve.png"},
}


# --- the manifest -------------------------------------------------------------------------


def _covered(directory: Path, kind: str) -> list[str]:
    """The relative paths of the files the manifest of `directory` lists."""
    found = []
    for root, folders, files in os.walk(directory):
        here = Path(root)
        if here == directory and kind == "comparison":
            folders[:] = []  # its run directories carry their own manifests
        folders[:] = [f for f in folders if not f.startswith(".")]
        for name in files:
            relative = (here / name).relative_to(directory).as_posix()
            if name.startswith(".") or relative in (MANIFEST, REPORT_FILE):
                continue
            found.append(relative)
    return sorted(found)


def write_manifest(directory: str | os.PathLike, kind: str = "run") -> Path:
    """Write `manifest.json` (atomically) listing the size and SHA-256 of every file of
    `directory` but report.html and hidden temporaries; call it once the directory is
    complete. `kind` is "run", "comparison" or "curve"."""
    directory = Path(directory)
    files = {}
    for relative in _covered(directory, kind):
        path = directory / relative
        files[relative] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": FORMAT, "version": VERSION, "kind": kind, "files": files}
    return write_text(directory / MANIFEST, json.dumps(manifest, indent=2))


def verify_directory(directory: str | os.PathLike, kind: str = "run") -> None:
    """Raise `RunError` (one line naming the file) unless every file of the manifest of
    `directory` is there with its size and checksum, and every file probe reads back is
    listed."""
    directory = Path(directory)
    listed = _read_manifest(directory, kind)
    for relative, entry in listed.items():
        path = directory / relative
        try:
            size = path.stat().st_size
            matches = size == entry["size"] and file_sha256(path) == entry["sha256"]
        except FileNotFoundError:
            raise refused(directory, kind, relative, "is missing (deleted since probe wrote it)") from None
        except OSError as error:
            raise refused(directory, kind, relative,
                          f"can not be read ({error.strerror or error})") from None
        if not matches:
            raise refused(directory, kind, relative, "does not match its checksum (edited or "
                                                     "damaged since probe wrote it)")
    for relative in _covered(directory, kind):
        if relative not in listed and ("/" in relative or relative in READ_BACK.get(kind, ())):
            raise refused(directory, kind, relative,
                          f"is not in its {MANIFEST} (added since probe wrote the run)")


def _read_manifest(directory: Path, kind: str) -> dict[str, dict]:
    path = directory / MANIFEST
    if not path.is_file():
        raise RunError(
            f"{_what(kind)} '{display(directory)}' has no {MANIFEST}: it was written by an "
            "older probe or the file was deleted, so its files can not be checked against "
            f"what probe wrote; {refit_hint(directory, kind)}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(f"expected format {FORMAT!r} version {VERSION}")
        if not isinstance(files, dict):
            raise ValueError("'files' is not an object")
        for relative, entry in files.items():
            parts = Path(relative).parts
            if Path(relative).is_absolute() or ".." in parts or not parts:
                raise ValueError(f"the path {relative!r} is outside the directory")
            if not (isinstance(entry, dict) and type(entry.get("size")) is int
                    and isinstance(entry.get("sha256"), str)):
                raise ValueError(f"the entry of {relative!r} lacks a size or sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise refused(directory, kind, MANIFEST, f"is damaged ({_printable(str(error))})") from None
    return files


def refused(directory: Path, kind: str, relative: str, why: str) -> RunError:
    """The one-line refusal of a file of a run or comparison directory."""
    return RunError(f"{_what(kind)} file '{_printable(relative)}' of {_what(kind)} "
                    f"'{display(directory)}' {why}; {refit_hint(directory, kind)}")


def _what(kind: str) -> str:
    return "comparison" if kind == "comparison" else "run"


def refit_hint(directory: Path, kind: str = "run") -> str:
    """How to write the directory again, as a command that exists: `probe finetune SOURCE`
    for a fine-tuned run, `probe fit --cache CACHE --head HEAD` for a run (as far as its
    config.json still says; it is only text of a message here), `probe compare`."""
    if kind == "comparison":
        return "run `probe compare DATASET` again (with the same options) for a new one"
    if kind == "curve":
        return "run `probe curve` again for a new one"
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    config = config if isinstance(config, dict) else {}
    finetuned = config.get("finetune")
    source = finetuned.get("source_run") if isinstance(finetuned, dict) else None
    if _plain_text(source):
        return f"fine-tune it again with `probe finetune {shlex.quote(source)}`"
    command = ["probe", "fit"]
    if _plain_text(config.get("cache")):
        command += ["--cache", shlex.quote(config["cache"])]
    if _plain_text(config.get("head")):
        command += ["--head", shlex.quote(config["head"])]
    return f"fit it again with `{' '.join(command)}`"


def _plain_text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) < 1000 and value.isprintable()


def _printable(text: str) -> str:
    """Text of one line: control characters (a newline in a key) shown escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


# --- JSON of the expected shape -------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What a JSON value must be: `name` for messages ("a number"), `accepts` its test,
    `items` the shape of every element (list) or value (object), `keys` the shapes of the
    known keys of an object (others are not checked), `nullable` whether null is allowed."""

    name: str
    accepts: Callable[[Any], bool]
    items: "Shape | None" = None
    keys: dict[str, "Shape"] = field(default_factory=dict)
    nullable: bool = False

    def of(self, items: "Shape") -> "Shape":
        """This shape with every element or value of the given shape."""
        return Shape(self.name, self.accepts, items, self.keys, self.nullable)

    def with_keys(self, **keys: "Shape") -> "Shape":
        return Shape(self.name, self.accepts, self.items, keys, self.nullable)

    @property
    def or_null(self) -> "Shape":
        return Shape(self.name, self.accepts, self.items, self.keys, True)

    def check(self, value: Any, where: str = "") -> None:
        """Raise `ShapeMismatch` at the first value (depth first) that is not as expected."""
        if value is None and self.nullable:
            return
        if not self.accepts(value):
            raise ShapeMismatch(where, self.name + (" or null" if self.nullable else ""),
                                describe(value))
        if isinstance(value, list) and self.items is not None:
            for index, item in enumerate(value):
                self.items.check(item, f"{where}[{index}]")
        if isinstance(value, dict):
            for key, item in value.items():
                shape = self.keys.get(key, self.items)
                if shape is not None:
                    shape.check(item, f"{where}.{key}" if where else str(key))


class ShapeMismatch(ValueError):
    """A JSON value of the wrong type: where, what was expected, what was found."""

    def __init__(self, where: str, expected: str, received: str):
        super().__init__(f"expected {expected} at {_place(where)}, received {received}")


def _place(where: str) -> str:
    return f"'{_printable(where)}'" if where else "the top level"


def describe(value: Any) -> str:
    """The JSON type of a parsed value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


ANY = Shape("anything", lambda value: True)
NUMBER = Shape("a number", _is_number)
INTEGER = Shape("an integer", lambda value: isinstance(value, int) and not isinstance(value, bool))
STRING = Shape("a string", lambda value: isinstance(value, str))
BOOLEAN = Shape("true or false", lambda value: isinstance(value, bool))
LIST = Shape("a list", lambda value: isinstance(value, list))
OBJECT = Shape("an object", lambda value: isinstance(value, dict))
POSITIVE = Shape("a finite number > 0",
                 lambda value: _is_number(value) and math.isfinite(value) and value > 0)
INTERVAL = Shape("a [low, high] pair",
                 lambda value: isinstance(value, (list, dict)) and all(
                     _is_number(v) or v is None
                     for v in (value.values() if isinstance(value, dict) else value)))

SCORES = ("accuracy", "balanced_accuracy", "mean_average_precision", "micro_f1", "macro_f1",
          "exact_match_accuracy", "log_loss", "top5_accuracy", "expected_calibration_error",
          "expected_calibration_error_uncalibrated")

# The keys of config.json probe reads, with their types (a key may be absent; the required
# ones are checked by `runs.Run.load`).
CONFIG_SHAPE = OBJECT.with_keys(
    backbone=STRING, head=STRING, classes=LIST.of(STRING), image_size=INTEGER,
    cache=STRING.or_null, dataset_root=STRING.or_null, feature_key=STRING.or_null,
    source_fingerprint=STRING.or_null, weights=STRING.or_null, weights_source=STRING.or_null,
    weights_sha256=STRING.or_null, pooling=STRING.or_null, preprocessing=STRING.or_null,
    backbone_source=STRING, backbone_sha256=STRING, layers=LIST.of(STRING),
    hub_source=STRING, hub_sha256=STRING, blocks=INTEGER,
    feature_shape=LIST.of(INTEGER), splits=OBJECT.of(INTEGER), created=STRING.or_null,
    head_params=OBJECT.or_null, fit_seconds=NUMBER.or_null, multilabel=BOOLEAN,
    thresholds=OBJECT.of(NUMBER).or_null, views=OBJECT.or_null,
    finetune=OBJECT.with_keys(source_run=STRING),
    temperature=POSITIVE,  # applied to the head's probabilities (`probe.calibration`)
)

# The keys of metrics.json probe reads (the report, `probe finetune`'s before / after).
METRICS_SHAPE = OBJECT.with_keys(
    split=STRING, split_role=STRING.or_null, selected_on=STRING.or_null, n_samples=INTEGER,
    **{key: NUMBER.or_null for key in SCORES},
    **{f"{key}_ci": INTERVAL.or_null for key in SCORES},
    per_class=OBJECT.of(OBJECT.with_keys(precision=NUMBER.or_null, recall=NUMBER.or_null,
                                         f1=NUMBER.or_null, support=INTEGER.or_null)),
    confusion_matrix=LIST.of(LIST.of(INTEGER)),
    skipped_files=LIST.of(OBJECT.with_keys(path=STRING, reason=STRING)),
    fit_seconds=NUMBER.or_null, chosen=OBJECT, before=OBJECT, comparison=OBJECT.of(OBJECT),
    best_epoch=INTEGER, epochs_run=INTEGER, baseline_val_loss=NUMBER.or_null,
    kept_baseline=BOOLEAN, temperature=POSITIVE, temperature_note=STRING.or_null,
    temperature_from=STRING.or_null,
)


def read_json(directory: Path, name: str, shape: Shape, kind: str = "run") -> Any:
    """The parsed JSON file `name` of a run or comparison directory, checked against
    `shape`; anything else is a `RunError` naming the file and the key."""
    path = Path(directory) / name
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise refused(directory, kind, name, f"can not be read ({_printable(str(error))})") from None
    try:
        shape.check(value)
    except ShapeMismatch as mismatch:
        raise RunError(f"{_what(kind)} file '{name}' of {_what(kind)} '{display(directory)}': "
                       f"{mismatch}; {refit_hint(directory, kind)}") from None
    return value


# --- a run read back ------------------------------------------------------------------------

CONFIG = "config.json"
METRICS = "metrics.json"
RELIABILITY_FIGURE = "reliability.png"
HEAD_DIR = "head"
MODEL_FILE = "model.keras"


@dataclass
class Run:
    """A finished run: its directory, configuration and test metrics."""

    path: Path
    config: dict
    metrics: dict
    notes: list[str] = field(default_factory=list)  # things the user should be told

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Run":
        """Open a run directory written by `probe fit` or `probe finetune`, once its files
        match its manifest and its JSON files have the types probe reads (else `RunError`)."""
        directory = Path(path).expanduser()
        config_path = directory / CONFIG
        if not config_path.is_file():
            raise RunError(
                f"expected a run directory written by `probe fit` (with {CONFIG}); "
                f"{'it does not exist' if not directory.exists() else f'found no {CONFIG}'}. "
                f"Runs are under .probe/runs/. Received: run='{path}'"
            )
        verify_directory(directory)  # an edited, added or deleted file: refused
        config = read_json(directory, CONFIG, CONFIG_SHAPE)
        metrics = (read_json(directory, METRICS, METRICS_SHAPE)
                   if (directory / METRICS).is_file() else {})
        missing = [key for key in ("head", "backbone", "classes", "image_size") if key not in config]
        if missing:
            raise RunError(
                f"'{config_path}' is not a probe run configuration: it lacks {', '.join(missing)}; "
                f"re-run `probe fit`. Received: run='{path}'"
            )
        return cls(directory, config, metrics)

    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def is_finetuned(self) -> bool:
        return (self.path / MODEL_FILE).is_file()

    @property
    def task(self) -> Task:
        """Single- or multi-label, as config.json records it."""
        return Task.of_record(self.config)

    @property
    def thresholds(self) -> np.ndarray | None:
        """Multi-label: the decision threshold of each class (in class order), as chosen on
        validation and recorded in config.json; None for a single-label run."""
        return self.task.recorded_thresholds(self.config, self.classes, self.path / CONFIG)

    @property
    def temperature(self) -> float:
        """The temperature the run's probabilities are scaled by (`probe.calibration`;
        1.0 for a multi-label run and for runs written before temperatures existed)."""
        return float(self.config.get("temperature", 1.0))

    @classmethod
    def open(cls, run: "str | os.PathLike | Run") -> "Run":
        """`Run.load` of a path, or of the directory of a `Run` (read and verified again:
        its files may have changed since the object was made); the notes are kept."""
        if isinstance(run, Run):
            loaded = cls.load(run.path)
            loaded.notes = list(run.notes)
            return loaded
        return cls.load(run)

    def load_head(self) -> heads.Head:
        """The trained head (not for a fine-tuned run, whose head is inside its model),
        checked against the run's class names."""
        return heads.load_head(self.path / HEAD_DIR, classes=self.classes)
