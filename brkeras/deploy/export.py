"""Exporting one Keras model as checked TFLite files.

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

import numpy as np

from brkeras.deploy import prune as prune_lib
from brkeras.deploy.convert import FORMATS, convert, convert_qat, noisy_formats
from brkeras.deploy.exact_levels import max_level
from brkeras.deploy.exact_levels import check_weights, fix_quantized_weights
from brkeras.deploy import cost, int4
from brkeras.deploy.flatbuffer import (dequantized, random_op_seeds, storage_summary,
                                       strip_names, unseed_random_ops, weights_by_layer)
from brkeras.deploy.parity import (agreement_bar, keras_logits, parity_deterministic,
                                   parity_stochastic)
from brkeras.errors import ExportError, ParityError
from brkeras.nn import layers as layers_lib
from brkeras.nn.deploy import deploy_model
from brkeras.quant import binary_relax, sparsity
from brkeras.quant.binary_relax import architecture_copy


def quantized_from_model(model, layer_names, kmax):
    """{layer: (kernel, K)} read from `model` (whose kernels are exact Q(w))."""
    out = {}
    present = {l.name for l in model.layers}
    for name in layer_names:
        if name in present:  # a block prune_blocks dropped whole has none
            out[name] = (model.get_layer(name).get_weights()[0], kmax)
    return out


def shipped_bytes(tflite_bytes, noisy, fresh_noise_seed=True, strip=True):
    """The bytes written for a converted file: a noisy file's random ops unseeded (a
    fresh draw per run, unseed_random_ops) and, with strip, no tensor names
    (strip_names). Both run after every check that reads seeds or names."""
    if noisy and fresh_noise_seed:
        tflite_bytes = unseed_random_ops(tflite_bytes)
    return strip_names(tflite_bytes) if strip else tflite_bytes


def export_model(model, out_dir, stem, quantized, x_rep, x_test, y_test, noise,
                 formats=FORMATS, pruned=False, min_agreement=0.995, noise_runs=3,
                 noise_examples=200, fresh_noise_seed=True, deploy=None, optional=(),
                 dropped=None, strip=True):
    """Converts `model`, fixes and checks exact weights, checks parity, writes files.

    optional: formats whose failed parity check drops that file (appended, with
    the reason, to the list `dropped`) instead of failing the export.
    strip: write the files without tensor names (flatbuffer.strip_names), after
    the weight checks that need them; parity is checked on the written bytes.
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
    int8 = {}  # exact full-int8 bytes, shared by full_int8 and int4

    def exact_int8(fmt):
        if fmt not in int8:
            b = convert(deploy, fmt, x_rep)
            int8[fmt] = fix_quantized_weights(b, f32, quantized) if quantized else b
        return int8[fmt]

    for fmt in formats:
        packed = None
        if fmt == "int4":
            if not quantized:
                print(f"[export] {stem}: int4 skipped (only ternary / k-bit Binary-Relax "
                      "models have exact low-bit levels)", flush=True)
                continue
            b, packed = to_int4_checked(exact_int8("full_int8"), quantized, f"{stem}_int4")
            wcheck = check_weights(int8["full_int8"], f32, quantized)
        else:
            b = f32 if fmt == "float32" else exact_int8(fmt)
            wcheck = check_weights(b, f32, quantized) if quantized else {}
        b = shipped_bytes(b, noise, fresh_noise_seed, strip)
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
                    if fmt in ("full_int8", "int4") and isinstance(min_agreement, dict)
                    else None,
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
        entry = dict(file=os.path.basename(path), format=fmt, size_bytes=len(b),
                     zipped_bytes=cost.zipped_size(b), macs=cost.tflite_macs(b)["macs"],
                     noise=bool(noise), pruned=bool(pruned), weights=wcheck,
                     batch=deploy.inputs[0].shape[0], random_ops=random_op_seeds(b),
                     storage=storage_summary(b), parity=par)
        if packed is not None:
            entry["int4"] = packed
        entries.append(entry)
    return entries


def to_int4_checked(int8_bytes, quantized, name):
    """int4.to_int4 of an exact full-int8 file; every quantized conv filter must be
    rewritten, and its unpacked levels times the new scales must equal the int8 ones.

    Ternary levels are stored as +-7 (`stretch`): the same filter, and the int32 bias
    is requantized 7x more finely than with +-1. Returns (bytes, summary).
    """
    kmax = max(k for _, k in quantized.values())
    b, report = int4.to_int4(int8_bytes, max_level=kmax, stretch=True)
    convs = [w for w in weights_by_layer(int8_bytes, quantized).items()
             if w[1]["op"] == "CONV_2D"]
    rewritten = set(report["rewritten"])
    # An all-zero filter (a block that group sparsity emptied) stays int8: nothing to pack.
    missing = [layer for layer, w in convs
               if w["name"] not in rewritten and np.any(w["data"])]
    if missing:
        reasons = {t["name"]: t["reason"] for t in report["tensors"] if not t["rewritten"]}
        raise ExportError(f"{name}: quantized conv filters not packed as INT4: {missing} "
                          f"({reasons})")
    before = {w["name"]: dequantized(w) for _, w in convs}
    for t in int4.int4_tensors(b):
        if t["name"] in before:
            s = np.asarray(t["scales"], np.float64).reshape([-1] + [1] * (t["levels"].ndim - 1))
            if not np.allclose(t["levels"] * s, before[t["name"]], rtol=1e-5, atol=0):
                raise ExportError(f"{name}: INT4 filter {t['name']} does not equal its int8 "
                                  "filter (scale * level changed)")
    return b, dict(rewritten=len(rewritten), int8_bytes=len(int8_bytes))


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
               noise_examples=200, fresh_noise_seed=True, deploy=None, strip=True):
    """One int8 file ("qat_int8") of a tfmot QAT model, with the parity check of export_model."""
    os.makedirs(out_dir, exist_ok=True)
    b = shipped_bytes(convert_qat(model if deploy is None else deploy), noise,
                      fresh_noise_seed, strip)
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
                 zipped_bytes=cost.zipped_size(b), macs=cost.tflite_macs(b)["macs"],
                 noise=bool(noise), pruned=False, weights={},
                 batch=(model if deploy is None else deploy).inputs[0].shape[0],
                 random_ops=random_op_seeds(b), storage=storage_summary(b), parity=par)]


# ---------------------------------------------------------------------------
# Exporting a trained model, in memory


def _parity_bars(min_agreement, min_agreement_full_int8, max_accuracy_drop_full_int8):
    for name, v in (("min_agreement", min_agreement),
                    ("min_agreement_full_int8", min_agreement_full_int8),
                    ("max_accuracy_drop_full_int8", max_accuracy_drop_full_int8)):
        if v is not None and not 0 <= float(v) <= 1:
            raise ValueError(f"{name}={v} (config.export.{name}); give a share in [0, 1]")
    full = min_agreement if min_agreement_full_int8 is None else min_agreement_full_int8
    # Full int8 also quantizes activations, a different function by design: its own bar.
    full = min(float(full), float(min_agreement))
    return {"float32": float(min_agreement), "dynamic_int8": float(min_agreement),
            "qat_int8": float(min_agreement), "full_int8": full, "int4": full,
            "max_accuracy_drop": float(max_accuracy_drop_full_int8)}


def export_tflite(model, out_dir, *, formats=FORMATS, representative_data=None, parity_data=None,
                  prune=True, min_agreement=0.995, min_agreement_full_int8=None,
                  max_accuracy_drop_full_int8=0.01, noise_runs=3, noise_examples=200,
                  optional_formats=(), strip_names=True):
    """Writes `model` as parity-checked TFLite files into `out_dir`.

    Variants: noise on ("noisy_*", for a model with Feynman-Kac noise; converted
    in its deploy form, see nn/deploy.py, and never as full int8) and off
    ("det_*", sigma = 0), each unpruned and, with `prune`, pruned where pruning
    removes a channel (deploy/prune.py; "*_pruned_*"). A Binary-Relax model ships
    its exact Q(w) (int8 levels made exact); a tfmot 8-bit QAT model is converted
    directly ("qat_int8"), unpruned; a float model as it is.

    Args:
        model: a trained model from `build_model` (optionally `quantize_model`-ed).
        out_dir: created if needed; files are named <variant>_<format>.tflite.
        formats: of FORMATS ("float32", "dynamic_int8", "full_int8").
        representative_data: float32 images for full-int8 calibration.
        parity_data: (x, y) test images and labels; every file is checked against
            the Keras model on them (top-1 agreement noise off; for noisy files
            the accuracy over `noise_runs` runs of the first `noise_examples`).
        min_agreement, min_agreement_full_int8, max_accuracy_drop_full_int8: the
            parity bars (full int8 quantizes activations too: its own bar).
        optional_formats: formats whose failed parity check drops the file
            (listed under "dropped" with the reason) instead of raising.
        strip_names: write every file without tensor and subgraph names
            (flatbuffer.strip_names: the same ops and weights, 7% smaller zipped
            for the default ternary model; signature defs kept). False keeps the names
            for reading a file in a viewer.

    Returns:
        dict(files=[{file, path, format, size_bytes, noise, pruned, parity, ...}],
        pruning={variant: report}, parity_bars, min_agreement, dropped).
        Raises ExportError / ParityError when a file cannot be trusted.

    Example:
        files = export_tflite(qnet, "/tmp/out", formats=("float32", "full_int8"),
                              representative_data=x[:32], parity_data=(x_test, y_test))
    """
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"formats={formats} has {unknown}; choose from {FORMATS}")
    if parity_data is None:
        raise ValueError("parity_data=(x_test, y_test) is needed: every file is checked "
                         "against the Keras model before it is kept")
    if "full_int8" in formats and representative_data is None:
        raise ValueError("full_int8 needs representative_data (float32 training images)")
    bars = _parity_bars(min_agreement, min_agreement_full_int8, max_accuracy_drop_full_int8)
    x_test, y_test = (np.asarray(a) for a in parity_data)
    x_test = x_test.astype(np.float32)
    x_rep = None if representative_data is None else np.asarray(representative_data, np.float32)
    sigma = layers_lib.noise_sigma(model)
    br = binary_relax.br_quantizers(model)
    qat = not br and any(isinstance(l, binary_relax.QuantizeWrapper) for l in model.layers)
    precision, kmax = None, None
    if br:
        q = br[0][2]
        precision, kmax = q.precision, max_level(q.precision, q.bits)
    qnames = list(binary_relax.quantized_kernels(model)) if br else []
    entries, prune_reports, dropped = [], {}, []
    for noise in (True, False):
        if noise and sigma == 0:
            continue
        tag = "noisy" if noise else "det"
        if qat:
            m = model if noise else copy_weights_by_name(model, architecture_copy(model, 0.0))
            entries.extend(export_qat(m, out_dir, tag, x_test, y_test, noise, bars, noise_runs,
                                      noise_examples, deploy=deploy_model(m) if noise else None,
                                      strip=strip_names))
            continue
        fm = architecture_copy(model, sigma if noise else 0.0, unwrap=True)
        if br:
            binary_relax.copy_to_float(model, fm)
        else:
            fm.set_weights(model.get_weights())
        variants = [(fm, False)]
        if prune:
            pm, prep = prune_lib.prune_blocks(fm)
            prune_reports[tag] = prep
            if prep["removed_channels"] > 0:
                variants.append((pm, True))
        for m, pruned in variants:
            quant = quantized_from_model(m, qnames, kmax) if kmax else {}
            stem = tag + ("_pruned" if pruned else "")
            these = export_model(m, out_dir, stem, quant, x_rep, x_test, y_test, noise,
                                 noisy_formats(formats) if noise else formats, pruned, bars,
                                 noise_runs, noise_examples,
                                 deploy=deploy_model(m) if noise else None,
                                 optional=tuple(optional_formats), dropped=dropped,
                                 strip=strip_names)
            sp = sparsity.report({k: v[0] for k, v in quant.items()}) if quant else None
            for e in these:
                e["sparsity"] = sp
                e["quantization"] = dict(precision=precision or ("int8_qat" if qat else "float"),
                                         max_level=kmax)
            entries.extend(these)
    for e in entries:
        e["path"] = os.path.join(out_dir, e["file"])
    return dict(files=entries, pruning=prune_reports, min_agreement=bars["float32"],
                parity_bars=bars, dropped=dropped)
