"""Binary-Relax through tfmot: wrapping, forward map, gradient, schedule, saving."""

import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from brkeras.run import config
from brkeras.quant import ops as quantizers
from brkeras.quant import binary_relax
from brkeras.quant import int8_qat as int8_qat_lib
from brkeras.quant import schedule as schedule_lib
from brkeras.run import train as train_lib
from brkeras._keras import keras, tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@keras.utils.register_keras_serializable(package="brkeras_test")
class StubNoise(keras.layers.Layer):
    """Stand-in for the Feynman-Kac noise layer: a weightless custom layer."""

    def __init__(self, sigma=0.0, **kwargs):
        super().__init__(**kwargs)
        self.sigma = sigma

    def call(self, x):
        return x + self.sigma * tf.math.reduce_std(x) * tf.random.normal(tf.shape(x))

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma}


def tiny_resnet(width=4, seed=0):
    """conv0 3x3 -> bn1 -> relu1 -> conv1 3x3/2 -> bn2 -> relu2 -> conv2 3x3,
    shortcut 1x1/2 on relu1, add, noise, pool, logits (design.md layer names)."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((8, 8, 3), name="image")
    h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="m0_conv0")(x)
    h = keras.layers.BatchNormalization(name="m0_s1_b0_bn1")(h)
    r = keras.layers.ReLU(name="m0_s1_b0_relu1")(h)
    c = keras.layers.Conv2D(2 * width, 3, strides=2, padding="same", use_bias=False,
                            name="m0_s1_b0_conv1")(r)
    c = keras.layers.BatchNormalization(name="m0_s1_b0_bn2")(c)
    c = keras.layers.ReLU(name="m0_s1_b0_relu2")(c)
    c = keras.layers.Conv2D(2 * width, 3, padding="same", use_bias=False,
                            name="m0_s1_b0_conv2")(c)
    s = keras.layers.Conv2D(2 * width, 1, strides=2, padding="same", use_bias=False,
                            name="m0_s1_b0_shortcut")(r)
    a = keras.layers.Add(name="m0_s1_b0_add")([c, s])
    a = StubNoise(0.0, name="m0_s1_b0_noise")(a)
    p = keras.layers.GlobalAveragePooling2D(name="m0_pool")(a)
    model = keras.Model(x, keras.layers.Dense(10, name="m0_logits")(p))
    # Non-trivial BN statistics, so inference differs from identity.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            rng = np.random.default_rng(seed + n)
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n),
                               rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n)])
    return model


def qcfg(precision="ternary", layers=("conv3x3",), per_channel=False, bits=4):
    c = ml_collections.ConfigDict()
    c.precision, c.bits, c.per_channel, c.layers = precision, bits, per_channel, layers
    c.lam0, c.rho, c.phase2_epoch, c.phase2_fraction = 1.0, 1.05, 120, -1.0
    return c


CONV3 = ["m0_conv0", "m0_s1_b0_conv1", "m0_s1_b0_conv2"]


def images(n=4, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, 8, 8, 3)).astype(np.float32)


def wrapped_names(model):
    return sorted(l.layer.name for l in model.layers if isinstance(l, binary_relax.QuantizeWrapper))


def op_types(model):
    fn = tf.function(lambda x: model(x, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec((1, 8, 8, 3), tf.float32)).graph
    return {op.type for op in graph.get_operations()}


def test_only_annotated_layers_are_wrapped():
    model = tiny_resnet()
    q = train_lib.quantize_from_config(model, qcfg())
    assert wrapped_names(q) == sorted(CONV3)
    # Every other layer is the original class, no QuantizeLayer, no fake-quant op.
    assert [l.name for l in q.layers if type(l).__name__ == "QuantizeLayer"] == []
    unwrapped = {l.name: type(l).__name__ for l in q.layers
                 if not isinstance(l, binary_relax.QuantizeWrapper)}
    assert unwrapped["m0_s1_b0_relu1"] == "ReLU" and unwrapped["m0_s1_b0_shortcut"] == "Conv2D"
    assert unwrapped["m0_logits"] == "Dense" and unwrapped["m0_s1_b0_bn1"] == "BatchNormalization"
    assert not any("FakeQuant" in t for t in op_types(q))
    assert any("FakeQuant" in t for t in op_types(int8_qat_lib.int8_qat(model)))  # the contrast
    # Float weights carried over from the float model.
    for name in CONV3:
        _, w, _, _ = [t for t in binary_relax.br_quantizers(q) if t[0].layer.name == name][0]
        np.testing.assert_array_equal(w.numpy(), model.get_layer(name).kernel.numpy())
    assert binary_relax.br_state(q) == (1.0, False)
    # Other kinds on request, and the float model untouched.
    q2 = train_lib.quantize_from_config(model, qcfg(layers=("conv3x3", "conv1x1", "dense")))
    assert wrapped_names(q2) == sorted(CONV3 + ["m0_s1_b0_shortcut", "m0_logits"])
    assert all(not isinstance(l, binary_relax.QuantizeWrapper) for l in model.layers)
    assert q.get_layer("m0_logits").kernel is not model.get_layer("m0_logits").kernel
    assert train_lib.quantize_from_config(model, qcfg("float")) is model


def test_keep_float_leaves_named_layers_float():
    model = tiny_resnet()
    c = qcfg()
    c.keep_float = ("conv0$",)
    q = train_lib.quantize_from_config(model, c)
    assert wrapped_names(q) == ["m0_s1_b0_conv1", "m0_s1_b0_conv2"]
    stem = q.get_layer("m0_conv0")
    assert type(stem).__name__ == "Conv2D"
    np.testing.assert_array_equal(stem.kernel.numpy(), model.get_layer("m0_conv0").kernel.numpy())
    with pytest.raises(ValueError, match="invalid regex"):
        c.keep_float = ("conv0(",)
        train_lib.quantize_from_config(model, c)
    with pytest.raises(ValueError, match="outside keep_float"):
        c.keep_float = ("conv",)
        train_lib.quantize_from_config(model, c)


def test_validation():
    model = tiny_resnet()
    with pytest.raises(ValueError, match="conv1x1"):
        train_lib.quantize_from_config(model, qcfg(layers=("conv3x3", "depthwise")))
    with pytest.raises(ValueError, match="int8_qat"):
        train_lib.quantize_from_config(model, qcfg("octal"))
    with pytest.raises(ValueError, match="no Binary-Relax"):
        binary_relax.br_state(model)
    x = keras.Input((4,))
    with pytest.raises(ValueError, match="no layer of the kinds"):
        train_lib.quantize_from_config(keras.Model(x, keras.layers.ReLU()(x)), qcfg())


def _wrapper(q, name):
    return [t for t in binary_relax.br_quantizers(q) if t[0].layer.name == name][0]


@pytest.mark.parametrize("precision,per_channel", [("binary", False), ("4bit", True)])
def test_forward_phase_one_and_two(precision, per_channel):
    q = train_lib.quantize_from_config(tiny_resnet(), qcfg(precision, per_channel=per_channel))
    wrapper, w, quantizer, qvars = _wrapper(q, "m0_s1_b0_conv1")
    assert quantizer.q_fn.keywords["per_channel"] is per_channel
    qw = quantizers.get(precision, per_channel=per_channel)(w).numpy()
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 8, 8, 4)), tf.float32)

    def conv(kernel):
        return tf.nn.conv2d(x, kernel, strides=2, padding="SAME").numpy()

    lam = 2.5
    binary_relax.set_br_state(q, lam=lam, exact=False)
    u = (lam * qw + w.numpy()) / (1 + lam)
    for training in (True, False):  # the forward ignores the training flag
        np.testing.assert_allclose(wrapper(x, training=training).numpy(), conv(u),
                                   rtol=1e-5, atol=1e-5)
    binary_relax.set_exact(q)
    assert binary_relax.br_state(q) == (2.5, True)
    for training in (True, False):
        np.testing.assert_allclose(wrapper(x, training=training).numpy(), conv(qw),
                                   rtol=1e-5, atol=1e-5)
    # The function itself: phase II is Q(w) bit for bit.
    np.testing.assert_array_equal(
            binary_relax.binary_relax(w, quantizer.q_fn, 2.5, 1.0).numpy(), qw)
    levels = quantizers.num_levels(precision)
    groups = [qw] if not per_channel else [qw[..., c] for c in range(qw.shape[-1])]
    counts = [len(np.unique(g)) for g in groups]
    # 36 weights per channel need not fill all 15 4-bit levels; binary fills 2.
    assert max(counts) <= levels and (precision != "binary" or min(counts) == levels)


@pytest.mark.parametrize("exact", [False, True])
def test_straight_through_gradient(exact):
    q = train_lib.quantize_from_config(tiny_resnet(), qcfg("ternary"))
    binary_relax.set_br_state(q, lam=1.7, exact=exact)
    wrapper, w, quantizer, _ = _wrapper(q, "m0_s1_b0_conv2")
    x = tf.constant(np.random.default_rng(2).normal(size=(2, 4, 4, 8)), tf.float32)
    r = tf.constant(np.random.default_rng(3).normal(size=(2, 4, 4, 8)), tf.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(wrapper(x, training=True)) * r)
    dw = tape.gradient(loss, w)
    u = tf.Variable(binary_relax.binary_relax(w, quantizer.q_fn, 1.7, float(exact)))
    with tf.GradientTape() as tape:
        loss_u = tf.reduce_sum(tf.square(tf.nn.conv2d(x, u, 1, "SAME")) * r)
    du = tape.gradient(loss_u, u)
    np.testing.assert_allclose(loss.numpy(), loss_u.numpy(), rtol=1e-5)
    np.testing.assert_allclose(dw.numpy(), du.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(dw.numpy()).max() > 0


def test_schedule_sets_lam_and_phase():
    q = train_lib.quantize_from_config(tiny_resnet(), qcfg("binary"))
    sched = schedule_lib.BinaryRelaxSchedule(lam0=1.0, rho=1.05, phase2_epoch=5)
    sched.set_model(q)
    for epoch in (7, 0, 4, 5, 2):  # any order: a pure function of the epoch
        sched.on_epoch_begin(epoch)
        for _, _, _, v in binary_relax.br_quantizers(q):
            assert v["br_lam"].numpy() == np.float32(1.05**epoch)
            assert v["br_exact"].numpy() == (1.0 if epoch >= 5 else 0.0)
    with pytest.raises(ValueError, match="rho"):
        schedule_lib.BinaryRelaxSchedule(rho=0.9)
    c = config.base_config()
    c.optim.epochs, c.quant.phase2_fraction = 10, 0.6
    assert train_lib.schedule_for(c).state(5) == (1.05**5, False)
    assert train_lib.schedule_for(c).state(6) == (1.05**6, True)

    # A model wrapping the quantized graph (as the adversarial trainer does).
    class Outer(keras.Model):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def call(self, x, training=None):
            return self.inner(x, training=training)

    sched.set_model(Outer(q))
    sched.on_epoch_begin(6)
    assert binary_relax.br_state(q) == (np.float32(1.05**6), True)
    assert len(binary_relax.br_quantizers(Outer(q))) == 3

    # Inside fit: the state seen at the end of every epoch.
    seen = []
    record = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda e, logs: seen.append(binary_relax.br_state(q)))
    q.compile(optimizer=keras.optimizers.SGD(0.01),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    y = np.arange(4) % 10
    q.fit(images(), y, epochs=4, batch_size=4, verbose=0,
          callbacks=[schedule_lib.BinaryRelaxSchedule(2.0, 1.5, 2), record])
    assert seen == [(2.0, False), (3.0, False), (4.5, True), (6.75, True)]


def test_checkpoint_and_h5_round_trip(tmp_path):
    model = tiny_resnet()
    q = train_lib.quantize_from_config(model, qcfg("4bit"))
    binary_relax.set_br_state(q, lam=3.0, exact=True)
    ref = [v.numpy() for v in q.weights]
    names = [v.name for v in q.weights]
    assert sum(n.endswith("br_lam:0") for n in names) == 3
    assert sum(n.endswith("br_exact:0") for n in names) == 3

    path = tf.train.Checkpoint(model=q).write(str(tmp_path / "ckpt"))
    q.save_weights(str(tmp_path / "w.h5"))
    for v in q.weights:
        v.assign(tf.zeros_like(v) + 0.25 if v.dtype == tf.float32 else tf.zeros_like(v))
    binary_relax.set_br_state(q, lam=9.0, exact=False)
    tf.train.Checkpoint(model=q).read(path).assert_existing_objects_matched()
    for a, b in zip(ref, [v.numpy() for v in q.weights]):
        np.testing.assert_array_equal(a, b)
    assert binary_relax.br_state(q) == (3.0, True)

    q2 = train_lib.quantize_from_config(model, qcfg("4bit"))
    assert binary_relax.br_state(q2) == (1.0, False)
    q2.load_weights(str(tmp_path / "w.h5"))
    assert binary_relax.br_state(q2) == (3.0, True)
    for a, b in zip(ref, [v.numpy() for v in q2.weights]):
        np.testing.assert_array_equal(a, b)

    # Full-model .h5 through custom_object_scope (the .keras format fails in tfmot).
    q.save(str(tmp_path / "m.h5"))
    with binary_relax.custom_object_scope():
        q3 = keras.models.load_model(str(tmp_path / "m.h5"), compile=False)
    assert binary_relax.br_state(q3) == (3.0, True)
    np.testing.assert_allclose(q3(images(), training=False), q(images(), training=False),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layers", [("conv3x3",), ("conv3x3", "conv1x1", "dense")])
def test_copy_to_float_matches_phase_two(layers):
    q = train_lib.quantize_from_config(tiny_resnet(seed=0), qcfg("ternary", layers=layers))
    kernels = binary_relax.quantized_kernels(q)
    want_names = CONV3 + (["m0_s1_b0_shortcut", "m0_logits"] if len(layers) > 1 else [])
    assert sorted(kernels) == sorted(want_names)
    for name, k in kernels.items():
        assert len(np.unique(k)) == 3, name
    assert kernels["m0_conv0"].shape == (3, 3, 3, 4)  # HWIO

    binary_relax.set_exact(q)
    deploy = binary_relax.copy_to_float(q, tiny_resnet(seed=5))
    x = images(8)
    np.testing.assert_allclose(deploy(x, training=False).numpy(),
                               q(x, training=False).numpy(), rtol=1e-5, atol=1e-5)
    for name, k in kernels.items():
        np.testing.assert_array_equal(deploy.get_layer(name).kernel.numpy(), k)
    # Float layers copied as they are (bias of the dense head included).
    np.testing.assert_array_equal(deploy.get_layer("m0_s1_b0_bn1").moving_variance.numpy(),
                                  q.get_layer("m0_s1_b0_bn1").moving_variance.numpy())
    if len(layers) > 1:
        np.testing.assert_array_equal(deploy.get_layer("m0_logits").bias.numpy(),
                                      tiny_resnet(seed=0).get_layer("m0_logits").bias.numpy())
    with pytest.raises(ValueError, match="weight shapes differ"):
        binary_relax.copy_to_float(q, tiny_resnet(width=6))


def test_int8_qat_runs_with_custom_layer():
    model = tiny_resnet()
    x = images(8)
    with binary_relax.custom_object_scope():
        q8 = train_lib.quantize_from_config(model, qcfg("int8_qat"))
    types = {l.name: type(l).__name__ for l in q8.layers}
    assert types["m0_s1_b0_noise"] == "StubNoise"  # custom layer left float
    assert "QuantizeLayer" in types.values()
    wrapped = wrapped_names(q8)
    assert set(CONV3 + ["m0_s1_b0_shortcut", "m0_logits", "m0_s1_b0_add"]) <= set(wrapped)
    # Activation ranges start at [-6, 6] and their EMA moves slowly, so 8-bit
    # steps of ~0.05 dominate the error here (measured 0.076 relative).
    for _ in range(3):
        q8(x, training=True)
    y8, yf = q8(x, training=False).numpy(), model(x, training=False).numpy()
    assert y8.shape == (8, 10) and np.all(np.isfinite(y8))
    err = np.max(np.abs(y8 - yf)) / np.max(np.abs(yf))
    assert err < 0.25, err


MIRRORED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from brkeras._keras import keras, tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    from brkeras.quant import binary_relax, schedule as schedule_lib
    from brkeras.run import train as train_lib
    import ml_collections
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        x = keras.Input((6, 6, 2))
        h = keras.layers.Conv2D(3, 3, use_bias=False, name="c0")(x)
        h = keras.layers.GlobalAveragePooling2D()(h)
        m = keras.Model(x, keras.layers.Dense(2, name="d")(h))
        c = ml_collections.ConfigDict(dict(precision="binary", bits=4, per_channel=False,
                                           layers=("conv3x3",)))
        q = train_lib.quantize_from_config(m, c)
        q.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    (_, _, _, v), = binary_relax.br_quantizers(q)
    seen = []
    def rec(epoch, logs):
        lam = [float(t.numpy()) for t in strategy.experimental_local_results(v["br_lam"])]
        ex = [float(t.numpy()) for t in strategy.experimental_local_results(v["br_exact"])]
        seen.append((type(v["br_lam"]).__name__, lam, ex))
    q.fit(np.ones((8, 6, 6, 2), np.float32), np.zeros(8), batch_size=4, epochs=3, verbose=0,
          callbacks=[schedule_lib.BinaryRelaxSchedule(1.0, 2.0, 2),
                     keras.callbacks.LambdaCallback(on_epoch_end=rec)])
    print("SEEN", seen)
""")


def test_schedule_under_mirrored_strategy():
    out = subprocess.run([sys.executable, "-c", MIRRORED.format(root=ROOT)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [s for s in out.stdout.splitlines() if s.startswith("SEEN")][0]
    seen = eval(line[5:])  # noqa: S307  (our own printed literal)
    assert seen == [("MirroredVariable", [1.0, 1.0], [0.0, 0.0]),
                    ("MirroredVariable", [2.0, 2.0], [0.0, 0.0]),
                    ("MirroredVariable", [4.0, 4.0], [1.0, 1.0])]
