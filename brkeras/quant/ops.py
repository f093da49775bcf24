"""Weight quantizers Q(w) of Binary-Relax: pure TensorFlow functions.

Every function maps a float tensor `w` to a tensor of the same shape and dtype
whose entries take few distinct values. The scale statistics are taken over the
whole tensor (one scale per layer, the reference) or, with `per_channel=True`,
over all axes but the last (one scale per output channel: HWIO conv kernels and
(in, out) dense kernels keep the output channel last).

sign(0) is taken as +1 throughout, so a binary kernel has exactly two values.
These functions have the ordinary TensorFlow gradients (zero almost everywhere);
Binary-Relax replaces them by the straight-through estimator (see quantize.py).
"""

import functools

from brkeras._keras import tf

TERNARY_SCALES = ("reference", "twn")


def _axes(w, per_channel):
    """Reduction axes: all (one scale per layer) or all but the last."""
    rank = w.shape.rank
    if rank is None:
        raise ValueError("the quantizers need a tensor of known rank")
    if per_channel:
        if rank < 2:
            raise ValueError(
                    f"per_channel=True needs a kernel of rank >= 2 (output channel last); "
                    f"got rank {rank}. Use per_channel=False for this tensor.")
        return list(range(rank - 1))
    return list(range(rank))


def _sign(w):
    """sign(w) with sign(0) = +1."""
    return tf.where(w >= 0, tf.ones_like(w), -tf.ones_like(w))


def binary(w, per_channel=False):
    """Binary weights (BinaryConnect with a scale).

    Q(w) = mean|w| * sign(w), sign(0) = +1; the mean is over the whole tensor,
    or over all axes but the last when `per_channel`.
    """
    w = tf.convert_to_tensor(w)
    scale = tf.reduce_mean(tf.abs(w), axis=_axes(w, per_channel), keepdims=True)
    return scale * _sign(w)


def ternary(w, scale="reference", per_channel=False):
    """Ternary weights (TWN thresholding).

    delta = 0.7 * mean|w|, m = (|w| >= delta),
    s = sum(m * |w|) / n  with n = the TOTAL number of entries (`scale="reference"`,
        the paper's code) or n = sum(m), the kept count (`scale="twn"`, the usual
        Ternary Weight Network scale; a group with nothing kept gets s = 0),
    Q(w) = s * m * sign(w).
    Statistics per tensor, or per output channel (last axis) when `per_channel`.
    """
    if scale not in TERNARY_SCALES:
        raise ValueError(f"ternary scale={scale!r}; choose one of {TERNARY_SCALES}")
    w = tf.convert_to_tensor(w)
    axes = _axes(w, per_channel)
    a = tf.abs(w)
    delta = 0.7 * tf.reduce_mean(a, axis=axes, keepdims=True)
    mask = tf.cast(a >= delta, w.dtype)
    kept_sum = tf.reduce_sum(a * mask, axis=axes, keepdims=True)
    if scale == "reference":
        n = tf.cast(tf.reduce_prod(tf.gather(tf.shape(w), axes)), w.dtype)
        s = kept_sum / n
    else:
        s = tf.math.divide_no_nan(kept_sum, tf.reduce_sum(mask, axis=axes, keepdims=True))
    return s * mask * _sign(w)


def ternary_twn(w, per_channel=False):
    """Ternary with the TWN scale: `ternary(w, scale="twn")`."""
    return ternary(w, scale="twn", per_channel=per_channel)


def _check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits={bits!r}; k-bit quantization needs an integer 2 <= bits <= 16")


def kbit(w, bits=4, per_channel=False):
    """k-bit symmetric weights with a least-squares scale (2^k - 1 levels).

    delta = max|w| / (2^k - 1),
    q = clip(round(|w| / (2 delta)), 0, 2^(k-1) - 1)   (integer level, round half to even),
    alpha = <|w|, q> / <q, q>   (alpha = 0 where q is 0 everywhere),
    Q(w) = alpha * q * sign(w).
    For k = 4: 15 symmetric levels {-7..7} * alpha. Statistics per tensor, or per
    output channel (last axis) when `per_channel`.
    """
    _check_bits(bits)
    w = tf.convert_to_tensor(w)
    axes = _axes(w, per_channel)
    a = tf.abs(w)
    delta = tf.reduce_max(a, axis=axes, keepdims=True) / float(2**bits - 1)
    q = tf.clip_by_value(tf.round(tf.math.divide_no_nan(a, 2.0 * delta)),
                         0.0, float(2**(bits - 1) - 1))
    alpha = tf.math.divide_no_nan(tf.reduce_sum(a * q, axis=axes, keepdims=True),
                                  tf.reduce_sum(q * q, axis=axes, keepdims=True))
    return alpha * q * _sign(w)


def kbit4(w, per_channel=False):
    """4-bit weights: `kbit(w, bits=4)`, 15 levels."""
    return kbit(w, bits=4, per_channel=per_channel)


# Precision names of config.quant.precision -> quantizer functions.
QUANTIZERS = {
        "binary": binary,
        "ternary": ternary,
        "ternary_twn": ternary_twn,
        "4bit": kbit4,
        "kbit": kbit,
}


def num_levels(precision, bits=4):
    """Number of distinct values Q(w) takes per scale group (2, 3, or 2^k - 1)."""
    if precision == "binary":
        return 2
    if precision in ("ternary", "ternary_twn"):
        return 3
    if precision == "4bit":
        return 15
    if precision == "kbit":
        _check_bits(bits)
        return 2**bits - 1
    raise ValueError(f"precision={precision!r}; choose one of {tuple(QUANTIZERS)}")


def get(precision, bits=4, per_channel=False):
    """Returns the callable w -> Q(w) for a config precision name.

    `bits` is used by "kbit" only; "4bit" is always 4 bits (a different `bits`
    with "4bit" is an error: use precision "kbit").
    """
    if precision not in QUANTIZERS:
        raise ValueError(
                f"precision={precision!r} has no quantizer; choose one of {tuple(QUANTIZERS)}")
    if not isinstance(per_channel, bool):
        raise ValueError(f"per_channel={per_channel!r}; must be True or False")
    if precision == "kbit":
        _check_bits(bits)
        return functools.partial(kbit, bits=bits, per_channel=per_channel)
    if precision == "4bit" and bits != 4:
        raise ValueError(f"precision='4bit' with bits={bits}; use precision='kbit' for "
                         f"{bits}-bit weights, or bits=4")
    return functools.partial(QUANTIZERS[precision], per_channel=per_channel)
