"""Keras -> TFLite conversion: float32, dynamic-range int8, full int8, tfmot QAT int8."""

import numpy as np

from brkeras._keras import tf
from brkeras.deploy.flatbuffer import add_signature
from brkeras.nn import kernels

SIGNATURE_KEY = "serving_default"  # what TFLiteConverter.from_keras_model names it


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
    conv = _converter(model)
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
    return _run(conv, model)


def convert_qat(qat_model):
    """int8 TFLite bytes of a tfmot QAT Keras model (Optimize.DEFAULT uses its fake-quant ranges)."""
    conv = _converter(qat_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    return _run(conv, qat_model)


def _io_names(model):
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"model {model.name!r} has {len(model.inputs)} inputs and "
                         f"{len(model.outputs)} outputs; conversion takes one image input "
                         "and one logits output")
    return model.input_names[0], model.output_names[0]


def _converter(model):
    """A TFLiteConverter of `model`'s inference call, from its concrete function.

    TFLiteConverter.from_keras_model first saves the model as a SavedModel, and
    tf_keras serialises every layer's call functions for it: about 2 s of the
    2.2 s a conversion of the default model takes. Converting the traced
    inference function directly (the frozen-graph path) writes the same
    operators, tensors, quantization parameters and buffers (tests/test_convert.py)
    in about 0.2 s, but no signature def; _run adds the one from_keras_model
    writes (key serving_default, the Keras input and output names).
    """
    in_name, out_name = _io_names(model)
    # The model's own input shape: a deploy model fixes its batch (nn/deploy.py).
    spec = tf.TensorSpec(model.inputs[0].shape, model.inputs[0].dtype, name=in_name)

    def serve(x):
        return {out_name: model(x, training=False)}

    with kernels.disabled():  # noise layers trace as TFLite builtins, not the fused op
        fn = tf.function(serve, input_signature=[spec])
        conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()],
                                                               model)
    conv.experimental_lower_to_saved_model = False
    return conv


def _run(conv, model):
    in_name, out_name = _io_names(model)
    with kernels.disabled():
        b = bytes(conv.convert())
    return add_signature(b, SIGNATURE_KEY, [in_name], [out_name])


def noisy_formats(formats):
    """The formats of a noisy (stochastic) deploy: all but full int8.

    Full int8 (and int4, made from it) quantizes the noise arithmetic too (std(out), sigma * std * n) with
    ranges calibrated on a few draws, which clips the noise: on a ternary
    Fashion-MNIST model its accuracy fell from 79% to 33%, and it ran 2x slower
    than float32. Full int8 stays for the deterministic deploy.
    """
    return tuple(f for f in formats if f not in ("full_int8", "int4"))
