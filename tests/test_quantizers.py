"""Quantizers against NumPy references; level counts per layer and per channel."""

import numpy as np
import pytest

from brkeras.quant import ops as quantizers
from brkeras._keras import tf

SHAPES = [(3, 3, 4, 8), (3, 3, 16, 16), (32, 10), (5, 5, 3, 6)]


def _axes(w, per_channel):
    return tuple(range(w.ndim - 1)) if per_channel else tuple(range(w.ndim))


def _sign(w):
    return np.where(w >= 0, 1.0, -1.0)


def np_binary(w, per_channel):
    ax = _axes(w, per_channel)
    return np.mean(np.abs(w), axis=ax, keepdims=True) * _sign(w)


def np_ternary(w, per_channel, scale):
    ax = _axes(w, per_channel)
    a = np.abs(w)
    delta = 0.7 * np.mean(a, axis=ax, keepdims=True)
    m = (a >= delta).astype(w.dtype)
    kept = np.sum(a * m, axis=ax, keepdims=True)
    if scale == "reference":
        n = np.prod([w.shape[i] for i in ax])
    else:
        n = np.sum(m, axis=ax, keepdims=True)
    return kept / n * m * _sign(w)


def np_kbit(w, per_channel, bits):
    ax = _axes(w, per_channel)
    a = np.abs(w)
    delta = np.max(a, axis=ax, keepdims=True) / (2**bits - 1)
    q = np.clip(np.round(a / (2 * delta)), 0, 2**(bits - 1) - 1)
    alpha = np.sum(a * q, axis=ax, keepdims=True) / np.sum(q * q, axis=ax, keepdims=True)
    return alpha * q * _sign(w)


def _rand(shape, seed):
    return np.random.default_rng(seed).normal(0.0, 0.1, size=shape).astype(np.float32)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_against_numpy(shape, per_channel):
    w = _rand(shape, seed=hash(shape) % 1000)
    cases = [
            (quantizers.binary(w, per_channel=per_channel), np_binary(w, per_channel)),
            (quantizers.ternary(w, per_channel=per_channel),
             np_ternary(w, per_channel, "reference")),
            (quantizers.ternary(w, scale="twn", per_channel=per_channel),
             np_ternary(w, per_channel, "twn")),
            (quantizers.kbit(w, bits=4, per_channel=per_channel), np_kbit(w, per_channel, 4)),
            (quantizers.kbit(w, bits=3, per_channel=per_channel), np_kbit(w, per_channel, 3)),
            (quantizers.kbit(w, bits=2, per_channel=per_channel), np_kbit(w, per_channel, 2)),
    ]
    for got, want in cases:
        assert got.shape == w.shape and got.dtype == tf.float32
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)


def test_reference_and_twn_scale_differ_by_kept_fraction():
    w = _rand((3, 3, 8, 8), 1)
    ref = quantizers.ternary(w).numpy()
    twn = quantizers.ternary(w, scale="twn").numpy()
    kept = np.mean(np.abs(w) >= 0.7 * np.mean(np.abs(w)))
    s_ref, s_twn = np.max(ref), np.max(twn)
    np.testing.assert_allclose(s_ref, s_twn * kept, rtol=1e-5)
    assert 0.3 < kept < 0.8  # Gaussian: P(|w| >= 0.7 E|w|) ~ 0.57


@pytest.mark.parametrize("precision,bits,levels", [
        ("binary", 4, 2), ("ternary", 4, 3), ("ternary_twn", 4, 3), ("4bit", 4, 15),
        ("kbit", 3, 7), ("kbit", 5, 31)])
def test_distinct_values_per_layer_and_per_channel(precision, bits, levels):
    # Uniform weights fill every level of every channel.
    w = np.random.default_rng(0).uniform(-1, 1, size=(3, 3, 32, 4)).astype(np.float32)
    assert quantizers.num_levels(precision, bits) == levels
    q = quantizers.get(precision, bits=bits)(w).numpy()
    assert len(np.unique(q)) == levels
    qc = quantizers.get(precision, bits=bits, per_channel=True)(w).numpy()
    for c in range(w.shape[-1]):
        assert len(np.unique(qc[..., c])) == levels
    # Per-channel scales differ between channels, so the layer has more values.
    assert len(np.unique(qc)) > levels


def test_levels_are_symmetric_integer_multiples():
    w = _rand((3, 3, 16, 16), 3)
    q = quantizers.kbit(w, bits=4).numpy()
    alpha = np.min(np.abs(q[q != 0]))
    ratio = q / alpha
    np.testing.assert_allclose(ratio, np.round(ratio), atol=1e-4)
    assert np.max(np.abs(np.round(ratio))) == 7
    # alpha is the least-squares scale: <|w| - alpha q, q> = 0.
    qi = np.abs(np.round(ratio))
    assert abs(np.sum((np.abs(w) - alpha * qi) * qi)) < 1e-4 * np.sum(np.abs(w) * qi)


def test_sign_zero_is_plus_and_zero_guards():
    w = np.array([[0.0, -1.0], [2.0, 0.5]], np.float32)
    assert np.all(quantizers.binary(w).numpy() == np.array([[1, -1], [1, 1]]) * 0.875)
    z = np.zeros((3, 3, 2, 2), np.float32)
    for name in quantizers.QUANTIZERS:
        out = quantizers.get(name)(z).numpy()
        assert np.all(out == 0) and np.all(np.isfinite(out)), name
    # TWN scale with a channel of zeros next to a normal one: no NaN.
    w2 = np.stack([np.zeros((9, 4)), np.ones((9, 4))], -1).astype(np.float32)
    out = quantizers.ternary(w2, scale="twn", per_channel=True).numpy()
    assert np.all(out[..., 0] == 0) and np.allclose(out[..., 1], 1.0)


def test_get_validation():
    with pytest.raises(ValueError, match="ternary_twn"):
        quantizers.get("octal")
    with pytest.raises(ValueError, match="kbit"):
        quantizers.get("4bit", bits=3)
    with pytest.raises(ValueError, match="2 <= bits"):
        quantizers.get("kbit", bits=1)
    with pytest.raises(ValueError, match="rank >= 2"):
        quantizers.binary(np.ones(4, np.float32), per_channel=True)
    with pytest.raises(ValueError, match="reference"):
        quantizers.ternary(np.ones((2, 2), np.float32), scale="mean")
    assert set(quantizers.QUANTIZERS) == {"binary", "ternary", "ternary_twn", "4bit", "kbit"}
