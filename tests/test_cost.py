"""MACs and parameters from Keras models and TFLite files; zipped size convention."""

import os
import zipfile

import numpy as np
import pytest

from brkeras._keras import keras, tf
from brkeras.deploy import cost


def _model(c1=4, c2=6, bias=True):
    """8x8x3 -> Conv 3x3 c1 (same) -> Conv 3x3 stride 2 c2 -> Depthwise 3x3 -> GAP -> Dense 10."""
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(c1, 3, padding="same", use_bias=bias, name="c1")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(c2, 3, strides=2, padding="same", use_bias=False, name="c2")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    m = keras.Model(inp, keras.layers.Dense(10, name="fc")(x))
    # Nonzero biases: the converter drops zero ones and shares identical constants.
    rng = np.random.default_rng(c1)
    for layer in m.layers:
        if getattr(layer, "use_bias", False):
            w = layer.get_weights()
            layer.set_weights(w[:-1] + [rng.normal(size=w[-1].shape).astype(np.float32)])
    return m


def _hand(c1, c2):
    """(macs, weights) by hand: H_out * W_out * C_out * kh * kw * C_in, dw without C_in."""
    macs = (8 * 8 * c1 * 3 * 3 * 3      # c1: 8x8 out
            + 4 * 4 * c2 * 3 * 3 * c1   # c2: stride 2 -> 4x4
            + 4 * 4 * c2 * 3 * 3        # dw
            + c2 * 10)                  # fc
    weights = 3 * 3 * 3 * c1 + 3 * 3 * c1 * c2 + 3 * 3 * c2 + c2 * 10
    return macs, weights


def _tflite(model):
    return bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


@pytest.fixture(scope="module")
def models():
    big, small = _model(4, 6), _model(2, 6)
    return big, small, _tflite(big), _tflite(small)


def test_hand_count(models):
    big, _, fb, _ = models
    assert _hand(4, 6) == (6912 + 3456 + 864 + 60, 108 + 216 + 54 + 60) == (11292, 438)
    k = cost.keras_macs(big)
    assert (k["macs"], k["weights"]) == _hand(4, 6)
    # Keras params: + c1 bias (4) + dw bias (6) + fc bias (10).
    assert k["params"] == 438 + 4 + 6 + 10
    assert [p["macs"] for p in k["per_layer"]] == [6912, 3456, 864, 60]
    t = cost.tflite_macs(fb)
    assert (t["macs"], t["weights"]) == _hand(4, 6)
    assert [p["op"] for p in t["per_op"]] == ["CONV_2D", "CONV_2D", "DEPTHWISE_CONV_2D",
                                               "FULLY_CONNECTED"]
    assert [p["macs"] for p in t["per_op"]] == [6912, 3456, 864, 60]


def test_keras_equals_tflite_and_fewer_channels(models):
    big, small, fb, fs = models
    for m, b in ((big, fb), (small, fs)):
        k, t = cost.keras_macs(m), cost.tflite_macs(b)
        assert (k["macs"], k["weights"]) == (t["macs"], t["weights"])
        # TFLite folds BN into c1's bias and gives the bias-less c2 a bias (6).
        assert t["params"] == k["params"] + 6
    # c1 4 -> 2 channels removes 8*8*2*27 MACs in c1 and 4*4*6*9*2 in c2.
    drop = cost.keras_macs(big)["macs"] - cost.keras_macs(small)["macs"]
    assert drop == 8 * 8 * 2 * 27 + 4 * 4 * 6 * 9 * 2 == 5184
    assert cost.tflite_macs(fs)["macs"] == _hand(2, 6)[0]


def test_quantize_wrapper_and_deploy_copy_count_once(models):
    import tensorflow_model_optimization as tfmot

    big = models[0]
    q = tfmot.quantization.keras.quantize_model(_model(4, 6, bias=False))
    assert cost.keras_macs(q)["macs"] == _hand(4, 6)[0]
    # The same layers called by a second model: each model counts its own calls.
    inp = keras.Input((8, 8, 3), batch_size=1)
    x = inp
    for layer in big.layers[1:]:
        x = layer(x)
    again = keras.Model(inp, x)
    assert cost.keras_macs(again)["macs"] == cost.keras_macs(big)["macs"] == _hand(4, 6)[0]


def test_dense_on_feature_map_counts_rows():
    inp = keras.Input((4, 5))
    m = keras.Model(inp, keras.layers.Dense(3)(inp))  # 4 rows of 5 -> 3 per example
    assert cost.keras_macs(m)["macs"] == 4 * 5 * 3
    assert cost.tflite_macs(_tflite(m))["macs"] == 4 * 5 * 3


def test_zipped_size(tmp_path):
    rng = np.random.default_rng(0)
    inp = keras.Input((64,))
    dense = keras.layers.Dense(64, use_bias=False)
    m = keras.Model(inp, dense(inp))
    w = rng.normal(size=(64, 64)) * (rng.uniform(size=(64, 64)) < 0.05)  # 95% zeros
    dense.set_weights([w.astype(np.float32)])
    b = _tflite(m)
    path = tmp_path / "model.tflite"
    path.write_bytes(b)
    ref = tmp_path / "ref.zip"
    with zipfile.ZipFile(ref, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(path, arcname="model.tflite")
    assert cost.zipped_size(str(path)) == cost.zipped_size(b) == os.path.getsize(ref)
    assert cost.zipped_size(b) < len(b) / 3
    # Random bytes do not compress: the archive is a little larger than the file.
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert cost.zipped_size(noise) > len(noise)
