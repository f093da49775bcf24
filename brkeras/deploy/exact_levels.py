"""Exact integer levels of Binary-Relax weights in int8 TFLite files.

A trained Binary-Relax model evaluates with weights Q(w) = u_c * k, one unit u_c
per output channel (or per layer) and integer levels k with |k| <= K (K = 1 for
binary/ternary, 7 for 4-bit, 2^(b-1) - 1 for b bits). The TFLite converter
quantizes each conv filter per output channel with scale s_c = max|f_c| / 127,
where f_c is the filter after it folded a following BatchNorm (f_c = g_c Q(w)_c,
g_c = gamma_c / sqrt(var_c + eps)). That is exact for ternary/binary (int8 in
{-127, 0, 127}) but rounds 4-bit levels. `fix_quantized_weights` rewrites those
int8 filters as int8 = k * m with m = floor(127 / K) and scale s_c = u'_c / m,
where u'_c = <f_c, k_c> / <k_c, k_c> is the folded unit fitted on the float32
export's filter, and rescales the int32 bias of full-int8 convs to the new
s_in * s_c. `check_weights` reads the filters back and verifies
scale * int8 == f_c (and == Q(w) where nothing was folded) to float precision.
"""

import numpy as np

from brkeras.deploy.flatbuffer import (_INT32, _read, _scales, _tensor_data, dequantized,
                                       to_tflite_layout, weights_by_layer)
from brkeras.errors import ExportError
from brkeras.quant import ops as quantizers
from tensorflow.lite.python import schema_py_generated as schema_fb  # noqa: E402
from tensorflow.lite.tools import flatbuffer_utils  # noqa: E402


def max_level(precision, bits=4):
    """K, the largest integer level |k| of Q(w) = u * k for a Binary-Relax precision:
    half the number of levels (binary's +-1 included); int8 holds up to 8 bits."""
    if precision == "kbit" and not 2 <= int(bits) <= 8:
        raise ValueError(f"bits={bits}; k-bit export supports 2..8 bits")
    if precision not in quantizers.QUANTIZERS:
        raise ValueError(f"precision={precision!r} has no exact integer levels; "
                         f"use one of {tuple(quantizers.QUANTIZERS)}")
    return quantizers.num_levels(precision, bits) // 2


def exact_levels(filt, max_lvl, rtol=1e-4):
    """Integer levels of a quantized filter, channel by channel (axis 0).

    Finds, per output channel c, the largest unit u_c and integers k with
    |k| <= max_lvl such that filt_c = u_c * k (to relative tolerance rtol).
    Returns (u (C,), k int array like filt); raises ExportError if a channel has
    no such form (the weights are not an exact Q(w)).
    """
    filt = np.asarray(filt, np.float64)
    c = filt.shape[0]
    flat = filt.reshape(c, -1)
    units = np.zeros(c)
    levels = np.zeros(flat.shape, np.int64)
    for o in range(c):
        v = np.abs(flat[o][flat[o] != 0])
        if v.size == 0:
            continue
        vmin = v.min()
        for j in range(1, max_lvl + 1):
            cand = vmin / j
            k = v / cand
            if np.all(np.abs(k - np.round(k)) <= rtol * np.maximum(1.0, k)) and np.round(k).max() <= max_lvl:
                units[o] = cand
                levels[o] = np.round(flat[o] / cand).astype(np.int64)
                break
        else:
            raise ExportError(f"output channel {o}: values {np.unique(v)[:8]} are not u * k with "
                              f"integer |k| <= {max_lvl}; is this kernel an exact Q(w)?")
    return units, levels.reshape(filt.shape)


def fix_quantized_weights(tflite_bytes, float_bytes, quantized):
    """Rewrites the int8 filters of Binary-Relax layers so that scale * int8 is exact.

    tflite_bytes: an int8 (dynamic-range or full) model; float_bytes: the float32
    export of the same Keras model (its filters are f_c = g_c Q(w)_c after BN
    folding); quantized: {layer name: (Q(w) Keras kernel, K)}.
    Per channel: int8 = k * m, m = floor(127 / K), scale = u'_c / m with
    u'_c = <f_c, k_c> / <k_c, k_c>; a full-int8 bias (int32, scale s_in * s_c) is
    rescaled to the new s_c. Float32 filters (dynamic range leaves tensors under
    1024 elements float) are left alone. Returns the new bytes.
    """
    mo = _read(tflite_bytes)
    sg = mo.subgraphs[0]
    wq = weights_by_layer(tflite_bytes, quantized)
    wf = weights_by_layer(float_bytes, quantized)
    users = {}
    for t in sg.tensors:
        users[t.buffer] = users.get(t.buffer, 0) + 1

    def put(ti, arr):
        t = sg.tensors[ti]
        buf = schema_fb.BufferT()
        buf.data = np.ascontiguousarray(arr).tobytes()
        if users.get(t.buffer, 0) == 1:
            mo.buffers[t.buffer] = buf
        else:  # shared buffer (deduplicated constants): give this tensor its own
            users[t.buffer] -= 1
            mo.buffers.append(buf)
            t.buffer = len(mo.buffers) - 1
            users[t.buffer] = 1

    for layer, (kernel, kmax) in quantized.items():
        w = wq.get(layer)
        if w is None or w["dtype"] != "INT8":
            continue
        if layer not in wf:
            raise ExportError(f"layer {layer}: no float32 filter in the float export to fit its scale")
        _, k = exact_levels(to_tflite_layout(kernel), kmax)
        f = wf[layer]["data"].astype(np.float64)
        if f.shape != k.shape:
            raise ExportError(f"layer {layer}: float filter {f.shape} vs Q(w) {k.shape}")
        if not np.any(k):
            # An all-zero filter is exact at any scale. Keep the converter's: the
            # calibrated output scale of its (all-zero) output is tiny, and a new
            # filter scale would make a requantization multiplier the int8
            # kernels (XNNPACK) cannot prepare.
            continue
        m = 127 // kmax
        c = k.shape[0]
        kf = k.reshape(c, -1).astype(np.float64)
        kk = (kf * kf).sum(1)
        u = np.where(kk > 0, (f.reshape(c, -1) * kf).sum(1) / np.maximum(kk, 1), 0.0)
        old_s = np.broadcast_to(np.asarray(w["scales"], np.float64), (c,))
        # Any scale is exact for an all-zero channel, but not the converter's: it
        # gives such channels a scale near 1e-9, whose requantization multiplier
        # TFLite's int8 kernels cannot represent (a ternary stem with zero filters
        # fell to 40% accuracy). Use the median scale of the other channels.
        live = np.abs(u[u != 0]) / m
        fallback = np.median(live) if live.size else np.maximum(old_s, 1.0 / 127)
        new_s = np.where(u != 0, np.abs(u) / m, fallback).astype(np.float32)
        new_q = (k * m * np.sign(u).reshape([-1] + [1] * (k.ndim - 1))).astype(np.int8)
        t = sg.tensors[w["tensor"]]
        put(w["tensor"], new_q)
        t.quantization.scale = new_s.tolist()
        t.quantization.zeroPoint = [0] * c
        t.quantization.quantizedDimension = 0
        if w["bias"] >= 0:
            bt = sg.tensors[w["bias"]]
            bs = _scales(bt)
            bdata = _tensor_data(mo, bt)
            if bt.type == _INT32 and bs is not None and bdata is not None:
                ratio = new_s.astype(np.float64) / old_s
                new_bs = (bs.astype(np.float64) * ratio).astype(np.float32)
                new_b = np.round(bdata.astype(np.float64) * bs / new_bs)
                put(w["bias"], np.clip(new_b, -2**31, 2**31 - 1).astype(np.int32))
                bt.quantization.scale = new_bs.tolist()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(mo))


def check_weights(tflite_bytes, float_bytes, quantized, atol_rel=1e-5):
    """Per-layer report of how a TFLite file stores each quantized layer.

    For each {layer: (Q(w) kernel, K)}: stored dtype, element count, distinct
    int8 levels per channel (max), the largest |scale * int8 - f| relative to
    max|f| where f is the float32 export's (BN-folded) filter, the same against
    Q(w) itself (meaningful where no BatchNorm was folded: bn_folded False),
    and `exact` (errors <= atol_rel and levels <= 2K + 1).
    """
    wq = weights_by_layer(tflite_bytes, quantized)
    wf = weights_by_layer(float_bytes, quantized)
    rep = {}
    for layer, (kernel, kmax) in quantized.items():
        if layer not in wq:
            # An all-zero Q(w) (group sparsity emptied the whole block) makes the conv's
            # output constant, and the converter folds the layer away: exactly Q(w).
            dead = not np.any(kernel)
            rep[layer] = dict(stored="folded (all-zero kernel)" if dead else "missing",
                              exact=bool(dead))
            continue
        w = wq[layer]
        q = to_tflite_layout(kernel).astype(np.float64)
        f = wf[layer]["data"].astype(np.float64) if layer in wf else q
        deq = dequantized(w)
        scale = max(np.abs(f).max(), 1e-30)
        err_f = float(np.abs(deq - f).max() / scale)
        err_q = float(np.abs(deq - q).max() / max(np.abs(q).max(), 1e-30))
        folded = not np.allclose(f, q, rtol=1e-6, atol=0)
        r = dict(stored=w["dtype"], elements=int(w["data"].size), bn_folded=bool(folded),
                 max_rel_err_vs_float_filter=err_f, max_rel_err_vs_qw=err_q)
        if w["dtype"] == "INT8":
            c = w["data"].shape[0]
            lv = [len(np.unique(w["data"].reshape(c, -1)[o])) for o in range(c)]
            r["levels_per_channel_max"] = int(max(lv))
            r["int8_values"] = sorted(int(v) for v in np.unique(w["data"]))[:32]
            r["exact"] = bool(err_f <= atol_rel and max(lv) <= 2 * kmax + 1)
        else:
            lv = [len(np.unique(f_c)) for f_c in w["data"].reshape(w["data"].shape[0], -1)]
            r["levels_per_channel_max"] = int(max(lv))
            r["exact"] = bool(err_f <= atol_rel)
        rep[layer] = r
    return rep
