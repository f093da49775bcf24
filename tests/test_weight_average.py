"""The moving average of the weights: math against NumPy, checkpointing, and a run with it."""

import os
import sys

import numpy as np
import pytest

from brkeras.quant.group_sparsity import zero_group_share
from brkeras.run import config as config_lib
from brkeras.run import train as train_lib
from brkeras.run import workdir as workdir_lib
from brkeras.train import weight_average
from brkeras._keras import tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import smoke  # noqa: E402  pylint: disable=wrong-import-position


def test_decay_warms_up_like_tensorflows_moving_average():
    for n, want in [(1, 2 / 11), (10, 11 / 20), (100, 101 / 110), (1000, 0.99)]:
        assert float(weight_average.ema_decay(0.99, n)) == pytest.approx(want, rel=1e-6)


def test_shadows_follow_the_numpy_average_and_apply_keeps_exact_zeros():
    rng = np.random.default_rng(0)
    start = rng.normal(size=(3, 4)).astype(np.float32)
    v = tf.Variable(start)
    avg = weight_average.WeightAverage([v], decay=0.9)
    ref = start.astype(np.float64)
    for n in range(1, 31):
        value = rng.normal(size=(3, 4)).astype(np.float32)
        if n > 20:
            value[1] = 0.0  # a row pruned for the last steps, as the sparsity prox does
        v.assign(value)
        avg.update()
        d = min(0.9, (1 + n) / (10 + n))
        ref = d * ref + (1 - d) * value
    assert int(avg.count.numpy()) == 30
    np.testing.assert_allclose(avg.shadows[0].numpy(), ref, rtol=1e-5, atol=1e-6)
    assert np.all(ref[1] != 0)  # the average of the pruned row only decays towards zero
    avg.apply()
    want = ref.copy()
    want[1] = 0.0
    np.testing.assert_allclose(v.numpy(), want, rtol=1e-5, atol=1e-6)
    avg.apply()  # idempotent: a resume that applies it again changes nothing
    np.testing.assert_allclose(v.numpy(), want, rtol=1e-5, atol=1e-6)


def test_shadows_and_count_round_trip_through_a_checkpoint(tmp_path):
    v = tf.Variable(np.arange(6, dtype=np.float32))
    avg = weight_average.WeightAverage([v], decay=0.5)
    v.assign(np.ones(6, np.float32))
    avg.update()
    saved = avg.shadows[0].numpy().copy()
    path = tf.train.Checkpoint(weight_average=avg).save(str(tmp_path / "ckpt"))
    w = tf.Variable(np.zeros(6, np.float32))
    fresh = weight_average.WeightAverage([w], decay=0.5)
    tf.train.Checkpoint(weight_average=fresh).restore(path).assert_consumed()
    np.testing.assert_array_equal(fresh.shadows[0].numpy(), saved)
    assert int(fresh.count.numpy()) == 1


@pytest.mark.parametrize("decay", [1.0, -0.1, 0.0])
def test_a_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(ValueError, match="decay in"):
        weight_average.WeightAverage([tf.Variable(1.0)], decay=decay)


def test_config_needs_batchnorm_reestimation_with_the_average():
    c = smoke.get_config("ternary,tradeoff")
    c.optim.ema_decay = 0.9
    c.optim.bn_reestimate_batches = 0
    with pytest.raises(ValueError, match="bn_reestimate_batches"):
        config_lib.validate(c)
    c.optim.ema_decay = 1.0
    with pytest.raises(ValueError, match="ema_decay"):
        config_lib.validate(c)


def _ema_config():
    c = smoke.get_config("ternary,tradeoff,sparse")
    c.optim.ema_decay = 0.5
    c.optim.bn_reestimate_batches = 2
    return c


def test_an_averaged_sparse_run_keeps_its_channels_removed_and_resumes_exactly(
        tmp_path, train_killed_after_first_epoch):
    full = str(tmp_path / "full")
    train_lib.train(_ema_config(), full, verbose=0)
    net = train_lib.load(full)
    # The trained w were replaced by their average, yet every zero group stays zero.
    assert zero_group_share(net)["share"] == pytest.approx(0.5)

    killed = str(tmp_path / "killed")
    train_killed_after_first_epoch(_ema_config(), killed)
    train_lib.train(_ema_config(), killed, verbose=0)
    assert workdir_lib.read_state(killed)["finished"] is True
    resumed = train_lib.load(killed)
    for a, b in zip(net.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    ckpt = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(killed, "ckpt")))
    counts = [k for k in ckpt.get_variable_to_shape_map() if "weight_average/count" in k]
    assert counts and ckpt.get_tensor(counts[0]) == 2 * 4  # smoke: 2 epochs of 4 steps


def _mirrored_run(workdir):
    """(subprocess) The averaged sparse smoke run under MirroredStrategy on two
    logical CPU devices; prints the zero-group share of the loaded model."""
    from brkeras._keras import tf as tf_

    tf_.config.set_logical_device_configuration(
        tf_.config.list_physical_devices("CPU")[0],
        [tf_.config.LogicalDeviceConfiguration(), tf_.config.LogicalDeviceConfiguration()])
    from brkeras.run import train as train_  # pylint: disable=import-outside-toplevel

    c = _ema_config()
    c.strategy = "mirrored"
    train_.train(c, workdir, verbose=0)
    print("SHARE", zero_group_share(train_.load(workdir))["share"], flush=True)


def test_the_average_works_under_mirrored_strategy(tmp_path):
    """Shadows are created in the strategy's scope and updated in the callback's
    cross-replica context; the run finishes with its pruned channels still zero."""
    import subprocess  # pylint: disable=import-outside-toplevel

    wd = str(tmp_path / "mirrored")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), wd], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARE 0.5" in out.stdout, out.stdout[-2000:]
    assert workdir_lib.read_state(wd)["finished"] is True


if __name__ == "__main__":
    _mirrored_run(sys.argv[1])
