"""Cost of ways to draw the Feynman-Kac noise, per element, as ratios. Run by hand:

    .venv/bin/python bench/noise_cost.py [--batch 128] [--runs 3] [--rounds 5]
        [--dtype bfloat16] [--only layer,identity]

Each candidate computes y = x + sigma * std(x) * n (std by tf.math.reduce_std,
gradients by autodiff, as the layer did before its hand-written gradient) on the nine residual outputs of
a ResNet20 on 32x32 inputs (batch x 32x32x16, 16x16x32, 8x8x64, three each), in one
tf.function; "fwd" times y, "fwd+bwd" times y and dL/dx for L = sum(y * g). The
table gives ns per element and the ratio to the exact `tf.random.normal` path.
The "layer" rows are brkeras' FeynmanKacNoise map itself (nn/layers.py: float32
moments, Box-Muller draws, the hand-written gradient) by TF ops and by the fused
kernels of nn/kernels (when built: `python -m brkeras.nn.kernels`), to compare with the
autodiff rows of the same draw ("pool=8 (default)", "normal (exact, pool=1)"), and
"layer pool=8, XLA-fused" the same map with all but the draws compiled by XLA
into two fusions (forward, pullback), to see what fusing the passes would buy.
"""

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from brkeras.nn import kernels, layers  # noqa: E402
from brkeras._keras import tf  # noqa: E402

SIGMA = 0.1


def _seed():
    return tf.random.uniform([2], maxval=2 ** 30, dtype=tf.int32)


def stateless(alg):
    return lambda shape, scale: scale * tf.random.stateless_normal(shape, _seed(), alg=alg)


def generator_normal():
    gen = tf.random.Generator.from_seed(0)
    return lambda shape, scale: scale * gen.normal(shape)


def float16_normal(shape, scale):
    return scale * tf.cast(tf.random.normal(shape, dtype=tf.float16), tf.float32)


def box_muller(shape, scale):
    """n = sqrt(-2 ln u1) * (cos, sin)(2 pi u2): two normals per two uniforms."""
    n = tf.reduce_prod(shape)
    half = (n + 1) // 2
    u1 = 1.0 - tf.random.uniform([half])  # (0, 1]
    u2 = tf.random.uniform([half])
    r = tf.sqrt(-2.0 * tf.math.log(u1))
    t = 2.0 * math.pi * u2
    z = tf.concat([r * tf.cos(t), r * tf.sin(t)], 0)[:n]
    return scale * tf.reshape(z, shape)


def pool_xor(pool):
    """Pooled signs by XOR of the float sign bit (TF-only: LeftShift/int RNG aren't TFLite builtins)."""
    def fn(shape, scale):
        n = tf.reduce_prod(shape)
        m = (n + 32 * pool - 1) // (32 * pool)
        z = tf.random.normal(tf.stack([1, m * 32]))
        w = tf.random.stateless_uniform(tf.stack([pool, m, 1]), _seed(), minval=None,
                                        maxval=None, dtype=tf.int32)  # all 32 bits
        bit = tf.bitwise.left_shift(tf.bitwise.right_shift(w, tf.range(32)), 31)
        noise = tf.bitcast(tf.bitwise.bitwise_xor(tf.bitcast(z, tf.int32),
                                                  tf.reshape(bit, [pool, -1])), tf.float32)
        return scale * tf.reshape(tf.reshape(noise, [-1])[:n], shape)
    return fn


def pool_bits(pool):
    """Pooled normals with per-element independent signs: 16 bits per uniform float."""
    def fn(shape, scale):
        n = tf.reduce_prod(shape)
        m = (n + pool * 16 - 1) // (pool * 16)
        z = scale * tf.random.normal(tf.stack([1, m * 16]))
        w = tf.cast(tf.random.uniform(tf.stack([pool, m, 1])) * 65536.0, tf.int32)
        bits = tf.math.floormod(tf.bitwise.right_shift(w, tf.range(16)), 2)
        noise = tf.where(tf.reshape(tf.equal(bits, 0), [pool, -1]), z, -z)
        return tf.reshape(tf.reshape(noise, [-1])[:n], shape)
    return fn


def candidates():
    c = {"tf.random.normal (reference)": lambda shape, scale: scale * tf.random.normal(shape),
         "normal (exact, pool=1)": lambda shape, scale: layers.scaled_noise(shape, scale, 1)}
    for alg in ("philox", "threefry", "auto_select"):
        c[f"stateless_normal {alg}"] = stateless(alg)
    c["Generator.normal"] = generator_normal()
    c["float16 normal, cast"] = float16_normal
    c["Box-Muller from uniform"] = box_muller
    for k in (2, 4, 8, 16):
        name = f"pool={k} (default)" if k == 8 else f"pool={k}"
        c[name] = (lambda k: lambda shape, scale: layers.scaled_noise(shape, scale, k))(k)
    c["pool=8, bit signs, select"] = pool_bits(8)
    c["pool=8, bit signs, XOR"] = pool_xor(8)
    c["std only, no draw"] = lambda shape, scale: scale * tf.ones(shape)
    return c


def _pooled_noise(x, z, rows, cols):
    """(p, mean, var, N): p = sigma std(x) n with the layer's pooled n from given draws."""
    mean, var, n = layers.moments(x)
    n_pool = layers._pooled(z, rows, cols, tf.size(x))  # pylint: disable=protected-access
    return SIGMA * tf.sqrt(var) * tf.reshape(n_pool, tf.shape(x)), mean, var, n


@tf.function(jit_compile=True)
def _xla_forward(x, z, rows, cols):
    return x + _pooled_noise(x, z, rows, cols)[0]


@tf.function(jit_compile=True)
def _xla_backward(g, x, z, rows, cols):
    p, mean, var, n = _pooled_noise(x, z, rows, cols)  # recomputed in the fusion, not stored
    return g + tf.math.divide_no_nan(tf.reduce_sum(g * p), n * var) * (x - mean)


def xla_fused(pool):
    """The layer's map with the draws in TF kernels and everything else (moments,
    the pooled product, x + p and the hand-written pullback) in two XLA fusions:
    what a fused kernel would save, short of writing one (float32 inside, as the layer)."""
    def fn(x):
        @tf.custom_gradient
        def noisy(x):
            q, r = layers.pool_layout(tf.size(x), pool)
            z = tf.reshape(layers.standard_normal(q * r), tf.stack([1, q, r]))
            rows = layers.random_signs(tf.stack([pool, q, 1]))
            cols = layers.random_signs(tf.stack([pool, 1, r]))
            xf = tf.cast(x, tf.float32)

            def grad(g):
                return tf.cast(_xla_backward(tf.cast(g, tf.float32), xf, z, rows, cols), g.dtype)
            return tf.cast(_xla_forward(xf, z, rows, cols), x.dtype), grad
        return noisy(x)
    return fn


def tf_ops_only(fmap):
    """fmap traced with the fused kernels off (nn/kernels.disabled): the TF-op path."""
    def fn(x):
        with kernels.disabled():
            return fmap(x)
    return fn


def layer_candidates():
    """brkeras' layer map by TF ops (its own std and gradient) and by the fused
    kernels (nn/kernels, when built), the TF-op map's XLA-fused twin, and the floor:
    no noise (y = x)."""
    layer = {k: (lambda k: lambda x: layers.feynman_kac_noise(x, SIGMA, k))(k) for k in (1, 8)}
    c = {"layer pool=1 (TF ops)": tf_ops_only(layer[1]),
         "layer pool=8 (TF ops)": tf_ops_only(layer[8])}
    if kernels.fk_noise_ops() is not None:
        c["layer pool=1 (fused kernel)"] = layer[1]
        c["layer pool=8 (fused kernel)"] = layer[8]
    c["layer pool=8, XLA-fused"] = xla_fused(8)
    c["identity (floor)"] = lambda x: x
    return c


def timed(fn, runs):
    t = time.perf_counter()
    for _ in range(runs):
        out = fn()
    tf.nest.map_structure(lambda v: v.numpy(), out)
    return (time.perf_counter() - t) / runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timings, best kept")
    parser.add_argument("--only", default="", help="comma-separated substrings of candidate names")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of the residual tensors (bfloat16: a mixed policy's layers)")
    args = parser.parse_args()
    shapes = [[args.batch, 32, 32, 16]] * 3 + [[args.batch, 16, 16, 32]] * 3 + [[args.batch, 8, 8, 64]] * 3
    xs = [tf.cast(tf.random.normal(s), args.dtype) for s in shapes]
    gs = [tf.cast(tf.random.normal(s), args.dtype) for s in shapes]
    elems = sum(math.prod(s) for s in shapes)

    maps = {name: (lambda noise: lambda x: x + noise(tf.shape(x), SIGMA * tf.math.reduce_std(x)))(noise)
            for name, noise in candidates().items()}
    maps.update(layer_candidates())
    if args.only:
        maps = {k: v for k, v in maps.items() if any(o in k for o in args.only.split(","))}
    fns = {}
    for name, fmap in maps.items():
        def forward(fmap=fmap):
            return [fmap(x) for x in xs]

        def forward_backward(fmap=fmap):
            with tf.GradientTape() as tape:
                tape.watch(xs)
                ys = [fmap(x) for x in xs]
                loss = tf.add_n([tf.reduce_sum(y * g) for y, g in zip(ys, gs)])
            return ys, tape.gradient(loss, xs)

        try:
            pair = (tf.function(forward), tf.function(forward_backward))
            timed(pair[0], 1), timed(pair[1], 1)  # trace and warm up
            fns[name] = pair
        except (tf.errors.OpError, ValueError, TypeError) as e:  # e.g. threefry has no CPU kernel
            fns[name] = str(e).splitlines()[0][:60]

    # Interleaved rounds, best of each: the machine is shared, so the minimum is
    # the least disturbed figure.
    best = {name: [math.inf, math.inf] for name, v in fns.items() if not isinstance(v, str)}
    for _ in range(args.rounds):
        for name, b in best.items():
            b[0] = min(b[0], timed(fns[name][0], args.runs))
            b[1] = min(b[1], timed(fns[name][1], args.runs))
    rows = [(name, None, None, v) if isinstance(v, str)
            else (name, best[name][0] / elems * 1e9, best[name][1] / elems * 1e9, "")
            for name, v in fns.items()]

    # The reference is the first row that ran (the exact path, unless --only or the
    # dtype left it out).
    ref = next((r for r in rows if r[1] is not None), None)
    if ref is None:
        raise SystemExit("no candidate ran: " + "; ".join(f"{n}: {e}" for n, _, _, e in rows))
    base_f, base_fb = ref[1], ref[2]
    print(f"{elems / 1e6:.2f}M {args.dtype} noise elements per forward (ResNet20, batch {args.batch}), "
          f"best of {args.rounds} x {args.runs} calls, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"ratios to {ref[0]!r}")
    print(f"{'candidate':30s} {'fwd ns/el':>10s} {'ratio':>6s} {'f+b ns/el':>10s} {'ratio':>6s}")
    for name, f, fb, err in rows:
        if f is None:
            print(f"{name:30s} unavailable: {err}")
        else:
            print(f"{name:30s} {f:10.3f} {f / base_f:6.2f} {fb:10.3f} {fb / base_fb:6.2f}")


if __name__ == "__main__":
    main()
