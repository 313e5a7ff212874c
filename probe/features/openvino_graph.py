"""The OpenVINO graph of a Keras backbone, written layer by layer from its weights.

`openvino.convert_model` reads a Keras model by tracing its TensorFlow function and
translating the traced graph: 1.6-7.2 s for the five backbones on two cores, more than the
rest of a first extraction's start-up together (benchmarks/RESULTS.md). The backbones are
made of a dozen kinds of layers, each one OpenVINO operation or two, so probe writes the
graph directly from the layers and their weights in a fraction of a second. A model with
any other kind of layer (or option) is not written here: `build` raises
`UnsupportedLayer` and the caller converts it the traced way.

The graph runs channels first (OpenVINO's convolutions are NCHW): the input is transposed
once, and a spatial output (pooling "none") is transposed back, so the model takes and
gives the Keras model's NHWC arrays. A BatchNormalization that reads a convolution is
folded into that convolution's weights as `probe.features.fold` does (without cloning the Keras
model, which costs about a second); any other becomes a per-channel multiply and add.

Writing the graph also lets probe choose how a convolution is computed. A wide 3x3
convolution is written as a Winograd convolution (`winograd_conv3x3`): 2.25 times fewer
multiplications for the same outputs up to float rounding (about 3e-6 relative), where
neither OpenVINO nor TensorFlow offers one on AVX2 CPUs. It is what makes VGG16, 13 such
convolutions, faster than the machine's float32 multiply-add rate allows a plain one to be.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import keras

# Keras channels-last axes of a 4-D tensor, as positions in the channels-first graph.
NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1, -1: 1, -2: 3, -3: 2, -4: 0}


# Set to 0 to write every convolution as a plain one (for comparisons).
WINOGRAD_ENV = "PROBE_WINOGRAD"
# Where a 3x3 convolution is written as a Winograd one: elsewhere the transforms cost as
# much as they save or more. Measured on two AVX2 cores, batch 32 (Winograd's speed-up):
# 512 -> 512 at 28x28 1.66, at 14x14 1.58, at 8x8 1.24, at 7x7 0.86; 256 -> 256 at 56x56
# 1.42, at 8x8 1.02; 128 -> 256 at 56x56 1.15; 128 -> 128 at 16-112 0.93-1.03; 64 -> 64 at
# 224x224 0.73.
WINOGRAD_MIN_CHANNEL_PRODUCT = 128 * 256  # input channels x filters
WINOGRAD_MIN_SIZE = 8  # height and width


class UnsupportedLayer(Exception):
    """A layer (or a layer option) this module does not write; convert by tracing."""


def build(model: "keras.Model"):
    """The OpenVINO model computing `model` (a functional Keras model of one float32
    (batch, height, width, channels) input of a fixed size) from its current weights, for
    any batch size. Raises UnsupportedLayer for a layer it does not know."""
    import openvino as ov
    from openvino import opset13 as ops

    from . import fold

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedLayer("expected one input and one output")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or None in shape[1:]:
        raise UnsupportedLayer(f"expected an input of a fixed size. Received: {shape}")
    parameter = ops.parameter([-1, *shape[1:]], np.float32, name="inputs")
    channels_first = ops.transpose(parameter, _const([0, 3, 1, 2], np.int64))
    values = {id(model.inputs[0]): _output(channels_first)}
    folded = {id(pair.conv): pair for pair in fold.foldable_pairs(model)} if fold.enabled() else {}
    skipped = {id(pair.norm) for pair in folded.values()}
    for node in _nodes_in_order(model):
        layer = node.operation
        if type(layer).__name__ == "InputLayer":
            continue
        if id(layer) in skipped:  # applied by the convolution before it
            values[id(node.outputs[0])] = values[id(node.input_tensors[0])]
            continue
        write = _WRITERS.get(type(layer).__name__)
        if write is None:
            raise UnsupportedLayer(type(layer).__name__)
        ranks = {len(tensor.shape) for tensor in node.input_tensors}
        # spatial layers read 4-D tensors; after global pooling only these three may follow
        if len(node.outputs) != 1 or ranks not in ({4}, {2}) or \
                (ranks == {2} and write not in (_activation_layer, _add, _concatenate)):
            raise UnsupportedLayer(f"{layer.name}: inputs of rank {sorted(ranks)}")
        inputs = [values[id(tensor)] for tensor in node.input_tensors]
        pair = folded.get(id(layer))
        weights = fold.folded_weights(pair.conv, pair.norm) if pair else layer.get_weights()
        values[id(node.outputs[0])] = _output(write(layer, inputs, weights, ops))
    output_tensor = model.outputs[0]
    output = values[id(output_tensor)]
    if len(output_tensor.shape) == 4:
        output = ops.transpose(output, _const([0, 2, 3, 1], np.int64))
    return ov.Model([output], [parameter], model.name)


def _nodes_in_order(model) -> list:
    """The model's nodes reached from its output, each after the nodes it reads."""
    ordered, done = [], set()
    stack = [(model.outputs[0], False)]
    while stack:
        tensor, parents_done = stack.pop()
        operation, index, _ = tensor._keras_history
        node = operation._inbound_nodes[index]
        if id(node) in done:
            continue
        if parents_done:
            done.add(id(node))
            ordered.append(node)
            continue
        stack.append((tensor, True))
        stack.extend((parent, False) for parent in node.input_tensors)
    return ordered


def _output(value):
    """The output of an OpenVINO node (operations return nodes, some several outputs)."""
    return value.output(0) if hasattr(value, "output") else value


def _const(values, dtype=np.float32):
    from openvino import opset13 as ops

    return ops.constant(np.asarray(values, dtype=dtype))


def _config(layer, **expected) -> dict:
    """The layer's config, checked to have the option values this module writes."""
    config = layer.get_config()
    for key, allowed in expected.items():
        if config.get(key) not in allowed:
            raise UnsupportedLayer(f"{layer.name}: {key}={config.get(key)!r}")
    return config


def _auto_pad(padding: str) -> str:
    # TensorFlow's "same" puts the extra row and column at the end, as "same_upper" does
    return {"valid": "valid", "same": "same_upper"}[padding]


def _channel_vector(values: np.ndarray):
    return _const(np.asarray(values, dtype=np.float32).reshape(1, -1, 1, 1))


def _activation(name: str, output, ops):
    if name in ("linear", None):
        return output
    if name == "relu":
        return ops.relu(output)
    raise UnsupportedLayer(f"activation {name!r}")


def _conv_options(layer) -> dict:
    config = _config(layer, data_format=("channels_last",), padding=("valid", "same"),
                     activation=("linear", "relu", None))
    if config.get("groups", 1) != 1:
        raise UnsupportedLayer(f"{layer.name}: groups={config['groups']}")
    return dict(strides=list(config["strides"]), pads_begin=[0, 0], pads_end=[0, 0],
                dilations=list(config["dilation_rate"]), auto_pad=_auto_pad(config["padding"]))


def _finish_conv(layer, output, weights: list, kernels: int, ops):
    """The bias (the weight after the layer's `kernels` kernels, where there is one) and
    the activation."""
    if len(weights) > kernels:
        output = ops.add(output, _channel_vector(weights[kernels]))
    return _activation(layer.get_config()["activation"], output, ops)


def _conv2d(layer, inputs, weights, ops):
    options = _conv_options(layer)
    size = tuple(inputs[0].get_partial_shape()[axis].get_length() for axis in (2, 3))
    if winograd_enabled() and winograd_pays(weights[0], options, size):
        output = winograd_conv3x3(inputs[0], weights[0], ops)
    else:
        kernel = np.transpose(weights[0], (3, 2, 0, 1))  # (h, w, in, out) -> (out, in, h, w)
        output = ops.convolution(inputs[0], _const(kernel), **options)
    return _finish_conv(layer, output, weights, 1, ops)


def winograd_enabled() -> bool:
    """Whether large 3x3 convolutions are written as Winograd convolutions (the default):
    PROBE_WINOGRAD=0 turns it off (for comparisons; the features are the same up to
    float rounding)."""
    return os.environ.get(WINOGRAD_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def winograd_pays(kernel: np.ndarray, options: dict, size: tuple[int, int]) -> bool:
    """A 3x3 convolution of stride 1 and "same" padding, wide and large enough (`size`: its
    input's height and width) that the transforms cost less than the multiplications they
    save (WINOGRAD_MIN_CHANNEL_PRODUCT)."""
    rows, columns, channels, filters = kernel.shape
    return ((rows, columns) == (3, 3) and options["strides"] == [1, 1]
            and options["dilations"] == [1, 1] and options["auto_pad"] == "same_upper"
            and channels * filters >= WINOGRAD_MIN_CHANNEL_PRODUCT
            and min(size) >= WINOGRAD_MIN_SIZE)


def winograd_conv3x3(inputs, kernel: np.ndarray, ops):
    """A 3x3 "same" convolution as Winograd's F(2x2, 3x3) (Lavin and Gray, 2016): each
    2x2 block of outputs from a 4x4 tile of inputs with 16 multiplications per channel pair
    instead of 36, so 2.25 times fewer in the product that dominates. Written with
    operations OpenVINO runs fast on the CPU:

    1. the input transform B^T d B of every tile, a 4x4 stride-2 convolution per channel
       (16 outputs each; the tiles overlap by two, hence the stride);
    2. the products, one 1x1 convolution per transform position (16 groups, a matrix
       product each, with the transformed kernel G g G^T);
    3. the output transform A^T m A, a 1x1 convolution per filter (16 values to 4), and
       depth-to-space puts each tile's 2x2 outputs in place.

    An odd height or width is padded by one more row or column, cut off at the end."""
    channels, filters = kernel.shape[2], kernel.shape[3]
    height, width = (inputs.get_partial_shape()[axis].get_length() for axis in (2, 3))
    extra = [height % 2, width % 2]  # tiles cover an even size
    spread = np.einsum("ai,bj->abij", _WINOGRAD_BT, _WINOGRAD_BT).reshape(1, 16, 1, 4, 4)
    tiles = ops.group_convolution(
        inputs, _const(np.broadcast_to(spread, (channels, 16, 1, 4, 4))), [2, 2], [1, 1],
        [1 + extra[0], 1 + extra[1]], [1, 1])  # channel c * 16 + position
    tiles = ops.shuffle_channels(tiles, 1, channels)  # position * channels + c
    transformed = np.einsum("ai,ijck,bj->abkc", _WINOGRAD_G, kernel.astype(np.float64),
                            _WINOGRAD_G)
    products = ops.group_convolution(
        tiles, _const(transformed.reshape(16, filters, channels, 1, 1)), [1, 1], [0, 0],
        [0, 0], [1, 1])  # position * filters + k
    products = ops.shuffle_channels(products, 1, 16)  # k * 16 + position
    gather = np.einsum("pa,qb->pqab", _WINOGRAD_AT, _WINOGRAD_AT).reshape(1, 4, 16, 1, 1)
    blocks = ops.group_convolution(
        products, _const(np.broadcast_to(gather, (filters, 4, 16, 1, 1))), [1, 1], [0, 0],
        [0, 0], [1, 1])  # k * 4 + (row, column) in the block
    output = _output(ops.depth_to_space(blocks, "depth_first", 2))
    if any(extra):
        output = ops.slice(output, _const([0, 0], np.int64), _const([height, width], np.int64),
                           _const([1, 1], np.int64), _const([2, 3], np.int64))
    return output


# Winograd F(2x2, 3x3)'s transforms (Lavin and Gray, "Fast Algorithms for Convolutional
# Neural Networks", 2016): output = A^T [(G g G^T) * (B^T d B)] A for a 4x4 tile d.
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)


def _depthwise(inputs, kernel: np.ndarray, options: dict, ops):
    """A depthwise convolution of a (h, w, in, multiplier) kernel: one group per input
    channel, output channel c * multiplier + m as in Keras."""
    height, width, channels, multiplier = kernel.shape
    grouped = np.transpose(kernel, (2, 3, 0, 1)).reshape(channels, multiplier, 1, height, width)
    return ops.group_convolution(inputs, _const(grouped), **options)


def _depthwise_conv2d(layer, inputs, weights, ops):
    output = _depthwise(inputs[0], weights[0], _conv_options(layer), ops)
    return _finish_conv(layer, output, weights, 1, ops)


def _separable_conv2d(layer, inputs, weights, ops):
    depthwise = _depthwise(inputs[0], weights[0], _conv_options(layer), ops)
    pointwise = np.transpose(weights[1], (3, 2, 0, 1))
    output = ops.convolution(depthwise, _const(pointwise), [1, 1], [0, 0], [0, 0], [1, 1])
    return _finish_conv(layer, output, weights, 2, ops)


def _batch_normalization(layer, inputs, weights, ops):
    if layer.axis not in (-1, 3, [-1], [3]) or getattr(layer, "renorm", False):
        raise UnsupportedLayer(f"{layer.name}: axis={layer.axis}")
    from .fold import batchnorm_affine

    scale, shift = batchnorm_affine(layer)
    return ops.add(ops.multiply(inputs[0], _channel_vector(scale)), _channel_vector(shift))


def _activation_layer(layer, inputs, weights, ops):
    return _activation(layer.get_config()["activation"], inputs[0], ops)


def _pool_options(layer) -> dict:
    config = _config(layer, data_format=("channels_last",), padding=("valid", "same"))
    strides = config["strides"] or config["pool_size"]
    return dict(strides=list(strides), pads_begin=[0, 0], pads_end=[0, 0],
                kernel_shape=list(config["pool_size"]), rounding_type="floor",
                auto_pad=_auto_pad(config["padding"]))


def _max_pooling2d(layer, inputs, weights, ops):
    return ops.max_pool(inputs[0], dilations=[1, 1], **_pool_options(layer))  # values, indices


def _average_pooling2d(layer, inputs, weights, ops):
    # TensorFlow's "same" average leaves the padding out of the count
    return ops.avg_pool(inputs[0], exclude_pad=True, **_pool_options(layer))


def _zero_padding2d(layer, inputs, weights, ops):
    config = _config(layer, data_format=("channels_last",))
    (top, bottom), (left, right) = config["padding"]
    return ops.pad(inputs[0], _const([0, 0, top, left], np.int64),
                   _const([0, 0, bottom, right], np.int64), "constant", _const(0.0))


def _global_pooling(reduce: Callable):
    def write(layer, inputs, weights, ops):
        _config(layer, data_format=("channels_last",), keepdims=(False, None))
        return reduce(ops)(inputs[0], _const([2, 3], np.int64), False)
    return write


def _concatenate(layer, inputs, weights, ops):
    axis = layer.get_config()["axis"]
    rank = len(inputs[0].get_partial_shape())
    if axis not in NCHW_AXIS or (rank == 2 and axis not in (-1, 1)):
        raise UnsupportedLayer(f"{layer.name}: axis={axis}")
    return ops.concat(inputs, NCHW_AXIS[axis] if rank == 4 else 1)


def _add(layer, inputs, weights, ops):
    output = inputs[0]
    for other in inputs[1:]:
        output = ops.add(output, other)
    return output


_WRITERS = {
    "Conv2D": _conv2d,
    "DepthwiseConv2D": _depthwise_conv2d,
    "SeparableConv2D": _separable_conv2d,
    "BatchNormalization": _batch_normalization,
    "Activation": _activation_layer,
    "MaxPooling2D": _max_pooling2d,
    "AveragePooling2D": _average_pooling2d,
    "ZeroPadding2D": _zero_padding2d,
    "GlobalAveragePooling2D": _global_pooling(lambda ops: ops.reduce_mean),
    "GlobalMaxPooling2D": _global_pooling(lambda ops: ops.reduce_max),
    "Concatenate": _concatenate,
    "Add": _add,
}
