"""The batch loop: a thread pool decodes the next batches while the model runs on this one.

Decoding runs one batch ahead of the model (at most PREFETCH_BATCHES batches wait), so the
backbone's forward pass is the only thing the user waits for. Each batch carries its own
samples from decoding to its features, so features and samples can not get out of order.
`run_batches` is what a worker runs on its shard of the samples.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .. import backbones, data, settings
from ..plan import Source

PREFETCH_BATCHES = 2


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
    """Yield one `Batch` per `batch_size` sources of `todo`, in order.

    `load(item)` gives an item's RGB pixels (default: the file decoded at `image_size`);
    augmented views pass their own (`plan.ViewSource` items, `augment.load_view`).

    A producer thread decodes the next batches (in a small thread pool) and applies the
    backbone's preprocessing, so the model, in this thread, never waits for anything but
    its own forward pass. The memory the batches need is checked before any is decoded."""
    batch_size = max(1, min(batch_size, len(todo)))  # a short job is not padded to a batch
    settings.check_batch_memory(batch_size, image_size)
    results: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2)))
    producer = threading.Thread(
        target=_produce, daemon=True,
        args=(pool, spec, root, todo, image_size, batch_size, results, stop, load))
    producer.start()
    try:
        while (item := results.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            good, skipped, inputs = item
            yield Batch(_forward(model, inputs, len(good)), good, skipped)
    finally:
        stop.set()
        while producer.is_alive():
            try:
                results.get(timeout=0.1)
            except queue.Empty:
                pass
        pool.shutdown(wait=True, cancel_futures=True)


def _produce(pool, spec, root: Path, todo: Sequence[Source], image_size: int,
             batch_size: int, results: queue.Queue, stop: threading.Event,
             load: Callable[..., np.ndarray] | None = None) -> None:
    """Decode and preprocess each batch into `results`; None at the end; an exception is
    handed to the consuming thread."""

    def decode(source: Source):
        try:
            if load is not None:
                return load(source), None
            return data.load_image(root / source.sample.path, image_size), None
        except data.BadImage as error:
            return None, str(error)

    try:
        for start in range(0, len(todo), batch_size):
            if stop.is_set():
                return
            batch = todo[start:start + batch_size]
            decoded = list(pool.map(decode, batch))
            good = [s for s, (pixels, _) in zip(batch, decoded) if pixels is not None]
            skipped = [(s.sample.path, reason, s.size, s.mtime)
                       for s, (pixels, reason) in zip(batch, decoded) if pixels is None]
            pixels = [p for p, _ in decoded if p is not None]
            del decoded
            results.put((good, skipped, _prepare(spec, pixels, batch_size) if good else None))
        results.put(None)
    except BaseException as error:  # hand any failure to the consuming thread
        results.put(error)


def _prepare(spec: backbones.BackboneSpec, pixels: list[np.ndarray], batch_size: int) -> np.ndarray:
    """Model inputs of one batch: the backbone's own preprocessing of the RGB pixels.

    The short last batch is padded with zeros to the batch size: the compiled model then
    keeps one input shape instead of being traced again for the last batch (seconds for a
    large backbone). This costs no more memory than a full batch, which was checked, and
    the batch size is never larger than the job (`run_batches`)."""
    inputs = spec.preprocess_input(np.stack(pixels))
    if len(inputs) < batch_size:
        padding = np.zeros((batch_size - len(inputs), *inputs.shape[1:]), dtype=inputs.dtype)
        inputs = np.concatenate([inputs, padding])
    return inputs


def _forward(model, inputs: np.ndarray | None, count: int) -> np.ndarray:
    """Features (float32, whatever the compute precision) of the first `count` rows."""
    if inputs is None:  # nothing in the batch could be decoded
        return np.zeros((0, *model.output_shape[1:]), dtype=np.float32)
    return np.asarray(model.predict_on_batch(inputs), dtype=np.float32)[:count]


def build_model(spec: backbones.BackboneSpec, weights, size: int, pooling: str, seed: int | None,
                precision: str = "float32"):
    """The frozen backbone; with precision "bf16" under Keras' "mixed_bfloat16" policy
    (variables stay float32, so the weights are the same). The global policy is restored.
    BatchNormalizations after convolutions are folded into them (`probe.fold`; the same
    features up to float rounding, PROBE_FOLD_BATCHNORM=0 turns it off)."""
    from ..fold import for_inference

    if precision == "float32":
        return for_inference(spec.build(weights=weights, image_size=size, pooling=pooling,
                                        seed=seed))
    from .._keras import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        return for_inference(spec.build(weights=weights, image_size=size, pooling=pooling,
                                        seed=seed))
    finally:
        keras.mixed_precision.set_global_policy(previous)


def bf16_support() -> str | None:
    """None where bfloat16 runs fast (a GPU of compute capability 8.0+, or a CPU with
    AVX512_BF16 / AMX_BF16 / Arm BF16), else the reason it is not offered."""
    try:
        from .._keras import keras  # noqa: F401  (imports TensorFlow quietly)
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
            if capability and tuple(capability) >= (8, 0):
                return None
    except Exception:  # no TensorFlow GPU support: only the CPU counts
        pass
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("flags", "features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        return None
    return ("neither the CPU (no AVX512_BF16, AMX_BF16 or BF16 instructions) nor a GPU "
            "(compute capability 8.0+) runs bfloat16 natively")
