"""Median training-step time: plain ResNet20 vs EnResNet20 (noise) vs + BR ternary.

Run by hand (not a test), on an otherwise idle machine:
  .venv/bin/python bench/step_time.py [--steps=6] [--batch=128] [--depth=20]
Prints one table, measured in one run, with each variant's natural and PGD-10
step times and their ratios to the plain ResNet20. Goal (issue 3): the noise adds
at most 15% and Binary-Relax at most 10% to a PGD-10 step.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from brkeras.run import config as config_lib  # noqa: E402
from brkeras.robust import losses  # noqa: E402
from brkeras.train import adversarial_model
from brkeras.run import train as train_lib
from brkeras._keras import keras, tf  # noqa: E402

STEPS = flags.DEFINE_integer("steps", 6, "timed steps per cell (after 2 warm-up steps)")
BATCH = flags.DEFINE_integer("batch", 128, "batch size")
DEPTH = flags.DEFINE_integer("depth", 20, "ResNet depth")

VARIANTS = (
    ("ResNet20 (sigma 0)", dict(sigma=0.0), "float"),
    ("EnResNet20 exact noise (pool 1)", dict(sigma=0.1, noise_pool=1), "float"),
    ("EnResNet20 (default noise)", dict(sigma=0.1), "float"),
    ("EnResNet20 + BR ternary", dict(sigma=0.1), "ternary"),
)


def step_time(model_fields, precision, loss_name, steps, batch):
    c = config_lib.base_config()
    c.model.depth = DEPTH.value
    for k, v in model_fields.items():
        c.model[k] = v
    c.quant.precision = precision
    keras.utils.set_random_seed(0)
    net = train_lib.build_network(c, (32, 32, 3), 10)
    trainer = adversarial_model.AdversarialModel(net, losses.get(loss_name), eps=8 / 255,
                                        eps_iter=2 / 255, steps=10, weight_decay=5e-4)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(batch, 32, 32, 3)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, size=batch).astype(np.int32))
    step = tf.function(trainer.train_step)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        out = step((x, y))
        float(out["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(_):
    print(f"batch {BATCH.value}, ResNet{DEPTH.value}, 32x32x3, median of {STEPS.value} steps, "
          f"{os.cpu_count()} CPU cores, TF {tf.__version__}", flush=True)
    rows = []
    for name, fields, precision in VARIANTS:
        nat = step_time(fields, precision, "natural", STEPS.value, BATCH.value)
        adv = step_time(fields, precision, "pgd", STEPS.value, BATCH.value)
        rows.append((name, nat, adv))
        print(f"  measured {name}: natural {nat * 1e3:.0f} ms, PGD-10 {adv * 1e3:.0f} ms", flush=True)
    base_nat, base_adv = rows[0][1], rows[0][2]
    print()
    print("| variant | natural step (ms) | x plain | PGD-10 step (ms) | x plain |")
    print("|---|---|---|---|---|")
    for name, nat, adv in rows:
        print(f"| {name} | {nat * 1e3:.0f} | {nat / base_nat:.2f} | {adv * 1e3:.0f} | "
              f"{adv / base_adv:.2f} |")
    noise = rows[2][2] / rows[0][2] - 1
    br = rows[3][2] / rows[2][2] - 1
    print(f"\nPGD-10 step: noise adds {100 * noise:+.1f}% (goal <= 15%), Binary-Relax ternary "
          f"adds {100 * br:+.1f}% on top (goal <= 10%)")


if __name__ == "__main__":
    app.run(main)
