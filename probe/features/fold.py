"""BatchNormalization folded into the convolution before it, for inference.

A frozen BatchNormalization is an affine map per channel, `z = (y - mean) * s + beta` with
`s = gamma / sqrt(variance + epsilon)`. When it reads a convolution `y = conv(x, W) + b`
and nothing else reads that convolution, the pair is one convolution with kernel `W * s`
(per output channel) and bias `(b - mean) * s + beta`: the same function, one pass over
the feature map instead of two. ResNet50, InceptionV3, Xception and DenseNet121 have a
BatchNormalization after almost every convolution; folding them makes the forward pass
faster on the CPU (see benchmarks/RESULTS.md). VGG16 has none and comes back unchanged.

The folded model computes the same features up to float rounding (the products are
summed in another order): the largest relative difference is about 1e-6, well inside the
1e-4 that probe treats as "the same features", so folded and unfolded features share a
cache. It is a snapshot for inference only: its folded convolutions no longer follow the
original layers, so fine-tuning and export keep using the unfolded model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

# Set to 0 to extract with the unfolded backbone (for comparisons; the features are the
# same up to float rounding).
FOLD_ENV = "PROBE_FOLD_BATCHNORM"


def enabled() -> bool:
    """Whether extraction folds (the default): PROBE_FOLD_BATCHNORM=0 turns it off."""
    return os.environ.get(FOLD_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def for_inference(model: "keras.Model") -> "keras.Model":
    """`fold_batchnorm(model)` unless PROBE_FOLD_BATCHNORM=0."""
    return fold_batchnorm(model) if enabled() else model


@dataclass(frozen=True)
class _Pair:
    conv: object  # the convolution layer
    norm: object  # the BatchNormalization reading only it


def fold_batchnorm(model: "keras.Model") -> "keras.Model":
    """A frozen copy of the functional `model` in which every BatchNormalization that
    reads a convolution (Conv2D, DepthwiseConv2D, SeparableConv2D's pointwise part, linear
    activation, channels last) read by nothing else is folded into that convolution's
    kernel and bias. All other layers are shared with `model`, not copied; a model with
    nothing to fold is returned as it is.

    >>> fast = fold_batchnorm(keras.applications.ResNet50(weights=None, include_top=False))
    """
    from .._keras import keras

    pairs = foldable_pairs(model)
    if not pairs:
        return model
    by_conv = {id(pair.conv): pair for pair in pairs}
    norms = {id(pair.norm) for pair in pairs}

    def call(layer, *args, **kwargs):
        if id(layer) in norms:  # already applied by the folded convolution before it
            return args[0]
        if id(layer) in by_conv:
            return _folded_conv(by_conv[id(layer)], *args, **kwargs)
        return layer(*args, **kwargs)

    folded = keras.models.clone_model(model, clone_function=lambda layer: layer,
                                      call_function=call)
    folded.trainable = False
    return folded


def foldable_pairs(model) -> list[_Pair]:
    """(convolution, BatchNormalization) pairs of `model` that can be folded."""
    consumers, outputs, uses = _graph(model)
    pairs = []
    for node_id, (node, readers) in consumers.items():
        conv = node.operation
        if not _is_foldable_conv(conv) or uses.get(id(conv), 0) != 1:
            continue
        if len(node.outputs) != 1 or id(node.outputs[0]) in outputs or len(readers) != 1:
            continue
        reader = readers[0]
        norm = reader.operation
        if (_is_foldable_norm(norm) and uses.get(id(norm), 0) == 1
                and len(reader.input_tensors) == 1 and reader.arguments.kwargs.get("training")
                in (None, False)):
            pairs.append(_Pair(conv, norm))
    return pairs


def _graph(model):
    """The model's own nodes, reached from its outputs: {id(node): (node, nodes reading its
    output)}, the ids of the output tensors and how often each layer is called."""
    consumers: dict[int, tuple[object, list]] = {}
    uses: dict[int, int] = {}
    outputs = {id(tensor) for tensor in model.outputs}
    stack = list(model.outputs)
    seen: set[int] = set()
    while stack:
        tensor = stack.pop()
        operation, node_index, _ = tensor._keras_history
        node = operation._inbound_nodes[node_index]
        consumers.setdefault(id(node), (node, []))
        if id(node) in seen:
            continue
        seen.add(id(node))
        uses[id(operation)] = uses.get(id(operation), 0) + 1
        for parent in node.input_tensors:
            p_operation, p_index, _ = parent._keras_history
            p_node = p_operation._inbound_nodes[p_index]
            consumers.setdefault(id(p_node), (p_node, []))[1].append(node)
            stack.append(parent)
    return consumers, outputs, uses


def _is_foldable_conv(layer) -> bool:
    from .._keras import keras

    kinds = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
    if not isinstance(layer, kinds) or not layer.built:
        return False
    config = layer.get_config()
    return config.get("activation") in ("linear", None) and \
        config.get("data_format", "channels_last") == "channels_last"


def _is_foldable_norm(layer) -> bool:
    from .._keras import keras

    if type(layer) is not keras.layers.BatchNormalization or not layer.built:
        return False
    axis = layer.axis if isinstance(layer.axis, int) else None
    return axis in (-1, 3) and not getattr(layer, "renorm", False)


def _folded_conv(pair: _Pair, *args, **kwargs):
    """Call a new convolution with the folded kernel and bias on the pair's input."""
    conv = pair.conv
    config = conv.get_config()
    config["use_bias"] = True
    # Weights are replaced at once: skip drawing random ones (start-up time).
    for key in ("kernel_initializer", "depthwise_initializer", "pointwise_initializer",
                "bias_initializer"):
        if key in config:
            config[key] = "zeros"
    layer = type(conv).from_config(config)
    outputs = layer(*args, **kwargs)
    layer.set_weights(folded_weights(conv, pair.norm))
    layer.trainable = False
    return outputs


def batchnorm_affine(norm) -> tuple[np.ndarray, np.ndarray]:
    """A frozen BatchNormalization as `z = y * scale + shift` per channel (float64)."""
    mean = np.asarray(norm.moving_mean, dtype=np.float64)
    variance = np.asarray(norm.moving_variance, dtype=np.float64)
    gamma = np.asarray(norm.gamma, dtype=np.float64) if norm.scale else np.ones_like(mean)
    beta = np.asarray(norm.beta, dtype=np.float64) if norm.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(variance + norm.epsilon)
    return scale, beta - mean * scale


def folded_weights(conv, norm) -> list[np.ndarray]:
    """The weights of `conv` followed by `norm`, as one convolution with a bias."""
    from .._keras import keras

    weights = conv.get_weights()
    kernel = weights[-2] if conv.use_bias else weights[-1]
    # The per-channel factors in float64; the kernel is scaled in float32 (one rounding).
    scale, shift = batchnorm_affine(norm)
    bias = weights[-1].astype(np.float64) if conv.use_bias else np.zeros_like(scale)
    # Output channel c of a depthwise kernel (h, w, in, multiplier) is in*multiplier + m;
    # every other kernel ends with its output channels.
    new_kernel = kernel * scale.astype(np.float32).reshape(kernel.shape[-2:] if isinstance(
        conv, keras.layers.DepthwiseConv2D) else (-1,))
    new_bias = bias * scale + shift
    leading = weights[:-2] if conv.use_bias else weights[:-1]  # separable: depthwise kernel
    return [w.astype(np.float32) for w in (*leading, new_kernel, new_bias)]
