"""INT4 conv filters in a TFLite file: rewrite exact low-bit int8 filters as packed INT4.

A Binary-Relax filter exported with exact levels (exact_levels.fix_quantized_weights)
stores int8 = k * m per output channel c, scale s_c, with integer |k| <= K and
m = floor(127 / K) (m = 127 for ternary/binary, 18 for 4-bit). The same filter as
INT4 (TensorType.INT4 = 17) stores k with scale s_c * m: identical real values.

Packing (LiteRT tflite/kernels/internal/portable_tensor_utils.cc,
UnpackPackedIntToInt8 / UnpackDenseInt4IntoInt8 / PackInt8IntoDenseInt): the tensor
is flattened row-major and element 2i goes to the low nibble of byte i, element
2i + 1 to the high nibble (two's complement, sign-extended on unpack); an odd
count puts the last element in the low nibble of a final byte (high nibble 0).
The buffer holds ceil(n / 2) bytes (tflite/util.cc BytesRequired).

Full-int8 convs: the int32 accumulator sum(q_x * q_w) + bias is in units of
s_in * s_c; with q_w divided by m it counts in s_in * s_c * m, so the bias becomes
round(bias / m) with scale x m (without it the logits were wrong by up to 13, SPEC 9).
Those coarser bias steps are the rewrite's error (plus 1-ulp changes of the float
scale products): on the test models the mean |Keras - INT4 logit| was up to 2x the
int8 file's for a ternary depthwise conv (few taps per output); stretch=True stores
ternary levels as +-7 (scale x 127 / 7, bias / (127 / 7)) and kept the int8 file's
error. Hybrid (dynamic-range) convs keep their float bias. The builtin kernels unpack INT4
into int8 at each Eval; XNNPACK does not take INT4 conv filters, so those ops run on
the builtin kernels (smaller file, slower op).
"""

import math

import numpy as np

from brkeras._keras import tf  # noqa: F401  (TF chosen through brkeras)
from tensorflow.lite.python import schema_py_generated as schema_fb  # noqa: E402
from tensorflow.lite.tools import flatbuffer_utils  # noqa: E402

from brkeras.deploy.flatbuffer import tensor_name

INT4 = schema_fb.TensorType.INT4
_INT8 = schema_fb.TensorType.INT8
_INT32 = schema_fb.TensorType.INT32
_FLOAT32 = schema_fb.TensorType.FLOAT32
INT4_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
# Output-channel axis of the filter: conv OHWI, depthwise 1HWO.
_CHANNEL_AXIS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3}
MAX_K = 7  # symmetric int4 levels [-7, 7]


# ---------------------------------------------------------------------------
# Packing


def pack_int4(values):
    """Packs ints in [-8, 7] two per byte, low nibble first (LiteRT's order).

    values: any shape, flattened row-major. Returns np.uint8 of ceil(n / 2) bytes;
    an odd count leaves the last byte's high nibble 0.
    """
    v = np.asarray(values).reshape(-1)
    if v.size and (v.min() < -8 or v.max() > 7):
        raise ValueError(f"int4 values must be in [-8, 7]; got [{v.min()}, {v.max()}]")
    nib = (v.astype(np.int16) & 0x0F).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed, count):
    """Inverse of pack_int4: the first `count` int4 values as np.int8 (flat)."""
    p = np.frombuffer(bytes(packed), np.uint8) if isinstance(packed, (bytes, bytearray)) \
        else np.asarray(packed).astype(np.uint8).reshape(-1)
    count = int(count)
    if p.size < (count + 1) // 2:
        raise ValueError(f"{p.size} bytes hold at most {2 * p.size} int4 values, not {count}")
    out = np.empty(2 * p.size, np.int16)
    out[0::2] = p & 0x0F
    out[1::2] = p >> 4
    out = np.where(out >= 8, out - 16, out)  # sign-extend the nibble
    return out[:count].astype(np.int8)


# ---------------------------------------------------------------------------
# Flatbuffer helpers (object API)


def _read(tflite_bytes):
    return flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))


def _write(mo):
    return bytes(flatbuffer_utils.convert_object_to_bytearray(mo))


def _raw(mo, t):
    b = mo.buffers[t.buffer]
    return bytes(b.data) if b is not None and b.data is not None else b""


def _array(mo, t, dtype):
    raw = _raw(mo, t)
    if not raw:
        return None
    return np.frombuffer(raw, dtype).reshape([int(s) for s in t.shape]).copy()


def _qparams(t):
    q = t.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return None, None, 0
    zp = np.zeros(len(q.scale), np.int64) if q.zeroPoint is None else np.asarray(q.zeroPoint)
    return np.asarray(q.scale, np.float64), zp, int(q.quantizedDimension or 0)


def _op_name(mo, op):
    return flatbuffer_utils.opcode_to_name(mo, op.opcodeIndex)


def _fit(data, axis, per_channel, max_level, stretch=False):
    """(factor per channel, k, m, mult, reason): the INT4 levels are k = int8 / factor,
    factor = m / mult for live channels and 1 for all-zero ones (their scale and
    bias stay exact); mult = floor(7 / max|int8 / m|) with stretch, else 1;
    reason is None if the filter fits."""
    v = np.moveaxis(data.astype(np.int64), axis, 0).reshape(data.shape[axis], -1) \
        if per_channel else data.astype(np.int64).reshape(1, -1)
    nz = np.abs(v[v != 0])
    if nz.size == 0:
        return None, None, None, 1, "all zero"
    m = 127 // int(max_level) if max_level else int(np.gcd.reduce(nz))
    if m < 1:
        return None, None, None, 1, f"max_level={max_level} gives m < 1"
    if np.any(nz % m):
        return None, None, None, 1, f"int8 values are not all multiples of m={m}"
    if nz.max() // m > MAX_K:
        return None, None, None, 1, f"levels up to {nz.max() // m} with m={m} exceed |k| <= {MAX_K}"
    live = np.any(v != 0, axis=1)
    factor = np.where(live, m, 1) if per_channel else np.array([m])
    shape = [1] * data.ndim
    if per_channel:
        shape[axis] = -1
    k = data.astype(np.int64) // factor.reshape(shape)
    mult = MAX_K // int(np.abs(k).max()) if stretch else 1
    # Stretched levels k * mult with scale s * m / mult: same values, and the
    # requantized bias keeps mult times finer steps.
    factor = np.where(live, m / mult, 1.0) if per_channel else np.array([m / mult])
    return factor, (k * mult).astype(np.int8), m, mult, None


def to_int4(tflite_bytes, max_level=None, ops=INT4_OPS, stretch=False):
    """Rewrites exact low-bit int8 conv filters of a TFLite file as INT4.

    A CONV_2D / DEPTHWISE_CONV_2D filter is rewritten when it is a constant
    symmetric int8 tensor whose nonzero values are all k * m, |k| <= 7, for one m
    per tensor: m = gcd of the nonzero |int8| values, or floor(127 / max_level)
    when given (1 = ternary/binary, 7 = 4-bit). It then holds k as INT4 with
    scale s_c * m (all-zero channels keep k = 0 and scale s_c); a full-int8 conv's
    int32 bias becomes round(b / m) with scale x m. Hybrid convs (float input)
    keep their float bias; depthwise is rewritten only with int8 input (LiteRT's
    hybrid depthwise takes int8 filters only). Anything else is left as it was.

    stretch: store k * mult, mult = floor(7 / max|k|), with scale s_c * m / mult
    (same real filter); the int32 bias is then divided by m / mult instead of m,
    so its rounding is mult times finer (ternary: 7x). ops: a subset of INT4_OPS.

    Returns (new bytes, report): report = dict(rewritten=[tensor names],
    tensors=[one dict per filter seen: op, op_index, subgraph, tensor, name, shape,
    rewritten, reason (why not, or None), m, mult, max_k (largest stored |level|),
    bias_rescaled]). The input bytes are returned as they were if nothing fits.
    """
    if not set(ops) <= set(INT4_OPS):
        raise ValueError(f"ops={ops}; to_int4 rewrites only {INT4_OPS}")
    mo = _read(tflite_bytes)
    buf_users = {}
    for sg in mo.subgraphs:
        for t in sg.tensors:
            buf_users[t.buffer] = buf_users.get(t.buffer, 0) + 1

    def put(sg, ti, data):
        t = sg.tensors[ti]
        buf = schema_fb.BufferT()
        buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
        if buf_users.get(t.buffer, 0) == 1:
            mo.buffers[t.buffer] = buf
        else:  # deduplicated constant shared with other tensors: give this one its own
            buf_users[t.buffer] -= 1
            mo.buffers.append(buf)
            t.buffer = len(mo.buffers) - 1
            buf_users[t.buffer] = 1

    entries = []
    for si, sg in enumerate(mo.subgraphs):
        # A tensor read by several ops (or twice) is left alone: rescaling its
        # bias or filter for one op would change the others.
        reads = {}
        for op in sg.operators:
            for ti in op.inputs if op.inputs is not None else []:
                if ti >= 0:
                    reads[int(ti)] = reads.get(int(ti), 0) + 1
        for oi, op in enumerate(sg.operators):
            name = _op_name(mo, op)
            if name not in ops or op.inputs is None or len(op.inputs) < 2:
                continue
            ti = int(op.inputs[1])
            t = sg.tensors[ti]
            bi = int(op.inputs[2]) if len(op.inputs) > 2 else -1
            e = dict(op=name, op_index=oi, subgraph=si, tensor=ti, name=tensor_name(t),
                     shape=[int(s) for s in t.shape], rewritten=False, reason=None, m=None,
                     mult=None, max_k=None, bias_rescaled=False)
            entries.append(e)
            in_type = sg.tensors[int(op.inputs[0])].type
            scales, zps, axis = _qparams(t)
            data = _array(mo, t, np.int8) if t.type == _INT8 else None
            if t.type != _INT8:
                e["reason"] = f"filter is {flatbuffer_utils.type_to_name(t.type)}, not INT8"
            elif data is None:
                e["reason"] = "filter is not a constant"
            elif scales is None:
                e["reason"] = "filter has no quantization scales"
            elif np.any(zps != 0):
                e["reason"] = "filter is not symmetric (nonzero zero point)"
            elif in_type not in (_INT8, _FLOAT32) or (name == "DEPTHWISE_CONV_2D"
                                                       and in_type != _INT8):
                e["reason"] = f"input {flatbuffer_utils.type_to_name(in_type)} has no INT4 kernel"
            elif reads.get(ti, 0) > 1 or (bi >= 0 and reads.get(bi, 0) > 1):
                e["reason"] = "filter or bias tensor shared with another op"
            if e["reason"]:
                continue
            per_channel = len(scales) > 1
            if per_channel and (axis != _CHANNEL_AXIS[name] or len(scales) != data.shape[axis]):
                e["reason"] = f"per-channel scales on axis {axis}, expected {_CHANNEL_AXIS[name]}"
                continue
            factor, k, m, mult, why = _fit(data, axis, per_channel, max_level, stretch)
            if why:
                e["reason"] = why
                continue
            # The bias first: if it cannot follow, the filter stays int8.
            new_bias = None
            if bi >= 0 and in_type == _INT8:
                bt = sg.tensors[bi]
                bs, _, _ = _qparams(bt)
                b = _array(mo, bt, np.int32) if bt.type == _INT32 else None
                f = None
                if b is not None and bs is not None and b.ndim == 1:
                    if len(factor) in (1, len(bs)):
                        f = np.broadcast_to(factor.astype(np.float64), bs.shape)
                    elif len(bs) == 1 and np.all(factor == factor[0]):
                        f = factor[:1].astype(np.float64)
                if f is None:
                    e["reason"] = "bias cannot be rescaled (not a constant int32 with scales)"
                    continue
                nb = np.round(b.astype(np.float64) / f)
                new_bias = (np.clip(nb, -2**31, 2**31 - 1).astype(np.int32),
                            (bs * f).astype(np.float32))
            put(sg, ti, pack_int4(k))
            t.type = INT4
            t.quantization.scale = (scales * factor).astype(np.float32).tolist()
            if new_bias is not None:
                put(sg, bi, new_bias[0])
                sg.tensors[bi].quantization.scale = new_bias[1].tolist()
                e["bias_rescaled"] = True
            e.update(rewritten=True, m=int(m), mult=int(mult), max_k=int(np.abs(k).max()))
    out = _write(mo) if any(e["rewritten"] for e in entries) else bytes(tflite_bytes)
    return out, dict(rewritten=[e["name"] for e in entries if e["rewritten"]], tensors=entries)


def int4_tensors(tflite_bytes):
    """INT4 constant tensors of a file, unpacked: list of dict(subgraph, tensor, name,
    shape, levels (np.int8, tensor shape), scales (np.float32))."""
    mo = _read(tflite_bytes)
    out = []
    for si, sg in enumerate(mo.subgraphs):
        for ti, t in enumerate(sg.tensors):
            raw = _raw(mo, t)
            if t.type != INT4 or not raw:
                continue
            shape = [int(s) for s in t.shape]
            lv = unpack_int4(raw, math.prod(shape)).reshape(shape)
            scales, _, _ = _qparams(t)
            out.append(dict(subgraph=si, tensor=ti, name=tensor_name(t), shape=shape,
                            levels=lv, scales=None if scales is None else scales.astype(np.float32)))
    return out
