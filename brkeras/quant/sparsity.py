"""Weight, channel and filter sparsity of kernels, from Keras or from a .tflite file.

Input: a dict {layer_name: kernel} of NumPy arrays in Keras layout: HWIO conv
kernels (H, W, in, out), depthwise kernels (H, W, in, multiplier), or dense
kernels (in, out). In every case the input-channel axis is ndim-2 and the
output axis is ndim-1.

Definitions (SPEC section 5):
  zero share      #{k == 0} / #k;
  channel sparsity (ref) the share of input-channel slices kernel[..., c, :] that
                  are entirely zero; overall = pooled over the slices of all layers
                  (sum of zero slices / sum of slices), as the reference counts;
  filter sparsity the share of output channels kernel[..., o] entirely zero
                  (what structured pruning can remove), pooled likewise;
  distinct values the number of distinct values of a kernel (2-3 per layer for
                  binary/ternary with one scale, up to 15 for 4-bit).
A weight is zero when it equals 0 exactly (quantizers and int8 give exact zeros).
"""

import numpy as np

__all__ = ["layer_stats", "report", "kernels_from_tflite"]


def _as_kernel(name, k):
    k = np.asarray(k)
    if k.ndim < 2:
        raise ValueError(f"kernel {name!r} has shape {k.shape}; pass conv (HWIO) or dense "
                         "(in, out) kernels, not biases or scalars")
    if not np.issubdtype(k.dtype, np.number):
        raise ValueError(f"kernel {name!r} has dtype {k.dtype}; pass numeric arrays")
    return k


def layer_stats(kernel):
    """Counts and shares of one kernel (input axis ndim-2, output axis ndim-1)."""
    k = _as_kernel("kernel", kernel)
    zero = k == 0
    n_in, n_out = k.shape[-2], k.shape[-1]
    # an input slice k[..., c, :] is zero iff all its entries are zero
    in_zero = zero.reshape(-1, n_in, n_out).all(axis=(0, 2))
    out_zero = zero.reshape(-1, n_out).all(axis=0)
    return {
            "shape": [int(s) for s in k.shape],
            "params": int(k.size),
            "zeros": int(zero.sum()),
            "zero_share": float(zero.mean()) if k.size else 0.0,
            "in_channels": int(n_in),
            "zero_in_channels": int(in_zero.sum()),
            "channel_sparsity": float(in_zero.mean()) if n_in else 0.0,
            "filters": int(n_out),
            "zero_filters": int(out_zero.sum()),
            "filter_sparsity": float(out_zero.mean()) if n_out else 0.0,
            "distinct_values": int(np.unique(k).size),
    }


def report(kernels):
    """{"overall": {...}, "layers": {name: layer_stats}}, JSON-serialisable.

    overall: params, zeros, zero_share = zeros / params; in_channels,
    zero_in_channels, channel_sparsity = pooled share of zero input slices;
    filters, zero_filters, filter_sparsity likewise; layers = count.
    """
    if not isinstance(kernels, dict):
        raise ValueError("report(kernels) needs a dict {layer_name: kernel array}")
    layers = {str(n): layer_stats(_as_kernel(n, k)) for n, k in kernels.items()}

    def total(key):
        return int(sum(s[key] for s in layers.values()))

    def share(num, den):
        return num / den if den else 0.0

    p, z = total("params"), total("zeros")
    ci, zci = total("in_channels"), total("zero_in_channels")
    f, zf = total("filters"), total("zero_filters")
    overall = {
            "layers": len(layers), "params": p, "zeros": z, "zero_share": share(z, p),
            "in_channels": ci, "zero_in_channels": zci, "channel_sparsity": share(zci, ci),
            "filters": f, "zero_filters": zf, "filter_sparsity": share(zf, f),
    }
    return {"overall": overall, "layers": layers}


# ---------------------------------------------------------------- TFLite
_FILTER_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")  # filter = inputs[1]


def _dequantize(arr, detail):
    """real = scale[c] * (q - zero_point[c]) along the quantized dimension."""
    q = detail.get("quantization_parameters", {})
    scales = np.asarray(q.get("scales", []), np.float64)
    if arr.dtype in (np.float32, np.float16, np.float64) or scales.size == 0:
        return arr.astype(np.float32)
    zps = np.asarray(q.get("zero_points", np.zeros_like(scales)), np.float64)
    shape = [1] * arr.ndim
    if scales.size > 1:
        shape[int(q.get("quantized_dimension", 0))] = -1
    real = (arr.astype(np.float64) - zps.reshape(shape)) * scales.reshape(shape)
    return real.astype(np.float32)


def _layer_name(tensor_name, op_name, index):
    """A readable key from a TFLite tensor name such as
    'model/m0_conv0/Conv2D' or 'model/bn/FusedBatchNormV3;model/conv/Conv2D'."""
    parts = [p for p in tensor_name.split(";") if p]
    for p in reversed(parts):  # the conv / matmul part usually comes last
        segs = p.split("/")
        if len(segs) >= 3:
            return segs[-2]
    last = parts[-1].split("/")[-1] if parts else ""
    return last or f"{op_name.lower()}_{index}"


def kernels_from_tflite(path, num_threads=1):
    """{layer_name: kernel} of the CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED ops
    of a .tflite file, dequantized to float32 and put in Keras layout.

    TFLite layouts: conv filter OHWI -> HWIO (transpose 1, 2, 3, 0); depthwise
    (1, H, W, C*M) -> (H, W, C, M) with M = C*M / C (C from the op's input);
    fully connected (out, in) -> (in, out). int8/int16 weights are dequantized with
    their (per-channel) scales and zero points; a filter fed by a DEQUANTIZE op
    (float16 export) is read from the op's constant input. Names come from the
    filter tensor names (the Keras layer name where the converter kept it);
    duplicates get a suffix.
    """
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

    interp = Interpreter(model_path=str(path), num_threads=num_threads)
    interp.allocate_tensors()
    details = {d["index"]: d for d in interp.get_tensor_details()}
    ops = interp._get_ops_details()  # pylint: disable=protected-access
    producer = {o: op for op in ops for o in op["outputs"]}
    out = {}
    for i, op in enumerate(ops):
        if op["op_name"] not in _FILTER_OPS:
            continue
        t = int(op["inputs"][1])
        src = producer.get(t)
        if src is not None and src["op_name"] == "DEQUANTIZE":
            t = int(src["inputs"][0])
        try:
            arr = np.array(interp.get_tensor(t))
        except ValueError as e:  # a filter computed at run time, not a constant
            raise ValueError(f"op {i} ({op['op_name']}) has a non-constant filter tensor "
                             f"{details[t]['name']!r}; kernels_from_tflite reads constant "
                             "weights only") from e
        k = _dequantize(arr, details[t])
        if op["op_name"] == "CONV_2D":
            k = np.transpose(k, (1, 2, 3, 0))
        elif op["op_name"] == "DEPTHWISE_CONV_2D":
            c_in = int(details[int(op["inputs"][0])]["shape"][-1])
            k = k.reshape(k.shape[1], k.shape[2], c_in, k.shape[3] // c_in)
        else:
            k = k.T
        name = _layer_name(details[t]["name"], op["op_name"], i)
        key, j = name, 1
        while key in out:
            key, j = f"{name}_{j}", j + 1
        out[key] = k
    return out
