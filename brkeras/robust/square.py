"""Square Attack, L-inf (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020).

Score-based black box: needs only `predict_fn(x_np) -> logits_np` (NumPy in and
out, so it can wrap a TFLite interpreter), no gradients. Images are NHWC
([B, H, W, C], or [B, H, W] for one channel), values in [clip_min, clip_max].

Loss: margin m(x) = z_y - max_{i != y} z_i of the logits (mean logits over
`eot_samples` calls for a stochastic model); success is m < 0.
  query 1: the clean x (examples already misclassified stop there, x_adv = x);
  query 2: vertical stripes x_0 = clip(x + eps * r), r in {-1, 1}^{[1, W, C]}
           (one sign per column and channel), accepted unconditionally;
  then, per still-robust example and query: a random s x s window (any position)
  gets delta = eps * r_c, one random sign per channel (resampled, a few tries, if
  it would not change x_best); x_new = clip(x + delta) is kept when its margin is
  lower. s = round(sqrt(p * H * W)) clipped to [1, min(H, W) - 1], p from
  `square_p_schedule`.
Every iterate is a vertex-like point of the eps-ball: |x_adv - x|_inf <= eps.
The budget `n_queries` counts every margin evaluation of an example, the clean
one included; with eot_samples=n each query is n calls of predict_fn.

Stochastic models: a candidate is kept when its (EOT-mean) margin beats the
lowest margin estimate so far, which is biased low by the noise; true small
improvements then get rejected, so the attack weakens as the noise grows
relative to the per-step gain. Raise eot_samples to shrink that bias.
"""

import math
import numbers

import numpy as np

__all__ = ["square_attack", "square_p_schedule"]

# reference breakpoints (for a 10000-query budget) after which p is halved
_P_BREAKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p_schedule(it, n_queries, p_init=0.05):
    """Fraction p of pixels changed at iteration `it` (0-based) of a budget of n_queries.

    it is rescaled to a 10000-query budget, it' = floor(it / n_queries * 10000),
    and p = p_init / 2^m with m the number of breakpoints
    10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 strictly below it'.
    """
    t = int(it / n_queries * 10000)
    m = sum(t > b for b in _P_BREAKS)
    return p_init / 2 ** m


def _square_size(p, h, w):
    s = int(round(math.sqrt(p * h * w)))
    return max(1, min(s, min(h, w) - 1)) if min(h, w) > 1 else 1


def _is_int(v):
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool)


def _validate(predict_fn, x, eps, n_queries, p_init, clip_min, clip_max, y, eot_samples, seed):
    if not callable(predict_fn):
        raise ValueError("predict_fn must be a callable x (NumPy [n, H, W, C]) -> logits "
                         "(NumPy [n, K]), e.g. `lambda a: model.predict(a, verbose=0)`")
    if x.ndim not in (3, 4):
        raise ValueError(f"x has shape {x.shape}; Square Attack needs images [B, H, W, C] "
                         "or [B, H, W] (reshape flat inputs to images)")
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps={eps!r} must be a finite number >= 0 (e.g. 8/255)")
    if not _is_int(n_queries) or n_queries < 1:
        raise ValueError(f"n_queries={n_queries!r} must be an integer >= 1 "
                         "(query budget per example, the clean query included)")
    if not (isinstance(p_init, numbers.Real) and 0 < p_init <= 1):
        raise ValueError(f"p_init={p_init!r} must be in (0, 1] (0.05 for L-inf in the paper)")
    if not clip_min < clip_max:
        raise ValueError(f"clip_min={clip_min} >= clip_max={clip_max}; pass clip_min < "
                         "clip_max (images here are in [0, 1])")
    if x.size and (x.min() < clip_min or x.max() > clip_max):
        raise ValueError(f"x has values in [{x.min()}, {x.max()}] outside [clip_min, clip_max] "
                         f"= [{clip_min}, {clip_max}]; scale the images or pass the right box")
    if y is not None and y.shape != (x.shape[0],):
        raise ValueError(f"y has shape {y.shape}; pass one int label per example, "
                         f"shape ({x.shape[0]},)")
    if not _is_int(eot_samples) or eot_samples < 1:
        raise ValueError(f"eot_samples={eot_samples!r} must be an integer >= 1 (1 = no EOT)")
    if seed is not None and not _is_int(seed) and not isinstance(seed, np.random.Generator):
        raise ValueError(f"seed={seed!r} must be an int, a numpy Generator or None")


def _logits(predict_fn, xq, eot):
    """Mean logits over eot calls of predict_fn."""
    z = 0.0
    for _ in range(eot):
        out = np.asarray(predict_fn(xq), np.float64)
        if out.ndim != 2 or out.shape[0] != xq.shape[0] or out.shape[1] < 2:
            raise ValueError(f"predict_fn returned shape {out.shape} for {xq.shape[0]} inputs; "
                             "it must return logits [n, K] with K >= 2 classes")
        z = z + out
    return z / eot


def _margin(z, y):
    """z_y - max_{i != y} z_i per row."""
    rows = np.arange(len(y))
    other = z.copy()
    other[rows, y] = -np.inf
    return z[rows, y] - other.max(1)


def square_attack(predict_fn, x, eps, n_queries=1000, p_init=0.05, clip_min=0., clip_max=1.,
                  y=None, eot_samples=1, seed=None, max_resample=10):
    """L-inf Square Attack; returns (x_adv, info). See the module docstring.

    y: int labels (None: the predicted labels at x, from the clean query).
    seed: int or np.random.Generator for the squares and signs.
    info: queries [B] int (margin evaluations per example, <= n_queries),
    success [B] bool (final margin < 0, i.e. x_adv misclassified on the mean
    logits), margin [B] (final), y [B] (labels used).
    """
    x = np.asarray(x)
    y = None if y is None else np.asarray(y).reshape(-1)
    _validate(predict_fn, x, eps, n_queries, p_init, clip_min, clip_max, y, eot_samples, seed)
    shape = x.shape
    x = x.astype(np.float32).reshape(shape if x.ndim == 4 else shape + (1,))
    b, h, w, c = x.shape
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    eps = np.float32(eps)
    lo, hi = x - eps, x + eps

    def clip(v, i):  # onto the eps-ball around x[i], then the box
        return np.clip(np.clip(v, lo[i], hi[i]), clip_min, clip_max)

    queries = np.zeros(b, np.int64)
    if b == 0:
        return x.reshape(shape), dict(queries=queries, success=np.zeros(0, bool),
                                      margin=np.zeros(0), y=np.zeros(0, np.int64))

    z = _logits(predict_fn, x, eot_samples)
    y = (z.argmax(1) if y is None else y).astype(np.int64)
    margin = _margin(z, y)
    queries += 1
    x_best = x.copy()
    idx = np.flatnonzero(margin >= 0)

    if n_queries >= 2 and idx.size:
        x_init = clip(x[idx] + eps * rng.choice(np.float32([-1, 1]), size=(idx.size, 1, w, c)),
                      idx)
        x_best[idx] = x_init
        margin[idx] = _margin(_logits(predict_fn, x_init, eot_samples), y[idx])
        queries[idx] += 1

    rows, cols = np.arange(h), np.arange(w)
    for it in range(max(n_queries - 2, 0)):
        idx = np.flatnonzero(margin >= 0)
        if not idx.size:
            break
        n = idx.size
        xc, xb = x[idx], x_best[idx]
        s = _square_size(square_p_schedule(it, n_queries, p_init), h, w)
        vh = rng.integers(0, h - s + 1, size=n)
        vw = rng.integers(0, w - s + 1, size=n)
        win = (((rows >= vh[:, None]) & (rows < vh[:, None] + s))[:, :, None]
               & ((cols >= vw[:, None]) & (cols < vw[:, None] + s))[:, None, :])[..., None]
        delta = xb - xc
        signs = rng.choice(np.float32([-1, 1]), size=(n, 1, 1, c))
        x_new = clip(xc + np.where(win, eps * signs, delta), idx)
        # resample signs where the window would stay as it is (a wasted query)
        for _ in range(max_resample):
            same = np.all(np.where(win, np.abs(x_new - xb) < 1e-7, True), axis=(1, 2, 3))
            if not same.any():
                break
            signs[same] = rng.choice(np.float32([-1, 1]), size=(int(same.sum()), 1, 1, c))
            x_new = clip(xc + np.where(win, eps * signs, delta), idx)
        m_new = _margin(_logits(predict_fn, x_new, eot_samples), y[idx])
        queries[idx] += 1
        better = m_new < margin[idx]
        x_best[idx[better]] = x_new[better]
        margin[idx[better]] = m_new[better]

    return x_best.reshape(shape), dict(queries=queries, success=margin < 0, margin=margin, y=y)
