"""Time of a run's robust evaluation at several attack batch sizes, alternating. Run by hand.

  .venv/bin/python bench/eval_time.py --workdir=runs/pipeline/float_tradeoff \\
      [--batch_sizes=200,500,1000] [--rounds=2]

Loads the trained model of `--workdir` once and runs `run.evaluate.evaluate_arrays`
(what `brkeras evaluate` runs in one process, eval.shards=1; its shards are
run/eval_shards.py) with that run's config.eval (the attacks, draws and examples of `brkeras evaluate`),
overriding only eval.batch_size, the batch sizes in turn, `--rounds` times, so a
change of the machine's speed hits every size alike. Round 1 includes the tracing
of every attack. Prints seconds per round and the worst-case and EOT-PGD-20
accuracies (which differ between sizes only by the seeded noise draws of each
batch). Writes nothing. Say the machine and its load next to the numbers you quote.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from brkeras.deploy.latency import host_info  # noqa: E402
from brkeras.run import evaluate as evaluate_lib  # noqa: E402
from brkeras.run import train as train_lib  # noqa: E402
from brkeras.run import workdir as workdir_lib  # noqa: E402
from brkeras.train import precision  # noqa: E402

WORKDIR = flags.DEFINE_string("workdir", None, "a trained run's work dir", required=True)
BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["200", "500", "1000"], "eval.batch_size values")
ROUNDS = flags.DEFINE_integer("rounds", 2, "alternating rounds over the batch sizes")


def evaluate_once(net, x, y, config, batch_size):
    """Seconds, worst case and EOT-PGD-20 (expected) of one evaluation at `batch_size`."""
    config = config.copy_and_resolve_references()
    config.eval.batch_size = batch_size
    t0 = time.perf_counter()
    res, _ = evaluate_lib.evaluate_arrays(net, x, y, config, verbose=0)
    eot = (res["attacks"].get("pgd20") or {}).get("eot") or {}
    return time.perf_counter() - t0, res["worst_case"]["expected"], eot.get("expected")


def main(argv):
    del argv
    sizes = [int(s) for s in BATCH_SIZES.value]
    if not sizes or min(sizes) < 1 or ROUNDS.value < 1:
        raise app.UsageError("--batch_sizes takes integers >= 1 and --rounds >= 1")
    config = workdir_lib.load_config(WORKDIR.value)
    evaluate_lib.check_eval_config(config.eval)
    net = train_lib.load(WORKDIR.value)
    x, y = evaluate_lib.eval_images(config)
    h = host_info()
    print(f"# {WORKDIR.value}: {len(x)} examples; {h['cpu']}, {h['cpu_count']} cores, "
          f"oneDNN {precision.onednn_enabled()}, load {os.getloadavg()[0]:.2f}", flush=True)
    times = {b: [] for b in sizes}
    print("| round | batch | s | worst case | PGD-20 EOT |\n|---:|---:|---:|---:|---:|")
    for r in range(1, ROUNDS.value + 1):
        for b in sizes:
            dt, worst, eot = evaluate_once(net, x, y, config, b)
            times[b].append(dt)
            print(f"| {r} | {b} | {dt:.1f} | {worst:.3f} | "
                  f"{'-' if eot is None else f'{eot:.3f}'} |", flush=True)
    first = sizes[0]
    later = (lambda t: t[1:] or t)  # round 1 traces every attack
    print(f"\nmedian s after round 1 (x batch {first}): " + ", ".join(
        f"{b}: {statistics.median(later(times[b])):.1f} "
        f"({statistics.median(later(times[first])) / statistics.median(later(times[b])):.2f}x)"
        for b in sizes))
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    app.run(main)
