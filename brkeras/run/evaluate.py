"""`brkeras evaluate --workdir=DIR`: robust evaluation of a trained run; eval.json, report.md, plots.

Reads the run's config and checkpoint, calls `robust.evaluation.evaluate_model`
with the config's eval section on the images [eval.first_example,
eval.first_example + eval.max_examples) of eval.split ("test", or unused
"train" images as a validation set), and writes its result (plus the work dir,
those images and the training state) as eval.json, with report.md and plots/*.png beside it, and
the worst-case adversarial examples as adversarial.npz (x, y, x_adv, robust,
source, members, eps; plain arrays, read with np.load, no pickle).

`brkeras evaluate_tflite --workdir=DIR` (after export): the shipped files
(export.json's noise-off and noisy int8 files, as the summary picks them)
under the transfer of those examples and Square Attack, through
`deploy.robustness.evaluate_files`; tflite_eval.json.
"""

import os
import tempfile
import time

import numpy as np

from brkeras import data
from brkeras.errors import WorkdirError
from brkeras.robust import evaluation
from brkeras.run import config as config_lib
from brkeras.run import eval_shards
from brkeras.run import lock
from brkeras.run import report
from brkeras.run import train as train_lib
from brkeras.run import workers as workers_lib
from brkeras.run import workdir as workdir_lib
from brkeras.train import precision

ATTACKS = tuple(evaluation.ATTACKS)
EVAL_SPLITS = ("test", "train")


def image_range(ev):
    """(split, first index) of the images config.eval evaluates (defaults of old configs)."""
    return ev.get("split", "test"), int(ev.get("first_example", 0))


def check_eval_config(ev):
    """Raises ValueError naming the config.eval field that cannot be evaluated."""
    evaluation.check_arguments(ev.attacks, ev.eot_attacks, ev.eot_samples, ev.batch_size,
                               ev.sweep_examples, ev.eps_sweep, tuple(ev.get("eot_only", ())),
                               int(ev.get("predict_batch_size", ev.batch_size)), ev.to_dict())
    if int(ev.max_examples) < 0:
        raise ValueError(f"config.eval.max_examples={ev.max_examples}; give >= 1 (0 = all)")
    split, first = image_range(ev)
    if first < 0:
        raise ValueError(f"config.eval.first_example={first}; give the index of the "
                         "first image to evaluate, >= 0")
    if split not in EVAL_SPLITS:
        raise ValueError(f"config.eval.split={split!r}; use one of {EVAL_SPLITS} ('train' "
                         "with first_example >= data.max_train_examples: a validation set)")


def write_npz(path, **arrays):
    """np.savez_compressed of plain arrays to `path` atomically (temp file, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _append_worst_case(workdir, result):
    """The worst-case section of report.md (report.py writes the rest)."""
    wc = result["worst_case"]
    only = ", ".join(f"{k} {v}" for k, v in wc["broken_only_by"].items() if v) or "none"
    with open(os.path.join(workdir, workdir_lib.REPORT_MD), "a") as f:
        f.write(f"\n## Worst case per example (the headline robust accuracy)\n\n"
                f"**{report.pct(wc['expected'])}%** of {wc['n_examples']} examples are right "
                f"(expected prediction) on the clean image and under every one of "
                f"{len(wc['members']) - 1} L-inf attacks and modes: "
                f"{', '.join(wc['members'][1:])}. Strongest single attack: {wc['strongest']}. "
                f"Examples that only one member broke: {only}.\n")


def eval_images(config):
    """(x float32 in [0, 1], y): config.eval.max_examples images (0 = all) of the split
    config.eval.split from index config.eval.first_example on. Training images must
    lie beyond data.max_train_examples, the ones the run trained on."""
    (split, first), count = image_range(config.eval), int(config.eval.max_examples)
    if split == "train":
        used = int(config.data.max_train_examples)
        if used == 0 or first < used:
            trained = "all of them" if used == 0 else f"the first {used}"
            raise ValueError(
                f"config.eval.split='train' with first_example={first}, but the run trained on "
                f"{trained}; set config.eval.first_example >= data.max_train_examples (and "
                "beyond the images of any run it was fine-tuned from) to validate on unseen "
                "images")
    x_u8, y = data.load_arrays(config.data.name, split, first + count if count else 0,
                               config.data.data_dir)
    if first >= len(y):
        raise ValueError(f"config.eval.first_example={first}, but the {split} split of "
                         f"{config.data.name} has {len(y)} images; give a smaller index")
    return x_u8[first:].astype(np.float32) / 255.0, y[first:]


def evaluation_kwargs(config):
    """The keyword arguments of evaluation.evaluate_model / evaluate_examples that
    config.eval and config.adv.eps give, but sweep_examples."""
    ev = config.eval
    return dict(eps=float(config.adv.eps), attacks=tuple(ev.attacks),
                eot_attacks=tuple(ev.eot_attacks), eot_samples=int(ev.eot_samples),
                batch_size=int(ev.batch_size), eps_sweep=tuple(ev.eps_sweep),
                num_classes=data.info(config.data.name).num_classes,
                attack_params=ev.to_dict(), eot_only=tuple(ev.get("eot_only", ())),
                predict_batch_size=int(ev.get("predict_batch_size", ev.batch_size)))


def evaluate_arrays(net, x, y, config, verbose=1):
    """evaluation.evaluate_model of `net` on (x, y) with config.eval's settings (checked
    first), in this process; returns (result, worst-case adversarial arrays)."""
    check_eval_config(config.eval)
    return evaluation.evaluate_model(net, x, y, sweep_examples=int(config.eval.sweep_examples),
                                     **evaluation_kwargs(config), return_adversarial=True,
                                     verbose=verbose)


@lock.locked("evaluate")  # one writer per work dir
def evaluate(workdir, overrides=None, verbose=1, cores=None):
    """Evaluates the trained model of `workdir`; writes eval.json, report.md, plots.

    With config.eval.shards != 1 the images are split among worker processes
    (run/eval_shards.py) sharing `cores` (None: all this process may use; a
    pipeline worker passes its share)."""
    t0 = time.time()
    config = config_lib.stage_config(workdir_lib.load_config(workdir), overrides)
    check_eval_config(config.eval)  # before loading anything
    state = workdir_lib.read_state(workdir)
    x, y = eval_images(config)  # a bad index fails before the model loads
    cores = cores or workers_lib.usable_cores()
    floor = workers_lib.thread_floor(config.model.width)
    shards = eval_shards.count(config.eval, len(y), cores, floor)
    net = train_lib.load(workdir) if shards == 1 else None  # else each shard loads it
    if not state["finished"] and verbose:
        print(f"[evaluate] WARNING {workdir} holds an unfinished training "
              f"({state['completed_epochs']} epochs done); evaluating its last checkpoint",
              flush=True)
    if shards == 1:
        result, adv = evaluate_arrays(net, x, y, config, verbose)
    else:
        result, adv = eval_shards.evaluate(workdir, config, len(y), shards, cores, floor,
                                           verbose)
        result["shards"] = shards
    result["workdir"] = os.path.abspath(workdir)
    split, first = image_range(config.eval)
    result["images"] = {"split": split, "first": first}  # the images evaluated
    result["training"] = {"completed_epochs": int(state["completed_epochs"]),
                          "finished": bool(state["finished"])}
    result["onednn"] = precision.onednn_enabled()  # the attacks' kernels (README, oneDNN)
    result["time_s"] = round(time.time() - t0, 1)
    report.write_eval_report(workdir, result, workdir_lib.read_metrics(workdir),
                             train_attack=config.adv.get("method", "pgd"))
    _append_worst_case(workdir, result)
    write_npz(os.path.join(workdir, workdir_lib.ADVERSARIAL_NPZ), eps=np.float32(result["eps"]),
              **adv)
    # eval.json last: the pipeline takes it as the mark of a finished evaluation.
    path = os.path.join(workdir, workdir_lib.EVAL_JSON)
    workdir_lib.write_json(path, result)
    if verbose:
        failed = [c for c in result["sanity"] if not c["held"]]
        for c in failed:
            print(f"[evaluate] WARNING sanity check failed: {c['check']}: {c['detail']}",
                  flush=True)
        print(f"[evaluate] worst case (headline) {result['worst_case']['expected']:.4f}; "
              f"{len(result['sanity']) - len(failed)}/{len(result['sanity'])} sanity "
              f"checks held; wrote {path} and {workdir_lib.REPORT_MD} ({result['time_s']} s)",
              flush=True)
    return result


def tflite_workers(ev):
    """config.eval.tflite_workers, 0 meaning one per CPU core this process may use
    (its affinity, so a container's limit counts), at most 8."""
    n = int(ev.get("tflite_workers", 0))
    if n < 0:
        raise ValueError(f"config.eval.tflite_workers={n}; give >= 1, or 0 for one per CPU core")
    return n or min(8, workers_lib.usable_cores())


def shipped_files(export):
    """export.json's records of the files that ship: noise-off int8, then noisy int8
    (the summary's choice, workdir.shipped_file)."""
    pick = workdir_lib.shipped_file
    return [f for f in (pick(export, False), pick(export, True)) if f is not None]


@lock.locked("evaluate_tflite")  # one writer per work dir
def evaluate_tflite(workdir, overrides=None, verbose=1):
    """The shipped TFLite files of `workdir` under attack; writes tflite_eval.json.

    Reads adversarial.npz (from `brkeras evaluate`) and export.json (from
    `brkeras export`); config.eval's tflite_examples, square_* and eot_samples
    (the draws of a noisy file's expected prediction) set the work.
    """
    t0 = time.time()
    config = config_lib.stage_config(workdir_lib.load_config(workdir), overrides)
    ev = config.eval
    workers = tflite_workers(ev)
    npz = os.path.join(workdir, workdir_lib.ADVERSARIAL_NPZ)
    ex_path = os.path.join(workdir, workdir_lib.EXPORT_JSON)
    if not os.path.exists(npz):
        raise WorkdirError(f"{npz} is missing; run `brkeras evaluate --workdir={workdir}` first "
                           "(it saves the worst-case adversarial examples)")
    if not os.path.exists(ex_path):
        raise WorkdirError(f"{ex_path} is missing; run `brkeras export --workdir={workdir}` first")
    export = workdir_lib.read_json(ex_path)
    files = [dict(f, path=os.path.join(workdir, workdir_lib.EXPORT_DIR, f["file"]))
             for f in shipped_files(export)]
    if not files:
        raise WorkdirError(f"{ex_path} lists no int8 file to attack; export one "
                           "(config.export.formats with dynamic_int8 or full_int8)")
    k = int(ev.get("tflite_examples", 0))
    if k < 0:
        raise ValueError(f"config.eval.tflite_examples={k}; give >= 1 (0 = all)")
    with np.load(npz) as d:  # plain arrays only: allow_pickle stays False
        x, y, x_adv, robust, eps = d["x"], d["y"], d["x_adv"], d["robust"], float(d["eps"])
    k = k or len(x)
    from brkeras.deploy import robustness  # pylint: disable=g-import-not-at-top

    result = robustness.evaluate_files(
        files, x[:k], y[:k], x_adv[:k], eps=eps, draws=int(ev.eot_samples),
        square_examples=int(ev.get("square_examples", 200)),
        square_queries=int(ev.get("square_queries", 500)),
        square_p_init=float(ev.get("square_p_init", 0.05)),
        square_eot_samples=int(ev.get("square_eot_samples", 1)), whitebox_robust=robust[:k],
        seed=int(config.seed), shards=int(ev.get("square_shards", 1)), workers=workers,
        verbose=verbose)
    result["workdir"] = os.path.abspath(workdir)
    # adversarial.npz holds the images eval.json names: record which (and how many)
    ev_path = os.path.join(workdir, workdir_lib.EVAL_JSON)
    evaluated = workdir_lib.read_json(ev_path) if os.path.exists(ev_path) else {}
    if "images" in evaluated:
        result["images"] = dict(evaluated["images"], count=int(k))
    result["time_s"] = round(time.time() - t0, 1)
    path = os.path.join(workdir, workdir_lib.TFLITE_EVAL_JSON)
    workdir_lib.write_json(path, result)
    if verbose:
        for c in result["sanity"]:
            if not c["held"]:
                print(f"[evaluate_tflite] WARNING sanity check failed: {c['check']}: "
                      f"{c['detail']}", flush=True)
        print(f"[evaluate_tflite] wrote {path} ({result['time_s']} s)", flush=True)
    return result
