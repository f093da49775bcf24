"""The Feynman-Kac noise layer of EnResNet (SPEC section 1).

Forward map, after each residual addition:

    y = x + sigma * std(x) * n,    n ~ N(0, 1) per element,

with std(x) ONE scalar over the whole batch tensor (all axes). The noise is on in
training AND inference: the layer ignores the `training` flag (the model is
stochastic, as in the reference). Gradients flow through std(x), as in the
PyTorch reference (`out + sigma * out.std() * randn`, no detach): the pullback is
dy/dx = I + sigma * n (d std / dx)^T. sigma = 0 is the identity with no random op
in the graph (the plain-ResNet baseline).

How n is drawn (`pool`):

* pool = 1: exact i.i.d. draws, `tf.random.normal(shape(x))`. About 5 ns per
  element on this machine (the PyPI wheel's RNG kernels are scalar code).
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

  Every op of both paths is a TFLite builtin (pool > 1: RANDOM_STANDARD_NORMAL,
  RANDOM_UNIFORM, LESS, SELECT_V2, MUL, RESHAPE, STRIDED_SLICE; the layout
  arithmetic folds to constants at a fixed batch), so an exported model needs no
  Flex ops. Float ResNet20 in LiteRT, batch 1, 1 thread (bench/deploy_latency.py):
  0.41 ms without noise; with this layer as is 1.29 ms (pool = 1) and 0.87 ms
  (pool = 8); 0.58 ms (pool = 8) in the deploy form below (NoiseBank), which
  brkeras.export uses.
"""

from brkeras._keras import keras, tf


def _check(sigma, pool):
    if not float(sigma) >= 0:
        raise ValueError(f"sigma={sigma!r}: the noise scale must be >= 0 (0 = no noise)")
    if int(pool) != pool or pool < 1:
        raise ValueError(f"pool={pool!r}: must be an integer >= 1 "
                         "(1 = exact i.i.d. normals, k > 1 = a pool reused k times)")


def random_signs(shape):
    """Float tensor of i.i.d. fair signs (+1 or -1) of `shape`, from uniform draws."""
    return tf.where(tf.random.uniform(shape) < 0.5, 1.0, -1.0)


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


def scaled_noise(shape, scale, pool):
    """scale * n with n ~ N(0, 1) per element, drawn as the module docstring says.

    pool = k > 1: z ~ N(0, 1)^[Q, R] (Q * R ~ N / k), signs r ~ {+-1}^[k, Q],
    t ~ {+-1}^[k, R], n[a, i, j] = r[a, i] * t[a, j] * z[i, j], flattened and cut
    to N. `scale` is a scalar tensor; gradients flow to it (d/dscale = n).
    """
    if pool == 1:
        return scale * tf.random.normal(shape)
    n = tf.reduce_prod(shape)
    q, r = pool_layout(n, pool)
    z = scale * tf.random.normal(tf.stack([1, q, r]))  # the pool, scaled: [1, Q, R]
    rows = random_signs(tf.stack([pool, q, 1]))
    cols = random_signs(tf.stack([pool, 1, r]))
    return tf.reshape(_pooled(z, rows, cols, n), shape)


def feynman_kac_noise(x, sigma=0.1, pool=8):
    """y = x + sigma * std(x) * n, std over all axes of x, n ~ N(0, 1) per element.

    Gradients flow through std(x) (autodiff of tf.math.reduce_std):
        dL/dx = g + sigma * <g, n> * (x - mean(x)) / (N * std(x)),   g = dL/dy.
    A hand-written gradient (one MatMul for <g, n>) measured no faster on this
    CPU. sigma = 0 returns x itself (no random op).
    """
    _check(sigma, pool)
    if sigma == 0:
        return x
    return x + scaled_noise(tf.shape(x), float(sigma) * tf.math.reduce_std(x), int(pool))


@keras.utils.register_keras_serializable(package="brkeras")
class FeynmanKacNoise(keras.layers.Layer):
    """Adds sigma * std(x) * N(0, 1) noise in training and inference alike.

    Args:
        sigma: noise scale (>= 0; 0 = identity, no random op).
        pool: 1 = exact i.i.d. `tf.random.normal`; k > 1 = a pool of N/k
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
