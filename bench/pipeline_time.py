"""The time of every stage of a pipeline run, per model, as a table. Run by hand.

Read a pipeline dir (a finished or a running `brkeras pipeline`):
  .venv/bin/python bench/pipeline_time.py --pipeline_dir=runs/pipeline [--log=pipeline.log]
      [--compare=runs/pipeline_float32]
Run a pipeline and time each stage:
  .venv/bin/python bench/pipeline_time.py --config=configs/fashion_mnist_enresnet.py \\
      --pipeline_dir=/tmp/pipe [--config.optim.dtype_policy=auto ...]

A stage's seconds come from, in this order: the stage timer of this script (run
mode); the pipeline's own "[pipeline i/n ARG] stage: N s" lines in --log (the
pipeline's stdout); the stage's own record (eval.json time_s); else the gap
between the stage's output file and the previous stage's (the pipeline runs its
stages one after another, so this is the stage's wall time when the pipeline ran
in one go; a resumed pipeline inflates the gap, marked "~"). The train column's
"epochs" is the sum of metrics.jsonl's per-epoch fit times; the rest of the
stage is data loading, tracing, BatchNorm re-estimation and checkpoints.
--compare prints the same table for a second pipeline dir and the ratios
(this dir / that one), e.g. an "auto" dtype-policy run against a float32 one.
With config.pipeline.workers > 1 the stages of different models overlap: their
sum is more than the pipeline's wall time, which --log's "[pipeline] finished
in N s" line gives (printed below the table), and the stage timer of run mode
sees only the benchmark stages (the others run in worker processes: pass
--log with the pipeline's stdout saved, e.g. through `tee`).
"""

import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from brkeras.run import pipeline as pipeline_lib  # noqa: E402
from brkeras.run import workdir as workdir_lib  # noqa: E402

PIPELINE_DIR = flags.DEFINE_string("pipeline_dir", None, "the pipeline dir", required=True)
LOG = flags.DEFINE_string("log", None, "the pipeline's stdout (for its stage timings)")
COMPARE = flags.DEFINE_string("compare", None, "a second pipeline dir to compare with")
CONFIG = config_flags.DEFINE_config_file("config", None, "run this pipeline config first")

STAGE_ORDER = tuple(pipeline_lib.STAGES)
_FINISHED = re.compile(r"\[pipeline\] finished in (?P<s>\d+) s")
_LINE = re.compile(r"\[pipeline \d+/\d+ (?P<arg>[^\]]+)\] (?P<stage>\w+): (?P<s>\d+(\.\d+)?) s")


def model_dirs(pipeline_dir):
    """Model dir names in pipeline order: summary.json's, else by training start."""
    path = os.path.join(pipeline_dir, workdir_lib.SUMMARY_JSON)
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
        rows = summary.get("models", summary) if isinstance(summary, dict) else summary
        names = [r.get("name") or r.get("model") for r in rows if isinstance(r, dict)]
        names = [n for n in names if n and os.path.isdir(os.path.join(pipeline_dir, n))]
        if names:
            return names
    found = [n for n in os.listdir(pipeline_dir)
             if os.path.exists(os.path.join(pipeline_dir, n, workdir_lib.CONFIG))]
    return sorted(found, key=lambda n: _train_start(os.path.join(pipeline_dir, n)) or 0.0)


def _train_start(workdir):
    """The first epoch's start: metrics.jsonl's mtime of line 1 is unknown, so the
    end of the training minus the epochs' fit times, as a lower bound of the start."""
    state = os.path.join(workdir, workdir_lib.STATE)
    if not os.path.exists(state):
        return None
    return os.path.getmtime(state) - sum(r.get("time_s", 0) for r in _metrics(workdir))


def _metrics(workdir):
    path = os.path.join(workdir, workdir_lib.METRICS)
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    break
    return rows


def _marker_time(workdir, stage):
    path = os.path.join(workdir, pipeline_lib.STAGES[stage][2])
    return os.path.getmtime(path) if os.path.exists(path) else None


def log_times(log_path):
    """{(model dir name, stage): seconds} from the pipeline's stdout lines."""
    out = {}
    if not log_path:
        return out
    with open(log_path, errors="replace") as f:
        for line in f:
            for m in _LINE.finditer(line):
                out[(pipeline_lib.model_dir_name(m.group("arg").strip()), m.group("stage"))] = \
                    float(m.group("s"))
    return out


def stage_times(pipeline_dir, measured=None, log_path=None):
    """[(model, {stage: (seconds, source)}, epochs_s)] for every model dir."""
    logged = log_times(log_path)
    measured = measured or {}
    rows, previous_end = [], None
    for name in model_dirs(pipeline_dir):
        wd = os.path.join(pipeline_dir, name)
        epochs = sum(r.get("time_s", 0) for r in _metrics(wd))
        cells = {}
        for stage in STAGE_ORDER:
            end = _marker_time(wd, stage)
            if (name, stage) in measured:
                cells[stage] = (measured[(name, stage)], "timer")
            elif (name, stage) in logged:
                cells[stage] = (logged[(name, stage)], "log")
            elif stage == "evaluate" and end is not None:
                with open(os.path.join(wd, workdir_lib.EVAL_JSON)) as f:
                    t = json.load(f).get("time_s")
                cells[stage] = (t, "eval.json") if t is not None else (None, "")
            elif end is not None and stage == "train" and previous_end is None:
                cells[stage] = (epochs, "~epochs only")  # nothing marks the first start
            elif end is not None and previous_end is not None:
                cells[stage] = (end - previous_end, "~file times")
            if end is not None:
                previous_end = end
        rows.append((name, cells, epochs))
    return rows


def _fmt(cell):
    if not cell or cell[0] is None:
        return "-"
    s, source = cell
    return f"~{s:.0f}" if source.startswith("~") else f"{s:.0f}"


def print_table(pipeline_dir, rows):
    print(f"\n{os.path.abspath(pipeline_dir)}: seconds per stage")
    stages = [s for s in STAGE_ORDER if any(s in c for _, c, _ in rows)]
    print("| model | " + " | ".join(stages) + " | train epochs | total |")
    print("|---|" + "---|" * (len(stages) + 2))
    totals = {s: 0.0 for s in stages}
    for name, cells, epochs in rows:
        total = sum(c[0] for c in cells.values() if c and c[0] is not None)
        for s in stages:
            if cells.get(s) and cells[s][0] is not None:
                totals[s] += cells[s][0]
        print(f"| {name} | " + " | ".join(_fmt(cells.get(s)) for s in stages)
              + f" | {epochs:.0f} | {total:.0f} |")
    grand = sum(totals.values())
    print("| all | " + " | ".join(f"{totals[s]:.0f}" for s in stages)
          + f" | {sum(e for _, _, e in rows):.0f} | {grand:.0f} |")
    sources = sorted({c[1] for _, cells, _ in rows for c in cells.values() if c and c[1]})
    print(f"(sources: {', '.join(sources)}; ~ = estimated from file times, see the docstring)")
    return totals, grand


def _timed_stage_functions(measured):
    """Wraps pipeline_lib.stage_function so every stage call is timed."""
    original = pipeline_lib.stage_function

    def stage_function(stage):
        fn = original(stage)

        def timed(*args, **kwargs):
            workdir = args[1] if stage == "train" else args[0]
            t0 = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                measured[(os.path.basename(os.path.normpath(workdir)), stage)] = time.time() - t0

        timed.__signature__ = __import__("inspect").signature(fn)
        return timed

    pipeline_lib.stage_function = stage_function


def main(_):
    measured = {}
    if CONFIG.value is not None:
        _timed_stage_functions(measured)
        t0 = time.time()
        try:
            pipeline_lib.run(CONFIG.value, PIPELINE_DIR.value)
        finally:
            print(f"\n[pipeline_time] pipeline ran {time.time() - t0:.0f} s; load average "
                  + ", ".join(f"{v:.1f}" for v in os.getloadavg()))
    totals, grand = print_table(PIPELINE_DIR.value,
                                stage_times(PIPELINE_DIR.value, measured, LOG.value))
    if LOG.value:
        with open(LOG.value, errors="replace") as f:
            walls = [float(m.group("s")) for m in _FINISHED.finditer(f.read())]
        if walls:
            print(f"pipeline wall time (the log's last run): {walls[-1]:.0f} s")
    if COMPARE.value:
        other, other_grand = print_table(COMPARE.value, stage_times(COMPARE.value))
        print(f"\nratio {PIPELINE_DIR.value} / {COMPARE.value}: "
              + ", ".join(f"{s} {totals[s] / other[s]:.2f}" for s in totals
                          if other.get(s)) + f"; total {grand / other_grand:.2f}"
              if other_grand else "")


if __name__ == "__main__":
    app.run(main)
