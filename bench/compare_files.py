"""Latency of TFLite files side by side: alternating rounds in one process, with ratios.

Run by hand (not a test):
  .venv/bin/python bench/compare_files.py A.tflite B.tflite [...] [--threads=1] [--rounds=7]
      [--runs=100]

Each round times `runs` invokes of every file in turn (batch 1, LiteRT,
deploy.latency.alternating_times, as the pipeline's benchmarks), so a change of
the machine's speed during the run hits all files alike; the figure per file is
the median over all its timed invokes, and every file's ratio is given against
the first one. Say the machine
and its load next to the numbers you quote.
"""

import argparse
import os
import statistics

import numpy as np

from brkeras.deploy import cost
from brkeras.deploy.latency import alternating_times, host_info


def compare(paths, threads=1, rounds=7, runs=100, warmup=20):
    """{path: dict(median_ms, p90_ms, macs, bytes, zipped_bytes)} from alternating rounds
    (deploy.latency.alternating_times, as the pipeline's benchmarks)."""
    times = alternating_times(paths, (threads,), runs * rounds, rounds, warmup)
    out = {}
    for p in paths:
        with open(p, "rb") as f:
            b = f.read()
        t = times[(p, int(threads))]
        out[p] = dict(median_ms=statistics.median(t), p90_ms=float(np.percentile(t, 90)),
                      macs=cost.tflite_macs(b)["macs"], bytes=len(b),
                      zipped_bytes=cost.zipped_size(b))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=100)
    a = ap.parse_args()
    missing = [p for p in a.files if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"no such file: {missing}")
    res = compare(a.files, a.threads, a.rounds, a.runs)
    h = host_info()
    print(f"# {h['cpu']}, {h['cpu_count']} cores, LiteRT {h['litert']}, threads={a.threads}, "
          f"{a.rounds} alternating rounds x {a.runs} invokes, load {os.getloadavg()[0]:.2f}")
    base = res[a.files[0]]
    print("| file | median ms | p90 ms | x first (time) | MACs | x first (MACs) | KB | KB zipped |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for p in a.files:
        r = res[p]
        print(f"| {os.path.basename(os.path.dirname(os.path.dirname(p)))}/{os.path.basename(p)} "
              f"| {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {base['median_ms'] / r['median_ms']:.2f} "
              f"| {r['macs'] / 1e6:.2f}M | {base['macs'] / r['macs']:.2f} | {r['bytes'] / 1024:.1f} "
              f"| {r['zipped_bytes'] / 1024:.1f} |")


if __name__ == "__main__":
    main()
