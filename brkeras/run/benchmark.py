"""LiteRT latency of exported files: `brkeras benchmark --workdir=DIR` times
DIR/export/*.tflite into bench.json; the pipeline times the shipped file of every
model side by side into PIPELINE_DIR/latency.json (`compare_models`)."""

import os

from brkeras.deploy.latency import benchmark_files, host_info
from brkeras.run import config as config_lib
from brkeras.run import lock
from brkeras.run import workdir as workdir_lib


@lock.locked("benchmark")  # one writer per work dir (bench.json)
def benchmark(workdir, threads=None, runs=None, warmup=20, use_tool=False, overrides=None,
              rounds=None):
    """Benchmarks workdir/export/*.tflite and writes workdir/bench.json; returns it.

    threads/runs/rounds default to config.bench (overrides: a config whose bench
    section replaces the stored one, the CLI's --config), else (1, 2), 200 and 5.
    """
    c = None
    if threads is None or runs is None or rounds is None:
        try:
            c = config_lib.stage_config(workdir_lib.load_config(workdir), overrides).bench
        except workdir_lib.WorkdirError:
            pass
    threads = threads or (tuple(c.threads) if c else (1, 2))
    runs = runs or (int(c.runs) if c else 200)
    rounds = rounds or (int(c.get("rounds", 5)) if c else 5)
    d = os.path.join(workdir, workdir_lib.EXPORT_DIR)
    paths = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".tflite")) \
        if os.path.isdir(d) else []
    if not paths:
        raise FileNotFoundError(f"no .tflite files in {d}; run `brkeras export --workdir={workdir}`")
    out = dict(host=host_info(), results=benchmark_files(paths, threads, runs, warmup, use_tool,
                                                         rounds))
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.BENCH_JSON), out)
    return out


def _shipped(pipeline_dir, names):
    """[(model, path)] of the shipped noise-off file of each model that has one."""
    out = []
    for n in names:
        ex_path = os.path.join(pipeline_dir, n, workdir_lib.EXPORT_JSON)
        f = workdir_lib.shipped_file(workdir_lib.read_json(ex_path), False) \
            if os.path.exists(ex_path) else None
        if f is not None:
            out.append((n, os.path.join(pipeline_dir, n, workdir_lib.EXPORT_DIR, f["file"])))
    return out


def comparison_is_current(pipeline_dir, names, baseline=None):
    """True if latency.json exists, covers exactly the shipped files of `names` against
    `baseline` (None: the first), and is newer than every model's export.json."""
    path = os.path.join(pipeline_dir, workdir_lib.LATENCY_JSON)
    if not os.path.exists(path):
        return False
    old = workdir_lib.read_json(path)
    shipped = _shipped(pipeline_dir, names)
    same = (baseline in (None, old.get("baseline"))
            and [(r["model"], r["file"]) for r in old["results"] if r["threads"] ==
                 old["results"][0]["threads"]] == [(n, os.path.basename(p)) for n, p in shipped])
    t = os.path.getmtime(path)
    return same and all(
        os.path.getmtime(os.path.join(pipeline_dir, n, workdir_lib.EXPORT_JSON)) <= t
        for n, _ in shipped)


def compare_models(pipeline_dir, names, baseline=None, threads=(1, 2), runs=200, rounds=5,
                   warmup=20):
    """Times the shipped noise-off file of every model in `names` side by side and
    writes pipeline_dir/latency.json; returns it.

    The files of all models run in the same alternating rounds
    (deploy.latency.alternating_times), so the cross-model speed-ups do not
    depend on when each model's own benchmark stage ran. Each result gets
    `speedup`: the baseline model's median / this file's median, at the same
    thread count (baseline: a name of `names`, default the first with a file).
    Models without an exported noise-off int8 file are left out.
    """
    shipped = _shipped(pipeline_dir, names)
    if not shipped:
        raise FileNotFoundError(f"no model under {pipeline_dir} has an exported noise-off int8 "
                                "file; run the export stage first")
    models = [n for n, _ in shipped]
    baseline = baseline or models[0]
    if baseline not in models:
        raise ValueError(f"baseline model {baseline!r} has no shipped file under {pipeline_dir}; "
                         f"choose one of {models}")
    paths = [p for _, p in shipped]
    results = benchmark_files(paths, threads, runs, warmup, rounds=rounds)
    for r, n in zip(results, [n for n in models for _ in threads]):  # benchmark_files' order
        r["model"] = n
    base = {r["threads"]: r["median_ms"] for r in results if r["model"] == baseline}
    for r in results:
        r["speedup"] = base[r["threads"]] / r["median_ms"]
    out = dict(host=host_info(), baseline=baseline, runs=int(runs), rounds=results[0]["rounds"],
               load_avg=round(os.getloadavg()[0], 2), results=results)
    workdir_lib.write_json(os.path.join(pipeline_dir, workdir_lib.LATENCY_JSON), out)
    return out
