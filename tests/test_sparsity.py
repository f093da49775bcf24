"""Exact sparsity figures on hand-built kernels, and the same report read back from TFLite."""

import json

import numpy as np
import pytest

from brkeras._keras import keras, tf
from brkeras.quant import sparsity


def _conv_kernel():
    """(3, 3, 4, 5), entries +-0.5; input channels 1 and 3 and filter 2 all zero."""
    k = np.where(np.arange(180).reshape(3, 3, 4, 5) % 2 == 0, 0.5, -0.5).astype(np.float32)
    k[:, :, 1, :] = 0
    k[:, :, 3, :] = 0
    k[..., 2] = 0
    return k


def _dense_kernel():
    """(6, 3) with entries +-0.25, input row 0 zero and one more zero at [4, 1]."""
    k = np.where(np.arange(18).reshape(6, 3) % 3 == 0, 0.25, -0.25).astype(np.float32)
    k[0] = 0
    k[4, 1] = 0
    return k


def test_layer_stats_exact_fractions():
    s = sparsity.layer_stats(_conv_kernel())
    # zeros: 2 input slices of 9*5 + filter 2 (9*4) - their overlap (9*2) = 108 of 180
    assert s["params"] == 180 and s["zeros"] == 108 and s["zero_share"] == pytest.approx(0.6)
    assert (s["in_channels"], s["zero_in_channels"]) == (4, 2)
    assert s["channel_sparsity"] == 0.5
    assert (s["filters"], s["zero_filters"], s["filter_sparsity"]) == (5, 1, 0.2)
    assert s["distinct_values"] == 3 and s["shape"] == [3, 3, 4, 5]
    d = sparsity.layer_stats(_dense_kernel())
    assert (d["params"], d["zeros"], d["zero_in_channels"], d["zero_filters"]) == (18, 4, 1, 0)
    assert d["channel_sparsity"] == pytest.approx(1 / 6) and d["distinct_values"] == 3


def test_a_slice_with_one_nonzero_is_not_sparse():
    k = np.zeros((3, 3, 2, 2), np.float32)
    k[2, 1, 0, 1] = 1e-30
    s = sparsity.layer_stats(k)
    assert (s["zero_in_channels"], s["zero_filters"], s["zeros"]) == (1, 1, 35)


def test_report_pools_over_layers_and_is_json():
    r = sparsity.report({"conv": _conv_kernel(), "fc": _dense_kernel()})
    o = r["overall"]
    assert (o["layers"], o["params"], o["zeros"]) == (2, 198, 112)
    assert o["zero_share"] == pytest.approx(112 / 198)
    # pooled over slices, not the mean of the per-layer shares: (2 + 1) / (4 + 6)
    assert (o["in_channels"], o["zero_in_channels"]) == (10, 3)
    assert o["channel_sparsity"] == pytest.approx(0.3)
    assert o["filter_sparsity"] == pytest.approx(1 / 8)
    assert set(r["layers"]) == {"conv", "fc"}
    assert json.loads(json.dumps(r)) == r


def test_matches_the_reference_torch_loop():
    """The reference loops over OIHW kernels k[:, c] and counts all-zero slices."""
    rng = np.random.default_rng(0)
    kernels = {}
    for i, (cin, cout) in enumerate([(3, 8), (8, 8), (8, 16)]):
        k = rng.normal(size=(3, 3, cin, cout)).astype(np.float32)
        k[:, :, rng.random(cin) < 0.4, :] = 0
        kernels[f"c{i}"] = k
    total = zero = 0
    for k in kernels.values():
        oihw = np.transpose(k, (3, 2, 0, 1))
        for c in range(oihw.shape[1]):
            total += 1
            zero += int(np.abs(np.sign(oihw[:, c])).sum() == 0)
    assert sparsity.report(kernels)["overall"]["channel_sparsity"] == pytest.approx(zero / total)
    assert zero > 0


def test_depthwise_layout():
    k = np.ones((3, 3, 4, 2), np.float32)  # (H, W, C, multiplier)
    k[:, :, 2, :] = 0
    s = sparsity.layer_stats(k)
    assert s["channel_sparsity"] == 0.25 and s["zeros"] == 18


def test_empty_and_bad_inputs():
    assert sparsity.report({})["overall"]["channel_sparsity"] == 0.0
    with pytest.raises(ValueError, match="biases"):
        sparsity.report({"bias": np.zeros(3)})
    with pytest.raises(ValueError, match="dict"):
        sparsity.report([np.zeros((2, 2))])


# ---------------------------------------------------------------- TFLite
def _model():
    """conv 3->16, conv 16->8 (1152 weights: dynamic-range int8 quantizes it),
    depthwise, dense; kernels hand-set with zero input slices and filters."""
    L = keras.layers
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="c1")(i)
    x = L.ReLU()(x)
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="c2")(x)
    x = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, use_bias=False, name="dw")(x)
    x = L.GlobalAveragePooling2D()(x)
    m = keras.Model(i, L.Dense(4, name="fc")(x))
    rng = np.random.default_rng(1)
    kernels = {}
    for name in ("c1", "c2", "dw", "fc"):
        layer = m.get_layer(name)
        k = rng.normal(size=layer.get_weights()[0].shape).astype(np.float32)
        k[..., 0, :] = 0  # input channel 0
        k[..., -1] = 0  # last output channel
        if name == "c2":
            k[:, :, 5:9, :] = 0  # input channels 5..8
        layer.set_weights([k] + layer.get_weights()[1:])
        kernels[name] = k
    return m, kernels


def _convert(m, mode, path):
    c = tf.lite.TFLiteConverter.from_keras_model(m)
    if mode != "float32":
        c.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "full_int8":
        rng = np.random.default_rng(2)
        c.representative_dataset = lambda: ([rng.random((1, 8, 8, 3), np.float32)]
                                            for _ in range(8))
    path.write_bytes(c.convert())
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    m, kernels = _model()
    d = tmp_path_factory.mktemp("tfl")
    files = {mode: _convert(m, mode, d / f"{mode}.tflite")
             for mode in ("float32", "dynamic_int8", "full_int8")}
    return kernels, files


def test_tflite_float32_kernels_are_the_keras_kernels(converted):
    kernels, files = converted
    got = sparsity.kernels_from_tflite(files["float32"])
    assert set(got) == set(kernels)
    for name, k in kernels.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], k, err_msg=name)
    assert sparsity.report(got) == sparsity.report(kernels)


@pytest.mark.parametrize("mode", ["dynamic_int8", "full_int8"])
def test_tflite_int8_kernels_within_the_scale(converted, mode):
    kernels, files = converted
    got = sparsity.kernels_from_tflite(files[mode])
    assert set(got) == set(kernels)
    for name, k in kernels.items():
        # symmetric int8 per output channel: scale = max|k_o| / 127, rounding error <= scale / 2
        scale = np.abs(k).reshape(-1, k.shape[-1]).max(0) / 127
        err = np.abs(got[name] - k).reshape(-1, k.shape[-1]).max(0)
        assert np.all(err <= 0.5 * scale + 1e-6), (name, err / np.maximum(scale, 1e-12))
    if mode == "dynamic_int8":  # tensors under 1024 elements stay float32
        np.testing.assert_array_equal(got["c1"], kernels["c1"])
        assert not np.array_equal(got["c2"], kernels["c2"])
    r, ref = sparsity.report(got)["overall"], sparsity.report(kernels)["overall"]
    for key in ("zero_in_channels", "zero_filters", "params", "in_channels", "filters"):
        assert r[key] == ref[key], key
    assert r["zeros"] >= ref["zeros"]  # small weights may round to 0 in int8
