"""Does this TensorFlow's oneDNN corrupt the heap with one thread? (workers.thread_floor)

Run by hand (not a test; a bad case aborts its process):
  .venv/bin/python bench/onednn_thread_floor.py [--channels=2,4,6,8,12,16]
      [--threads=1,2] [--isa=AVX2] [--steps=200]
Each case is a fresh process (oneDNN reads its settings once) with
TF_ENABLE_ONEDNN_OPTS=1, glibc's malloc checks (MALLOC_CHECK_=3, with
libc_malloc_debug.so preloaded where it exists, as glibc >= 2.34 needs) and,
with --isa, ONEDNN_MAX_CPU_ISA (AVX2 runs oneDNN's AVX2 kernels on an AVX-512
CPU). It takes `steps` kernel gradients of a 1x1 stride-2
convolution (a ResNet shortcut: batch 64, 28x28 -> 14x14, 2x the channels) and
prints "ok" or how the process ended (a case that hangs is stopped after
--timeout_s). On 2026-12-07, TensorFlow 2.21: with --isa=AVX2 and 1 thread, 2,
4 and 6 input channels crashed every time (glibc abort or segfault) and 8-24
channels did not; 2-6 channels at 2 threads did not, nor did the AVX-512 kernels
(2-24 channels at 1 thread).
"""

import os
import signal
import subprocess
import sys

from absl import app, flags

CHANNELS = flags.DEFINE_list("channels", ["2", "4", "6", "8", "12", "16"],
                             "Input channels of the 1x1 stride-2 convolution.")
THREADS = flags.DEFINE_list("threads", ["1", "2"], "TensorFlow intra/inter-op threads.")
ISA = flags.DEFINE_string("isa", "", "ONEDNN_MAX_CPU_ISA (e.g. AVX2); '' = the CPU's best.")
STEPS = flags.DEFINE_integer("steps", 200, "Gradient steps per case.")
TIMEOUT_S = flags.DEFINE_integer("timeout_s", 300, "Seconds before a case counts as hung.")
_MALLOC_DEBUG = ("/lib/x86_64-linux-gnu/libc_malloc_debug.so.0",
                 "/usr/lib64/libc_malloc_debug.so.0")

_CASE = """
import sys
import tensorflow as tf
threads, channels, steps = (int(a) for a in sys.argv[1:4])
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(threads)
x = tf.random.stateless_normal((64, 28, 28, channels), seed=(0, 0))
kernel = tf.Variable(tf.random.stateless_normal((1, 1, channels, 2 * channels), seed=(0, 1)))

@tf.function
def step():
    with tf.GradientTape() as tape:
        y = tf.nn.conv2d(x, kernel, strides=2, padding="SAME")
        loss = tf.reduce_sum(y * y)
    return tape.gradient(loss, kernel)

for _ in range(steps):
    g = step()
print("ok", float(tf.reduce_sum(g)))
"""


def _ending(proc):
    if proc.returncode == 0:
        return "ok"
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        lines = [l for l in proc.stderr.splitlines() if "malloc" in l or "corrupt" in l
                 or "free" in l]
        return f"{name} {lines[-1].strip() if lines else ''}".strip()
    return f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"


def main(argv):
    del argv
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", MALLOC_CHECK_="3", TF_CPP_MIN_LOG_LEVEL="2")
    preload = [p for p in _MALLOC_DEBUG if os.path.exists(p)]
    if preload:
        env["LD_PRELOAD"] = preload[0]
    if ISA.value:
        env["ONEDNN_MAX_CPU_ISA"] = ISA.value
    print(f"oneDNN ISA: {ISA.value or 'the CPU best'}; {STEPS.value} steps per case; "
          f"malloc checks {'with ' + preload[0] if preload else 'MALLOC_CHECK_ only'}")
    print("| threads | input channels | result |\n|---|---|---|")
    for threads in THREADS.value:
        for channels in CHANNELS.value:
            try:
                proc = subprocess.run([sys.executable, "-c", _CASE, threads, channels,
                                       str(STEPS.value)], env=env, capture_output=True,
                                      text=True, check=False, timeout=TIMEOUT_S.value)
                ending = _ending(proc)
            except subprocess.TimeoutExpired:
                ending = f"hung (stopped after {TIMEOUT_S.value} s)"
            print(f"| {threads} | {channels} | {ending} |", flush=True)


if __name__ == "__main__":
    app.run(main)
