"""The command line: a thin click layer over the Python API. Library errors become one
line on stderr and exit code 1."""

from __future__ import annotations

import functools
import json
import sys
import time

import click

from . import backbones, cache as cache_mod, heads as heads_mod
from .errors import ProbeError
from .report import format_table


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


def dataset_options(command):
    """Options shared by every command that reads a dataset."""
    options = [
        click.option("--labels", "labels", type=click.Path(dir_okay=False),
                     help="CSV path,label[,split] or a 'name label' list with 1/-1 labels."),
        click.option("--val-fraction", type=float, default=0.15, show_default=True,
                     help="Validation share when the dataset has no split folders."),
        click.option("--test-fraction", type=float, default=0.15, show_default=True,
                     help="Test share when the dataset has no split folders."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the split and of random weights."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def extraction_options(command):
    """Options that define the features."""
    options = [
        click.option("--backbone", "-b", default="vgg16", show_default=True,
                     help="Backbone name (see `probe backbones`)."),
        click.option("--weights", default="imagenet", show_default=True,
                     help="'imagenet' (downloaded once), 'none' (random) or a weights file."),
        click.option("--image-size", type=int, default=None,
                     help="Input size in pixels [default: the backbone's native size]."),
        click.option("--pooling", type=click.Choice(backbones.POOLINGS), default="avg",
                     show_default=True, help="'none' keeps the spatial feature map."),
        click.option("--batch-size", type=int, default=32, show_default=True),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     envvar="PROBE_CACHE_DIR", help="Cache directory [default: ./.probe]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


class _Progress:
    """A progress bar on stderr with images/s and ETA."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.started = 0.0
        self.last = 0

    def start(self, info: dict) -> None:
        """What this run is about to do, on stderr (also with --quiet, which only hides
        the progress bar)."""
        if info.get("damaged"):
            click.echo(f"Rebuilding a damaged cache: {info['damaged']}", err=True)
        changes = info["changes"]
        if changes and any(changes.values()):
            click.echo("Source changed since the cache was written: "
                       + ", ".join(f"{v} {k}" for k, v in changes.items())
                       + "; extracting only new and modified files", err=True)
        if info["resumed_parts"]:
            click.echo(f"Resuming an interrupted extraction ({info['resumed_parts']} batches done).",
                       err=True)
        if self.quiet:
            return
        if info["todo"]:
            click.echo(f"Extracting {info['todo']} of {info['total']} images", err=True)
        if info["todo"] and sys.stderr.isatty():  # a bar in a log file is noise
            self.bar = click.progressbar(length=info["todo"], file=sys.stderr,
                                         label="extract", show_eta=True,
                                         item_show_func=lambda _: self._rate())
            self.bar.__enter__()
            self.started = time.monotonic()

    def _rate(self) -> str:
        elapsed = time.monotonic() - self.started
        return f"{self.last / elapsed:.1f} img/s" if elapsed > 0 and self.last else ""

    def update(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.last, current_item=done)
            self.last = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@main.command("extract")
@click.argument("dataset", type=click.Path())
@extraction_options
@dataset_options
@click.option("--precision", type=click.Choice(["float32", "bf16"]), default="float32",
              show_default=True,
              help="bf16: mixed bfloat16, much faster where the CPU/GPU supports it; "
                   "features agree closely, in a cache of their own.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any file was skipped.")
@_fail_cleanly
def extract_command(dataset, backbone, weights, image_size, pooling, batch_size, cache_dir,
                    labels, val_fraction, test_fraction, seed, precision, quiet, strict) -> None:
    """Extract the features of every image of DATASET into an HDF5 cache.

    DATASET holds class folders (DIR/CLASS/*.jpg), optionally under train/, val/
    (or validation/) and test/. A second identical run does no backbone work.

    Example: probe extract --backbone vgg16 cats_vs_dogs/
    """
    from .extract import extract

    _stop_on_sigterm()
    progress = _Progress(quiet)
    try:
        result = extract(dataset, backbone, weights=weights, image_size=image_size,
                         pooling=pooling, labels=labels, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, batch_size=batch_size,
                         cache_dir=cache_dir, progress=progress.update, on_start=progress.start,
                         precision=precision)
    finally:
        progress.close()
    report = result.report
    counts = ", ".join(f"{split} {n}" for split, n in result.counts.items())
    if report["status"] == "up to date":
        click.echo(f"Cache up to date: {result.path} ({counts})")
    else:
        click.echo(f"Wrote {result.path} ({counts}): {report['extracted']} extracted, "
                   f"{report['reused']} reused")
    if report["skipped"]:
        click.echo(f"Skipped {report['skipped']} files that could not be decoded "
                   f"(see `probe cache info {result.path}`)", err=True)
    if report["ignored"]:
        click.echo(f"Ignored {report['ignored']} non-image files", err=True)
    if strict and report["skipped"]:
        raise click.ClickException(f"--strict: {report['skipped']} files were skipped")


def _head_option_list() -> list:
    """One click option per distinct flag over the registry's heads (defaults stay the
    heads' own: an option left out is not passed)."""
    seen: dict[str, list[str]] = {}
    declared = {}
    for name in heads_mod.list_heads():
        for option in heads_mod.head_options(name):
            seen.setdefault(option.flag, []).append(name)
            declared.setdefault(option.flag, option)
    options = []
    for flag, option in declared.items():
        kind = click.Choice(option.choices) if option.choices else option.kind
        declarations = (flag, "C") if flag == "--C" else (flag,)
        options.append(click.option(*declarations, type=kind, default=None, help=option.help))
    return options


def head_options(command):
    """Options of the heads (each applies to the head that has it), from the registry."""
    described = "; ".join(f"{name}: {text}" for name, text in heads_mod.describe_heads().items())
    options = [click.option("--head", type=click.Choice(heads_mod.list_heads()), default="logreg",
                            show_default=True, help=described), *_head_option_list()]
    for option in reversed(options):
        command = option(command)
    return command


def head_params(head: str, seed: int, options: dict) -> dict:
    """Constructor parameters of the chosen head from the command-line options it
    declares: those given, plus the seed."""
    params = {"seed": seed}
    for option in heads_mod.head_options(head):
        value = options.get(_option_name(option.flag))
        if value is not None:
            params[option.param] = None if value == "none" else value
    return params


def _option_name(flag: str) -> str:
    return "C" if flag == "--C" else flag.lstrip("-").replace("-", "_")


@main.command("fit")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None,
              help="The cache file [default: the one in the cache directory, or the newest].")
@click.option("--backbone", "-b", default=None, help="Use the newest cache of this backbone.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              envvar="PROBE_CACHE_DIR", help="Cache directory [default: ./.probe].")
@head_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--strict", is_flag=True, help="Fail if the cache's source images changed.")
@_fail_cleanly
def fit_command(cache_path, backbone, cache_dir, head, seed, strict, **options) -> None:
    """Train a head on cached features and report test metrics.

    Writes a run directory (.probe/runs/<time>-<backbone>-<head>/) with metrics.json,
    confusion_matrix.png, curves.png (dense: per epoch; logreg: the C sweep; knn: accuracy
    over k), config.json and the head.

    Example: probe fit --head knn
    """
    from .runs import fit, summary_rows

    params = head_params(head, seed, options)
    run = fit(cache_path, head, backbone=backbone, cache_dir=cache_dir, strict=strict, **params)
    for note in run.notes:
        click.echo(note, err=True)
    metrics = run.metrics
    split = metrics["split"]
    click.echo(f"{run.config['backbone']} + {head} on {run.config['cache']}")
    chosen = metrics.get("chosen") or {}
    if chosen:
        settings = ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                             for key, value in chosen.items())
        click.echo(f"Chosen settings: {settings}")
    click.echo(format_table(summary_rows(metrics), ["metric", split]))
    click.echo(f"Run: {run.path}")


@main.command("curve")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None,
              help="The cache file [default: the one in the cache directory, or the newest].")
@click.option("--backbone", "-b", default=None, help="Use the newest cache of this backbone.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              envvar="PROBE_CACHE_DIR", help="Cache directory [default: ./.probe].")
@click.option("--shots", default="1,2,5,10,25,all", show_default=True,
              help="Labelled images per class, comma-separated; 'all' is the whole training split.")
@click.option("--repeats", type=int, default=5, show_default=True,
              help="Seeded random subsets per shot count.")
@click.option("--heads", default="logreg,knn", show_default=True,
              help=f"Comma-separated heads: {', '.join(heads_mod.list_heads())}.")
@click.option("--seed", type=int, default=0, show_default=True)
@_fail_cleanly
def curve_command(cache_path, backbone, cache_dir, shots, repeats, heads, seed) -> None:
    """Label-efficiency curve: accuracy against labelled images per class, per head.

    For each shot count and repeat, a seeded stratified subset of the training split (nested
    across shot counts); settings chosen inside the subset only; scored on the test split
    (else the validation split, said so). Writes curve.csv and curve.png into
    .probe/runs/<time>-<backbone>-curve/ and prints mean ± standard deviation.

    Example: probe curve --shots 1,2,5,10,25,all --repeats 5 --heads logreg,knn,dense
    """
    from .curve import curve

    result = curve(cache_path, shots=shots, repeats=repeats, heads=heads, seed=seed,
                   backbone=backbone, cache_dir=cache_dir)
    for note in result.notes:
        click.echo(note, err=True)
    split = "validation" if result.split == "val" else result.split
    rows = [{"head": r["head"], "shots": str(r["shots"]), "n_train": r["n_train"],
             f"{split} accuracy": f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}",
             "balanced accuracy": f"{r['balanced_accuracy']:.4f} ± {r['balanced_accuracy_std']:.4f}",
             "short classes": r["short_classes"]} for r in result.summary]
    click.echo(format_table(rows, list(rows[0])))
    short = max((r["short_classes"] for r in result.summary), default=0)
    if short:
        click.echo(f"short classes: classes with fewer training images than the shot count "
                   f"(they use all they have); up to {short} here")
    click.echo(f"Run: {result.path}")


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
    from .inference import predict
    from .runs import Run

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
    from .inference import export

    path = export(run, out)
    click.echo(f"Wrote {path}")
def _stop_on_sigterm() -> None:
    """Let `kill` stop an extraction the way Ctrl-C does: cleanly, keeping finished batches."""
    import signal
    import threading

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
@click.option("--seed", type=int, default=0, show_default=True)
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
    from .finetune import comparison_rows, epoch_line, estimate_line, finetune, start_line

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


def _options_except(decorator, *names):
    """The options a shared option decorator adds, without those named (compare takes
    --backbones and --heads instead of --backbone and --head)."""

    def apply(command):
        template = decorator(lambda: None)
        params = [p for p in template.__click_params__ if p.name not in names]
        command.__click_params__ = getattr(command, "__click_params__", []) + params
        return command

    return apply


def _compare_head_params(heads, seed, options) -> dict:
    from .compare import parse_names

    return {head: head_params(head, seed, options)
            for head in parse_names(heads, ()) if head in heads_mod.list_heads()}


class _CompareProgress:
    """Progress of a comparison on stderr: one line per backbone and fit, and an
    extraction progress bar."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = _Progress(quiet)

    def on_start(self, info: dict) -> None:
        self.bar.start(info)

    def progress(self, done: int, total: int) -> None:
        self.bar.update(done, total)

    def event(self, kind: str, info: dict) -> None:
        if kind == "extract":
            self.bar.close()
            self.bar = _Progress(self.quiet)
            self._say(f"[{info['index'] + 1}/{info['total']}] {info['backbone']}")
        elif kind == "extracted":
            self.bar.close()
            if info["error"]:
                self._say(f"  {info['backbone']} failed: {info['error']}")
            elif info["cache"].report["status"] == "up to date":
                self._say(f"  cache up to date: {info['cache'].path}")
        elif kind == "fitted":
            if info["error"]:
                self._say(f"  {info['head']} failed: {info['error']}")
            else:
                metrics = info["run"].metrics
                self._say(f"  {info['head']}: {metrics['split']} accuracy "
                          f"{metrics['accuracy']:.4f} ({metrics['fit_seconds']:.1f} s)")

    def close(self) -> None:
        self.bar.close()

    def _say(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)


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
              help=f"Comma-separated heads: {', '.join(heads_mod.list_heads())}.")
@_options_except(extraction_options, "backbone")
@dataset_options
@_options_except(head_options, "head")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines or bars.")
@_fail_cleanly
def compare_command(dataset, backbones, heads, weights, image_size, pooling, batch_size,
                    cache_dir, labels, val_fraction, test_fraction, seed, quiet, **options) -> None:
    """Compare backbones and heads on DATASET and rank them.

    Extracts what is not cached yet (every existing cache is reused), fits every head on
    every backbone's features with identical splits and prints a ranked table. Writes
    compare.csv, compare.md and compare.png into .probe/runs/<time>-compare/, with one
    run directory per backbone and head; the best run is ready for `probe predict` and
    `probe export`. A backbone that fails gets a row saying why; the others still run.

    Example: probe compare cats_vs_dogs/ --backbones vgg16,resnet50,densenet121 --heads logreg,dense
    """
    from .compare import compare

    params = _compare_head_params(heads, seed, options)
    shown = _CompareProgress(quiet)
    try:
        result = compare(dataset, backbones, heads, weights=weights, image_size=image_size,
                         pooling=pooling, labels=labels, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, batch_size=batch_size,
                         cache_dir=cache_dir, head_params=params, progress=shown.progress,
                         on_start=shown.on_start, on_event=shown.event)
    finally:
        shown.close()
    _show_comparison(result)


from .demo import DEMO_BACKBONES, DEMO_IMAGE_SIZE, DEMO_PER_CLASS  # noqa: E402


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
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              envvar="PROBE_CACHE_DIR", help="Cache directory [default: ./.probe].")
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
    from .demo import run_demo

    shown = _CompareProgress(quiet)
    try:
        result = run_demo(out, per_class=per_class, backbones=backbones, heads=heads,
                          image_size=image_size, weights=weights, seed=seed,
                          cache_dir=cache_dir, log=lambda message: click.echo(message, err=True),
                          progress=shown.progress, on_start=shown.on_start, on_event=shown.event)
    finally:
        shown.close()
    _show_comparison(result)


@main.group("cache")
def cache_group() -> None:
    """Inspect feature caches."""


@cache_group.command("ls")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              envvar="PROBE_CACHE_DIR", help="Cache directory [default: ./.probe].")
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
    for split in cache.splits:
        cache.split(split)
    cache.skipped
    changes = cache.check_source(strict=strict)
    counts = ", ".join(f"{k} {v}" for k, v in cache.counts.items())
    click.echo(f"Cache intact: {cache_mod.display(cache.path)} ({counts})")
    if changes:
        click.echo(f"Warning: {changes.message()}", err=True)
    else:
        click.echo("Source files unchanged")


if __name__ == "__main__":
    main()
