"""The Feynman-Kac noise layer's hand-written forward/gradient (nn/layers.py).

Against references: its float32 moments against NumPy in float64, its gradient
against autodiff of the old formula x + sigma * reduce_std(x) * n (with the
layer's own n held fixed), in float32 and bfloat16; the Box-Muller normals
against N(0, 1); the layout of the pooled draw against the deploy NoiseBank's.
The distribution checks of float32 draws are in test_models.py; here the same
checks run on bfloat16 draws. The layer checks run on both paths of the layer
(`noise_path`: TF ops, and the fused kernels of nn/kernels).
"""

import numpy as np
import pytest
from scipy import stats

from brkeras.nn import kernels, layers
from brkeras._keras import tf

SIGMA = 0.1


@pytest.fixture(params=["tf_ops", "fused_kernel"])
def noise_path(request, monkeypatch):
    """Runs a layer test on the TF-op path and on the fused kernels (nn/kernels)."""
    if request.param == "tf_ops":
        monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    elif kernels.fk_noise_ops() is None:
        pytest.skip(f"no fused kernel: {kernels.unavailable_reason()} (test_noise_kernel.py "
                    "fails where g++ exists)")
    return request.param


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("shift", [0.0, 1.0, 30.0])
def test_moments_are_float32_accurate(dtype, shift):
    rng = np.random.default_rng(0)
    x = tf.cast(tf.constant(rng.normal(shift, 2.0, (64, 16, 16, 8)).astype(np.float32)), dtype)
    ref = tf.cast(x, tf.float64).numpy()  # the stats of the values x holds
    mean, var, n = layers.moments(x)
    assert mean.dtype == var.dtype == tf.float32 and int(n) == ref.size
    # float32 accumulation: ~1e-7 relative, times (1 + mean^2 / var) for the variance
    assert abs(float(mean) - ref.mean()) < 1e-6 * (abs(ref.mean()) + ref.std())
    assert abs(float(var) / ref.var() - 1) < 2e-6 * (1 + ref.mean() ** 2 / ref.var())


def test_moments_of_a_constant_and_a_vector():
    mean, var, n = layers.moments(tf.fill([4, 3, 3, 2], 5.0))
    assert float(mean) == 5.0 and float(var) == 0.0 and int(n) == 72
    v = np.arange(10, dtype=np.float32)
    mean, var, _ = layers.moments(tf.constant(v))
    np.testing.assert_allclose([float(mean), float(var)], [v.mean(), v.var()], rtol=1e-6)


def _noisy_with_grad(x, g, pool):
    with tf.GradientTape() as tape:
        tape.watch(x)
        policy = "mixed_bfloat16" if x.dtype == tf.bfloat16 else "float32"
        y = layers.FeynmanKacNoise(SIGMA, pool, dtype=policy)(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * g)
    return y, tape.gradient(loss, x)


@pytest.mark.parametrize("pool", [1, 8])
def test_gradient_equals_autodiff_of_the_old_formula(pool, noise_path):
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(0.5, 1.5, (8, 8, 8, 16)).astype(np.float32))
    g = tf.constant(rng.normal(size=(8, 8, 8, 16)).astype(np.float32))
    y, grad = _noisy_with_grad(x, g, pool)
    # the layer's noise, recovered: n = (y - x) / (sigma * std(x)), held fixed below
    n = (y.numpy().astype(np.float64) - x.numpy()) / (SIGMA * np.std(x.numpy(), dtype=np.float64))
    n = tf.constant(n.astype(np.float32))
    with tf.GradientTape() as tape:  # the old layer: autodiff through tf.math.reduce_std
        tape.watch(x)
        y_old = x + SIGMA * tf.math.reduce_std(x) * n
        loss = tf.reduce_sum(y_old * g)
    np.testing.assert_allclose(y.numpy(), y_old.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad.numpy(), tape.gradient(loss, x).numpy(), rtol=1e-4, atol=1e-5)
    # and the closed form of the module docstring, in float64
    xn, gn, nn = x.numpy().astype(np.float64), g.numpy().astype(np.float64), n.numpy()
    expected = gn + SIGMA * np.sum(gn * nn) * (xn - xn.mean()) / (xn.size * xn.std())
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_gradient_in_bfloat16_matches_the_float64_formula(noise_path):
    # L = |y|^2 / 2, so g = y and <g, n> ~ sigma std N: the std-gradient term
    # sigma^2 (x - mean) is large enough to be seen through bfloat16 rounding.
    sigma = 0.5
    rng = np.random.default_rng(2)
    x = tf.cast(tf.constant(rng.normal(0.5, 1.5, (16, 8, 8, 16)).astype(np.float32)), tf.bfloat16)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layers.FeynmanKacNoise(sigma, 8, dtype="mixed_bfloat16")(x)
        loss = 0.5 * tf.reduce_sum(tf.square(tf.cast(y, tf.float32)))
    grad = tape.gradient(loss, x)
    assert y.dtype == grad.dtype == tf.bfloat16
    xn, yn = tf.cast(x, tf.float64).numpy(), tf.cast(y, tf.float64).numpy()
    n = (yn - xn) / (sigma * xn.std())
    g = yn  # dL/dy, as the layer received it
    expected = g + sigma * np.sum(g * n) * (xn - xn.mean()) / (xn.size * xn.std())
    got = tf.cast(grad, tf.float64).numpy()
    assert np.abs(got - expected).max() < 2 ** -7 * np.abs(expected).max()  # bfloat16: 8 bits
    term, term_ref = got - g, expected - g  # the part that flows through std(x)
    assert np.abs(term_ref).mean() > 0.1 * np.abs(g).mean()
    assert abs(np.sum(term * term_ref) / np.sum(term_ref ** 2) - 1) < 0.02


def test_constant_input_gets_no_noise_and_gradient_g(noise_path):
    x = tf.fill([2, 4, 4, 3], 0.7)
    g = tf.ones([2, 4, 4, 3])
    y, grad = _noisy_with_grad(x, g, 8)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_array_equal(grad.numpy(), g.numpy())


def test_box_muller_normals_are_standard_normal():
    z = layers.standard_normal(tf.constant(2 ** 20 + 1)).numpy().astype(np.float64)
    n = z.size
    assert n == 2 ** 20 + 1 and z.dtype == np.float64 and np.all(np.isfinite(z))
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(np.mean(z ** 4) - 3) < 5 * np.sqrt(96 / n)
    for q in (1.6448536, 2.5758293, 3.2905267):  # two-sided 10%, 1%, 0.1%
        p = 2 * stats.norm.sf(q)
        assert abs(np.mean(np.abs(z) > q) - p) < 5 * np.sqrt(p * (1 - p) / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    half = n // 2  # the cos and the sin halves of one Box-Muller draw are independent
    a, b = z[:half], z[half:2 * half]
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(half)
    assert abs(np.corrcoef(a ** 2, b ** 2)[0, 1]) < 5 / np.sqrt(half)
    assert np.abs(z).max() < 6.0  # 23-bit uniforms reach 5.65, as tf.random.normal's


@pytest.mark.parametrize("pool", [1, 8])
def test_bfloat16_draws_keep_the_distribution(pool):
    """test_models.test_noise_distribution_single_draw, on the bfloat16 noise."""
    shape, scale = (64, 16, 16, 16), 0.25
    p = layers.scaled_noise(tf.constant(shape), tf.constant(scale), pool, tf.bfloat16)
    assert p.dtype == tf.bfloat16
    n = tf.cast(p, tf.float64).numpy().reshape(-1) / scale
    N, m = n.size, n.size // pool
    assert abs(n.mean()) < 5 / np.sqrt(N)
    assert abs(n.var() - 1) < 5 * np.sqrt(2 / m) + 2 ** -8  # + bfloat16 rounding
    assert abs(np.mean(np.abs(n) > 1.6448536) - 0.1) < 5 * np.sqrt(0.09 / m) + 0.002
    for lag in (1, 16, 4096, N // max(pool, 2)):
        assert abs(np.corrcoef(n[:-lag], n[lag:])[0, 1]) < 6 * np.sqrt(3 / (N - lag))
    if pool > 1:  # copies of one pool entry share |n|, exactly (rounding is symmetric)
        np.testing.assert_array_equal(np.abs(n[:m]), np.abs(n[m:2 * m]))


def _sign_pattern_is_rank_one(noise, n, pool):
    """For copies a = 0, 1 of the pool layout (Q, R): S = sign(n_0 / n_1) as a Q x R
    matrix. Both the training layer and the NoiseBank draw n_a = (r_a t_a^T) * z, so
    |n_0| = |n_1| and S is the rank-1 sign matrix (r_0 r_1)(t_0 t_1)^T. Entries below
    1e-2 in size are left out (a recovered n carries float32 rounding)."""
    q, r = layers.pool_layout_static(n, pool)
    assert pool * q * r == n
    c = noise.reshape(pool, q, r).astype(np.float64)
    np.testing.assert_allclose(np.abs(c[0]), np.abs(c[1]), rtol=1e-4, atol=1e-4)
    s = np.sign(c[0] * c[1])
    ok = (np.abs(c[0]) > 1e-2) & (np.abs(c[1]) > 1e-2)
    i0 = int(np.argmax(ok.all(axis=1)))
    j0 = int(np.argmax(ok.all(axis=0)))
    assert ok[i0].all() and ok[:, j0].all()
    rank1 = np.outer(s[:, j0], s[i0, :]) * s[i0, j0]
    return bool(np.all((s == rank1)[ok])), float(np.mean(s[ok] > 0))


def test_training_layer_and_noise_bank_draw_the_same_layout(noise_path):
    batch, shape, pool = 4, (16, 16, 8), 8
    n = batch * int(np.prod(shape))
    x = tf.constant(np.random.default_rng(3).normal(0, 1, (batch,) + shape).astype(np.float32))
    y = layers.FeynmanKacNoise(SIGMA, pool)(x)
    train_n = ((y.numpy() - x.numpy()) / (SIGMA * np.std(x.numpy(), dtype=np.float64))).reshape(-1)
    bank_n = layers.bank_noise([n], pool)[0].numpy()
    for noise in (train_n, bank_n):
        rank1, share = _sign_pattern_is_rank_one(noise, n, pool)
        assert rank1 and 0.3 < share < 0.7  # the sign patterns r t^T of fair coins


_TRACE_NOISE = """
from brkeras._keras import tf
from brkeras.nn import layers
noise = layers.FeynmanKacNoise(0.1)
f = tf.function(lambda x: noise(x, training=True))
print(float(tf.reduce_sum(f(tf.ones((2, 4, 4, 2))))))
"""


def test_tracing_the_noise_gives_no_autograph_warning():
    # The kernel lookup's file checks (os.path.exists, getmtime) run in Python;
    # AutoGraph warned at every trace that it could not convert them.
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top
    r = subprocess.run([sys.executable, "-c", _TRACE_NOISE], capture_output=True, text=True,
                       check=False, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "AutoGraph could not transform" not in r.stderr
