"""Values of the EnResNet builder and the Feynman-Kac noise layer."""

import json

import numpy as np
import pytest

from brkeras.run import config as config_lib
from brkeras.nn import kernels, layers
from brkeras.nn import models
from brkeras.run import train as train_lib
from brkeras._keras import keras, tf


def _names(depth, ensemble):
    """The layer names of docs/design.md, in graph order, for a 3-stage model."""
    n = (depth - 2) // 6
    names = ["image"]
    for m in range(ensemble):
        names.append(f"m{m}_conv0")
        for s in (1, 2, 3):
            for b in range(n):
                p = f"m{m}_s{s}_b{b}"
                names += [f"{p}_bn1", f"{p}_relu1"]
                if s > 1 and b == 0:
                    names.append(f"{p}_shortcut")
                names += [f"{p}_conv1", f"{p}_bn2", f"{p}_relu2", f"{p}_conv2", f"{p}_add",
                          f"{p}_noise"]
        names += [f"m{m}_bn_final", f"m{m}_relu_final", f"m{m}_pool", f"m{m}_logits"]
    return names + (["logits"] if ensemble > 1 else [])


def _trainable_count(in_ch, width, depth, classes):
    """Trainable parameters of a pre-act ResNet with 1x1 projections, by hand."""
    n = (depth - 2) // 6
    total = 9 * in_ch * width  # stem
    c_in = width
    for s in range(3):
        c = width * 2 ** s
        for b in range(n):
            total += 2 * c_in + 9 * c_in * c + 2 * c + 9 * c * c  # bn1, conv1, bn2, conv2
            total += c_in * c if c_in != c else 0  # shortcut
            c_in = c
    return total + 2 * c_in + c_in * classes + classes  # bn_final, dense


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
@pytest.mark.parametrize("depth", [8, 20])
def test_shapes_and_names(shape, depth):
    model = models.build_model(shape, 10, depth=depth, width=4, ensemble=1)
    assert sorted(l.name for l in model.layers) == sorted(_names(depth, 1))
    assert model.output_shape == (None, 10)
    side = -(-shape[0] // 4)  # two stride-2 "same" convs
    assert model.get_layer(f"m0_s3_b{(depth - 2) // 6 - 1}_noise").output_shape == (None, side, side, 16)
    y = model(np.random.default_rng(0).random((2, *shape), np.float32))
    assert y.shape == (2, 10) and np.all(np.isfinite(y))
    assert all(not l.use_bias for l in model.layers if isinstance(l, keras.layers.Conv2D))
    assert model.get_layer("m0_s2_b0_shortcut").kernel.shape == (1, 1, 4, 8)
    assert model.get_layer("m0_s2_b0_shortcut").strides == (2, 2)


def test_resnet20_parameter_count():
    model = models.build_model((32, 32, 3), 10)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == _trainable_count(3, 16, 20, 10) == 272_282  # ~0.27M (He et al.)
    assert model.count_params() == trainable + 2 * (16 * 7 + 32 * 6 + 64 * 6)  # BN moving stats


def test_conv_init_is_he_fan_out():
    model = models.build_model((32, 32, 3), 10, depth=8, width=32, sigma=0)
    k = model.get_layer("m0_s3_b0_conv2").kernel.numpy()  # 3x3x128x128
    assert abs(k.std() - np.sqrt(2.0 / (9 * 128))) < 0.02 * np.sqrt(2.0 / (9 * 128))


def test_ensemble_is_mean_of_member_logits():
    model = models.build_model((28, 28, 1), 10, depth=8, width=4, ensemble=3, sigma=0.0)
    assert sorted(l.name for l in model.layers) == sorted(_names(8, 3))
    assert isinstance(model.get_layer("logits"), keras.layers.Average)
    assert model.output.name.startswith("logits")
    x = np.random.default_rng(1).random((4, 28, 28, 1), np.float32)
    members = [keras.Model(model.input, model.get_layer(f"m{i}_logits").output)(x).numpy()
               for i in range(3)]
    assert np.abs(members[0] - members[1]).max() > 1e-3  # independent weights
    np.testing.assert_allclose(model(x).numpy(), np.mean(members, axis=0), rtol=1e-5, atol=1e-6)


def test_noise_on_at_inference_and_absent_at_sigma_zero():
    x = np.random.default_rng(2).random((2, 32, 32, 3), np.float32)
    noisy = models.build_model((32, 32, 3), 10, depth=8, width=4, sigma=0.1)
    a, b = noisy(x, training=False).numpy(), noisy(x, training=False).numpy()
    assert np.abs(a - b).max() > 1e-4
    plain = models.build_model((32, 32, 3), 10, depth=8, width=4, sigma=0.0)
    np.testing.assert_array_equal(plain(x, training=False).numpy(), plain(x, training=False).numpy())
    graph = tf.function(lambda t: plain(t, training=False)).get_concrete_function(
            tf.TensorSpec([None, 32, 32, 3])).graph
    assert not [op.type for op in graph.get_operations() if "Random" in op.type]


def _draws(shape, pool, count):
    """count draws of n = (y - x) / (sigma * std(x)) for a fixed x."""
    x = tf.constant(np.random.default_rng(3).normal(1.0, 2.0, shape).astype(np.float32))
    layer = layers.FeynmanKacNoise(sigma=0.1, pool=pool)
    scale = 0.1 * float(np.std(x.numpy(), dtype=np.float64))
    f = tf.function(lambda: layer(x, training=False))
    return np.stack([(f().numpy() - x.numpy()) / scale for _ in range(count)]).reshape(count, -1)


@pytest.mark.parametrize("pool", [1, 2, 8])
def test_noise_distribution_single_draw(pool):
    n = _draws((64, 16, 16, 16), pool, 1)[0]  # N = 2^18
    N = n.size
    # Moments of |n| come from N / pool independent pool entries: 5-sigma bounds.
    m = N // pool
    assert abs(n.mean()) < 5 / np.sqrt(N)  # signs are independent per element
    assert abs(n.var() - 1) < 5 * np.sqrt(2 / m)  # Var(z^2) = 2
    assert abs(np.mean(n ** 4) - 3) < 5 * np.sqrt(96 / m)  # normal kurtosis; Var(z^4) = 96
    assert abs(np.mean(np.abs(n) > 1.6448536) - 0.1) < 5 * np.sqrt(0.09 / m)  # two-sided 10%
    for lag in (1, 16, 4096, N // max(pool, 2)):  # neighbours, channels, rows, pool copies
        assert abs(np.corrcoef(n[:-lag], n[lag:])[0, 1]) < 6 * np.sqrt(3 / (N - lag))
    if pool > 1:  # the given-up property: copies of one pool entry share |n|
        np.testing.assert_allclose(np.abs(n[: N // pool]), np.abs(n[N // pool: 2 * N // pool]),
                                   rtol=1e-4, atol=3e-5)  # float32 rounding of y - x


@pytest.mark.parametrize("pool", [1, 8])
def test_noise_elements_uncorrelated_across_draws(pool):
    d = _draws((8, 4, 4, 4), pool, 3000)  # 3000 draws x 512 elements
    cov = d.T @ d / len(d)
    se = np.sqrt(1 / len(d))  # std of a covariance estimate of independent N(0, 1)s
    assert np.abs(np.diag(cov) - 1).max() < 6 * np.sqrt(2) * se
    assert np.abs(d.mean(0)).max() < 6 * se
    idx = np.arange(512)
    share = (idx[:, None] % (512 // pool)) == (idx[None, :] % (512 // pool))  # same pool entry
    np.fill_diagonal(share, False)
    others = ~share
    np.fill_diagonal(others, False)
    assert np.abs(cov[others]).max() < 6 * se
    if pool > 1:  # n_u n_v = +-z^2 there: mean 0, but variance E[z^4] = 3
        assert share.sum() == 512 * (pool - 1)
        assert np.abs(cov[share]).max() < 6 * np.sqrt(3) * se
        assert abs(cov[share].mean()) < 6 * np.sqrt(3) * se / np.sqrt(share.sum() / 2)


def test_gradient_flows_through_std():
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(0.5, 1.5, (4, 8, 8, 8)).astype(np.float32))
    g = tf.constant(rng.normal(size=(4, 8, 8, 8)).astype(np.float32))
    layer = layers.FeynmanKacNoise(sigma=0.1, pool=8)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * g)
    grad = tape.gradient(loss, x).numpy()
    xn, xs = x.numpy().astype(np.float64), float(np.std(x.numpy(), dtype=np.float64))
    n = (y.numpy() - xn) / (0.1 * xs)
    expected = g.numpy() + 0.1 * np.sum(g.numpy() * n) * (xn - xn.mean()) / (xn.size * xs)
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-5)


def test_layer_serialization_round_trip():
    layer = layers.FeynmanKacNoise(sigma=0.25, pool=4, name="nz")
    cfg = layer.get_config()
    assert cfg["sigma"] == 0.25 and cfg["pool"] == 4 and cfg["name"] == "nz"
    again = layers.FeynmanKacNoise.from_config(json.loads(json.dumps(cfg)))
    assert (again.sigma, again.pool, again.name) == (0.25, 4, "nz")
    assert keras.utils.get_registered_object("brkeras>FeynmanKacNoise") is layers.FeynmanKacNoise


def test_model_json_round_trip():
    model = models.build_model((28, 28, 1), 10, depth=8, width=4, ensemble=2, sigma=0.0, noise_pool=4)
    again = keras.models.model_from_json(
            model.to_json(), custom_objects={"FeynmanKacNoise": layers.FeynmanKacNoise})
    assert [l.name for l in again.layers] == [l.name for l in model.layers]
    noise = again.get_layer("m1_s2_b0_noise")
    assert isinstance(noise, layers.FeynmanKacNoise) and (noise.sigma, noise.pool) == (0.0, 4)
    again.set_weights(model.get_weights())
    x = np.random.default_rng(5).random((3, 28, 28, 1), np.float32)
    np.testing.assert_allclose(again(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)


def test_from_config_reads_model_fields():
    c = config_lib.base_config()
    c.model.depth, c.model.width, c.model.ensemble, c.model.sigma, c.model.noise_pool = 14, 2, 2, 0.2, 1
    model = train_lib.from_config(c, (28, 28, 1), 7)
    assert model.output_shape == (None, 7)
    names = {l.name for l in model.layers}
    assert "m1_s3_b1_noise" in names and "m0_s1_b2_bn1" not in names  # depth 14: n = 2
    noise = model.get_layer("m0_s1_b0_noise")
    assert (noise.sigma, noise.pool) == (0.2, 1)


@pytest.mark.parametrize("depth", [7, 9, 21, 2, 20.5])
def test_invalid_depth_raises(depth):
    with pytest.raises(ValueError, match=r"6n\+2"):
        models.build_model((32, 32, 3), 10, depth=depth)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="input_shape"):
        models.build_model((32, 32), 10)
    with pytest.raises(ValueError, match="ensemble"):
        models.build_model((32, 32, 3), 10, ensemble=0)
    with pytest.raises(ValueError, match="sigma"):
        layers.FeynmanKacNoise(sigma=-0.1)
    with pytest.raises(ValueError, match="pool"):
        layers.FeynmanKacNoise(pool=0)


def test_tflite_builtins_only_and_stochastic():
    from ai_edge_litert.interpreter import Interpreter

    model = models.build_model((16, 16, 3), 10, depth=8, width=2, sigma=0.1, noise_pool=8)
    fn = tf.function(lambda t: model(t, training=False))
    with kernels.disabled():  # as deploy/convert.py traces: the fused op is no TFLite builtin
        concrete = fn.get_concrete_function(tf.TensorSpec([1, 16, 16, 3]))
    conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # raises on any Flex op
    interp = Interpreter(model_content=conv.convert(), num_threads=1)
    interp.allocate_tensors()
    x = np.random.default_rng(6).random((1, 16, 16, 3), np.float32)
    outs = []
    for _ in range(2):
        interp.set_tensor(interp.get_input_details()[0]["index"], x)
        interp.invoke()
        outs.append(interp.get_tensor(interp.get_output_details()[0]["index"]).copy())
    assert outs[0].shape == (1, 10) and np.abs(outs[0] - outs[1]).max() > 1e-5
