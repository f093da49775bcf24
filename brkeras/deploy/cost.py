"""Compute and storage cost of a model: multiply-accumulates, parameters, zipped size.

MACs per example (batch excluded), counted on conv / dense ops only:
  CONV_2D           H_out * W_out * C_out * kh * kw * C_in_per_group  (filter OHWI)
  DEPTHWISE_CONV_2D H_out * W_out * C_out * kh * kw                  (filter 1HWO)
  FULLY_CONNECTED   rows * out_units * in_units (rows = output positions per example)
weights = elements of those filters, params = weights + bias elements. Other ops
(adds, pooling, BN if not folded) are not counted. The same conventions hold for
`tflite_macs` (read from the flatbuffer) and `keras_macs` (from layer shapes), so a
Keras model and its TFLite file give the same macs and weights; TFLite params can be
larger where BatchNorm was folded into a bias the Keras conv did not have.
"""

import io
import math
import os
import zipfile

import numpy as np

from brkeras._keras import keras, tf  # noqa: F401
from tensorflow.lite.tools import flatbuffer_utils  # noqa: E402

from brkeras.deploy.flatbuffer import tensor_name

COST_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _resolved_shapes(tflite_bytes):
    """{tensor index: shape} of subgraph 0 after one invoke on zeros (builtin kernels,
    so every op sets its output shape), or None if the file does not run here.
    A file with a dynamic batch stores placeholder shapes for tensors behind a
    computed RESHAPE, resolved only at invoke (a Dense on a feature map showed a
    [1, 3] output for [4, 3])."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType  # pylint: disable=g-import-not-at-top

        it = Interpreter(model_content=bytes(tflite_bytes), num_threads=1,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        it.allocate_tensors()
        for d in it.get_input_details():
            it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
        it.invoke()
        return {d["index"]: [int(s) for s in d["shape"]] for d in it.get_tensor_details()}
    except (ImportError, RuntimeError, ValueError):
        return None


def tflite_macs(tflite_bytes):
    """dict(macs, weights, params, per_op) of the main subgraph of a TFLite file.

    per_op: one dict per conv / dense op (op, op_index, name of its output,
    filter shape, output shape, macs, weights, params). Shapes are those LiteRT
    resolves at the file's input shape (the flatbuffer's if it cannot load it);
    the batch is the first dimension of the first input and MACs are per example.
    A tensor read by several ops (a shared weight or deduplicated bias) counts once
    in weights / params.
    """
    mo = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    sg = mo.subgraphs[0]
    resolved = _resolved_shapes(tflite_bytes) or {}

    def _shape(i):
        if i in resolved:
            return resolved[i]
        t = sg.tensors[i]
        return [int(s) for s in t.shape] if t.shape is not None else []

    batch = max(1, (_shape(int(sg.inputs[0])) or [1])[0]) if len(sg.inputs) else 1
    per_op, seen = [], set()
    macs = weights = params = 0
    for oi, op in enumerate(sg.operators):
        name = flatbuffer_utils.opcode_to_name(mo, op.opcodeIndex)
        if name not in COST_OPS or op.inputs is None or len(op.inputs) < 2:
            continue
        w = _shape(int(op.inputs[1]))
        out = _shape(int(op.outputs[0]))
        if name == "CONV_2D":
            n = out[1] * out[2] * out[3] * w[1] * w[2] * w[3]
        elif name == "DEPTHWISE_CONV_2D":
            n = out[1] * out[2] * out[3] * w[1] * w[2]
        else:  # FULLY_CONNECTED: filter (out_units, in_units)
            rows = math.prod(out[:-1]) // batch if out else 1
            n = max(rows, 1) * w[0] * w[1]
        bi = int(op.inputs[2]) if len(op.inputs) > 2 else -1
        nw = math.prod(w)
        nb = math.prod(_shape(bi)) if bi >= 0 else 0
        per_op.append(dict(op=name, op_index=oi, name=tensor_name(sg.tensors[int(op.outputs[0])]),
                           filter_shape=w, output_shape=out, macs=int(n), weights=int(nw),
                           params=int(nw + nb)))
        macs += n
        fi = int(op.inputs[1])
        if fi not in seen:
            seen.add(fi)
            weights += nw
            params += nw
        if bi >= 0 and bi not in seen:
            seen.add(bi)
            params += nb
    return dict(macs=int(macs), weights=int(weights), params=int(params), per_op=per_op)


def _own_nodes(model, layer):
    """The nodes of `layer` that belong to `model` (a layer reused by another model,
    e.g. a deploy copy, has nodes there too)."""
    nodes = layer.inbound_nodes
    keys = getattr(model, "_network_nodes", None)
    node_key = getattr(model, "_node_key", None)
    if keys is None or node_key is None:
        return nodes[:1]
    return [n for i, n in enumerate(nodes) if node_key(layer, i) in keys]


def _out_shapes(node):
    s = node.output_shapes
    return s if isinstance(s, list) else [s]


def keras_macs(model):
    """dict(macs, weights, params, per_layer) of a tf_keras functional model, per example.

    Counts Conv2D, DepthwiseConv2D and Dense (a tfmot QuantizeWrapper is unwrapped
    through `.layer`; nested models are recursed), once per call of the layer in
    this model, with the conventions of tflite_macs (channels_last).
    """
    per_layer = []
    macs = weights = params = 0
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, keras.Model):
            sub = keras_macs(inner)
            per_layer.extend(sub["per_layer"])
            macs += sub["macs"] * max(1, len(_own_nodes(model, layer)))
            weights += sub["weights"]
            params += sub["params"]
            continue
        if isinstance(inner, keras.layers.DepthwiseConv2D):
            kh, kw, cin, mult = [int(s) for s in inner.depthwise_kernel.shape]
            nw, per_pos = kh * kw * cin * mult, kh * kw  # per output element
        elif isinstance(inner, keras.layers.Conv2D):
            kh, kw, cin_g, cout = [int(s) for s in inner.kernel.shape]
            nw, per_pos = kh * kw * cin_g * cout, kh * kw * cin_g
        elif isinstance(inner, keras.layers.Dense):
            cin, cout = [int(s) for s in inner.kernel.shape]
            nw, per_pos = cin * cout, cin
        else:
            continue
        if getattr(inner, "data_format", "channels_last") == "channels_first":
            raise ValueError(f"layer {layer.name}: channels_first is not counted; "
                             "convert the model to channels_last")
        nb = int(np.prod(inner.bias.shape)) if getattr(inner, "use_bias", False) else 0
        n = 0
        for node in _own_nodes(model, layer):
            shape = _out_shapes(node)[0]
            # Output elements per example times the MACs of each.
            n += math.prod(int(s) for s in shape[1:]) * per_pos
        per_layer.append(dict(layer=layer.name, kind=type(inner).__name__, macs=int(n),
                              weights=int(nw), params=int(nw + nb)))
        macs += n
        weights += nw
        params += nw + nb
    return dict(macs=int(macs), weights=int(weights), params=int(params), per_layer=per_layer)


def zipped_size(path_or_bytes, arcname=None):
    """Bytes of a ZIP_DEFLATED archive holding the file (tfmot's compressed-size
    convention; archived as its base name, or "model.tflite" for bytes)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, name = bytes(path_or_bytes), arcname or "model.tflite"
    else:
        with open(path_or_bytes, "rb") as fh:
            data = fh.read()
        name = arcname or os.path.basename(str(path_or_bytes))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, data)
    return len(buf.getvalue())
