"""Gradient attacks in the cleverhans 4 shape: FGSM, PGD (L-inf, L2), CW-L2, EOT.

Every attack is a plain function `attack(model_fn, x, ...) -> x_adv` with
`model_fn` a callable x -> logits, `x` float32 in [clip_min, clip_max] and `y`
int labels (None: the model's own predicted labels, as cleverhans does, to avoid
label leaking). Arguments are validated before any computation and raise
ValueError saying how to fix them. The result is `tf.stop_gradient`-ed.

Loss: L(x) = sum_i CE(model_fn(x)_i, y_i) (softmax cross-entropy on logits,
SUMMED over the batch so that each example's gradient does not shrink with the
batch size; the sign / normalised steps do not care, CW's Adam neither).

EOT (expectation over transformation, here over the model's own noise): with
`eot_samples=n` the gradient used is (1/n) sum_k grad L_k(x), L_k the loss of the
k-th call of `model_fn` (a fresh Feynman-Kac noise draw per call). The n calls are
made one after another (a tf.while_loop), not by tiling the batch, so the noise
statistics of one call (e.g. std(out) over the batch) are those of a plain call.
A model_fn with an `eot_split` = (prefix, suffix, num_classes) (robust.evaluation's
StochasticModel) has its noise-free prefix run once per step and only the
suffix n times (`split_eot_grad`): the same gradient at a lower cost.

Graph use: the functions are pure TF (loops are tf.while_loop, randomness is
tf.random, no numpy on tensors), so they can be called inside a `tf.function`
(e.g. a compiled adversarial train_step); there they are traced inline. Called
eagerly, they run a `tf.function` cached at module level per attack and static
options (norm, rand_init, targeted, ...), traced once for any batch size; eps,
eps_iter, nb_iter, restarts, eot_samples, c, ... are passed as tensors, so a sweep
over eps, EOT draws or restarts, or a smaller last batch, does not retrace. The
model is a traced argument: pass the same callable object each time (a Keras
model, or one function object kept by the caller): a new lambda per call
retraces per call.
"""

import functools
import numbers

import numpy as np

from brkeras._keras import tf

__all__ = ["fgsm", "pgd", "ifgsm", "nfgsm", "cw_l2", "rescale", "clear_cache"]

_NORMS = (np.inf, 2)


# ---------------------------------------------------------------- validation
def static_value(v):
    """Python value of a number or a constant tensor; None when unknown at trace time."""
    if isinstance(v, (numbers.Number, np.number)):
        return float(v)
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return float(v)
    if tf.is_tensor(v):
        s = tf.get_static_value(v)
        return None if s is None else float(np.asarray(s))
    raise ValueError(f"expected a number or a scalar tensor, got {type(v).__name__}")


def _check_norm(norm):
    if norm not in _NORMS:
        raise ValueError(f"norm={norm!r} is not supported; use norm=np.inf (L-inf) or norm=2 (L2)")
    return np.inf if norm == np.inf else 2


def _check_nonneg(name, v, integer=False):
    s = static_value(v)
    if s is not None:
        if s < 0:
            raise ValueError(f"{name}={s} is negative; pass {name} >= 0")
        if integer and s != int(s):
            raise ValueError(f"{name}={s} must be a whole number (an iteration count)")
    return s


def _check_common(eps, clip_min, clip_max, eot_samples):
    e = _check_nonneg("eps", eps)
    lo, hi = static_value(clip_min), static_value(clip_max)
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"clip_min={lo} >= clip_max={hi}; pass clip_min < clip_max "
                         "(images here are in [0, 1]: clip_min=0., clip_max=1.)")
    n = static_value(eot_samples)
    if n is not None and (n < 1 or n != int(n)):
        raise ValueError(f"eot_samples={eot_samples} must be an integer >= 1 (1 = no EOT)")
    return e


def _check_model(model_fn):
    if not callable(model_fn):
        raise ValueError("model_fn must be a callable x -> logits (e.g. a Keras model or "
                         "`lambda z: model(z, training=False)`)")


# ---------------------------------------------------------------- pure TF core
def _labels(model_fn, x, y):
    if y is None:
        return tf.argmax(model_fn(x), axis=-1, output_type=tf.int32)
    return tf.cast(tf.reshape(y, [-1]), tf.int32)


def _reduce_axes(x):
    return list(range(1, x.shape.rank))  # static, so per-example reductions keep shape [B]


def _ce_sum(logits, y):
    return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))


def _eot_grad(model_fn, x, y, n, targeted, loss_fn=None):
    """(1/n) sum_k d/dx [+-] sum_i L(y_i, model_fn_k(x)_i), and the mean logits.

    L is the cross-entropy, or `loss_fn` (per-example) when given.

    Each of the n calls of model_fn draws its own noise; the loop is a
    tf.while_loop so the graph holds one copy of the model whatever n is.
    """
    sign = -1.0 if targeted else 1.0

    def loss_of(logits):
        return sign * (_ce_sum(logits, y) if loss_fn is None
                       else tf.reduce_sum(loss_fn(y, logits)))

    split = eot_split(model_fn)
    if n is not None and split is not None:
        return split_eot_grad(split, x, n, loss_of)

    def one(g, z):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = tf.cast(model_fn(x), tf.float32)
            loss = loss_of(logits)
        return g + tape.gradient(loss, x), z + logits

    g0, z0 = one(tf.zeros_like(x), 0.0)
    if n is None:  # statically one call: no loop in the graph
        return g0, z0
    nf = tf.cast(n, tf.float32)

    def body(k, g, z):
        g, z = one(g, z)
        return k + 1, g, z

    _, g, z = tf.while_loop(lambda k, g, z: k < n, body, (tf.constant(1), g0, z0))
    return g / nf, z / nf


def eot_split(model_fn):
    """model_fn's (prefix, suffix, num_classes) if it has one (robust.evaluation.
    StochasticModel): prefix(x) -> [h, ...] deterministic, suffix([h, ...]) -> logits
    [B, num_classes] with the noise."""
    return getattr(model_fn, "eot_split", None)


def _logit_zeros(x, num_classes):
    return tf.zeros(tf.stack([tf.shape(x)[0], num_classes]), tf.float32)


def split_eot_grad(split, x, n, loss_of, extra=None, return_loss=False):
    """EOT gradient through a deterministic prefix computed once.

    h = prefix(x); G = (1/n) sum_k dL(suffix_k(h))/dh; grad = J_prefix(x)^T G (+ the
    gradient of extra(x), a deterministic scalar, e.g. CW's distance term); also
    returns the mean logits. Same value as n full calls, at the cost of one prefix
    and n suffix passes; the loop starts from zeros, so the graph holds one suffix.
    loss_of(logits) -> scalar, or per-example losses [batch] (their sum is
    differentiated); return_loss: also return the mean of loss_of over the n draws
    (then loss_of must give per-example losses).
    """
    prefix, suffix, num_classes = split
    with tf.GradientTape() as tape:
        tape.watch(x)
        h = prefix(x)
        e = extra(x) if extra is not None else None

    def body(k, gh, z, l):
        with tf.GradientTape() as t2:
            t2.watch(h)
            logits = tf.cast(suffix(h), tf.float32)
            loss = loss_of(logits)
        return (k + 1, [a + b for a, b in zip(gh, t2.gradient(loss, h))], z + logits,
                l + loss if return_loss else l)

    l0 = tf.zeros(tf.shape(x)[:1]) if return_loss else tf.zeros([])
    _, gh, z, l = tf.while_loop(lambda k, *_: k < n, body,
                                (tf.constant(0), [tf.zeros_like(t) for t in h],
                                 _logit_zeros(x, num_classes), l0))
    nf = tf.cast(n, tf.float32)
    targets = list(h) + ([e] if e is not None else [])
    grads = [g / nf for g in gh] + ([tf.ones_like(e)] if e is not None else [])
    g = tape.gradient(targets, x, output_gradients=grads)
    return (g, z / nf, l / nf) if return_loss else (g, z / nf)


def mean_logits(model_fn, x, n):
    """Mean logits over n calls of model_fn (n None: one call); a split model runs its
    prefix once."""
    split = eot_split(model_fn)
    if n is not None and split is not None:
        h = split[0](x)
        _, z = tf.while_loop(lambda k, z: k < n,
                             lambda k, z: (k + 1, z + tf.cast(split[1](h), tf.float32)),
                             (tf.constant(0), _logit_zeros(x, split[2])))
        return z / tf.cast(n, tf.float32)
    z = tf.cast(model_fn(x), tf.float32)
    if n is None:
        return z
    _, z = tf.while_loop(lambda k, z: k < n,
                         lambda k, z: (k + 1, z + tf.cast(model_fn(x), tf.float32)),
                         (tf.constant(1), z))
    return z / tf.cast(n, tf.float32)


def _linf_step(g, step):
    return step * tf.sign(g)


def _l2_normalise(g):
    # sqrt(max(1e-12, |g|^2)) as cleverhans: a zero gradient gives a zero step
    sq = tf.reduce_sum(tf.square(g), axis=_reduce_axes(g), keepdims=True)
    return g / tf.sqrt(tf.maximum(sq, 1e-12))


def _project(eta, norm, eps):
    """Projection onto the eps-ball: clip (L-inf) or radial shrink (L2)."""
    if norm == np.inf:
        return tf.clip_by_value(eta, -eps, eps)
    sq = tf.reduce_sum(tf.square(eta), axis=_reduce_axes(eta), keepdims=True)
    return eta * tf.minimum(1.0, eps / tf.sqrt(tf.maximum(sq, 1e-12)))


def _random_start(x, norm, radius):
    """Uniform in the L-inf box [-r, r]^d, or uniform in the L2 ball of radius r."""
    if norm == np.inf:
        return tf.random.uniform(tf.shape(x), -radius, radius, dtype=x.dtype)
    b = tf.shape(x)[0]
    d = tf.reduce_prod(tf.shape(x)[1:])
    v = tf.random.normal(tf.stack([b, d]), dtype=x.dtype)
    v = v / tf.norm(v, axis=1, keepdims=True)
    u = tf.random.uniform(tf.stack([b, 1]), dtype=x.dtype) ** (1.0 / tf.cast(d, x.dtype))
    return radius * tf.reshape(u * v, tf.shape(x))


def _fgsm_core(model_fn, x, y, eps, clip_min, clip_max, eot, norm, targeted):
    """x_adv = clip(x + eps * s(g)), s = sign (L-inf) or g/|g|_2 (L2), g the EOT gradient."""
    y = _labels(model_fn, x, y)
    g, _ = _eot_grad(model_fn, x, y, eot, targeted)
    d = _linf_step(g, eps) if norm == np.inf else eps * _l2_normalise(g)
    return tf.stop_gradient(tf.clip_by_value(x + d, clip_min, clip_max))


def _nfgsm_core(model_fn, x, y, eps, eps_iter, noise_scale, clip_min, clip_max, loss_fn):
    """x_adv = clip(x_0 + eps_iter * sign(g(x_0))), x_0 = clip(x + U[-k eps, k eps]^d)."""
    if loss_fn is None:
        y = _labels(model_fn, x, y)
    r = noise_scale * eps
    x0 = tf.clip_by_value(x + tf.random.uniform(tf.shape(x), -r, r, dtype=x.dtype),
                          clip_min, clip_max)
    g, _ = _eot_grad(model_fn, x0, y, None, False, loss_fn)
    return tf.stop_gradient(tf.clip_by_value(x0 + _linf_step(g, eps_iter), clip_min, clip_max))


def _pgd_once(model_fn, x, y, eps, eps_iter, nb_iter, clip_min, clip_max, eot, rand_minmax,
              norm, rand_init, loss_fn=None):
    if rand_init:
        eta = _project(_random_start(x, norm, rand_minmax), norm, eps)
    else:
        eta = tf.zeros_like(x)
    x_adv = tf.clip_by_value(x + eta, clip_min, clip_max)

    def body(i, xa):
        g, _ = _eot_grad(model_fn, xa, y, eot, False, loss_fn)
        d = _linf_step(g, eps_iter) if norm == np.inf else eps_iter * _l2_normalise(g)
        xa = x + _project(xa + d - x, norm, eps)
        return i + 1, tf.clip_by_value(xa, clip_min, clip_max)

    _, x_adv = tf.while_loop(lambda i, xa: i < nb_iter, body, (tf.constant(0), x_adv))
    return x_adv


def _score(model_fn, x, y, eot):
    """Per-example (misclassified, CE) of the mean logits over eot calls."""
    z = mean_logits(model_fn, x, eot)
    wrong = tf.not_equal(tf.argmax(z, axis=-1, output_type=tf.int32), y)
    return wrong, tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z)


def _pgd_core(model_fn, x, y, eps, eps_iter, nb_iter, clip_min, clip_max, eot, rand_minmax,
              restarts, norm, rand_init, loss_fn=None):
    y = _labels(model_fn, x, y) if loss_fn is None else y  # a custom loss takes y as given
    args = (eps, eps_iter, nb_iter, clip_min, clip_max, eot, rand_minmax, norm, rand_init,
            loss_fn)
    best = _pgd_once(model_fn, x, y, *args)
    if restarts is None or loss_fn is not None:  # statically one run (a custom loss: always)
        return tf.stop_gradient(best)
    bshape = tf.concat([tf.shape(x)[:1], tf.ones_like(tf.shape(x)[1:])], 0)

    def body(r, best, bw, bl):
        cand = _pgd_once(model_fn, x, y, *args)
        cw, cl = _score(model_fn, cand, y, eot)
        # keep the first misclassified; among still-correct, the highest loss
        take = tf.logical_and(tf.logical_not(bw), tf.logical_or(cw, cl > bl))
        best = tf.where(tf.reshape(take, bshape), cand, best)
        return r + 1, best, tf.logical_or(bw, cw), tf.where(take, cl, bl)

    def more(best):
        best_wrong, best_loss = _score(model_fn, best, y, eot)
        return tf.while_loop(lambda r, *_: r < restarts, body,
                             (tf.constant(1), best, best_wrong, best_loss))[1]

    # restarts as a tensor (eager calls): one run needs no scoring pass
    return tf.stop_gradient(tf.cond(restarts > 1, lambda: more(best), lambda: best))


def _adam(g, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    """One Adam step (PyTorch defaults); returns (delta, m, v)."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * tf.square(g)
    mhat = m / (1 - b1 ** t)
    vhat = v / (1 - b2 ** t)
    return -lr * mhat / (tf.sqrt(vhat) + eps), m, v


def _cw_core(model_fn, x, y, c, kappa, lr, steps, clip_min, clip_max, eot):
    y = _labels(model_fn, x, y)
    span = clip_max - clip_min
    # tanh change of variables: x' = clip_min + span * (tanh(w) + 1) / 2 is always in the box
    w0 = tf.atanh(tf.clip_by_value((x - clip_min) / span * 2 - 1, -1 + 1e-6, 1 - 1e-6))
    axes = _reduce_axes(x)
    bshape = tf.concat([tf.shape(x)[:1], tf.ones_like(tf.shape(x)[1:])], 0)

    def to_x(w):
        return clip_min + span * (tf.tanh(w) + 1) / 2

    def objective(w):
        """Per-example |x'-x|^2 + c * max(Z_y - max_{j!=y} Z_j + kappa, 0), its EOT gradient."""
        split = eot_split(model_fn)
        if eot is not None and split is not None:
            def hinge(z):
                onehot = tf.one_hot(y, tf.shape(z)[-1])
                zy = tf.reduce_sum(z * onehot, -1)
                return c * tf.reduce_sum(tf.maximum(zy - tf.reduce_max(z - 1e9 * onehot, -1)
                                                    + kappa, 0.0))

            pre, suf, classes = split
            return split_eot_grad((lambda v: pre(to_x(v)), suf, classes), w, eot, hinge,
                                  extra=lambda v: tf.reduce_sum(tf.square(to_x(v) - x)))

        def one(gw, zsum):
            with tf.GradientTape() as tape:
                tape.watch(w)
                xa = to_x(w)
                z = tf.cast(model_fn(xa), tf.float32)
                l2 = tf.reduce_sum(tf.square(xa - x), axis=axes)
                onehot = tf.one_hot(y, tf.shape(z)[-1])
                zy = tf.reduce_sum(z * onehot, -1)
                zother = tf.reduce_max(z - 1e9 * onehot, -1)
                obj = l2 + c * tf.maximum(zy - zother + kappa, 0.0)
                loss = tf.reduce_sum(obj)
            return gw + tape.gradient(loss, w), zsum + z

        g0, z0 = one(tf.zeros_like(w), 0.0)
        if eot is None:
            return g0, z0
        _, g, z = tf.while_loop(lambda k, *_: k < eot, lambda k, g, z: (k + 1, *one(g, z)),
                                (tf.constant(1), g0, z0))
        n = tf.cast(eot, tf.float32)
        return g / n, z / n

    def judge(w, z):
        xa = to_x(w)
        l2 = tf.reduce_sum(tf.square(xa - x), axis=axes)
        onehot = tf.one_hot(y, tf.shape(z)[-1])
        margin = tf.reduce_sum(z * onehot, -1) - tf.reduce_max(z - 1e9 * onehot, -1)
        ok = tf.where(kappa > 0, margin + kappa <= 0.0, margin < 0.0)  # a tie is no success
        obj = l2 + c * tf.maximum(margin + kappa, 0.0)
        return xa, l2, ok, obj

    def update(best, xa, l2, ok, obj):
        bx, bl2, bok, bobj = best
        # success beats failure; among successes the smallest L2, among failures the lowest
        # objective
        take = tf.where(bok, tf.logical_and(ok, l2 < bl2),
                        tf.logical_or(ok, obj < bobj))
        return (tf.where(tf.reshape(take, bshape), xa, bx), tf.where(take, l2, bl2),
                tf.logical_or(bok, ok), tf.where(take, obj, bobj))

    big = tf.fill(tf.shape(y), np.float32(np.inf))
    best0 = (x, big, tf.zeros(tf.shape(y), tf.bool), big)

    def body(i, w, m, v, best):
        g, z = objective(w)
        best = update(best, *judge(w, z))
        dw, m, v = _adam(g, m, v, tf.cast(i + 1, tf.float32), lr)
        return i + 1, w + dw, m, v, best

    _, w, _, _, best = tf.while_loop(
            lambda i, *_: i < steps, body,
            (tf.constant(0), w0, tf.zeros_like(w0), tf.zeros_like(w0), best0))
    _, z = objective(w)  # the last iterate is judged too
    best = update(best, *judge(w, z))
    return tf.stop_gradient(best[0])


# ---------------------------------------------------------------- dispatch
_CACHE = {}


def clear_cache():
    """Drops the cached tf.functions (and with them their references to models)."""
    _CACHE.clear()


def batch_free_specs(tensors):
    """TensorSpecs of `tensors` with the batch (first) axis of non-scalars unknown."""
    return tuple(None if t is None else tf.TensorSpec(
            [None] + t.shape.as_list()[1:] if t.shape.rank else [], t.dtype) for t in tensors)


def _run(core, static, model_fn, tensors):
    """Runs `core` inline inside a caller's tf.function, else through a cached tf.function."""
    if tf.inside_function():
        return core(model_fn, *tensors, **static)
    key = (core.__name__, tuple(sorted(static.items())), tuple(t is None for t in tensors))
    fn = _CACHE.get(key)
    if fn is None:
        # a partial, not a closure: tf's frequent-retracing warning keys on __code__
        fn = tf.function(functools.partial(core, **static), reduce_retracing=True,
                         autograph=False)
        _CACHE[key] = fn
    # one trace for every batch size (a last or smaller batch would retrace); a lookup
    # once traced
    fn.get_concrete_function(model_fn, *batch_free_specs(tensors))
    return fn(model_fn, *tensors)


def _f(v):
    return tf.convert_to_tensor(v, tf.float32)


def _i(v):
    return tf.convert_to_tensor(v, tf.int32)


def _n(v):
    """A count that is statically 1 becomes None inside a caller's tf.function: the
    graph then has no loop for it. Called eagerly it stays a tensor, so one cached
    trace serves 1 and n (plain and EOT runs, one and more restarts)."""
    return None if static_value(v) == 1 and tf.inside_function() else _i(v)


def _y(y):
    return None if y is None else tf.convert_to_tensor(y)


# ---------------------------------------------------------------- public API
def fgsm(model_fn, x, eps, norm=np.inf, clip_min=0., clip_max=1., y=None, targeted=False,
         eot_samples=1):
    """Fast gradient method (Goodfellow et al.), one step.

    x_adv = clip(x + eps * s(g), clip_min, clip_max), g = E_noise grad_x L(x)
    (EOT over `eot_samples` calls), s(g) = sign(g) for norm=np.inf,
    g / |g|_2 per example for norm=2; targeted=True descends the loss towards y.
    """
    _check_model(model_fn)
    norm = _check_norm(norm)
    _check_common(eps, clip_min, clip_max, eot_samples)
    if targeted and y is None:
        raise ValueError("targeted=True needs the target labels: pass y")
    x = _f(x)
    static = dict(norm=norm, targeted=bool(targeted))
    return _run(_fgsm_core, static, model_fn,
                (x, _y(y), _f(eps), _f(clip_min), _f(clip_max), _n(eot_samples)))


def pgd(model_fn, x, eps, eps_iter, nb_iter, norm=np.inf, clip_min=0., clip_max=1., y=None,
        rand_init=True, rand_minmax=None, restarts=1, eot_samples=1, loss_fn=None):
    """Projected gradient descent (Madry et al.), untargeted, with restarts and EOT.

    loss_fn: a per-example loss `loss_fn(y, logits) -> [B]` to ascend instead of
    the cross-entropy, with `y` passed to it as given (e.g. TRADES' KL(f(x) || f(x'))
    with y = the natural logits); it needs y and restarts=1. Keep one function
    object (a module-level function): it is part of the cache key.

    x_0 = clip(x + P(eta_0)), eta_0 ~ U[-r, r]^d (L-inf) or U(L2 ball of radius r),
    r = rand_minmax (default eps), eta_0 = 0 if not rand_init; then nb_iter times
      x_{t+1} = clip(x + P(x_t + eps_iter * s(g_t) - x), clip_min, clip_max),
    g_t the EOT gradient of the summed CE at x_t, s = sign (L-inf) or g/|g|_2 (L2),
    P the projection onto the eps-ball (clip, or radial shrink for L2).
    With restarts=R, R independent runs; per example the first misclassified
    result is kept, else the one of highest CE (both judged on the mean logits
    of eot_samples calls). IFGSM-k is pgd(..., rand_init=False): see `ifgsm`.
    """
    _check_model(model_fn)
    norm = _check_norm(norm)
    e = _check_common(eps, clip_min, clip_max, eot_samples)
    a = _check_nonneg("eps_iter", eps_iter)
    if e is not None and a is not None and a > e:
        raise ValueError(f"eps_iter={a} > eps={e}: a PGD step larger than the ball only "
                         "gets projected back; pass eps_iter <= eps (e.g. eps / 4)")
    _check_nonneg("nb_iter", nb_iter, integer=True)
    r = static_value(restarts)
    if r is not None and (r < 1 or r != int(r)):
        raise ValueError(f"restarts={restarts} must be an integer >= 1")
    if rand_minmax is None:
        rand_minmax = eps
    _check_nonneg("rand_minmax", rand_minmax)
    if loss_fn is not None and (y is None or r != 1 or not callable(loss_fn)):
        raise ValueError("loss_fn needs a callable loss_fn(y, logits), the y it compares "
                         "against, and restarts=1 (restarts are judged by misclassification)")
    x = _f(x)
    if not rand_init and not tf.inside_function():
        # a start drawn from radius 0 is x itself: IFGSM shares PGD's cached trace
        rand_init, rand_minmax = True, 0.0
    static = dict(norm=norm, rand_init=bool(rand_init), loss_fn=loss_fn)
    return _run(_pgd_core, static, model_fn,
                (x, _y(y), _f(eps), _f(eps_iter), _i(nb_iter), _f(clip_min), _f(clip_max),
                 _n(eot_samples), _f(rand_minmax), _n(restarts)))


def nfgsm(model_fn, x, eps, eps_iter=None, noise_scale=2.0, clip_min=0., clip_max=1., y=None,
          loss_fn=None):
    """N-FGSM (de Jorge et al., NeurIPS 2022): one signed-gradient step from a large
    random start, with no projection back to the eps-ball. A training attack.

    x_0 = clip(x + eta), eta ~ U[-k eps, k eps]^d (k = noise_scale, 2 in the paper);
    x_adv = clip(x_0 + eps_iter * sign(grad_x L(x_0)), clip_min, clip_max),
    eps_iter = eps by default (the paper's alpha). L is the summed cross-entropy,
    or `loss_fn(y, logits)` (e.g. TRADES' KL with y = the natural logits). So
    |x_adv - x|_inf <= k eps + eps_iter ((k + 1) eps at the default step): the
    noise and the unprojected step are what
    keep single-step training from catastrophic overfitting (the paper's finding),
    at the cost of one gradient per example, against nb_iter for PGD. Not an
    evaluation attack: it leaves the eps-ball by design.
    """
    _check_model(model_fn)
    _check_common(eps, clip_min, clip_max, 1)
    if eps_iter is None:
        eps_iter = eps
    _check_nonneg("eps_iter", eps_iter)
    _check_nonneg("noise_scale", noise_scale)
    if loss_fn is not None and (y is None or not callable(loss_fn)):
        raise ValueError("loss_fn needs a callable loss_fn(y, logits) and the y it compares "
                         "against")
    x = _f(x)
    return _run(_nfgsm_core, dict(loss_fn=loss_fn), model_fn,
                (x, _y(y), _f(eps), _f(eps_iter), _f(noise_scale), _f(clip_min), _f(clip_max)))


def ifgsm(model_fn, x, eps=0.031, eps_iter=1 / 255, nb_iter=20, clip_min=0., clip_max=1., y=None,
          eot_samples=1):
    """Iterative FGSM as the reference evaluates it (IFGSM-20: L-inf, no random start).

    = pgd(model_fn, x, eps, eps_iter, nb_iter, norm=np.inf, rand_init=False).
    """
    return pgd(model_fn, x, eps, eps_iter, nb_iter, norm=np.inf, clip_min=clip_min,
               clip_max=clip_max, y=y, rand_init=False, eot_samples=eot_samples)


def cw_l2(model_fn, x, y=None, c=10., kappa=0., lr=6e-4, steps=50, clip_min=0., clip_max=1.,
          eot_samples=1):
    """Carlini-Wagner L2, untargeted, one constant c (the reference's settings).

    x' = clip_min + (clip_max - clip_min) * (tanh(w) + 1) / 2, w_0 = atanh(x scaled);
    `steps` Adam steps (lr, betas 0.9/0.999) on
      sum_i |x'_i - x_i|_2^2 + c * max(Z(x')_{y_i} - max_{j != y_i} Z(x')_j + kappa, 0),
    gradients EOT-averaged. Every iterate (the start and the last included) is
    judged on its (EOT-mean) logits; per example the result is the successful
    iterate (margin + kappa <= 0; strictly < 0 when kappa = 0) of smallest L2,
    else the iterate of lowest objective. The reference (lzj994/Binary-Quantization)
    then reports `rescale(x, x_adv, eps)`; see there.
    Note: the reference optimises x' directly (no tanh, no box); the tanh form
    keeps x' in the box and is the standard CW-L2.
    """
    _check_model(model_fn)
    _check_common(0.0, clip_min, clip_max, eot_samples)
    for name, v in (("c", c), ("kappa", kappa), ("lr", lr)):
        _check_nonneg(name, v)
    _check_nonneg("steps", steps, integer=True)
    x = _f(x)
    return _run(_cw_core, {}, model_fn,
                (x, _y(y), _f(c), _f(kappa), _f(lr), _i(steps), _f(clip_min), _f(clip_max),
                 _n(eot_samples)))


def rescale(x, x_adv, eps, clip_min=0., clip_max=1.):
    """The reference's "cw_rescaled": clip(x + eps * (x_adv - x), clip_min, clip_max).

    Shrinks an (unbounded) CW perturbation by the factor eps; it is not a
    projection onto an eps-ball.
    """
    _check_common(eps, clip_min, clip_max, 1)
    x = _f(x)
    return tf.clip_by_value(x + _f(eps) * (_f(x_adv) - x), _f(clip_min), _f(clip_max))
