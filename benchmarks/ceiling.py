"""How close each backbone runs to this CPU's float32 arithmetic rate, and so how much any
runtime computing the same convolutions could gain over the plain Keras recipe.

For each backbone at its native size (or --image-size), in float32:

- `gflop_per_image`: the floating-point operations of its convolutions for one image,
  counted on the OpenVINO graph probe writes, with every convolution a plain one
  (PROBE_WINOGRAD=0); the few other operations (pooling, additions) are left out;
- `openvino_plain_img_per_s` and `openvino_plain_gflop_per_s`: that plain graph alone on
  batches of --batch-size in memory, and the convolution work it gets through per second
  (its whole time counted, so a lower bound of the convolutions' own rate);
- `openvino_img_per_s`: the graph as probe writes it (wide 3x3 convolutions as Winograd
  ones), the same turns, and `openvino_over_plain`;
- `recipe_img_per_s` and `recipe_gflop_per_s`: the plain Keras recipe's steady rate end to
  end on N generated JPEGs (extract.py's), and the convolution work that is per second;
- `needed_over_openvino_plain`: 1.3 times the recipe's work per second over the plain
  graph's. Above 1, extraction 1.3 times faster than the recipe needs convolutions faster
  than OpenVINO's own kernels run them on this CPU: only fewer operations (Winograd's
  kind) can give that. `needed_over_matmul` compares the same with the machine line
  `matmul_gflop_per_s`, NumPy's float32 4096 x 4096 matrix product (best of three).

    PYTHONPATH=. python benchmarks/ceiling.py --n 128
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import extract as bench  # noqa: E402  (the dataset and the Keras recipe of extract.py)
import probe  # noqa: E402

GOAL_OVER_RECIPE = 1.3


def matmul_gflop_per_s(size: int = 4096, repeats: int = 3) -> float:
    """NumPy's float32 matrix product rate, the fastest of `repeats` after one warm-up."""
    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    a @ a
    best = min(_seconds(lambda: a @ a) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def convolution_flops(model) -> int:
    """Floating-point operations of an OpenVINO model's convolutions for one input: two per
    multiply-add, each output position of a (grouped) convolution taking as many as its
    kernel has weights."""
    total = 0
    for operation in model.get_ops():
        if operation.get_type_name() not in ("Convolution", "GroupConvolution"):
            continue
        kernel = [d.get_length() for d in operation.input(1).get_partial_shape()]
        spatial = [d.get_length() for d in list(operation.output(0).get_partial_shape())[2:]]
        total += 2 * int(np.prod(kernel)) * int(np.prod(spatial))
    return total


@contextlib.contextmanager
def winograd(enabled: bool) -> Iterator[None]:
    from probe.features import openvino_graph

    saved = os.environ.get(openvino_graph.WINOGRAD_ENV)
    os.environ[openvino_graph.WINOGRAD_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(openvino_graph.WINOGRAD_ENV)
        else:
            os.environ[openvino_graph.WINOGRAD_ENV] = saved


def openvino_graphs(name: str, size: int) -> dict:
    """The backbone's OpenVINO graph as probe writes it ("probe") and with plain
    convolutions only ("plain"), random weights."""
    from probe.features import runtime
    from probe.settings import ExtractionSettings, Weights

    extraction = ExtractionSettings(name, Weights.parse("none"), size)
    graphs = {}
    for kind, enabled in (("plain", False), ("probe", True)):
        with winograd(enabled):
            graphs[kind] = runtime.convert_backbone(extraction)
    return graphs


def model_rates(graphs: dict, inputs: np.ndarray, repeats: int) -> dict[str, float]:
    """Images/s of each compiled graph on `inputs`, median of `repeats` batches in turns
    after one warm-up batch each."""
    from probe.features import runtime

    requests = {kind: runtime.compile_for_cpu(graph).create_infer_request()
                for kind, graph in graphs.items()}
    seconds: dict[str, list[float]] = {kind: [] for kind in requests}
    for request in requests.values():
        request.infer({0: inputs})
    for _ in range(repeats):
        for kind, request in requests.items():
            seconds[kind].append(_seconds(lambda: request.infer({0: inputs})))
    return {kind: len(inputs) / statistics.median(s) for kind, s in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_dataset_options(parser, n=128)
    args = parser.parse_args(argv)

    root, names = bench.start(args, argv)
    matmul = matmul_gflop_per_s()
    bench.emit("machine", "matmul_gflop_per_s", matmul)
    for name in names:
        spec = probe.get_backbone(name)
        size = args.image_size or spec.native_size
        graphs = openvino_graphs(name, size)
        gflop = convolution_flops(graphs["plain"]) / 1e9
        inputs = np.random.default_rng(0).normal(
            size=(args.batch_size, size, size, 3)).astype(np.float32)
        rates = model_rates(graphs, inputs, args.repeats)
        recipe = bench.measure_keras_recipe(spec, size, root, args.batch_size)[1]
        needed = GOAL_OVER_RECIPE * recipe * gflop
        bench.emit(name, "image_size", size)
        bench.emit(name, "gflop_per_image", gflop)
        bench.emit(name, "openvino_plain_img_per_s", rates["plain"])
        bench.emit(name, "openvino_plain_gflop_per_s", rates["plain"] * gflop)
        bench.emit(name, "openvino_img_per_s", rates["probe"])
        bench.emit(name, "openvino_over_plain", rates["probe"] / rates["plain"])
        bench.emit(name, "recipe_img_per_s", recipe)
        bench.emit(name, "recipe_gflop_per_s", recipe * gflop)
        bench.emit(name, "needed_over_openvino_plain", needed / (rates["plain"] * gflop))
        bench.emit(name, "needed_over_matmul", needed / matmul)
    return 0


if __name__ == "__main__":
    sys.exit(main())
