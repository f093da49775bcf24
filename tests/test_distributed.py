"""Multi-worker train_lib: two worker processes on 127.0.0.1 against one process.

The test runs this file as a script (the harness at the bottom) in subprocesses:
  * a reference process with two logical CPU devices trains the same config
    with strategy "default" and "mirrored", each interrupted after epoch KILL and
    resumed (in-process, as test_training does);
  * two workers (TF_CONFIG, strategy "multi_worker") train until epoch KILL and
    exit hard (os._exit, like a kill), then two fresh workers resume to EPOCHS.

Settings that make the trajectories comparable: no Feynman-Kac noise (sigma 0),
natural loss (no PGD random start), no augmentation, a seeded shuffle. What
still differs between one device and two replicas is BatchNorm: each replica
normalises its half batch (32) with its own statistics, as MirroredStrategy
does. So the multi-worker run must equal the mirrored run over two devices
(same halves, same per-replica BN; only the all-reduce order differs: rtol
1e-4; measured: equal in float32), and stay near the single-device run (rtol
3e-2 on the epoch-mean loss, about 3x the measured gap of 1.1% at epoch 3).
Which examples each worker gets is checked directly: worker 0 the first half
of every global batch, worker 1 the second. The comparisons include the resume:
both sides are interrupted after epoch KILL (a resumed pipeline restarts its
seeded shuffle, so only resumed runs are comparable with each other).
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, KILL, STEPS = 4, 2, 4  # 256 examples / batch 64 = 4 steps an epoch
KILLED_EXIT = 17
PREFIX = "BRJSON "
TIMEOUT_S = 300  # a guard against hangs; about 70 s at a load of 2


def make_config(strategy):
    """Smoke config, ternary Binary-Relax, made deterministic (see module doc)."""
    sys.path.insert(0, ROOT)
    from configs import smoke  # pylint: disable=import-outside-toplevel

    c = smoke.get_config("ternary,natural")
    c.model.sigma = 0.0
    c.optim.epochs = EPOCHS
    c.optim.milestones = ()
    c.optim.lr = 0.1
    c.quant.phase2_fraction = 0.5  # exact Q(w) from epoch 3 (1-based): across the resume
    c.strategy = strategy
    return c


# ---------------------------------------------------------------------------
# Unit checks of the TF_CONFIG helpers (no TensorFlow ops, no processes)


def _tf_config(index, cluster=None):
    cluster = cluster or {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def test_chief_and_scratch_dir_follow_tf_config(monkeypatch, tmp_path):
    from brkeras.run import train as train_lib  # pylint: disable=import-outside-toplevel
    from brkeras.train import distribute  # noqa: F401

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.is_chief()
    monkeypatch.setenv("TF_CONFIG", _tf_config(0))
    assert distribute.is_chief()
    monkeypatch.setenv("TF_CONFIG", _tf_config(1))
    assert not distribute.is_chief()
    assert distribute.worker_scratch_dir(str(tmp_path)) == str(tmp_path / "workertemp_1")
    with_chief = {"chief": ["127.0.0.1:3"], "worker": ["127.0.0.1:1"]}
    monkeypatch.setenv("TF_CONFIG", _tf_config(0, with_chief))
    assert not distribute.is_chief()  # worker 0 is not the chief when a chief task exists
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distribute.is_chief()


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    from brkeras.run import train as train_lib  # pylint: disable=import-outside-toplevel
    from brkeras.train import distribute  # noqa: F401

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG"):
        distribute.make_strategy("multi_worker")
    with pytest.raises(ValueError, match="choose one of"):
        distribute.make_strategy("tpu")


# ---------------------------------------------------------------------------
# The subprocess runs


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    # Eigen's kernels, not oneDNN's (which brkeras turns on): oneDNN's reductions
    # split by the process's thread pool, so two worker processes and one process
    # with two replicas round differently (0.6% apart after 4 epochs on an AVX2
    # CPU), and this test is about the distribution logic, not the kernels.
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               TF_ENABLE_ONEDNN_OPTS="0", **extra)
    return env


def _start(tmp_path, name, args, env):
    out = open(tmp_path / f"{name}.out", "w")  # files, not pipes: no pipe-full deadlock
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT,
                            stdout=out, stderr=subprocess.STDOUT, env=env)
    proc.log = tmp_path / f"{name}.out"
    out.close()
    return proc


def _wait(procs, deadline, expected=0):
    """Waits for all; once one fails (exit code != expected) or the deadline
    passes, kills the rest: a worker whose peer died would wait forever."""
    while time.time() < deadline:
        codes = [p.poll() for p in procs]
        if None not in codes or any(c is not None and c != expected for c in codes):
            break
        time.sleep(0.5)
    _kill(procs)
    return [p.returncode for p in procs]


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _records(proc):
    text = proc.log.read_text()
    return [json.loads(line[len(PREFIX):]) for line in text.splitlines()
            if line.startswith(PREFIX)]


def _tail(procs):
    return "\n".join(f"--- {p.log.name} (rc {p.returncode}) ---\n" + p.log.read_text()[-3000:]
                     for p in procs)


def _workers(tmp_path, tag, workdir, kill_after, ports):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return [
        _start(tmp_path, f"{tag}{i}", ["worker", workdir, str(kill_after)],
               _env(TF_CONFIG=json.dumps({"cluster": cluster,
                                          "task": {"type": "worker", "index": i}})))
        for i in range(len(ports))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference process and the killed pair at once, then the resuming pair."""
    tmp = tmp_path_factory.mktemp("dist")
    deadline = time.time() + TIMEOUT_S
    wd = str(tmp / "mw_run")
    ref = _start(tmp, "reference", ["reference", str(tmp / "ref")], _env())
    procs = [ref]
    try:
        killed = _workers(tmp, "killed", wd, KILL, _free_ports(2))
        procs += killed
        rc_killed = _wait(killed, deadline, expected=KILLED_EXIT)
        assert rc_killed == [KILLED_EXIT] * 2, _tail(killed)
        after_kill = {
            "state": json.load(open(os.path.join(wd, "state.json"))),
            "scratch_ckpt": sorted(os.listdir(os.path.join(wd, "workertemp_1", "ckpt"))),
        }
        resumed = _workers(tmp, "resumed", wd, 0, _free_ports(2))
        procs += resumed
        rc = _wait(resumed + [ref], deadline)
        assert rc == [0, 0, 0], _tail(resumed + [ref])
    finally:
        _kill(procs)
    return {"wd": wd, "ref": _records(ref), "killed": [_records(p) for p in killed],
            "resumed": [_records(p) for p in resumed], "after_kill": after_kill}


def _losses(records, run):
    rows = sorted((r for r in records if r["kind"] == "epoch" and r["run"] == run),
                  key=lambda r: r["epoch"])
    return rows


def test_multi_worker_matches_mirrored_and_default(runs):
    from brkeras.run import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

    metrics = workdir_lib.read_metrics(runs["wd"])
    assert [r["epoch"] for r in metrics] == list(range(1, EPOCHS + 1))
    mw = np.array([r["loss"] for r in metrics])
    mirrored = np.array([r["loss"] for r in _losses(runs["ref"], "mirrored")])
    default = np.array([r["loss"] for r in _losses(runs["ref"], "default")])
    assert len(mirrored) == len(default) == EPOCHS
    # It learns (so the comparison means something): the loss falls by > 5%.
    assert mw[-1] < 0.95 * mw[0], (mw, mirrored, default)
    np.testing.assert_allclose(mw, mirrored, rtol=1e-4)
    np.testing.assert_allclose(mw, default, rtol=3e-2)
    mw_acc = np.array([r["nat_acc"] for r in metrics])
    mirrored_acc = np.array([r["nat_acc"] for r in _losses(runs["ref"], "mirrored")])
    # Accuracy is a count over 256 examples: at most one prediction may flip.
    np.testing.assert_allclose(mw_acc, mirrored_acc, atol=1.5 / 256)


def test_workers_agree_on_binary_relax_and_weights(runs):
    per_worker = [_losses(k, "worker") + _losses(r, "worker")
                  for k, r in zip(runs["killed"], runs["resumed"])]
    for rows in per_worker:
        assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
        for r in rows:
            assert r["br_lam"] == pytest.approx(1.05 ** (r["epoch"] - 1), rel=1e-6)
            assert r["br_exact"] is (r["epoch"] >= 3)
    chief, other = per_worker
    for a, b in zip(chief, other):
        assert (a["br_lam"], a["br_exact"], a["loss"]) == (b["br_lam"], b["br_exact"], b["loss"])
        # The replicas' local copies of every trainable variable stay equal.
        np.testing.assert_allclose(a["wsum"], b["wsum"], rtol=1e-6)
    assert chief[0]["wsum"] != chief[-1]["wsum"]  # the weights did move
    for r in chief:
        # The progress bar's last step shows the chief's own running mean over the
        # epoch (128 of 256 examples): near the global epoch mean, not twice it.
        assert abs(r["last_step_loss"] / r["loss"] - 1) < 0.1, r


def test_resume_after_killing_both_workers(runs):
    from brkeras._keras import tf  # pylint: disable=import-outside-toplevel

    wd = runs["wd"]
    assert runs["after_kill"]["state"] == {"completed_epochs": KILL, "finished": False}
    assert f"ckpt-{KILL}.index" in runs["after_kill"]["scratch_ckpt"]
    starts = [[r for r in recs if r["kind"] == "start"][0] for recs in runs["resumed"]]
    assert [s["initial_epoch"] for s in starts] == [KILL, KILL]
    # Finished: the chief's files are the run's; the worker's scratch copy is gone.
    assert json.load(open(os.path.join(wd, "state.json"))) == {
        "completed_epochs": EPOCHS, "finished": True}
    assert not os.path.exists(os.path.join(wd, "workertemp_1"))
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(wd, "ckpt")))
    iters = [k for k in reader.get_variable_to_shape_map() if "optimizer/_iterations" in k]
    assert iters and reader.get_tensor(iters[0]) == EPOCHS * STEPS
    assert reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE") == EPOCHS


def test_each_worker_gets_its_half_of_every_global_batch(runs):
    reference = [r for r in runs["ref"] if r["kind"] == "batch"]
    shards = [[r for r in recs if r["kind"] == "batch"] for recs in runs["resumed"]]
    assert len(reference) == 2 and all(len(s) == 2 for s in shards)
    for b, ref_batch in enumerate(reference):
        full = ref_batch["keys"]
        assert len(full) == 64  # config.optim.batch_size is the global batch
        w0, w1 = shards[0][b]["keys"], shards[1][b]["keys"]
        assert len(w0) == len(w1) == 32
        assert w0 + w1 == full  # worker 0 the first half, worker 1 the second


# ---------------------------------------------------------------------------
# Harness (runs in the subprocesses)


def _emit(**record):
    print(PREFIX + json.dumps(record), flush=True)


def _keys(x):
    """A fingerprint per example: <x, w> for a fixed random w (rounded)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    w = np.random.default_rng(0).standard_normal(x.shape[1])
    return [round(float(v), 3) for v in x @ w]


def _patch_epoch_logger(train_lib, run, kill_after):
    original = train_lib.EpochLogger.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        original(self, epoch, logs)
        from brkeras.quant import binary_relax  # pylint: disable=import-outside-toplevel

        lam, exact = binary_relax.br_state(self.net)
        wsum = float(sum(np.sum(np.abs(v.numpy()), dtype=np.float64)
                         for v in self.net.trainable_weights))
        _emit(kind="epoch", run=run, epoch=epoch + 1, loss=float(logs["loss"]),
              nat_acc=float(logs["nat_acc"]), br_lam=lam, br_exact=exact, wsum=wsum,
              last_step_loss=self.last_step_loss)
        if kill_after and epoch + 1 == kill_after:
            if run == "worker":
                os._exit(KILLED_EXIT)  # a hard kill: no cleanup, no finally blocks
            raise KeyboardInterrupt("killed by the test harness")

    def on_train_batch_end(self, batch, logs=None):
        self.last_step_loss = float(logs["loss"])
        original_batch_end(self, batch, logs)

    original_batch_end = train_lib.EpochLogger.on_train_batch_end
    train_lib.EpochLogger.on_epoch_end = on_epoch_end
    train_lib.EpochLogger.on_train_batch_end = on_train_batch_end

    def unpatch():
        train_lib.EpochLogger.on_epoch_end = original
        train_lib.EpochLogger.on_train_batch_end = original_batch_end

    return unpatch


def _main_worker(workdir, kill_after):
    from brkeras.run import train as train_lib  # no TensorFlow op may run before the strategy exists
    from brkeras.train import distribute  # noqa: F401

    captured = []
    make = distribute.make_strategy
    distribute.make_strategy = lambda name: captured.append(make(name)) or captured[-1]
    original_agree = distribute._agree_on_epoch  # pylint: disable=protected-access

    def agree(*args):
        epoch = original_agree(*args)
        _emit(kind="start", initial_epoch=epoch)
        return epoch

    distribute._agree_on_epoch = agree  # pylint: disable=protected-access
    _patch_epoch_logger(train_lib, "worker", kill_after)
    config = make_config("multi_worker")
    train_lib.train(config, workdir, verbose=0)
    strategy = captured[0]
    dist = iter(strategy.experimental_distribute_dataset(train_lib.train_dataset(config)))
    for b in range(2):
        x, _ = next(dist)
        _emit(kind="batch", batch=b, keys=_keys(strategy.experimental_local_results(x)[0]))


def _main_reference(root):
    from brkeras._keras import tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    from brkeras.run import train as train_lib  # pylint: disable=import-outside-toplevel
    from brkeras.train import distribute  # noqa: F401

    for name in ("default", "mirrored"):
        unpatch = _patch_epoch_logger(train_lib, name, KILL)
        try:
            train_lib.train(make_config(name), os.path.join(root, name), verbose=0)
        except KeyboardInterrupt:
            pass
        unpatch()
        unpatch = _patch_epoch_logger(train_lib, name, 0)
        train_lib.train(make_config(name), os.path.join(root, name), verbose=0)
        unpatch()
    for b, (x, _) in enumerate(train_lib.train_dataset(make_config("default")).take(2)):
        _emit(kind="batch", batch=b, keys=_keys(x.numpy()))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    if sys.argv[1] == "worker":
        _main_worker(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "reference":
        _main_reference(sys.argv[2])
    else:
        raise SystemExit(f"unknown harness mode {sys.argv[1]!r}")
