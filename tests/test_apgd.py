"""Values of brkeras.robust.apgd: schedule, step-size rule, momentum, DLR, bounds, EOT."""

import importlib

import numpy as np
import pytest

from brkeras._keras import keras, tf
from brkeras.robust import apgd as A


def _pgd():
    """brkeras' PGD, wherever the ongoing move of the modules has put it."""
    try:
        return importlib.import_module("brkeras.robust.attacks").pgd
    except ImportError:
        return importlib.import_module("brkeras.attacks").pgd


def _softplus(v):
    return np.log1p(np.exp(v))


# ---------------------------------------------------------------- checkpoint schedule
def test_checkpoints_match_the_paper_for_100_steps():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in hundredths
    p = [0, 22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 3, 6)
        if nxt >= 100:
            break
        p.append(nxt)
    assert p == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert A.apgd_checkpoints(100) == p  # w_j = ceil(p_j * 100)


def test_checkpoints_follow_the_reference_integer_form():
    # N = 40: h_1 = int(8.8) = 8, decrement int(1.2) = 1, minimum int(2.4) = 2
    assert A.apgd_checkpoints(40) == [0, 8, 15, 21, 26, 30, 33, 35, 37, 39]
    assert A.apgd_checkpoints(1) == [0]
    assert A.apgd_checkpoints(5) == [0, 1, 2, 3, 4]  # windows of 1 step
    with pytest.raises(ValueError, match="nb_iter"):
        A.apgd_checkpoints(0)


# ---------------------------------------------------------------- step-size rule
def test_step_rule_conditions():
    halve = lambda *a: A.apgd_step_rule(*a).numpy().tolist()
    # condition 1: #increases <= rho * window (reference's <=: 12 of 16 halves)
    assert halve([16, 12, 13, 0], [16] * 4, [True] * 4, [0.] * 4, [1.] * 4) == \
        [False, True, False, True]
    # condition 2: not halved last time and f_max did not grow
    assert halve([20, 20, 20], [22] * 3, [False, True, False], [5., 5., 4.], [5., 5., 5.]) == \
        [True, False, False]
    # rho scales condition 1: 5 of 22 halves at rho = 0.75, not at rho = 0.2
    assert halve([5], [22], [True], [1.], [2.]) == [True]
    assert halve([5], [22], [True], [1.], [2.], 0.2) == [False]


def _toy(a, tau, off=10.0):
    """Logits [0, h_k, -100], h_k = a.x + tau_k - off for the k-th call (k = 0: x^0).

    For h < 0: CE(y=0) = log(1 + e^h + e^-100) and DLR(y=0) = h / 100, both
    increasing in h. The sign of the gradient is sign(a) everywhere, so L-inf
    APGD reaches the corner x + eps sign(a) (box-clipped) in one step and stays
    there; the loss sequence is then set by tau alone.
    """
    calls = tf.Variable(0)
    a = tf.constant(a, tf.float32)
    tau = tf.constant(tau, tf.float32)

    def model_fn(z):
        k = calls.assign_add(1) - 1
        h = tf.reduce_sum(z * a, -1) + tf.gather(tau, tf.minimum(k, tau.shape[0] - 1)) - off
        return tf.stack([tf.zeros_like(h), h, tf.fill(tf.shape(h), -100.0)], -1)

    return model_fn, calls


def _expected_steps(eps, halvings, n=100):
    m = np.array([sum(h <= i for h in halvings) for i in range(n)])
    return 2 * eps * 0.5 ** m


@pytest.fixture(scope="module")
def toy_x():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (4, 6)).astype(np.float32)
    x[0, :2] = [0.0, 1.0]  # at the box edges
    a = np.array([1, -1, 1, 1, -1, -1], np.float32)
    return x, a


def test_step_size_halves_at_every_checkpoint_when_the_loss_stalls(toy_x):
    x, a = toy_x
    eps = 0.125
    model_fn, calls = _toy(a, [0.0])
    xa, info = A.apgd(model_fn, x, eps, nb_iter=100, y=np.zeros(4, np.int32), seed=0,
                      return_info=True)
    assert int(calls.numpy()) == 101  # x^0 .. x^100, one call each
    corner = np.clip(x + eps * np.sign(a), 0, 1)
    np.testing.assert_array_equal(xa.numpy(), corner)
    lt = info["loss_trace"].numpy()
    assert np.all(lt[0] < lt[1]) and np.all(lt[1:] == lt[1])  # one increase, then flat
    # window 1: 1 increase <= 0.75 * 22; later windows: 0 increases: halve at every w_j
    np.testing.assert_array_equal(info["step_size"].numpy(),
                                  np.repeat(_expected_steps(eps, [22, 41, 57, 70, 80, 87, 93, 99])
                                            [:, None], 4, 1))
    assert not info["fooled"].numpy().any()


def test_step_size_rule_condition_two_alternates(toy_x):
    """Loss rising for 22 steps, then a drop and a slow rise that never reaches the peak.

    w=22: 22/22 increases, no halving; w=41: 18/19 increases (> 0.75) but f_max
    unchanged and not halved at 22 -> halve (condition 2); w=57: halved last time
    -> no; w=70: halve; w=80: no; w=87: halve; w=93: no; w=99: halve.
    """
    x, a = toy_x
    eps = 0.125
    k = np.arange(101)
    tau = np.where(k <= 22, 0.1 * k, 2.2 - 5.0 + 0.01 * (k - 23))
    model_fn, calls = _toy(a, tau, off=6.0)
    y = np.zeros(4, np.int32)
    # DLR: the loss is h / 100, exact enough in float32 for steps of 0.01 in tau
    xa, info = A.apgd(model_fn, x, eps, nb_iter=100, loss="dlr", y=y, seed=1, return_info=True)
    lt = info["loss_trace"].numpy()
    h = (np.clip(x + eps * np.sign(a), 0, 1) @ a)[None, :] + tau[1:, None] - 6.0
    assert h.max() < 0  # never misclassified
    np.testing.assert_allclose(lt[1:], h / 100, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(info["step_size"].numpy(),
                                  np.repeat(_expected_steps(eps, [41, 70, 87, 99])[:, None], 4, 1))
    np.testing.assert_allclose(info["loss_best"].numpy(), lt[22], rtol=0)  # the peak
    # x stays in the ball and the box
    d = np.abs(xa.numpy() - x)
    assert d.max() <= eps + 1e-6 and xa.numpy().min() >= 0 and xa.numpy().max() <= 1


def test_momentum_iterates_by_hand():
    """1-D, f = softplus(-100 (x - 0.56)^2), x = 0.5, eps = 0.1, no random start.

    x^1 = P(0.5 + 0.2) = 0.6 (a = 1); then a = 0.75:
    x^2: z = P(0.6 - 0.2) = 0.4, x^2 = 0.6 + 0.75 (0.4 - 0.6) + 0.25 (0.6 - 0.5) = 0.475
    x^3: z = 0.6,  x^3 = 0.475 + 0.75 * 0.125 + 0.25 * (-0.125) = 0.5375
    x^4: z = 0.6,  x^4 = 0.5375 + 0.75 * 0.0625 + 0.25 * 0.0625 = 0.6
    x^5: z = 0.4,  x^5 = 0.6 - 0.15 + 0.25 * 0.0625 = 0.465625
    (the first checkpoint, w_1 = 22, is later)
    """
    def model_fn(z):
        h = -100.0 * tf.square(z[:, 0] - 0.56)
        return tf.stack([tf.zeros_like(h), h], -1)

    xs = np.array([0.5, 0.6, 0.475, 0.5375, 0.6, 0.465625])
    _, info = A.apgd(model_fn, np.array([[0.5]], np.float32), 0.1, nb_iter=100, y=[0],
                     rand_init=False, return_info=True)
    np.testing.assert_allclose(info["loss_trace"].numpy()[:6, 0],
                               _softplus(-100 * (xs - 0.56) ** 2), rtol=1e-5)


# ---------------------------------------------------------------- DLR
def _dlr_np(z, y):
    zs = np.sort(z, 1)[:, ::-1]
    r = np.arange(len(y))
    other = z.copy()
    other[r, y] = -np.inf
    return -(z[r, y] - other.max(1)) / (zs[:, 0] - zs[:, 2] + 1e-12)


def test_dlr_matches_numpy():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (64, 10)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    y[:16] = z[:16].argmax(1)  # correctly classified rows: the max over i != y is z_pi2
    got = A.dlr_loss(z, y).numpy()
    np.testing.assert_allclose(got, _dlr_np(z.astype(np.float64), y), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got < 0, z.argmax(1) == y)  # negative iff correct
    # invariant to shifting and (positive) scaling of the logits
    np.testing.assert_allclose(A.dlr_loss(5 * z + 7, y).numpy(), got, rtol=1e-4, atol=1e-5)
    # targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    t = (y + 1) % 10
    zs = np.sort(z.astype(np.float64), 1)[:, ::-1]
    r = np.arange(64)
    ref = -(z[r, y] - z[r, t]) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12)
    np.testing.assert_allclose(A.dlr_targeted_loss(z, y, t).numpy(), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- validation
def test_arguments_are_validated_first():
    calls = []

    def model_fn(z):
        calls.append(1)
        return tf.concat([z, -z], -1)[:, :2]

    x = np.zeros((2, 3), np.float32)
    bad = [dict(eps=-0.1), dict(nb_iter=0), dict(norm=1), dict(loss="cw"),
           dict(clip_min=1.0, clip_max=0.0), dict(eot_samples=0), dict(restarts=0),
           dict(rho=0.0), dict(y_target=[1, 1])]
    for kw in bad:
        args = dict(eps=0.1)
        args.update(kw)
        with pytest.raises(ValueError):
            A.apgd(model_fn, x, **args)
    assert not calls  # nothing ran
    with pytest.raises(ValueError, match="at least 3 classes"):  # seen when traced
        A.apgd(model_fn, x, 0.1, loss="dlr")
    m = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
    with pytest.raises(ValueError, match="at least 4 classes"):  # seen from output_shape
        A.apgd(m, x, 0.1, loss="dlr_targeted")


# ---------------------------------------------------------------- a trained tiny model
@pytest.fixture(scope="module")
def blobs_model(blobs_mlp):
    """conftest's blobs_mlp: (Keras model, 200 test images, labels)."""
    return blobs_mlp


def _acc(m, x, y):
    return float(np.mean(np.argmax(m(np.asarray(x), training=False).numpy(), 1) == y))


@pytest.mark.parametrize("norm,eps", [(np.inf, 0.05), (2, 0.5)])
def test_apgd_stays_in_ball_and_box(blobs_model, norm, eps):
    m, x, y = blobs_model
    for loss in ("ce", "dlr"):
        xa, info = A.apgd(m, x, eps, nb_iter=20, norm=norm, loss=loss, y=y, restarts=2, seed=0,
                          return_info=True)
        xa = xa.numpy()
        assert xa.shape == x.shape and xa.dtype == np.float32
        assert xa.min() >= 0.0 and xa.max() <= 1.0
        d = (xa - x).reshape(len(x), -1)
        size = np.abs(d).max(1) if norm == np.inf else np.linalg.norm(d, axis=1)
        assert size.max() <= eps * (1 + 1e-5) and size.max() > 0.5 * eps
        # `fooled` is what the model says at x_adv (a deterministic model)
        pred = np.argmax(m(xa).numpy(), 1)
        np.testing.assert_array_equal(info["fooled"].numpy(), pred != y)


def test_apgd_is_at_least_as_strong_as_pgd20(blobs_model):
    m, x, y = blobs_model
    eps = 0.05
    clean = _acc(m, x, y)
    pgd = _acc(m, _pgd()(m, x, eps, eps / 4, 20, y=y), y)
    ce = _acc(m, A.apgd(m, x, eps, nb_iter=50, loss="ce", y=y, seed=0), y)
    dlr = _acc(m, A.apgd(m, x, eps, nb_iter=50, loss="dlr", y=y, seed=0), y)
    assert clean > 0.9 and pgd < clean - 0.2  # the attack matters at this eps
    # on this near-linear toy both land on the same corners for almost every
    # example; APGD is not stronger per example, so allow 2 of 200 examples
    assert ce <= pgd + 0.01 and dlr <= pgd + 0.01, (pgd, ce, dlr)
    # ... the ensemble (worst case of the two losses) is
    both = np.minimum(
            np.argmax(m(A.apgd(m, x, eps, nb_iter=50, loss="ce", y=y, seed=0)).numpy(), 1) == y,
            np.argmax(m(A.apgd(m, x, eps, nb_iter=50, loss="dlr", y=y, seed=0)).numpy(), 1) == y)
    assert both.mean() <= pgd


def test_dlr_is_immune_to_logit_scaling(blobs_model):
    """Logits x 1000 saturate the softmax: CE gradients vanish (PGD stalls), DLR is scale-free."""
    m, x, y = blobs_model
    eps = 0.05
    hot = keras.Sequential([m, keras.layers.Rescaling(1000.0)])
    pgd = _acc(hot, _pgd()(hot, x, eps, eps / 4, 20, y=y), y)
    dlr_hot = _acc(hot, A.apgd(hot, x, eps, nb_iter=50, loss="dlr", y=y, seed=0), y)
    dlr = _acc(m, A.apgd(m, x, eps, nb_iter=50, loss="dlr", y=y, seed=0), y)
    assert dlr_hot <= pgd - 0.2, (pgd, dlr_hot)
    assert abs(dlr_hot - dlr) <= 0.01


def test_restarts_only_lower_accuracy_and_seed_reproduces(blobs_model):
    m, x, y = blobs_model
    eps = 0.04
    one, i1 = A.apgd(m, x, eps, nb_iter=20, y=y, seed=5, return_info=True)
    again = A.apgd(m, x, eps, nb_iter=20, y=y, seed=5)
    np.testing.assert_array_equal(one.numpy(), again.numpy())
    three, i3 = A.apgd(m, x, eps, nb_iter=20, y=y, seed=5, restarts=3, return_info=True)
    f1, f3 = i1["fooled"].numpy(), i3["fooled"].numpy()
    assert np.all(f3 >= f1)  # the first restart is the same run; later ones only add
    keep = ~f3
    assert np.all(i3["loss_best"].numpy()[keep] >= i1["loss_best"].numpy()[keep] - 1e-6)
    assert _acc(m, three, y) <= _acc(m, one, y)
    tgt = _acc(m, A.apgd(m, x, eps, nb_iter=20, loss="dlr_targeted", y=y, seed=0), y)
    assert tgt < _acc(m, x, y) - 0.1


# ---------------------------------------------------------------- EOT
class _Noise(keras.layers.Layer):
    """x + sigma * N(0, I), at every call (training or not)."""

    def __init__(self, sigma, **kw):
        super().__init__(**kw)
        self.sigma = sigma

    def call(self, inputs):
        return inputs + self.sigma * tf.random.normal(tf.shape(inputs))


def test_eot_runs_on_a_noisy_model_and_counts_calls(blobs_model):
    m, x, y = blobs_model
    noisy = keras.Sequential([m.layers[0], m.layers[1], _Noise(0.5), m.layers[2]])
    calls = tf.Variable(0)

    def model_fn(z):
        calls.assign_add(1)
        return noisy(z)

    eps, n, k = 0.05, 10, 4
    xa = A.apgd(model_fn, x, eps, nb_iter=n, eot_samples=k, seed=0).numpy()
    # k calls for the clean labels (y=None), then k per iterate x^0 .. x^n
    assert int(calls.numpy()) == k * (n + 2)
    assert np.abs(xa - x).max() <= eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert _acc(m, xa, y) < _acc(m, x, y) - 0.2  # it attacks the underlying model


def test_eot_averages_the_loss_used_by_the_rule():
    """Calls alternate +d / -d on logit 0: with 2 samples the loss is exactly the mean of both."""
    calls = tf.Variable(0)
    w = np.array([[1.0, -1.0, 0.5], [0.3, 0.2, -0.4]], np.float32)

    def model_fn(z):
        k = calls.assign_add(1)
        s = tf.cast(2 * (k % 2) - 1, tf.float32)
        return tf.matmul(z, w) + s * tf.constant([2.0, 0.0, 0.0])

    x = np.array([[0.2, 0.7], [0.9, 0.1]], np.float32)
    y = np.array([0, 2])
    _, info = A.apgd(model_fn, x, 0.1, nb_iter=3, y=y, eot_samples=2, rand_init=False,
                     return_info=True)

    def ce(z):
        z = z - z.max(1, keepdims=True)
        return -(z[np.arange(2), y] - np.log(np.exp(z).sum(1)))

    z = x.astype(np.float64) @ w
    ref = 0.5 * (ce(z + [2, 0, 0]) + ce(z - [2, 0, 0]))
    np.testing.assert_allclose(info["loss_trace"].numpy()[0], ref, rtol=1e-5)


def test_dlr_with_tied_logits_and_overflowing_gradient_stays_finite():
    """Three tied top logits make DLR's denominator 1e-12; with large logits its
    gradient overflows (inf - inf = NaN), as measured on an int8 QAT model. The
    attack must step only where the gradient is finite and return a finite x_adv."""
    def model_fn(x):
        m = 1e15 * tf.reduce_mean(x, axis=[1, 2, 3])
        return tf.stack([m, m, m, tf.ones_like(m)], axis=1)

    x = tf.constant(np.random.default_rng(0).uniform(0.2, 0.8, (4, 3, 3, 1)), tf.float32)
    y = tf.constant([3, 3, 3, 3])
    _, g, _ = A._eval_raw(model_fn, x, y, None, None, "dlr")  # pylint: disable=protected-access
    assert not np.isfinite(g.numpy()).all()  # the situation the guard is for
    x_adv = A.apgd(model_fn, x, 0.05, nb_iter=5, loss="dlr", y=y).numpy()
    assert np.isfinite(x_adv).all()
    assert np.abs(x_adv - x.numpy()).max() <= 0.05 + 1e-6
