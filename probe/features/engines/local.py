"""The batch loop: a thread pool decodes the next batches while the model runs on this one.

Decoding runs ahead of the model (PREFETCH_BATCHES batches wait, DECODING_BATCHES are being
decoded), and starts while the model is built, so the backbone's forward pass is the only
thing the user waits for. Each batch carries its own samples from decoding to its features,
so features and samples can not get out of order. `run_batches` is what a worker runs on
its shard of the samples.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ... import backbones, data, settings
from ...errors import BackboneError
from ..plan import Source

# Batches decoded and waiting for the model, and batches being decoded (the producer holds
# one of them while it waits to hand it on): with the one the model runs,
# settings.BATCHES_IN_MEMORY in all
PREFETCH_BATCHES = 1
DECODING_BATCHES = 2
# Beyond 8 threads decoding gets no faster (on 16 cores, resnet50's images: 1,141, 1,001 and
# 1,006 images/s with 8, 12 and 16 threads, benchmarks/pipeline.py): the threads' Python
# steps share one interpreter.
MAX_DEFAULT_DECODING_THREADS = 8


@dataclass
class Batch:
    """One finished batch: the features of the decoded sources, row-aligned, and the
    files that could not be decoded (path, reason, size, mtime)."""

    features: np.ndarray
    done: list[Source]
    skipped: list[tuple[str, str, int, int]]

    def __len__(self) -> int:
        return len(self.done) + len(self.skipped)


def run_batches(model, spec: backbones.BackboneSpec, root: Path, todo: Sequence[Source],
                image_size: int, batch_size: int, workers: int | None = None,
                load: Callable[..., np.ndarray] | None = None) -> Iterator[Batch]:
    """Yield one `Batch` per `batch_size` sources of `todo`, in order: `Decoding` feeding
    `forward`.

    `load(item)` gives an item's RGB pixels (default: the file decoded at `image_size`);
    augmented views pass their own (`plan.ViewSource` items, `augment.load_view`)."""
    with Decoding(spec, root, todo, image_size, batch_size, workers, load) as decoding:
        yield from forward(model, decoding)


def forward(model, decoding: "Decoding") -> Iterator[Batch]:
    """The model over the batches of `decoding`, one `Batch` each, in order."""
    for good, skipped, inputs in decoding:
        yield Batch(_check_finite(_forward(model, inputs, len(good)), good), good, skipped)


class Decoding:
    """The batches of `todo`, decoded and preprocessed ahead of the model from the moment
    this is made: a producer thread hands on the batches its thread pool decodes, so the
    model never waits for anything but its own forward pass. Made before the model is
    built, the first batches are ready when it is. The memory the batches need is checked
    before any is decoded. Iterate once for (decoded sources, skipped files, inputs)
    tuples; close (or leave the `with` block) to stop."""

    def __init__(self, spec: backbones.BackboneSpec, root: Path, todo: Sequence[Source],
                 image_size: int, batch_size: int, workers: int | None = None,
                 load: Callable[..., np.ndarray] | None = None) -> None:
        batch_size = max(1, min(batch_size, len(todo)))  # a short job is not padded to a batch
        settings.check_batch_memory(batch_size, image_size)
        self._results: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=decoding_threads(workers))
        self._producer = threading.Thread(
            target=_produce, daemon=True, args=(self._pool, spec, root, todo, image_size,
                                                batch_size, self._results, self._stop, load))
        self._producer.start()

    def __iter__(self) -> Iterator[tuple]:
        while (item := self._results.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop decoding and wait for the threads (batches not yet taken are dropped)."""
        self._stop.set()
        while self._producer.is_alive():
            try:
                self._results.get(timeout=0.1)
            except queue.Empty:
                pass
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Decoding":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def decoding_threads(workers: int | None) -> int:
    """The number of decoding threads: `workers`, or by default one per core, at most
    MAX_DEFAULT_DECODING_THREADS."""
    return workers or min(MAX_DEFAULT_DECODING_THREADS, os.cpu_count() or 2)


def _produce(pool, spec, root: Path, todo: Sequence[Source], image_size: int,
             batch_size: int, results: queue.Queue, stop: threading.Event,
             load: Callable[..., np.ndarray] | None = None) -> None:
    """Decode and preprocess each batch into `results`; None at the end; an exception is
    handed to the consuming thread.

    Each image is decoded and preprocessed by a pool thread straight into its row of the
    batch's input array, and the next batch's images are already in the pool while this
    one's last images finish: the threads never wait at a batch boundary, and nothing is
    left for this thread but handing batches on. At most DECODING_BATCHES batches are
    being decoded."""

    def fill(inputs: np.ndarray, row: int, source: Source) -> str | None:
        try:
            if load is not None:
                pixels = load(source)
            else:
                pixels = data.load_image(root / source.sample.path, image_size)
        except data.BadImage as error:
            return str(error)
        inputs[row] = spec.preprocess_input(pixels)
        return None

    def submit(start: int):
        batch = todo[start:start + batch_size]
        # the short last batch is padded with zeros: see `_finish`
        inputs = (np.empty if len(batch) == batch_size else np.zeros)(
            (batch_size, image_size, image_size, 3), np.float32)
        return batch, inputs, [pool.submit(fill, inputs, row, source)
                               for row, source in enumerate(batch)]

    try:
        pending = collections.deque()
        starts = iter(range(0, len(todo), batch_size))
        for start in itertools.islice(starts, DECODING_BATCHES):
            pending.append(submit(start))
        while pending:
            if stop.is_set():
                return
            batch, inputs, futures = pending.popleft()
            results.put(_finish(batch, inputs, [future.result() for future in futures]))
            if (start := next(starts, None)) is not None:  # after the put: memory stays bounded
                pending.append(submit(start))
        results.put(None)
    except BaseException as error:  # hand any failure to the consuming thread
        results.put(error)


def _finish(batch: Sequence[Source], inputs: np.ndarray, reasons: list[str | None]):
    """(decoded sources, skipped files, model inputs or None) of one decoded batch.

    The decoded images' rows move up over the rows of files that could not be decoded,
    and rows past them are zeros. A short batch keeps the batch size: the compiled model
    then keeps one input shape instead of being traced again for the last batch (seconds
    for a large backbone). This costs no more memory than a full batch, which was checked,
    and the batch size is never larger than the job (`run_batches`)."""
    good = [s for s, reason in zip(batch, reasons) if reason is None]
    skipped = [(s.sample.path, reason, s.size, s.mtime)
               for s, reason in zip(batch, reasons) if reason is not None]
    if not good:
        return good, skipped, None
    if skipped:
        rows = [row for row, reason in enumerate(reasons) if reason is None]
        inputs[:len(rows)] = inputs[rows]
        inputs[len(rows):] = 0
    return good, skipped, inputs


def _forward(model, inputs: np.ndarray | None, count: int) -> np.ndarray:
    """Features (float32, whatever the compute precision) of the first `count` rows."""
    if inputs is None:  # nothing in the batch could be decoded
        return np.zeros((0, *model.output_shape[1:]), dtype=np.float32)
    return np.asarray(model.predict_on_batch(inputs), dtype=np.float32)[:count]


def _check_finite(features: np.ndarray, sources: Sequence[Source]) -> np.ndarray:
    """The features, or an error when a row holds NaN or infinity: nothing learns from
    those, and a cache of them would pass for a good one."""
    finite = np.isfinite(features).all(axis=tuple(range(1, features.ndim)))
    if not finite.all():
        first = sources[int(np.argmin(finite))].sample.path
        raise BackboneError(
            f"expected finite features from the backbone; {int((~finite).sum())} of "
            f"{len(features)} images in a batch gave NaN or infinity (the first: '{first}'). "
            "A bfloat16 run can overflow where float32 does not: extract again with "
            "--precision float32; with your own weights file, check it. Finished batches "
            "are kept.")
    return features


def build_model(spec: backbones.BackboneSpec, weights, size: int, pooling: str, seed: int | None,
                precision: str = "float32"):
    """The frozen backbone; with precision "bf16" under Keras' "mixed_bfloat16" policy
    (variables stay float32, so the weights are the same). The global policy is restored.
    BatchNormalizations after convolutions are folded into them (`probe.features.fold`; the same
    features up to float rounding, PROBE_FOLD_BATCHNORM=0 turns it off)."""
    from ..fold import for_inference

    if precision == "float32":
        return for_inference(spec.build(weights=weights, image_size=size, pooling=pooling,
                                        seed=seed))
    from ..._keras import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        return for_inference(spec.build(weights=weights, image_size=size, pooling=pooling,
                                        seed=seed))
    finally:
        keras.mixed_precision.set_global_policy(previous)
