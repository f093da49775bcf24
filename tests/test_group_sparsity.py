"""brkeras.quant.group_sparsity: proximal group lasso / TL1 channel sparsity."""

import importlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from brkeras._keras import keras, tf
from brkeras.quant import group_sparsity as gs


# ---- NumPy references -----------------------------------------------------------


def np_group_norms(w, axis):
    other = tuple(i for i in range(w.ndim) if i != axis)
    return np.sqrt((w.astype(np.float64) ** 2).sum(axis=other))


def np_soft(w, t, axis):
    n = np_group_norms(w, axis)
    f = np.where(n > 0, np.maximum(0.0, 1.0 - t / np.where(n > 0, n, 1.0)), 1.0)
    shape = [1] * w.ndim
    shape[axis] = -1
    return w * f.reshape(shape)


def np_rho(x, a):
    return (a + 1.0) * x / (a + x)


def np_tl1_literal(r, t, a):
    """Zhang and Xin's closed form, literally (arccos / cos form)."""
    r = np.asarray(r, np.float64)
    ts = t * (a + 1) / a if t <= a * a / (2 * (a + 1)) else np.sqrt(2 * t * (a + 1)) - a / 2
    phi = np.arccos(np.clip(1 - 27 * t * a * (a + 1) / (2 * (a + r) ** 3), -1, 1))
    g = 2.0 / 3.0 * (a + r) * np.cos(phi / 3) - 2 * a / 3 + r / 3
    return np.where(r > ts, g, 0.0)


def small_resnet(width=4, blocks=2, hw=8, classes=3, seed=0):
    """Stem conv0 + `blocks` pre-activation blocks (identity shortcuts, Add) + head;
    layer names follow prune.py's contract (p_conv1, p_bn2, p_relu2, p_conv2)."""
    keras.utils.set_random_seed(seed)
    conv = lambda name: keras.layers.Conv2D(width, 3, padding="same", use_bias=False,  # noqa: E731
                                            name=name)
    x = keras.Input((hw, hw, 3))
    h = conv("conv0")(x)
    for b in range(blocks):
        p = f"b{b}_"
        out = keras.layers.ReLU(name=p + "relu1")(keras.layers.BatchNormalization(name=p + "bn1")(h))
        out = conv(p + "conv1")(out)
        out = keras.layers.ReLU(name=p + "relu2")(keras.layers.BatchNormalization(name=p + "bn2")(out))
        out = conv(p + "conv2")(out)
        h = keras.layers.Add(name=p + "add")([out, h])
    h = keras.layers.ReLU(name="relu_final")(keras.layers.BatchNormalization(name="bn_final")(h))
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(x, keras.layers.Dense(classes, name="logits")(h))


def data(n=64, hw=8, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, (n, hw, hw, 3)).astype(np.float32),
            rng.integers(0, classes, n).astype(np.int32))


def compiled(model, lr=0.05, run_eagerly=False):
    # run_eagerly: a few steps of a tiny model run faster than tracing fit's train step;
    # the callback runs in the same (cross-replica) context either way.
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=run_eagerly)
    return model


def prune_module():
    for name in ("brkeras.deploy.prune", "brkeras.prune"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


# ---- Pure functions -------------------------------------------------------------


def test_group_soft_threshold_matches_numpy_with_zero_groups_and_t0():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3, 5, 4)).astype(np.float32)
    w[:, :, 1, :] = 0.0  # an already-zero group
    norms = np_group_norms(w, 2)
    t = float(np.median(norms[norms > 0]))
    out = gs.group_soft_threshold(w, t, axis=2).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, np_soft(w, t, 2), rtol=1e-5, atol=1e-6)
    assert np.all(out[:, :, 1, :] == 0)
    # groups at or below t are exactly zero, the others keep their direction
    for c in range(5):
        if norms[c] <= t:
            assert np.all(out[:, :, c, :] == 0)
        else:
            np.testing.assert_allclose(np.linalg.norm(out[:, :, c, :]), norms[c] - t, rtol=1e-5)
    np.testing.assert_array_equal(gs.group_soft_threshold(w, 0.0, axis=2).numpy(), w)
    np.testing.assert_array_equal(gs.group_tl1_shrink(w, 0.0, 1.0, axis=2).numpy(), w)
    # another axis (output filters, kernel[..., o]) and a negative axis
    np.testing.assert_allclose(gs.group_soft_threshold(w, 2.0, axis=-1).numpy(),
                               np_soft(w, 2.0, 3), rtol=1e-5, atol=1e-6)


def test_large_t_gives_exact_zeros_in_one_step():
    w = np.random.default_rng(1).normal(size=(3, 3, 6, 8)).astype(np.float32)
    r_max = np_group_norms(w, 2).max()
    assert np.all(gs.group_soft_threshold(w, 1.01 * r_max, 2).numpy() == 0)
    # TL1 (a = 1, supercritical) zeros r <= sqrt(2 t (a + 1)) - a / 2, which is below t here
    t = 1.01 * (r_max + 0.5) ** 2 / 4.0
    assert np.all(gs.group_tl1_shrink(w, t, 1.0, 2).numpy() == 0)
    assert np.all(gs.group_tl1_shrink(w, 0.99 * (r_max + 0.5) ** 2 / 4.0, 1.0, 2).numpy()
                  .reshape(-1, 6, 8).any(axis=(0, 2)) == (np_group_norms(w, 2) == r_max))


@pytest.mark.parametrize("a", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("t", [0.01, 0.2, 1.5])
def test_tl1_prox_minimises_scalar_objective(a, t):
    sub = t <= a * a / (2 * (a + 1))
    ts = t * (a + 1) / a if sub else np.sqrt(2 * t * (a + 1)) - a / 2
    r = np.unique(np.concatenate([np.linspace(0, 4 * ts + 3, 301), [ts, ts * 1.0001]]))
    got = gs.tl1_threshold(r, t, a).numpy()
    assert got.dtype == np.float64
    # the stable form used equals the literal closed form (away from r = t*, where the
    # supercritical prox has two minimisers and rounding picks either)
    off = np.abs(r - ts) > 1e-12
    np.testing.assert_allclose(got[off], np_tl1_literal(r, t, a)[off], rtol=1e-10, atol=1e-12)
    assert np.all(got[r < ts] == 0) and np.all(got[r > ts * (1 + 1e-9)] > 0)
    x = np.linspace(0, r.max() * 1.05, 100001)
    for ri, gi in zip(r, got):
        obj = 0.5 * (x - ri) ** 2 + t * np_rho(x, a)
        val = 0.5 * (gi - ri) ** 2 + t * np_rho(gi, a)
        assert val <= obj.min() + 1e-10, (ri, gi, x[obj.argmin()])
    np.testing.assert_array_equal(gs.tl1_threshold(r, 0.0, a).numpy(), r)


def test_joint_groups_share_one_norm():
    rng = np.random.default_rng(2)
    k2 = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)   # conv2: group c = k2[:, :, c, :]
    k1 = rng.normal(size=(3, 3, 5, 4)).astype(np.float32)   # conv1: group c = k1[..., c]
    gamma = rng.normal(size=4).astype(np.float32)
    r = np.sqrt(np_group_norms(k2, 2) ** 2 + np_group_norms(k1, 3) ** 2 + gamma.astype(np.float64) ** 2)
    cut = float(np.sort(r)[1] + 1e-3)  # two groups die, two shrink
    for kind in ("l1", "tl1"):
        # TL1, a = 2 (supercritical here): zero below t* = sqrt(2 t (a + 1)) - a / 2
        t = cut if kind == "l1" else (cut + 1.0) ** 2 / 6.0
        n2, n1, ng = [x.numpy() for x in gs.joint_group_shrink(
                [(k2, 2), (k1, 3), (gamma, 0)], t, kind=kind, a=2.0)]
        f = (np.maximum(0, 1 - t / r) if kind == "l1"
             else np_tl1_literal(r, t, 2.0) / r)
        np.testing.assert_allclose(n2, k2 * f[None, None, :, None], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(n1, k1 * f, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ng, gamma * f, rtol=1e-5, atol=1e-6)
        dead = f == 0
        assert dead.sum() == 2
        assert np.all(n2[:, :, dead, :] == 0) and np.all(n1[..., dead] == 0) and np.all(ng[dead] == 0)
    with pytest.raises(ValueError, match="same channel count"):
        gs.joint_group_shrink([(k2, 2), (k1, 2)], cut)
    with pytest.raises(ValueError, match="'l1'"):
        gs.joint_group_shrink([(k2, 2)], cut, kind="l2")


# ---- Group discovery ------------------------------------------------------------


def test_block_groups_finds_only_private_chains():
    model = small_resnet()
    groups = gs.block_groups(model)
    assert [g.name for g in groups] == ["b0_conv2", "b1_conv2"]
    assert [g.conv1_name for g in groups] == ["b0_conv1", "b1_conv1"]
    for g, p in zip(groups, ("b0_", "b1_")):
        assert g.kernel1 is model.get_layer(p + "conv1").kernel
        assert g.kernel2 is model.get_layer(p + "conv2").kernel
        assert g.gamma is model.get_layer(p + "bn2").gamma and g.bias1 is None
        assert g.channels == 4
    assert all("conv0" not in (g.name, g.conv1_name) for g in groups)  # stem: residual stream
    # a chain whose relu2 output is also used elsewhere is not private
    x = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="c1")(x)
    r = keras.layers.ReLU(name="r")(keras.layers.BatchNormalization(name="b")(h))
    y = keras.layers.Conv2D(4, 3, padding="same", name="c2")(r)
    assert gs.block_groups(keras.Model(x, [y, r])) == []
    assert [g.name for g in gs.block_groups(keras.Model(x, y))] == ["c2"]
    # a subclassed trainer holding the functional net (like AdversarialModel)
    class Trainer(keras.Model):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def call(self, x):
            return self.net(x)

    assert [g.name for g in gs.block_groups(Trainer(model))] == ["b0_conv2", "b1_conv2"]
    share = gs.zero_group_share(model)
    assert share["share"] == 0.0 and share["groups"] == 8 and set(share["layers"]) == {
            "b0_conv2", "b1_conv2"}


def test_lam_schedule_and_validation():
    cb = gs.GroupSparsity(2.0, start_epoch=2, warmup_epochs=2, steps_per_epoch=4)
    assert cb.lam(0, 3) == 0.0 and cb.lam(1, 3) == 0.0
    assert cb.lam(2, 0) == pytest.approx(2.0 * 0.25 / 2)
    assert cb.lam(3, 1) == pytest.approx(2.0 * 1.5 / 2)
    assert cb.lam(3, 3) == 2.0 and cb.lam(9, 0) == 2.0
    assert gs.GroupSparsity(1.0, start_fraction=0.5, total_epochs=10).start_epoch == 5
    for kwargs, msg in [(dict(strength=-1), "strength"), (dict(strength=1, penalty="l2"), "penalty"),
                        (dict(strength=1, tl1_a=0), "tl1_a"),
                        (dict(strength=1, target_share=1.0), "target_share"),
                        (dict(strength=1, start_fraction=0.5), "total_epochs"),
                        (dict(strength=1, start_epoch=8, warmup_epochs=5, total_epochs=10),
                         "exceeds total_epochs")]:
        with pytest.raises(ValueError, match=msg):
            gs.GroupSparsity(**kwargs)


def test_current_lr_reads_schedules_at_the_step_taken():
    sched = keras.optimizers.schedules.PiecewiseConstantDecay([0], [0.1, 0.01])
    for opt in (keras.optimizers.SGD(sched), keras.optimizers.legacy.SGD(sched)):
        v = tf.Variable([1.0])
        opt.apply_gradients([(tf.constant([1.0]), v)])  # step 0 used lr 0.1
        assert float(gs._current_lr(opt)) == pytest.approx(0.1)
        opt.apply_gradients([(tf.constant([1.0]), v)])  # step 1 used lr 0.01
        assert float(gs._current_lr(opt)) == pytest.approx(0.01)


def test_compiled_step_equals_joint_prox_reference():
    model = compiled(small_resnet(), lr=0.1)
    ref = {v.name: v.numpy() for v in model.weights}
    cb = gs.GroupSparsity(10.0, penalty="tl1", tl1_a=0.5, include_conv1=True, include_bn2=True)
    cb.set_model(model)
    cb._build()
    t = float(cb._fn(tf.constant(10.0)))
    assert t == pytest.approx(1.0)
    for p in ("b0_", "b1_"):
        k1, k2 = ref[p + "conv1/kernel:0"], ref[p + "conv2/kernel:0"]
        gm, bt = ref[p + "bn2/gamma:0"], ref[p + "bn2/beta:0"]
        new = [x.numpy() for x in gs.joint_group_shrink(
                [(k2, 2), (k1, 3), (gm, 0), (bt, 0)], t, kind="tl1", a=0.5)]
        got = [model.get_layer(p + "conv2").kernel, model.get_layer(p + "conv1").kernel,
               model.get_layer(p + "bn2").gamma, model.get_layer(p + "bn2").beta]
        for n, g in zip(new, got):
            np.testing.assert_allclose(g.numpy(), n, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.get_layer("conv0").kernel.numpy(), ref["conv0/kernel:0"])


# ---- Training -------------------------------------------------------------------


def test_training_reaches_target_and_prunes_exactly():
    model = compiled(small_resnet())
    x, y = data()
    cb = gs.GroupSparsity(strength=40.0, target_share=0.5)
    hist = model.fit(x, y, batch_size=16, epochs=2, callbacks=[cb], verbose=0)
    share = gs.zero_group_share(model)
    assert share["share"] == 0.5 and share["zero_groups"] == 4
    assert hist.history["group_zero_share"][-1] == 0.5
    assert hist.history["group_lam"] == [40.0, 40.0]
    stem = model.get_layer("conv0").kernel.numpy()
    assert np.all(np.abs(stem).reshape(-1, 4).sum(axis=0) > 0)  # the residual stream untouched
    prune = prune_module()
    if prune is None:
        pytest.skip("neither brkeras.deploy.prune nor brkeras.prune is importable")
    pruned, report = prune.prune_blocks(model)
    want = sum(min(v["zero_groups"], v["channels"] - 1) for v in share["layers"].values())
    assert report["removed_channels"] == want > 0
    assert report["after"]["macs"] < report["before"]["macs"]
    np.testing.assert_allclose(pruned.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)


def _quantize(model):
    try:
        from brkeras.quant import binary_relax  # pylint: disable=g-import-not-at-top
        return binary_relax.quantize_model(model, precision="ternary", per_channel=True)
    except ImportError:
        pass
    try:
        import ml_collections  # pylint: disable=g-import-not-at-top
        from brkeras import quantize  # pylint: disable=g-import-not-at-top
    except ImportError:
        return None
    return quantize.quantize_model(model, ml_collections.ConfigDict(
            dict(precision="ternary", layers=("conv3x3",), per_channel=True)))


def test_quantized_model_float_kernels_and_zero_q():
    qmodel = _quantize(small_resnet())
    if qmodel is None:
        pytest.skip("no Binary-Relax quantize_model importable")
    groups = gs.block_groups(qmodel)
    assert [g.name for g in groups] == ["b0_conv2", "b1_conv2"]
    for g in groups:
        assert type(g.conv2).__name__.startswith("QuantizeWrapper")
        float_k = [w for w in g.conv2.weights if w.name.endswith("kernel:0")]
        assert len(float_k) == 1 and g.kernel2 is float_k[0]
        assert g.kernel2 is not g.conv2.layer.kernel  # that is u, a tensor
    compiled(qmodel, run_eagerly=True)
    x, y = data(32)
    cb = gs.GroupSparsity(strength=40.0, target_share=0.5, penalty="tl1", include_conv1=True)
    qmodel.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    share = gs.zero_group_share(qmodel, groups)
    assert share["zero_groups"] == 4
    for g in groups:
        dead = share["layers"][g.name]["dead_inputs"]
        assert np.all(g.kernel1.numpy()[..., dead] == 0)  # joint group: conv1 filter too
        (w, quantizer, _), = g.conv2._weight_vars  # pylint: disable=protected-access
        q = quantizer.q_fn(w).numpy()
        assert np.all(q[:, :, dead, :] == 0)
        alive = [c for c in range(g.channels) if c not in dead]
        assert all(np.any(q[:, :, c, :] != 0) for c in alive)


_MIRRORED = textwrap.dedent("""
    import sys
    import numpy as np
    import brkeras
    from brkeras._keras import keras, tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    sys.path.insert(0, sys.argv[1])
    import test_group_sparsity as T
    from brkeras.quant import group_sparsity as gs
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = T.compiled(T.small_resnet(), run_eagerly=True)
    x, y = T.data(32)
    cb = gs.GroupSparsity(strength=40.0, target_share=0.5, include_conv1=True)
    hist = model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    groups = gs.block_groups(model)
    for g in groups:
        for v in (g.kernel1, g.kernel2):
            a, b = [r.numpy() for r in v.values]
            assert np.array_equal(a, b), v.name
    share = gs.zero_group_share(model, groups)["share"]
    print("RESULT", strategy.num_replicas_in_sync, share, hist.history["group_zero_share"][-1])
""")


def test_mirrored_strategy_two_logical_cpus():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _MIRRORED, os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    _, replicas, share, logged = line.split()
    assert int(replicas) == 2 and float(share) == 0.5 and float(logged) == 0.5


# ---- MAC-weighted thresholds (cost_power) ----------------------------------------


def test_channel_macs_is_what_pruning_a_channel_saves():
    model = small_resnet(width=4, blocks=2, hw=8)
    groups = gs.block_groups(model)
    assert [g.channel_macs() for g in groups] == [2 * 8 * 8 * 9 * 4] * 2  # conv1 filter + conv2 slice
    prune = prune_module()
    k = groups[0].kernel2.numpy()
    k[:, :, 1, :] = 0.0
    groups[0].kernel2.assign(k)
    _, report = prune.prune_blocks(model)
    assert report["removed_channels"] == 1
    assert report["before"]["macs"] - report["after"]["macs"] == groups[0].channel_macs()


def _projection_block(c_in=4, private=6, c_out=8, hw=8):
    """Stem + one block whose private chain has a biased conv1 (c_in -> private) and a
    conv2 private -> c_out, with a 1x1 projection shortcut: every width differs."""
    keras.utils.set_random_seed(0)
    x = keras.Input((hw, hw, 3))
    h = keras.layers.Conv2D(c_in, 3, padding="same", use_bias=False, name="conv0")(x)
    out = keras.layers.ReLU(name="b0_relu1")(keras.layers.BatchNormalization(name="b0_bn1")(h))
    short = keras.layers.Conv2D(c_out, 1, use_bias=False, name="b0_shortcut")(out)
    out = keras.layers.Conv2D(private, 3, padding="same", use_bias=True, name="b0_conv1")(out)
    out = keras.layers.ReLU(name="b0_relu2")(keras.layers.BatchNormalization(name="b0_bn2")(out))
    out = keras.layers.Conv2D(c_out, 3, padding="same", use_bias=False, name="b0_conv2")(out)
    h = keras.layers.Add(name="b0_add")([out, short])
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(x, keras.layers.Dense(3, name="logits")(h))


def test_channel_params_is_what_pruning_a_channel_removes():
    model = _projection_block()
    g, = gs.block_groups(model)
    # conv1 filter c (3x3x4) + its bias, bn2's gamma, beta, mean, variance, conv2 slice c (3x3x8)
    assert g.channel_params() == 9 * 4 + 1 + 4 + 9 * 8
    assert g.channel_cost("params") == g.channel_params()
    assert g.channel_cost("macs") == g.channel_macs()
    with pytest.raises(ValueError, match="cost measure"):
        g.channel_cost("bytes")
    prune = prune_module()
    k = g.kernel2.numpy()
    k[:, :, 2, :] = 0.0
    g.kernel2.assign(k)
    _, report = prune.prune_blocks(model)
    assert report["removed_channels"] == 1
    assert report["before"]["params"] - report["after"]["params"] == g.channel_params()


class _FakeGroup:
    def __init__(self, channels, macs, params=1.0):
        self.channels, self._macs, self._params = channels, macs, params

    def channel_macs(self):
        return self._macs

    def channel_cost(self, measure):
        return self._macs if measure == "macs" else self._params


def test_cost_weights_normalise_by_the_mean_channel():
    groups = [_FakeGroup(2, 300.0), _FakeGroup(4, 75.0)]
    m = np.array([300.0] * 2 + [75.0] * 4)
    np.testing.assert_allclose(gs.cost_weights(groups, 1.0), m / m.mean(), rtol=1e-6)
    np.testing.assert_allclose(gs.cost_weights(groups, 0.5), np.sqrt(m / m.mean()), rtol=1e-6)
    np.testing.assert_array_equal(gs.cost_weights(groups, 0.0), np.ones(6))
    with pytest.raises(ValueError, match="cost_power"):
        gs.GroupSparsity(1.0, cost_power=-1.0)


def test_cost_weights_by_params_rank_the_other_way():
    # an early narrow stage: many MACs, few weights per channel; a late wide one: the reverse
    groups = [_FakeGroup(2, 300.0, 100.0), _FakeGroup(4, 75.0, 400.0)]
    p = np.array([100.0] * 2 + [400.0] * 4)
    np.testing.assert_allclose(gs.cost_weights(groups, 1.0, "params"), p / p.mean(), rtol=1e-6)
    macs, params = gs.cost_weights(groups, 1.0, "macs"), gs.cost_weights(groups, 1.0, "params")
    assert macs[0] > macs[-1] and params[0] < params[-1]
    with pytest.raises(ValueError, match="cost measure"):
        gs.cost_weights(groups, 1.0, "flops")
    with pytest.raises(ValueError, match="cost="):
        gs.GroupSparsity(1.0, cost_power=1.0, cost="bytes")


def test_cost_weighted_step_scales_each_threshold(monkeypatch):
    model = compiled(small_resnet(width=4, blocks=2, hw=8))
    x, y = data()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # builds the optimizer
    groups = gs.block_groups(model)
    before = [g.kernel2.numpy() for g in groups]
    weights = np.array([2.0] * 4 + [0.5] * 4, np.float32)
    monkeypatch.setattr(gs, "cost_weights", lambda gr, p, measure: weights)
    cb = gs.GroupSparsity(3.0, cost_power=1.0)
    cb.set_model(model)
    cb._build()
    t = float(cb._fn(tf.constant(3.0)))
    for g, w0, wt in zip(groups, before, (2.0, 0.5)):
        np.testing.assert_allclose(g.kernel2.numpy(), np_soft(w0, t * wt, 2), rtol=1e-5, atol=1e-7)
