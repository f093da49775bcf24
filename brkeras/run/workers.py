"""Jobs in worker processes, in dependency order: the pipeline's models side by side.

TensorFlow's CPU kernels do not scale to two cores on the small CPU-scale
models, so `config.pipeline.workers` runs that many jobs at once, each in its
own spawned process with its share of the cores as TensorFlow threads (a job
that starts while no other can run gets them all), but never fewer than its
`Job.min_threads` (`thread_floor` of its model). Measured on the README's 2-core
machines (`bench/worker_threads.py`, a training step of the default ternary
model): on the AVX-512 EPYC (2026-12-07 17:47 UTC) 81 ms alone with two threads, 131 ms each for two
processes side by side with one thread (1.24x the throughput), 144-146 ms each
with two (1.12x); on the AVX2 EPYC (13:40 UTC, an ad-hoc script) 169-226 ms alone, 254-312 ms each with one
thread (1.4-1.6x), 279-382 ms each with two (0.98-1.41x).

A job is a top-level function and its arguments (they are pickled to the
process: keep them to configs, strings and numbers); it returns None on
success or a short picklable description of its failure. A job runs once every
job it needs has succeeded; one whose need failed is not run (`Skipped`).
"""

import dataclasses
import multiprocessing
import os
import queue as queue_lib
import signal
import sys
import time
import traceback

from brkeras.run import console


@dataclasses.dataclass(frozen=True)
class Job:
    """key: hashable id; needs: keys of the jobs that must succeed first; rank:
    lower ranks start first among ready jobs (then list order); fn(*args,
    threads=n) runs in the worker process; min_threads: the fewest threads this
    job may run with (`thread_floor` of its model)."""
    key: tuple
    needs: tuple
    rank: int
    fn: object
    args: tuple
    min_threads: int = 1


@dataclasses.dataclass(frozen=True)
class Skipped:
    """The outcome of a job not run because `need` (a job key) did not succeed."""
    need: tuple


ONEDNN_SAFE_CHANNELS = 8


def thread_floor(narrowest_channels):
    """The fewest TensorFlow threads a worker may run models with, given the fewest
    input channels of their strided 1x1 (shortcut) convolutions: for an EnResNet,
    config.model.width (the first projection shortcut's input).

    With one intra-op thread, TensorFlow 2.21's oneDNN kernels for AVX2 corrupt
    the heap in the backward-weights pass of a 1x1 stride-2 convolution with
    fewer than 8 input channels (glibc aborts "corrupted size vs. prev_size", or
    a segfault). It crashed the smoke config's training (width 4) on an AVX2
    EPYC, and the convolution alone crashes with ONEDNN_MAX_CPU_ISA=AVX2 on an
    AVX-512 one (2, 4 and 6 channels); 8-24 channels at one thread, 2-6 channels
    at two threads and oneDNN's AVX-512 kernels ran clean
    (`bench/onednn_thread_floor.py` runs the check). So the jobs of a model
    narrower than 8 channels run with at least two threads. Outside
    the workers (`workers=1`, `brkeras train`) TensorFlow uses every core, so
    only a one-core machine runs such a model with one thread.
    """
    return 1 if narrowest_channels >= ONEDNN_SAFE_CHANNELS else 2


def usable_cores():
    """CPU cores this process may run on (its affinity: a container's limit counts)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


class _LinePrefix:
    """A text stream writing whole lines, each prefixed (a worker's stdout), so the
    lines of two workers never mix. Lines that already name their job, the
    pipeline's "[pipeline ..." lines, keep their form."""

    def __init__(self, stream, prefix):
        self._stream, self._prefix, self._pending = stream, prefix, ""

    def write(self, text):
        self._pending += text.replace("\r", "\n")
        *lines, self._pending = self._pending.split("\n")
        lines = [l for l in lines if l.strip()]
        if lines:
            self._stream.write("".join(
                (l if l.startswith("[pipeline ") else self._prefix + l) + "\n" for l in lines))
            self._stream.flush()
        return len(text)

    def flush(self):
        self._stream.flush()

    def finish(self):
        """Writes a last line that has no newline."""
        if self._pending.strip():
            self.write("\n")

    def isatty(self):
        return False


def _limit_threads(threads):
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from brkeras._keras import tf  # pylint: disable=g-import-not-at-top
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent():
    """Linux: this process gets SIGTERM when the process that started it dies, even
    by SIGTERM or kill -9, which run no cleanup there, so no worker trains on for
    a pipeline that is gone (its files are written atomically and its work-dir
    lock dies with it: the same command resumes). Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # pylint: disable=g-import-not-at-top
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl
        os._exit(143)  # pylint: disable=protected-access


def _worker(results, job, threads, prefix, debug):
    """The body of a worker process: runs `job`, puts (key, outcome) on `results`.
    (Only stdout is prefixed: TensorFlow's and absl's logs on stderr are not.)"""
    _die_with_parent()
    out = sys.stdout = _LinePrefix(sys.stdout, prefix)
    console.set_debug(debug)
    try:
        _limit_threads(threads)
        outcome = job.fn(*job.args, threads=threads)
    except KeyboardInterrupt:
        out.finish()
        sys.exit(130)
    except BaseException as e:  # pylint: disable=broad-except
        if debug:
            traceback.print_exc()
        outcome = ("worker", f"{type(e).__name__}: {e}")
    out.finish()
    results.put((job.key, outcome))


def run_jobs(jobs, workers, prefix=lambda key: "", cores=None, poll_s=0.5):
    """Runs `jobs` (a list of Job) in up to `workers` processes at once.

    Returns {key: None (succeeded) | the job's failure description | Skipped}.
    Each worker gets cores // workers TensorFlow threads (all `cores` when its job
    is the only one that can start), at least its `Job.min_threads` (`thread_floor`).
    A worker that dies without an outcome (killed, out of memory) fails its job
    with ("worker", "its process exited with code N"). Ctrl-C: the workers get
    SIGINT too (they finish the write they are in, see console.sigint_deferred)
    and a minute to exit (`_stop`), then KeyboardInterrupt is raised here; any
    other exception raised here stops the workers the same way.
    """
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"run_jobs got duplicate job keys: {keys}")
    unknown = sorted({str(n) for j in jobs for n in j.needs if n not in set(keys)})
    if unknown:
        raise ValueError(f"run_jobs: jobs need unknown keys {unknown}")
    if workers < 1:
        raise ValueError(f"workers={workers}; give >= 1")
    for j in jobs:
        if not (isinstance(j.min_threads, int) and j.min_threads >= 1):
            raise ValueError(f"run_jobs: job {j.key} has Job.min_threads={j.min_threads!r}; "
                             "give >= 1")
    cores = cores or usable_cores()
    ctx = multiprocessing.get_context("spawn")  # no fork of a process TensorFlow may hold
    results = ctx.Queue()
    outcome, running = {}, {}  # key -> process
    order = {k: i for i, k in enumerate(keys)}
    waiting = sorted(jobs, key=lambda j: (j.rank, order[j.key]))
    try:
        while waiting or running:
            # outcomes of finished needs decide what can start or must be skipped
            for job in list(waiting):
                bad = [n for n in job.needs if n in outcome and outcome[n] is not None]
                if bad:
                    outcome[job.key] = Skipped(bad[0])
                    waiting.remove(job)
            ready = [j for j in waiting if all(n in outcome for n in j.needs)]
            alone = not running and len(ready) == 1  # the only job that can run now
            for job in ready[:max(0, workers - len(running))]:
                threads = max(job.min_threads, cores if alone else cores // workers)
                p = ctx.Process(target=_worker, name=f"brkeras-{job.key}",
                                args=(results, job, threads, prefix(job.key), console.debug()))
                p.start()
                running[job.key] = p
                waiting.remove(job)
            if not running:
                if waiting:  # none can start and none runs: their needs form a cycle
                    raise ValueError("run_jobs: the needs of jobs "
                                     f"{[j.key for j in waiting]} form a cycle")
                continue
            _collect(results, outcome, running, poll_s)
            for key, p in list(running.items()):
                if key not in running or p.is_alive():
                    continue
                # It has exited, so an outcome it put is in the queue's pipe by now.
                while key not in outcome and _collect(results, outcome, running, poll_s):
                    pass
                if key not in outcome:
                    _join(running.pop(key))
                    outcome[key] = ("worker", f"its process exited with code {p.exitcode}")
    except BaseException:  # Ctrl-C, or a failure here: no worker may outlive the pipeline
        _stop(running.values())
        raise
    return outcome


def _collect(results, outcome, running, timeout):
    """Records one outcome from the queue; False if none arrived within `timeout`.
    An outcome for a job already decided (given up as lost) is dropped."""
    try:
        key, result = results.get(timeout=timeout)
    except queue_lib.Empty:
        return False
    if key not in outcome:
        outcome[key] = result
    if key in running:
        _join(running.pop(key))
    return True


def _join(p, timeout_s=60.0):
    """Joins a worker that has put its outcome; terminates one hung at exit."""
    p.join(timeout_s)
    if p.is_alive():
        p.terminate()
        p.join()


def _stop(processes, grace_s=60.0, own_signal_s=3.0):
    """Stops the workers after a Ctrl-C: a terminal sends SIGINT to them too, so
    each gets own_signal_s to exit on its own (one SIGINT, not two, reaches it
    mid-write); the rest are sent SIGINT, then terminated after grace_s."""
    processes = list(processes)
    deadline = time.time() + own_signal_s
    for p in processes:
        p.join(max(0.0, deadline - time.time()))
    for p in processes:
        if p.is_alive():
            try:
                os.kill(p.pid, signal.SIGINT)
            except OSError:
                pass
    deadline = time.time() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.terminate()
            p.join()
