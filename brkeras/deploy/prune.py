"""Structured pruning inside residual blocks, exact (the pruned model computes the same map).

Inside a pre-activation block the chain `conv1 -> bn2 -> relu2 -> conv2` is private:
conv1 feeds nothing else, conv2 reads nothing else. Channel c of that chain can go
(conv1 filter c, bn2 channel c, conv2 input slice c) when it provably contributes
nothing to conv2's output:

- dead input: conv2's input slice `kernel2[:, :, c, :]` is all zero; or
- zero filter: conv1's filter `kernel1[..., c]` (and bias) is all zero AND
  `relu(bn2(0))_c = max(beta_c - gamma_c * mean_c / sqrt(var_c + eps), 0) == 0`.

A block whose every channel is removable adds exactly zero to its stream (conv2
has no bias): out = noise(h + 0) = noise(h). `prune_blocks` then drops the whole
block (bn1, relu1, conv1, bn2, relu2, conv2 and the Add; the noise layer stays,
on h) when its shortcut is the identity; with a projection shortcut it keeps one
channel, since the shortcut conv reads relu1.

A zero filter whose BN maps 0 to a positive constant r_c is KEPT: folding r_c into a
bias of conv2 is not exact, because conv2 zero-pads ('same') and the border
outputs see fewer copies of r_c than the interior. Channels of the residual
streams (conv0, conv2 outputs, shortcuts, everything joined by Add) are never
removed: the Feynman-Kac noise scales with std(out) over the whole stream tensor,
so dropping a stream channel (even an all-zero one) changes the noise
distribution, and bn1 of the next block maps a zero channel to a non-zero constant.
"""

import numpy as np

from brkeras.nn import graph
from brkeras.quant import group_sparsity
from brkeras._keras import keras


def _inbound_layers(layer):
    out = []
    for node in layer.inbound_nodes:
        il = node.inbound_layers
        out.extend(il if isinstance(il, (list, tuple)) else [il])
    return out


def _consumers(model, layer):
    return [l for l in model.layers if any(i is layer for i in _inbound_layers(l))]


def block_prefixes(model):
    """Prefixes p of the blocks whose private chain p+'conv1' -> p+'bn2' -> p+'relu2' ->
    p+'conv2' prune_blocks can cut, sorted.

    The chains are those group sparsity trains (group_sparsity.block_groups, found
    from the graph); the names tie each to its block (bn1, add, shortcut for
    whole-block removal). A chain without those names, or a name-matched chain
    that is not a private Conv2D -> BatchNormalization -> ReLU -> Conv2D(3x3) of
    this model, is an error: its channels would be trained to zero and shipped
    unpruned, or pruned unsafely.
    """
    names = {l.name for l in model.layers}
    out, unnamed = [], []
    for g in group_sparsity.block_groups(model):
        p = g.name[:-len("conv2")]
        if (g.name.endswith("_conv2") and g.name in names
                and [g.conv1_name, g.bn2.name, g.relu2.name] == [p + "conv1", p + "bn2", p + "relu2"]):
            out.append(p)
        else:
            unnamed.append(g)
    if unnamed:
        chains = ", ".join(f"{g.conv1_name} -> {g.bn2.name} -> {g.relu2.name} -> {g.name}"
                           for g in unnamed)
        raise ValueError(f"private chains {chains} are not named p+'conv1', p+'bn2', p+'relu2', "
                         "p+'conv2' in this model: group sparsity trains their channels, but "
                         "prune_blocks finds blocks by the layer-name contract of docs/design.md; "
                         "name the layers so")
    for n in sorted(names):
        p = n[:-len("conv1")]
        if n.endswith("_conv1") and p + "conv2" in names and p not in out:
            raise ValueError(f"block {p}: conv1 -> bn2 -> relu2 -> conv2 is not a private "
                             "Conv2D -> BatchNormalization -> plain ReLU -> Conv2D(3x3) chain; "
                             "prune_blocks relies on the layer-name contract of docs/design.md")
    return sorted(out)


def bn_of_zero(bn):
    """BatchNormalization (inference) applied to a constant 0: beta - gamma * mean / sqrt(var + eps)."""
    w = {v.name.split("/")[-1].split(":")[0]: v.numpy().astype(np.float64) for v in bn.weights}
    n = bn.weights[0].shape[0]
    gamma = w.get("gamma", np.ones(n))
    beta = w.get("beta", np.zeros(n))
    return beta - gamma * w["moving_mean"] / np.sqrt(w["moving_variance"] + bn.epsilon)


def removable_channels(model, prefix):
    """Which channels of block `prefix` can go, and why (see the module docstring)."""
    conv1 = model.get_layer(prefix + "conv1")
    bn2 = model.get_layer(prefix + "bn2")
    conv2 = model.get_layer(prefix + "conv2")
    w1 = conv1.get_weights()
    k1, k2 = w1[0], conv2.get_weights()[0]
    c = k1.shape[-1]
    zero_filter = np.all(k1.reshape(-1, c) == 0, axis=0)
    if conv1.use_bias:
        zero_filter &= w1[1] == 0
    relu_bn0 = np.maximum(bn_of_zero(bn2), 0.0)
    dead_input = np.all(np.moveaxis(k2, 2, 0).reshape(c, -1) == 0, axis=1)
    removable = (zero_filter & (relu_bn0 == 0)) | dead_input
    return dict(channels=int(c), zero_filters=np.flatnonzero(zero_filter).tolist(),
                dead_inputs=np.flatnonzero(dead_input).tolist(),
                kept_zero_filters_bn_nonzero=np.flatnonzero(zero_filter & ~removable).tolist(),
                removable=np.flatnonzero(removable).tolist())


def cost(model):
    """Params and multiply-accumulates per example.

    MACs: Conv2D  H_out * W_out * kh * kw * (C_in / groups) * C_out;
    Dense  in * out. BatchNorm, adds, pooling and noise are not counted.
    """
    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(
                layer, keras.layers.DepthwiseConv2D):
            k = layer.kernel.shape
            _, h, w, _ = layer.output_shape
            macs += int(h) * int(w) * int(k[0]) * int(k[1]) * int(k[2]) * int(k[3])
        elif isinstance(layer, keras.layers.Dense):
            macs += int(layer.kernel.shape[0]) * int(layer.kernel.shape[1])
    return dict(params=int(model.count_params()), macs=int(macs))


def prune_blocks(model):
    """Returns (pruned model, report): removable channels of every block dropped.

    The pruned model is a new functional model with the same layer names and
    weights sliced (conv1 filters, bn2 channels, conv2 input slices). At least one
    channel per block is kept (a Conv2D needs a filter); keeping a removable
    channel is exact too. report: per block the analysis of removable_channels,
    removed_channels (total), and params/MACs before and after.
    """
    prefixes = block_prefixes(model)
    keep = {}
    blocks = {}
    for p in prefixes:
        r = removable_channels(model, p)
        k = [i for i in range(r["channels"]) if i not in set(r["removable"])] or [r["removable"][0]]
        keep[p] = np.asarray(k)
        r["kept"] = len(k)
        blocks[p] = r
    conv1s = {p + "conv1": p for p in prefixes}

    def clone(layer):
        cfg = layer.get_config()
        if layer.name in conv1s:
            cfg["filters"] = int(len(keep[conv1s[layer.name]]))
        return layer.__class__.from_config(cfg)

    new = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        ws = layer.get_weights()
        if not ws:
            continue
        name = layer.name
        if name in conv1s:
            k = keep[conv1s[name]]
            ws = [ws[0][..., k]] + [b[k] for b in ws[1:]]
        elif name.endswith("_bn2") and name[:-len("bn2")] in keep:
            k = keep[name[:-len("bn2")]]
            ws = [v[k] for v in ws]
        elif name.endswith("_conv2") and name[:-len("conv2")] in keep:
            k = keep[name[:-len("conv2")]]
            ws = [ws[0][:, :, k, :]] + ws[1:]
        new.get_layer(name).set_weights(ws)
    dead = [p for p in prefixes if _droppable(model, p, blocks[p])]
    if dead:
        new = _without_blocks(new, dead)
    for p in dead:
        blocks[p]["kept"] = 0
        blocks[p]["block_dropped"] = True
    before, after = cost(model), cost(new)
    removed = sum(b["channels"] - b["kept"] for b in blocks.values())
    return new, dict(blocks=blocks, removed_channels=int(removed), before=before, after=after,
                     dropped_blocks=dead,
                     rule="private conv1->bn2->relu2->conv2 channels with a dead conv2 input "
                          "slice, or a zero conv1 filter whose relu(bn2(0)) == 0; residual "
                          "streams untouched")


def _input_tensors(layer):
    return graph.flat(layer.inbound_nodes[0].input_tensors)


def _droppable(model, p, report):
    """True if block p adds exactly zero to an identity shortcut (see the module docstring)."""
    if len(report["removable"]) != report["channels"]:
        return False
    names = {l.name for l in model.layers}
    parts = [p + s for s in ("bn1", "relu1", "conv1", "bn2", "relu2", "conv2", "add")]
    if not all(n in names for n in parts) or p + "shortcut" in names:
        return False
    bn1, relu1, conv2, add = (model.get_layer(p + s) for s in ("bn1", "relu1", "conv2", "add"))
    if conv2.use_bias and np.any(conv2.get_weights()[1]):
        return False
    if any(len(l.inbound_nodes) != 1 for l in (bn1, relu1, add)):
        return False
    # relu1 feeds conv1 alone, and the Add joins conv2's output with bn1's input h
    if [c.name for c in _consumers(model, relu1)] != [p + "conv1"]:
        return False
    if [c.name for c in _consumers(model, bn1)] != [p + "relu1"]:
        return False
    h = _input_tensors(bn1)[0]
    add_in = _input_tensors(add)
    others = [t for t in add_in if t is not conv2.output]
    return len(add_in) == 2 and len(others) == 1 and others[0] is h


def _without_blocks(model, prefixes):
    """A functional copy of `model` (same layer objects, shared weights) in which the
    Add of each block in `prefixes` passes its shortcut input h through, and the
    block's other layers are left out."""
    skip = {p + s for p in prefixes for s in ("bn1", "relu1", "conv1", "bn2", "relu2", "conv2")}
    adds = {p + "add" for p in prefixes}
    new_input = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype,
                            name=model.inputs[0].name.split(":")[0])

    def shortcut_only(layer, node, args):
        if layer.name not in adds:
            return None
        conv2 = model.get_layer(layer.name[:-len("add")] + "conv2")
        return [a for t, a in zip(graph.flat(node.input_tensors), args) if t is not conv2.output][0]

    sites = [(l, n) for l, n in graph.call_sites(model) if l.name not in skip]
    mapped = graph.replay(sites, {id(model.inputs[0]): new_input}, shortcut_only)
    joined = keras.Model(new_input, mapped[id(model.outputs[0])], name=model.name)
    # Fresh layers with one inbound node each (the shared ones now have two).
    out = keras.models.clone_model(joined)
    out.set_weights(joined.get_weights())
    return out
