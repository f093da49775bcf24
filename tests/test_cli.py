"""The command line: usage errors, config errors, work-dir protection."""

import json
import os
import subprocess
import sys

import pytest

from brkeras.run import config as config_lib
from brkeras.run import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brkeras(*args, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "brkeras.run.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_help_lists_commands():
    code, out = brkeras("--help")
    assert code in (0, 1)  # absl exits 1 after --help
    for command in ("train", "evaluate", "export", "benchmark", "pipeline"):
        assert command in out


def test_unknown_command_and_missing_workdir():
    code, out = brkeras("fly", "--workdir=/tmp/x")
    assert code != 0 and "expected one command of train" in out
    code, out = brkeras("train", "--config=configs/smoke.py")
    assert code != 0 and "needs --workdir" in out


def test_unknown_flag_is_an_error():
    code, out = brkeras("train", "--config=configs/smoke.py", "--workdir=/tmp/x", "--epochz=3")
    assert code != 0 and "epochz" in out


def test_unknown_config_file_and_field(tmp_path):
    code, out = brkeras("train", "--config=configs/nope.py", f"--workdir={tmp_path}/w")
    assert code != 0 and "nope.py" in out
    code, out = brkeras("train", "--config=configs/smoke.py", f"--workdir={tmp_path}/w",
                        "--config.optim.epohcs=3")
    assert code != 0 and "epohcs" in out
    assert not os.path.exists(tmp_path / "w")  # nothing written


def test_bad_config_arg_and_value(tmp_path):
    code, out = brkeras("train", "--config=configs/smoke.py:septenary", f"--workdir={tmp_path}/w")
    assert code != 0 and "unknown config argument 'septenary'" in out
    assert not os.path.exists(tmp_path / "w")
    code, out = brkeras("train", "--config=configs/smoke.py", f"--workdir={tmp_path}/w",
                        "--config.model.depth=9")
    assert code == 2 and "6n+2" in out
    assert not os.path.exists(tmp_path / "w")


def test_evaluate_without_a_run_says_train_first(tmp_path):
    code, out = brkeras("evaluate", f"--workdir={tmp_path}/none")
    assert code == 2 and "brkeras train" in out


def test_apply_arg_tokens():
    c = config_lib.apply_arg(config_lib.base_config(), "4bit,trades,en2,d56,w32")
    assert (c.quant.precision, c.loss.name, c.model.ensemble, c.model.depth, c.model.width) == (
        "4bit", "trades", 2, 56, 32)


def test_workdir_protection(tmp_path):
    c = config_lib.base_config()
    wd = str(tmp_path / "run")
    assert workdir_lib.prepare_for_training(wd, c) == "new"
    assert json.load(open(os.path.join(wd, "config.json")))["loss"]["name"] == "tradeoff"
    assert workdir_lib.prepare_for_training(wd, c) == "resume"
    changed = config_lib.base_config()
    changed.optim.lr = 0.5
    with pytest.raises(workdir_lib.WorkdirError, match="optim.lr: 0.1 -> 0.5"):
        workdir_lib.prepare_for_training(wd, changed)
    workdir_lib.append_metrics(wd, {"epoch": 1, "loss": 1.0})
    workdir_lib.write_state(wd, 1, finished=True)
    with pytest.raises(workdir_lib.WorkdirError, match="--overwrite"):
        workdir_lib.prepare_for_training(wd, c)
    # Still intact after the refusal.
    assert workdir_lib.read_metrics(wd) == [{"epoch": 1, "loss": 1.0}]
    assert workdir_lib.prepare_for_training(wd, changed, overwrite=True) == "new"
    assert workdir_lib.read_metrics(wd) == []


def test_metrics_survive_a_cut_line(tmp_path):
    wd = str(tmp_path)
    workdir_lib.append_metrics(wd, {"epoch": 1, "loss": 2.0})
    workdir_lib.append_metrics(wd, {"epoch": 2, "loss": 1.5})
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 3, "lo')  # killed mid-write
    assert [r["epoch"] for r in workdir_lib.read_metrics(wd)] == [1, 2]
    workdir_lib.truncate_metrics(wd, 1)
    assert [r["epoch"] for r in workdir_lib.read_metrics(wd)] == [1]


def test_corrupt_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(workdir_lib.WorkdirError, match="corrupt"):
        workdir_lib.load_config(str(tmp_path))
