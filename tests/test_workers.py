"""run/workers.py: jobs in spawned processes, in dependency order, failures contained."""

import os
import subprocess
import sys
import time

import pytest

from brkeras.run import workers


# Job functions run in spawned processes: top-level, importable from this module.
def write_marker(directory, name, after=(), threads=None):
    """Writes DIR/name holding the thread count; fails if a job it needs left no marker."""
    missing = [a for a in after if not os.path.exists(os.path.join(directory, a))]
    if missing:
        return ("order", f"{name} ran before {missing}")
    time.sleep(0.2)
    with open(os.path.join(directory, name), "w") as f:
        f.write(str(threads))
    return None


def fail(name, threads=None):
    return ("train", f"{name} failed on purpose")


def die(threads=None):
    os._exit(3)  # pylint: disable=protected-access


def raise_error(threads=None):
    raise RuntimeError("raised in the worker")


def job(key, fn, args, needs=(), rank=0, min_threads=1):
    return workers.Job(key=key, needs=tuple(needs), rank=rank, fn=fn, args=tuple(args),
                       min_threads=min_threads)


def test_jobs_run_after_their_needs_with_their_share_of_threads(tmp_path):
    d = str(tmp_path)
    jobs = [job(("a",), write_marker, (d, "a")),
            job(("b",), write_marker, (d, "b", ("a",)), needs=[("a",)]),
            job(("c",), write_marker, (d, "c", ("a",)), needs=[("a",)]),
            job(("d",), write_marker, (d, "d", ("b", "c")), needs=[("b",), ("c",)])]
    outcome = workers.run_jobs(jobs, workers=2, cores=4)
    assert outcome == {("a",): None, ("b",): None, ("c",): None, ("d",): None}
    threads = {n: int(open(os.path.join(d, n)).read()) for n in "abcd"}
    # a and d ran alone (all 4 cores); b and c side by side (4 / 2 each)
    assert threads == {"a": 4, "b": 2, "c": 2, "d": 4}


def test_failures_skip_what_needs_them_and_the_rest_still_runs(tmp_path):
    d = str(tmp_path)
    jobs = [job(("src",), fail, ("src",)),
            job(("child",), write_marker, (d, "child"), needs=[("src",)]),
            job(("grandchild",), write_marker, (d, "grandchild"), needs=[("child",)]),
            job(("dies",), die, ()),
            job(("raises",), raise_error, ()),
            job(("free",), write_marker, (d, "free"), min_threads=2)]
    outcome = workers.run_jobs(jobs, workers=2, cores=1)
    assert outcome[("src",)] == ("train", "src failed on purpose")
    assert outcome[("child",)] == workers.Skipped(("src",))
    assert outcome[("grandchild",)] == workers.Skipped(("child",))
    assert outcome[("dies",)] == ("worker", "its process exited with code 3")
    assert outcome[("raises",)] == ("worker", "RuntimeError: raised in the worker")
    assert outcome[("free",)] is None
    assert sorted(os.listdir(d)) == ["free"]
    # never fewer than min_threads, even when the cores do not go round (1 here)
    assert open(os.path.join(d, "free")).read() == "2"


def test_narrow_models_keep_two_threads():
    # oneDNN's AVX2 1x1 stride-2 backward-weights pass corrupts the heap with one
    # thread below 8 input channels (workers.thread_floor)
    assert [workers.thread_floor(c) for c in (1, 4, 7, 8, 16)] == [2, 2, 2, 1, 1]
    with pytest.raises(ValueError, match="min_threads=0"):
        workers.run_jobs([job(("a",), fail, ("a",), min_threads=0)], workers=1)


def test_a_narrow_models_floor_holds_for_its_own_jobs_only(tmp_path):
    d = str(tmp_path)
    jobs = [job(("narrow",), write_marker, (d, "narrow"), min_threads=2),
            job(("wide",), write_marker, (d, "wide"))]
    assert workers.run_jobs(jobs, workers=2, cores=2) == {("narrow",): None, ("wide",): None}
    # side by side on 2 cores: 1 thread each, but the narrow model's job keeps its 2
    assert {n: open(os.path.join(d, n)).read() for n in ("narrow", "wide")} == \
        {"narrow": "2", "wide": "1"}


@pytest.mark.parametrize("jobs, match", [
    ([job(("a",), fail, ("a",)), job(("a",), fail, ("a",))], "duplicate job keys"),
    ([job(("a",), fail, ("a",), needs=[("b",)])], "unknown keys"),
    ([job(("a",), fail, ("a",), needs=[("b",)]), job(("b",), fail, ("b",), needs=[("a",)])],
     "form a cycle"),
])
def test_bad_job_lists_fail_before_any_work(jobs, match):
    with pytest.raises(ValueError, match=match):
        workers.run_jobs(jobs, workers=2, cores=2)


def test_worker_count_must_be_positive():
    with pytest.raises(ValueError, match="workers=0"):
        workers.run_jobs([job(("a",), fail, ("a",))], workers=0)


def test_worker_output_is_whole_prefixed_lines():
    class Sink:
        def __init__(self):
            self.text = ""

        def write(self, t):
            self.text += t

        def flush(self):
            pass

    sink = Sink()
    out = workers._LinePrefix(sink, "[m] ")  # pylint: disable=protected-access
    out.write("epoch 1")
    assert sink.text == ""  # held until the line is complete
    out.write(" done\n[pipeline 1/2 m] train: 3 s\nbar\r\n")
    assert sink.text == "[m] epoch 1 done\n[pipeline 1/2 m] train: 3 s\n[m] bar\n"


def sleep_forever(ready_path, ignore_sigint=False):
    import signal  # pylint: disable=g-import-not-at-top
    if ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(ready_path, "w") as f:  # the handler is set
        f.write("ready")
    time.sleep(600)


@pytest.mark.parametrize("ignore_sigint", [False, True])
def test_stop_interrupts_the_workers_and_terminates_the_deaf(tmp_path, ignore_sigint):
    import multiprocessing  # pylint: disable=g-import-not-at-top
    ready = str(tmp_path / "ready")
    p = multiprocessing.get_context("spawn").Process(target=sleep_forever,
                                                      args=(ready, ignore_sigint))
    p.start()
    deadline = time.time() + 120
    while not os.path.exists(ready) and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(ready), "the worker did not start"
    workers._stop([p], grace_s=3.0, own_signal_s=0.1)  # pylint: disable=protected-access
    assert not p.is_alive()
    if ignore_sigint:  # SIGINT did nothing: terminated (SIGTERM) after the grace period
        assert p.exitcode == -15
    else:  # KeyboardInterrupt ended it: the traceback's exit code
        assert p.exitcode == 1


def sleep_writing_pid(path, threads=None):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(120)


_PARENT = """
import sys
sys.path.insert(0, sys.argv[1])
import test_workers
from brkeras.run import workers
workers.run_jobs([workers.Job(("a",), (), 0, test_workers.sleep_writing_pid, (sys.argv[2],))],
                 workers=1)
"""


def _running(pid):
    """False once `pid` has exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_parent(tmp_path):
    pid_file = str(tmp_path / "worker.pid")
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, os.path.dirname(__file__),
                               pid_file])
    try:
        deadline = time.time() + 120
        while not os.path.exists(pid_file) and time.time() < deadline:
            assert parent.poll() is None, "the parent exited early"
            time.sleep(0.2)
        worker = int(open(pid_file).read())
        assert _running(worker)
        parent.kill()  # SIGKILL: no cleanup runs in the parent
        parent.wait()
        deadline = time.time() + 30
        while _running(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert not _running(worker), "the worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if os.path.exists(pid_file) and _running(int(open(pid_file).read())):
            os.kill(int(open(pid_file).read()), 9)
