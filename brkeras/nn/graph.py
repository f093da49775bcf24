"""Replaying a functional Keras model node by node, with per-layer substitutions.

The evaluation's noise split, the deploy form and block pruning each rebuild a
functional model from the same layer objects (shared weights) with a few layers
changed: `call_sites` lists each layer with the one node it is called at, in
graph order, and `replay` re-runs those calls on new tensors.
"""

from brkeras._keras import keras


def flat(x):
    """x as a list: a node's tensors are one tensor or a list of them."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def call_sites(model):
    """[(layer, node)] in graph order: every non-input layer of a functional model
    with the one inbound node whose inputs this model computes.

    Raises ValueError naming a layer called at no node or at several nodes of the
    model (a layer shared between two call sites cannot be replayed once).
    """
    known = {id(t) for t in model.inputs}
    sites = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        mine = [n for n in layer.inbound_nodes
                if all(id(t) in known for t in flat(n.input_tensors))]
        if len(mine) != 1:
            raise _called(layer, len(mine), model)
        sites.append((layer, mine[0]))
        known.update(id(t) for t in flat(mine[0].output_tensors))
    for layer, _ in sites:  # a second call on a later tensor, e.g. f(f(x))
        calls = [n for n in layer.inbound_nodes
                 if all(id(t) in known for t in flat(n.input_tensors))]
        if len(calls) != 1:
            raise _called(layer, len(calls), model)
    return sites


def _called(layer, times, model):
    return ValueError(f"layer {layer.name}: {times} call sites in model {model.name}; "
                      "only layers called once can be replayed")


def replay(sites, mapped, substitute=None):
    """Re-runs the calls `sites` ([(layer, node)], from `call_sites`) on new tensors.

    mapped: {id(old tensor): new tensor}, at least the inputs of the first site;
    updated in place with every output and returned. A site's arguments are the
    mapped tensors of its node's inputs, structured like them (one tensor or a
    list; None for an input left unmapped on purpose). substitute(layer, node,
    args) returns the site's new outputs, or None to call `layer(args)` itself.
    """
    for layer, node in sites:
        args = [mapped.get(id(t)) for t in flat(node.input_tensors)]
        args = args if isinstance(node.input_tensors, (list, tuple)) else args[0]
        out = substitute(layer, node, args) if substitute is not None else None
        if out is None:
            out = layer(args)
        for old, new in zip(flat(node.output_tensors), flat(out)):
            mapped[id(old)] = new
    return mapped
