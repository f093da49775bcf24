"""nn/graph.py: the functional-model replay shared by the noise split, deploy and pruning."""

import numpy as np
import pytest

from brkeras.nn import graph
from brkeras._keras import keras


def _residual_model():
    x = keras.Input((4,))
    h = keras.layers.Dense(4, name="d1")(x)
    a = keras.layers.Dense(4, name="d2")(h)
    out = keras.layers.Add(name="add")([h, a])
    return keras.Model(x, keras.layers.Dense(2, name="head")(out))


def test_call_sites_are_in_graph_order_with_their_node():
    m = _residual_model()
    sites = graph.call_sites(m)
    assert [l.name for l, _ in sites] == ["d1", "d2", "add", "head"]
    assert all(n in l.inbound_nodes for l, n in sites)


def test_replay_without_substitution_computes_the_model():
    m = _residual_model()
    inp = keras.Input((4,))
    new = graph.replay(graph.call_sites(m), {id(m.inputs[0]): inp})
    copy = keras.Model(inp, new[id(m.outputs[0])])
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(copy(x).numpy(), m(x).numpy(), rtol=1e-6)
    assert copy.get_layer("d1") is m.get_layer("d1")  # shared layer objects


def test_replay_substitutes_and_skips():
    m = _residual_model()
    inp = keras.Input((4,))
    d2_out = m.get_layer("d2").output
    sites = [(l, n) for l, n in graph.call_sites(m) if l.name != "d2"]  # d2 left unmapped

    def add_passes_h(layer, node, args):
        if layer.name != "add":
            return None
        assert sum(a is None for a in args) == 1  # d2's output was not mapped
        return [a for t, a in zip(graph.flat(node.input_tensors), args) if t is not d2_out][0]

    new = graph.replay(sites, {id(m.inputs[0]): inp}, add_passes_h)
    copy = keras.Model(inp, new[id(m.outputs[0])])
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    d1, head = m.get_layer("d1"), m.get_layer("head")
    np.testing.assert_allclose(copy(x).numpy(), head(d1(x)).numpy(), rtol=1e-6)


def test_a_layer_called_twice_is_refused_by_name():
    x = keras.Input((4,))
    shared = keras.layers.Dense(4, name="shared")
    m = keras.Model(x, shared(shared(x)))
    with pytest.raises(ValueError, match="shared: 2 call sites"):
        graph.call_sites(m)


def test_a_layer_called_on_two_branches_is_refused():
    x = keras.Input((4,))
    shared = keras.layers.Dense(4, name="twice")
    m = keras.Model(x, keras.layers.Add()([shared(x), shared(keras.layers.Dense(4)(x))]))
    with pytest.raises(ValueError, match="twice: 2 call sites"):
        graph.call_sites(m)
