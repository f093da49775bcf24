"""`brkeras pipeline`: every stage, in order, for each model of the config.

Each model of `config.pipeline.models` (an ARG such as "ternary,tradeoff") gets
its own work dir under the pipeline dir, so a killed pipeline resumes where it
stopped: a finished training is kept, a stage whose output exists is skipped.
At the end `summary.json` and `summary.md` compare the models side by side.
"""

import copy
import importlib
import os
import time

from brkeras import config as config_lib
from brkeras import workdir as workdir_lib

# stage -> (module, function, the file that marks it done)
STAGES = {
    "train": ("training", "train", workdir_lib.STATE),
    "evaluate": ("evaluate", "evaluate", "eval.json"),
    "export": ("export", "export", "export.json"),
    "benchmark": ("benchmark", "benchmark", "bench.json"),
}


def model_dir_name(arg):
    return arg.replace(",", "_")


def model_config(config, arg):
    c = copy.deepcopy(config)
    with c.unlocked():
        config_lib.apply_arg(c, arg)
    return config_lib.validate(c)


def _stage_done(workdir, stage):
    marker = os.path.join(workdir, STAGES[stage][2])
    if stage == "train":
        return os.path.exists(marker) and workdir_lib.read_state(workdir)["finished"]
    return os.path.exists(marker)


def _stage_fn(stage):
    module, fn, _ = STAGES[stage]
    try:
        return getattr(importlib.import_module(f"brkeras.{module}"), fn)
    except (ImportError, AttributeError):
        return None


def run(config, pipeline_dir, overwrite=False):
    """Runs the pipeline; returns the summary rows."""
    config_lib.validate(config)
    for stage in config.pipeline.stages:
        if stage not in STAGES:
            raise ValueError(f"config.pipeline.stages has {stage!r}; choose from {tuple(STAGES)}")
    os.makedirs(pipeline_dir, exist_ok=True)
    args = list(config.pipeline.models)
    t_start = time.time()
    for i, arg in enumerate(args, 1):
        c = model_config(config, arg)
        workdir = os.path.join(pipeline_dir, model_dir_name(arg))
        for stage in config.pipeline.stages:
            label = f"[pipeline {i}/{len(args)} {arg}] {stage}"
            if _stage_done(workdir, stage) and not overwrite:
                print(f"{label}: done already, kept ({workdir})", flush=True)
                continue
            fn = _stage_fn(stage)
            if fn is None:
                print(f"{label}: not available yet in this version, skipped", flush=True)
                continue
            print(f"{label} ...", flush=True)
            t0 = time.time()
            if stage == "train":
                fn(c, workdir, overwrite=overwrite)
            else:
                fn(workdir)
            print(f"{label}: {time.time() - t0:.0f} s", flush=True)
    rows = _summarize(config, pipeline_dir)
    print(f"[pipeline] finished in {time.time() - t_start:.0f} s; summary in "
          f"{os.path.join(pipeline_dir, 'summary.md')}", flush=True)
    return rows


def _summarize(config, pipeline_dir):
    summary = importlib.import_module("brkeras.summary")
    return summary.write(pipeline_dir, [model_dir_name(a) for a in config.pipeline.models])
