"""Structured pruning: exactly the removable block channels go, the function stays."""

import numpy as np
import pytest

from brkeras._keras import keras, tf
from brkeras.deploy import prune

from brkeras.nn.layers import FeynmanKacNoise

L = keras.layers


def tiny_resnet(width=6, hw=8, classes=3):
    inp = keras.Input((hw, hw, 3))
    x = L.Conv2D(width, 3, padding="same", use_bias=False, name="m0_conv0")(inp)
    for s, stride in ((1, 1), (2, 2)):
        p = f"m0_s{s}_b0_"
        w = width * s
        h = L.ReLU(name=p + "relu1")(L.BatchNormalization(name=p + "bn1")(x))
        sc = L.Conv2D(w, 1, stride, use_bias=False, name=p + "shortcut")(h) if stride > 1 else x
        h = L.Conv2D(w, 3, stride, padding="same", use_bias=False, name=p + "conv1")(h)
        h = L.ReLU(name=p + "relu2")(L.BatchNormalization(name=p + "bn2")(h))
        h = L.Conv2D(w, 3, padding="same", use_bias=False, name=p + "conv2")(h)
        x = FeynmanKacNoise(0.0, name=p + "noise")(L.Add(name=p + "add")([sc, h]))
    x = L.ReLU(name="m0_relu_final")(L.BatchNormalization(name="m0_bn_final")(x))
    out = L.Dense(classes, name="m0_logits")(L.GlobalAveragePooling2D(name="m0_pool")(x))
    return keras.Model(inp, out)


def set_bn(bn, zero_maps_to):
    """BN with gamma=1, var=1-eps, mean=0, beta chosen so that bn(0) = zero_maps_to."""
    n = len(zero_maps_to)
    bn.set_weights([np.ones(n), np.asarray(zero_maps_to, float), np.zeros(n),
                    np.full(n, 1.0 - bn.epsilon)])


@pytest.fixture(scope="module")
def hand_built():
    keras.utils.set_random_seed(0)
    m = tiny_resnet()
    rng = np.random.default_rng(0)
    for layer in m.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, n), rng.normal(0, 0.5, n),
                               rng.normal(0, 0.5, n), rng.uniform(0.5, 2, n)])
    # Block s1 (6 channels): filters 1, 3, 4 of conv1 zero; relu(bn2(0)) is 0 for
    # channels 1 and 4 (bn2(0) = -0.3 and 0) but 0.5 for channel 3 -> 3 must stay.
    # conv2 input slice 5 zero -> channel 5 goes although its filter is not zero.
    c1 = m.get_layer("m0_s1_b0_conv1")
    k = c1.get_weights()[0]
    k[..., [1, 3, 4]] = 0
    c1.set_weights([k])
    set_bn(m.get_layer("m0_s1_b0_bn2"), [0.2, -0.3, 0.1, 0.5, 0.0, 0.4])
    c2 = m.get_layer("m0_s1_b0_conv2")
    k = c2.get_weights()[0]
    k[:, :, 5, :] = 0
    k[..., 2] = 0  # a zero conv2 OUTPUT filter feeds the residual stream: must stay
    c2.set_weights([k])
    # Block s2 (12 channels): conv1 filters 0 and 7 zero, bn2 maps 0 to <= 0 everywhere.
    c1 = m.get_layer("m0_s2_b0_conv1")
    k = c1.get_weights()[0]
    k[..., [0, 7]] = 0
    c1.set_weights([k])
    set_bn(m.get_layer("m0_s2_b0_bn2"), -np.abs(rng.normal(0, 1, 12)))
    # conv0 has a zero filter on the stream: must stay.
    c0 = m.get_layer("m0_conv0")
    k = c0.get_weights()[0]
    k[..., 0] = 0
    c0.set_weights([k])
    return m


def test_removes_exactly_the_removable_channels(hand_built):
    pm, rep = prune.prune_blocks(hand_built)
    b1, b2 = rep["blocks"]["m0_s1_b0_"], rep["blocks"]["m0_s2_b0_"]
    assert b1["zero_filters"] == [1, 3, 4]
    assert b1["dead_inputs"] == [5]
    assert b1["kept_zero_filters_bn_nonzero"] == [3]
    assert b1["removable"] == [1, 4, 5]
    assert b2["removable"] == [0, 7]
    assert rep["removed_channels"] == 5
    assert pm.get_layer("m0_s1_b0_conv1").filters == 3
    assert pm.get_layer("m0_s2_b0_conv1").filters == 10
    assert pm.get_layer("m0_s1_b0_conv2").kernel.shape == (3, 3, 3, 6)
    assert pm.get_layer("m0_s2_b0_conv2").kernel.shape == (3, 3, 10, 12)
    assert pm.get_layer("m0_s1_b0_bn2").gamma.shape == (3,)
    # Stream layers keep all channels, zero filters included.
    assert pm.get_layer("m0_conv0").filters == 6
    assert pm.get_layer("m0_s1_b0_conv2").filters == 6
    np.testing.assert_array_equal(pm.get_layer("m0_s1_b0_conv1").get_weights()[0],
                                  hand_built.get_layer("m0_s1_b0_conv1").get_weights()[0][..., [0, 2, 3]])


def test_pruned_model_same_function(hand_built):
    pm, _ = prune.prune_blocks(hand_built)
    x = np.random.default_rng(1).uniform(0, 1, (16, 8, 8, 3)).astype(np.float32)
    a = hand_built(x, training=False).numpy()
    b = pm(x, training=False).numpy()
    assert np.abs(a - b).max() < 1e-5
    assert np.abs(a).max() > 1e-2  # not trivially zero


def test_params_and_macs(hand_built):
    pm, rep = prune.prune_blocks(hand_built)
    # Hand count per example (8x8 input, width 6 then 12 at 4x4).
    def macs(c1_s1, c1_s2):
        return (64 * 9 * 3 * 6                        # conv0
                + 64 * 9 * 6 * c1_s1 + 64 * 9 * c1_s1 * 6   # s1 conv1, conv2
                + 16 * 1 * 6 * 12                     # s2 shortcut
                + 16 * 9 * 6 * c1_s2 + 16 * 9 * c1_s2 * 12  # s2 conv1, conv2
                + 12 * 3)                             # dense
    assert rep["before"]["macs"] == macs(6, 12)
    assert rep["after"]["macs"] == macs(3, 10)
    # Removed params: per s1 channel 9*6 (conv1) + 4 (bn2) + 9*6 (conv2); s2: 9*6 + 4 + 9*12.
    assert rep["before"]["params"] - rep["after"]["params"] == 3 * (54 + 4 + 54) + 2 * (54 + 4 + 108)
    assert rep["after"]["params"] == pm.count_params()


def test_a_chain_group_sparsity_trains_but_names_miss_is_an_error():
    # The same chain as a block's, under other names: group sparsity (graph) would
    # shrink it, so pruning must not skip it silently.
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", use_bias=False, name="stem")(inp)
    h = L.Conv2D(4, 3, padding="same", use_bias=False, name="a")(x)
    h = L.ReLU(name="c")(L.BatchNormalization(name="b")(h))
    h = L.Conv2D(4, 3, padding="same", use_bias=False, name="d")(h)
    out = L.Dense(2)(L.GlobalAveragePooling2D()(L.Add()([x, h])))
    m = keras.Model(inp, out)
    with pytest.raises(ValueError, match=r"a -> b -> c -> d .*layer-name contract"):
        prune.prune_blocks(m)


def test_nothing_to_prune_keeps_model():
    keras.utils.set_random_seed(1)
    m = tiny_resnet()
    pm, rep = prune.prune_blocks(m)
    assert rep["removed_channels"] == 0
    assert rep["before"] == rep["after"]


def test_bn_of_zero_matches_layer():
    bn = L.BatchNormalization()
    bn.build((None, 4))
    rng = np.random.default_rng(2)
    bn.set_weights([rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4),
                    rng.uniform(0.5, 2, 4)])
    ref = bn(np.zeros((1, 4), np.float32), training=False).numpy()[0]
    np.testing.assert_allclose(prune.bn_of_zero(bn), ref, rtol=1e-5, atol=1e-6)


def test_a_block_with_every_channel_removable_is_dropped_whole():
    """An identity-shortcut block adding exactly zero becomes noise(h) = its input here;
    a projection block keeps one channel (its shortcut reads relu1)."""
    keras.utils.set_random_seed(1)
    m = tiny_resnet()
    for p in ("m0_s1_b0_", "m0_s2_b0_"):
        c2 = m.get_layer(p + "conv2")
        c2.set_weights([np.zeros_like(c2.get_weights()[0])])
    x = np.random.default_rng(2).uniform(0, 1, (5, 8, 8, 3)).astype(np.float32)
    pruned, rep = prune.prune_blocks(m)
    assert rep["dropped_blocks"] == ["m0_s1_b0_"]
    names = {l.name for l in pruned.layers}
    assert not any(n.startswith("m0_s1_b0_") and not n.endswith("noise") for n in names)
    assert "m0_s1_b0_noise" in names and "m0_s2_b0_conv1" in names
    assert rep["blocks"]["m0_s1_b0_"]["kept"] == 0 and rep["blocks"]["m0_s2_b0_"]["kept"] == 1
    assert rep["removed_channels"] == 6 + 11
    s1 = 8 * 8 * 9 * 6 * 6  # conv1 and conv2 of block s1
    s2_channel = 4 * 4 * 9 * 6 + 4 * 4 * 9 * 12  # conv1 filter (stride 2) + conv2 slice
    assert rep["before"]["macs"] - rep["after"]["macs"] == 2 * s1 + 11 * s2_channel
    np.testing.assert_allclose(pruned.predict(x, verbose=0), m.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)
    again, rep2 = prune.prune_blocks(pruned)  # a pruned model prunes again, unchanged
    assert rep2["dropped_blocks"] == [] and again.count_params() == pruned.count_params()
