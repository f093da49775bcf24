"""tf.distribute plumbing: the strategy, the chief, and workers that agree on where to resume."""

import json
import os

from absl import logging

from brkeras.errors import WorkdirError
from brkeras._keras import tf

STRATEGIES = ("default", "mirrored", "multi_worker")


def make_strategy(name):
    """The tf.distribute strategy of `config.strategy`.

    "default": one device; "mirrored": MirroredStrategy over this machine's
    devices (GPUs, or logical CPU devices); "multi_worker":
    MultiWorkerMirroredStrategy from TF_CONFIG. That one configures collective
    ops, so it must exist before any other TensorFlow op of the process runs.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("config.strategy='multi_worker' needs the TF_CONFIG environment "
                             "variable (cluster and task); see docs/multi_worker.md")
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as e:
            raise RuntimeError(
                f"{e}: config.strategy='multi_worker' must be set up before any other "
                "TensorFlow op of the process runs; call training.train in a fresh process "
                "(e.g. `brkeras train`), not after other TensorFlow work") from e
    raise ValueError(f"config.strategy={name!r}; choose one of {STRATEGIES}")


def _task():
    """(type, index, cluster) of TF_CONFIG; ("worker", 0, {}) without it."""
    tf_config = os.environ.get("TF_CONFIG")
    if not tf_config:
        return "worker", 0, {}
    try:
        parsed = json.loads(tf_config)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}); see docs/multi_worker.md") from e
    task = parsed.get("task", {})
    return task.get("type", "worker"), int(task.get("index", 0)), parsed.get("cluster", {})


def is_chief():
    """True unless this process is a non-chief worker of a multi-worker run.

    The chief is task "chief" if the cluster has one, else worker 0 (as in
    MultiWorkerMirroredStrategy).
    """
    kind, index, cluster = _task()
    if "chief" in cluster:
        return kind == "chief"
    return kind == "worker" and index == 0


def worker_scratch_dir(workdir):
    """Where a non-chief worker writes its checkpoints: <workdir>/workertemp_<index>.

    Every worker must save (saving reads synchronised variables, a collective
    op), but only the chief's files are the run's (tf.distribute convention). The
    name is stable across restarts, so a worker without a shared file system can
    resume from its own copy; `train` removes it when the run finishes.
    """
    kind, index, _ = _task()
    return os.path.join(workdir, f"{kind}temp_{index}")


def _check_workers_ready(strategy, error):
    """Raises `error`, and on every other worker too, if a worker failed to set up.

    Without this the healthy workers would wait forever in the first collective op.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        if error is not None:
            raise error
        return
    flag = 0 if error is not None else 1
    ready = strategy.gather(strategy.run(lambda: tf.constant([flag], tf.int64)), axis=0).numpy()
    if error is not None:
        raise error
    if not ready.all():
        raise WorkdirError(
            "another worker could not prepare its work dir (see its log, e.g. a finished run "
            "needs --overwrite on every worker); stopped")


def _agree_on_epoch(strategy, manager, ckpt, epoch_var):
    """The epoch every worker resumes after: the smallest one the workers restored.

    Each worker restores from the checkpoint dir it sees, and a kill during
    saving can leave one worker a checkpoint ahead; that one then restores
    `ckpt-<min epoch>` (CheckpointManager keeps two). One process: no-op.
    """
    mine = int(epoch_var.numpy())
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return mine
    local = strategy.run(lambda: tf.constant([mine], tf.int64))
    epochs = [int(e) for e in strategy.gather(local, axis=0).numpy()]  # all workers call it
    target = min(epochs)
    if target == mine:
        return mine
    path = os.path.join(manager.directory, f"ckpt-{target}")
    if target == 0 or path not in manager.checkpoints:
        raise WorkdirError(
            f"the workers restored different epochs {epochs} and this one has no checkpoint "
            f"of epoch {target} in {manager.directory}. Give every worker the work dir it "
            "used before (one shared dir, or the same per-machine dirs), or start over in "
            "a new work dir.")
    ckpt.restore(path).assert_existing_objects_matched()
    logging.info("workers restored epochs %s; all resume after epoch %d", epochs, target)
    return target
