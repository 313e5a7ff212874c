"""Winograd F(2x2, 3x3) against OpenVINO's plain convolution, one 3x3 "same" convolution
at a time (float32, batch 32, the CPU), for the shapes of the five backbones: where
`probe.features.openvino_graph` writes a Winograd convolution (WINOGRAD_MIN_CHANNEL_PRODUCT,
WINOGRAD_MIN_SIZE) comes from these figures.

    PYTHONPATH=. python benchmarks/winograd.py [--batch 32] [--repeats 3]

Three lines per shape `c<C>_k<K>_<H>x<W>`: `speedup` (plain seconds / Winograd seconds),
`rel_diff` (largest difference relative to the largest output) and `chosen` (whether probe
writes it as a Winograd convolution). Each side is the fastest of --repeats calls after one
warm-up call, in turns.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

# (input channels, filters, height = width): the 3x3 stride-1 convolutions of VGG16,
# ResNet50 and InceptionV3 at their native sizes, and the sizes around the thresholds.
SHAPES = [(64, 64, 224), (128, 128, 112), (128, 256, 56), (256, 256, 56), (256, 512, 28),
          (512, 512, 28), (512, 512, 14), (64, 64, 56), (128, 128, 28), (256, 256, 14),
          (512, 512, 7), (448, 384, 8), (512, 512, 8), (256, 256, 8), (128, 128, 16)]


def measure(channels: int, filters: int, size: int, batch: int, repeats: int):
    """(plain seconds, Winograd seconds, largest relative difference) of one convolution."""
    import openvino as ov
    from openvino import opset13 as ops

    from probe.features import openvino_graph, runtime

    rng = np.random.default_rng(0)
    kernel = (rng.normal(size=(3, 3, channels, filters)) / np.sqrt(9 * channels)).astype(np.float32)
    inputs = rng.normal(size=(batch, channels, size, size)).astype(np.float32)
    requests = {}
    for kind in ("plain", "winograd"):
        parameter = ops.parameter([-1, channels, size, size], np.float32)
        if kind == "winograd":
            output = openvino_graph.winograd_conv3x3(parameter.output(0), kernel, ops)
        else:
            output = ops.convolution(parameter, ops.constant(np.transpose(kernel, (3, 2, 0, 1))),
                                     [1, 1], [0, 0], [0, 0], [1, 1], "same_upper")
        compiled = runtime.compile_for_cpu(ov.Model([output], [parameter]))
        requests[kind] = compiled.create_infer_request()
    outputs = {kind: request.infer({0: inputs})[0].copy() for kind, request in requests.items()}
    seconds = {kind: [] for kind in requests}
    for _ in range(repeats):
        for kind, request in requests.items():
            started = time.perf_counter()
            request.infer({0: inputs})
            seconds[kind].append(time.perf_counter() - started)
    difference = np.max(np.abs(outputs["plain"] - outputs["winograd"])) / np.max(
        np.abs(outputs["plain"]))
    return min(seconds["plain"]), min(seconds["winograd"]), float(difference)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from probe.features import openvino_graph

    for channels, filters, size in SHAPES:
        plain, winograd, difference = measure(channels, filters, size, args.batch, args.repeats)
        chosen = openvino_graph.winograd_pays(
            np.zeros((3, 3, channels, filters)), {"strides": [1, 1], "dilations": [1, 1],
                                                   "auto_pad": "same_upper"}, (size, size))
        scope = f"c{channels}_k{filters}_{size}x{size}"
        print(f"{scope} speedup {plain / winograd:.3f}", flush=True)
        print(f"{scope} rel_diff {difference:.1e}", flush=True)
        print(f"{scope} chosen {chosen}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
