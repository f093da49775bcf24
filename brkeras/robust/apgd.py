"""Auto-PGD (APGD; Croce and Hein, ICML 2020, Algorithm 1), L-inf and L2, CE / DLR losses.

Cleverhans-shaped: `apgd(model_fn, x, eps, ...) -> x_adv`, `model_fn` a callable
x -> logits, x float32 in [clip_min, clip_max], `y` int labels (None: the model's
own predictions). Arguments are validated before any computation and raise
ValueError saying how to fix them. Pure TF (tf.while_loop, stateless random
starts), so it also runs inline inside a caller's tf.function.

Iteration (per example, eta the step size, P the projection onto the eps-ball
intersected with the box [clip_min, clip_max]):
    z^{k+1} = P(x^k + eta * s(g^k)),        s = sign (L-inf) or g/|g|_2 (L2)
    x^{k+1} = P(x^k + a (z^{k+1} - x^k) + (1 - a)(x^k - x^{k-1})),
a = 1 at k = 0, else alpha = 0.75; eta_0 = 2 eps; g^k the gradient of the loss f.
x_max / f_max track the highest loss seen. Checkpoints (see `apgd_checkpoints`):
after x^{w_j} is computed, eta is halved, and x^{w_j} and its gradient replaced
by x_max and its gradient, for the examples where
  condition 1: #{i in (w_{j-1}, w_j] : f(x^i) > f(x^{i-1})} <= rho * (w_j - w_{j-1}),
  condition 2: eta was not halved at w_{j-1} and f_max did not grow since w_{j-1}
(w_0 counts as "halved", so condition 2 cannot fire at w_1), as in the reference
code fra31/auto-attack (autopgd_base.py); the paper writes "<" in condition 1.
The first window compares f(x^1) with f(x^0) (the reference compares it with
an unwritten 0 row of its loss buffer, an indexing artefact).

EOT: with eot_samples=n every evaluation makes n calls of model_fn (one after
another, fresh noise each) and uses the mean gradient, the mean per-example loss
(for the checkpoint conditions and x_max) and the mean logits (to judge
misclassification). A model_fn with an `eot_split` (robust.evaluation's
StochasticModel) runs the noise-free part of the network once per evaluation
and only the noisy rest n times: the same values at a lower cost.

Result per example: the last iterate found misclassified, else x_max; over
`restarts` random starts, later restarts only attack the examples not yet
misclassified, and an unbroken example keeps the x_max of highest loss.
"""

import functools
import math
import numbers

import numpy as np

from brkeras._keras import tf
from brkeras.robust import attacks

__all__ = ["apgd", "dlr_loss", "dlr_targeted_loss", "apgd_checkpoints", "apgd_step_rule",
           "clear_cache"]

_NORMS = (np.inf, 2)
_LOSSES = ("ce", "dlr", "dlr_targeted")
_MIN_CLASSES = {"ce": 2, "dlr": 3, "dlr_targeted": 4}


# ---------------------------------------------------------------- losses (pure)
def _num_classes_check(logits, need, what):
    k = logits.shape[-1]
    if k is not None and k < need:
        raise ValueError(f"{what} needs at least {need} classes, the model has {k} "
                         "logits; use loss='ce' (or a model with more classes)")


def dlr_loss(logits, y):
    """Per-example DLR loss: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12).

    z_pi1 >= z_pi2 >= ... are the logits sorted in decreasing order. Shift and
    scale invariant in z; needs >= 3 classes.
    """
    z = tf.cast(logits, tf.float32)
    _num_classes_check(z, 3, "the DLR loss")
    y = tf.cast(tf.reshape(y, [-1]), tf.int32)
    onehot = tf.one_hot(y, tf.shape(z)[-1]) > 0.5
    zy = tf.reduce_sum(tf.where(onehot, z, 0.0), -1)
    zother = tf.reduce_max(tf.where(onehot, -np.inf, z), -1)
    top = tf.math.top_k(z, 3).values
    return -(zy - zother) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits, y, y_target):
    """Per-example targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12).

    Ascending it pushes the target class t above the true class y; needs >= 4 classes.
    """
    z = tf.cast(logits, tf.float32)
    _num_classes_check(z, 4, "the targeted DLR loss")
    k = tf.shape(z)[-1]
    zy = tf.reduce_sum(z * tf.one_hot(tf.cast(tf.reshape(y, [-1]), tf.int32), k), -1)
    zt = tf.reduce_sum(z * tf.one_hot(tf.cast(tf.reshape(y_target, [-1]), tf.int32), k), -1)
    top = tf.math.top_k(z, 4).values
    return -(zy - zt) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _loss(kind, z, y, yt):
    if kind == "ce":
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z)
    if kind == "dlr":
        return dlr_loss(z, y)
    return dlr_targeted_loss(z, y, yt)


# ---------------------------------------------------------------- schedule (pure)
def apgd_checkpoints(nb_iter):
    """Checkpoint iterations [w_0 = 0, w_1, ...] (all < nb_iter) of APGD with nb_iter steps.

    Paper: w_j = ceil(p_j * nb_iter), p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06). The reference code uses the
    integer form implemented here (identical for nb_iter = 100:
    [0, 22, 41, 57, 70, 80, 87, 93, 99]): window h_1 = max(floor(0.22 N), 1),
    h_{j+1} = max(h_j - max(floor(0.03 N), 1), max(floor(0.06 N), 1)), w_j = w_{j-1} + h_j.
    A check at w_j happens once x^{w_j} is computed.
    """
    n = _check_count("nb_iter", nb_iter, minimum=1)
    # int(0.22 * n) as the reference computes it (float product, truncation)
    h = max(int(0.22 * n), 1)
    dec = max(int(0.03 * n), 1)
    hmin = max(int(0.06 * n), 1)
    out, w = [0], h
    while w < n:
        out.append(w)
        h = max(h - dec, hmin)
        w += h
    return out


def apgd_step_rule(n_increases, window, reduced_last, loss_best_last, loss_best, rho=0.75):
    """Per-example bool: halve the step size at this checkpoint (conditions 1 or 2).

    n_increases: #successful loss increases f(x^i) > f(x^{i-1}) in the window;
    window: its length w_j - w_{j-1}; reduced_last: halved at the previous checkpoint;
    loss_best_last / loss_best: f_max at the previous checkpoint / now.
      cond1 = n_increases <= rho * window
      cond2 = (not reduced_last) and loss_best_last >= loss_best
    """
    n_inc = tf.cast(n_increases, tf.float32)
    cond1 = n_inc <= tf.cast(rho, tf.float32) * tf.cast(window, tf.float32)
    cond2 = tf.logical_and(tf.logical_not(tf.cast(reduced_last, tf.bool)),
                           tf.cast(loss_best_last, tf.float32) >= tf.cast(loss_best, tf.float32))
    return tf.logical_or(cond1, cond2)


def _schedule_tensors(n):
    """checks[i]: a checkpoint follows iteration i (i.e. x^{i+1} = x^{w_j}); win[i]: its window."""
    w = apgd_checkpoints(n)
    checks = np.zeros(n, bool)
    win = np.zeros(n, np.float32)
    for a, b in zip(w[:-1], w[1:]):
        checks[b - 1] = True
        win[b - 1] = b - a
    return checks, win


# ---------------------------------------------------------------- validation


def _check_count(name, v, minimum):
    s = attacks.static_value(v)
    if s is None:
        raise ValueError(f"{name} must be known when the graph is built (a Python int), "
                         "not a computed tensor")
    if s != int(s) or s < minimum:
        raise ValueError(f"{name}={v} must be an integer >= {minimum}")
    return int(s)


def _validate(model_fn, x, eps, nb_iter, norm, loss, clip_min, clip_max, y, restarts, rho,
              eot_samples, seed, y_target):
    if not callable(model_fn):
        raise ValueError("model_fn must be a callable x -> logits (e.g. a Keras model or "
                         "`lambda z: model(z, training=False)`)")
    if norm not in _NORMS:
        raise ValueError(f"norm={norm!r} is not supported; use norm=np.inf (L-inf) or norm=2 (L2)")
    if loss not in _LOSSES:
        raise ValueError(f"loss={loss!r} is not supported; use one of {_LOSSES}")
    e = attacks.static_value(eps)
    if e is not None and (e < 0 or not math.isfinite(e)):
        raise ValueError(f"eps={e} must be a finite number >= 0 (e.g. 8/255 for CIFAR-10)")
    lo, hi = attacks.static_value(clip_min), attacks.static_value(clip_max)
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"clip_min={lo} >= clip_max={hi}; pass clip_min < clip_max "
                         "(images here are in [0, 1]: clip_min=0., clip_max=1.)")
    n = _check_count("nb_iter", nb_iter, 1)
    r = attacks.static_value(restarts)
    if r is not None and (r < 1 or r != int(r)):
        raise ValueError(f"restarts={restarts} must be an integer >= 1 (1 = one random start)")
    p = attacks.static_value(rho)
    if p is not None and not 0.0 < p <= 1.0:
        raise ValueError(f"rho={rho} must be in (0, 1] (the reference uses 0.75)")
    k = attacks.static_value(eot_samples)
    if k is not None and (k < 1 or k != int(k)):
        raise ValueError(f"eot_samples={eot_samples} must be an integer >= 1 (1 = no EOT)")
    if seed is not None and not isinstance(seed, (numbers.Integral, np.integer)) \
            and not tf.is_tensor(seed):
        raise ValueError(f"seed={seed!r} must be an int or None")
    if y_target is not None and loss != "dlr_targeted":
        raise ValueError("y_target is only used by loss='dlr_targeted'; drop it or set that loss")
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 2:
        raise ValueError("x must be a batch [B, ...] of inputs (add a batch axis)")
    # the number of classes, when the model says it before being run
    out = getattr(model_fn, "output_shape", None)
    if isinstance(out, tuple) and out and isinstance(out[-1], int) \
            and out[-1] < _MIN_CLASSES[loss]:
        raise ValueError(f"loss={loss!r} needs at least {_MIN_CLASSES[loss]} classes, the "
                         f"model has {out[-1]}; use loss='ce' for this model")
    return n


# ---------------------------------------------------------------- pure TF core
def _bc(v, x):
    """A per-example [B] tensor shaped to broadcast against x [B, ...]."""
    return tf.reshape(v, [-1] + [1] * (x.shape.rank - 1))


def _axes(x):
    return list(range(1, x.shape.rank))


def _eval(model_fn, x, y, yt, n, kind):
    """`_eval_raw` with non-finite gradient entries set to 0 (no step there).

    The DLR denominator z_pi1 - z_pi3 + 1e-12 is ~1e-12 where three logits tie
    (e.g. the fake-quantized logits of an int8 QAT model); its gradient then
    overflows to inf and NaN, and one NaN in sign(g) would make x_adv NaN."""
    l, g, z = _eval_raw(model_fn, x, y, yt, n, kind)
    return l, tf.where(tf.math.is_finite(g), g, tf.zeros_like(g)), z


def _eval_raw(model_fn, x, y, yt, n, kind):
    """Mean over n calls of (per-example loss, its gradient, logits).

    A model_fn with an `eot_split` (prefix, suffix, num_classes) runs its
    deterministic prefix once and the suffix n times (robust.evaluation.StochasticModel)."""
    split = attacks.eot_split(model_fn)
    if n is not None and split is not None:
        return _split_eval(split, x, y, yt, n, kind)

    def one():
        with tf.GradientTape() as tape:
            tape.watch(x)
            z = tf.cast(model_fn(x), tf.float32)
            _num_classes_check(z, _MIN_CLASSES[kind], f"loss={kind!r}")
            li = _loss(kind, z, y, yt)
            total = tf.reduce_sum(li)  # summed: each example's gradient is its own
        g = tape.gradient(total, x)
        if g is None:
            raise ValueError("model_fn's output does not depend differentiably on x; APGD "
                             "needs gradients (for a black-box model use square_attack)")
        return li, g, z

    l0, g0, z0 = one()
    if n is None:  # statically one call: no loop in the graph
        return l0, g0, z0

    def body(k, l, g, z):
        li, gi, zi = one()
        return k + 1, l + li, g + gi, z + zi

    _, l, g, z = tf.while_loop(lambda k, *_: k < n, body, (tf.constant(1), l0, g0, z0))
    nf = tf.cast(n, tf.float32)
    return l / nf, g / nf, z / nf


def _split_eval(split, x, y, yt, n, kind):
    """_eval through a deterministic prefix (attacks.split_eot_grad): h = prefix(x)
    once, the suffix's loss and its gradient per draw, pulled back through the prefix."""
    def loss_of(z):
        _num_classes_check(z, _MIN_CLASSES[kind], f"loss={kind!r}")
        return _loss(kind, z, y, yt)

    g, z, l = attacks.split_eot_grad(split, x, n, loss_of, return_loss=True)
    return l, g, z


def _direction(g, norm):
    if norm == np.inf:
        return tf.sign(g)
    nrm = tf.sqrt(tf.reduce_sum(tf.square(g), axis=_axes(g), keepdims=True))
    return g / (nrm + 1e-12)


def _projector(x, eps, norm, clip_min, clip_max):
    """v -> the eps-ball around x (clip, or radial shrink for L2), then the box."""

    def proj(v):
        if norm == np.inf:
            v = tf.clip_by_value(v, x - eps, x + eps)
        else:
            d = v - x
            nrm = tf.sqrt(tf.reduce_sum(tf.square(d), axis=_axes(d), keepdims=True))
            v = x + d / (nrm + 1e-12) * tf.minimum(eps, nrm)
        return tf.clip_by_value(v, clip_min, clip_max)

    return proj


def _start(x, eps, norm, seed, rand_init):
    """x + eps * t / |t| (the reference's start: on the sphere of the norm), t ~ U[-1,1]^d or N."""
    if not rand_init:
        return x
    if norm == np.inf:
        t = tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0)
        nrm = tf.reduce_max(tf.abs(t), axis=_axes(t), keepdims=True)
    else:
        t = tf.random.stateless_normal(tf.shape(x), seed)
        nrm = tf.sqrt(tf.reduce_sum(tf.square(t), axis=_axes(t), keepdims=True))
    return x + eps * t / (nrm + 1e-12)


def _single_run(model_fn, x, y, yt, eps, checks, win, clip_min, clip_max, eot, rho, seed,
                norm, kind, rand_init, alpha=0.75):
    """One APGD run; returns (x_max, f_max, fooled, x_fooled, loss_trace, step_trace)."""
    proj = _projector(x, eps, norm, clip_min, clip_max)
    x0 = proj(_start(x, eps, norm, seed, rand_init))
    n_iter = tf.shape(checks)[0]
    l0, g0, z0 = _eval(model_fn, x0, y, yt, eot, kind)
    fooled0 = tf.not_equal(tf.argmax(z0, -1, output_type=tf.int32), y)
    step0 = 2.0 * eps * tf.ones_like(l0)
    loss_ta = tf.TensorArray(tf.float32, size=n_iter + 1).write(0, l0)
    step_ta = tf.TensorArray(tf.float32, size=n_iter)
    zeros = tf.zeros_like(l0)
    state = dict(xk=x0, xprev=x0, g=g0, step=step0, lprev=l0,
                 xbest=x0, gbest=g0, lbest=l0, fooled=fooled0, xfool=x0,
                 ninc=zeros, reduced=tf.ones_like(fooled0), lbest_last=l0,
                 loss_ta=loss_ta, step_ta=step_ta)

    def body(i, s):
        a = tf.where(i > 0, alpha, 1.0)
        xk, st = s["xk"], _bc(s["step"], x)
        z = proj(xk + st * _direction(s["g"], norm))
        xn = proj(xk + a * (z - xk) + (1.0 - a) * (xk - s["xprev"]))
        ln, gn, zn = _eval(model_fn, xn, y, yt, eot, kind)

        wrong = tf.not_equal(tf.argmax(zn, -1, output_type=tf.int32), y)
        xfool = tf.where(_bc(wrong, x), xn, s["xfool"])
        ninc = s["ninc"] + tf.cast(ln > s["lprev"], tf.float32)
        better = ln > s["lbest"]
        xbest = tf.where(_bc(better, x), xn, s["xbest"])
        gbest = tf.where(_bc(better, x), gn, s["gbest"])
        lbest = tf.where(better, ln, s["lbest"])

        # checkpoint: halve and restart from x_max where condition 1 or 2 holds
        chk = checks[i]
        halve = tf.logical_and(chk, apgd_step_rule(ninc, win[i], s["reduced"],
                                                   s["lbest_last"], lbest, rho))
        hb = _bc(halve, x)
        return i + 1, dict(
                xk=tf.where(hb, xbest, xn), xprev=xk, g=tf.where(hb, gbest, gn),
                step=tf.where(halve, 0.5 * s["step"], s["step"]), lprev=ln,
                xbest=xbest, gbest=gbest, lbest=lbest,
                fooled=tf.logical_or(s["fooled"], wrong), xfool=xfool,
                ninc=tf.where(chk, zeros, ninc),
                reduced=tf.where(chk, halve, s["reduced"]),
                lbest_last=tf.where(chk, lbest, s["lbest_last"]),
                loss_ta=s["loss_ta"].write(i + 1, ln), step_ta=s["step_ta"].write(i, s["step"]))

    _, s = tf.while_loop(lambda i, s: i < n_iter, body, (tf.constant(0), state))
    return (s["xbest"], s["lbest"], s["fooled"], s["xfool"], s["loss_ta"].stack(),
            s["step_ta"].stack())


def _apgd_core(model_fn, x, y, yt, eps, checks, win, clip_min, clip_max, eot, restarts, rho,
               seed, norm, kind, rand_init):
    if y is None or (kind == "dlr_targeted" and yt is None):
        zc = attacks.mean_logits(model_fn, x, eot)
        if y is None:
            y = tf.argmax(zc, -1, output_type=tf.int32)
        if kind == "dlr_targeted" and yt is None:
            # the reference's first target: the runner-up class at the clean point
            yt = tf.math.top_k(zc, 2).indices[:, 1]
    y = tf.cast(tf.reshape(y, [-1]), tf.int32)
    if yt is not None:
        yt = tf.cast(tf.reshape(yt, [-1]), tf.int32)
    if seed is None:
        seed = tf.random.uniform([], 0, 2 ** 31 - 1, dtype=tf.int32)
    seed = tf.cast(seed, tf.int32)

    def run(xs, ys, yts, r):
        return _single_run(model_fn, xs, ys, yts, eps, checks, win, clip_min, clip_max, eot, rho,
                           tf.stack([seed, r]), norm, kind, rand_init)

    xbest, lbest, fooled, xfool, ltrace, strace = run(x, y, yt, tf.constant(0))
    out = tf.where(_bc(fooled, x), xfool, xbest)
    if restarts is not None:
        def body(r, out, lbest, fooled):
            idx = tf.where(tf.logical_not(fooled))[:, 0]

            def attack():
                xs = tf.gather(x, idx)
                yts = None if yt is None else tf.gather(yt, idx)
                xb, lb, fo, xf, _, _ = run(xs, tf.gather(y, idx), yts, r)
                cur_l = tf.gather(lbest, idx)
                take = tf.logical_or(fo, lb > cur_l)  # newly fooled, or a higher loss
                cand = tf.where(_bc(fo, xs), xf, xb)
                new_x = tf.where(_bc(take, xs), cand, tf.gather(out, idx))
                i2 = idx[:, None]
                return (tf.tensor_scatter_nd_update(out, i2, new_x),
                        tf.tensor_scatter_nd_update(lbest, i2, tf.where(take, lb, cur_l)),
                        tf.tensor_scatter_nd_update(fooled, i2, fo))

            out, lbest, fooled = tf.cond(tf.size(idx) > 0, attack, lambda: (out, lbest, fooled))
            return r + 1, out, lbest, fooled

        _, out, lbest, fooled = tf.while_loop(lambda r, *_: r < restarts, body,
                                              (tf.constant(1), out, lbest, fooled))
    info = dict(loss_best=lbest, fooled=fooled, loss_trace=ltrace, step_size=strace)
    return tf.stop_gradient(out), tf.nest.map_structure(tf.stop_gradient, info)


# ---------------------------------------------------------------- dispatch
_CACHE = {}


def clear_cache():
    """Drops the cached tf.functions (and with them their references to models)."""
    _CACHE.clear()


def _run(static, model_fn, tensors):
    if tf.inside_function():
        return _apgd_core(model_fn, *tensors, **static)
    key = (tuple(sorted(static.items())), tuple(t is None for t in tensors))
    fn = _CACHE.get(key)
    if fn is None:
        fn = tf.function(functools.partial(_apgd_core, **static), reduce_retracing=True,
                         autograph=False)
        _CACHE[key] = fn
    # one trace for any batch size (the checkpoint schedule's length is static per nb_iter)
    specs = tuple(None if t is None else tf.TensorSpec(
            [None] + t.shape.as_list()[1:] if t.shape.rank and i < 3 else t.shape, t.dtype)
            for i, t in enumerate(tensors))
    fn.get_concrete_function(model_fn, *specs)
    return fn(model_fn, *tensors)


def _n(v):
    """A count that is statically 1 becomes None inside a caller's tf.function (no loop
    in its graph); called eagerly it stays a tensor, so plain and EOT share a trace."""
    if attacks.static_value(v) == 1 and tf.inside_function():
        return None
    return tf.convert_to_tensor(v, tf.int32)


# ---------------------------------------------------------------- public API
def apgd(model_fn, x, eps, nb_iter=100, norm=np.inf, loss="ce", clip_min=0., clip_max=1.,
         y=None, restarts=1, rho=0.75, eot_samples=1, seed=None, rand_init=True,
         y_target=None, return_info=False):
    """APGD-CE / APGD-DLR / APGD-DLR-targeted, untargeted goal (x_adv misclassified).

    eps: radius of the L-inf (norm=np.inf) or L2 (norm=2) ball; nb_iter: steps
    per run (static: it fixes the checkpoint schedule); loss: "ce",
    "dlr" (>= 3 classes) or "dlr_targeted" (>= 4 classes; target `y_target`,
    default the runner-up class at x); restarts: random starts (x + eps t/|t|);
    rho: threshold of condition 1; eot_samples: model calls averaged per
    evaluation; seed: int for the random starts (None: fresh each call);
    rand_init=False starts at x. See the module docstring for the iteration.

    Returns x_adv (tf.Tensor, in the eps-ball and the box); with return_info
    also a dict: loss_best [B] and fooled [B] (over all restarts), loss_trace
    [nb_iter + 1, B] (f(x^0..x^N)) and step_size [nb_iter, B] (eta used for
    x^k -> x^{k+1}) of the first restart.
    """
    n = _validate(model_fn, x, eps, nb_iter, norm, loss, clip_min, clip_max, y, restarts, rho,
                  eot_samples, seed, y_target)
    norm = np.inf if norm == np.inf else 2
    checks, win = _schedule_tensors(n)
    f = functools.partial(tf.convert_to_tensor, dtype_hint=tf.float32)
    x = tf.cast(f(x), tf.float32)
    static = dict(norm=norm, kind=loss, rand_init=bool(rand_init))
    tensors = (x, None if y is None else tf.convert_to_tensor(y),
               None if y_target is None else tf.convert_to_tensor(y_target),
               tf.cast(f(eps), tf.float32), tf.constant(checks), tf.constant(win),
               tf.cast(f(clip_min), tf.float32), tf.cast(f(clip_max), tf.float32),
               _n(eot_samples), _n(restarts), tf.cast(f(rho), tf.float32),
               None if seed is None else tf.convert_to_tensor(seed, tf.int32))
    x_adv, info = _run(static, model_fn, tensors)
    return (x_adv, info) if return_info else x_adv
