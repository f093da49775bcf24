"""Adversarial training: the train step, fit, checkpoints, resume, NaN, load."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from brkeras import data
from brkeras import errors
from brkeras.robust import losses
from brkeras.train import adversarial_model
from brkeras.train import precision
from brkeras.quant import binary_relax
from brkeras.run import config as config_lib
from brkeras.run import train as train_lib
from brkeras.run import workdir as workdir_lib
from brkeras._keras import keras, tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import smoke  # noqa: E402  pylint: disable=wrong-import-position


def smoke_config(arg="ternary,tradeoff", **fields):
    c = smoke.get_config(arg)
    for key, value in fields.items():
        if "__" in key:
            section, name = key.split("__")
            c[section][name] = value
        else:
            c[key] = value
    return c


def _toy_data(n=512, seed=0):
    """Dark (class 0) and bright (class 1) 8x8x1 images, separable with margin 0.3."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.uniform(0.2, 0.5, size=(n, 8, 8, 1)).astype(np.float32) + 0.3 * y[:, None, None, None]
    return x.astype(np.float32), y.astype(np.int32)


def _toy_net():
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(2)(h))


@pytest.mark.parametrize("loss_name", ["tradeoff", "pgd", "trades", "natural"])
def test_short_fit_lowers_the_loss(loss_name):
    keras.utils.set_random_seed(1)
    x, y = _toy_data()
    trainer = adversarial_model.AdversarialModel(_toy_net(), losses.get(loss_name), eps=0.05,
                                        eps_iter=0.02, steps=3, weight_decay=5e-4)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    hist = trainer.fit(x, y, batch_size=64, epochs=6, verbose=0).history
    assert hist["loss"][-1] < 0.7 * hist["loss"][0]
    assert set(hist) == {"loss", "nat_acc", "adv_acc"}


def test_attack_in_train_step_respects_box_and_lowers_accuracy():
    keras.utils.set_random_seed(2)
    x, y = _toy_data()
    net = _toy_net()
    trainer = adversarial_model.AdversarialModel(net, losses.get("natural"), eps=0.2,
                                        eps_iter=0.05, steps=10)
    trainer.compile(optimizer=keras.optimizers.Adam(0.02))
    trainer.fit(x, y, batch_size=64, epochs=15, verbose=0)
    attacker = adversarial_model.AdversarialModel(net, losses.get("pgd"), eps=0.2, eps_iter=0.05, steps=10)
    x_adv = attacker.adversarial_examples(tf.constant(x), tf.constant(y), training=False).numpy()
    assert np.max(np.abs(x_adv - x)) <= 0.2 + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    nat = np.mean(np.argmax(net(x).numpy(), 1) == y)
    adv = np.mean(np.argmax(net(x_adv).numpy(), 1) == y)
    assert nat > 0.9 and adv < nat - 0.2


@pytest.mark.parametrize("loss_name", ["tradeoff", "trades"])
def test_nfgsm_training_attack_leaves_the_ball_and_trains(loss_name):
    """attack="nfgsm": one unprojected step from x + U[-2 eps, 2 eps] (within 3 eps, in
    the box), and fit lowers the loss as with PGD."""
    keras.utils.set_random_seed(3)
    x, y = _toy_data()
    trainer = adversarial_model.AdversarialModel(_toy_net(), losses.get(loss_name), eps=0.05,
                                                 eps_iter=0.05, steps=3, attack="nfgsm")
    x_adv = trainer.adversarial_examples(tf.constant(x), tf.constant(y), training=False).numpy()
    d = np.abs(x_adv - x).max(axis=(1, 2, 3))
    # beyond the noise's 2 eps = 0.1: the step is taken (for TRADES too: a nonzero KL gradient)
    assert d.max() <= 0.15 + 1e-6 and d.max() > 0.13 and x_adv.min() >= 0 and x_adv.max() <= 1
    trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    hist = trainer.fit(x, y, batch_size=64, epochs=6, verbose=0).history
    assert hist["loss"][-1] < 0.7 * hist["loss"][0]


def test_training_attack_arguments_from_the_config():
    adv = smoke.get_config().adv
    assert train_lib.attack_arguments(adv)["attack"] == "pgd"
    assert train_lib.attack_arguments(adv)["eps_iter"] == adv.eps_iter
    adv.method, adv.nfgsm_step, adv.nfgsm_noise = "nfgsm", 1.25, 1.5
    a = train_lib.attack_arguments(adv)
    assert (a["attack"], a["noise_scale"]) == ("nfgsm", 1.5)
    assert a["eps_iter"] == pytest.approx(1.25 * adv.eps)
    with pytest.raises(ValueError, match="attack="):
        adversarial_model.AdversarialModel(_toy_net(), "pgd", 0.1, 0.02, 3, attack="fgsm")
    with pytest.raises(ValueError, match="config.adv.method"):
        config_lib.validate(smoke_config(adv__method="fgsm"))
    with pytest.raises(ValueError, match="nfgsm_noise=0 with the TRADES"):
        config_lib.validate(smoke_config(adv__method="nfgsm", adv__nfgsm_noise=0.0,
                                         loss__name="trades"))


def test_weight_decay_is_l2_on_the_gradient():
    """One SGD step without momentum: w <- w - lr * (g + wd * w)."""
    net = _toy_net()
    x, y = _toy_data(64)
    w0 = [v.numpy() for v in net.trainable_variables]
    trainer = adversarial_model.AdversarialModel(net, losses.get("natural"), 0.0, 0.0, 0, weight_decay=0.1)
    trainer.compile(optimizer=keras.optimizers.SGD(0.5))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(losses.cross_entropy(y, net(x, training=True)))
    grads = tape.gradient(loss, net.trainable_variables)
    trainer.train_on_batch(x, y)
    for w, g, v in zip(w0, grads, net.trainable_variables):
        np.testing.assert_allclose(v.numpy(), w - 0.5 * (g.numpy() + 0.1 * w), atol=1e-5)


def test_train_writes_workdir_and_load_gives_exact_ternary(tmp_path):
    wd = str(tmp_path / "run")
    rows = train_lib.train(smoke_config(), wd, verbose=0)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"loss", "nat_acc", "adv_acc", "lr", "br_lam", "br_exact"} <= set(rows[0])
    assert all(r["onednn"] == precision.onednn_enabled() for r in rows)  # which kernels trained
    # Binary-Relax schedule: phase I in epoch 1 (lam0), exact from epoch 2 (fraction 0.5).
    assert rows[0]["br_lam"] == pytest.approx(1.0) and rows[0]["br_exact"] is False
    assert rows[1]["br_lam"] == pytest.approx(1.05) and rows[1]["br_exact"] is True
    assert workdir_lib.read_state(wd) == {"completed_epochs": 2, "finished": True}
    assert json.load(open(os.path.join(wd, "config.json")))["quant"]["precision"] == "ternary"
    net = train_lib.load(wd)

    kernels = binary_relax.quantized_kernels(net)
    assert kernels, "no quantized layer"
    assert all(len(np.unique(k)) == 3 for k in kernels.values())
    # The loaded model is in phase II: its forward kernels u are exactly Q(w).
    for wrapper, weight, quantizer, qvars in binary_relax.br_quantizers(net):
        u = quantizer(weight, training=False, weights=qvars).numpy()
        np.testing.assert_array_equal(u, kernels[wrapper.layer.name])
    with pytest.raises(errors.WorkdirError, match="finished"):
        train_lib.train(smoke_config(), wd, verbose=0)


def test_resume_after_a_kill_continues_from_the_last_epoch(tmp_path,
                                                            train_killed_after_first_epoch):
    wd = str(tmp_path / "run")
    train_killed_after_first_epoch(smoke_config(), wd)
    assert workdir_lib.read_state(wd) == {"completed_epochs": 1, "finished": False}
    rows = train_lib.train(smoke_config(), wd, verbose=0)
    assert [r["epoch"] for r in rows] == [1, 2]
    ckpt = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(wd, "ckpt")))
    iterations = [k for k in ckpt.get_variable_to_shape_map() if "optimizer/_iterations" in k]
    assert iterations and ckpt.get_tensor(iterations[0]) == 2 * 4  # 2 epochs of 4 steps


def test_batchnorm_reestimation_is_saved_and_redone_after_a_kill(tmp_path, monkeypatch):
    wd = str(tmp_path / "run")
    original = train_lib.batchnorm.reestimate

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during re-estimation")

    monkeypatch.setattr(train_lib.batchnorm, "reestimate", killed)
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(smoke_config(), wd, verbose=0)
    # All epochs are checkpointed, but the run is not finished without it.
    assert workdir_lib.read_state(wd) == {"completed_epochs": 2, "finished": False}
    assert not os.path.exists(os.path.join(wd, train_lib.BN_REPORT))
    set_stats = []

    def counted(net, batches):
        report = original(net, batches)
        set_stats.append(net.get_layer("m0_s1_b0_bn1").moving_mean.numpy().copy())
        return report

    monkeypatch.setattr(train_lib.batchnorm, "reestimate", counted)
    rows = train_lib.train(smoke_config(), wd, verbose=0)
    assert [r["epoch"] for r in rows] == [1, 2] and len(set_stats) == 1
    assert workdir_lib.read_state(wd)["finished"] is True
    report = json.load(open(os.path.join(wd, train_lib.BN_REPORT)))
    # 2 training batches (smoke config), each adversarial and natural (trade-off loss).
    assert report["training_batches"] == 2 and report["input_batches"] == 4
    # The checkpoint holds the re-estimated statistics.
    loaded = train_lib.load(wd).get_layer("m0_s1_b0_bn1").moving_mean.numpy()
    np.testing.assert_array_equal(loaded, set_stats[0])


def test_fine_tune_starts_from_the_source_and_resumes_without_it(tmp_path, monkeypatch):
    source, wd = str(tmp_path / "float"), str(tmp_path / "ternary")
    train_lib.train(smoke_config("float,tradeoff", optim__epochs=1), source, verbose=0)
    source_kernel = train_lib.load(source).get_layer("m0_conv0").kernel.numpy()
    original = train_lib.EpochLogger.on_epoch_end
    built_from = []

    def killed_after_first_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        raise KeyboardInterrupt("killed")

    def capture(config, input_shape, num_classes, init_weights=None):
        net = build(config, input_shape, num_classes, init_weights)
        built_from.append(init_weights)
        return net

    build = train_lib.build_network
    monkeypatch.setattr(train_lib, "build_network", capture)
    monkeypatch.setattr(train_lib.EpochLogger, "on_epoch_end", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(smoke_config(init_from=source), wd, verbose=0)
    # Two builds: the source's (train_lib.load, inside initial_weights), then the run's.
    assert len(built_from) == 2
    assert any(w.shape == source_kernel.shape and np.array_equal(w, source_kernel)
               for w in built_from[1])
    monkeypatch.setattr(train_lib.EpochLogger, "on_epoch_end", original)
    shutil.rmtree(source)  # the resume must not need the source any more
    rows = train_lib.train(smoke_config(init_from=source), wd, verbose=0)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert len(built_from) == 3 and built_from[2] is None  # built once, not from the source


def test_fine_tune_from_a_binary_relax_run_starts_from_its_float_weights(tmp_path):
    """init_from a ternary run: the new run's kernels start at that run's w, not Q(w)."""
    source = str(tmp_path / "ternary")
    train_lib.train(smoke_config("ternary,tradeoff", optim__epochs=1), source, verbose=0)
    trained = train_lib.load(source)
    (wrapper, w, quantizer, _), = [r for r in binary_relax.br_quantizers(trained)
                                   if r[0].layer.name == "m0_s1_b0_conv2"]
    latent, exact = w.numpy(), quantizer.q_fn(w).numpy()
    assert not np.allclose(latent, exact)
    weights = train_lib.initial_weights(smoke_config("ternary,tradeoff,sparse", init_from=source))
    net = train_lib.build_network(smoke_config("ternary,tradeoff,sparse"), *_smoke_shape(source),
                                  init_weights=weights)
    (_, w2, _, _), = [r for r in binary_relax.br_quantizers(net)
                      if r[0].layer.name == "m0_s1_b0_conv2"]
    np.testing.assert_array_equal(w2.numpy(), latent)
    qat = str(tmp_path / "qat")
    os.makedirs(qat)
    workdir_lib.write_json(os.path.join(qat, "config.json"), workdir_lib.config_to_dict(
        smoke_config("int8_qat,tradeoff")))
    workdir_lib.write_state(qat, 1, finished=True)
    with pytest.raises(ValueError, match="float or a Binary-Relax model"):
        train_lib.initial_weights(smoke_config(init_from=qat))


def _smoke_shape(workdir):
    info = data.info(workdir_lib.load_config(workdir).data.name)
    return info.image_shape, info.num_classes


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    wd = str(tmp_path / "run")
    with pytest.raises(errors.NonFiniteLossError, match="last good checkpoint"):
        train_lib.train(smoke_config("float,natural", optim__lr=1e30), wd, verbose=0)
    assert workdir_lib.read_state(wd)["finished"] is False
    assert os.path.exists(os.path.join(wd, "config.json"))


def test_load_round_trip_is_exact_without_noise(tmp_path):
    wd = str(tmp_path / "run")
    train_lib.train(smoke_config("4bit,pgd", model__sigma=0.0), wd, verbose=0)
    a, b = train_lib.load(wd), train_lib.load(wd)
    x = np.random.default_rng(0).uniform(size=(8, 28, 28, 1)).astype(np.float32)
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    wd = str(tmp_path / "run")
    train_lib.train(smoke_config("float,natural", optim__epochs=1, quant__phase2_fraction=-1.0), wd,
                   verbose=0)
    for name in os.listdir(os.path.join(wd, "ckpt")):
        if ".data-" in name:
            with open(os.path.join(wd, "ckpt", name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(errors.WorkdirError, match="corrupt"):
        train_lib.load(wd)


def test_mirrored_strategy_over_two_cpu_devices(tmp_path):
    """fit + custom train_step + Binary-Relax callback + checkpoint under MirroredStrategy."""
    code = f"""
import sys; sys.path.insert(0, {ROOT!r})
from brkeras._keras import tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
from brkeras.quant import binary_relax
from brkeras.run import train as train_lib
from configs import smoke
c = smoke.get_config("ternary,tradeoff")
c.strategy = "mirrored"
assert c.optim.bn_reestimate_batches > 0  # BatchNorm re-estimation under the strategy too
rows = train_lib.train(c, {str(tmp_path / 'run')!r}, verbose=0)
net = train_lib.load({str(tmp_path / 'run')!r})
assert [r["epoch"] for r in rows] == [1, 2], rows
assert rows[1]["br_exact"] is True
assert all(len(set(k.ravel())) <= 3 for k in binary_relax.quantized_kernels(net).values())
print("MIRRORED_OK", tf.distribute.MirroredStrategy().num_replicas_in_sync)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert "MIRRORED_OK 2" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_sparsity_cost_measure_from_the_config():
    c = smoke_config("ternary,tradeoff,sparse", sparsity__cost="params", sparsity__cost_power=1.0)
    cb = train_lib.group_sparsity_for(config_lib.validate(c), steps_per_epoch=4)
    assert (cb.cost, cb.cost_power) == ("params", 1.0)
    assert train_lib.group_sparsity_for(smoke_config("ternary,tradeoff,sparse"), 4).cost == "macs"
    with pytest.raises(ValueError, match="config.sparsity.cost="):
        config_lib.validate(smoke_config("ternary,tradeoff,sparse", sparsity__cost="bytes"))
