"""`brkeras evaluate --workdir=DIR`: robust evaluation of a trained run; eval.json, report.md, plots.

Reads the run's config and checkpoint, calls `robust.evaluation.evaluate_model`
with the config's eval section, and writes its result (plus the work dir and
the training state) as eval.json, with report.md and plots/*.png beside it.
"""

import os
import time

import numpy as np

from brkeras import data
from brkeras.robust import evaluation
from brkeras.run import config as config_lib
from brkeras.run import report
from brkeras.run import train as train_lib
from brkeras.run import workdir as workdir_lib

ATTACKS = tuple(evaluation.ATTACKS)


def check_eval_config(ev):
    """Raises ValueError naming the config.eval field that cannot be evaluated."""
    evaluation.check_arguments(ev.attacks, ev.eot_attacks, ev.eot_samples, ev.batch_size,
                               ev.sweep_examples, ev.eps_sweep)
    if int(ev.max_examples) < 0:
        raise ValueError(f"config.eval.max_examples={ev.max_examples}; give >= 1 (0 = all)")


def evaluate(workdir, overrides=None, verbose=1):
    """Evaluates the trained model of `workdir`; writes eval.json, report.md, plots."""
    t0 = time.time()
    config = config_lib.stage_config(workdir_lib.load_config(workdir), overrides)
    ev = config.eval
    check_eval_config(ev)
    state = workdir_lib.read_state(workdir)
    net = train_lib.load(workdir)
    info = data.info(config.data.name)
    x_u8, y = data.load_arrays(config.data.name, "test", ev.max_examples, config.data.data_dir)
    x = x_u8.astype(np.float32) / 255.0
    if not state["finished"] and verbose:
        print(f"[evaluate] WARNING {workdir} holds an unfinished training "
              f"({state['completed_epochs']} epochs done); evaluating its last checkpoint",
              flush=True)
    result = evaluation.evaluate_model(
        net, x, y, eps=float(config.adv.eps), attacks=tuple(ev.attacks),
        eot_attacks=tuple(ev.eot_attacks), eot_samples=int(ev.eot_samples),
        batch_size=int(ev.batch_size), eps_sweep=tuple(ev.eps_sweep),
        sweep_examples=int(ev.sweep_examples), num_classes=info.num_classes,
        attack_params=ev.to_dict(), verbose=verbose)
    result["workdir"] = os.path.abspath(workdir)
    result["training"] = {"completed_epochs": int(state["completed_epochs"]),
                          "finished": bool(state["finished"])}
    result["time_s"] = round(time.time() - t0, 1)
    report.write_eval_report(workdir, result, workdir_lib.read_metrics(workdir))
    # eval.json last: the pipeline takes it as the mark of a finished evaluation.
    path = os.path.join(workdir, workdir_lib.EVAL_JSON)
    workdir_lib.write_json(path, result)
    if verbose:
        failed = [c for c in result["sanity"] if not c["held"]]
        for c in failed:
            print(f"[evaluate] WARNING sanity check failed: {c['check']}: {c['detail']}",
                  flush=True)
        print(f"[evaluate] {len(result['sanity']) - len(failed)}/{len(result['sanity'])} sanity "
              f"checks held; wrote {path} and {workdir_lib.REPORT_MD} ({result['time_s']} s)",
              flush=True)
    return result
