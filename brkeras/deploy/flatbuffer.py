"""Reading and rewriting TFLite flatbuffers: weight tensors, random-op seeds, storage."""

import numpy as np

from brkeras.errors import ExportError
from tensorflow.lite.python import schema_py_generated as schema_fb  # noqa: E402
from tensorflow.lite.tools import flatbuffer_utils  # noqa: E402

WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_INT8 = schema_fb.TensorType.INT8
_INT32 = schema_fb.TensorType.INT32
_FLOAT32 = schema_fb.TensorType.FLOAT32


def _read(tflite_bytes):
    return flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))


def _tensor_data(mo, t):
    raw = bytes(mo.buffers[t.buffer].data) if mo.buffers[t.buffer].data is not None else b""
    dtype = {_INT8: np.int8, _INT32: np.int32, _FLOAT32: np.float32}.get(t.type)
    if dtype is None or not raw:
        return None
    return np.frombuffer(raw, dtype).reshape([int(s) for s in t.shape]).copy()


def _scales(t):
    q = t.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return None
    return np.asarray(q.scale, np.float32)


def tensor_name(t):
    """A tensor's name as str ("" in a file whose names were stripped)."""
    return t.name.decode() if t.name is not None else ""


def _layer_in_name(tensor_name, layer):
    """True if a TFLite tensor name refers to Keras layer `layer` ('.../layer/...')."""
    parts = tensor_name.split(";")
    return any(layer in p.split("/")[:-1] for p in parts)


def weight_tensors(tflite_bytes):
    """The weight tensors of conv / dense ops: list of dicts.

    Each: op (name), op_index, tensor (index), bias (index or -1), name, shape,
    dtype ('INT8' or 'FLOAT32'), data (np array), scales (per channel or None).
    """
    mo = _read(tflite_bytes)
    sg = mo.subgraphs[0]
    out = []
    for oi, op in enumerate(sg.operators):
        opname = flatbuffer_utils.opcode_to_name(mo, op.opcodeIndex)
        if opname not in WEIGHT_OPS or len(op.inputs) < 2:
            continue
        ti = int(op.inputs[1])
        t = sg.tensors[ti]
        data = _tensor_data(mo, t)
        if data is None:  # weights computed at run time (e.g. DEQUANTIZE of fp16)
            continue
        out.append(dict(op=opname, op_index=oi, tensor=ti,
                        bias=int(op.inputs[2]) if len(op.inputs) > 2 else -1,
                        name=tensor_name(t), shape=[int(s) for s in t.shape],
                        dtype=flatbuffer_utils.type_to_name(t.type), data=data,
                        scales=_scales(t)))
    return out


def weights_by_layer(tflite_bytes, layer_names):
    """{layer: weight-tensor dict} for the Keras layers named; raises if ambiguous."""
    wts = weight_tensors(tflite_bytes)
    out = {}
    for layer in layer_names:
        hits = [w for w in wts if _layer_in_name(w["name"], layer)]
        if len(hits) > 1:
            raise ExportError(f"layer {layer}: {len(hits)} TFLite weight tensors carry its name "
                              f"({[h['name'] for h in hits]}); cannot tell which is its kernel")
        if hits:
            out[layer] = hits[0]
    return out


def dequantized(w):
    """Float values of a weight-tensor dict: scale_c * int8 (axis 0) or the float data."""
    if w["dtype"] != "INT8":
        return w["data"].astype(np.float64)
    s = np.asarray(w["scales"], np.float64)
    shape = [-1] + [1] * (w["data"].ndim - 1)
    return w["data"].astype(np.float64) * (s.reshape(shape) if s.size > 1 else s[0])


def to_tflite_layout(kernel):
    """Keras kernel -> TFLite filter layout: Conv2D HWIO -> OHWI; Dense (in, out) -> (out, in)."""
    kernel = np.asarray(kernel)
    if kernel.ndim == 4:
        return np.transpose(kernel, (3, 0, 1, 2))
    if kernel.ndim == 2:
        return kernel.T
    raise ValueError(f"kernel of rank {kernel.ndim}; expected a Conv2D (4) or Dense (2) kernel")


RANDOM_OPS = ("RANDOM_STANDARD_NORMAL", "RANDOM_UNIFORM", "MULTINOMIAL")


def random_op_seeds(tflite_bytes):
    """[(op name, seed, seed2)] of the random ops of a TFLite file."""
    mo = _read(tflite_bytes)
    out = []
    for op in mo.subgraphs[0].operators:
        name = flatbuffer_utils.opcode_to_name(mo, op.opcodeIndex)
        if name in RANDOM_OPS:
            o = op.builtinOptions
            out.append((name, int(getattr(o, "seed", 0) or 0), int(getattr(o, "seed2", 0) or 0)))
    return out


def unseed_random_ops(tflite_bytes):
    """Sets seed = seed2 = 0 on every random op, so each interpreter draws fresh noise.

    With a global TF seed set at conversion time the op carries fixed seeds and
    every new interpreter replays the same noise sequence (predictable noise);
    LiteRT seeds an op whose two seeds are 0 non-deterministically.
    """
    mo = _read(tflite_bytes)
    for op in mo.subgraphs[0].operators:
        if flatbuffer_utils.opcode_to_name(mo, op.opcodeIndex) in RANDOM_OPS:
            if op.builtinOptions is None:
                op.builtinOptionsType = schema_fb.BuiltinOptions.RandomOptions
                op.builtinOptions = schema_fb.RandomOptionsT()
            op.builtinOptions.seed = 0
            op.builtinOptions.seed2 = 0
    return bytes(flatbuffer_utils.convert_object_to_bytearray(mo))


def storage_summary(tflite_bytes):
    """{dtype: [count of weight tensors, elements]} over conv/dense weights of a file."""
    out = {}
    for w in weight_tensors(tflite_bytes):
        n, e = out.get(w["dtype"], (0, 0))
        out[w["dtype"]] = (n + 1, e + int(w["data"].size))
    return {k: {"tensors": v[0], "elements": v[1]} for k, v in out.items()}


def strip_names(tflite_bytes):
    """The file without its debugging strings: tensor names, subgraph names and
    the model description, as tflite's flatbuffer_utils.strip_strings, but the
    signature defs are kept (their keys are the API of a signature runner).

    The operators, tensors, buffers and quantization parameters are untouched, so
    the file computes exactly what it did. On the default Fashion-MNIST model the
    names were 0.7 of 10.05 KB of the zipped pruned ternary file (0.8 of 23.7 KB of
    the float one). Weight checks that find a layer by tensor name
    (weights_by_layer) must run before this.
    """
    mo = _read(tflite_bytes)
    mo.description = None
    for sg in mo.subgraphs:
        sg.name = None
        for t in sg.tensors:
            t.name = None
    return bytes(flatbuffer_utils.convert_object_to_bytearray(mo))


def signatures(tflite_bytes):
    """{signature key: (input names, output names)} of a file's signature defs."""
    mo = _read(tflite_bytes)
    return {sd.signatureKey.decode(): ([m.name.decode() for m in sd.inputs],
                                       [m.name.decode() for m in sd.outputs])
            for sd in (mo.signatureDefs or [])}


def add_signature(tflite_bytes, key, input_names, output_names):
    """The file with one signature def `key` over subgraph 0: input_names[i] names
    the subgraph's i-th input tensor, output_names[j] its j-th output (the keys of
    a LiteRT signature runner). Replaces any signature def of that key."""
    mo = _read(tflite_bytes)
    sg = mo.subgraphs[0]
    if len(input_names) != len(sg.inputs) or len(output_names) != len(sg.outputs):
        raise ExportError(f"signature {key!r}: {len(input_names)} input and {len(output_names)} "
                          f"output names for a subgraph of {len(sg.inputs)} inputs and "
                          f"{len(sg.outputs)} outputs")

    def tensor_map(name, index):
        m = schema_fb.TensorMapT()
        m.name = name.encode()
        m.tensorIndex = int(index)
        return m

    sd = schema_fb.SignatureDefT()
    sd.signatureKey = key.encode()
    sd.subgraphIndex = 0
    sd.inputs = [tensor_map(n, i) for n, i in zip(input_names, sg.inputs)]
    sd.outputs = [tensor_map(n, i) for n, i in zip(output_names, sg.outputs)]
    keep = [s for s in (mo.signatureDefs or []) if s.signatureKey != sd.signatureKey]
    mo.signatureDefs = keep + [sd]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(mo))
