"""`brkeras pipeline`: every stage, in order, for each model of the config.

Each model of `config.pipeline.models` (an ARG such as "ternary,tradeoff") gets
its own work dir under the pipeline dir, so a killed pipeline resumes where it
stopped: a finished training is kept, a stage whose output exists and is newer
than the output it was made from is skipped (train -> evaluate, train -> export
-> benchmark). The later stages run with the pipeline config's eval, export and
bench sections. With the benchmark stage, the shipped files of all models are
then also timed side by side in one process (latency.json), so that their
speed-ups against config.bench.baseline_model do not depend on how the machine
drifted between the models' own benchmark stages. A stage that fails skips that
model's remaining stages; the other models still run, and the pipeline raises at
the end naming the failures.
At the end `summary.json` and `summary.md` compare the models side by side.
"""

import copy
import importlib
import inspect
import os
import time
import traceback

from brkeras.run import config as config_lib
from brkeras import errors
from brkeras.run import console
from brkeras.run import lock
from brkeras.run import workdir as workdir_lib

# The one stage table (the CLI's commands too): stage -> (module, function, the
# file that marks it done, the stages it is made from).
STAGES = {
    "train": ("brkeras.run.train", "train", workdir_lib.STATE, ()),
    "evaluate": ("brkeras.run.evaluate", "evaluate", workdir_lib.EVAL_JSON, ("train",)),
    "export": ("brkeras.run.export", "export", workdir_lib.EXPORT_JSON, ("train",)),
    "benchmark": ("brkeras.run.benchmark", "benchmark", workdir_lib.BENCH_JSON, ("export",)),
    # attacks the exported files with the evaluate stage's worst-case examples
    "evaluate_tflite": ("brkeras.run.evaluate", "evaluate_tflite", workdir_lib.TFLITE_EVAL_JSON,
                        ("export", "evaluate")),
}


def stage_function(stage):
    """The function of `stage`, imported lazily (so `--help` and errors stay fast)."""
    module, fn, _, _ = STAGES[stage]
    return getattr(importlib.import_module(module), fn)


def model_dir_name(arg):
    return arg.replace(",", "_")


def model_config(config, arg, pipeline_dir=None):
    """The config of pipeline model `arg`: config with the ARG tokens applied.

    Its pipeline.models is (arg,), so a model's stored config does not change
    when models are added to or removed from the pipeline. With
    config.pipeline.finetune.from_model set, every other model starts from that
    model's trained weights (config.init_from, the usual way to quantize a
    trained network) with the finetune section's shorter schedule; a model named
    in config.pipeline.finetune.sources starts from its source model there instead
    (a trained Binary-Relax model's float weights: `train.initial_weights`).
    """
    c = copy.deepcopy(config)
    ft = config.pipeline.get("finetune")
    with c.unlocked():
        config_lib.apply_arg(c, arg)
        c.pipeline.models = (arg,)
        start = finetune_source(config, arg)
        if start:
            source = model_dir_name(start)
            c.init_from = os.path.abspath(os.path.join(pipeline_dir, source)) if pipeline_dir \
                else source
            c.optim.epochs = ft.epochs
            c.optim.lr = ft.lr
            c.optim.milestones = tuple(ft.milestones)
            c.data.max_train_examples = ft.max_train_examples
            c.quant.phase2_fraction = ft.phase2_fraction
    return config_lib.validate(c)


def finetune_source(config, arg):
    """The pipeline model that model `arg` is fine-tuned from ('' = none: it trains
    from scratch): its entry in config.pipeline.finetune.sources, else from_model."""
    ft = config.pipeline.get("finetune")
    if ft is None or not ft.from_model or arg == ft.from_model:
        return ""
    return dict(_source_pairs(ft)).get(arg, ft.from_model)


def _source_pairs(ft):
    pairs = ft.get("sources", ())
    for pair in pairs:
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(a, str) and a for a in pair)):
            raise ValueError(f"config.pipeline.finetune.sources has {pair!r}; give a tuple of "
                             "(model ARG, source ARG) pairs, e.g. on the command line "
                             "--config.pipeline.finetune.sources='((\"ternary,tradeoff,sparse\","
                             "\"ternary,tradeoff\"),)' (mind the trailing comma)")
    models = [p[0] for p in pairs]
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:
        raise ValueError(f"config.pipeline.finetune.sources names {twice} more than once; give "
                         "each model one source")
    return [tuple(p) for p in pairs]


def _check_sources(config, args):
    """Each (model, source) pair whose model is in the pipeline: the source is in it
    too, before the model (what the source can start is `_check`'s, for every model)."""
    ft = config.pipeline.get("finetune")
    pairs = _source_pairs(ft) if ft is not None else []
    if pairs and not ft.from_model:
        raise ValueError("config.pipeline.finetune.sources needs finetune.from_model (the "
                         "models it names fine-tune with that section's schedule): set "
                         "from_model to the first of pipeline.models, or sources to ()")
    for model, source in pairs:
        if model not in args:
            continue  # a narrowed pipeline (--config.pipeline.models=...) leaves it out
        if source not in args or args.index(source) >= args.index(model):
            raise ValueError(
                f"config.pipeline.finetune.sources has ({model!r}, {source!r}): the source must "
                f"be in config.pipeline.models {tuple(args)}, before the model (it is trained "
                "first); add it there, or drop the pair (--config.pipeline.finetune.sources='()' "
                "fine-tunes every model from finetune.from_model)")


def _marker(workdir, stage):
    return os.path.join(workdir, STAGES[stage][2])


def _stage_done(workdir, stage):
    """True if the stage's output exists and is at least as new as each input's."""
    path = _marker(workdir, stage)
    if not os.path.exists(path):
        return False
    upstream = STAGES[stage][3]
    if not upstream:  # train
        return bool(workdir_lib.read_state(workdir)["finished"])
    return all(_stage_done(workdir, u)
               and os.path.getmtime(path) >= os.path.getmtime(_marker(workdir, u))
               for u in upstream)


def _check(config, pipeline_dir=None):
    """Validates the pipeline section; returns [(arg, model config, dir name)]."""
    config_lib.validate(config)
    for stage in config.pipeline.stages:
        if stage not in STAGES:
            raise ValueError(f"config.pipeline.stages has {stage!r}; choose from {tuple(STAGES)}")
    args = list(config.pipeline.models)
    if not args:
        raise ValueError("config.pipeline.models is empty; list ARGs such as "
                         "('float,tradeoff', 'ternary,tradeoff')")
    names = [model_dir_name(a) for a in args]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"config.pipeline.models names the work dirs {dup} more than once; "
                         "list each model once")
    ft = config.pipeline.get("finetune")
    if ft is not None and ft.from_model and (not args or args[0] != ft.from_model):
        raise ValueError(f"config.pipeline.finetune.from_model={ft.from_model!r} must be the "
                         f"first of config.pipeline.models {tuple(args)} (the others start "
                         "from it), or '' to train every model from scratch")
    _check_sources(config, args)
    # every ARG checked before any training, so a typo in the last model fails now
    configs = dict(zip(args, (model_config(config, a, pipeline_dir) for a in args)))
    for arg, c in configs.items():
        start = finetune_source(config, arg)
        problem = start and config_lib.init_source_problem(configs[start], c)
        if problem:
            raise ValueError(f"config.pipeline: {arg!r} fine-tunes from {start!r}, but {problem}")
    return [(a, configs[a], n) for a, n in zip(args, names)]


@lock.locked("pipeline", dir_arg="pipeline_dir")  # and each stage locks its model dir
def run(config, pipeline_dir, overwrite=False, verbose=None):
    """Runs the pipeline; returns the summary rows.

    overwrite: train every model again from scratch and redo every stage.
    verbose: of the stages that take it (train, evaluate); None = progress bars
    on a terminal, one line per epoch or attack off one (console.progress_verbose).
    With config.pipeline.workers > 1 the models' stages run in that many worker
    processes at once (run/workers.py), each training after its source model's
    training, and the benchmark stages run last, one at a time in this process.
    Raises errors.BrkerasError after writing the summary if any stage failed.
    """
    models = _check(config, pipeline_dir)
    os.makedirs(pipeline_dir, exist_ok=True)
    verbose = console.progress_verbose() if verbose is None else verbose
    t_start = time.time()
    for _, c, name in models:
        workdir = os.path.join(pipeline_dir, name)
        diff = workdir_lib.training_diff(workdir, c)
        if diff and not overwrite:
            raise errors.WorkdirError(
                f"{workdir} holds a run of a different config:\n  " + "\n  ".join(diff)
                + "\nUse another pipeline dir, or pass --overwrite to train it again.")
    workers = int(config.pipeline.get("workers", 1))
    if workers > 1:
        failures = _run_in_workers(config, models, pipeline_dir, overwrite, verbose, workers)
    else:
        failures = []
        for i, (arg, c, name) in enumerate(models, 1):
            failed = _run_stages(f"{i}/{len(models)} {arg}", c, os.path.join(pipeline_dir, name),
                                 config.pipeline.stages, overwrite, verbose)
            if failed:
                failures.append((arg,) + failed)
    if "benchmark" in config.pipeline.stages:
        try:
            _compare(config, pipeline_dir, overwrite)
        except Exception as e:  # pylint: disable=broad-except
            print(f"[pipeline] side-by-side latency: FAILED ({type(e).__name__}: {e})", flush=True)
            failures.append(("all models", "side-by-side latency", _describe(e), e))
    rows = _summarize(config, pipeline_dir)
    print(f"[pipeline] finished in {time.time() - t_start:.0f} s; summary in "
          f"{os.path.join(pipeline_dir, workdir_lib.SUMMARY_MD)}", flush=True)
    if failures:
        listed = "; ".join(f"{a} {s}: {text}" for a, s, text, _ in failures)
        raise errors.BrkerasError(
            f"{len(failures)} pipeline stage(s) failed: {listed}. Fix the cause and run the "
            "same command again: finished stages are kept.") from failures[0][3]
    return rows


def _describe(e):
    return f"{type(e).__name__}: {e}"


def _run_stages(label, c, workdir, stages, overwrite, verbose, cores=None):
    """Runs `stages` of one model in order, skipping those done already; `cores`
    (a worker's share of them; None = all) goes to the stages that take it.

    Returns None, or (stage, description, exception) of the stage that failed
    (the model's later stages are then skipped)."""
    arg = c.pipeline.models[0]
    for stage in stages:
        prefix = f"[pipeline {label}] {stage}"
        if not overwrite and _stage_done(workdir, stage):
            print(f"{prefix}: done already, kept ({workdir})", flush=True)
            continue
        print(f"{prefix} ...", flush=True)
        t0 = time.time()
        try:
            fn = stage_function(stage)
            params = inspect.signature(fn).parameters
            more = {k: v for k, v in (("verbose", verbose), ("cores", cores)) if k in params}
            if stage == "train":
                fn(c, workdir, overwrite=overwrite, **more)
            else:
                fn(workdir, overrides=c, **more)
        except Exception as e:  # pylint: disable=broad-except
            # the other models still run; the failure is raised at the end
            if console.debug():  # --debug or --verbosity=1
                traceback.print_exc()
            print(f"{prefix}: FAILED ({_describe(e)}); skipping the rest of {arg}", flush=True)
            return stage, _describe(e), e
        print(f"{prefix}: {time.time() - t0:.0f} s", flush=True)
    return None


def _worker_job(label, c, workdir, stages, overwrite, verbose, threads):
    """A worker process's job (run/workers.py): `_run_stages` with one line per epoch
    and attack (no progress bars: two workers share the terminal), and as many
    LiteRT workers for Square as TensorFlow threads (`threads`, the process's
    share of the cores; config.eval.tflite_workers if set), and `threads` as the
    cores of the stages that split work (evaluate's shards). Returns None or
    (stage, description): exceptions stay in the worker."""
    c = copy.deepcopy(c)
    with c.unlocked():
        if not int(c.eval.get("tflite_workers", 0)):
            c.eval.tflite_workers = threads
    failed = _run_stages(label, c, workdir, stages, overwrite, verbose=2 if verbose else 0,
                         cores=threads)
    return failed[:2] if failed else None


def _kept(label, workdir, stages, overwrite):
    """True, saying so, when every one of `stages` is done already (no worker needed)."""
    if overwrite or not all(_stage_done(workdir, s) for s in stages):
        return False
    for stage in stages:
        print(f"[pipeline {label}] {stage}: done already, kept ({workdir})", flush=True)
    return True


def _run_in_workers(config, models, pipeline_dir, overwrite, verbose, workers):
    """The stages of every model in `workers` processes; returns the failures.

    Two jobs per model: its training, which waits for its fine-tune source's, and
    its later stages but the benchmark, which wait for its training. Trainings go
    first (they unlock the most work). The benchmark stages time files, so they
    run afterwards in this process, one model at a time, on an idle machine.
    """
    workers_lib = importlib.import_module("brkeras.run.workers")
    stages = tuple(config.pipeline.stages)
    later = tuple(s for s in stages if s not in ("train", "benchmark"))
    specs, n = [], len(models)  # (key, needs, rank, args, floor) of the jobs with work to do
    for i, (arg, c, name) in enumerate(models, 1):
        label, workdir = f"{i}/{n} {arg}", os.path.join(pipeline_dir, name)
        source = finetune_source(config, arg)
        floor = workers_lib.thread_floor(c.model.width)
        if "train" in stages and not _kept(label, workdir, ("train",), overwrite):
            specs.append(((arg, "train"), ((source, "train"),) if source else (), 0,
                          (label, c, workdir, ("train",), overwrite, verbose), floor))
        if later and not _kept(label, workdir, later, overwrite):
            specs.append(((arg, "later"), ((arg, "train"),), 1,
                          (label, c, workdir, later, overwrite, verbose), floor))
    pending = {s[0] for s in specs}  # a need that is done already is no need
    jobs = [workers_lib.Job(key, tuple(k for k in needs if k in pending), rank, _worker_job,
                            args, floor) for key, needs, rank, args, floor in specs]
    print(f"[pipeline] {len(jobs)} jobs of {n} models in up to {workers} worker processes",
          flush=True)
    outcome = workers_lib.run_jobs(jobs, workers, prefix=lambda key: f"[{key[0]}] ")
    failures, failed_models = [], set()
    for job in jobs:
        arg, result = job.key[0], outcome[job.key]
        if result is None:
            continue
        stage = "train" if job.key[1] == "train" else "/".join(later)
        if isinstance(result, workers_lib.Skipped):
            if result.need[0] == arg:  # its own training failed: reported already
                continue
            text = f"not run: its source {result.need[0]!r} did not train"
            print(f"[pipeline {job.args[0]}] {stage}: {text}", flush=True)
        elif result[0] == "worker":  # the process died (or broke) outside any stage
            text = result[1]
            print(f"[pipeline {job.args[0]}] {stage}: FAILED (worker process: {text}); "
                  f"skipping the rest of {arg}", flush=True)
        else:
            stage, text = result
        failed_models.add(arg)
        failures.append((arg, stage, text, None))
    if "benchmark" in stages:
        for i, (arg, c, name) in enumerate(models, 1):
            if arg in failed_models:
                continue
            failed = _run_stages(f"{i}/{n} {arg}", c, os.path.join(pipeline_dir, name),
                                 ("benchmark",), overwrite, verbose)
            if failed:
                failures.append((arg,) + failed)
    return failures


def _compare(config, pipeline_dir, overwrite):
    """The shipped files of all models timed side by side (run/benchmark.py)."""
    bench_lib = importlib.import_module("brkeras.run.benchmark")
    names = [model_dir_name(a) for a in config.pipeline.models]
    b = config.bench
    baseline = b.get("baseline_model", "")
    if baseline not in config.pipeline.models:  # e.g. a narrowed --config.pipeline.models
        if baseline:
            print(f"[pipeline] config.bench.baseline_model={baseline!r} is not a model of this "
                  f"pipeline; speed-ups are against {config.pipeline.models[0]!r}", flush=True)
        baseline = config.pipeline.models[0]
    baseline = model_dir_name(baseline)
    label = "[pipeline] side-by-side latency of the shipped files"
    if not overwrite and bench_lib.comparison_is_current(pipeline_dir, names, baseline):
        print(f"{label}: done already, kept", flush=True)
        return
    print(f"{label} ...", flush=True)
    t0 = time.time()
    bench_lib.compare_models(pipeline_dir, names, baseline, tuple(b.threads), int(b.runs),
                             int(b.get("rounds", 5)))
    print(f"{label}: {time.time() - t0:.0f} s", flush=True)


def _summarize(config, pipeline_dir):
    summary = importlib.import_module("brkeras.run.summary")
    return summary.write(pipeline_dir, [model_dir_name(a) for a in config.pipeline.models])
