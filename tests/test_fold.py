"""BatchNorm folding and the attack network of the evaluation: same function, fewer ops."""

import numpy as np

from brkeras._keras import keras, tf
from brkeras.nn import fold
from brkeras.nn import layers as layers_lib
from brkeras.nn import models
from brkeras.quant import binary_relax, int8_qat
from brkeras.robust import evaluation

L = keras.layers


def randomise_batchnorm(model, seed=0):
    """Trained-looking BN statistics, so a wrong fold cannot hide behind identity BNs."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            gamma_beta = ([rng.uniform(0.5, 2.0, n)] if layer.scale else []) + (
                [rng.normal(0, 0.5, n)] if layer.center else [])
            layer.set_weights(gamma_beta + [rng.normal(0, 0.5, n), rng.uniform(0.2, 3.0, n)])
    return model


def images(n, shape=(28, 28, 1), seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n,) + shape).astype(np.float32)


def test_folded_weights_against_numpy_conv_then_batchnorm():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(1, 1, 3, 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    bn = L.BatchNormalization(epsilon=1e-3)
    bn.build((None, 4))
    gamma, beta, mean, var = (rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4),
                              rng.uniform(0.1, 2, 4))
    bn.set_weights([gamma, beta, mean, var])
    x = rng.normal(size=(5, 3)).astype(np.float32)
    want = ((x @ kernel[0, 0] + bias) - mean) / np.sqrt(var + 1e-3) * gamma + beta
    k, b = fold.folded_weights(kernel, bias, bn)
    np.testing.assert_allclose(x @ k[0, 0] + b, want, rtol=1e-5, atol=1e-5)
    k0, b0 = fold.folded_weights(kernel, None, bn)  # a bias-free conv
    np.testing.assert_allclose(b0, -mean * gamma / np.sqrt(var + 1e-3) + beta, rtol=1e-6)
    assert k0.dtype == np.float32 and b0.dtype == np.float32


def test_fold_batchnorm_folds_every_conv1_bn2_pair_and_keeps_the_function():
    keras.utils.set_random_seed(0)
    net = randomise_batchnorm(models.build_model((28, 28, 1), 10, depth=14, width=4, sigma=0.0))
    folded, pairs = fold.fold_batchnorm(net)
    blocks = [l.name[:-len("_bn2")] for l in net.layers if l.name.endswith("_bn2")]
    assert pairs == len(blocks) == 6
    names = {l.name for l in folded.layers}
    for p in blocks:
        assert p + "_bn2" not in names and p + "_bn1" in names  # bn1 follows an Add: stays
        assert folded.get_layer(p + "_conv1").use_bias
        assert folded.get_layer(p + "_conv2") is net.get_layer(p + "_conv2")  # shared
    x = images(16)
    np.testing.assert_allclose(folded(x, training=False).numpy(),
                               net(x, training=False).numpy(), rtol=1e-4, atol=1e-4)
    # and its input gradient, which is what the attacks use
    xt = tf.constant(x)

    def grad(m):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(tf.nn.log_softmax(m(xt, training=False))[:, 3])
        return tape.gradient(loss, xt).numpy()
    g = grad(net)
    np.testing.assert_allclose(grad(folded), g, rtol=1e-3, atol=1e-4 * np.abs(g).max())


def test_fold_leaves_a_conv_with_two_readers_or_an_activation_alone():
    inp = keras.Input((6, 6, 2))
    c = L.Conv2D(3, 3, padding="same", name="shared_out")(inp)
    a = L.BatchNormalization(name="bn_a")(c)
    b = L.ReLU(name="other_reader")(c)  # a second reader of c: folding would change it
    d = L.Conv2D(3, 3, padding="same", activation="relu", name="with_relu")(L.Add()([a, b]))
    out = L.BatchNormalization(name="bn_d")(d)
    m = keras.Model(inp, out)
    assert fold.fold_batchnorm(m) == (m, 0)


def test_attack_network_of_a_ternary_model_is_plain_folded_and_equal():
    keras.utils.set_random_seed(2)
    net = randomise_batchnorm(models.build_model((28, 28, 1), 10, depth=8, width=4, sigma=0.1))
    q = binary_relax.quantize_model(net, "ternary")
    binary_relax.set_exact(q, True)
    x = images(8)
    copy, how = evaluation.attack_network(q, x)
    assert how == {"exact_float_copy": True, "folded_batchnorm": 3, "checked_examples": 8}
    assert not binary_relax.br_quantizers(copy)
    assert not any(isinstance(l, binary_relax.QuantizeWrapper) for l in copy.layers)
    assert sum(isinstance(l, layers_lib.FeynmanKacNoise) and l.sigma == 0.1
               for l in copy.layers) == 3  # the noise stays on
    kernels = binary_relax.quantized_kernels(q)
    conv2 = [n for n in kernels if n.endswith("_conv2")]
    assert conv2
    for name in conv2:  # Q(w), as a constant
        np.testing.assert_array_equal(copy.get_layer(name).kernel.numpy(), kernels[name])


def test_attack_network_of_a_qat_model_is_the_model():
    keras.utils.set_random_seed(3)
    qat = int8_qat.int8_qat(models.build_model((28, 28, 1), 10, depth=8, width=4, sigma=0.0))
    copy, how = evaluation.attack_network(qat, images(4))
    assert copy is qat and how["folded_batchnorm"] == 0  # its fake-quant convs stay as trained


def test_evaluation_on_the_attack_network_gives_the_numbers_of_the_model(monkeypatch):
    keras.utils.set_random_seed(4)
    net = randomise_batchnorm(models.build_model((28, 28, 1), 10, depth=8, width=4, sigma=0.0))
    x, y = images(64, seed=5), np.random.default_rng(6).integers(0, 10, 64).astype(np.int32)
    y[:32] = net.predict(x[:32], verbose=0).argmax(1)  # some examples right, so attacks matter
    kw = dict(eps=0.05, attacks=("fgsm", "pgd20"), eot_attacks=(), batch_size=32,
              eps_sweep=None, more_effort=False)
    fast = evaluation.evaluate_model(net, x, y, **kw)
    assert fast["attack_network"]["folded_batchnorm"] == 3
    monkeypatch.setattr(evaluation, "attack_network", lambda m, _: (m, {}))
    slow = evaluation.evaluate_model(net, x, y, **kw)
    assert fast["natural_acc"] == slow["natural_acc"] and fast["natural_acc"]["single"] >= 0.5
    for name in ("fgsm", "pgd20"):  # PGD's random start is seeded per call: within 2 examples
        a, b = fast["attacks"][name]["plain"]["single"], slow["attacks"][name]["plain"]["single"]
        assert abs(a - b) <= 2 / 64 + 1e-9, (name, a, b)


def test_fold_handles_a_conv_bias_and_batchnorm_without_gamma_or_beta():
    keras.utils.set_random_seed(5)
    inp = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, padding="same", use_bias=True, bias_initializer="random_normal",
                 name="biased")(inp)
    h = L.ReLU()(L.BatchNormalization(center=False, name="no_beta")(h))
    h = L.Conv2D(3, 3, padding="same", use_bias=False, name="plain")(h)
    out = L.BatchNormalization(scale=False, name="no_gamma")(h)  # the model's output: folds too
    m = randomise_batchnorm(keras.Model(inp, out), seed=6)
    folded, pairs = fold.fold_batchnorm(m)
    assert pairs == 2
    x = images(4, (6, 6, 2))
    np.testing.assert_allclose(folded(x, training=False).numpy(), m(x, training=False).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_fold_skips_a_bfloat16_conv():
    inp = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, padding="same", use_bias=False, dtype="mixed_bfloat16")(inp)
    m = keras.Model(inp, L.BatchNormalization()(h))
    assert fold.fold_batchnorm(m) == (m, 0)  # k * s in bf16 would not be the model's function


def test_attack_network_records_why_it_kept_the_model(monkeypatch):
    keras.utils.set_random_seed(7)
    net = randomise_batchnorm(models.build_model((28, 28, 1), 10, depth=8, width=4, sigma=0.0))
    q = binary_relax.quantize_model(net, "ternary")
    binary_relax.set_exact(q, False)  # phase I: Q(w) is not what the model computes
    x = images(4)
    copy, how = evaluation.attack_network(q, x)
    assert copy is q and not how["exact_float_copy"] and "not in exact mode" in how["fallback"]

    def broken(model):
        raise NotImplementedError("a layer fold.py cannot rebuild")
    monkeypatch.setattr(fold, "fold_batchnorm", broken)
    binary_relax.set_exact(q, True)
    copy, how = evaluation.attack_network(q, x)  # the exact copy stays, the fold is skipped
    assert how["exact_float_copy"] and how["folded_batchnorm"] == 0
    assert "NotImplementedError" in how["fallback"] and copy is not q
