"""Conversion from the traced inference function: the same file as from_keras_model.

deploy/convert.py converts a model's concrete function directly instead of
lowering it to a SavedModel first (12x faster on the default model). These
tests hold it to what TFLiteConverter.from_keras_model writes: the same
operators in the same order on the same tensors (shape, type, quantization,
constant bytes; only the numbering of the tensors may differ), the same
signature def, and tensor names that still carry the Keras layer names the
exact-level checks look up.
"""

import numpy as np
import pytest

from brkeras._keras import tf
from brkeras.deploy import convert as convert_lib
from brkeras.deploy import flatbuffer
from brkeras.errors import ExportError
from brkeras.nn import deploy as nn_deploy
from brkeras.nn import kernels
from brkeras.nn import models
from brkeras.quant import int8_qat as int8_qat_lib
from tensorflow.lite.tools import flatbuffer_utils


def _keras_path(model, fmt, rep=None, qat=False):
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if qat or fmt != "float32":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if fmt == "full_int8":
        conv.representative_dataset = lambda: ([rep[i:i + 1]] for i in range(len(rep)))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                          tf.lite.OpsSet.TFLITE_BUILTINS]
    with kernels.disabled():
        return bytes(conv.convert())


def _structure(tflite_bytes):
    """Everything a file computes with, names and tensor numbering aside.

    The operators in order, each input and output tensor given by its content:
    a constant by (shape, type, quantization, bytes), any other tensor by
    (shape, type, quantization, the order in which it first appears).
    """
    mo = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    sg = mo.subgraphs[0]

    def quant(t):
        q = t.quantization
        if q is None or q.scale is None:
            return None
        return (list(np.asarray(q.scale)), list(np.asarray(q.zeroPoint)), q.quantizedDimension)

    seen = {}

    def tensor(i):
        if i < 0:
            return None  # an omitted optional input
        t = sg.tensors[i]
        data = mo.buffers[t.buffer].data
        key = bytes(data) if data is not None and len(data) else seen.setdefault(i, len(seen))
        return (tuple(int(d) for d in t.shape), t.type, quant(t), key)

    inputs = [tensor(i) for i in sg.inputs]
    ops = [(flatbuffer_utils.opcode_to_name(mo, o.opcodeIndex), o.builtinOptionsType,
            [tensor(i) for i in o.inputs], [tensor(i) for i in o.outputs])
           for o in sg.operators]
    return ops, inputs, [tensor(i) for i in sg.outputs], len(sg.tensors)


@pytest.fixture(scope="module")
def net():
    m = models.build_model((8, 8, 1), 3, depth=8, width=4, sigma=0.1, noise_pool=1)
    x = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)
    m(x, training=True)  # moving statistics away from their initial values
    return m, x


def _noise_off(m):
    det = models.build_model((8, 8, 1), 3, depth=8, width=4, sigma=0.0)
    det.set_weights(m.get_weights())
    return det


@pytest.mark.parametrize("fmt", ["float32", "dynamic_int8", "full_int8"])
def test_same_file_as_from_keras_model(net, fmt):
    m, x = net
    det = _noise_off(m)
    ours = convert_lib.convert(det, fmt, x)
    theirs = _keras_path(det, fmt, x)
    assert _structure(ours) == _structure(theirs)
    assert flatbuffer.signatures(ours) == flatbuffer.signatures(theirs) == {
        "serving_default": (det.input_names, det.output_names)}
    # The weight tensors are still found by Keras layer name.
    names = [layer.name for layer in det.layers if "conv" in layer.name]
    assert set(flatbuffer.weights_by_layer(ours, names)) == set(names)


def test_noisy_deploy_model_converts_to_the_same_file(net):
    m, _ = net
    deploy = nn_deploy.deploy_model(m)
    ours, theirs = convert_lib.convert(deploy, "float32"), _keras_path(deploy, "float32")
    assert flatbuffer.random_op_seeds(ours)  # the noise is in the file
    assert _structure(ours) == _structure(theirs)
    assert flatbuffer.signatures(ours) == flatbuffer.signatures(theirs)


def test_qat_model_converts_to_the_same_file(net):
    m, x = net
    qat = int8_qat_lib.int8_qat(_noise_off(m))
    qat(x, training=True)  # fake-quant ranges away from their initial values
    ours, theirs = convert_lib.convert_qat(qat), _keras_path(qat, "int8", qat=True)
    assert _structure(ours) == _structure(theirs)
    assert flatbuffer.signatures(ours) == flatbuffer.signatures(theirs)


def test_converted_file_runs_by_its_signature(net):
    m, x = net
    det = _noise_off(m)
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_content=convert_lib.convert(det, "float32"))
    runner = it.get_signature_runner("serving_default")
    out = runner(**{det.input_names[0]: x[:1]})[det.output_names[0]]
    np.testing.assert_allclose(out, det(x[:1], training=False).numpy(), rtol=1e-5, atol=1e-5)


def test_add_signature_checks_the_names_against_the_subgraph(net):
    m, _ = net
    b = convert_lib.convert(_noise_off(m), "float32")
    with pytest.raises(ExportError, match="2 input"):
        flatbuffer.add_signature(b, "serving_default", ["a", "b"], ["logits"])
    renamed = flatbuffer.add_signature(b, "serving_default", ["pixels"], ["scores"])
    assert flatbuffer.signatures(renamed) == {"serving_default": (["pixels"], ["scores"])}


def test_conversion_needs_one_input_and_one_output():
    from brkeras._keras import keras
    a, b = keras.Input((4,)), keras.Input((4,))
    two = keras.Model([a, b], keras.layers.Add()([a, b]))
    with pytest.raises(ValueError, match="2 inputs"):
        convert_lib.convert(two, "float32")
