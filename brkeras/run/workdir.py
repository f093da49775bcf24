"""A run's work dir: its resolved config, metrics log and state, written safely.

Layout: config.json (resolved config), metrics.jsonl (one JSON line per epoch),
state.json ({"completed_epochs", "finished"}), ckpt/, tb/, and the later stages'
outputs. Files are replaced atomically (write to a temp file, then rename), so a
killed run never leaves a half-written JSON file behind.
"""

import json
import math
import os
import shutil
import tempfile

import ml_collections

from brkeras.errors import WorkdirError
from brkeras.run import config as config_lib

CONFIG = "config.json"
METRICS = "metrics.jsonl"
STATE = "state.json"
CKPT = "ckpt"
TB = "tb"
BATCHNORM = "batchnorm.json"  # the BatchNorm re-estimation report
# Later stages' outputs; every stage reads and writes them by these names.
EVAL_JSON = "eval.json"
ADVERSARIAL_NPZ = "adversarial.npz"  # the evaluation's worst-case x_adv, for evaluate_tflite
TFLITE_EVAL_JSON = "tflite_eval.json"  # attacks on the exported files
REPORT_MD = "report.md"
PLOTS = "plots"
EXPORT_DIR = "export"
EXPORT_JSON = "export.json"
BENCH_JSON = "bench.json"
SUMMARY_JSON = "summary.json"  # in a pipeline dir
SUMMARY_MD = "summary.md"
LATENCY_JSON = "latency.json"  # in a pipeline dir: the shipped files timed side by side
# The write lock (run/lock.py), there while a stage writes the dir; no stage output.
LOCK = ".lock"
TRAIN_OUTPUTS = (CONFIG, METRICS, STATE, CKPT, TB, BATCHNORM)
# Config sections that later stages may change without training again.
STAGE_SECTIONS = ("eval", "export", "bench", "pipeline")


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if hasattr(x, "item"):  # numpy / tf scalars
        return _jsonable(x.item())
    return x


def write_json(path, obj):
    """Writes `obj` as JSON to `path` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(obj), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise WorkdirError(f"{path} is corrupt ({e}); remove it or use a new work dir") from e


def config_to_dict(config):
    return json.loads(config.to_json_best_effort())


def load_config(workdir):
    """The resolved config a run was started with."""
    path = os.path.join(workdir, CONFIG)
    if not os.path.exists(path):
        raise WorkdirError(
            f"{workdir} holds no trained run ({CONFIG} missing); run "
            f"`brkeras train --config=... --workdir={workdir}` first")
    return ml_collections.ConfigDict(read_json(path))


def read_state(workdir):
    path = os.path.join(workdir, STATE)
    if not os.path.exists(path):
        return {"completed_epochs": 0, "finished": False}
    return read_json(path)


def write_state(workdir, completed_epochs, finished):
    write_json(os.path.join(workdir, STATE),
               {"completed_epochs": int(completed_epochs), "finished": bool(finished)})


def append_metrics(workdir, record):
    with open(os.path.join(workdir, METRICS), "a") as f:
        f.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(workdir):
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a kill: ignore it and everything after
    return rows


def record_epoch(workdir, record):
    """Logs the epoch `record["epoch"]` after its checkpoint is saved: metrics.jsonl
    (rows of earlier epochs + record), then state.json, each replaced atomically
    and synced, so a full disk or a kill leaves either file old or new, never cut."""
    epoch = int(record["epoch"])
    rows = [r for r in read_metrics(workdir) if r.get("epoch", 0) < epoch] + [record]
    path = os.path.join(workdir, METRICS)
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w") as f:
            for r in rows:
                f.write(json.dumps(_jsonable(r), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    write_state(workdir, epoch, finished=False)


def truncate_metrics(workdir, completed_epochs):
    """Keeps only the metric lines of epochs <= completed_epochs (resume after a kill)."""
    rows = [r for r in read_metrics(workdir) if r.get("epoch", 0) <= completed_epochs]
    path = os.path.join(workdir, METRICS)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, path)


def config_diff(old, new, ignore=(), prefix=""):
    """Lines "a.b: old -> new" for every field that differs; top-level sections in
    `ignore` are skipped."""
    out = []
    for k in sorted(set(old) | set(new)):
        if not prefix and k in ignore:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, prefix=f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def training_diff(workdir, config):
    """Differences of the config stored in `workdir` (if any) with `config` that
    need a new training: every section but STAGE_SECTIONS, and but `sparsity`
    when both runs train without it (its settings then change nothing)."""
    path = os.path.join(workdir, CONFIG)
    if not os.path.exists(path):
        return []
    # A field added to the schema after the run was made counts as its default
    # there (the code reads old configs with that default), not as a change.
    old = _with_defaults(read_json(path), config_to_dict(config_lib.base_config()))
    new = config_to_dict(config)
    ignore = STAGE_SECTIONS
    if not old.get("sparsity", {}).get("enabled") and not new.get("sparsity", {}).get("enabled"):
        ignore += ("sparsity",)
    return config_diff(old, new, ignore=ignore)


def _with_defaults(old, defaults):
    out = dict(old)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = _with_defaults(out[k], v)
    return out


def prepare_for_training(workdir, config, overwrite=False):
    """Readies `workdir` for `train`; returns "new" or "resume".

    A finished run is never overwritten silently: without `overwrite` it is an
    error. An unfinished run with the same config resumes; with a different
    config it is an error that lists the differences.
    """
    cfg_path = os.path.join(workdir, CONFIG)
    if overwrite:
        for name in TRAIN_OUTPUTS:
            path = os.path.join(workdir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    elif os.path.exists(cfg_path):
        state = read_state(workdir)
        if state["finished"]:
            raise WorkdirError(
                f"{workdir} already holds a finished run ({state['completed_epochs']} "
                "epochs). Evaluate it with `brkeras evaluate`, choose another "
                "--workdir, or pass --overwrite to train again from scratch.")
        diff = training_diff(workdir, config)
        if diff:
            raise WorkdirError(
                f"{workdir} holds an unfinished run with a different config:\n  "
                + "\n  ".join(diff)
                + "\nResume it with the same config, or pass --overwrite to start over.")
        return "resume"
    os.makedirs(workdir, exist_ok=True)
    write_json(cfg_path, config_to_dict(config))
    return "new"


def shipped_file(export, noise):
    """The export.json entry of the int8 file a user would ship (pruned if available):
    with noise, dynamic-range int8 (export.noisy_formats has no full int8); without,
    full int8; or the tfmot QAT model's own int8 file. None if there is none."""
    if not export:
        return None
    # in order of preference; noise off falls back to dynamic int8 when full int8
    # was not exported (or was dropped by its parity check)
    wanted = (("dynamic_int8", "qat_int8") if noise
              else ("full_int8", "qat_int8", "dynamic_int8"))
    files = [f for f in export["files"] if f["noise"] == noise and f["format"] in wanted]
    files.sort(key=lambda f: (wanted.index(f["format"]), not f["pruned"]))
    return files[0] if files else None
