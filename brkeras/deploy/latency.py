"""LiteRT latency of the exported .tflite files, on the host and (parsed) on Android.

Host timing: `ai_edge_litert.interpreter.Interpreter(model_path, num_threads=t)`,
batch 1, a fixed random input, `warmup` untimed invokes, then timed invokes
(time.perf_counter around invoke()); median and p90 of those times. Files are
timed side by side (`alternating_times`): the `runs` timed invokes of each file
and thread count are split over `rounds` rounds, and every round times all of
them in turn, so a change of the machine's speed during the benchmark (this
machine kind drifts by up to 2x) hits every file alike instead of whichever
file happened to run then.
ai-edge-litert also ships `python -m ai_edge_litert.tools.benchmark_litert_model`;
it works here, but reports times rounded to 0.01 ms, gives p5/p95 and no p90, and
runs through the CompiledModel API, so it is recorded as a cross-check
(`tool_median_ms`, `tool_p95_ms`) when `use_tool=True`, not as the figure.

bench.json: {"host": {...}, "results": [{"file", "threads", "median_ms", "p90_ms",
"runs", "size_bytes", ...}]}; the Android script writes the same schema.
"""

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np


RESULT_KEYS = ("file", "threads", "median_ms", "p90_ms", "runs", "size_bytes")


def _check(threads, runs, warmup, rounds=1):
    if not threads or any(int(t) < 1 for t in threads):
        raise ValueError(f"threads={threads!r}; give thread counts >= 1, e.g. (1, 2)")
    if int(runs) < 1 or int(warmup) < 0:
        raise ValueError(f"runs={runs}, warmup={warmup}; need runs >= 1 and warmup >= 0")
    if int(rounds) < 1:
        raise ValueError(f"rounds={rounds}; need rounds >= 1 (1 = each file once, in turn)")


def time_invoke(model_path, num_threads=1, runs=200, warmup=20, seed=0):
    """Per-invoke wall times in ms (list of `runs` floats) of a TFLite file at batch 1."""
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

    interp = Interpreter(model_path=str(model_path), num_threads=int(num_threads))
    interp.allocate_tensors()
    rng = np.random.default_rng(seed)
    for d in interp.get_input_details():
        shape = [1 if s < 0 else int(s) for s in d["shape_signature"]]
        if list(d["shape"]) != shape:
            interp.resize_tensor_input(d["index"], shape)
    interp.allocate_tensors()
    for d in interp.get_input_details():
        if np.issubdtype(d["dtype"], np.floating):
            x = rng.uniform(0, 1, d["shape"]).astype(d["dtype"])
        else:
            x = rng.integers(-128, 127, d["shape"]).astype(d["dtype"])
        interp.set_tensor(d["index"], x)
    for _ in range(int(warmup)):
        interp.invoke()
    times = []
    for _ in range(int(runs)):
        t0 = time.perf_counter()
        interp.invoke()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarize(times_ms):
    """{'median_ms', 'p90_ms', 'mean_ms', 'min_ms', 'runs'} of a list of times."""
    t = np.asarray(times_ms, np.float64)
    return dict(median_ms=float(np.median(t)), p90_ms=float(np.percentile(t, 90)),
                mean_ms=float(t.mean()), min_ms=float(t.min()), runs=int(t.size))


def litert_tool(model_path, num_threads=1, runs=200, timeout=300):
    """Result dict of ai_edge_litert.tools.benchmark_litert_model, or None if it fails."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        cmd = [sys.executable, "-m", "ai_edge_litert.tools.benchmark_litert_model",
               f"--model={model_path}", f"--num_threads={int(num_threads)}",
               f"--num_runs={int(runs)}", f"--result_json={out}"]
        try:
            subprocess.run(cmd, capture_output=True, timeout=timeout, check=True)
            with open(out) as f:
                return json.load(f)
        except (subprocess.SubprocessError, OSError, json.JSONDecodeError):
            return None


def host_info():
    """What the host numbers were measured on."""
    try:
        from importlib.metadata import version  # pylint: disable=g-import-not-at-top
        litert = version("ai-edge-litert")
    except Exception:  # pylint: disable=broad-except
        litert = getattr(sys.modules.get("ai_edge_litert"), "__version__", "unknown")
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    return dict(kind="host", platform=platform.platform(), machine=platform.machine(), cpu=cpu,
                cpu_count=os.cpu_count(), python=platform.python_version(), litert=litert,
                timer="Interpreter.invoke(), batch 1, time.perf_counter")


def alternating_times(paths, threads=(1,), runs=200, rounds=5, warmup=20):
    """{(path, threads): per-invoke ms}: `runs` timed invokes per file and thread count.

    The runs are split over `rounds` rounds (at most `runs`); round r times every
    (threads, file) in turn, after `warmup` untimed invokes each, the files in
    reverse order on odd rounds so that no file always runs first.
    """
    _check(threads, runs, warmup, rounds)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{missing} do not exist; run `brkeras export` first")
    runs, rounds = int(runs), min(int(rounds), int(runs))
    times = {(p, int(t)): [] for p in paths for t in threads}
    for r in range(rounds):
        n = runs // rounds + (r < runs % rounds)
        for t in threads:
            for p in (paths if r % 2 == 0 else paths[::-1]):
                times[(p, int(t))].extend(time_invoke(p, t, n, warmup, seed=r))
    return times


def benchmark_files(paths, threads=(1, 2), runs=200, warmup=20, use_tool=False, rounds=5):
    """One result dict per (file, threads), in the bench.json schema, the files timed
    side by side (`alternating_times`)."""
    times = alternating_times(paths, threads, runs, rounds, warmup)
    results = []
    for p in paths:
        for t in threads:
            r = dict(file=os.path.basename(p), threads=int(t), size_bytes=os.path.getsize(p),
                     rounds=min(int(rounds), int(runs)), **summarize(times[(p, int(t))]))
            if use_tool:
                tool = litert_tool(p, t, runs)
                lat = (tool or {}).get("latency", {})
                r["tool_median_ms"] = lat.get("median_ms")
                r["tool_p95_ms"] = lat.get("p95_ms")
            results.append(r)
    return results


def markdown_table(bench):
    """A markdown table of a bench.json dict: file, threads, median, p90, runs, size."""
    lines = ["| file | threads | median ms | p90 ms | runs | size KiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in bench["results"]:
        p90 = "n/a" if r.get("p90_ms") is None else f"{r['p90_ms']:.3f}"
        lines.append(f"| {r['file']} | {r['threads']} | {r['median_ms']:.3f} | {p90} | "
                     f"{r['runs']} | {r['size_bytes'] / 1024:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# TFLite benchmark_model (Android) output

_NUM = r"(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"


def parse_benchmark_model_output(text, file=None, size_bytes=None):
    """Parses the log of TFLite's `benchmark_model` into one bench.json result.

    Reads `Graph: [path]`, `Num threads: [t]`, the last `count=... avg=... std=...`
    statistics line (the timed runs; the first one is the warm-up) in microseconds,
    optional `median=`/`p5=`/`p95=` fields of newer builds, and the
    `Inference timings in us: Init: ..., First inference: ...` summary.
    median_ms is the median if the log has one, else the mean (median_is="avg");
    p90_ms is None: benchmark_model reports no 90th percentile.
    Raises ValueError when no statistics line is found.
    """
    stats = [dict(re.findall(r"(\w+)=" + _NUM, line)) for line in text.splitlines()
             if re.search(r"\bcount=\d+", line) and "avg=" in line
             and "Timings (microseconds)" not in line]  # op-profiler totals
    if not stats:
        raise ValueError("no 'count=... avg=...' line in the benchmark_model output; did the "
                         "run fail? (look for 'ERROR' lines in the log)")
    s = {k: float(v) for k, v in stats[-1].items()}
    graph = re.search(r"Graph:\s*\[([^\]]*)\]", text)
    threads = re.search(r"Num threads:\s*\[(\d+)\]", text)
    init = re.search(r"Init:\s*" + _NUM, text)
    first = re.search(r"First inference:\s*" + _NUM, text)
    has_median = "median" in s
    r = dict(file=file or (os.path.basename(graph.group(1)) if graph else None),
             threads=int(threads.group(1)) if threads else None,
             median_ms=(s["median"] if has_median else s["avg"]) / 1e3,
             median_is="median" if has_median else "avg",
             p90_ms=None, runs=int(s["count"]), size_bytes=size_bytes,
             mean_ms=s["avg"] / 1e3, min_ms=s.get("min", float("nan")) / 1e3,
             max_ms=s.get("max", float("nan")) / 1e3, std_ms=s.get("std", float("nan")) / 1e3)
    if "p95" in s:
        r["p95_ms"] = s["p95"] / 1e3
    if init:
        r["init_ms"] = float(init.group(1)) / 1e3
    if first:
        r["first_ms"] = float(first.group(1)) / 1e3
    return r


def _main(argv):
    """python -m brkeras.benchmark parse OUT.json LOG [SIZE] [KEY=VALUE ...] (Android helper).

    Appends the result parsed from LOG to OUT.json (bench.json schema), creating
    it with {"host": {...KEY=VALUE}} if needed. Extra KEY=VALUE set result fields
    (e.g. delegate=xnnpack).
    """
    if len(argv) < 3 or argv[0] != "parse":
        raise SystemExit("usage: python -m brkeras.benchmark parse OUT.json LOG SIZE [KEY=VALUE ...]")
    out, log = argv[1], argv[2]
    size = int(argv[3]) if len(argv) > 3 else None
    extra = dict(a.split("=", 1) for a in argv[4:])
    with open(log) as f:
        r = parse_benchmark_model_output(f.read(), size_bytes=size)
    host = {k[5:]: v for k, v in extra.items() if k.startswith("host.")}
    r.update({k: v for k, v in extra.items() if not k.startswith("host.")})
    bench = {"host": dict(kind="android", **host), "results": []}
    if os.path.exists(out):
        with open(out) as f:
            bench = json.load(f)
    bench["results"].append(r)
    with open(out, "w") as f:
        json.dump(bench, f, indent=2)
    print(f"{r['file']} threads={r['threads']} median={r['median_ms']:.3f} ms ({r['median_is']})")


if __name__ == "__main__":
    _main(sys.argv[1:])
