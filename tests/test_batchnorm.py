"""BatchNorm re-estimation: NumPy reference, quantized models, errors."""

import numpy as np
import pytest

from brkeras.train import batchnorm
from brkeras.quant import binary_relax
from brkeras.run import train as train_lib
from brkeras._keras import keras
from test_quantize import images, qcfg, tiny_resnet


def dense_bn_model(seed=0):
    """x -> dense1 -> bn1 -> relu -> dense2 -> bn2: small enough for a NumPy reference."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((5,))
    h = keras.layers.Dense(4, use_bias=False, name="dense1")(x)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Dense(3, use_bias=False, name="dense2")(h)
    model = keras.Model(x, keras.layers.BatchNormalization(name="bn2")(h))
    rng = np.random.default_rng(seed)
    bn1 = model.get_layer("bn1")
    bn1.set_weights([rng.uniform(0.5, 1.5, 4), rng.normal(0, 0.3, 4),
                     rng.normal(0, 1, 4), rng.uniform(0.5, 1.5, 4)])
    return model


def reference_stats(model, batches):
    """Training-mode BN input moments per batch, averaged, computed in NumPy."""
    w1 = model.get_layer("dense1").kernel.numpy()
    w2 = model.get_layer("dense2").kernel.numpy()
    bn1 = model.get_layer("bn1")
    gamma, beta, eps = bn1.gamma.numpy(), bn1.beta.numpy(), bn1.epsilon
    m1, v1, m2, v2 = [], [], [], []
    for x in batches:
        h1 = x @ w1
        m1.append(h1.mean(0)), v1.append(h1.var(0))
        n1 = np.maximum(gamma * (h1 - h1.mean(0)) / np.sqrt(h1.var(0) + eps) + beta, 0)
        h2 = n1 @ w2
        m2.append(h2.mean(0)), v2.append(h2.var(0))
    return {"bn1": (np.mean(m1, 0), np.mean(v1, 0)), "bn2": (np.mean(m2, 0), np.mean(v2, 0))}


def test_moving_statistics_are_the_mean_batch_statistics():
    model = dense_bn_model()
    rng = np.random.default_rng(1)
    # Batches of different means, so their average differs from any one of them.
    batches = [rng.normal(k, 1 + k, (16, 5)).astype(np.float32) for k in range(3)]
    expected = reference_stats(model, batches)
    report = batchnorm.reestimate(model, iter(batches))
    assert report["input_batches"] == 3
    assert set(report["layers"]) == {"bn1", "bn2"}
    for name, (mean, var) in expected.items():
        bn = model.get_layer(name)
        np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-4, atol=1e-5)
        assert report["layers"][name]["variance_ratio"] >= 1.0
    # The trainable weights are untouched.
    assert model.get_layer("bn1").gamma.numpy().min() >= 0.5


def test_one_batch_makes_inference_equal_training_mode_on_a_quantized_model():
    # A quantized model shares its BatchNorm layers with the float model it was
    # cloned from; the re-estimation must read the quantized model's own graph.
    q = train_lib.quantize_from_config(tiny_resnet(), qcfg())
    binary_relax.set_exact(q, True)
    x = images(8)
    assert not np.allclose(q(x, training=False).numpy(), q(x, training=True).numpy(), atol=1e-3)
    batchnorm.reestimate(q, [x])
    np.testing.assert_allclose(q(x, training=False).numpy(), q(x, training=True).numpy(),
                               rtol=1e-3, atol=1e-4)


def test_errors():
    x = keras.Input((4,))
    with pytest.raises(ValueError, match="no BatchNormalization"):
        batchnorm.reestimate(keras.Model(x, keras.layers.Dense(2)(x)), [np.zeros((2, 4))])
    with pytest.raises(ValueError, match="no batches"):
        batchnorm.reestimate(dense_bn_model(), [])
