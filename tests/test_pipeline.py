"""brkeras.pipeline and brkeras.summary: every stage per model, resume, summary."""

import contextlib
import copy
import io
import json
import math
import os
import sys
import time

import pytest

from brkeras import errors
from brkeras.run import pipeline
from brkeras.run import summary
from brkeras.run import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import smoke  # noqa: E402  pylint: disable=wrong-import-position

MODELS = ("float,tradeoff", "ternary,tradeoff")
DIRS = ("float_tradeoff", "ternary_tradeoff")
MODEL_FILES = ("config.json", "metrics.jsonl", "state.json", "ckpt", "eval.json", "report.md",
               "plots", "export", "export.json", "bench.json")
NUMERIC = ("train_time_s", "natural", "natural_single", "fgsm", "ifgsm20", "pgd20", "pgd20_eot",
           "cw", "cw_rescaled", "zero_share", "channel_sparsity", "filter_sparsity",
           "tflite_bytes", "latency_ms_noise", "latency_ms_no_noise")


def small_config():
    """The smoke config, cut further: every stage runs, each in seconds."""
    c = smoke.get_config()
    c.pipeline.models = MODELS
    c.data.max_train_examples = 64  # one step per epoch
    c.optim.epochs = 1
    c.eval.max_examples = 32
    c.eval.batch_size = 32
    c.eval.sweep_examples = 32
    c.eval.eps_sweep = (0.0, 0.3)
    c.eval.eot_attacks = ("pgd20",)
    c.eval.cw_steps = 5
    c.export.formats = ("dynamic_int8",)
    c.export.prune = False
    c.export.parity_examples = 32
    c.bench.runs = 3
    return c


def run_quiet(config, pipeline_dir):
    """(rows or the exception raised, stdout) of pipeline.run."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            rows = pipeline.run(config, pipeline_dir)
        except errors.BrkerasError as e:
            rows = e
    return rows, out.getvalue()


def mtimes(directory):
    return {os.path.relpath(os.path.join(d, f), directory): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(directory) for f in files}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A pipeline whose second model's export fails, then the same pipeline run again."""
    pass
    from brkeras.run import export as run_export

    pdir = str(tmp_path_factory.mktemp("pipeline"))
    config = small_config()
    real_export = run_export.export

    def failing_export(workdir, **kwargs):
        if workdir.endswith(DIRS[1]):
            raise RuntimeError("simulated crash in export")
        return real_export(workdir, **kwargs)

    run_export.export = failing_export
    try:
        first, out1 = run_quiet(config, pdir)
    finally:
        run_export.export = real_export
    with open(os.path.join(pdir, "summary.json")) as f:
        summary1 = json.load(f)
    before = {d: mtimes(os.path.join(pdir, d)) for d in DIRS}
    time.sleep(0.05)  # so that a rewritten file would get a later mtime
    rows, out2 = run_quiet(config, pdir)
    return dict(dir=pdir, config=config, first=first, out1=out1, summary1=summary1,
                before=before, rows=rows, out2=out2)


# ---- the failed first run ---------------------------------------------------------


def test_failure_is_reported_after_the_other_stages_ran(pipe):
    e = pipe["first"]
    assert isinstance(e, errors.BrkerasError)
    assert "ternary,tradeoff export: RuntimeError: simulated crash in export" in str(e)
    assert "run the same command again" in str(e)
    out = pipe["out1"]
    assert "[pipeline 2/2 ternary,tradeoff] export: FAILED" in out
    assert "[pipeline 2/2 ternary,tradeoff] benchmark" not in out  # skipped after the failure
    # the summary was still written, with the missing stages as None
    float_row, ternary_row = pipe["summary1"]["models"]
    assert float_row["tflite_bytes"] > 0
    assert ternary_row["natural"] is not None
    assert ternary_row["tflite_bytes"] is None and ternary_row["latency_ms_noise"] is None


# ---- the resumed run --------------------------------------------------------------


def test_resume_keeps_finished_stages(pipe):
    out, before, pdir = pipe["out2"], pipe["before"], pipe["dir"]
    for stage in ("train", "evaluate", "export", "benchmark"):
        assert f"[pipeline 1/2 float,tradeoff] {stage}: done already, kept" in out
    for stage in ("train", "evaluate"):
        assert f"[pipeline 2/2 ternary,tradeoff] {stage}: done already, kept" in out
    for stage in ("export", "benchmark"):
        assert f"[pipeline 2/2 ternary,tradeoff] {stage} ..." in out
    assert mtimes(os.path.join(pdir, DIRS[0])) == before[DIRS[0]]  # nothing rewritten
    after = mtimes(os.path.join(pdir, DIRS[1]))
    assert {k: after[k] for k in before[DIRS[1]]} == before[DIRS[1]]
    assert {"export.json", "bench.json"} <= set(after) - set(before[DIRS[1]])


def test_every_stage_output_exists(pipe):
    for d in DIRS:
        wd = os.path.join(pipe["dir"], d)
        for name in MODEL_FILES:
            assert os.path.exists(os.path.join(wd, name)), f"{d}/{name} missing"
        assert workdir_lib.read_state(wd) == {"completed_epochs": 1, "finished": True}
        assert len(workdir_lib.read_metrics(wd)) == 1
        assert sorted(os.listdir(os.path.join(wd, "plots"))) == [
            "accuracy_vs_eps.png", "sparsity_per_layer.png", "training_curves.png"]
        tflite = sorted(f for f in os.listdir(os.path.join(wd, "export")) if f.endswith(".tflite"))
        assert tflite == ["det_dynamic_int8.tflite", "noisy_dynamic_int8.tflite"]
        with open(os.path.join(wd, "bench.json")) as f:
            bench = json.load(f)
        assert sorted(r["file"] for r in bench["results"]) == tflite
        assert all(r["threads"] == 1 and r["runs"] == 3 for r in bench["results"])


def test_shipped_files_are_timed_side_by_side(pipe):
    label = "[pipeline] side-by-side latency of the shipped files"
    assert f"{label} ..." in pipe["out1"]  # the float model's file alone: the other failed
    assert f"{label} ..." in pipe["out2"]  # timed again: a second model has a file now
    with open(os.path.join(pipe["dir"], "latency.json")) as f:
        lat = json.load(f)
    assert lat["baseline"] == DIRS[0]  # smoke's bench.baseline_model is "": the first
    assert [(r["model"], r["file"], r["threads"], r["runs"]) for r in lat["results"]] == [
        (d, "det_dynamic_int8.tflite", 1, 3) for d in DIRS]
    assert lat["results"][0]["speedup"] == 1.0
    assert lat["results"][1]["speedup"] == pytest.approx(
        lat["results"][0]["median_ms"] / lat["results"][1]["median_ms"])
    for r, row in zip(lat["results"], pipe["rows"]):
        assert row["side_by_side_ms"] == {"1": r["median_ms"]}
        assert row["speedup_vs_baseline"] == {"1": r["speedup"]}
    from brkeras.run import benchmark as run_benchmark
    assert run_benchmark.comparison_is_current(pipe["dir"], list(DIRS))


def test_stages_used_the_pipeline_config(pipe):
    config = pipe["config"]
    for d, arg in zip(DIRS, MODELS):
        wd = os.path.join(pipe["dir"], d)
        stored = workdir_lib.load_config(wd)
        assert stored.quant.precision == arg.split(",")[0]
        assert tuple(stored.pipeline.models) == (arg,)
        with open(os.path.join(wd, "eval.json")) as f:
            ev = json.load(f)
        assert ev["n_examples"] == config.eval.max_examples == 32
        assert ev["eps_sweep"]["eps"] == [0.0, 0.3]
        assert ev["attacks"]["pgd20"]["eot"] is not None and ev["attacks"]["fgsm"]["eot"] is None


def test_summary_json(pipe):
    with open(os.path.join(pipe["dir"], "summary.json")) as f:
        rows = json.load(f)["models"]
    assert rows == json.loads(json.dumps(pipe["rows"]))
    assert [r["model"] for r in rows] == list(DIRS)
    for r in rows:
        assert set(r) == set(summary.ROW_KEYS)
        for key in NUMERIC:
            v = r[key]
            assert isinstance(v, (int, float)) and math.isfinite(v), (r["model"], key, v)
        for key in ("natural", "fgsm", "ifgsm20", "pgd20", "pgd20_eot", "cw", "zero_share"):
            assert 0 <= r[key] <= 1
        assert r["epochs"] == 1 and r["n_test"] == 32
        assert r["tflite_file"] == "det_dynamic_int8.tflite"  # no full int8 exported here
        assert r["tflite_bytes"] == os.path.getsize(
            os.path.join(pipe["dir"], r["model"], "export", r["tflite_file"]))
        assert isinstance(r["sanity_failed"], list)
    float_row, ternary_row = rows
    assert float_row["zero_share"] == 0.0  # float kernels have no exact zeros
    assert ternary_row["zero_share"] > 0.0
    # the row repeats the model's own eval.json
    with open(os.path.join(pipe["dir"], DIRS[1], "eval.json")) as f:
        ev = json.load(f)
    assert ternary_row["pgd20"] == ev["attacks"]["pgd20"]["plain"]["expected"]
    assert ternary_row["zero_share"] == ev["sparsity"]["overall"]["zero_share"]


def test_summary_md(pipe):
    with open(os.path.join(pipe["dir"], "summary.md")) as f:
        text = f.read()
    lines = text.splitlines()
    for columns in (summary.COLUMNS, summary.EFFICIENCY):
        header = "| " + " | ".join(c for c, _, _ in columns) + " |"
        assert header in text
        body = lines[lines.index(header) + 2:lines.index(header) + 2 + len(DIRS)]
        assert [line.split(" | ")[0] for line in body] == [f"| {d}" for d in DIRS]
        assert all(line.count("|") == len(columns) + 1 for line in body)


def test_changed_training_config_is_refused(pipe):
    config = copy.deepcopy(pipe["config"])
    config.optim.lr = 0.01
    before = mtimes(pipe["dir"])
    with pytest.raises(errors.WorkdirError, match=r"(?s)optim\.lr: 0\.05 -> 0\.01.*--overwrite"):
        pipeline.run(config, pipe["dir"])
    assert mtimes(pipe["dir"]) == before


# ---- no training needed ---------------------------------------------------------


@pytest.mark.parametrize("field, value, match", [
    ("models", ("float,tradeoff", "ternray,tradeoff"), "unknown config argument 'ternray'"),
    ("models", ("float,tradeoff", "float,tradeoff"), "more than once"),
    ("models", (), "empty"),
    ("stages", ("train", "deploy"), "'deploy'; choose from"),
])
def test_bad_pipeline_config_fails_before_any_work(tmp_path, field, value, match):
    c = small_config()
    c.pipeline[field] = value
    with pytest.raises(ValueError, match=match):
        pipeline.run(c, str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


def _chain_config(sources):
    c = small_config()
    c.pipeline.models = ("float,tradeoff", "ternary,tradeoff", "ternary,tradeoff,sparse")
    c.pipeline.finetune.from_model = "float,tradeoff"
    c.pipeline.finetune.sources = sources
    return c


def test_finetune_sources_pick_each_model_its_start():
    c = _chain_config((("ternary,tradeoff,sparse", "ternary,tradeoff"),))
    assert pipeline.finetune_source(c, "float,tradeoff") == ""
    assert pipeline.finetune_source(c, "ternary,tradeoff") == "float,tradeoff"
    assert pipeline.finetune_source(c, "ternary,tradeoff,sparse") == "ternary,tradeoff"
    mc = pipeline.model_config(c, "ternary,tradeoff,sparse", "/p")
    assert mc.init_from == os.path.abspath("/p/ternary_tradeoff")
    assert mc.optim.epochs == c.pipeline.finetune.epochs  # the fine-tune schedule
    assert pipeline.model_config(c, "ternary,tradeoff", "/p").init_from == "/p/float_tradeoff"
    c.pipeline.finetune.sources = ()
    assert pipeline.finetune_source(c, "ternary,tradeoff,sparse") == "float,tradeoff"


def test_finetune_sources_survive_the_json_round_trip(tmp_path):
    c = _chain_config((("ternary,tradeoff,sparse", "ternary,tradeoff"),))
    workdir_lib.write_json(str(tmp_path / "config.json"), workdir_lib.config_to_dict(c))
    stored = workdir_lib.load_config(str(tmp_path))  # the pairs come back as lists
    assert pipeline.finetune_source(stored, "ternary,tradeoff,sparse") == "ternary,tradeoff"
    pipeline._check(stored, str(tmp_path / "p"))


def test_a_narrowed_pipeline_drops_the_sources_of_models_it_leaves_out():
    c = _chain_config((("ternary,tradeoff,sparse", "ternary,tradeoff"),))
    c.pipeline.models = ("float,tradeoff", "ternary,tradeoff")
    assert [a for a, _, _ in pipeline._check(c)] == ["float,tradeoff", "ternary,tradeoff"]


@pytest.mark.parametrize("sources, match", [
    ((("ternary,tradeoff", "ternary,tradeoff,sparse"),), "before the model"),
    ((("ternary,tradeoff,sparse", "4bit,tradeoff"),), "must be in config.pipeline.models"),
    ((("ternary,tradeoff", "ternary,tradeoff,sparse"),), "drop the pair"),
    ((("float,tradeoff", "ternary,tradeoff"),), "before the model"),
    (("ternary,tradeoff,sparse",), "pairs"),
    ((("ternary,tradeoff,sparse", "ternary,tradeoff"), ("ternary,tradeoff,sparse", "float,tradeoff")),
     "more than once"),
])
def test_bad_finetune_sources_fail_before_any_work(tmp_path, sources, match):
    with pytest.raises(ValueError, match=match):
        pipeline.run(_chain_config(sources), str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("models, sources, match", [
    (("float,tradeoff", "int8_qat,tradeoff", "ternary,tradeoff,sparse"),
     (("ternary,tradeoff,sparse", "int8_qat,tradeoff"),), "int8 QAT model is no start"),
    (("float,tradeoff", "ternary,tradeoff,w6", "ternary,tradeoff,sparse"),  # smoke: width 4
     (("ternary,tradeoff,sparse", "ternary,tradeoff,w6"),), "model.width"),
])
def test_a_source_that_cannot_start_its_model_fails_before_any_work(tmp_path, models, sources,
                                                                      match):
    c = _chain_config(sources)
    c.pipeline.models = models
    with pytest.raises(ValueError, match=match):
        pipeline.run(c, str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


def test_sources_need_a_from_model(tmp_path):
    c = _chain_config((("ternary,tradeoff,sparse", "ternary,tradeoff"),))
    c.pipeline.finetune.from_model = ""
    with pytest.raises(ValueError, match="set from_model"):
        pipeline.run(c, str(tmp_path / "p"))


def test_stage_done_needs_a_newer_output(tmp_path):
    wd = str(tmp_path)
    assert not pipeline._stage_done(wd, "train")  # pylint: disable=protected-access
    workdir_lib.write_state(wd, 1, finished=False)
    assert not pipeline._stage_done(wd, "train")  # pylint: disable=protected-access
    for name in ("eval.json", "export.json", "bench.json"):
        workdir_lib.write_json(os.path.join(wd, name), {})
    assert not pipeline._stage_done(wd, "evaluate")  # pylint: disable=protected-access
    workdir_lib.write_state(wd, 1, finished=True)
    # state.json is now newer than every later output: they are stale
    t = os.path.getmtime(os.path.join(wd, "state.json"))
    os.utime(os.path.join(wd, "eval.json"), (t - 10, t - 10))
    os.utime(os.path.join(wd, "export.json"), (t + 10, t + 10))
    os.utime(os.path.join(wd, "bench.json"), (t + 5, t + 5))
    done = {s: pipeline._stage_done(wd, s) for s in pipeline.STAGES}  # pylint: disable=protected-access
    assert done == {"train": True, "evaluate": False, "export": True, "benchmark": False,
                    "evaluate_tflite": False}



def test_tflite_attacks_are_stale_after_a_new_evaluation(tmp_path):
    wd = str(tmp_path)
    workdir_lib.write_state(wd, 1, finished=True)
    t = os.path.getmtime(os.path.join(wd, "state.json"))
    for name, dt in (("eval.json", 10), ("export.json", 10), ("tflite_eval.json", 20)):
        path = os.path.join(wd, name)
        workdir_lib.write_json(path, {})
        os.utime(path, (t + dt, t + dt))
    assert pipeline._stage_done(wd, "evaluate_tflite")  # pylint: disable=protected-access
    os.utime(os.path.join(wd, "eval.json"), (t + 30, t + 30))  # evaluated again
    assert not pipeline._stage_done(wd, "evaluate_tflite")  # pylint: disable=protected-access


def test_a_config_field_added_later_is_no_change(tmp_path):
    """config.json of an older version lacks fields added since; their defaults apply."""
    config = smoke.get_config("ternary,tradeoff,sparse")  # sparsity on: its fields count
    old = workdir_lib.config_to_dict(config)
    del old["sparsity"]["cost_power"], old["sparsity"]["cost"], old["optim"]["dtype_policy"]
    workdir_lib.write_json(os.path.join(str(tmp_path), "config.json"), old)
    assert workdir_lib.training_diff(str(tmp_path), config) == []
    config.optim.dtype_policy = "mixed_bfloat16"  # a real change still shows
    assert workdir_lib.training_diff(str(tmp_path), config) == [
        "optim.dtype_policy: 'float32' -> 'mixed_bfloat16'"]


def test_sparsity_settings_of_a_run_without_sparsity_are_no_change(tmp_path):
    """A dense run's stored sparsity section is inert: new defaults there keep the run."""
    config = smoke.get_config("float,tradeoff")
    workdir_lib.write_json(os.path.join(str(tmp_path), "config.json"),
                           workdir_lib.config_to_dict(config))
    config.sparsity.target_share, config.sparsity.cost = 0.45, "params"
    assert workdir_lib.training_diff(str(tmp_path), config) == []
    config.sparsity.enabled = True  # ... but a run that now would shrink channels differs
    assert "sparsity.enabled: False -> True" in workdir_lib.training_diff(str(tmp_path), config)


def test_model_row_of_an_empty_dir(tmp_path):
    row = summary.model_row(str(tmp_path), "nothing_here")
    assert set(row) == set(summary.ROW_KEYS)
    assert row["model"] == "nothing_here" and row["epochs"] == 0
    assert all(row[k] is None for k in NUMERIC if k != "train_time_s")
    assert "| nothing_here | - | - |" in summary.markdown([row])


# ---- worker processes (config.pipeline.workers) -----------------------------------


def test_workers_run_the_models_side_by_side_and_contain_a_failure(tmp_path, capfd):
    """Two workers: the float model runs every stage; the ternary fine-tune diverges
    (lr 1e30: a NaN loss in its second step) and fails; the sparse model that
    fine-tunes from it is not run; the summary is written and the error names both."""
    c = small_config()
    c.pipeline.workers = 2
    c.pipeline.models = ("float,tradeoff", "ternary,tradeoff", "ternary,tradeoff,sparse")
    c.pipeline.finetune.from_model = "float,tradeoff"
    c.pipeline.finetune.sources = (("ternary,tradeoff,sparse", "ternary,tradeoff"),)
    c.pipeline.finetune.epochs = 2
    c.pipeline.finetune.milestones = (1,)
    c.pipeline.finetune.lr = 1e30
    c.pipeline.finetune.max_train_examples = 64
    pdir = str(tmp_path)
    with pytest.raises(errors.BrkerasError) as e:
        pipeline.run(c, pdir)
    out = capfd.readouterr().out
    text = str(e.value)
    assert "2 pipeline stage(s) failed" in text
    assert "ternary,tradeoff train:" in text
    assert "ternary,tradeoff,sparse train: not run: its source 'ternary,tradeoff' did not " \
        "train" in text
    assert "[pipeline] 6 jobs of 3 models in up to 2 worker processes" in out
    assert "[pipeline 2/3 ternary,tradeoff] train: FAILED" in out
    # the worker's own lines carry its model
    assert "[float,tradeoff] [train] new run in" in out
    for name in MODEL_FILES:
        assert os.path.exists(os.path.join(pdir, "float_tradeoff", name)), name
    assert not os.path.exists(os.path.join(pdir, "ternary_tradeoff", "eval.json"))
    assert not os.path.exists(os.path.join(pdir, "ternary_tradeoff_sparse"))
    with open(os.path.join(pdir, "summary.json")) as f:
        rows = json.load(f)["models"]
    assert [r["natural"] is not None for r in rows] == [True, False, False]
    assert rows[0]["latency_ms_no_noise"] > 0  # the benchmark ran, after the workers

    # Again: the float model's finished stages are kept without starting a worker.
    with pytest.raises(errors.BrkerasError, match="2 pipeline stage"):
        pipeline.run(c, pdir)
    out = capfd.readouterr().out
    for stage in c.pipeline.stages:
        assert f"[pipeline 1/3 float,tradeoff] {stage}: done already, kept" in out
    assert "[pipeline] 4 jobs of 3 models" in out  # none for the float model


def test_workers_setting_is_checked():
    c = small_config()
    for bad in (0, -1):  # (a float or bool is refused by the ConfigDict itself)
        c.pipeline.workers = bad
        with pytest.raises(ValueError, match="config.pipeline.workers"):
            pipeline._check(c)  # pylint: disable=protected-access
