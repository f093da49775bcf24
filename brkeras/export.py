"""Deploy models as TFLite: float32, dynamic-range int8, full int8; exact Q(w); parity.

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

Deploy variants: the EnResNet way keeps the Feynman-Kac noise (stochastic); the
deterministic deploy is the same architecture built with sigma = 0 with the same
weights. Both are exported. The noisy one is converted in its deploy form
(`deploy_model`): batch fixed to 1 and all noise drawn by one NoiseBank at the
input (one RANDOM_STANDARD_NORMAL, one RANDOM_UNIFORM), which has the training
layer's joint noise distribution at that batch (layers.py) and keeps the random
ops from splitting the XNNPACK graph at every block. In int8 files the converter
quantizes the noise tensors too (int8 with calibrated ranges), like every
activation.

precision "int8_qat" (tfmot's 8-bit QAT) has no exact levels: its QAT Keras model
is converted directly (Optimize.DEFAULT, int8 from the fake-quant ranges), one
"qat_int8" file per variant.
"""

import os
import shutil
import tempfile
import weakref

import numpy as np

from brkeras import layers as layers_lib
from brkeras import sparsity
from brkeras.errors import BrkerasError
from brkeras._keras import keras, tf
from tensorflow.lite.python import schema_py_generated as schema_fb  # noqa: E402
from tensorflow.lite.tools import flatbuffer_utils  # noqa: E402

FORMATS = ("float32", "dynamic_int8", "full_int8")
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_INT8 = schema_fb.TensorType.INT8
_INT32 = schema_fb.TensorType.INT32
_FLOAT32 = schema_fb.TensorType.FLOAT32


class ExportError(BrkerasError):
    """An export that cannot be trusted (weights not exact, parity failed)."""


class ParityError(ExportError):
    """The TFLite model does not compute what the Keras model computes."""


# ---------------------------------------------------------------------------
# The deploy form of the noise


def _flat(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def deploy_model(model, batch_size=1):
    """The model at a fixed batch with its noise drawn by one NoiseBank (layers.py).

    Same layer objects (shared weights) and names; every FeynmanKacNoise(sigma > 0)
    becomes AddScaledNoise fed by its slice of one NoiseBank at the input, which
    draws what the layer would draw at this batch (same joint distribution, see
    layers.py). The random ops then sit at the start of the TFLite graph instead of
    in every block, so XNNPACK delegates the rest as one partition. A model without
    noise is returned as is.
    """
    noise = [l for l in model.layers
             if isinstance(l, layers_lib.FeynmanKacNoise) and l.sigma > 0]
    if not noise:
        return model
    pools = {l.pool for l in noise}
    if len(pools) != 1:
        raise ExportError(f"noise layers with different pools {sorted(pools)}; the deploy "
                          "NoiseBank draws with one pool")
    if len(model.inputs) != 1:
        raise ExportError("deploy_model expects a single-input model")
    inp = keras.Input(batch_shape=(int(batch_size),) + tuple(model.inputs[0].shape[1:]),
                      name=model.inputs[0].name.split(":")[0])
    sizes = [int(batch_size) * int(np.prod(l.output_shape[1:])) for l in noise]
    bank = layers_lib.NoiseBank(sizes, pools.pop(), name="noise_bank")(inp)
    slot = {l.name: bank[i] for i, l in enumerate(noise)}
    new = {id(model.inputs[0]): inp}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        nodes = [n for n in layer.inbound_nodes
                 if all(id(t) in new for t in _flat(n.input_tensors))]
        if len(nodes) != 1:
            raise ExportError(f"layer {layer.name}: {len(nodes)} call sites in the model; "
                              "deploy_model handles layers called once")
        node = nodes[0]
        args = [new[id(t)] for t in _flat(node.input_tensors)]
        args = args if isinstance(node.input_tensors, (list, tuple)) else args[0]
        if layer.name in slot:
            out = layers_lib.AddScaledNoise(layer.sigma, name=layer.name)([args, slot[layer.name]])
        else:
            out = layer(args)
        for old, nt in zip(_flat(node.output_tensors), _flat(out)):
            new[id(old)] = nt
    return keras.Model(inp, [new[id(t)] for t in model.outputs] if len(model.outputs) > 1
                       else new[id(model.outputs[0])], name=model.name + "_deploy")


# ---------------------------------------------------------------------------
# Conversion


def convert(model, fmt, representative=None):
    """TFLite flatbuffer bytes of a Keras model in format `fmt` (one of FORMATS).

    full_int8 quantizes weights and activations with `representative` (float32
    images, N >= 1) for calibration and keeps float32 input and output.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}; choose one of {FORMATS}")
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if fmt != "float32":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if fmt == "full_int8":
        if representative is None or len(representative) == 0:
            raise ValueError("full_int8 needs a representative data set: pass training images "
                             "(float32 in [0, 1], NHWC)")
        rep = np.asarray(representative, np.float32)

        def gen():
            for i in range(len(rep)):
                yield [rep[i:i + 1]]

        conv.representative_dataset = gen
        # Ops without an int8 kernel (e.g. RANDOM_STANDARD_NORMAL) stay float.
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                          tf.lite.OpsSet.TFLITE_BUILTINS]
    return bytes(conv.convert())


# ---------------------------------------------------------------------------
# Reading and rewriting weight tensors


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
                        name=t.name.decode(), shape=[int(s) for s in t.shape],
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


def max_level(precision, bits=4):
    """K, the largest integer level |k| of Q(w) = u * k for a Binary-Relax precision:
    half the number of levels (binary's +-1 included); int8 holds up to 8 bits."""
    from brkeras import quantizers  # pylint: disable=g-import-not-at-top

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
            rep[layer] = dict(stored="missing", exact=False)
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


# ---------------------------------------------------------------------------
# Running and parity


def tflite_logits(path_or_bytes, x, batch_size=1, num_threads=1):
    """Logits of a TFLite model on float32 images x (N, H, W, C), batch by batch."""
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

    kw = dict(num_threads=num_threads)
    if isinstance(path_or_bytes, (bytes, bytearray)):
        interp = Interpreter(model_content=bytes(path_or_bytes), **kw)
    else:
        interp = Interpreter(model_path=str(path_or_bytes), **kw)
    inp = interp.get_input_details()[0]
    x = np.asarray(x, np.float32)
    shape = [batch_size] + list(x.shape[1:])
    interp.resize_tensor_input(inp["index"], shape)
    interp.allocate_tensors()
    out_idx = interp.get_output_details()[0]["index"]
    outs = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        if len(xb) != batch_size:
            interp.resize_tensor_input(inp["index"], [len(xb)] + list(x.shape[1:]))
            interp.allocate_tensors()
        interp.set_tensor(inp["index"], xb)
        interp.invoke()
        outs.append(interp.get_tensor(out_idx).copy())
    return np.concatenate(outs)


_INFER = weakref.WeakKeyDictionary()


def inference_fn(model):
    """One tf.function per model, traced once for any batch size (no retracing warnings)."""
    fn = _INFER.get(model)
    if fn is None:
        spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32)
        fn = tf.function(lambda t: model(t, training=False), input_signature=[spec])
        _INFER[model] = fn
    return fn


def keras_logits(model, x, batch_size=100):
    """Logits of a Keras model (inference mode) on x, batch by batch."""
    fn = inference_fn(model)
    return np.concatenate([fn(tf.constant(x[i:i + batch_size], tf.float32)).numpy()
                           for i in range(0, len(x), batch_size)])


def noisy_formats(formats):
    """The formats of a noisy (stochastic) deploy: all but full int8.

    Full int8 quantizes the noise arithmetic too (std(out), sigma * std * n) with
    ranges calibrated on a few draws, which clips the noise: on a ternary
    Fashion-MNIST model its accuracy fell from 79% to 33%, and it ran 2x slower
    than float32. Full int8 stays for the deterministic deploy.
    """
    return tuple(f for f in formats if f != "full_int8")


def agreement_bar(min_agreement, fmt):
    """The top-1 agreement bar of format `fmt`: `min_agreement` is one share for
    every format or a dict {format: share}."""
    return float(min_agreement[fmt] if isinstance(min_agreement, dict) else min_agreement)


def parity_deterministic(tflite, model, x, y=None, min_agreement=0.995, batch_size=50,
                         max_accuracy_drop=None, keras_out=None):
    """Noise-off parity: top-1 agreement and max |logit difference|; raises ParityError.

    agreement = mean(argmax tflite == argmax keras) must be >= min_agreement; with
    max_accuracy_drop (and labels y), acc_keras - acc_tflite must be <= it too.
    keras_out: the model's logits on x if already computed (the model is deterministic).
    """
    lk = keras_logits(model, x, batch_size) if keras_out is None else keras_out
    lt = tflite_logits(tflite, x, batch_size)
    agree = float(np.mean(lk.argmax(1) == lt.argmax(1)))
    out = dict(examples=int(len(x)), top1_agreement=agree,
               max_abs_logit_diff=float(np.abs(lk - lt).max()),
               min_agreement=min_agreement)
    if y is not None:
        y = np.asarray(y).reshape(-1)
        out["acc_keras"] = float(np.mean(lk.argmax(1) == y))
        out["acc_tflite"] = float(np.mean(lt.argmax(1) == y))
        if max_accuracy_drop is not None:
            out["max_accuracy_drop"] = max_accuracy_drop
            drop = out["acc_keras"] - out["acc_tflite"]
            if drop > max_accuracy_drop:
                raise ParityError(
                    f"{os.path.basename(str(tflite))}: TFLite accuracy {out['acc_tflite']:.4f} is "
                    f"{drop:.4f} below Keras {out['acc_keras']:.4f} (> {max_accuracy_drop}); "
                    "the export is not faithful")
    if agree < min_agreement:
        raise ParityError(f"{os.path.basename(str(tflite))}: TFLite top-1 agrees with Keras on "
                          f"{agree:.4f} of {len(x)} examples "
                          f"< {min_agreement} (max |logit diff| {out['max_abs_logit_diff']:.4g}); "
                          "the export is not faithful")
    return out


def parity_stochastic(tflite, model, x, y, runs=3, z=4.0):
    """Noise-on parity: natural accuracy of TFLite vs Keras, batch 1, over `runs` draws.

    Passes when |mean acc_tflite - mean acc_keras| <= z * se, with
    se = sqrt(2 p (1 - p) / (n runs)) (binomial standard error of a difference of
    two mean accuracies, p the pooled accuracy) plus 1/n; raises ParityError.
    Batch 1 on both sides because std(out) of the noise is over the whole batch.
    """
    y = np.asarray(y).reshape(-1)
    n = len(x)
    fn = inference_fn(model)
    acc_k, acc_t = [], []
    for _ in range(runs):
        pk = np.array([int(np.argmax(fn(tf.constant(x[i:i + 1], tf.float32)).numpy()))
                       for i in range(n)])
        acc_k.append(float(np.mean(pk == y)))
        acc_t.append(float(np.mean(tflite_logits(tflite, x, 1).argmax(1) == y)))
    p = (np.mean(acc_k) + np.mean(acc_t)) / 2
    tol = z * np.sqrt(2 * p * (1 - p) / (n * runs)) + 1.0 / n
    diff = abs(np.mean(acc_t) - np.mean(acc_k))
    out = dict(examples=n, runs=runs, acc_keras_runs=acc_k, acc_tflite_runs=acc_t,
               acc_keras_mean=float(np.mean(acc_k)), acc_tflite_mean=float(np.mean(acc_t)),
               acc_keras_std=float(np.std(acc_k)), acc_tflite_std=float(np.std(acc_t)),
               abs_diff=float(diff), tolerance=float(tol))
    if diff > tol:
        raise ParityError(f"noisy TFLite accuracy {np.mean(acc_t):.4f} vs Keras {np.mean(acc_k):.4f} "
                          f"differs by {diff:.4f} > tolerance {tol:.4f} over {runs} runs of {n}")
    return out


# ---------------------------------------------------------------------------
# Exporting one Keras model in all formats


def quantized_from_model(model, layer_names, kmax):
    """{layer: (kernel, K)} read from `model` (whose kernels are exact Q(w))."""
    out = {}
    for name in layer_names:
        out[name] = (model.get_layer(name).get_weights()[0], kmax)
    return out


def export_model(model, out_dir, stem, quantized, x_rep, x_test, y_test, noise,
                 formats=FORMATS, pruned=False, min_agreement=0.995, noise_runs=3,
                 noise_examples=200, fresh_noise_seed=True, deploy=None, optional=(),
                 dropped=None):
    """Converts `model`, fixes and checks exact weights, checks parity, writes files.

    optional: formats whose failed parity check drops that file (appended, with
    the reason, to the list `dropped`) instead of failing the export.
    quantized: {layer: (Q(w) kernel, K)} (may be empty for a float model).
    fresh_noise_seed: zero the random ops' seeds (see unseed_random_ops).
    deploy: the Keras model to convert (default `model`; export() passes
    deploy_model(model) for noisy models); parity is always against `model`.
    Returns one dict per file (file, format, size_bytes, noise, pruned,
    weights (per-layer check), storage, parity). Raises ExportError/ParityError.
    """
    os.makedirs(out_dir, exist_ok=True)
    deploy = model if deploy is None else deploy
    f32 = convert(deploy, "float32")
    keras_out = None if noise or not formats else keras_logits(model, x_test, 50)  # all formats
    entries = []
    for fmt in formats:
        b = f32 if fmt == "float32" else convert(deploy, fmt, x_rep)
        if fmt != "float32" and quantized:
            b = fix_quantized_weights(b, f32, quantized)
        if noise and fresh_noise_seed:
            b = unseed_random_ops(b)
        wcheck = check_weights(b, f32, quantized) if quantized else {}
        bad = [k for k, v in wcheck.items() if not v["exact"]]
        if bad:
            raise ExportError(f"{stem}_{fmt}: quantized layers not exact after conversion: "
                              f"{ {k: wcheck[k] for k in bad} }")
        path = os.path.join(out_dir, f"{stem}_{fmt}.tflite")
        with open(path, "wb") as fh:
            fh.write(b)
        try:
            if noise:
                n = min(noise_examples, len(x_test))
                par = parity_stochastic(path, model, x_test[:n], y_test[:n], runs=noise_runs)
            else:
                par = parity_deterministic(
                    path, model, x_test, y_test, agreement_bar(min_agreement, fmt),
                    max_accuracy_drop=agreement_bar(min_agreement, "max_accuracy_drop")
                    if fmt == "full_int8" and isinstance(min_agreement, dict) else None,
                    keras_out=keras_out)
        except ParityError as e:
            if fmt not in optional:
                raise
            os.remove(path)
            if dropped is not None:
                dropped.append(dict(file=os.path.basename(path), format=fmt, noise=bool(noise),
                                    pruned=bool(pruned), reason=str(e)))
            print(f"[export] WARNING: dropped {os.path.basename(path)}: {e}", flush=True)
            continue
        entries.append(dict(file=os.path.basename(path), format=fmt, size_bytes=len(b),
                            noise=bool(noise), pruned=bool(pruned), weights=wcheck,
                            batch=deploy.inputs[0].shape[0],
                            random_ops=random_op_seeds(b),
                            storage=storage_summary(b), parity=par))
    return entries


def _with_sigma(config, sigma):
    """A copy of `config` with model.sigma replaced (the deterministic deploy uses 0)."""
    import ml_collections  # pylint: disable=g-import-not-at-top

    c = ml_collections.ConfigDict(config.to_dict())
    c.model.sigma = float(sigma)
    return c


TMP_PREFIX = ".export-tmp-"


def convert_qat(qat_model):
    """int8 TFLite bytes of a tfmot QAT Keras model (Optimize.DEFAULT uses its fake-quant ranges)."""
    conv = tf.lite.TFLiteConverter.from_keras_model(qat_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    return bytes(conv.convert())


def _base_name(name):
    """Layer name without Keras's uniquifying suffix ('quantize_layer_1' -> 'quantize_layer')."""
    head, _, tail = name.rpartition("_")
    return head if head and tail.isdigit() else name


def copy_weights_by_name(src, dst):
    """Copies every layer's weights (float, QAT ranges, counters) from src to dst.

    Layers pair by name; an auto-named layer (tfmot's 'quantize_layer', which Keras
    numbers 'quantize_layer_1', ... per session) pairs with the layer at the same
    position when its name differs only in that numeric suffix and its class matches.
    Raises ExportError naming a layer with no counterpart or other weight shapes.
    """
    by_name = {l.name: l for l in src.layers}
    if len(src.layers) != len(dst.layers):
        raise ExportError(f"the trained model has {len(src.layers)} layers, the rebuilt one "
                          f"{len(dst.layers)}; build both from the same config")
    for i, layer in enumerate(dst.layers):
        if not layer.weights:
            continue
        other = by_name.get(layer.name)
        if other is None:
            cand = src.layers[i]
            if type(cand) is type(layer) and _base_name(cand.name) == _base_name(layer.name):
                other = cand
        if other is None:
            raise ExportError(f"layer {layer.name!r} has no counterpart in the trained model")
        values = other.get_weights()
        want = [tuple(w.shape) for w in layer.weights]
        if want != [v.shape for v in values]:
            raise ExportError(f"layer {layer.name!r}: weight shapes {want} vs trained "
                              f"{[v.shape for v in values]}")
        layer.set_weights(values)
    return dst


def export_qat(model, out_dir, stem, x_test, y_test, noise, min_agreement=0.995, noise_runs=3,
               noise_examples=200, fresh_noise_seed=True, deploy=None):
    """One int8 file ("qat_int8") of a tfmot QAT model, with the parity check of export_model."""
    os.makedirs(out_dir, exist_ok=True)
    b = convert_qat(model if deploy is None else deploy)
    if noise and fresh_noise_seed:
        b = unseed_random_ops(b)
    path = os.path.join(out_dir, f"{stem}_qat_int8.tflite")
    with open(path, "wb") as fh:
        fh.write(b)
    if noise:
        n = min(noise_examples, len(x_test))
        par = parity_stochastic(path, model, x_test[:n], y_test[:n], runs=noise_runs)
    else:
        par = parity_deterministic(path, model, x_test, y_test,
                                   agreement_bar(min_agreement, "qat_int8"))
    return [dict(file=os.path.basename(path), format="qat_int8", size_bytes=len(b),
                 noise=bool(noise), pruned=False, weights={},
                 batch=(model if deploy is None else deploy).inputs[0].shape[0],
                 random_ops=random_op_seeds(b), storage=storage_summary(b), parity=par)]


def _install(tmp, workdir):
    """Moves tmp/export and tmp/export.json into workdir, replacing the previous export."""
    final = os.path.join(workdir, "export")
    if os.path.exists(final):
        os.replace(final, os.path.join(tmp, "previous_export"))
    os.replace(os.path.join(tmp, "export"), final)
    os.replace(os.path.join(tmp, "export.json"), os.path.join(workdir, "export.json"))


def export(workdir, x_rep=None, x_test=None, y_test=None, formats=None, prune=None,
           min_agreement=None, noise_runs=3, noise_examples=200, overrides=None):
    """Exports the trained model of `workdir` to workdir/export/*.tflite and export.json.

    Variants: noise on ("noisy", sigma of the config; converted in its deploy form,
    see deploy_model) and off ("det", sigma = 0), each unpruned and, when
    config.export.prune and pruning removes a channel, pruned (prune.prune_blocks).
    precision "int8_qat": the QAT model is converted directly (one "qat_int8" file
    per variant; the sigma = 0 QAT model is rebuilt and its weights copied by layer
    name), no pruning. x_rep (calibration) defaults to the first
    config.export.representative_examples training images, x_test/y_test to the
    first config.export.parity_examples test examples (float32 in [0, 1]).
    min_agreement: noise-off top-1 bar, default config.export.min_agreement.
    overrides: a config whose export section replaces the stored one (the CLI's --config).

    All files are written to a temp dir inside the work dir; export/ and
    export.json are replaced only when every check passed, so a failure leaves
    the previous export (if any) as it was and no partial files. One export per
    work dir at a time (a new one removes stale temp dirs of killed runs).
    """
    from brkeras import data, models, prune as prune_lib, quantize  # pylint: disable=g-import-not-at-top
    from brkeras import config as config_lib, training  # pylint: disable=g-import-not-at-top
    from brkeras import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

    config = config_lib.stage_config(workdir_lib.load_config(workdir), overrides)
    formats = tuple(formats or config.export.formats)
    prune = config.export.prune if prune is None else prune
    if min_agreement is None:
        min_agreement = float(config.export.get("min_agreement", 0.995))
    if not 0 <= min_agreement <= 1:
        raise ValueError(f"min_agreement={min_agreement}; give a share in [0, 1] "
                         "(config.export.min_agreement)")
    # Full int8 also quantizes activations, a different function by design: its own bar.
    full = float(config.export.get("min_agreement_full_int8", min_agreement))
    if not 0 <= full <= 1:
        raise ValueError(f"config.export.min_agreement_full_int8={full}; give a share in [0, 1]")
    drop = float(config.export.get("max_accuracy_drop_full_int8", 0.01))
    min_agreement = {"float32": min_agreement, "dynamic_int8": min_agreement,
                     "qat_int8": min_agreement, "full_int8": min(full, min_agreement),
                     "max_accuracy_drop": drop}
    if x_rep is None:
        xr, _ = data.load_arrays(config.data.name, "train", config.export.representative_examples,
                                 config.data.data_dir)
        x_rep = np.asarray(data.to_float(xr))
    if x_test is None:
        xt, y_test = data.load_arrays(config.data.name, "test", config.export.parity_examples,
                                      config.data.data_dir)
        x_test = np.asarray(data.to_float(xt))
    qmodel = training.load(workdir)
    precision = config.quant.precision
    qat = precision == "int8_qat"
    qnames = [] if qat else list(quantize.quantized_kernels(qmodel))
    kmax = max_level(precision, config.quant.bits) if precision not in ("float", "int8_qat") else None
    info = data.info(config.data.name)
    for stale in os.listdir(workdir):
        if stale.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(workdir, stale), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=workdir)
    try:
        out_dir = os.path.join(tmp, "export")
        entries, prune_reports, dropped = [], {}, []
        optional = tuple(config.export.get("optional_formats", ()))
        for noise in (True, False):
            if noise and config.model.sigma == 0:
                continue
            tag = "noisy" if noise else "det"
            fm = models.from_config(_with_sigma(config, config.model.sigma if noise else 0.0),
                                    info.image_shape, info.num_classes)
            if qat:
                m = qmodel if noise else copy_weights_by_name(qmodel, quantize.int8_qat(fm))
                entries.extend(export_qat(m, out_dir, tag, x_test, y_test, noise, min_agreement,
                                          noise_runs, noise_examples,
                                          deploy=deploy_model(m) if noise else None))
                continue
            quantize.copy_to_float(qmodel, fm)
            variants = [(fm, False)]
            if prune:
                pm, prep = prune_lib.prune_blocks(fm)
                prune_reports[tag] = prep
                if prep["removed_channels"] > 0:
                    variants.append((pm, True))
            for m, pruned in variants:
                quant = quantized_from_model(m, qnames, kmax) if kmax else {}
                stem = tag + ("_pruned" if pruned else "")
                entries_for = export_model(m, out_dir, stem, quant, x_rep, x_test, y_test, noise,
                                           noisy_formats(formats) if noise else formats,
                                           pruned, min_agreement, noise_runs, noise_examples,
                                           deploy=deploy_model(m) if noise else None,
                                           optional=optional, dropped=dropped)
                sp = sparsity.report({k: v[0] for k, v in quant.items()}) if quant else None
                for e in entries_for:
                    e["sparsity"] = sp
                    e["quantization"] = dict(precision=precision, max_level=kmax)
                entries.extend(entries_for)
        result = dict(workdir=os.path.abspath(workdir), files=entries, pruning=prune_reports,
                      min_agreement=min_agreement["float32"], parity_bars=min_agreement,
                      dropped=dropped)
        workdir_lib.write_json(os.path.join(tmp, "export.json"), result)
        _install(tmp, workdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
