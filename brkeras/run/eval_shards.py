"""`brkeras evaluate` on every core: the images in shards, one worker process each.

TensorFlow's CPU kernels do not keep two cores busy on the CPU-scale models
(run/workers.py), and an evaluation is a sum over examples: every accuracy in
eval.json is a mean of per-example correctness. So config.eval.shards worker
processes (0 = one per core, run/workers.py's `thread_floor` respected, at most
one per eval.batch_size images and per eps-sweep example) each load the model
and run `robust.evaluation.evaluate_examples` on their slice of the images with
cores // shards TensorFlow threads, and save its per-example "part" to an .npz
in a temporary directory inside the work dir; this process merges the parts
with `evaluation.summarize`. The result is the eval.json of one process, up to
the noise draws (each shard seeds its own).

Each shard gets an equal share of the eps-sweep and more-effort examples (the
first eval.sweep_examples images) and of the rest, so the shards finish
together. Measured on the default ternary model (1000 test images, this
module's split by hand, /tmp scripts, 2026-12-08 01:21 UTC, the Intel Xeon with
AVX-512, load 2.3): one process with two threads 56.2 and 56.5 s of evaluation,
two shards of one thread each 41.5-44.4 s (1.30x); whole processes 63.6 s
against 49.1-51.7 s.
"""

import json
import os
import shutil
import tempfile

import numpy as np

from brkeras import errors
from brkeras.run import workers as workers_lib


def count(ev, n_examples, cores, floor=1):
    """The number of shards for config.eval `ev` on `n_examples` images, given `cores`
    and the fewest threads a process may run the model with (`thread_floor`)."""
    asked = int(ev.get("shards", 0))
    if asked < 0:
        raise ValueError(f"config.eval.shards={asked}; give >= 1, or 0 for one per CPU core")
    sweep = min(n_examples, int(ev.sweep_examples))
    if asked:
        return max(1, min(asked, n_examples, sweep))
    by_batches = n_examples // int(ev.batch_size)  # a shard of less than one batch: no gain
    return max(1, min(cores // max(1, floor), by_batches, sweep))


def positions(n_examples, sweep_examples, shards):
    """Per shard, the indices of its images: its share of the first `sweep_examples`
    (its own sweep examples, which `evaluate_examples` takes to be its first),
    then its share of the rest."""
    k = min(n_examples, sweep_examples)
    if not 1 <= shards <= k:
        raise ValueError(f"{shards} shards for {k} eps-sweep examples; give 1 to {k}")
    sweep = np.array_split(np.arange(k), shards)
    rest = np.array_split(np.arange(k, n_examples), shards)
    return [np.concatenate([s, r]) for s, r in zip(sweep, rest)]


def save_part(path, part):
    """An `evaluate_examples` part as one .npz (arrays, and the meta as JSON text)."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, __meta__=np.array(json.dumps(part["meta"])), **part["arrays"])
    os.replace(tmp, path)


def load_part(path):
    with np.load(path) as d:  # plain arrays only: allow_pickle stays False
        meta = json.loads(str(d["__meta__"][()]))
        return {"meta": meta, "arrays": {k: d[k] for k in d.files if k != "__meta__"}}


def _shard_job(workdir, config, indices, out_path, verbose, threads):
    """A worker's job: the part of `indices` of the run's evaluation images."""
    del threads  # set by run/workers.py for this process
    # the run layer's imports stay inside: this module is imported by evaluate.py
    from brkeras.robust import evaluation  # pylint: disable=g-import-not-at-top
    from brkeras.run import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
    from brkeras.run import train as train_lib  # pylint: disable=g-import-not-at-top
    x, y = evaluate_lib.eval_images(config)
    idx = np.asarray(indices, np.int64)
    net = train_lib.load(workdir)
    sweep_n = int(np.sum(idx < min(len(y), int(config.eval.sweep_examples))))
    part = evaluation.evaluate_examples(
        net, x[idx], y[idx], sweep_examples=sweep_n, **evaluate_lib.evaluation_kwargs(config),
        verbose=verbose)
    save_part(out_path, part)


def evaluate(workdir, config, n_examples, shards, cores, floor=1, verbose=1):
    """eval.json's dict and the worst-case arrays of the run in `workdir`, evaluated
    in `shards` worker processes sharing `cores`, each with at least `floor` threads."""
    from brkeras.robust import evaluation  # pylint: disable=g-import-not-at-top
    pos = positions(n_examples, int(config.eval.sweep_examples), shards)
    tmp = tempfile.mkdtemp(dir=workdir, prefix=".eval-shards-")
    try:
        paths = [os.path.join(tmp, f"part{i}.npz") for i in range(shards)]
        jobs = [workers_lib.Job(key=("shard", i), needs=(), rank=0, fn=_shard_job,
                                args=(workdir, config, p.tolist(), path, 2 if verbose else 0),
                                min_threads=floor)
                for i, (p, path) in enumerate(zip(pos, paths))]
        if verbose:
            print(f"[evaluate] {n_examples} examples in {shards} shards, one worker process "
                  f"each ({max(floor, cores // shards)} TensorFlow thread(s))", flush=True)
        outcome = workers_lib.run_jobs(jobs, shards, cores=cores,
                                       prefix=lambda key: f"[shard {key[1] + 1}/{shards}] ")
        failed = {k: v for k, v in outcome.items() if v is not None}
        if failed:
            text = "; ".join(f"shard {k[1] + 1}: {v[1] if isinstance(v, tuple) else v}"
                             for k, v in sorted(failed.items()))
            raise errors.BrkerasError(f"the evaluation of {workdir} failed in {text}")
        parts = [load_part(path) for path in paths]
        return evaluation.summarize(parts, pos, verbose=verbose)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
