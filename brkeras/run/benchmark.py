"""`brkeras benchmark --workdir=DIR`: LiteRT latency of DIR/export/*.tflite into bench.json."""

import os

from brkeras.deploy.latency import benchmark_files, host_info
from brkeras.run import config as config_lib
from brkeras.run import lock
from brkeras.run import workdir as workdir_lib


@lock.locked("benchmark")  # one writer per work dir (bench.json)
def benchmark(workdir, threads=None, runs=None, warmup=20, use_tool=False, overrides=None):
    """Benchmarks workdir/export/*.tflite and writes workdir/bench.json; returns it.

    threads/runs default to config.bench (overrides: a config whose bench section
    replaces the stored one, the CLI's --config), else (1, 2) and 200.
    """
    if threads is None or runs is None:
        try:
            c = config_lib.stage_config(workdir_lib.load_config(workdir), overrides)
            threads = threads or tuple(c.bench.threads)
            runs = runs or int(c.bench.runs)
        except workdir_lib.WorkdirError:
            threads, runs = threads or (1, 2), runs or 200
    d = os.path.join(workdir, workdir_lib.EXPORT_DIR)
    paths = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".tflite")) \
        if os.path.isdir(d) else []
    if not paths:
        raise FileNotFoundError(f"no .tflite files in {d}; run `brkeras export --workdir={workdir}`")
    out = dict(host=host_info(), results=benchmark_files(paths, threads, runs, warmup, use_tool))
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.BENCH_JSON), out)
    return out
