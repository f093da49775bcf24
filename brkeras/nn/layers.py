"""The Feynman-Kac noise layer of EnResNet (SPEC section 1).

Forward map, after each residual addition:

    y = x + sigma * std(x) * n,    n ~ N(0, 1) per element,

with std(x) ONE scalar over the whole batch tensor (all axes). The noise is on in
training AND inference: the layer ignores the `training` flag (the model is
stochastic, as in the reference). Gradients flow through std(x), as in the
PyTorch reference (`out + sigma * out.std() * randn`, no detach): the pullback is
dy/dx = I + sigma * n (d std / dx)^T, written by hand (`feynman_kac_noise`).
sigma = 0 is the identity with no random op in the graph (the plain-ResNet
baseline). Under a mixed dtype policy (x in bfloat16) mean and std are still
float32, the normals are drawn in float32 and rounded once to bfloat16.

How n is drawn (`pool`):

* pool = 1: exact i.i.d. draws, N normals (`standard_normal`: Box-Muller on
  Philox uniforms, the transform tf.random.normal uses, as vectorised ops; the
  PyPI wheel's RNG kernels are scalar code, ~5 ns per normal with tf.random.normal,
  ~1.6 ns per uniform; the fused kernel draws the same uniforms at ~0.5 ns).
* pool = k > 1 (the default, k = 8): one fresh pool z of ~N / k i.i.d. N(0, 1)
  draws, laid out as a Q x R matrix, reused k times; copy a gets the sign pattern
  r_a t_a^T of two fresh random sign vectors r_a ~ {+-1}^Q, t_a ~ {+-1}^R:

      n[a, i, j] = r[a, i] * t[a, j] * z[i, j],   flattened (a, i, j), cut to N.

  KEPT: every element is EXACTLY N(0, 1) (z symmetric, signs independent of z);
  the signs are pairwise independent fair coins, so distinct elements are
  uncorrelated, E[n_u n_v] = 0 for u != v; two elements that use different pool
  entries are independent; given the signs, n is Gaussian (any linear functional
  of n is normal); everything is redrawn on every call.
  GIVEN UP: the k elements that share z[i, j] (flat indices N/k apart, usually in
  different examples of the batch) have equal magnitudes |n|, so they are
  dependent and n is not jointly Gaussian; the signs are not mutually
  independent (the four signs of a 2x2 sub-block of one copy multiply to +1).
  Within one draw the empirical correlation of two copies a != a' is ~N(0, 3k/N).
  Cost: ~N/k normals + k(Q + R) uniforms + 3 elementwise passes over N (see
  bench/noise_cost.py), against N normals for pool = 1.

  Every op of both paths is a TFLite builtin (RANDOM_UNIFORM, LOG, SQRT, COS, SIN,
  CONCATENATION; pool > 1 also LESS, SELECT_V2, MUL, RESHAPE, STRIDED_SLICE; the
  layout arithmetic folds to constants at a fixed batch), so an exported model
  needs no Flex ops. Float ResNet20 in LiteRT, batch 1, 1 thread
  (bench/deploy_latency.py, with tf.random.normal draws in this layer): 0.41 ms
  without noise; with this layer as is 1.29 ms (pool = 1) and 0.87 ms (pool = 8);
  0.58 ms (pool = 8) in the deploy form below (NoiseBank, which still draws z by
  RANDOM_STANDARD_NORMAL: the same distribution), which brkeras.export uses.
"""

from brkeras._keras import keras, tf
from brkeras.nn import kernels


def _check(sigma, pool):
    if not float(sigma) >= 0:
        raise ValueError(f"sigma={sigma!r}: the noise scale must be >= 0 (0 = no noise)")
    if int(pool) != pool or pool < 1:
        raise ValueError(f"pool={pool!r}: must be an integer >= 1 "
                         "(1 = exact i.i.d. normals, k > 1 = a pool reused k times)")


def random_signs(shape, dtype=tf.float32):
    """Tensor of i.i.d. fair signs (+1 or -1) of `shape` and `dtype`, from uniform draws."""
    return tf.where(tf.random.uniform(shape) < 0.5, tf.ones([], dtype), -tf.ones([], dtype))


def philox_key_counter():
    """A fresh (key, counter) for TF's stateless Philox ops, from a stateful draw of a
    seed (so global and op seeds govern it as any TF random op): what the training
    noise's uniforms are drawn from, by TF's StatelessRandomUniformV2 or, bit for bit
    the same, inside the fused kernel (nn/kernels), which vectorises Philox."""
    seed = tf.random.uniform([2], minval=tf.int32.min, maxval=tf.int32.max, dtype=tf.int32)
    return tf.raw_ops.StatelessRandomGetKeyCounter(seed=seed)


def standard_normal(n, key_counter=None):
    """n i.i.d. N(0, 1) float32 draws by Box-Muller from uniform draws:
    (sqrt(-2 ln u1) cos(2 pi u2), sqrt(-2 ln u1) sin(2 pi u2)) with u1 in (0, 1].

    The same transform tf.random.normal applies (TF's Philox kernel is Box-Muller
    on 23-bit uniforms, so both reach 5.6 standard deviations), but as vectorised
    elementwise ops it costs ~60% of tf.random.normal here (bench/noise_cost.py):
    the scalar kernel is the uniform generator, not the transform.
    The uniforms [2, ceil(n / 2)] are tf.random.uniform's, or with `key_counter`
    (`philox_key_counter()`) the stateless Philox stream of that key and counter,
    which the fused kernel reproduces (RANDOM_UNIFORM is a TFLite builtin, the
    stateless op is not: models traced for TFLite use the former).
    """
    half = (n + 1) // 2
    if key_counter is None:
        u = tf.random.uniform(tf.stack([2, half]))
    else:
        key, counter = key_counter
        u = tf.raw_ops.StatelessRandomUniformV2(shape=tf.stack([2, half]), key=key,
                                                counter=counter, dtype=tf.float32, alg=1)
    radius = tf.sqrt(-2.0 * tf.math.log1p(-u[0]))  # 1 - u1 in (0, 1]
    angle = 6.283185307179586 * u[1]
    return tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], 0)[:n]


def pool_layout(n, pool):
    """(Q, R) with pool * Q * R >= n, Q a power of 2 near sqrt(n / pool).

    For the power-of-2-rich sizes of ResNets, pool * Q * R == n exactly, so the
    final slice is a no-op.
    """
    per = (n + pool - 1) // pool
    q = tf.cast(2.0 ** tf.floor(0.5 * tf.math.log(tf.cast(per, tf.float32)) / 0.6931472),
                tf.int32)
    return q, (per + q - 1) // q


def _pooled(z, rows, cols, n):
    """flatten(z * rows * cols)[:n]: the pool z [1, Q, R] under the signs rows
    [k, Q, 1] and cols [k, 1, R]; shared by training (scaled_noise) and deploy."""
    return tf.reshape(z * rows * cols, [-1])[:n]


def scaled_noise(shape, scale, pool, dtype=tf.float32, key_counter=None):
    """scale * n with n ~ N(0, 1) per element, drawn as the module docstring says.

    pool = k > 1: z ~ N(0, 1)^[Q, R] (Q * R ~ N / k), signs r ~ {+-1}^[k, Q],
    t ~ {+-1}^[k, R], n[a, i, j] = r[a, i] * t[a, j] * z[i, j], flattened and cut
    to N. `scale` is a float32 scalar tensor; the normals are drawn and scaled
    in float32 and the result is cast to `dtype` (the layer's compute dtype).
    Gradients flow to `scale` (d/dscale = n). `key_counter`: as standard_normal.
    """
    n = tf.reduce_prod(shape)
    if pool == 1:
        return tf.reshape(tf.cast(scale * standard_normal(n, key_counter), dtype), shape)
    q, r = pool_layout(n, pool)
    z = standard_normal(q * r, key_counter)
    z = tf.cast(scale * tf.reshape(z, tf.stack([1, q, r])), dtype)
    rows = random_signs(tf.stack([pool, q, 1]), dtype)
    cols = random_signs(tf.stack([pool, 1, r]), dtype)
    return tf.reshape(_pooled(z, rows, cols, n), shape)


def moments(x):
    """(mean, variance, N) of all elements of x, in float32 whatever x's dtype.

    Two passes, as tf.math.reduce_std: mean = reduce_mean(x), var =
    reduce_mean((x - mean)^2), so no cancellation whatever the mean. (One
    pass with sum(x^2) by a batched MatMul measured slower here, and less exact.)
    """
    xf = x if x.dtype == tf.float32 else tf.cast(x, tf.float32)
    mean = tf.reduce_mean(xf)
    var = tf.reduce_mean(tf.math.squared_difference(xf, mean))
    return mean, var, tf.cast(tf.size(xf), tf.float32)


# The kernel lookup checks files in Python: not for AutoGraph, which warned at
# every trace that it cannot convert os.path.exists.
_fused_kernel_ops = tf.autograph.experimental.do_not_convert(kernels.fk_noise_ops)


def feynman_kac_noise(x, sigma=0.1, pool=8):
    """y = x + sigma * std(x) * n, std over all axes of x, n ~ N(0, 1) per element.

    Gradients flow through std(x), as autodiff of tf.math.reduce_std would give,
    but by a hand-written pullback (tf.custom_gradient):
        dL/dx = g + sigma * <g, n> * (x - mean(x)) / (N * std(x)),   g = dL/dy,
    i.e. g + <g, p> (x - mean) / (N var) with p = sigma std n the added noise:
    one product-sum and three elementwise passes over N, where autodiff of
    reduce_std and of the pooled draw takes about a dozen (bench/noise_cost.py).
    For any x dtype the whole map runs in float32 (`moments`, the draw, x + p,
    and the pullback) and the result is rounded once to x's dtype, so a mixed
    bfloat16 policy rounds the noise and its gradient once, not at every op.
    Where the fused CPU kernels of nn/kernels are built (`make setup`), float32
    and bfloat16 x take them instead (`_fused_noise`: the same map and
    distribution, two passes over x each way instead of about twenty, and the
    uniforms drawn 16 Philox counters at a time; on a ResNet20 PGD-10 step the
    noise then adds +6-8% in float32 and +10-13% in bfloat16, against +20-22%
    and +44-48% by TF ops: bench/step_time.py, three runs, 2026-12-07).
    Models traced for TFLite conversion use the TF ops (`kernels.disabled()`,
    as deploy/convert.py does): the kernel's op is no TFLite builtin.
    A constant x (std = 0) gets no noise and the gradient g. sigma = 0 returns
    x itself (no random op).
    """
    _check(sigma, pool)
    if sigma == 0:
        return x
    sigma, pool = float(sigma), int(pool)
    ops = _fused_kernel_ops() if x.dtype in (tf.float32, tf.bfloat16) else None
    if ops is not None:
        return _fused_noise(x, sigma, pool, ops)

    # the uniforms as the kernel draws them, except in graphs for TFLite (builtins only)
    key_counter = None if kernels.builtin_ops_only() else philox_key_counter()

    @tf.custom_gradient
    def noisy(x):
        xf = tf.cast(x, tf.float32)  # tf.cast adds no op when the dtype already matches
        mean, var, n = moments(xf)
        p = scaled_noise(tf.shape(xf), sigma * tf.sqrt(var), pool, key_counter=key_counter)

        def grad(g):
            gf = tf.cast(g, tf.float32)
            c = tf.math.divide_no_nan(tf.reduce_sum(gf * p), n * var)
            return tf.cast(gf + c * (xf - mean), g.dtype)

        return tf.cast(xf + p, x.dtype), grad

    return noisy(x)


def _fused_noise(x, sigma, pool, ops):
    """feynman_kac_noise by the fused CPU kernels (nn/kernels/fk_noise.cc).

    The same draws as the TF-op path, in the same order: the Philox key and counter
    of standard_normal's uniforms (the kernel draws them, 16 counters at a time, and
    applies the Box-Muller transform), then the row and column signs of
    random_signs, as [k, Q] and [k, R]. So both paths give the
    same values up to float rounding (pool = 1: where pool_layout is exact,
    Q * R = N), and a run's noise does not depend on whether the kernel is built.
    Moments, x + p and the pullback take two passes each.
    """
    q, r = pool_layout(tf.size(x), pool)
    key, counter = philox_key_counter()
    if pool == 1:
        rows, cols = tf.ones(tf.stack([1, q])), tf.ones(tf.stack([1, r]))
    else:
        rows, cols = random_signs(tf.stack([pool, q])), random_signs(tf.stack([pool, r]))

    @tf.custom_gradient
    def noisy(x):
        y, mean, var, z = ops.brkeras_fk_noise(x, key, counter, rows, cols, sigma=sigma)

        def grad(g):
            return ops.brkeras_fk_noise_grad(g, x, z, rows, cols, mean, var, sigma=sigma)

        return y, grad

    return noisy(x)


@keras.utils.register_keras_serializable(package="brkeras")
class FeynmanKacNoise(keras.layers.Layer):
    """Adds sigma * std(x) * N(0, 1) noise in training and inference alike.

    Args:
        sigma: noise scale (>= 0; 0 = identity, no random op).
        pool: 1 = exact i.i.d. normals; k > 1 = a pool of N/k
            normals reused k times with independent random signs (every element
            exactly N(0, 1), distinct elements uncorrelated; see module docstring).
    """

    def __init__(self, sigma=0.1, pool=8, **kwargs):
        super().__init__(**kwargs)
        _check(sigma, pool)
        self.sigma = float(sigma)
        self.pool = int(pool)

    def call(self, inputs, training=None):  # noise also at inference (ref)
        del training
        return feynman_kac_noise(inputs, self.sigma, self.pool)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma, "pool": self.pool}


# ---------------------------------------------------------------------------
# Deploy-time form (batch fixed, used by brkeras.export; never trained).
#
# In LiteRT the random ops (RANDOM_STANDARD_NORMAL ~10 ns per element, RANDOM_UNIFORM
# ~3 ns, scalar kernels) are not delegated to XNNPACK, so a random op inside every
# noise layer cuts the delegated graph into one partition per block. The deploy form
# draws ALL the noise of the model with one normal and one uniform op at the start of
# the graph and hands each noise layer its slice. For a fixed batch B each layer gets
# exactly what FeynmanKacNoise(sigma, pool) draws for that batch: the same layout
# (Q, R) = pool_layout(B * N_l, pool), a fresh pool z ~ N(0, 1)^[Q, R] and fresh sign
# vectors r ~ {+-1}^[pool, Q], t ~ {+-1}^[pool, R], independent of everything else
# (disjoint slices of one i.i.d. draw are independent). So the joint distribution of
# the noise, within and across layers, is the training-time layer's at batch B, not
# only its per-element distribution.


def pool_layout_static(n, pool):
    """Python ints (Q, R) of `pool_layout(n, pool)` (the same tf arithmetic, evaluated)."""
    _check(0.0, pool)
    if pool == 1:
        return int(n), 1
    with tf.init_scope():  # eager even inside a graph being traced
        q, r = pool_layout(tf.constant(int(n), tf.int32), int(pool))
        return int(q), int(r)


def bank_noise(sizes, pool):
    """Noise for layers of `sizes` elements (flat tensors), from one normal and one uniform draw.

    pool = 1: one z ~ N(0, 1)^[sum N_l], slice l is n_l.
    pool = k > 1: per layer (Q_l, R_l) = pool_layout(N_l, k); one
    z ~ N(0, 1)^[sum Q_l R_l] and one u ~ U[0, 1)^[sum k (Q_l + R_l)], signs
    s = where(u < 0.5, 1, -1); layer l takes its slices z_l [1, Q, R], r_l [k, Q, 1],
    t_l [k, 1, R] and n_l = flatten(z_l * r_l * t_l)[:N_l], as scaled_noise does.
    Returns a list of float32 tensors of shapes [N_l].
    """
    sizes = [int(s) for s in sizes]
    _check(0.0, pool)
    if pool == 1:
        return list(tf.split(tf.random.normal([sum(sizes)]), sizes))
    lay = [pool_layout_static(n, pool) for n in sizes]
    z = tf.split(tf.random.normal([sum(q * r for q, r in lay)]), [q * r for q, r in lay])
    s = random_signs([sum(pool * (q + r) for q, r in lay)])
    s = tf.split(s, [d for q, r in lay for d in (pool * q, pool * r)])
    return [_pooled(tf.reshape(z[i], [1, q, r]), tf.reshape(s[2 * i], [pool, q, 1]),
                    tf.reshape(s[2 * i + 1], [pool, 1, r]), n)
            for i, (n, (q, r)) in enumerate(zip(sizes, lay))]


class NoiseBank(keras.layers.Layer):
    """Deploy-time: draws the noise of every noise layer at once (see `bank_noise`).

    Args:
        sizes: elements of each noise layer's tensor at the deploy batch size.
        pool: the pool of the FeynmanKacNoise layers it stands in for.
    The input only anchors the layer in the graph; outputs are the flat noises n_l.
    """

    def __init__(self, sizes, pool=8, **kwargs):
        super().__init__(**kwargs)
        _check(0.0, pool)
        self.sizes = [int(s) for s in sizes]
        self.pool = int(pool)

    def call(self, inputs):
        del inputs
        return bank_noise(self.sizes, self.pool)

    def get_config(self):
        return {**super().get_config(), "sizes": self.sizes, "pool": self.pool}


class AddScaledNoise(keras.layers.Layer):
    """Deploy-time FeynmanKacNoise: [x, n] -> x + sigma * std(x) * reshape(n, shape(x)).

    n is this layer's slice of a NoiseBank; std over all axes of x, as in training.
    """

    def __init__(self, sigma=0.1, **kwargs):
        super().__init__(**kwargs)
        _check(sigma, 1)
        self.sigma = float(sigma)

    def call(self, inputs):
        x, n = inputs
        shape = x.shape if x.shape.is_fully_defined() else tf.shape(x)
        return x + self.sigma * tf.math.reduce_std(x) * tf.reshape(n, shape)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma}


def noise_sigma(model):
    """The largest sigma of the model's noise layers (FeynmanKacNoise, AddScaledNoise);
    0.0 for a deterministic model. Nested models and wrappers included."""
    found = [float(m.sigma) for m in [model] + list(model.submodules)
             if isinstance(m, (FeynmanKacNoise, AddScaledNoise))]
    return max(found, default=0.0)
