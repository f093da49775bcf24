"""Issue #14: one writer per work dir, writes that cannot run ahead of the data,
one-line CLI errors, label validation, quiet logs off a terminal, Ctrl-C and resume.

The trainings are `brkeras train` subprocesses of one tiny config (configs/smoke.py,
float, natural loss with Feynman-Kac noise, 2 steps an epoch, 3 epochs), run by
the `runs` fixture, which also probes them while they run:
  * "full": uninterrupted; a second train, an evaluate and a pipeline on its work
    dir are refused while it runs; its stdout (a file, not a TTY) is checked for
    progress-bar backspaces, and so is an evaluate's afterwards;
  * "broken", one work dir trained by three processes in turn: SIGINT once epoch
    1 is logged; then the disk fills up before the next epoch's checkpoint (a
    small tmpfs when this process may mount one, else a checkpoint save that
    fails half-way); then, with the space freed, resumed to the end. It must
    end with the full run's loss: every epoch's randomness follows from (seed,
    epoch) alone.
This file is also the harness of the subprocesses that need a patch (the bottom).
"""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from brkeras.run import console
from brkeras.run import lock
from brkeras.run import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--config=configs/smoke.py:float,natural", "--config.optim.bn_reestimate_batches=0",
         "--config.optim.epochs=3", "--config.data.max_train_examples=128"]
EVAL = ["--config=configs/smoke.py", "--config.eval.attacks=('fgsm',)",
        "--config.eval.eot_attacks=()", "--config.eval.eps_sweep=(0.0,)",
        "--config.eval.max_examples=16", "--config.eval.sweep_examples=16"]
TIMEOUT_S = 600  # a guard against hangs


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "CI")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env


class Proc:
    """A subprocess writing stdout and stderr to files (no pipe-full deadlock)."""

    def __init__(self, tmp, name, args):
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=o, stderr=e,
                                      env=_env())

    def wait(self, timeout=TIMEOUT_S):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise

    @property
    def stdout(self):
        return self.out.read_text()

    @property
    def stderr(self):
        return self.err.read_text()


def brkeras(tmp, name, *args):
    return Proc(tmp, name, ["-m", "brkeras.run.cli", *args])


def harness(tmp, name, *args):
    return Proc(tmp, name, [os.path.abspath(__file__), *args])


def last_line(text):
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else ""


def ckpt_epoch(workdir):
    """The epoch of the latest checkpoint, from tf's `checkpoint` state file (no TF import)."""
    path = os.path.join(workdir, workdir_lib.CKPT, "checkpoint")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        latest = re.search(r'^model_checkpoint_path: "(.*)"$', f.read(), re.M).group(1)
    assert os.path.exists(os.path.join(workdir, workdir_lib.CKPT, latest) + ".index"), latest
    return int(latest.rsplit("-", 1)[1])


def wait_for(condition, what, timeout=TIMEOUT_S):
    t0 = time.time()
    while not condition():
        if time.time() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.1)


def _mount_tmpfs(path):
    """True if a small tmpfs could be mounted at `path` (needs root)."""
    os.makedirs(path)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    t0 = time.time()
    full, disk_mount = tmp / "full", tmp / "disk"
    mode = "tmpfs" if _mount_tmpfs(disk_mount) else "patch"
    broken = disk_mount / "run"
    procs = {"full": brkeras(tmp, "full", "train", *TRAIN, f"--workdir={full}")}
    r = {"mode": mode, "full": full, "broken": broken, "procs": procs}

    def after(workdir):
        return dict(metrics=[m["epoch"] for m in workdir_lib.read_metrics(workdir)],
                    state=workdir_lib.read_state(workdir), ckpt=ckpt_epoch(workdir),
                    files=sorted(os.listdir(workdir / workdir_lib.CKPT)))

    try:
        # Writers refused while "full" holds its work dir.
        wait_for(lambda: lock.holder(full).get("pid") == procs["full"].p.pid, "full's lock")
        probes = {"train": brkeras(tmp, "second_train", "train", *TRAIN, f"--workdir={full}"),
                  "evaluate": brkeras(tmp, "second_eval", "evaluate", f"--workdir={full}"),
                  "pipeline": brkeras(tmp, "second_pipeline", "pipeline",
                                      "--config=configs/smoke.py", f"--workdir={full}")}
        r["probes"] = {k: (p.wait(), p.stderr) for k, p in probes.items()}
        r["full_running_after_probes"] = procs["full"].p.poll() is None

        # Started only now: run beside the probes, its three short epochs could all be
        # done before the signal is sent (seen on a slower machine).
        procs["sigint"] = brkeras(tmp, "sigint", "train", *TRAIN, f"--workdir={broken}")
        metrics = broken / workdir_lib.METRICS
        wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, "epoch 1 logged")
        procs["sigint"].p.send_signal(signal.SIGINT)
        r["sigint_rc"] = procs["sigint"].wait()
        r["after_sigint"] = after(broken)

        procs["disk"] = harness(tmp, "disk", "diskfull", mode, "train", *TRAIN,
                                f"--workdir={broken}")
        r["full_rc"] = procs["full"].wait()
        procs["eval"] = brkeras(tmp, "eval", "evaluate", *EVAL, f"--workdir={full}")
        r["disk_rc"] = procs["disk"].wait()
        r["after_disk"] = after(broken)
        if (disk_mount / "filler").exists():
            (disk_mount / "filler").unlink()
        procs["resumed"] = brkeras(tmp, "resumed", "train", *TRAIN, f"--workdir={broken}")
        r["resumed_rc"] = procs["resumed"].wait()
        r["eval_rc"] = procs["eval"].wait()
        print(f"runs fixture: {time.time() - t0:.0f} s ({mode})")
        yield r
    finally:
        for p in procs.values():
            if p.p.poll() is None:
                p.p.kill()
        if mode == "tmpfs":
            subprocess.run(["umount", "-l", str(disk_mount)], capture_output=True, check=False)


def final_loss(workdir):
    return workdir_lib.read_metrics(workdir)[-1]["loss"]


# ---- one writer per work dir ------------------------------------------------------


def test_second_writer_is_refused_naming_the_holder(runs):
    pid = runs["procs"]["full"].p.pid
    for command, (rc, err) in runs["probes"].items():
        assert rc == 2, (command, err)
        line = last_line(err)
        assert line.startswith(f"brkeras {command}: error: ") and "is being written by" in line
        assert f"PID {pid} on" in line and "brkeras" in line and "since" in line, line
        assert "Traceback" not in err
    assert runs["full_running_after_probes"]  # refused at once, not after the holder ended
    full = runs["full"]
    assert runs["full_rc"] == 0, runs["procs"]["full"].stderr[-3000:]
    assert [m["epoch"] for m in workdir_lib.read_metrics(full)] == [1, 2, 3]  # 3 lines, not 6
    assert workdir_lib.read_state(full) == {"completed_epochs": 3, "finished": True}
    assert sorted(os.listdir(full / "ckpt")) == [
        "checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index",
        "ckpt-3.data-00000-of-00001", "ckpt-3.index"]
    assert lock.holder(full) == {}  # released, details cleared


def test_lock_dies_with_its_process_and_is_reentrant(tmp_path):
    wd = tmp_path / "wd"
    code = ("import sys, time; from brkeras.run import lock\n"
            "with lock.hold(sys.argv[1], 'train'):\n    print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(wd)], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True, env=_env())
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(lock.WorkdirBusyError, match=f"PID {p.pid} on "):
            with lock.hold(str(wd), "evaluate"):
                pass
    finally:
        p.kill()  # SIGKILL: no cleanup; the kernel drops the flock
        p.wait()
    assert lock.holder(wd)["pid"] == p.pid  # the stale details do not block:
    with lock.hold(str(wd), "train"):
        assert lock.holder(wd)["pid"] == os.getpid()
        with lock.hold(str(wd) + "/", "evaluate"):  # the same dir again, in-process
            pass
        assert lock.holder(wd)["pid"] == os.getpid()  # still held by the outer block
    assert lock.holder(wd) == {}
    # A dir the lock created and nothing else wrote to is removed again.
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="stage failed"):
        with lock.hold(str(fresh), "train"):
            raise RuntimeError("stage failed")
    assert not fresh.exists()


# ---- write order, full disk, Ctrl-C ------------------------------------------------


def test_sigint_keeps_the_finished_epochs(runs):
    proc = runs["procs"]["sigint"]
    assert runs["sigint_rc"] == 130, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert line.startswith("brkeras train: interrupted; ") and "run the same command" in line
    assert "Traceback" not in proc.stderr
    after = runs["after_sigint"]
    done = after["ckpt"]
    assert done >= 1 and after["metrics"] == list(range(1, done + 1)), after
    assert after["state"] == {"completed_epochs": done, "finished": False}
    assert (f"epoch {done} is kept" if done == 1 else f"epochs 1-{done} are kept") in line


def test_disk_full_keeps_metrics_equal_to_checkpoints(runs):
    proc, done = runs["procs"]["disk"], runs["after_sigint"]["ckpt"]
    assert runs["disk_rc"] == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert line.startswith(f"brkeras train: error: could not save epoch {done + 1} in"), line
    assert "no space left on device" in line and "Free space" in line, line
    assert f"resumes after epoch {done}" in line
    assert "Traceback" not in proc.stderr
    after = runs["after_disk"]
    assert after["metrics"] == list(range(1, done + 1)) and after["ckpt"] == done, after
    assert after["state"] == {"completed_epochs": done, "finished": False}
    assert not [f for f in after["files"] if "_temp" in f or ".tmp" in f], after["files"]


def test_resumed_after_both_ends_with_the_uninterrupted_loss(runs):
    proc = runs["procs"]["resumed"]
    assert runs["resumed_rc"] == 0, proc.stderr[-3000:]
    assert f"after epoch {runs['after_sigint']['ckpt']}" in proc.stdout
    assert [m["epoch"] for m in workdir_lib.read_metrics(runs["broken"])] == [1, 2, 3]
    assert workdir_lib.read_state(runs["broken"]) == {"completed_epochs": 3, "finished": True}
    # The same computation as the uninterrupted run (it differed by ~3% before).
    assert final_loss(runs["broken"]) == pytest.approx(final_loss(runs["full"]), rel=1e-5)


def test_a_kill_between_checkpoint_and_metrics_trains_that_epoch_again(tmp_path, monkeypatch):
    from brkeras.run import train as train_lib  # pylint: disable=import-outside-toplevel

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for n in (1, 2):
        (ckpt / f"ckpt-{n}.index").write_bytes(b"")
    workdir_lib.append_metrics(str(tmp_path), {"epoch": 1, "loss": 1.0})
    latest = str(ckpt / "ckpt-2")
    assert train_lib._logged_checkpoint(str(tmp_path), latest) == str(ckpt / "ckpt-1")
    workdir_lib.append_metrics(str(tmp_path), {"epoch": 2, "loss": 1.0})
    assert train_lib._logged_checkpoint(str(tmp_path), latest) == latest
    assert train_lib._logged_checkpoint(str(tmp_path / "none"), latest) is None  # no metrics



def test_a_failed_batchnorm_resave_keeps_the_last_epoch(tmp_path):
    import errno  # pylint: disable=import-outside-toplevel
    from brkeras.run import train as train_lib  # pylint: disable=import-outside-toplevel

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for suffix in (".index", ".data-00000-of-00001"):
        (ckpt / f"ckpt-2{suffix}").write_bytes(b"x")
    (ckpt / "ckpt-2_temp").mkdir()  # what a save cut short by a full disk leaves

    class FullDisk:
        directory = str(ckpt)

        def save(self, checkpoint_number):
            raise OSError(errno.ENOSPC, "No space left on device")

    for e in (1, 2):
        workdir_lib.append_metrics(str(tmp_path), {"epoch": e, "loss": 1.0})
    workdir_lib.write_state(str(tmp_path), 2, finished=False)
    with pytest.raises(workdir_lib.WorkdirError, match="epoch 2 is kept.*redone"):
        train_lib._save_epoch(FullDisk(), 2, str(tmp_path), resave=True)
    assert sorted(p.name for p in ckpt.iterdir()) == ["ckpt-2.data-00000-of-00001",
                                                      "ckpt-2.index"]
    assert [m["epoch"] for m in workdir_lib.read_metrics(str(tmp_path))] == [1, 2]
    assert workdir_lib.read_state(str(tmp_path))["completed_epochs"] == 2

def test_sigint_is_held_until_the_block_is_done():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with console.sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append(True)  # reached: the signal waited
    assert done == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---- logs off a terminal ------------------------------------------------------------


def test_no_progress_bars_off_a_terminal(runs, monkeypatch):
    out = runs["procs"]["full"].stdout
    assert "\b" not in out and "\r" not in out
    for epoch in (1, 2, 3):
        assert f"Epoch {epoch}/3\n" in out
    assert out.count(" - loss: ") == 3  # one line per epoch (fit verbose=2)
    rc, ev = runs["eval_rc"], runs["procs"]["eval"]
    assert rc == 0, ev.stderr[-3000:]
    assert "\b" not in ev.stdout and "\r" not in ev.stdout
    assert "[evaluate] fgsm (plain" in ev.stdout  # a line per attack, no bar
    # The choice itself: bars on a terminal only, and never with CI set.
    tty = type("Tty", (), {"isatty": lambda self: True})()
    monkeypatch.delenv("CI", raising=False)
    with open(os.devnull, "w") as null:
        assert console.interactive(tty) and not console.interactive(null)
    monkeypatch.setattr(sys, "stdout", tty)
    assert console.progress_verbose() == 1
    monkeypatch.setenv("CI", "true")
    assert console.progress_verbose() == 2


# ---- one-line CLI errors ------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["train", "--config=configs/nope.py"], "--config=configs/nope.py: no such file"),
    (["train", "--config=configs/smoke.py", "--config.optim.nonsense=1"],
     "--config.optim.nonsense: the config has no field 'nonsense'"),
    (["train", "--config=configs/smoke.py", "--config.optim.epohcs=3"],
     'Did you mean "epochs"'),
    (["train", "--config=configs/smoke.py", "--config.adv.eps=abc"],
     "flag --config.adv.eps=abc: could not convert string to float: 'abc'"),
    (["train", "--config=configs/smoke.py:septenary"], "unknown config argument 'septenary'"),
    (["train", "--config=configs/smoke.py", "--epochz=3"], "Unknown command line flag 'epochz'"),
    (["fly"], "expected one command of train"),
    (["train"], "needs --config"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, args, message):
    wd = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "brkeras.run.cli", *args, f"--workdir={wd}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "error: " in lines[0] and message in lines[0], proc.stderr
    assert not wd.exists()  # nothing written


def test_debug_shows_the_traceback_and_ctrl_c_is_one_line(tmp_path):
    args = [sys.executable, "-m", "brkeras.run.cli", "train", "--config=configs/smoke.py",
            "--config.optim.nonsense=1", f"--workdir={tmp_path}/w", "--debug"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert "the config has no field 'nonsense'" in last_line(proc.stderr)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "sigint_pipeline",
                           "pipeline", "--config=configs/smoke.py", f"--workdir={tmp_path}/p"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"brkeras pipeline: interrupted; the finished stages and epochs in {tmp_path}/p are "
        "kept; run the same command to resume"]


# ---- data validation ------------------------------------------------------------------


def _npz(path, y_train, y_test, **more):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (len(y_train), 28, 28, 1), dtype=np.uint8),
             y_train=np.asarray(y_train), y_test=np.asarray(y_test),
             x_test=rng.integers(0, 256, (len(y_test), 28, 28, 1), dtype=np.uint8), **more)
    return str(path)


def test_labels_outside_the_classes_are_an_error(tmp_path):
    from brkeras import data  # pylint: disable=import-outside-toplevel

    shifted = _npz(tmp_path / "shifted.npz", np.arange(50, 60).repeat(3), np.arange(10).repeat(2))
    with pytest.raises(ValueError, match=r"y_train has labels outside \[0, 20\) \(50, 51, 52, "
                                         r"53, 54, \.\.\.; min 50, max 59\); num_classes = 20"):
        data.info(shifted)
    one_based = _npz(tmp_path / "one_based.npz", np.arange(1, 11), np.arange(1, 11))
    with pytest.raises(ValueError, match=r"labels outside \[0, 10\) \(10; min 1, max 10\)"):
        data.load_arrays(one_based, "test")
    named = _npz(tmp_path / "named.npz", np.arange(5), np.arange(3),
                 class_names=np.array(list("abcdef")))
    assert data.info(named).num_classes == 6  # a class without examples is fine with names
    too_few = _npz(tmp_path / "few.npz", np.arange(5), np.arange(3),
                   class_names=np.array(list("abc")))
    with pytest.raises(ValueError, match=r"y_train has labels outside \[0, 3\).*len\(class_names"):
        data.info(too_few)
    assert data.info(_npz(tmp_path / "ok.npz", np.arange(10), [0, 3])).num_classes == 10


def test_bad_labels_from_the_cli_are_one_line_and_write_nothing(tmp_path):
    shifted = _npz(tmp_path / "shifted.npz", np.arange(50, 60).repeat(3), np.arange(10).repeat(2))
    wd = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "brkeras.run.cli", "train",
                           "--config=configs/smoke.py", f"--config.data.name={shifted}",
                           f"--workdir={wd}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=_env())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "labels outside [0, 20)" in last_line(proc.stderr)
    assert not wd.exists()


# ---------------------------------------------------------------------------------------
# Harness (runs in the subprocesses)


def _fill(directory):
    """Writes directory/filler until the file system is full."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1 << 9):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


def _main_disk_full(mode, argv):
    from brkeras._keras import tf  # pylint: disable=import-outside-toplevel
    from brkeras.run import cli  # pylint: disable=import-outside-toplevel
    from brkeras.run import train as train_lib  # pylint: disable=import-outside-toplevel

    original = train_lib.EpochLogger.on_epoch_end
    first = []

    def on_epoch_end(self, epoch, logs=None):
        if not first:  # the first epoch this process trains: its checkpoint cannot be written
            first.append(epoch)
            if mode == "tmpfs":
                _fill(os.path.dirname(self.workdir))
            else:
                directory = self.manager.directory

                def half_written(checkpoint_number=None, **kwargs):
                    temp = os.path.join(directory, f"ckpt-{checkpoint_number}_temp")
                    os.makedirs(temp, exist_ok=True)
                    with open(os.path.join(temp, "part-00000-of-00001.index"), "wb") as f:
                        f.write(b"\0" * 100)
                    raise tf.errors.ResourceExhaustedError(
                        None, None, f"{temp}/part-00000-of-00001.data-00000-of-00001.tempstate1; "
                        "No space left on device")

                self.manager.save = half_written
        original(self, epoch, logs)

    train_lib.EpochLogger.on_epoch_end = on_epoch_end
    sys.argv = ["brkeras", *argv]
    cli.run()


def _main_sigint_pipeline(argv):
    from brkeras.run import cli  # pylint: disable=import-outside-toplevel
    from brkeras.run import pipeline  # pylint: disable=import-outside-toplevel

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)

    pipeline.run = interrupted
    sys.argv = ["brkeras", *argv]
    cli.run()


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    if sys.argv[1] == "diskfull":
        _main_disk_full(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "sigint_pipeline":
        _main_sigint_pipeline(sys.argv[2:])
    else:
        raise SystemExit(f"unknown harness mode {sys.argv[1]!r}")
