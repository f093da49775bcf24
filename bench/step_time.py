"""Median PGD-10 training-step time: brkeras vs a lean plain-TF loop, per dtype policy.

Run by hand (not a test):
  .venv/bin/python bench/step_time.py [--steps=3] [--batch=128] [--depth=20]
      [--width=16] [--input=32,32,3] [--policies=float32,auto] [--natural]
  (the default Fashion-MNIST model: --depth=8 --width=8 --input=28,28,1)
Prints one table, measured in one run, and the ratios that count. Every cell is
built and warmed up first, then the timed steps go round-robin over the cells
(one step of each in turn), so a change of machine load hits every cell alike;
the load average is printed at the start and the end, and CPU seconds beside
wall seconds (on a shared machine the CPU time of the process is the steadier
figure).

Cells, per policy (float32, mixed_bfloat16; "auto" resolves to one of them):
  brkeras  ResNet20 (sigma 0), EnResNet20 exact noise (pool 1), EnResNet20 with
           the default pooled noise (by the fused kernel of nn/kernels when built,
           and by TF ops beside it), + Binary-Relax ternary: `AdversarialModel`
           on `run.train.build_network`, PGD-10 (eps 8/255, steps 2/255), the
           train_step as a tf.function;
  lean     the same pre-activation ResNet20 written here in plain TF (tf.nn.conv2d,
           FusedBatchNormV3, a hand-written PGD-10 and SGD-Nesterov, no brkeras
           code), without noise and with exact noise x + 0.1 std(x) N(0, 1)
           (tf.math.reduce_std, tf.random.normal, autodiff).
Bars (issue 11): the noise adds <= 15% to the same-policy plain step; the
EnResNet20 step under the default policy ("auto") is <= 0.6x the lean float32
loop with exact noise.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from brkeras.deploy import latency  # noqa: E402
from brkeras.nn import kernels  # noqa: E402
from brkeras.robust import losses  # noqa: E402
from brkeras.run import config as config_lib  # noqa: E402
from brkeras.run import train as train_lib  # noqa: E402
from brkeras.train import adversarial_model  # noqa: E402
from brkeras.train import precision  # noqa: E402
from brkeras._keras import keras, tf  # noqa: E402

STEPS = flags.DEFINE_integer("steps", 3, "timed steps per cell (after 2 warm-up steps)")
BATCH = flags.DEFINE_integer("batch", 128, "batch size")
DEPTH = flags.DEFINE_integer("depth", 20, "ResNet depth")
WIDTH = flags.DEFINE_integer("width", 16, "channels of the first stage (x2 per stage)")
INPUT = flags.DEFINE_list("input", ["32", "32", "3"], "input height, width, channels")
POLICIES = flags.DEFINE_list("policies", ["float32", "auto"],
                             "dtype policies (precision.POLICIES); auto is resolved and "
                             "duplicates dropped")
NATURAL = flags.DEFINE_bool("natural", False, "also time natural (no attack) steps")
LEAN = flags.DEFINE_bool("lean", True, "time the lean plain-TF reference loop")

EPS, ALPHA, K = 8 / 255, 2 / 255, 10

VARIANTS = (  # name, config.model fields, precision, fused noise kernel (if built)
    ("ResNet20 (sigma 0)", dict(sigma=0.0), "float", True),
    ("EnResNet20 exact noise (pool 1)", dict(sigma=0.1, noise_pool=1), "float", True),
    ("EnResNet20 (default noise)", dict(sigma=0.1), "float", True),
    ("EnResNet20 (default noise, TF ops)", dict(sigma=0.1), "float", False),
    ("EnResNet20 + BR ternary", dict(sigma=0.1), "ternary", True),
)


def _input_shape():
    shape = tuple(int(v) for v in INPUT.value)
    if len(shape) != 3 or min(shape) < 1:
        raise app.UsageError(f"--input={','.join(INPUT.value)}: give height,width,channels")
    return shape


def _batch(batch):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(batch,) + _input_shape()).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, size=batch).astype(np.int32))
    return x, y


def brkeras_step(model_fields, quant, loss_name, policy, batch, fused=True):
    """A callable running one brkeras train step (a tf.function of AdversarialModel.train_step);
    fused=False traces the noise layers as TF ops (nn/kernels.disabled)."""
    c = config_lib.base_config()
    c.model.depth = DEPTH.value
    c.model.width = WIDTH.value
    for k, v in model_fields.items():
        c.model[k] = v
    c.quant.precision = quant
    keras.utils.set_random_seed(0)
    with precision.policy_scope(policy):  # as run.train.train applies it
        net = train_lib.build_network(c, _input_shape(), 10)
    trainer = adversarial_model.AdversarialModel(net, losses.get(loss_name), eps=EPS,
                                                 eps_iter=ALPHA, steps=K, weight_decay=5e-4)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True))
    step = tf.function(trainer.train_step)
    data = _batch(batch)
    if fused:
        return lambda: float(step(data)["loss"])

    def unfused():
        with kernels.disabled():  # traced at the first call
            return float(step(data)["loss"])
    return unfused


def lean_step(policy, sigma, batch, depth, natural=False):
    """The lean reference: pre-activation ResNet-depth, PGD-10 + SGD-Nesterov, plain TF."""
    dtype = tf.bfloat16 if policy == precision.MIXED else tf.float32
    rng = np.random.default_rng(0)
    train_vars = []

    def var(shape, std):
        v = tf.Variable(rng.normal(0, std, shape).astype(np.float32))
        train_vars.append(v)
        return v

    def bn(c):
        gamma, beta = tf.Variable(np.ones(c, np.float32)), tf.Variable(np.zeros(c, np.float32))
        train_vars.extend([gamma, beta])
        return gamma, beta

    n, w = (depth - 2) // 6, WIDTH.value
    stem = var([3, 3, _input_shape()[2], w], np.sqrt(2 / (9 * w)))
    blocks, cin = [], w
    for s in range(3):
        c = w * 2 ** s
        for b in range(n):
            stride = 2 if s > 0 and b == 0 else 1
            blk = dict(stride=stride, bn1=bn(cin), conv1=var([3, 3, cin, c], np.sqrt(2 / (9 * c))),
                       bn2=bn(c), conv2=var([3, 3, c, c], np.sqrt(2 / (9 * c))))
            if stride != 1 or cin != c:
                blk["short"] = var([1, 1, cin, c], np.sqrt(2 / c))
            blocks.append(blk)
            cin = c
    bn_final = bn(cin)
    dense = var([cin, 10], 1 / np.sqrt(cin))
    bias = tf.Variable(np.zeros(10, np.float32))
    train_vars.append(bias)
    moms = [tf.Variable(tf.zeros_like(v)) for v in train_vars]

    def cast(v):
        return tf.cast(v, dtype)

    def batchnorm(h, params):
        c = params[0].shape[0]
        y, *_ = tf.raw_ops.FusedBatchNormV3(
                x=h, scale=params[0], offset=params[1], mean=tf.zeros([c]), variance=tf.ones([c]),
                epsilon=1e-5, exponential_avg_factor=1.0, is_training=True)
        return y

    def noise(h):
        if sigma == 0:
            return h
        std = tf.math.reduce_std(tf.cast(h, tf.float32))
        return h + tf.cast(sigma * std * tf.random.normal(tf.shape(h)), h.dtype)

    def net(x):
        h = tf.nn.conv2d(cast(x), cast(stem), 1, "SAME")
        for blk in blocks:
            o = tf.nn.relu(batchnorm(h, blk["bn1"]))
            sc = tf.nn.conv2d(o, cast(blk["short"]), blk["stride"], "SAME") if "short" in blk else h
            o = tf.nn.conv2d(o, cast(blk["conv1"]), blk["stride"], "SAME")
            o = tf.nn.relu(batchnorm(o, blk["bn2"]))
            o = tf.nn.conv2d(o, cast(blk["conv2"]), 1, "SAME")
            h = noise(o + sc)
        h = tf.reduce_mean(tf.nn.relu(batchnorm(h, bn_final)), [1, 2])
        return tf.cast(tf.matmul(h, cast(dense)) + cast(bias), tf.float32)

    def ce(x, y):
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=net(x)))

    @tf.function
    def step(x, y):
        xa = x
        if not natural:
            xa = tf.clip_by_value(x + tf.random.uniform(tf.shape(x), -EPS, EPS), 0.0, 1.0)
            for _ in tf.range(K):
                with tf.GradientTape() as tape:
                    tape.watch(xa)
                    loss = ce(xa, y)
                g = tape.gradient(loss, xa)
                xa = tf.clip_by_value(x + tf.clip_by_value(xa + ALPHA * tf.sign(g) - x, -EPS, EPS),
                                      0.0, 1.0)
            xa = tf.stop_gradient(xa)
        with tf.GradientTape() as tape:
            loss = ce(xa, y)
        grads = tape.gradient(loss, train_vars)
        for v, m, g in zip(train_vars, moms, grads):
            g = g + 5e-4 * v
            m.assign(0.9 * m - 0.1 * g)
            v.assign_add(0.9 * m - 0.1 * g)  # Nesterov, as Keras' SGD
        return loss

    x, y = _batch(batch)
    return lambda: float(step(x, y))


def _label(name):
    """A cell's name with the depth actually timed (the cells are named for ResNet20)."""
    return name.replace("ResNet20", f"ResNet{DEPTH.value}")


def _machine():
    flags_ = precision.cpu_flags()
    bf16 = [f for f in precision.BF16_CPU_FLAGS if f in flags_]
    return (f"{latency.host_info()['cpu']}, {os.cpu_count()} CPU cores, "
            f"AVX-512 {'yes' if 'avx512f' in flags_ else 'no'}, "
            f"bf16 flags {bf16 or 'none'}, oneDNN {precision.onednn_enabled()}, "
            f"TF {tf.__version__}")


def _load():
    return "load average " + ", ".join(f"{v:.1f}" for v in os.getloadavg())


def main(_):
    tf.get_logger().setLevel("ERROR")  # one tf.function per cell: no retracing warnings
    policies = []
    for p in POLICIES.value:
        name = precision.resolve(p, width=WIDTH.value)
        if name not in policies:
            policies.append(name)
    default = precision.resolve("auto", width=WIDTH.value)
    kernel_state = ("the fused noise kernel" if kernels.fk_noise_ops() is not None else
                    f"TF ops: {kernels.unavailable_reason()}")
    print(f"batch {BATCH.value}, ResNet{DEPTH.value} width {WIDTH.value}, "
          f"{'x'.join(map(str, _input_shape()))}, PGD-{K}, median of "
          f"{STEPS.value} round-robin steps; {_machine()}; auto -> {default}", flush=True)
    loss_names = ["pgd"] + (["natural"] if NATURAL.value else [])
    cells = {}  # (kind, name, policy, loss) -> step callable
    for policy in policies:
        for loss_name in loss_names:
            for name, fields, quant, fused in VARIANTS:
                if not fused and kernels.fk_noise_ops() is None:
                    continue  # no kernel built: the default rows are the TF-op path already
                cells[("brkeras", name, policy, loss_name)] = brkeras_step(
                        fields, quant, loss_name, policy, BATCH.value, fused)
            if LEAN.value:
                for name, sigma in (("ResNet20 (sigma 0)", 0.0),
                                    ("EnResNet20 exact noise (pool 1)", 0.1)):
                    cells[("lean", name, policy, loss_name)] = lean_step(
                            policy, sigma, BATCH.value, DEPTH.value, loss_name == "natural")
    print(f"  built {len(cells)} cells; {_load()}", flush=True)
    for key, fn in cells.items():  # trace and warm up
        fn(), fn()
    print(f"  warmed up; {_load()}", flush=True)
    wall = {k: [] for k in cells}
    cpu = {k: [] for k in cells}
    for _ in range(STEPS.value):
        for key, fn in cells.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    print(f"  timed; {_load()}\n", flush=True)
    med = {k: (float(np.median(wall[k])), float(np.median(cpu[k]))) for k in cells}

    for loss_name in loss_names:
        step_name = f"PGD-{K}" if loss_name == "pgd" else "natural"
        print(f"| {step_name} step | policy | wall (s) | CPU (s) | x same-policy plain | "
              "x lean same policy | x lean float32 exact |")
        print("|---|---|---|---|---|---|---|")
        ref = med.get(("lean", "EnResNet20 exact noise (pool 1)", "float32", loss_name))
        for kind in ("brkeras", "lean") if LEAN.value else ("brkeras",):
            for policy in policies:
                plain = med[("brkeras" if kind == "brkeras" else "lean", "ResNet20 (sigma 0)",
                             policy, loss_name)]
                for key, (w, c) in med.items():
                    if key[0] != kind or key[2] != policy or key[3] != loss_name:
                        continue
                    lean = med.get(("lean", key[1], policy, loss_name))
                    cols = [f"{w / plain[0]:.2f}",
                            f"{w / lean[0]:.2f}" if lean and kind == "brkeras" else "",
                            f"{w / ref[0]:.2f}" if ref else ""]
                    print(f"| {kind} {_label(key[1])} | {policy} | {w:.2f} | {c:.2f} | " + " | ".join(cols) + " |")
        print()
        for policy in policies:
            plain = med[("brkeras", "ResNet20 (sigma 0)", policy, loss_name)]
            noisy = med[("brkeras", "EnResNet20 (default noise)", policy, loss_name)]
            exact = med[("brkeras", "EnResNet20 exact noise (pool 1)", policy, loss_name)]
            br = med[("brkeras", "EnResNet20 + BR ternary", policy, loss_name)]
            tf_ops = med.get(("brkeras", "EnResNet20 (default noise, TF ops)", policy, loss_name))
            print(f"{step_name}, {policy}: default noise adds {100 * (noisy[0] / plain[0] - 1):+.1f}% "
                  f"wall / {100 * (noisy[1] / plain[1] - 1):+.1f}% CPU (goal <= 15%)"
                  + (f" with {kernel_state}; by TF ops {100 * (tf_ops[0] / plain[0] - 1):+.1f}% "
                     f"wall / {100 * (tf_ops[1] / plain[1] - 1):+.1f}% CPU" if tf_ops else
                     f" ({kernel_state})")
                  + f"; exact noise {100 * (exact[0] / plain[0] - 1):+.1f}% wall; BR ternary "
                  f"{100 * (br[0] / noisy[0] - 1):+.1f}% on top")
            lean = med.get(("lean", "ResNet20 (sigma 0)", policy, loss_name))
            if lean:
                print(f"{step_name}, {policy}: brkeras plain / lean plain = {plain[0] / lean[0]:.2f} "
                      f"wall, {plain[1] / lean[1]:.2f} CPU")
        if ref and default in policies:
            noisy = med[("brkeras", "EnResNet20 (default noise)", default, loss_name)]
            print(f"{step_name}: {_label('EnResNet20')} (default noise, policy auto = {default}) / lean float32 "
                  f"exact noise = {noisy[0] / ref[0]:.2f} wall, {noisy[1] / ref[1]:.2f} CPU "
                  "(goal <= 0.6)")
        print()


if __name__ == "__main__":
    app.run(main)
