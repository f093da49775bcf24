"""Stochastic parity (deploy/parity.py): per-example mean and spread of the logits over
noise draws, Keras vs TFLite; a file with broken noise fails."""

import numpy as np
import pytest

from brkeras import errors
from brkeras._keras import keras
from brkeras.deploy import convert as convert_lib
from brkeras.deploy import export as deploy_export
from brkeras.deploy import flatbuffer
from brkeras.deploy import parity
from brkeras.nn import deploy as nn_deploy
from brkeras.nn import models


# ---- noise_statistics as a pure function ---------------------------------------------


def draws(rng, k, n, c, mean, std):
    return mean[None] + std[None] * rng.standard_normal((k, n, c))


@pytest.fixture()
def base():
    rng = np.random.default_rng(0)
    mean = rng.normal(0, 2, (200, 10))
    std = rng.uniform(0.1, 0.6, (200, 10))
    return rng, mean, std


def test_same_distribution_passes(base):
    rng, mean, std = base
    for k in (2, 3, 8):
        s = parity.noise_statistics(draws(rng, k, 200, 10, mean, std),
                                    draws(rng, k, 200, 10, mean, std))
        assert s["draws"] == k and s["examples"] == 200
        assert s["mean_test"]["held"] and s["std_test"]["held"], s
        assert 0.85 < s["std_test"]["ratio"] < 1.15
        assert abs(s["mean_test"]["excess"]) < 0.1


def test_broken_spread_or_mean_fails(base):
    rng, mean, std = base
    keras_draws = draws(rng, 3, 200, 10, mean, std)
    doubled = parity.noise_statistics(keras_draws, draws(rng, 3, 200, 10, mean, 2 * std))
    assert not doubled["std_test"]["held"] and 1.7 < doubled["std_test"]["ratio"] < 2.3
    none = parity.noise_statistics(keras_draws, np.repeat(mean[None], 3, 0))
    assert not none["std_test"]["held"] and none["std_test"]["ratio"] < 1e-6
    # frozen noise (one draw replayed): no spread, and the means are off by a draw
    frozen = parity.noise_statistics(keras_draws, np.repeat(keras_draws[:1], 3, 0))
    assert not frozen["std_test"]["held"]
    # a shift of one single-draw std per example, with the right spread
    shifted = parity.noise_statistics(keras_draws, draws(rng, 3, 200, 10, mean + std, std))
    assert shifted["std_test"]["held"] and not shifted["mean_test"]["held"]
    assert 0.8 < shifted["mean_test"]["rms_bias_in_draw_std"] < 1.2
    # int8-like rounding, a tenth of the noise std: allowed (mean_tol = 0.25)
    rounded = parity.noise_statistics(keras_draws, draws(rng, 3, 200, 10, mean + 0.1 * std, std))
    assert rounded["mean_test"]["held"] and rounded["std_test"]["held"]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="K >= 2"):
        parity.noise_statistics(np.zeros((1, 5, 3)), np.zeros((1, 5, 3)))
    with pytest.raises(ValueError, match="same shape"):
        parity.noise_statistics(np.zeros((3, 5, 3)), np.zeros((3, 4, 3)))


# ---- real files: the noisy export, one without its noise, one with sigma doubled ------


def _data(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.uniform(0, 0.3, (n, 16, 16, 3)).astype(np.float32)
    for c in range(3):
        x[y == c, :, :, c] += 0.6
    return x, y.astype(np.int32)


def _file(model, sigma):
    """Noisy deploy bytes (fresh noise per interpreter) of `model` rebuilt with `sigma`."""
    m = deploy_export.architecture_copy(model, sigma)
    m.set_weights(model.get_weights())
    b = convert_lib.convert(nn_deploy.deploy_model(m) if sigma > 0 else m, "float32")
    return flatbuffer.unseed_random_ops(b) if sigma > 0 else b


@pytest.fixture(scope="module")
def noisy_model():
    keras.utils.set_random_seed(7)
    m = models.build_model((16, 16, 3), 4, depth=8, width=4, sigma=0.1)
    x, y = _data(400, 0)
    m.compile(keras.optimizers.Adam(0.01),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m.fit(x, y, epochs=3, batch_size=32, verbose=0)
    xt, yt = _data(200, 1)
    return m, xt, yt


def test_real_noisy_file_passes(noisy_model):
    m, x, y = noisy_model
    out = parity.parity_stochastic(_file(m, 0.1), m, x, y)  # the export's defaults
    assert out["runs"] == 3 and out["examples"] == 200
    assert out["acc_keras_mean"] > 0.5  # a trained model, so the accuracy check means something
    st, mt = out["noise"]["std_test"], out["noise"]["mean_test"]
    assert st["held"] and mt["held"]
    assert 0.8 < st["ratio"] < 1.25


def test_file_without_its_noise_fails(noisy_model):
    m, x, y = noisy_model
    with pytest.raises(errors.ParityError, match=r"0\.000x Keras.*noise is broken"):
        parity.parity_stochastic(_file(m, 0.0), m, x, y)


def test_file_with_sigma_doubled_fails(noisy_model):
    m, x, y = noisy_model
    with pytest.raises(errors.ParityError, match="noise is broken") as e:
        parity.parity_stochastic(_file(m, 0.2), m, x, y)
    ratio = float(str(e.value).split("deviation over noise draws is ")[1].split("x")[0])
    assert 1.5 < ratio < 2.5


def test_tflite_model_runner_keeps_one_interpreter(noisy_model):
    m, x, _ = noisy_model
    det = parity.TFLiteModel(_file(m, 0.0))
    assert det.fixed_batch is None
    a, b = det.logits(x[:10], 4), det.logits(x[:10], 10)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # batching does not change logits
    np.testing.assert_allclose(a, parity.tflite_logits(_file(m, 0.0), x[:10]), atol=1e-5)
    noisy = parity.TFLiteModel(_file(m, 0.1))
    assert noisy.fixed_batch == 1  # the NoiseBank draws for batch 1
    l1, l2 = noisy.logits(x[:5], 256), noisy.logits(x[:5])
    assert l1.shape == (5, 4) and np.abs(l1 - l2).max() > 0  # fresh noise per invoke
