"""Keras -> TFLite conversion: float32, dynamic-range int8, full int8, tfmot QAT int8."""

import numpy as np

from brkeras._keras import tf
from brkeras.nn import kernels


# What the TFLite converter writes from a Keras model.
KERAS_FORMATS = ("float32", "dynamic_int8", "full_int8")
# What an export can write: "int4" is the full-int8 file of a ternary/4-bit model
# with its exact filter levels packed two per byte (deploy/int4.py).
FORMATS = KERAS_FORMATS + ("int4",)


def convert(model, fmt, representative=None):
    """TFLite flatbuffer bytes of a Keras model in format `fmt` (one of KERAS_FORMATS).

    full_int8 quantizes weights and activations with `representative` (float32
    images, N >= 1) for calibration and keeps float32 input and output.
    """
    if fmt not in KERAS_FORMATS:
        raise ValueError(f"fmt={fmt!r}; choose one of {KERAS_FORMATS}"
                         + (" (int4 is written by deploy.export from an exact full-int8 file)"
                            if fmt == "int4" else ""))
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
    with kernels.disabled():  # noise layers trace as TFLite builtins, not the fused op
        return bytes(conv.convert())


def convert_qat(qat_model):
    """int8 TFLite bytes of a tfmot QAT Keras model (Optimize.DEFAULT uses its fake-quant ranges)."""
    conv = tf.lite.TFLiteConverter.from_keras_model(qat_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    with kernels.disabled():
        return bytes(conv.convert())


def noisy_formats(formats):
    """The formats of a noisy (stochastic) deploy: all but full int8.

    Full int8 (and int4, made from it) quantizes the noise arithmetic too (std(out), sigma * std * n) with
    ranges calibrated on a few draws, which clips the noise: on a ternary
    Fashion-MNIST model its accuracy fell from 79% to 33%, and it ran 2x slower
    than float32. Full int8 stays for the deterministic deploy.
    """
    return tuple(f for f in formats if f not in ("full_int8", "int4"))
