"""Values of brkeras.attacks: bounds, validation, ordering, cleverhans parity, CW, EOT."""

import gzip
import os

import numpy as np
import pytest

from brkeras._keras import keras, tf
from brkeras.robust import attacks

FMNIST = "/usr/share/datasets/fashion-mnist"


def _idx(name, offset):
    with gzip.open(os.path.join(FMNIST, name)) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _dense_model(seed, d_in=(28, 28, 1), hidden=32, classes=10):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
            keras.layers.Flatten(input_shape=d_in),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(classes),
    ])


@pytest.fixture(scope="module")
def fmnist_model():
    """A 784-32-10 MLP trained for ~1 s on 4000 Fashion-MNIST images; 1000 test images."""
    if not os.path.exists(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz")):
        pytest.skip("Fashion-MNIST IDX files absent (Debian package dataset-fashion-mnist)")
    xtr = _idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)[:4000] / np.float32(255)
    ytr = _idx("train-labels-idx1-ubyte.gz", 8)[:4000].astype(np.int32)
    xte = _idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)[:1000] / np.float32(255)
    yte = _idx("t10k-labels-idx1-ubyte.gz", 8)[:1000].astype(np.int32)
    m = _dense_model(0)
    m.compile(keras.optimizers.Adam(1e-2),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m.fit(xtr, ytr, epochs=3, batch_size=64, verbose=0)
    return m, xte.astype(np.float32), yte


def _acc(m, x, y):
    return float(np.mean(np.argmax(m.predict(np.asarray(x), batch_size=500, verbose=0), 1) == y))


@pytest.fixture(scope="module")
def toy():
    """An untrained MLP and images with many pixels exactly at 0 and 1 (box edges)."""
    m = _dense_model(1, d_in=(6, 6, 1), hidden=16, classes=4)
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.3, 1.3, (64, 6, 6, 1)).clip(0, 1).astype(np.float32)
    return m, x


# ---------------------------------------------------------------- bounds, identity
@pytest.mark.parametrize("norm", [np.inf, 2])
def test_attacks_stay_in_eps_ball_and_box(toy, norm):
    m, x = toy
    eps = 0.3
    outs = [attacks.fgsm(m, x, eps, norm=norm),
            attacks.pgd(m, x, eps, 0.1, 7, norm=norm),
            attacks.pgd(m, x, eps, 0.1, 7, norm=norm, rand_init=False, restarts=2),
            attacks.pgd(m, x, eps, 0.1, 3, norm=norm, rand_minmax=2.0)]
    for a in outs:
        a = a.numpy()
        assert a.shape == x.shape and a.dtype == np.float32
        assert a.min() >= 0.0 and a.max() <= 1.0
        d = (a - x).reshape(len(x), -1)
        size = np.abs(d).max(1) if norm == np.inf else np.linalg.norm(d, axis=1)
        assert size.max() <= eps * (1 + 1e-5)
        assert size.max() > 0.5 * eps  # it did move


def test_linf_pgd_random_start_fills_the_box(toy):
    m, x = toy
    x = np.full_like(x, 0.5)
    a = attacks.pgd(m, x, 0.2, 0.1, 0).numpy()  # nb_iter=0: the random start only
    d = (a - x).ravel()
    assert np.abs(d).max() <= 0.2 + 1e-6
    # uniform on [-0.2, 0.2]: mean 0, variance 0.04 / 3
    assert abs(d.mean()) < 0.01 and abs(d.var() - 0.04 / 3) < 0.001


def test_l2_random_start_is_inside_the_ball(toy):
    m, x = toy
    x = np.full_like(x, 0.5)
    a = attacks.pgd(m, x, 0.4, 0.1, 0, norm=2).numpy()
    r = np.linalg.norm((a - x).reshape(len(x), -1), axis=1)
    assert r.max() <= 0.4 + 1e-6
    # radius of a uniform point in the 36-dim ball: r = 0.4 * U^(1/36), median 0.4 * 0.5^(1/36)
    assert abs(np.median(r) - 0.4 * 0.5 ** (1 / 36)) < 0.01


def test_eps_zero_returns_the_input(toy):
    m, x = toy
    np.testing.assert_array_equal(attacks.fgsm(m, x, 0.0).numpy(), x)
    np.testing.assert_array_equal(attacks.fgsm(m, x, 0.0, norm=2).numpy(), x)
    np.testing.assert_array_equal(attacks.pgd(m, x, 0.0, 0.0, 5).numpy(), x)
    np.testing.assert_array_equal(attacks.pgd(m, x, 0.0, 0.0, 5, norm=2).numpy(), x)


def test_fgsm_linf_is_the_signed_gradient_step(toy):
    m, x = toy
    y = np.arange(len(x)) % 4
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, m(xt)))
    ref = np.clip(x + 0.05 * np.sign(tape.gradient(loss, xt).numpy()), 0, 1)
    np.testing.assert_allclose(attacks.fgsm(m, x, 0.05, y=y).numpy(), ref, atol=1e-7)


def test_labels_default_to_the_models_prediction(toy):
    m, x = toy
    pred = np.argmax(m(x).numpy(), 1)
    np.testing.assert_array_equal(attacks.fgsm(m, x, 0.1).numpy(),
                                  attacks.fgsm(m, x, 0.1, y=pred).numpy())


def test_targeted_fgsm_lowers_the_target_loss(toy):
    m, x = toy
    t = np.full(len(x), 2)

    def ce(z):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(t, m(z)).numpy().sum()

    assert ce(attacks.fgsm(m, x, 0.05, y=t, targeted=True)) < ce(x)
    assert ce(attacks.fgsm(m, x, 0.05, y=t)) > ce(x)


def test_rescale_formula():
    x = np.array([[0.1, 0.5, 0.98]], np.float32)
    xa = np.array([[0.9, 0.0, 0.2]], np.float32)
    np.testing.assert_allclose(attacks.rescale(x, xa, 0.5).numpy(), [[0.5, 0.25, 0.59]], atol=1e-7)
    np.testing.assert_allclose(attacks.rescale(x, xa, 3.0).numpy(), [[1.0, 0.0, 0.0]], atol=1e-7)


# ---------------------------------------------------------------- validation
class _Forbidden:
    """A model_fn that fails if called: validation must come before any computation."""

    calls = 0

    def __call__(self, x):
        _Forbidden.calls += 1
        raise AssertionError("model_fn called before argument validation")


@pytest.mark.parametrize("call, match", [
        (lambda f, x: attacks.fgsm(f, x, 0.1, norm=1), "norm"),
        (lambda f, x: attacks.fgsm(f, x, 0.1, norm="inf"), "norm"),
        (lambda f, x: attacks.pgd(f, x, 0.1, 0.01, 5, norm=1), "norm"),
        (lambda f, x: attacks.fgsm(f, x, -0.1), "eps"),
        (lambda f, x: attacks.pgd(f, x, 0.1, 0.2, 5), "eps_iter"),
        (lambda f, x: attacks.pgd(f, x, 0.1, 0.01, -1), "nb_iter"),
        (lambda f, x: attacks.pgd(f, x, 0.1, 0.01, 2.5), "nb_iter"),
        (lambda f, x: attacks.pgd(f, x, 0.1, 0.01, 5, clip_min=1., clip_max=1.), "clip_min"),
        (lambda f, x: attacks.fgsm(f, x, 0.1, clip_min=1., clip_max=0.), "clip_min"),
        (lambda f, x: attacks.pgd(f, x, 0.1, 0.01, 5, restarts=0), "restarts"),
        (lambda f, x: attacks.pgd(f, x, 0.1, 0.01, 5, eot_samples=0), "eot_samples"),
        (lambda f, x: attacks.fgsm(f, x, 0.1, targeted=True), "targeted"),
        (lambda f, x: attacks.cw_l2(f, x, c=-1.), "c="),
        (lambda f, x: attacks.cw_l2(f, x, steps=-3), "steps"),
        (lambda f, x: attacks.fgsm(None, x, 0.1), "callable"),
])
def test_bad_arguments_raise_before_computing(call, match):
    before = _Forbidden.calls
    with pytest.raises(ValueError, match=match):
        call(_Forbidden(), np.zeros((2, 3), np.float32))
    assert _Forbidden.calls == before


def test_tensor_eps_iter_over_eps_raises():
    with pytest.raises(ValueError, match="eps_iter <= eps"):
        attacks.pgd(_Forbidden(), np.zeros((2, 3), np.float32), tf.constant(0.1), 0.5, 3)


# ---------------------------------------------------------------- graph use, retracing
def test_pgd_inside_tf_function_matches_eager_and_stops_gradient(toy):
    m, x = toy

    @tf.function
    def step(xb):
        with tf.GradientTape() as tape:
            tape.watch(xb)
            xa = attacks.pgd(lambda z: m(z, training=False), xb, 0.1, 0.02, 4, rand_init=False)
            s = tf.reduce_sum(xa)
        return xa, tape.gradient(s, xb)

    xa, g = step(tf.constant(x))
    assert g is None  # stop_gradient: nothing flows back into the attack
    np.testing.assert_allclose(xa.numpy(), attacks.pgd(m, x, 0.1, 0.02, 4, rand_init=False).numpy(),
                               atol=1e-6)


def test_eager_calls_reuse_one_trace(toy):
    m, x = toy
    attacks.clear_cache()
    for eps, n, b in [(0.1, 3, 64), (0.2, 5, 64), (0.05, 2, 64), (0.1, 3, 40), (0.3, 1, 17)]:
        attacks.pgd(m, x[:b], eps, eps / 4, n, restarts=2)
    (fn,) = attacks._CACHE.values()
    # eps / nb_iter are tensors; one more trace at most for the first new batch size
    assert fn.experimental_get_tracing_count() <= 2


# ---------------------------------------------------------------- trained model
def test_strength_ordering_on_a_trained_model(fmnist_model):
    m, x, y = fmnist_model
    nat = _acc(m, x, y)
    assert nat > 0.7
    f = _acc(m, attacks.fgsm(m, x, 0.1, y=y), y)
    p5 = _acc(m, attacks.pgd(m, x, 0.1, 0.02, 5, y=y, rand_init=False), y)
    p20 = _acc(m, attacks.pgd(m, x, 0.1, 0.02, 20, y=y, rand_init=False), y)
    assert p20 <= p5 + 0.002 and p5 <= f + 0.002 and f < nat
    r1 = _acc(m, attacks.pgd(m, x, 0.03, 0.01, 5, y=y), y)
    r4 = _acc(m, attacks.pgd(m, x, 0.03, 0.01, 5, y=y, restarts=4), y)
    assert r4 <= r1 + 0.003
    sweep = [_acc(m, attacks.pgd(m, x, e, e / 4, 10, y=y), y) for e in (0.01, 0.03, 0.1, 0.3)]
    assert all(b <= a + 0.002 for a, b in zip(sweep, sweep[1:]))
    assert sweep[-1] < 0.02
    l2 = [_acc(m, attacks.pgd(m, x, e, e / 4, 10, norm=2, y=y), y) for e in (0.3, 1.0, 3.0)]
    assert l2[0] < nat and l2[2] <= l2[1] + 0.002 <= l2[0] + 0.004 and l2[2] < 0.05


def test_same_adversarial_accuracy_as_cleverhans(fmnist_model):
    from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent
    m, x, y = fmnist_model
    n = len(x)
    for norm, eps, it in [(np.inf, 0.05, 0.01), (2, 1.0, 0.2)]:
        ours = _acc(m, attacks.fgsm(m, x, eps, norm=norm, y=y), y)
        ref = _acc(m, fast_gradient_method(m, x, eps, norm, clip_min=0., clip_max=1., y=y,
                                           sanity_checks=False), y)
        assert abs(ours - ref) * n <= 1, (norm, "fgsm", ours, ref)
        ours = _acc(m, attacks.pgd(m, x, eps, it, 10, norm=norm, y=y, rand_init=False), y)
        ref = _acc(m, projected_gradient_descent(m, x, eps, it, 10, norm, clip_min=0., clip_max=1.,
                                                 y=y, rand_init=False, sanity_checks=False), y)
        assert abs(ours - ref) * n <= 1, (norm, "pgd", ours, ref)


def test_cw_keeps_already_misclassified_inputs(fmnist_model):
    m, x, y = fmnist_model
    x, y = x[:200], y[:200]
    a = attacks.cw_l2(m, x, y=y).numpy()  # reference settings: lr 6e-4, 50 steps, c 10
    assert a.min() >= 0 and a.max() <= 1
    wrong = np.argmax(m(x).numpy(), 1) != y
    assert wrong.sum() > 5
    assert np.abs(a[wrong] - x[wrong]).max() < 1e-5
    assert _acc(m, a, y) <= _acc(m, x, y)


# ---------------------------------------------------------------- CW on a linear model
def test_cw_finds_the_closed_form_minimal_perturbation():
    """Two-class linear logits [0, w.x + b_i]: the minimal L2 perturbation is |w.x + b_i| / |w|."""
    d, n = 20, 32
    rng = np.random.default_rng(3)
    w = rng.normal(size=d).astype(np.float32)
    x = rng.uniform(0.35, 0.65, (n, d)).astype(np.float32)
    dmin = rng.uniform(0.05, 0.15, n).astype(np.float32)  # small: the box never binds
    b = -(x @ w) - dmin * np.linalg.norm(w)  # one offset per batch position

    def model_fn(z):
        s = tf.linalg.matvec(z, w) + b
        return tf.stack([tf.zeros_like(s), s], 1)

    np.testing.assert_allclose(np.abs(x @ w + b) / np.linalg.norm(w), dmin, rtol=1e-4)
    a = attacks.cw_l2(model_fn, x, y=np.zeros(n, np.int32), lr=0.01, steps=300).numpy()
    s = model_fn(tf.constant(a)).numpy()
    assert np.all(s[:, 1] > s[:, 0])  # every example crosses the boundary
    norm = np.linalg.norm(a - x, axis=1)
    assert np.all(norm >= dmin * (1 - 1e-3))  # nobody beats the closed form
    assert np.all(norm <= dmin * 1.25), (norm / dmin).max()


# ---------------------------------------------------------------- EOT
class _NoisyMLP(keras.Model):
    """Dense-relu-noise-dense: a stochastic model whose noise stays on at test time."""

    def __init__(self, sigma):
        super().__init__()
        self.sigma = sigma
        self.h = keras.layers.Dense(32, activation="relu")
        self.o = keras.layers.Dense(3)

    def call(self, x):
        h = self.h(x)
        return self.o(h + self.sigma * tf.random.normal(tf.shape(h)))


def test_eot_reduces_gradient_variance():
    keras.utils.set_random_seed(4)
    m = _NoisyMLP(sigma=1.0)
    x = np.full((8, 10), 0.5, np.float32)
    y = np.arange(8) % 3
    m(x)

    def directions(n, reps=12):
        # FGSM-L2 step from an interior point: (x_adv - x) / eps = g / |g| exactly
        return np.stack([(attacks.fgsm(m, x, 0.01, norm=2, y=y, eot_samples=n).numpy() - x) / 0.01
                         for _ in range(reps)])

    d1, d16 = directions(1), directions(16)
    np.testing.assert_allclose(np.linalg.norm(d16, axis=-1), 1.0, atol=1e-4)
    v1 = d1.var(0).sum(-1).mean()
    v16 = d16.var(0).sum(-1).mean()
    assert v1 > 0.05  # the noise matters for one draw
    assert v16 < v1 / 4, (v1, v16)  # ~1/16 for independent draws


def test_pgd_with_a_custom_loss_ascends_it_within_the_ball():
    """loss_fn (here TRADES' KL to the natural logits) replaces the cross-entropy."""
    from brkeras.robust import losses  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(3)
    w = tf.constant(rng.normal(size=(12, 3)).astype(np.float32))
    model_fn = lambda z: tf.matmul(tf.reshape(z, [-1, 12]), w)  # noqa: E731
    x = tf.constant(rng.uniform(0.2, 0.8, size=(16, 12)).astype(np.float32))
    p = model_fn(x)
    x_adv = attacks.pgd(model_fn, x, 0.1, 0.02, 10, y=p, rand_minmax=0.001,
                        loss_fn=losses.kl_divergence).numpy()
    assert np.abs(x_adv - x.numpy()).max() <= 0.1 + 1e-6
    kl = losses.kl_divergence(p, model_fn(tf.constant(x_adv))).numpy()
    assert kl.mean() > 1e-3  # moved away from the natural prediction
    with pytest.raises(ValueError, match="loss_fn"):
        attacks.pgd(model_fn, x, 0.1, 0.02, 10, loss_fn=losses.kl_divergence)  # no y
    with pytest.raises(ValueError, match="restarts=1"):
        attacks.pgd(model_fn, x, 0.1, 0.02, 10, y=p, restarts=2, loss_fn=losses.kl_divergence)


# ---------------------------------------------------------------- N-FGSM (a training attack)
def _sign_constant_model(seed=4, d=12):
    """logits = [w . x, 0] with label 0: d CE / dx = -(1 - softmax_0) w, so the signed
    gradient step is -sign(w) at every x."""
    w = tf.constant(np.random.default_rng(seed).normal(size=(d, 1)).astype(np.float32))
    fn = lambda z: tf.concat([tf.matmul(tf.reshape(z, [-1, d]), w),  # noqa: E731
                              tf.zeros([tf.shape(z)[0], 1])], axis=1)
    return fn, np.sign(w.numpy()[:, 0])


def test_nfgsm_is_one_unprojected_step_from_a_uniform_start():
    fn, s = _sign_constant_model()
    x = np.full((4000, 12), 0.5, np.float32)  # no box clipping: noise 0.1 + step 0.05 < 0.5
    y = np.zeros(4000, np.int32)
    tf.random.set_seed(0)
    eta = attacks.nfgsm(fn, x, 0.05, noise_scale=2.0, y=y).numpy() - x + 0.05 * s
    # x_adv = x + eta - eps sign(w) with eta ~ U[-2 eps, 2 eps]: the start, then the step
    assert np.abs(eta).max() <= 0.1 + 1e-6
    assert np.abs(eta).max() > 0.099  # the whole noise box is used
    assert abs(eta.mean()) < 2e-3 and abs(eta.std() - 0.2 / np.sqrt(12)) < 2e-3
    d = np.abs(attacks.nfgsm(fn, x, 0.05, y=y).numpy() - x).max(1)
    assert d.max() > 0.05 + 0.03  # it leaves the eps-ball: no projection
    assert d.max() <= 3 * 0.05 + 1e-6  # (k + 1) eps


def test_nfgsm_takes_the_gradient_at_the_noisy_start():
    """logits [sum_d w_d (z_d - 0.5)^2, 0], label 0: d CE / dz_d has the sign of
    -w_d (z_d - 0.5), so from x = 0.5 the step at x + eta is -eps_iter sign(w) sign(eta):
    |x_adv - x| = |eta| + eps_iter where w < 0 and ||eta| - eps_iter| where w > 0 (at x
    itself the gradient would be 0 and x_adv - x = eta)."""
    d = 12
    w = np.random.default_rng(5).normal(size=d).astype(np.float32)
    fn = lambda z: tf.stack([tf.reduce_sum(w * (tf.reshape(z, [-1, d]) - 0.5) ** 2, 1),  # noqa
                             tf.zeros([tf.shape(z)[0]])], axis=1)
    x = np.full((2000, d), 0.5, np.float32)
    dist = np.abs(attacks.nfgsm(fn, x, 0.05, y=np.zeros(2000, np.int32)).numpy() - x)
    assert dist[:, w < 0].min() >= 0.05 - 1e-6 and dist[:, w < 0].max() > 0.14
    assert dist[:, w > 0].max() <= 0.05 + 1e-6


def test_nfgsm_without_noise_is_fgsm_and_stays_in_the_box(toy):
    m, x = toy
    y = np.arange(len(x)) % 4
    np.testing.assert_allclose(attacks.nfgsm(m, x, 0.05, noise_scale=0.0, y=y).numpy(),
                               attacks.fgsm(m, x, 0.05, y=y).numpy(), atol=1e-7)
    xa = attacks.nfgsm(m, x, 0.3, eps_iter=0.2, y=y).numpy()  # many pixels at 0 and 1
    assert xa.min() >= 0.0 and xa.max() <= 1.0
    assert np.abs(xa - x).max() <= 0.3 * 2 + 0.2 + 1e-6


@pytest.mark.parametrize("call, match", [
        (lambda f, x: attacks.nfgsm(f, x, -0.1), "eps"),
        (lambda f, x: attacks.nfgsm(f, x, 0.1, eps_iter=-1.0), "eps_iter"),
        (lambda f, x: attacks.nfgsm(f, x, 0.1, noise_scale=-2.0), "noise_scale"),
        (lambda f, x: attacks.nfgsm(f, x, 0.1, clip_min=1., clip_max=0.), "clip_min"),
        (lambda f, x: attacks.nfgsm(f, x, 0.1, loss_fn=lambda y, z: z), "loss_fn"),
])
def test_nfgsm_bad_arguments_raise_before_computing(call, match):
    before = _Forbidden.calls
    with pytest.raises(ValueError, match=match):
        call(_Forbidden(), np.zeros((2, 3), np.float32))
    assert _Forbidden.calls == before
