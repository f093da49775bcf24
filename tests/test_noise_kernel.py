"""The fused noise kernels (nn/kernels/fk_noise.cc) against NumPy references.

The layer-level checks (gradient against autodiff of the old formula, bfloat16,
constant input, the NoiseBank layout) run on both paths in test_noise_layer.py;
here: the ops themselves in float64 references, their draws' distribution, bad
shapes, determinism, and the switch back to the TF-op path.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest
from scipy import stats

from brkeras._keras import tf
from brkeras.nn import kernels, layers

SIGMA = 0.1


@pytest.fixture(scope="module")
def ops():
    ops = kernels.fk_noise_ops()
    if ops is None:
        if shutil.which("g++"):  # `make setup` builds it wherever g++ exists
            pytest.fail(f"the fused kernel should be built here: {kernels.unavailable_reason()}")
        pytest.skip(f"no fused kernel: {kernels.unavailable_reason()}")
    return ops


def _uniforms(key_counter, q, r):
    """TF's own stateless Philox uniforms [2, ceil(QR / 2)]: what the kernel draws."""
    key, counter = key_counter
    return tf.raw_ops.StatelessRandomUniformV2(shape=[2, (q * r + 1) // 2], key=key,
                                               counter=counter, dtype=tf.float32, alg=1).numpy()


def _draws(rng, q, r, pool):
    """((key, counter), u, rows, cols): a Philox key and counter from a random seed,
    the uniforms TF draws from them, and random signs."""
    seed = tf.constant(rng.integers(-2 ** 31, 2 ** 31, 2), tf.int32)
    key_counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=seed)
    rows = rng.choice([-1.0, 1.0], (pool, q)).astype(np.float32)
    cols = rng.choice([-1.0, 1.0], (pool, r)).astype(np.float32)
    return key_counter, _uniforms(key_counter, q, r), rows, cols


def _reference(x, u, rows, cols, sigma):
    """(y, mean, var, z, n) in float64: Box-Muller as layers.standard_normal, pooled."""
    q, r = rows.shape[1], cols.shape[1]
    u = u.astype(np.float64)
    rad = np.sqrt(-2 * np.log1p(-u[0]))
    z = np.concatenate([rad * np.cos(2 * np.pi * u[1]), rad * np.sin(2 * np.pi * u[1])])
    z = z[:q * r].reshape(q, r)
    n = (rows[:, :, None] * cols[:, None, :] * z[None]).reshape(-1)[:x.size].reshape(x.shape)
    x = x.astype(np.float64)
    return x + sigma * x.std() * n, x.mean(), x.var(), z, n


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("shape,pool", [((8, 8, 8, 16), 8), ((3, 7, 5, 2), 4), ((5, 9, 9, 3), 1)])
def test_forward_and_backward_against_numpy(ops, dtype, shape, pool):
    rng = np.random.default_rng(0)
    size = int(np.prod(shape))
    q, r = layers.pool_layout_static(size, pool)
    kc, u, rows, cols = _draws(rng, q, r, pool)
    x = tf.cast(rng.normal(3.0, 2.0, shape).astype(np.float32), dtype)  # mean != 0
    g = tf.cast(rng.normal(0, 1, shape).astype(np.float32), dtype)
    xv = tf.cast(x, tf.float64).numpy()
    y_ref, mean_ref, var_ref, z_ref, n = _reference(xv, u, rows, cols, SIGMA)
    y, mean, var, z = ops.brkeras_fk_noise(x, *kc, rows, cols, sigma=SIGMA)
    assert y.dtype == dtype and y.shape == x.shape and z.shape == (q, r)
    np.testing.assert_allclose(z.numpy(), z_ref, rtol=2e-5, atol=2e-5)
    assert abs(float(mean) - mean_ref) < 1e-6 * abs(mean_ref)
    assert abs(float(var) / var_ref - 1) < 1e-6
    tol = 1e-5 if dtype == tf.float32 else 2 ** -8  # rounded once to x's dtype
    np.testing.assert_allclose(tf.cast(y, tf.float64).numpy(), y_ref, rtol=tol, atol=tol)
    gv = tf.cast(g, tf.float64).numpy()
    dx_ref = gv + SIGMA * np.sum(gv * n) * (xv - xv.mean()) / (xv.size * xv.std())
    dx = ops.brkeras_fk_noise_grad(g, x, z, rows, cols, mean, var, sigma=SIGMA)
    assert dx.dtype == dtype
    np.testing.assert_allclose(tf.cast(dx, tf.float64).numpy(), dx_ref, rtol=tol,
                               atol=tol * np.abs(dx_ref).max())


def test_constant_input_is_unchanged_and_passes_g(ops):
    x = tf.fill([4, 5, 5, 3], 2.5)
    kc, _, rows, cols = _draws(np.random.default_rng(1), 16, 20, 1)
    y, mean, var, z = ops.brkeras_fk_noise(x, *kc, rows, cols, sigma=SIGMA)
    assert float(var) == 0.0 and float(mean) == 2.5
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    g = tf.random.normal(x.shape)
    np.testing.assert_array_equal(
        ops.brkeras_fk_noise_grad(g, x, z, rows, cols, mean, var, sigma=SIGMA).numpy(), g.numpy())


def test_same_inputs_give_bitwise_the_same_outputs(ops):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (64, 32, 32, 8)).astype(np.float32)  # many chunks, both threads
    kc, _, rows, cols = _draws(rng, 256, 256, 8)
    a = [t.numpy() for t in ops.brkeras_fk_noise(x, *kc, rows, cols, sigma=SIGMA)]
    b = [t.numpy() for t in ops.brkeras_fk_noise(x, *kc, rows, cols, sigma=SIGMA)]
    for s, t in zip(a, b):
        np.testing.assert_array_equal(s, t)


def test_bad_shapes_are_refused(ops):
    x = tf.zeros([2, 4, 4, 2])  # 64 elements
    (key, counter), _, rows, cols = _draws(np.random.default_rng(3), 2, 4, 8)  # 8 * 2 * 4 = 64
    ops.brkeras_fk_noise(x, key, counter, rows, cols, sigma=SIGMA)
    with pytest.raises(tf.errors.InvalidArgumentError, match="smaller than x"):
        ops.brkeras_fk_noise(x, key, counter, rows[:4], cols[:4], sigma=SIGMA)
    with pytest.raises(tf.errors.InvalidArgumentError, match="rows must be"):
        ops.brkeras_fk_noise(x, key, counter, rows, cols[:4], sigma=SIGMA)  # k differs
    with pytest.raises(tf.errors.InvalidArgumentError, match="StatelessRandomGetKeyCounter"):
        ops.brkeras_fk_noise(x, key, counter[:1], rows, cols, sigma=SIGMA)


@pytest.mark.parametrize("counter", [[0, 0], [2 ** 32 - 5, 7], [2 ** 64 - 9, 2 ** 32 - 1],
                                     [2 ** 64 - 3, 2 ** 64 - 1]])
@pytest.mark.parametrize("q,r", [(3, 6), (129, 257)])  # half = 9; two chunks, half odd
def test_the_kernels_uniforms_are_tfs_philox_stream(ops, counter, q, r):
    """Bit for bit TF's StatelessRandomUniformV2, also where the 128-bit counter carries
    from one 32-bit word into the next inside a block of 16 lanes: z = Box-Muller(u)
    against TF's u to float rounding (a single wrong uniform is off by far more)."""
    key_counter = (tf.constant([0x0123456789ABCDEF], tf.uint64), tf.constant(counter, tf.uint64))
    u = _uniforms(key_counter, q, r).astype(np.float64)
    x = tf.random.normal([1, q * r])
    z = ops.brkeras_fk_noise(x, *key_counter, tf.ones([1, q]), tf.ones([1, r]), sigma=SIGMA)[3]
    rad = np.sqrt(-2 * np.log1p(-u[0]))
    z_ref = np.concatenate([rad * np.cos(2 * np.pi * u[1]), rad * np.sin(2 * np.pi * u[1])])
    np.testing.assert_allclose(z.numpy().reshape(-1), z_ref[:q * r], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("pool", [1, 8])
def test_the_fused_layer_draws_standard_normal_pooled_noise(ops, pool):
    """test_models' distribution checks, on the noise the fused layer adds."""
    del ops
    shape = (64, 16, 16, 16)
    x = tf.constant(np.random.default_rng(4).normal(1.0, 2.0, shape).astype(np.float32))
    y = layers.feynman_kac_noise(x, SIGMA, pool)
    xv = x.numpy().astype(np.float64)
    n = ((y.numpy() - xv) / (SIGMA * xv.std())).reshape(-1)
    N, m = n.size, n.size // pool
    assert abs(n.mean()) < 5 / np.sqrt(N)
    assert abs(n.var() - 1) < 5 * np.sqrt(2 / m) + 1e-4
    assert abs(np.mean(np.abs(n) > 1.6448536) - 0.1) < 5 * np.sqrt(0.09 / m) + 0.002
    assert stats.kstest(n[:m], "norm").pvalue > 1e-3
    for lag in (1, 16, 4096, N // max(pool, 2)):
        assert abs(np.corrcoef(n[:-lag], n[lag:])[0, 1]) < 6 * np.sqrt(3 / (N - lag))
    if pool > 1:  # copies of one pool entry share |n|
        np.testing.assert_allclose(np.abs(n[:m]), np.abs(n[m:2 * m]), rtol=1e-3, atol=1e-3)
    y2 = layers.feynman_kac_noise(x, SIGMA, pool)  # fresh draws on every call
    assert np.abs(y2.numpy() - y.numpy()).mean() > 0.05 * SIGMA * xv.std()


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("pool", [1, 8])
def test_both_paths_draw_the_same_noise_and_gradient(ops, monkeypatch, dtype, pool):
    """Same seed, same draws: a run's noise does not depend on whether the kernel is built."""
    del ops
    rng = np.random.default_rng(5)
    x = tf.cast(rng.normal(0.5, 1.5, (8, 16, 16, 8)).astype(np.float32), dtype)  # 2^14: exact
    g = tf.cast(rng.normal(0, 1, x.shape).astype(np.float32), dtype)

    def run():
        tf.random.set_seed(7)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layers.feynman_kac_noise(x, SIGMA, pool)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cast(g, tf.float32))
        return [tf.cast(t, tf.float64).numpy() for t in (y, tape.gradient(loss, x))]

    fused = run()
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    tf_ops = run()
    tol = 1e-5 if dtype == tf.float32 else 2 ** -7  # one bfloat16 rounding apart at most
    for a, b in zip(fused, tf_ops):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def _op_types(fn, x):
    graph = tf.function(fn).get_concrete_function(tf.TensorSpec(x.shape, x.dtype)).graph
    return {op.type for op in graph.get_operations()}


def test_the_switch_turns_the_kernel_off(ops, monkeypatch):
    del ops
    x = tf.zeros([2, 8, 8, 4])

    def fn(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            y = layers.feynman_kac_noise(v, SIGMA, 8)
        return tape.gradient(y, v)

    assert {"BrkerasFkNoise", "BrkerasFkNoiseGrad"} <= _op_types(fn, x)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.fk_noise_ops() is None
    types = _op_types(fn, x)
    assert "BrkerasFkNoise" not in types and "StatelessRandomUniformV2" in types
    with kernels.disabled():  # graphs for TFLite: builtin random ops only
        types = _op_types(fn, x)
    assert "RandomUniform" in types and not any(t.startswith("Stateless") for t in types)
    # dtypes the kernel does not take use the TF-op path too
    monkeypatch.delenv(kernels.ENV_SWITCH)
    assert "BrkerasFkNoise" not in _op_types(fn, tf.zeros([2, 8, 8, 4], tf.float16))


def test_a_library_older_than_its_source_is_not_loaded(tmp_path, monkeypatch):
    lib, src = tmp_path / "_fk_noise.so", tmp_path / "fk_noise.cc"
    lib.write_bytes(b"")
    src.write_text("// newer")
    os.utime(lib, (1, 1))
    monkeypatch.setattr(kernels, "LIBRARY", str(lib))
    monkeypatch.setattr(kernels, "SOURCE", str(src))
    ops, reason = kernels._load()  # pylint: disable=protected-access
    assert ops is None and "older than its source" in reason
    monkeypatch.setattr(kernels, "LIBRARY", str(tmp_path / "missing.so"))
    ops, reason = kernels._load()  # pylint: disable=protected-access
    assert ops is None and "python -m brkeras.nn.kernels" in reason


def test_a_failed_build_reports_the_compilers_errors_first():
    stderr = "\n".join(["x.h:1:2: warning: use of 'foo' [-Wfoo]"] * 400
                       + ["Eigen/PacketMathFP16.h:740:49: error: expected initializer before '<' token"]
                       + ["x.h:3:4: note: in expansion of macro 'BAR'"] * 400)
    message = kernels._compiler_errors(stderr)  # pylint: disable=protected-access
    assert message.startswith("Eigen/PacketMathFP16.h:740:49: error: expected initializer")
    assert "error:" not in kernels._compiler_errors("a.h:1: warning: w\n")  # pylint: disable=protected-access


def test_the_build_leaves_avx512_fp16_off_where_gcc_knows_the_flag():
    # TF's bundled Eigen does not compile with AVX512-FP16 on (Sapphire Rapids hosts)
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    cmd = kernels.compile_command("/tmp/unused.so")
    assert "-march=native" in cmd
    gcc_major = int(subprocess.run(["g++", "-dumpversion"], capture_output=True, text=True,
                                   check=True).stdout.split(".")[0])
    assert ("-mno-avx512fp16" in cmd) == (gcc_major >= 12)  # the flag exists since GCC 12
