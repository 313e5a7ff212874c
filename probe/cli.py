"""The command line: a thin click layer over the Python API. Library errors become one
line on stderr and exit code 1."""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
import time

import click

from . import backbones, cache as cache_mod, settings
from .compare import compare, parse_names
from .demo import DEMO_BACKBONES, DEMO_IMAGE_SIZE, DEMO_PER_CLASS, run_demo
from .engines.ray import RayOptions
from .errors import ProbeError
from .extract import extract_with_report
from .finetune import comparison_rows, epoch_line, estimate_line, finetune, start_line
from .inference import export, predict
from .progress import Advanced, Event, Finished, Note, Started
from .report import format_table
from .runs import Run, fit, summary_rows

# A seed any part of probe accepts (NumPy's and Keras' seeds are 32-bit).
SEED = click.IntRange(0, settings.MAX_SEED)


def _fail_cleanly(command):
    """Turn a ProbeError into `Error: <message>` and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ProbeError as error:
            raise click.ClickException(str(error)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted; finished batches are kept and the next run resumes.",
                       err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="probe")
def main() -> None:
    """probe: transfer learning on small image datasets.

    Frozen ImageNet backbones read the images once into an HDF5 feature cache; heads
    then train on the cached features in seconds.

    Example: probe extract --backbone vgg16 cats_vs_dogs/
    """


def _table(rows: list[list[str]], header: list[str]) -> str:
    return format_table([dict(zip(header, row)) for row in rows], header)


@main.command("backbones")
def backbones_command() -> None:
    """List the registered backbones.

    Example: probe backbones
    """
    rows = []
    for name in backbones.list_backbones():
        spec = backbones.get(name)
        rows.append([name, str(spec.native_size), str(spec.min_size), str(spec.feature_size),
                     spec.preprocessing])
    click.echo(_table(rows, ["backbone", "native size", "min size", "features", "preprocessing"]))


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
                      "(repeat the option)."),
    click.option("--val-fraction", type=float, default=settings.VAL_FRACTION,
                 show_default=True, help="Validation share when the dataset has no split folders; also "
                                    "carved from train when no val split is given (0: none)."),
    click.option("--test-fraction", type=float, default=settings.TEST_FRACTION,
                 show_default=True, help="Test share when the dataset has no split folders."),
    click.option("--seed", type=SEED, default=settings.DEFAULT_SEED, show_default=True,
                 help="Seed of the split, of random weights and of the heads."),
)
BACKBONE_OPTION = click.option("--backbone", "-b", default="vgg16", show_default=True,
                               help="Backbone name (see `probe backbones`).")
CACHE_DIR_OPTION = click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                                envvar="PROBE_CACHE_DIR", help="Cache directory [default: ./.probe].")
EXTRACTION_OPTIONS = (
    click.option("--weights", default="imagenet", show_default=True,
                 help="'imagenet' (downloaded once), 'none' (random) or a weights file."),
    click.option("--image-size", type=int, default=None,
                 help=f"Input size in pixels, at most {backbones.MAX_IMAGE_SIZE} "
                      "[default: the backbone's native size]."),
    click.option("--pooling", type=click.Choice(backbones.POOLINGS), default="avg",
                 show_default=True, help="'none' keeps the spatial feature map."),
    click.option("--batch-size", type=int, default=settings.DEFAULT_BATCH_SIZE,
                 show_default=True, help=f"Images per batch (1 to {settings.MAX_BATCH_SIZE})."),
    CACHE_DIR_OPTION,
)


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
)


def _say(message: str) -> None:
    click.echo(message, err=True)


class _Progress:
    """Renders the events of extractions on stderr: what a run is about to do, a progress
    bar with images/s and ETA (on a terminal, without --quiet), and demo notes."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.started = 0.0
        self.last = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, Started) and event.stage == "extract":
            self.start(event.details)
        elif isinstance(event, Advanced) and event.stage == "extract":
            self.update(event.done)
        elif isinstance(event, Finished) and event.stage == "extract":
            self.close()
        elif isinstance(event, Note) and event.stage == "demo":
            if event.kind == "dataset":
                _say(f"Digits dataset: {event.details['path']} ({event.details['classes']} "
                     f"classes, {event.details['per_class']} images each)")
            else:
                _say(event.details["message"])

    def start(self, info) -> None:
        """What this run is about to do (also with --quiet, which only hides the bar)."""
        if info.get("damaged"):
            _say(f"Rebuilding a damaged cache: {info['damaged']}")
        changes = info["changes"]
        if changes and any(changes.values()):
            _say("Source changed since the cache was written: "
                 + ", ".join(f"{v} {k}" for k, v in changes.items())
                 + "; extracting only new and modified files")
        if info["resumed_parts"]:
            _say(f"Resuming an interrupted extraction ({info['resumed_parts']} batches done).")
        if self.quiet or not info["todo"]:
            return
        _say(f"Extracting {info['todo']} of {info['total']} images")
        if sys.stderr.isatty():  # a bar in a log file is noise
            self.bar = click.progressbar(length=info["todo"], file=sys.stderr,
                                         label="extract", show_eta=True,
                                         item_show_func=lambda _: self._rate())
            self.bar.__enter__()
            self.started = time.monotonic()

    def _rate(self) -> str:
        elapsed = time.monotonic() - self.started
        return f"{self.last / elapsed:.1f} img/s" if elapsed > 0 and self.last else ""

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.last, current_item=done)
            self.last = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
        self.last = 0


@main.command("extract")
@click.argument("dataset", type=click.Path())
@_apply(BACKBONE_OPTION, *EXTRACTION_OPTIONS, *DATASET_OPTIONS, *ENGINE_OPTIONS)
@click.option("--precision", type=click.Choice(["float32", "bf16"]), default="float32",
              show_default=True,
              help="bf16: mixed bfloat16, much faster where the CPU/GPU supports it; "
                   "features agree closely, in a cache of their own.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any file was skipped.")
@_fail_cleanly
def extract_command(dataset, backbone, weights, image_size, pooling, batch_size, cache_dir,
                    labels, val_fraction, test_fraction, seed, engine, ray_address, workers,
                    gpus_per_worker, shard_size, precision, quiet, strict) -> None:
    """Extract the features of every image of DATASET into an HDF5 cache.

    DATASET holds class folders (DIR/CLASS/*.jpg), optionally under train/, val/
    (or validation/) and test/. A second identical run does no backbone work.
    --engine ray runs the backbone on a Ray cluster and writes the same cache.

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
            precision=precision, engine=engine, ray=ray)
    finally:
        progress.close()
    counts = ", ".join(f"{split} {n}" for split, n in result.counts.items())
    if report.status == "up to date":
        click.echo(f"Cache up to date: {result.path} ({counts})")
    else:
        click.echo(f"Wrote {result.path} ({counts}): {report.extracted} extracted, "
                   f"{report.reused} reused")
    if report.skipped:
        _say(f"Skipped {report.skipped} files that could not be decoded "
             f"(see `probe cache info {result.path}`)")
    if report.ignored:
        _say(f"Ignored {report.ignored} non-image files")
    for note in report.notes:
        _say(note)
    if strict and report.skipped:
        raise click.ClickException(f"--strict: {report.skipped} files were skipped")


HEAD_OPTION = click.option("--head", type=click.Choice(["logreg", "dense"]), default="logreg",
                           show_default=True, help="Logistic regression or a small dense network.")
HEAD_PARAMETER_OPTIONS = (
    click.option("--C", "C", type=float, default=None,
                 help="logreg: fix the regularisation strength [default: chosen on val]."),
    click.option("--hidden-units", type=int, default=256, show_default=True,
                 help="dense: hidden layer width (0: none)."),
    click.option("--dropout", type=float, default=0.5, show_default=True, help="dense"),
    click.option("--epochs", type=int, default=50, show_default=True, help="dense"),
    click.option("--learning-rate", type=float, default=1e-3, show_default=True, help="dense"),
    click.option("--head-batch-size", type=int, default=32, show_default=True,
                 help="dense: training batch size."),
    click.option("--patience", type=int, default=5, show_default=True,
                 help="dense: early-stopping patience on validation loss."),
    click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none",
                 show_default=True, help="'balanced' for imbalanced classes."),
)


def head_params(head, C, hidden_units, dropout, epochs, learning_rate, head_batch_size,
                patience, class_weight, seed) -> dict:
    """Constructor parameters of the chosen head from the command-line options."""
    weight = None if class_weight == "none" else class_weight
    if head == "logreg":
        return {"C": C, "class_weight": weight, "seed": seed}
    return {"hidden_units": hidden_units, "dropout": dropout, "epochs": epochs,
            "learning_rate": learning_rate, "batch_size": head_batch_size,
            "patience": patience, "class_weight": weight, "seed": seed}


@main.command("fit")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None,
              help="The cache file [default: the one in the cache directory, or the newest].")
@click.option("--backbone", "-b", default=None, help="Use the newest cache of this backbone.")
@CACHE_DIR_OPTION
@_apply(HEAD_OPTION, *HEAD_PARAMETER_OPTIONS)
@click.option("--seed", type=SEED, default=settings.DEFAULT_SEED, show_default=True)
@click.option("--strict", is_flag=True, help="Fail if the cache's source images changed.")
@_fail_cleanly
def fit_command(cache_path, backbone, cache_dir, head, C, hidden_units, dropout, epochs,
                learning_rate, head_batch_size, patience, class_weight, seed, strict) -> None:
    """Train a head on cached features and report test metrics.

    Writes a run directory (.probe/runs/<time>-<backbone>-<head>/) with metrics.json,
    confusion_matrix.png, curves.png (dense: per epoch; logreg: the C sweep), config.json and the head.

    Example: probe fit --head dense
    """
    params = head_params(head, C, hidden_units, dropout, epochs, learning_rate,
                         head_batch_size, patience, class_weight, seed)
    run = fit(cache_path, head, backbone=backbone, cache_dir=cache_dir, strict=strict, **params)
    for note in run.notes:
        click.echo(note, err=True)
    metrics = run.metrics
    split = metrics["split"]
    click.echo(f"{run.config['backbone']} + {head} on {run.config['cache']}")
    if "C" in metrics:
        click.echo(f"C chosen on validation: {metrics['C']:g}" if C is None else f"C: {C:g}")
    click.echo(format_table(summary_rows(metrics), ["metric", split]))
    click.echo(f"Run: {run.path}")


@main.command("predict")
@click.argument("run", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Also write the predictions as CSV.")
@click.option("--batch-size", type=int, default=32, show_default=True)
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
    click.echo(_table(rows, ["path", "predicted", *classes, "error"]))
    failed = sum(1 for r in results if r.error)
    if failed:
        click.echo(f"{failed} of {len(results)} files could not be decoded", err=True)
    if output:
        click.echo(f"Wrote {output}", err=True)


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
    click.echo(f"Wrote {path}")


def _stop_on_sigterm() -> None:
    """Let `kill` stop an extraction the way Ctrl-C does: cleanly, keeping finished batches."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


@main.command("finetune")
@click.argument("run", type=click.Path())
@click.option("--unfreeze", type=int, default=1, show_default=True,
              help="How many top blocks of the backbone train (1 = the last block).")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--learning-rate", type=float, default=1e-5, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--no-augment", is_flag=True, help="No random flips, rotations and zooms.")
@click.option("--patience", type=int, default=3, show_default=True,
              help="Early-stopping patience on validation loss.")
@click.option("--seed", type=SEED, default=settings.DEFAULT_SEED, show_default=True)
@click.option("--runs-dir", type=click.Path(file_okay=False), default=None,
              help="Where the new run goes [default: next to RUN].")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@_fail_cleanly
def finetune_command(run, unfreeze, epochs, learning_rate, batch_size, no_augment, patience,
                     seed, runs_dir, quiet) -> None:
    """Fine-tune a run end to end on its images, with the backbone's top blocks unfrozen.

    RUN is a run of `probe fit` (a dense or logistic head). Backbone and head become one
    model; the last --unfreeze blocks of the backbone train with a low learning rate (every
    BatchNormalization layer stays frozen), on the run's own train / validation / test
    images, with augmentation and early stopping on validation loss. Writes a new run
    directory with the report of `probe fit`, the before / after comparison on the test
    split and model.keras, which `probe predict` and `probe export` use.

    Example: probe finetune .probe/runs/20260101-120000-vgg16-dense --unfreeze 1
    """
    bar = None

    def show(event: str, info: dict) -> None:
        nonlocal bar
        if event in ("start", "estimate"):
            if bar is not None:
                click.echo("", err=True)
            line = start_line if event == "start" else estimate_line
            click.echo(line(info), err=True)
        elif event == "batch":
            if bar is None:
                bar = click.progressbar(length=info["steps"], file=sys.stderr,
                                        label=f"epoch {info['epoch']}/{info['epochs']}")
                bar.__enter__()
            bar.update(1)
        elif event == "epoch":
            if bar is not None:
                bar.__exit__(None, None, None)
                bar = None
            click.echo(epoch_line(info), err=True)

    try:
        result = finetune(
            run, unfreeze, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
            augment=not no_augment, patience=patience, seed=seed, runs_dir=runs_dir,
            progress=False if quiet else show)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    metrics = result.metrics
    settings = result.config["finetune"]
    click.echo(f"{result.config['backbone']} + {result.config['head']}, fine-tuned with "
               f"{', '.join(settings['blocks'])} unfrozen: best epoch {metrics['best_epoch']} "
               f"of {metrics['epochs_run']}")
    click.echo(format_table(comparison_rows(metrics), ["metric", "before", "after"]))
    click.echo(f"({metrics['split']} split; before: the source run's head on the same images)")
    click.echo(f"Run: {result.path}")


# --- compare and demo -------------------------------------------------------------------


def _compare_head_params(heads, C, hidden_units, dropout, epochs, learning_rate,
                         head_batch_size, patience, class_weight, seed) -> dict:
    return {head: head_params(head, C, hidden_units, dropout, epochs, learning_rate,
                              head_batch_size, patience, class_weight, seed)
            for head in parse_names(heads, ()) if head in ("logreg", "dense")}


class _CompareProgress(_Progress):
    """Progress of a comparison on stderr: one line per backbone and fit, and the
    extraction events of `_Progress`."""

    def event(self, kind: str, info: dict) -> None:
        if kind == "extract":
            self.close()
            self._line(f"[{info['index'] + 1}/{info['total']}] {info['backbone']}")
        elif kind == "extracted":
            self.close()
            if info["error"]:
                self._line(f"  {info['backbone']} failed: {info['error']}")
            elif info["report"].status == "up to date":
                self._line(f"  cache up to date: {info['cache'].path}")
        elif kind == "fitted":
            if info["error"]:
                self._line(f"  {info['head']} failed: {info['error']}")
            else:
                metrics = info["run"].metrics
                self._line(f"  {info['head']}: {metrics['split']} accuracy "
                           f"{metrics['accuracy']:.4f} ({metrics['fit_seconds']:.1f} s)")

    def _line(self, message: str) -> None:
        if not self.quiet:
            _say(message)


def _show_comparison(result) -> None:
    click.echo(result.table())
    by_error: dict[str, list[str]] = {}
    for record in result.failed:  # one line per reason: a backbone fails for all its heads
        by_error.setdefault(record["error"], []).append(f"{record['backbone']} + {record['head']}")
    for error, rows in by_error.items():
        click.echo(f"{', '.join(rows)} failed: {error}", err=True)
    click.echo(f"Wrote {result.path}/compare.csv, compare.md, compare.png")
    best = result.best
    if best is None:
        raise click.ClickException("no backbone and head finished; see the errors above")
    click.echo(f"Best: {best['backbone']} + {best['head']} ({best['split']} accuracy "
               f"{best['accuracy']:.4f}): {best['run']}")
    click.echo(f"  probe predict {best['run']} IMAGES...")
    click.echo(f"  probe export {best['run']} OUT.keras")


@main.command("compare")
@click.argument("dataset", type=click.Path())
@click.option("--backbones", default="vgg16,resnet50", show_default=True,
              help="Comma-separated backbone names (see `probe backbones`).")
@click.option("--heads", default="logreg,dense", show_default=True,
              help="Comma-separated heads: logreg, dense.")
@_apply(*EXTRACTION_OPTIONS, *DATASET_OPTIONS, *HEAD_PARAMETER_OPTIONS, *ENGINE_OPTIONS)
@click.option("--quiet", "-q", is_flag=True, help="No progress lines or bars.")
@_fail_cleanly
def compare_command(dataset, backbones, heads, weights, image_size, pooling, batch_size,
                    cache_dir, labels, val_fraction, test_fraction, seed, C, hidden_units,
                    dropout, epochs, learning_rate, head_batch_size, patience, class_weight,
                    engine, ray_address, workers, gpus_per_worker, shard_size,
                    quiet) -> None:
    """Compare backbones and heads on DATASET and rank them.

    Extracts what is not cached yet (every existing cache is reused), fits every head on
    every backbone's features with identical splits and prints a ranked table. Writes
    compare.csv, compare.md and compare.png into .probe/runs/<time>-compare/, with one
    run directory per backbone and head; the best run is ready for `probe predict` and
    `probe export`. A backbone that fails gets a row saying why; the others still run.
    --engine ray extracts on a Ray cluster, as `probe extract --engine ray` does.

    Example: probe compare cats_vs_dogs/ --backbones vgg16,resnet50,densenet121 --heads logreg,dense
    """
    params = _compare_head_params(heads, C, hidden_units, dropout, epochs, learning_rate,
                                  head_batch_size, patience, class_weight, seed)
    shown = _CompareProgress(quiet)
    try:
        result = compare(dataset, backbones, heads, weights=weights, image_size=image_size,
                         pooling=pooling, labels=labels or None, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, batch_size=batch_size,
                         cache_dir=cache_dir, head_params=params, progress=shown,
                         on_event=shown.event, engine=engine,
                         ray=RayOptions(ray_address, workers, gpus_per_worker, shard_size)
                         if engine == "ray" else None)
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
    shown = _CompareProgress(quiet)
    try:
        result = run_demo(out, per_class=per_class, backbones=backbones, heads=heads,
                          image_size=image_size, weights=weights, seed=seed,
                          cache_dir=cache_dir, progress=shown, on_event=shown.event)
    finally:
        shown.close()
    _show_comparison(result)


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
    listed = {cache.path for cache in caches}
    for path in sorted(directory.glob("*.h5")) if directory.is_dir() else []:
        if path not in listed:
            click.echo(f"Not a readable cache (see `probe cache info {cache_mod.display(path)}`): "
                       f"{cache_mod.display(path)}", err=True)
    if not caches:
        click.echo(f"No caches in {cache_mod.resolve_cache_dir(cache_dir)}")
        return
    rows = []
    for cache in caches:
        rows.append([str(cache.path), cache.backbone, str(cache.attrs["image_size"]),
                     cache.attrs["pooling"], cache.attrs["weights"],
                     " ".join(f"{s}={n}" for s, n in cache.counts.items()),
                     f"{cache.path.stat().st_size / 1e6:.1f} MB"])
    click.echo(_table(rows, ["cache", "backbone", "size", "pooling", "weights", "rows", "file"]))


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
        click.echo(json.dumps(info, indent=2))
        return
    for key in ("path", "dataset_root", "backbone", "weights", "image_size", "pooling",
                "preprocessing", "feature_shape", "classes", "created"):
        click.echo(f"{key + ':':15} {info[key]}")
    click.echo(f"{'splits:':15} " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()))
    click.echo(f"{'size:':15} {info['size_bytes'] / 1e6:.2f} MB")
    click.echo(f"{'ignored files:':15} {info['ignored_files']}")
    click.echo(f"{'skipped:':15} {len(info['skipped'])}")
    for item in info["skipped"]:
        click.echo(f"  {cache_mod.display(item['path'])}: {item['reason']}")


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
    click.echo(f"Cache intact: {cache_mod.display(cache.path)} ({counts})")
    if changes:
        click.echo(f"Warning: {changes.message()}", err=True)
    else:
        click.echo("Source files unchanged")


if __name__ == "__main__":
    main()
