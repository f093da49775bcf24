"""Training throughput of one process against two side by side (pipeline.workers).

Run by hand (not a test):
  .venv/bin/python bench/worker_threads.py [--rounds=2] [--steps=60]
      [--config=configs/fashion_mnist_enresnet.py] [--arg=ternary,tradeoff]
Each process builds the config's model (`run.train.build_network`), compiles
`AdversarialModel.train_step` as a tf.function, warms up on one random batch of
`optim.batch_size` and prints its median step time. Per round, one after the
other: one process with every core as TensorFlow threads, two processes side by
side with one thread each, and two with half the cores each (`--pair_threads`).
Throughput is against the lone process of the same round (two processes do two
steps per step time). The load average is printed per round.
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from brkeras.run import workers  # noqa: E402  (no TensorFlow import)

ROUNDS = flags.DEFINE_integer("rounds", 2, "Alternating rounds.")
STEPS = flags.DEFINE_integer("steps", 60, "Timed steps per process.")
CONFIG = flags.DEFINE_string("config", "configs/fashion_mnist_enresnet.py", "Config file.")
ARG = flags.DEFINE_string("arg", "ternary,tradeoff", "The config's ARG (the model).")
PAIR_THREADS = flags.DEFINE_list("pair_threads", ["1", "2"], "Threads per process of the "
                                 "pairs, a row each (pipeline.workers gives cores / 2).")
CHILD_THREADS = flags.DEFINE_integer("child_threads", 0, "(internal) time one process.")


def _child():
    from brkeras._keras import keras, tf  # pylint: disable=g-import-not-at-top
    threads = CHILD_THREADS.value
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from brkeras.run import config as config_lib  # pylint: disable=g-import-not-at-top
    from brkeras.run import train as train_lib  # pylint: disable=g-import-not-at-top
    from brkeras.data import sources  # pylint: disable=g-import-not-at-top
    c = config_lib.from_file(CONFIG.value, ARG.value)
    keras.utils.set_random_seed(0)
    data = sources.info(c.data.name)
    shape = tuple(data.image_shape)
    net = train_lib.build_network(c, shape, data.num_classes)
    trainer = train_lib.make_trainer(c, net, steps_per_epoch=100)
    rng = np.random.default_rng(0)
    batch = (tf.constant(rng.random((c.optim.batch_size,) + shape, np.float32)),
             tf.constant(rng.integers(0, data.num_classes, c.optim.batch_size)))
    step = tf.function(trainer.train_step)
    for _ in range(5):
        step(batch)
    times = []
    for _ in range(STEPS.value):
        t = time.perf_counter()
        float(step(batch)["loss"])
        times.append(time.perf_counter() - t)
    print(f"{1000 * np.median(times):.1f}")


def _start(threads):
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), f"--child_threads={threads}",
         f"--steps={STEPS.value}", f"--config={CONFIG.value}", f"--arg={ARG.value}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ms(procs):
    """Waits for every process (so none outlives a failure); their median ms."""
    outputs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outputs):
        if p.returncode:
            raise SystemExit(f"a timing process exited with code {p.returncode}:\n"
                             + "\n".join(err.strip().splitlines()[-5:]))
    return [float(out.strip().splitlines()[-1]) for out, _ in outputs]


def main(argv):
    del argv
    if CHILD_THREADS.value:
        _child()
        return
    cores = workers.usable_cores()
    print(f"# {CONFIG.value}:{ARG.value}, {cores} cores, {STEPS.value} timed steps per process")
    print("| round | setup | ms per step (each process) | throughput vs alone |\n|---|---|---|---|")
    for r in range(1, ROUNDS.value + 1):
        print(f"# round {r}: load average "
              + ", ".join(f"{v:.1f}" for v in os.getloadavg()), flush=True)
        alone = _ms([_start(cores)])[0]
        print(f"| {r} | one process, {cores} threads | {alone:.1f} | 1.00 |", flush=True)
        for threads in PAIR_THREADS.value:
            pair = _ms([_start(int(threads)), _start(int(threads))])
            gain = sum(alone / ms for ms in pair)
            print(f"| {r} | two processes, {threads} thread(s) each | "
                  f"{' / '.join(f'{ms:.1f}' for ms in pair)} | {gain:.2f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
