"""The command line: a thin click layer over the Python API. Library errors become one
line on stderr and exit code 1."""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import os
import signal
import sys
import threading

import click

from . import backbones, files, heads as heads_mod, model_backbones, quiet, settings
from .features import cache as cache_mod, store
from .compare import compare, headline as compare_headline, score_note
from .demo import DEMO_BACKBONES, DEMO_IMAGE_SIZE, DEMO_PER_CLASS, run_demo
from .features.engines.ray import RayOptions
from .duplicates import find_duplicates
from .errors import ProbeError
from .features.extract import extract_with_report
from .finetune import comparison_rows, finetune
from .html import write_report
from .inference import export, predict
from .features.extract import ExtractionStatus
from .progress import (Advanced, BackboneExtracted, BatchDone, Bf16Available, CurveFailed,
                       DemoDataset, EpochDone, Estimate, Event, ExtractionFailed,
                       ExtractionStarted, FinetuneStarted, Finished, HeadFitted, NextBackbone,
                       NoImprovement, Note, OfflineWeights, SourceChanged, Stage,
                       ValidationScores, ViewsStarted)
from .report import format_interval, format_table
from .runs import Run, fit, score_label, summary_columns, summary_rows
from .task import Task
from .terminal import terminal_text
from .curve import CHANCE_MEANING, SCORE_NAMES, curve

# A seed any part of probe accepts (NumPy's and Keras' seeds are 32-bit).
SEED = click.IntRange(0, settings.MAX_SEED)


def _echo(message: object = "", err: bool = False, lines: bool = False) -> None:
    """Print a message whose text may come from files (paths, class names, a cache's or a
    run's stored values): control characters and escape sequences are shown escaped
    (`terminal_text`), newlines too unless `lines` (a table or a block probe laid out)."""
    click.echo(terminal_text(message, newlines=lines), err=err)


def _fail_cleanly(command):
    """Turn a ProbeError into `Error: <message>` and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ProbeError as error:
            # errors name paths, class names and values read from files
            raise click.ClickException(terminal_text(str(error))) from None
        except KeyboardInterrupt:
            _echo("\nInterrupted; finished batches are kept and the next run resumes.",
                  err=True, lines=True)
            sys.exit(130)

    return wrapper


class _OneLineUsageError(click.UsageError):
    """A usage error shown as one line: the error, then where the help is."""

    def show(self, file=None) -> None:
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        _echo(f"Error: {self.format_message()}{hint}", err=True)


class _Group(click.Group):
    """A command group whose usage errors (a bad option value, a missing argument) are
    one line on stderr with exit code 2, like every other error, instead of click's
    usage block."""

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def _one_line_usage_errors():
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # `probe` alone prints the help, as it should
    except _OneLineUsageError:
        raise
    except click.UsageError as error:
        raise _OneLineUsageError(error.format_message(), error.ctx) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="probe")
@click.option("--verbose", "-v", is_flag=True, envvar=quiet.VERBOSE_VARIABLE,
              help="Also show TensorFlow's, Keras', OpenVINO's and Ray's own warnings and "
                   "log lines (hidden by default).")
def main(verbose: bool) -> None:
    """probe: transfer learning on small image datasets.

    Frozen ImageNet backbones read the images once into an HDF5 feature cache; heads
    then train on the cached features in seconds.

    Example: probe extract --backbone vgg16 cats_vs_dogs/
    """
    # before any command imports TensorFlow, Keras, OpenVINO or Ray
    quiet.quiet_process(verbose)
    _skip_exit_collection()


@functools.cache
def _skip_exit_collection() -> None:
    """At exit, freeze what is left so that the interpreter's last garbage collections
    skip it: they walked every object of scikit-learn, SciPy and matplotlib, 0.4 s of a
    2-core machine after each `probe fit` (the files are written and closed by then)."""
    atexit.register(gc.freeze)


def _table(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text table; each cell on one line, its control characters escaped."""
    header = [terminal_text(name) for name in header]
    rows = [[terminal_text(cell) if isinstance(cell, str) else cell for cell in row] for row in rows]
    return format_table([dict(zip(header, row)) for row in rows], header)


@main.command("backbones")
@click.argument("name", required=False)
@click.option("--layers", "show_layers", is_flag=True,
              help="List NAME's layers that --layer can read, with their output shapes.")
@click.option("--image-size", type=int, default=None,
              help="Input size the shapes are shown at [default: the backbone's own].")
@_fail_cleanly
def backbones_command(name, show_layers, image_size) -> None:
    """List the registered backbones, or with NAME --layers the layers of one (a registry
    name or a .keras model file).

    Example: probe backbones vgg16 --layers
    """
    if name is not None or show_layers:
        if name is None or not show_layers:
            raise click.UsageError("use `probe backbones NAME --layers` (or no arguments)")
        spec = settings.backbone_spec(name)
        rows = [[layer, "x".join(str(d) for d in shape)]
                for layer, shape in model_backbones.candidate_layers(spec, image_size)]
        _echo(_table(rows, ["layer", "output shape"]), lines=True)
        return
    rows = []
    for name in backbones.list_backbones():
        spec = backbones.get(name)
        # "in model": the model's first layers preprocess the pixels (mode "none")
        where = "in model" if spec.preprocessed_in == "model" else "input"
        rows.append([name, str(spec.native_size), str(spec.min_size), str(spec.feature_size),
                     spec.preprocessing, where, str(len(spec.top_blocks))])
    _echo(_table(rows, ["backbone", "native size", "min size", "features", "preprocessing",
                        "preprocessed", "blocks"]), lines=True)


def _apply(*decorators):
    """One decorator applying several, in the order listed (the first is the first option
    in --help)."""

    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


# Option groups are plain tuples of click decorators, composed by concatenation.
DATASET_OPTIONS = (
    click.option("--labels", "labels", multiple=True, metavar="[SPLIT=]FILE",
                 help="CSV path,label[,split] or a 'name label' list with 1/-1/0 labels; "
                      "SPLIT=FILE (train, val, test, trainval) gives one file per split "
                      "(repeat the option). Multi-label: a CSV path,labels[,split] with "
                      "';'-separated classes, or a VOC ImageSets/Main directory."),
    click.option("--val-fraction", type=float, default=settings.VAL_FRACTION,
                 show_default=True, help="Validation share when the dataset has no split folders; also "
                                    "carved from train when no val split is given (0: none)."),
    click.option("--test-fraction", type=float, default=settings.TEST_FRACTION,
                 show_default=True, help="Test share when the dataset has no split folders."),
    click.option("--seed", type=SEED, default=settings.DEFAULT_SEED, show_default=True,
                 help="Seed of the split, of random weights and of the heads."),
)
BACKBONE_OPTION = click.option("--backbone", "-b", default="vgg16", show_default=True,
                               help="Backbone name (see `probe backbones`), a .keras model file, "
                                    "hub:PRESET (KerasHub) or a KerasHub preset directory.")
LAYER_OPTIONS = (
    click.option("--layer", default=None, metavar="NAME[,NAME]",
                 help="Read these layers (pooled, concatenated) instead of the backbone's "
                      "output; see `probe backbones NAME --layers` [default: the output; a "
                      ".keras file: the input of its last Dense layer]."),
    click.option("--preprocess", type=click.Choice(sorted(backbones.PREPROCESSING)),
                 default=None, help="A .keras file: what its pixels need [default: none, the "
                                    "model preprocesses them itself]."),
    click.option("--blocks", type=click.IntRange(0, 64), default=0,
                 help="A KerasHub transformer: concatenate the pooled tokens of its last N "
                      "blocks (DINOv2's linear evaluation uses 4) [default: 0, its output]."),
)
CACHE_DIR_OPTION = click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                                envvar="PROBE_CACHE_DIR", help="Cache directory [default: ./.probe].")
RUNS_DIR_OPTION = click.option("--runs-dir", type=click.Path(file_okay=False), default=None,
                               help="Where run directories go [default: <cache dir>/runs].")
IMAGE_SIZE_OPTION = click.option(
    "--image-size", type=int, default=None,
    help=f"Input size in pixels, at most {backbones.MAX_IMAGE_SIZE} "
         "[default: the backbone's native size].")
COMPARE_IMAGE_SIZE_OPTION = click.option(
    "--image-size", default=None,
    help="Pixels, 'auto' (each backbone's minimum) or 'auto:N' (N, raised to each "
         "backbone's minimum) [default: each backbone's native size].")


def EXTRACTION_OPTIONS_FOR(image_size=IMAGE_SIZE_OPTION) -> tuple:
    """The options that define the features; compare takes its own --image-size."""
    return (
        click.option("--weights", default="imagenet", show_default=True,
                     help="'imagenet' (downloaded once), 'none' (random) or a weights file."),
        image_size,
        click.option("--pooling", type=click.Choice((*backbones.POOLINGS,
                                                    *backbones.TOKEN_POOLINGS)),
                     default="avg", show_default=True,
                     help="'none' keeps the spatial feature map. Transformer tokens (KerasHub): "
                          "cls, mean (of the patch tokens; avg means mean) or cls+mean."),
        click.option("--batch-size", type=int, default=settings.DEFAULT_BATCH_SIZE,
                     show_default=True, help=f"Images per batch (1 to {settings.MAX_BATCH_SIZE})."),
        CACHE_DIR_OPTION,
    )


EXTRACTION_OPTIONS = EXTRACTION_OPTIONS_FOR()


ENGINE_OPTIONS = (
    click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
                 show_default=True,
                 help="'ray': run the backbone on a Ray cluster (pip install 'probe[ray]')."),
    click.option("--ray-address", default=None,
                 help="ray: the cluster to join ('auto' after `ray start --head`) "
                      "[default: a local Ray on this machine]."),
    click.option("--workers", type=click.IntRange(1, 4096), default=1, show_default=True,
                 help="ray: actors, each holding one backbone."),
    click.option("--gpus-per-worker", type=click.FloatRange(0), default=0.0, show_default=True,
                 help="ray: GPUs per actor (1: one actor per GPU)."),
    click.option("--shard-size", type=click.IntRange(1), default=256, show_default=True,
                 help="ray: images per shard (one part file each)."),
    click.option("--runtime", type=click.Choice(["auto", "tensorflow", "openvino"]),
                 default="auto", show_default=True,
                 help="What runs the backbone locally. openvino: faster on the CPU, the same "
                      "features; auto: openvino where installed, on a machine without a "
                      "GPU, for float32 and for bf16 where it is the faster."),
)


AUGMENT_OPTIONS = (
    click.option("--augment", type=click.IntRange(0, 256), default=0, show_default=True,
                 help="Also extract this many augmented views of every training image "
                      "(val and test stay clean); heads then train on them."),
    click.option("--augment-policy", type=click.Choice(["light", "default", "strong"]),
                 default="default", show_default=True,
                 help="Ranges of the views' crop, flip, rotation and colour jitter (docs/augmentation.md)."),
)


def _say(message: str) -> None:
    _echo(message, err=True)


# The advice of a float32 extraction on a CPU that computes bfloat16 (Bf16Available). The
# speed-up is OpenVINO's bf16 (or TensorFlow's mixed_bfloat16 for vgg16) over float32 on an
# Intel Xeon with AMX: 3.7-7.7x over TensorFlow float32, about 2.5-6x over OpenVINO float32.
BF16_ADVICE = ("This CPU computes bfloat16: --precision bf16 is usually 2.5-6x faster "
               "(features differ by about 0.5%, in a cache of their own)")


class _Progress:
    """Renders the events of extractions on stderr: what a run is about to do, a progress
    bar with images/s and ETA (on a terminal, without --quiet), and demo notes."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.last = 0
        self.advised = False  # the bf16 advice is said once per run, not per backbone

    def __call__(self, event: Event) -> None:
        if isinstance(event, ExtractionStarted):
            self.start(event)
        elif isinstance(event, ViewsStarted):
            self._views(event)
        elif isinstance(event, Advanced) and event.stage in (Stage.EXTRACT, Stage.VIEWS):
            self.update(event)
        elif isinstance(event, Finished) and event.stage in (Stage.EXTRACT, Stage.VIEWS):
            self.close()
        elif isinstance(event, DemoDataset):
            _say(f"Digits dataset: {event.path} ({event.classes} classes, {event.per_class} "
                 "images each)")
        elif isinstance(event, OfflineWeights):
            _say(event.message)
        elif isinstance(event, Bf16Available) and not (self.quiet or self.advised):
            self.advised = True  # advice, not a warning: --quiet hides it
            _say(BF16_ADVICE)

    def start(self, event: ExtractionStarted) -> None:
        """What this run is about to do (also with --quiet, which only hides the bar)."""
        if event.damaged:
            _say(f"Rebuilding a damaged cache: {event.damaged}")
        changes = event.changes
        if changes and any(changes.values()):
            _say("Source changed since the cache was written: "
                 + ", ".join(f"{v} {k}" for k, v in changes.items())
                 + "; extracting only new and modified files")
        if event.resumed_parts:
            _say(f"Resuming an interrupted extraction ({event.resumed_parts} batches done).")
        if self.quiet or not event.total:
            return
        _say(f"Extracting {event.total} of {event.images} images")
        if sys.stderr.isatty():  # a bar in a log file is noise
            self._bar(event.total, "extract")

    def _views(self, event: ViewsStarted) -> None:
        """The augmented views' own line and bar."""
        if not self.quiet:
            _say(f"Extracting {event.total} augmented views ({event.per_image} per "
                 f"training image, policy {event.policy}) of {event.images} images")
        if not self.quiet and sys.stderr.isatty():
            self._bar(event.total, "views")

    def _bar(self, total: int, label: str) -> None:
        # the ETA is the library's, measured after the first batch: click's own counts
        # the first batch's warm-up in every estimate
        self.bar = click.progressbar(length=total, file=sys.stderr, label=label,
                                     show_eta=False, item_show_func=self._pace)
        self.bar.__enter__()

    @staticmethod
    def _pace(event: Advanced | None) -> str:
        """Images per second and the time left, as the library measured them."""
        if event is None:
            return ""
        parts = []
        if event.elapsed and event.done:
            parts.append(f"{event.done / event.elapsed:.1f} img/s")
        if event.remaining is not None and event.done != event.total:
            parts.append(f"about {format_left(event.remaining)} left")
        return ", ".join(parts)

    def update(self, event: Advanced) -> None:
        if self.bar is not None:
            self.bar.update(event.done - self.last, current_item=event)
            self.last = event.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
        self.last = 0


@main.command("extract")
@click.argument("dataset", type=click.Path())
@_apply(BACKBONE_OPTION, *LAYER_OPTIONS, *EXTRACTION_OPTIONS, *DATASET_OPTIONS, *ENGINE_OPTIONS)
@click.option("--precision", type=click.Choice(["float32", "bf16"]), default="float32",
              show_default=True,
              help="bf16: bfloat16 (OpenVINO's or Keras' mixed, whichever is faster "
                   "here), much faster where the CPU/GPU supports it; "
                   "features agree closely, in a cache of their own.")
@_apply(*AUGMENT_OPTIONS)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any file was skipped.")
@_fail_cleanly
def extract_command(dataset, backbone, layer, preprocess, blocks, weights, image_size, pooling,
                    batch_size, cache_dir,
                    labels, val_fraction, test_fraction, seed, engine, ray_address, workers,
                    gpus_per_worker, shard_size, runtime, precision, augment, augment_policy,
                    quiet, strict) -> None:
    """Extract the features of every image of DATASET into an HDF5 cache.

    DATASET holds class folders (DIR/CLASS/*.jpg), optionally under train/, val/
    (or validation/) and test/, or images named by --labels files. Multi-label: --labels
    with a CSV path,labels[,split] ("dog;person") or a VOC ImageSets/Main directory
    (probe extract --labels VOC2007/ImageSets/Main VOC2007/). A second identical run does
    no backbone work. --engine ray runs the backbone on a Ray cluster and writes the same
    cache. --augment K also extracts K augmented views of every training image.

    Example: probe extract --backbone vgg16 cats_vs_dogs/
    """
    _stop_on_sigterm()
    ray = RayOptions(ray_address, workers, gpus_per_worker, shard_size) if engine == "ray" else None
    progress = _Progress(quiet)
    try:
        result, report = extract_with_report(
            dataset, backbone, weights=weights, image_size=image_size, pooling=pooling,
            labels=labels or None, val_fraction=val_fraction, test_fraction=test_fraction,
            seed=seed, batch_size=batch_size, cache_dir=cache_dir, progress=progress,
            precision=precision, engine=engine, ray=ray, augment=augment,
            augment_policy=augment_policy, runtime=runtime, layer=layer, preprocess=preprocess,
            blocks=blocks)
    finally:
        progress.close()
    counts = ", ".join(f"{split} {n}" for split, n in result.counts.items())
    counts += Task.of_flag(result.multilabel).cache_summary(result.classes)
    if report.status is ExtractionStatus.UP_TO_DATE:
        _echo(f"Cache up to date: {result.path} ({counts})")
    else:
        ran = f" (backbone on {report.runtime})" if report.runtime and report.extracted else ""
        _echo(f"Wrote {result.path} ({counts}): {report.extracted} extracted, "
              f"{report.reused} reused{ran}")
    if result.view_count:
        _echo(f"Views: {result.view_count} per training image "
              f"({result.attrs['views_policy']}): {report.views_extracted} extracted, "
              f"{report.views_reused} reused")
    if report.skipped:
        _say(f"Skipped {report.skipped} files that could not be decoded "
             f"(see `probe cache info {result.path}`)")
    if report.ignored:
        _say(f"Ignored {report.ignored} non-image files")
    for note in report.notes:
        _say(note)
    if strict and report.skipped:
        raise click.ClickException(f"--strict: {report.skipped} files were skipped")


def _head_parameter_options() -> tuple:
    """One click option per distinct flag over the registry's heads (defaults stay the
    heads' own: an option left out is not passed)."""
    declared = {}
    for name in heads_mod.list_heads():
        for option in heads_mod.head_options(name):
            declared.setdefault(option.flag, option)
    options = []
    for flag, option in declared.items():
        kind = click.Choice(option.choices) if option.choices else option.kind
        declarations = (flag, "C") if flag == "--C" else (flag,)
        options.append(click.option(*declarations, type=kind, default=None, help=option.help))
    return tuple(options)


HEAD_OPTION = click.option(
    "--head", type=click.Choice(heads_mod.list_heads()), default=heads_mod.DEFAULT_HEAD, show_default=True,
    help="; ".join(f"{name}: {text}" for name, text in heads_mod.describe_heads().items()))
HEAD_PARAMETER_OPTIONS = _head_parameter_options()


def head_params(head: str, seed: int, options: dict) -> dict:
    """Constructor parameters of the chosen head from the command-line options it
    declares: those given, plus the seed."""
    params = {"seed": seed}
    for option in heads_mod.head_options(head):
        value = options.get(_option_name(option.flag))
        if value is not None:
            params[option.param] = None if value == "none" else value
    return params


def _compare_head_params(heads, seed, options) -> dict:
    """Each compared head's parameters from the options it declares."""
    return {head: head_params(head, seed, options)
            for head in settings.parse_names(heads, ()) if head in heads_mod.list_heads()}


def _option_name(flag: str) -> str:
    return "C" if flag == "--C" else flag.lstrip("-").replace("-", "_")


@main.command("fit")
@click.argument("cache_file", required=False, type=click.Path(), metavar="[CACHE]")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None,
              help="The cache file [default: the one in the cache directory, or the newest].")
@click.option("--backbone", "-b", default=None, help="Use the newest cache of this backbone.")
@CACHE_DIR_OPTION
@RUNS_DIR_OPTION
@_apply(HEAD_OPTION, *HEAD_PARAMETER_OPTIONS)
@click.option("--seed", type=SEED, default=settings.DEFAULT_SEED, show_default=True)
@click.option("--strict", is_flag=True, help="Fail if the cache's source images changed.")
@click.option("--no-report", is_flag=True, help="Do not write report.html.")
@click.option("--no-views", is_flag=True,
              help="Train on the clean features only, even when the cache has augmented views.")
@_fail_cleanly
def fit_command(cache_file, cache_path, backbone, cache_dir, runs_dir, head, seed, strict,
                no_report, no_views, **options) -> None:
    """Train a head on cached features and report its scores with 95% intervals.

    fit reads a feature cache written by `probe extract` (CACHE or --cache: a cache file;
    default: the newest cache). Train fits, validation chooses (C, k and T, epochs), test
    reports; without a test split the scores are on validation, labelled as such. Writes a
    run directory (.probe/runs/<time>-<backbone>-<head>/) with metrics.json,
    confusion_matrix.png, curves.png (dense: per epoch; logreg: the C sweep, so none
    without a validation split; knn: accuracy over k), config.json, the head and
    report.html (see `probe report`). Warns when images are duplicated across splits.

    Example: probe fit --head knn
    """
    cache_path = _fit_cache_argument(cache_file, cache_path)
    params = head_params(head, seed, options)
    run = fit(cache_path, head, backbone=backbone, cache_dir=cache_dir, runs_dir=runs_dir,
              strict=strict, html_report=not no_report, views=not no_views, **params)
    for note in run.notes:
        _echo(note, err=True)
    metrics = run.metrics
    _echo(f"{run.config['backbone']} + {head} on {run.config['cache']}")
    views = run.config.get("views") or {}
    if views.get("available"):
        _echo(f"Views: {views['per_image']} augmented views per training image used "
              f"(of {views['available']}, policy {views['policy']})")
    chosen = metrics.get("chosen") or {}
    if chosen:
        text = ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                         for key, value in chosen.items())
        source = ("" if metrics.get("selected_on")
                  else " (the defaults: no validation split to choose them on)")
        _echo(f"Chosen settings: {text}{source}")
    _echo(format_table(summary_rows(metrics), summary_columns(metrics)), lines=True)
    _echo(f"Run: {run.path}")


def _fit_cache_argument(cache_file, cache_path):
    """The cache named by `probe fit CACHE` or --cache; a dataset directory gets a hint."""
    if cache_file is None:
        return cache_path
    if cache_path is not None:
        raise click.UsageError("give the cache once: as CACHE or with --cache, not both")
    if os.path.isdir(cache_file):
        raise ProbeError(
            f"`probe fit` reads a feature cache, not a dataset: '{cache_file}' is a directory. "
            f"Extract it first with `probe extract {cache_file}`, then run `probe fit` (a "
            "directory of caches goes with --cache-dir)."
        )
    return cache_file


@main.command("curve")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None,
              help="The cache file [default: the one in the cache directory, or the newest].")
@click.option("--backbone", "-b", default=None, help="Use the newest cache of this backbone.")
@CACHE_DIR_OPTION
@click.option("--shots", default="1,2,5,10,25,all", show_default=True,
              help="Labelled images per class, comma-separated; 'all' is the whole training split.")
@click.option("--repeats", type=int, default=5, show_default=True,
              help="Seeded random subsets per shot count.")
@click.option("--heads", default="logreg,knn", show_default=True,
              help=f"Comma-separated heads: {', '.join(heads_mod.list_heads())}.")
@click.option("--seed", type=SEED, default=settings.DEFAULT_SEED, show_default=True)
@_fail_cleanly
def curve_command(cache_path, backbone, cache_dir, shots, repeats, heads, seed) -> None:
    """Label-efficiency curve: accuracy against labelled images per class, per head.

    For each shot count and repeat, a seeded stratified subset of the training split (nested
    across shot counts); settings chosen inside the subset only; scored on the test split
    (else the validation split, said so). A multi-label cache gives mean average precision,
    its subsets stratified on each image's rarest class. Writes curve.csv and curve.png
    (with the chance level) into .probe/runs/<time>-<backbone>-curve/ and prints mean ±
    standard deviation and the chance level.

    Example: probe curve --shots 1,2,5,10,25,all --repeats 5 --heads logreg,knn,dense
    """
    result = curve(cache_path, shots=shots, repeats=repeats, heads=heads, seed=seed,
                   backbone=backbone, cache_dir=cache_dir)
    for note in result.notes:
        _echo(note, err=True)
    _echo(format_table(*_curve_rows(result)), lines=True)
    _echo(_chance_line(result.chance))
    short = max((r["short_classes"] for r in result.summary), default=0)
    if short:
        _echo(f"short classes: classes with fewer training images than the shot count "
              f"(they use all they have); up to {short} here")
    _echo(f"Run: {result.path}")


def _curve_rows(result) -> tuple[list[dict], list[str]]:
    """A curve's summary as table rows (mean ± standard deviation) and their columns."""
    split = "validation" if result.split == "val" else result.split
    scores = result.task.curve_scores
    names = [f"{split} {SCORE_NAMES[scores[0]]}", *(SCORE_NAMES[s] for s in scores[1:])]
    rows = [{**({"backbone": r["backbone"]} if "backbone" in r else {}),
             "head": r["head"], "shots": str(r["shots"]), "n_train": r["n_train"],
             **{name: f"{r[s]:.4f} ± {r[s + '_std']:.4f}" for name, s in zip(names, scores)},
             "short classes": r["short_classes"]} for r in result.summary]
    return rows, list(rows[0])


def _chance_line(chance: dict[str, float]) -> str:
    """What the scores are without learning, e.g. "chance: accuracy 0.3333 (most frequent
    class), balanced accuracy 0.3333 (1 / classes)"."""
    return "chance: " + ", ".join(f"{SCORE_NAMES[s]} {v:.4f} ({CHANCE_MEANING[s]})"
                                  for s, v in chance.items())


@main.command("predict")
@click.argument("run", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Also write the predictions as CSV.")
@click.option("--batch-size", type=int, default=settings.DEFAULT_BATCH_SIZE, show_default=True)
@_fail_cleanly
def predict_command(run, images, output, batch_size) -> None:
    """Predict the class of new images with a run's backbone and head.

    IMAGES are files or directories. Files that can not be decoded get a row saying why.

    Example: probe predict .probe/runs/20260101-120000-vgg16-dense new_photos/ -o predictions.csv
    """
    loaded = Run.load(run)
    results = predict(loaded, images, batch_size=batch_size, output=output)
    classes = loaded.classes
    rows = []
    for r in results:
        if r.error:
            rows.append([r.path, "-", *["" for _ in classes], r.error])
        else:
            rows.append([r.path, r.predicted, *(f"{r.probabilities[c]:.4f}" for c in classes), ""])
    _echo(_table(rows, ["path", "predicted", *classes, "error"]), lines=True)
    failed = sum(1 for r in results if r.error)
    if output:
        _echo(f"Wrote {output}", err=True)
    if failed == len(results):
        raise click.ClickException(f"none of the {failed} files could be decoded (see the error column)")
    if failed:
        _echo(f"{failed} of {len(results)} files could not be decoded", err=True)


@main.command("export")
@click.argument("run", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@_fail_cleanly
def export_command(run, out) -> None:
    """Export a run as one Keras model: RGB image (0-255) in, probabilities out.

    Preprocessing, backbone and head in one .keras file; load it with
    keras.saving.load_model(OUT).

    Example: probe export .probe/runs/20260101-120000-vgg16-logreg cats_dogs.keras
    """
    path = export(run, out)
    _echo(f"Wrote {path}")


def _stop_on_sigterm() -> None:
    """Let `kill` stop an extraction the way Ctrl-C does: cleanly, keeping finished batches."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


@main.command("finetune")
@click.argument("run", type=click.Path())
@click.option("--unfreeze", type=int, default=1, show_default=True,
              help="How many top blocks train (1 = the last): stages for keras.applications, "
                   "transformer blocks for a KerasHub preset, layers with weights for a .keras file.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--learning-rate", type=float, default=1e-5, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--no-augment", is_flag=True, help="No random flips, rotations and zooms.")
@click.option("--patience", type=int, default=3, show_default=True,
              help="Early-stopping patience on validation loss.")
@click.option("--seed", type=SEED, default=settings.DEFAULT_SEED, show_default=True)
@click.option("--runs-dir", type=click.Path(file_okay=False), default=None,
              help="Where the new run goes [default: next to RUN].")
@click.option("--strict", is_flag=True, help="Fail if the cache's source images changed.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@_fail_cleanly
def finetune_command(run, unfreeze, epochs, learning_rate, batch_size, no_augment, patience,
                     seed, runs_dir, strict, quiet) -> None:
    """Fine-tune a run end to end on its images, with the backbone's top blocks unfrozen.

    RUN is a run of `probe fit` (a dense or logistic head). Backbone and head become one
    model; the last --unfreeze blocks of the backbone train with a low learning rate (every
    BatchNormalization layer stays frozen), on the run's own train / validation / test
    images, with augmentation and early stopping on validation loss. Epoch 0 (the starting
    head before any training: the run's head, or where the run was refit on train + val, the
    same head fit on train only, so that validation images judge every epoch fairly) is the
    baseline: when no epoch beats it, the new model is that baseline and the command says
    so. Writes a new run directory with the report of
    `probe fit`, the before / after comparison on the test split and model.keras, which
    `probe predict` and `probe export` use.

    Example: probe finetune .probe/runs/20260101-120000-vgg16-dense --unfreeze 1
    """

    shown = _Events(quiet)
    try:
        result = finetune(
            run, unfreeze, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
            augment=not no_augment, patience=patience, seed=seed, runs_dir=runs_dir,
            strict=strict, progress=shown)
    finally:
        shown.close()
    metrics = result.metrics
    tuned = result.config["finetune"]
    _echo(f"{result.config['backbone']} + {result.config['head']}, fine-tuned with "
          f"{', '.join(tuned['blocks'])} unfrozen: best epoch {metrics['best_epoch']} "
          f"of {metrics['epochs_run']} (0: before training)")
    _echo(format_table(comparison_rows(metrics), ["metric", "before", "after"]), lines=True)
    task = Task.of_record(metrics)
    _echo(f"({score_label(metrics)} split, 95% interval of the {task.score_name} after: "
          f"{format_interval(metrics.get(f'{task.score}_ci'))}; before: the starting head, "
          "fit on the training images only, on the same images)")
    _echo(f"Run: {result.path}")


# --- sentences of progress events ---------------------------------------------------------


def format_left(seconds: float) -> str:
    """The time left, as precise as it is useful: 40 s, 1 min 10 s, 12 min, 1 h 5 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{max(1, seconds)} s"
    if seconds < 10 * 60:
        minutes, rest = divmod(seconds, 60)
        rest = 5 * round(rest / 5)  # 1 min 10 s, not 1 min 8 s: it is an estimate
        return f"{minutes} min {rest} s" if 0 < rest < 60 else f"{minutes + rest // 60} min"
    if seconds < 60 * 60:
        return f"{round(seconds / 60)} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def estimate_line(estimate: Estimate) -> str:
    """The time estimate of a fine-tuning as one sentence."""
    return (f"about {format_left(estimate.seconds_per_epoch)} per epoch on this machine "
            f"({estimate.device}): about {format_left(estimate.seconds_total)} for "
            f"{_epochs(estimate.epochs)}")


def start_line(started: FinetuneStarted) -> str:
    """What a fine-tuning is about to do."""
    slow = " On a CPU this is slow." if started.device == "CPU" else ""
    return (f"Fine-tuning {started.backbone} with {', '.join(started.blocks)} unfrozen "
            f"({started.trainable_parameters:,} trainable parameters) on {started.train} "
            f"training images, up to {_epochs(started.epochs)}.{slow}")


def epoch_line(done: int, total: int, logs, remaining: float | None = None) -> str:
    """One fine-tuning epoch's losses and accuracies (and the time left for the others)."""
    parts = [f"{key} {logs[key]:.4f}" for key in ("loss", "accuracy", "val_loss", "val_accuracy")
             if key in logs]
    left = f" (about {format_left(remaining)} left for {_epochs(total - done)})" \
        if remaining is not None and done < total else ""
    return f"epoch {done}/{total}: " + ", ".join(parts) + left


def batch_line(event: BatchDone) -> str:
    """Where a fine-tuning is, and the time left as measured so far."""
    line = f"epoch {event.epoch}/{event.epochs}, batch {event.done}/{event.total}"
    if event.remaining is not None:
        line += f", about {format_left(event.remaining)} left"
    return line


def note_line(event: Note) -> str | None:
    """The sentence of a Note event that the user must see even with --quiet."""
    if isinstance(event, SourceChanged):
        return f"warning: {event.message} (--strict makes this an error)"
    if isinstance(event, ValidationScores):
        return ("no test split: the scores are on the validation split that chose the epoch "
                "(optimistic); add a test split for an unbiased score")
    if isinstance(event, NoImprovement):
        return (f"no epoch beat epoch 0 (the starting head before any training, validation "
                f"loss {event.baseline_val_loss:.4f}) in {_epochs(event.epochs_run)}: "
                "the new run keeps that model")
    return None


class _StatusLine:
    """One line on a terminal's stderr, rewritten in place (spaces cover a longer line
    before it); cleared before other lines."""

    def __init__(self, enabled: bool):
        self.enabled, self.width = enabled, 0

    def show(self, text: str) -> None:
        if self.enabled:
            text = terminal_text(text)
            click.echo("\r" + text.ljust(self.width), nl=False, err=True)
            self.width = max(self.width, len(text))

    def clear(self) -> None:
        if self.width:
            click.echo("\r" + " " * self.width + "\r", nl=False, err=True)
            self.width = 0


class _Events:
    """Renders the library's progress events on stderr: extraction bars, a line per
    backbone and fit of a comparison, a line per fine-tuning epoch and a status line of its
    batches (on a terminal). With quiet,
    only the notes that change what the results mean."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.extraction = _Progress(quiet)
        self.status = _StatusLine(enabled=not quiet and sys.stderr.isatty())

    def __call__(self, event: Event) -> None:
        handler = {Stage.EXTRACT: self.extraction, Stage.DEMO: self.extraction,
                   Stage.VIEWS: self.extraction, Stage.COMPARE: self._compare,
                   Stage.FINETUNE: self._finetune}.get(event.stage)
        if handler is not None:
            handler(event)

    def _compare(self, event: Event) -> None:
        if isinstance(event, Note):
            self.extraction.close()
        if isinstance(event, NextBackbone):
            self._say(f"[{event.index + 1}/{event.count}] {event.backbone}")
        elif isinstance(event, ExtractionFailed):
            self._say(f"  {event.backbone} failed: {event.error}")
        elif isinstance(event, CurveFailed):
            self._say(f"  {event.backbone} curve failed: {event.error}")
        elif isinstance(event, BackboneExtracted) and event.up_to_date:
            self._say(f"  cache up to date: {event.path}")
        elif isinstance(event, HeadFitted):
            self._fitted(event)

    def _fitted(self, event: HeadFitted) -> None:
        """A comparison's row: its score, or why its fit failed (a failed extraction was
        already said once for all the backbone's heads)."""
        if event.error and not event.error.startswith("extraction failed"):
            self._say(f"  {event.head} failed: {event.error}")
        elif not event.error:
            name, value, interval = compare_headline(event.row)
            self._say(f"  {event.head}: {event.split_role} {name} {value:.4f} "
                      f"{format_interval(interval)} ({event.fit_seconds:.1f} s)")

    def _finetune(self, event: Event) -> None:
        """A line per epoch, said once; on a terminal, a status line of the batch and the
        time left, rewritten in place (a log file gets the epoch lines only)."""
        if isinstance(event, Note):
            line = note_line(event)
            if line is not None:
                self.status.clear()
                _echo(line, err=True)
            elif isinstance(event, Estimate):
                self.status.clear()
                self._say(estimate_line(event))
        elif isinstance(event, FinetuneStarted):
            self._say(start_line(event))
            self._say(f"baseline: validation loss {event.baseline_val_loss:.4f}")
        elif isinstance(event, BatchDone):
            self.status.show(batch_line(event))
        elif isinstance(event, EpochDone):
            self.status.clear()
            self._say(epoch_line(event.done, event.total, event.logs, event.remaining))

    def close(self) -> None:
        self.extraction.close()
        self.status.clear()

    def _say(self, message: str) -> None:
        if not self.quiet:
            _echo(message, err=True)


# --- compare and demo -------------------------------------------------------------------



def _show_comparison(result) -> None:
    _echo(result.table(), lines=True)
    if result.chance:
        _echo(_chance_line(result.chance))
    note = score_note(result)
    if note:
        _echo(note)
    by_error: dict[str, list[str]] = {}
    for record in result.failed:  # one line per reason: a backbone fails for all its heads
        by_error.setdefault(record["error"], []).append(f"{record['backbone']} + {record['head']}")
    for error, rows in by_error.items():
        _echo(f"{', '.join(rows)} failed: {error}", err=True)
    report = ", report.html" if (result.path / "report.html").is_file() else ""
    _echo(f"Wrote {result.path}/compare.csv, compare.md, compare.png{report}")
    if result.curve is not None:
        _echo(format_table(*_curve_rows(result.curve)), lines=True)
        _echo(_chance_line(result.curve.chance))
        _echo(f"Wrote {result.path}/curve.csv, curve.png")
    best = result.best
    if best is None:
        raise click.ClickException("no backbone and head finished; see the errors above")
    tied = [f"{r['backbone']} + {r['head']}" for r in result.tied]
    apart = [f"{r['backbone']} + {r['head']}" for r in result.not_comparable]
    name, value, interval = compare_headline(best)
    _echo(f"Best: {best['backbone']} + {best['head']} ({best['split_role']} {name} "
          f"{value:.4f} {format_interval(interval)}): {best['run']}")
    if tied:
        _echo(f"Tied with the best (paired test on the same images, Holm-adjusted p >= 0.05: "
              f"no significant difference): {', '.join(tied)}")
    if apart:
        _echo(f"Not comparable with the best (scored on other images): {', '.join(apart)}")
    _echo(f"  probe predict {best['run']} IMAGES...")
    _echo(f"  probe export {best['run']} OUT.keras")


@main.command("compare")
@click.argument("dataset", type=click.Path())
@click.option("--backbones", default="vgg16,resnet50", show_default=True,
              help="Comma-separated backbone names (see `probe backbones`), or 'all'.")
@click.option("--heads", default="logreg,dense", show_default=True,
              help=f"Comma-separated heads: {', '.join(heads_mod.list_heads())}.")
@_apply(*EXTRACTION_OPTIONS_FOR(image_size=COMPARE_IMAGE_SIZE_OPTION), RUNS_DIR_OPTION,
        *DATASET_OPTIONS, *HEAD_PARAMETER_OPTIONS, *ENGINE_OPTIONS, *AUGMENT_OPTIONS)
@click.option("--quiet", "-q", is_flag=True, help="No progress lines or bars.")
@click.option("--no-report", is_flag=True, help="Do not write report.html files.")
@click.option("--shots", default=None,
              help="Add label-efficiency curves of every backbone and head at these labelled "
                   "images per class, e.g. 1,10,all (see `probe curve`).")
@click.option("--repeats", type=int, default=5, show_default=True,
              help="With --shots: seeded random subsets per shot count.")
@_fail_cleanly
def compare_command(dataset, backbones, heads, weights, image_size, pooling, batch_size,
                    cache_dir, runs_dir, labels, val_fraction, test_fraction, seed, engine,
                    ray_address, workers, gpus_per_worker, shard_size, runtime, augment,
                    augment_policy, quiet, no_report, shots, repeats, **options) -> None:
    """Compare backbones and heads on DATASET and rank them.

    Extracts what is not cached yet (every existing cache is reused), fits every head on
    every backbone's features with identical splits and prints a ranked table. Writes
    compare.csv, compare.md, compare.png and report.html into .probe/runs/<time>-compare/,
    with one run directory per backbone and head; the best run is ready for `probe predict`
    and `probe export`. Each accuracy comes with its 95% interval; every row is tested
    against the best on the same test images (exact McNemar test, Holm-adjusted over the
    rows: p_vs_best) and marked tied where p >= 0.05. A backbone that fails gets a row saying why;
    the others still run.
    --engine ray extracts on a Ray cluster, as `probe extract --engine ray` does.
    --shots 1,10,all adds every backbone's label-efficiency curve (curve.csv, curve.png).

    Example: probe compare cats_vs_dogs/ --backbones vgg16,resnet50,densenet121 --heads logreg,dense
    """
    params = _compare_head_params(heads, seed, options)
    shown = _Events(quiet)
    try:
        result = compare(dataset, backbones, heads, weights=weights, image_size=image_size,
                         pooling=pooling, labels=labels or None, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, batch_size=batch_size,
                         cache_dir=cache_dir, runs_dir=runs_dir, head_params=params,
                         progress=shown, html_report=not no_report, engine=engine,
                         ray=RayOptions(ray_address, workers, gpus_per_worker, shard_size)
                         if engine == "ray" else None, shots=shots, repeats=repeats,
                         augment=augment, augment_policy=augment_policy, runtime=runtime)
    finally:
        shown.close()
    _show_comparison(result)


@main.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where to write the digits dataset [default: <cache dir>/demo/digits-N].")
@click.option("--per-class", type=int, default=DEMO_PER_CLASS, show_default=True,
              help="Digits per class (4 to 174).")
@click.option("--backbones", default=",".join(DEMO_BACKBONES), show_default=True,
              help="Comma-separated backbone names.")
@click.option("--heads", default="logreg,dense", show_default=True, help="logreg, dense")
@click.option("--image-size", type=int, default=DEMO_IMAGE_SIZE, show_default=True,
              help="Input size of the backbones in pixels.")
@click.option("--weights", default="auto", show_default=True,
              help="'auto' (ImageNet when available, else random), 'imagenet', 'none' or a file.")
@click.option("--seed", type=SEED, default=settings.DEFAULT_SEED, show_default=True)
@CACHE_DIR_OPTION
@click.option("--quiet", "-q", is_flag=True, help="No progress lines or bars.")
@_fail_cleanly
def demo_command(out, per_class, backbones, heads, image_size, weights, seed, cache_dir,
                 quiet) -> None:
    """Run the whole flow on a built-in dataset: nothing to prepare.

    Writes scikit-learn's handwritten digits as PNG files in class folders (digit_0/ ...
    digit_9/), extracts features with each backbone, fits both heads and prints the
    ranked table of `probe compare`. Without ImageNet weights (offline) it says so and
    uses random weights.

    Example: probe demo --per-class 30 --backbones vgg16
    """
    shown = _Events(quiet)
    try:
        result = run_demo(out, per_class=per_class, backbones=backbones, heads=heads,
                          image_size=image_size, weights=weights, seed=seed,
                          cache_dir=cache_dir, progress=shown)
    finally:
        shown.close()
    _show_comparison(result)


@main.command("report")
@click.argument("directory", type=click.Path())
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Where to write it [default: DIRECTORY/report.html].")
@_fail_cleanly
def report_command(directory, output) -> None:
    """Write report.html for a run or a comparison directory (again).

    One self-contained file that opens offline: settings, metrics with their intervals,
    the plots, the misclassified images, an embedding map, nearest training images, the
    duplicates across splits and the skipped files; for a comparison, the ranked table
    with a link to each run's report.

    Example: probe report .probe/runs/20260101-120000-vgg16-logreg
    """
    path = write_report(directory, out=output)
    _echo(f"Wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")


@main.command("duplicates")
@click.argument("cache", type=click.Path())
@click.option("--threshold", type=float, default=None,
              help="Cosine similarity (of centred features) from which two images are near "
                   "duplicates [default: set from the cache's own similarities, see docs/report.md].")
@click.option("--strict", is_flag=True, help="Exit non-zero when a pair crosses splits.")
@click.option("--json", "as_json", is_flag=True, help="Print every group and pair as JSON.")
@click.option("--limit", type=int, default=50, show_default=True,
              help="Pairs and groups listed (all with --json).")
@click.option("--exact", is_flag=True,
              help="Compare every pair on the full features, also for a large cache.")
@_fail_cleanly
def duplicates_command(cache, threshold, strict, as_json, limit, exact) -> None:
    """Find exact (same file content) and near (similar features) duplicate images.

    Pairs whose images sit in different splits (train and test, train and val) come
    first: they inflate every score. Every image file is hashed; near duplicates come
    from the cached features, so no image is decoded.

    Example: probe duplicates .probe/flowers-vgg16-224-avg-1a2b3c4d5e.h5 --strict
    """
    found = find_duplicates(cache, threshold, exact=True if exact else None)
    if as_json:
        _echo(json.dumps(found.to_dict(), indent=2, default=files.display), lines=True)
    else:
        _show_duplicates(found, limit)
    cross = found.cross_split_pairs
    if strict and cross:
        raise click.ClickException(f"--strict: {len(cross)} duplicate pairs cross splits")


def _show_duplicates(found, limit: int) -> None:
    counts = found.counts()
    how = found.calibration.describe() if found.calibration else "given"
    _echo(f"{found.n_images} images, threshold {found.threshold:g} ({how}; {found.method}, "
          f"{found.seconds:.1f} s): {counts['exact_pairs']} identical-file pairs, "
          f"{counts['near_pairs']} near pairs in {counts['groups']} groups; "
          f"{counts['cross_split_pairs']} pairs cross splits")
    show = files.display
    rows = [[p.splits, "identical" if p.exact else "near", f"{p.similarity:.4f}",
             f"{p.first.split}:{show(p.first.path)}", f"{p.second.split}:{show(p.second.path)}"]
            for p in found.pairs[:limit]]
    if rows:
        _echo(_table(rows, ["splits", "kind", "similarity", "first", "second"]), lines=True)
    if len(found.pairs) > limit:
        _echo(f"... {len(found.pairs) - limit} more pairs (--limit, --json)")
    for number, group in enumerate(found.groups[:limit], start=1):
        kind = "identical files" if group.exact else f"similarity >= {group.min_similarity:.4f}"
        members = ", ".join(f"{image.split}:{show(image.path)}" for image in group.images[:8])
        more = f" and {len(group.images) - 8} more" if len(group.images) > 8 else ""
        _echo(f"group {number} ({len(group.images)} images, {kind}): {members}{more}")
    for path, reason in found.unreadable:
        _echo(f"Could not hash {show(path)}: {reason}", err=True)


@main.group("cache")
def cache_group() -> None:
    """Inspect feature caches."""


@cache_group.command("ls")
@CACHE_DIR_OPTION
@_fail_cleanly
def cache_ls(cache_dir) -> None:
    """List the caches in the cache directory, newest first.

    Example: probe cache ls
    """
    caches = cache_mod.list_caches(cache_dir)
    directory = cache_mod.resolve_cache_dir(cache_dir)
    unsealed = set(cache_mod.list_unsealed(cache_dir))
    listed = {cache.path for cache in caches}
    for path in sorted(directory.glob("*.h5")) if directory.is_dir() else []:
        shown = files.display(path)
        if path in unsealed:
            _echo(f"Unsealed (older format): {shown}; rewrite it sealed with "
                  f"`probe cache reseal '{shown}'`", err=True)
        elif path not in listed:
            _echo(f"Not a readable cache (see `probe cache info {shown}`): {shown}",
                  err=True)
    if not caches:
        _echo(f"No caches in {cache_mod.resolve_cache_dir(cache_dir)}")
        return
    rows = []
    for cache in caches:
        rows.append([str(cache.path), cache.backbone, str(cache.attrs["image_size"]),
                     cache.attrs["pooling"], cache.attrs["weights"],
                     " ".join(f"{s}={n}" for s, n in cache.counts.items()),
                     f"{cache.path.stat().st_size / 1e6:.1f} MB"])
    _echo(_table(rows, ["cache", "backbone", "size", "pooling", "weights", "rows", "file"]),
          lines=True)


@cache_group.command("info")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_fail_cleanly
def cache_info(path, as_json) -> None:
    """Show what a cache holds: settings, splits, counts, skipped files.

    Example: probe cache info .probe/cats_vs_dogs-vgg16-224-avg-1a2b3c4d5e.h5
    """
    info = cache_mod.FeatureCache.open(path).info()
    if as_json:
        _echo(json.dumps(info, indent=2), lines=True)
        return
    for key in ("path", "dataset_root", "backbone", "weights", "image_size", "pooling",
                "preprocessing", "feature_shape", "classes", "created"):
        _echo(f"{key + ':':15} {info[key]}")
    if "backbone_source" in info:  # a .keras model file: where it was, and its content
        _echo(f"{'source:':15} {info['backbone_source']} (sha256 {info['backbone_sha256']})")
    if "hub_source" in info:  # a KerasHub preset: where it was, and its files' content
        _echo(f"{'source:':15} {info['hub_source']} (sha256 {info['hub_sha256']})")
    if "blocks" in info:
        _echo(f"{'blocks:':15} last {info['blocks']}")
    if "layers" in info:
        _echo(f"{'layers:':15} {', '.join(info['layers'])}")
    _echo(f"{'splits:':15} " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()))
    for line in Task.of_flag(info["multilabel"]).label_count_lines(info):
        _echo(line)
    _echo(f"{'size:':15} {info['size_bytes'] / 1e6:.2f} MB")
    _echo(f"{'ignored files:':15} {info['ignored_files']}")
    if "views" in info:
        views = info["views"]
        _echo(f"{'views:':15} {views['per_image']} per training image, policy "
              f"{views['policy']}, seed {views['seed']} ({views['rows']} rows, "
              "train/views)")
    _echo(f"{'skipped:':15} {len(info['skipped'])}")
    for item in info["skipped"]:
        _echo(f"  {files.display(item['path'])}: {item['reason']}")


@cache_group.command("reseal")
@click.argument("path", type=click.Path())
@_fail_cleanly
def cache_reseal(path) -> None:
    """Rewrite a cache written by an older probe with the checksum probe now checks.

    The older file is read in a separate process (damage can not crash probe); only rows
    whose image is unchanged (path, size, modification time, labels, split) are kept, and
    `probe extract` extracts the rest again. A sealed cache is only checked.

    Example: probe cache reseal .probe/cats_vs_dogs-vgg16-224-avg-1a2b3c4d5e.h5
    """
    kept = store.reseal(path)
    _echo(f"Sealed: {files.display(path)} ({kept['kept']} rows kept, "
          f"{kept['left_out']} left out)")
    if kept["left_out"]:
        _echo(f"Warning: {kept['left_out']} rows were left out (their images changed or "
              "the rows were damaged); run `probe extract` on the dataset to extract "
              "them again", err=True)


@cache_group.command("verify")
@click.argument("path", type=click.Path())
@click.option("--strict", is_flag=True, help="Exit non-zero if the dataset changed since.")
@_fail_cleanly
def cache_verify(path, strict) -> None:
    """Read every row of a cache (checking its checksums) and compare it with its dataset.

    Prints what was added, removed or modified since the cache was written; damage is an
    error, a changed dataset only with --strict.

    Example: probe cache verify .probe/cats_vs_dogs-vgg16-224-avg-1a2b3c4d5e.h5 --strict
    """
    cache = cache_mod.FeatureCache.open(path)
    cache.verify()
    changes = cache.check_source(strict=strict)
    counts = ", ".join(f"{k} {v}" for k, v in cache.counts.items())
    _echo(f"Cache intact: {files.display(cache.path)} ({counts})")
    if changes:
        _echo(f"Warning: {changes.message()}", err=True)
    else:
        _echo("Source files unchanged")


if __name__ == "__main__":
    main()
