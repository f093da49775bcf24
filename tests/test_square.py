"""Values of brkeras.robust.square: p-schedule, bounds, success, query counting, EOT."""

import numpy as np
import pytest

from brkeras._keras import tf
from brkeras.robust import square as S


@pytest.fixture(scope="module")
def blobs(blobs_mlp):
    """conftest's blobs_mlp as NumPy -> NumPy logits."""
    m, xte, yte = blobs_mlp
    f = tf.function(lambda a: m(a, training=False), reduce_retracing=True)
    return (lambda a: f(tf.constant(a, tf.float32)).numpy()), xte, yte


class _Counting:
    """predict_fn wrapper that counts calls and rows (the queries actually made)."""

    def __init__(self, fn, noise=0.0, seed=0):
        self.fn, self.noise, self.rng = fn, noise, np.random.default_rng(seed)
        self.calls = self.rows = 0

    def __call__(self, a):
        self.calls += 1
        self.rows += len(a)
        z = self.fn(a)
        return z + self.noise * self.rng.standard_normal(z.shape) if self.noise else z


def _acc(fn, x, y):
    return float(np.mean(fn(x).argmax(1) == y))


def test_p_schedule():
    # budget 10000: halved after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000
    p = [S.square_p_schedule(i, 10000, 0.8) for i in (0, 10, 11, 50, 51, 200, 201, 8000, 8001)]
    assert p == [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.8 / 256, 0.8 / 512]
    # budget 1000: iterations rescaled by 10 (it = 2 -> 20 > 10)
    assert S.square_p_schedule(1, 1000, 0.05) == 0.05
    assert S.square_p_schedule(2, 1000, 0.05) == 0.025
    assert S.square_p_schedule(999, 1000, 0.05) == 0.05 / 512


def test_square_breaks_a_natural_model_within_budget(blobs):
    fn, x, y = blobs
    eps, budget = 0.1, 200
    counting = _Counting(fn)
    xa, info = S.square_attack(counting, x, eps, n_queries=budget, y=y, seed=0)
    clean = _acc(fn, x, y)
    adv = _acc(fn, xa, y)
    assert clean > 0.9 and adv < 0.5 * clean, (clean, adv)
    # the box and the ball, shape and dtype kept
    assert xa.shape == x.shape and xa.dtype == np.float32
    assert xa.min() >= 0.0 and xa.max() <= 1.0
    assert np.abs(xa - x).max() <= eps + 1e-6
    # success is what the model says at x_adv
    np.testing.assert_array_equal(info["success"], fn(xa).argmax(1) != y)
    # queries: every row sent to predict_fn is counted, the budget holds, unbroken
    # examples used all of it, broken ones stopped
    q = info["queries"]
    assert counting.rows == q.sum() and q.max() <= budget
    assert np.all(q[~info["success"]] == budget)
    wrong = fn(x).argmax(1) != y
    assert np.all(q[wrong] == 1) and np.array_equal(xa[wrong], x[wrong])  # clean query only
    assert np.all(q[info["success"] & ~wrong] >= 2)
    assert np.median(q[info["success"] & ~wrong]) < budget / 2
    # one call per iteration at most (+ clean + stripes), only still-robust rows
    assert counting.calls <= budget


def test_stripes_initialisation_and_eps_ball(blobs):
    fn, x, y = blobs
    eps = 0.03
    xa, info = S.square_attack(fn, x, eps, n_queries=2, y=y, seed=1)
    assert info["queries"].max() == 2
    d = xa - x
    # where nothing was clipped by the box, |d| = eps and d is constant along H
    inside = (x - eps >= 0) & (x + eps <= 1)
    robust = info["queries"] == 2
    assert np.allclose(np.abs(d[robust][inside[robust]]), eps, atol=1e-6)
    sign = np.sign(d[robust])
    free = inside[robust].all(axis=1, keepdims=True)  # columns without box clipping
    col = np.broadcast_to(sign[:, :1], sign.shape)
    assert np.array_equal(np.where(free, sign, 0), np.where(free, col, 0))


def test_seed_reproduces_and_more_queries_do_not_hurt(blobs):
    fn, x, y = blobs
    a1, i1 = S.square_attack(fn, x[:50], 0.08, n_queries=60, y=y[:50], seed=3)
    a2, _ = S.square_attack(fn, x[:50], 0.08, n_queries=60, y=y[:50],
                            seed=np.random.default_rng(3))
    np.testing.assert_array_equal(a1, a2)
    assert np.all(np.isfinite(i1["margin"]))
    # the margin of every example only goes down with the query count
    _, i0 = S.square_attack(fn, x[:50], 0.08, n_queries=2, y=y[:50], seed=3)
    assert np.all(i1["margin"] <= i0["margin"] + 1e-9)


def test_eot_averages_draws_and_counts_them(blobs):
    fn, x, y = blobs
    noisy = _Counting(fn, noise=0.1, seed=0)
    xa, info = S.square_attack(noisy, x[:60], 0.1, n_queries=100, y=y[:60], eot_samples=3,
                               seed=0)
    assert noisy.rows == 3 * info["queries"].sum()
    assert info["queries"].max() <= 100
    assert np.abs(xa - x[:60]).max() <= 0.1 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert _acc(fn, xa, y[:60]) < _acc(fn, x[:60], y[:60]) - 0.2


def test_labels_default_to_predictions_and_3d_inputs(blobs):
    fn, x, y = blobs
    x3 = x[:20, :, :, 0]
    fn3 = lambda a: fn(a[..., None])
    xa, info = S.square_attack(fn3, x3, 0.05, n_queries=5, seed=0)
    assert xa.shape == x3.shape
    np.testing.assert_array_equal(info["y"], fn(x[:20]).argmax(1))
    assert info["queries"].min() >= 2  # none misclassified w.r.t. its own prediction


def test_arguments_are_validated_first(blobs):
    fn, x, y = blobs
    c = _Counting(fn)
    bad = [dict(eps=-0.1), dict(n_queries=0), dict(n_queries=2.5), dict(p_init=0.0),
           dict(clip_min=1.0, clip_max=0.0), dict(eot_samples=0), dict(y=y[:3]),
           dict(seed="a")]
    for kw in bad:
        args = dict(eps=0.1)
        args.update(kw)
        with pytest.raises(ValueError):
            S.square_attack(c, x, **args)
    with pytest.raises(ValueError, match="images"):
        S.square_attack(c, x.reshape(len(x), -1), 0.1)
    with pytest.raises(ValueError, match="outside"):
        S.square_attack(c, x + 2.0, 0.1)
    with pytest.raises(ValueError, match="callable"):
        S.square_attack(None, x, 0.1)
    assert c.calls == 0
    with pytest.raises(ValueError, match="logits"):
        S.square_attack(lambda a: np.zeros(len(a)), x, 0.1)
