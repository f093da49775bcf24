"""Folding inference BatchNorm into the convolution before it.

In a pre-activation block, `conv1 -> bn2 -> relu2` has a BatchNorm that reads
nothing but a bias-free convolution. In inference mode that BatchNorm is a
per-channel affine map, so with s = gamma / sqrt(moving_variance + epsilon)

    bn(conv(x; k)) = conv(x; k * s) + (b - moving_mean) * s + beta

(b: the convolution's bias, 0 without one; s scales the output-channel axis of
k). The folded model computes the same function up to float rounding with one
op fewer per pair, forward and backward: this is what the TFLite converter does
at export, and what the attacks of the evaluation run on (robust/evaluation.py).
`bn1` of a block follows the residual sum and is followed by a ReLU, so it
cannot be folded into either of its neighbours and stays.
"""

import numpy as np

from brkeras.nn import graph
from brkeras._keras import keras


def _last_axis(bn, rank):
    axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    return len(axis) == 1 and axis[0] in (-1, rank - 1)


def foldable_pairs(model, sites=None):
    """{id(conv): bn} of the plain float32 channels-last Conv2D layers (linear
    activation, one group) whose output is read only by a BatchNormalization
    over the channel axis. sites: graph.call_sites(model), if already known."""
    sites = graph.call_sites(model) if sites is None else sites
    readers, producer = {}, {}
    for layer, node in sites:
        for t in graph.flat(node.input_tensors):
            readers[id(t)] = readers.get(id(t), 0) + 1
        for t in graph.flat(node.output_tensors):
            producer[id(t)] = layer
    for t in model.outputs:
        readers[id(t)] = readers.get(id(t), 0) + 1
    pairs = {}
    for layer, node in sites:
        ins = graph.flat(node.input_tensors)
        if type(layer) is not keras.layers.BatchNormalization or len(ins) != 1:
            continue
        conv = producer.get(id(ins[0]))
        if (type(conv) is keras.layers.Conv2D and readers[id(ins[0])] == 1
                and conv.get_config()["activation"] == "linear" and conv.groups == 1
                and conv.data_format == "channels_last" and _last_axis(layer, ins[0].shape.rank)
                # a bf16 conv would round k * s and the bias that BatchNorm kept in float32
                and conv.compute_dtype == "float32" and layer.compute_dtype == "float32"):
            pairs[id(conv)] = layer
    return pairs


def folded_weights(kernel, bias, bn):
    """(kernel * s, (bias - moving_mean) * s + beta) of a conv followed by `bn`."""
    gamma = bn.gamma.numpy() if bn.scale else 1.0
    beta = bn.beta.numpy() if bn.center else 0.0
    s = gamma / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    bias = 0.0 if bias is None else bias
    return ((kernel * s).astype(kernel.dtype),
            ((bias - bn.moving_mean.numpy()) * s + beta).astype(kernel.dtype))


def fold_batchnorm(model):
    """(model with every foldable conv -> BatchNorm pair folded, number of pairs).

    Inference only: the folded convolutions are new layers (same names, with a
    bias) holding k * s and the folded bias; every other layer is shared with
    `model`. A model with no pair is returned as is. Raises ValueError (from
    graph.call_sites) for a model that calls a layer more than once.
    """
    sites = graph.call_sites(model)
    pairs = foldable_pairs(model, sites)
    if not pairs or len(model.inputs) != 1 or len(model.outputs) != 1:
        return model, 0
    folded_bns = {id(bn) for bn in pairs.values()}

    def substitute(layer, node, args):
        if id(layer) in folded_bns:
            return args  # its affine map now lives in the conv before it
        if id(layer) not in pairs:
            return None
        cfg = dict(layer.get_config(), use_bias=True)
        conv = keras.layers.Conv2D.from_config(cfg)
        out = conv(args)
        weights = layer.get_weights()
        conv.set_weights(folded_weights(weights[0], weights[1] if len(weights) > 1 else None,
                                        pairs[id(layer)]))
        return out

    inp = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype,
                      name=model.inputs[0].name.split(":")[0])
    new = graph.replay(sites, {id(model.inputs[0]): inp}, substitute)
    return keras.Model(inp, new[id(model.outputs[0])], name=model.name + "_folded"), len(pairs)
