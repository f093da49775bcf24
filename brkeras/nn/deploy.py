"""The deploy form of a noisy EnResNet: all noise drawn by one NoiseBank at the input.

`deploy_model(model, batch_size=1)` rebuilds a functional model at a fixed batch
with the same layer objects (shared weights); every FeynmanKacNoise(sigma > 0)
becomes AddScaledNoise fed by its slice of one NoiseBank (nn/layers.py), which
draws what the layer would draw at that batch (same joint distribution). The
random ops then sit at the start of the TFLite graph instead of in every block,
so XNNPACK delegates the rest as one partition.
"""

import numpy as np

from brkeras.errors import ExportError
from brkeras.nn import graph
from brkeras.nn import layers as layers_lib
from brkeras._keras import keras


def deploy_model(model, batch_size=1):
    """The model at a fixed batch with its noise drawn by one NoiseBank (layers.py).

    Same layer objects (shared weights) and names; every FeynmanKacNoise(sigma > 0)
    becomes AddScaledNoise fed by its slice of one NoiseBank at the input, which
    draws what the layer would draw at this batch (same joint distribution, see
    layers.py). The random ops then sit at the start of the TFLite graph instead of
    in every block, so XNNPACK delegates the rest as one partition. A model without
    noise is returned as is.
    """
    noise = [l for l in model.layers
             if isinstance(l, layers_lib.FeynmanKacNoise) and l.sigma > 0]
    if not noise:
        return model
    pools = {l.pool for l in noise}
    if len(pools) != 1:
        raise ExportError(f"noise layers with different pools {sorted(pools)}; the deploy "
                          "NoiseBank draws with one pool")
    if len(model.inputs) != 1:
        raise ExportError("deploy_model expects a single-input model")
    inp = keras.Input(batch_shape=(int(batch_size),) + tuple(model.inputs[0].shape[1:]),
                      name=model.inputs[0].name.split(":")[0])
    sizes = [int(batch_size) * int(np.prod(l.output_shape[1:])) for l in noise]
    bank = layers_lib.NoiseBank(sizes, pools.pop(), name="noise_bank")(inp)
    slot = {l.name: bank[i] for i, l in enumerate(noise)}
    try:
        sites = graph.call_sites(model)
    except ValueError as e:
        raise ExportError(f"deploy_model: {e}") from None

    def to_deploy(layer, node, args):
        if layer.name in slot:
            return layers_lib.AddScaledNoise(layer.sigma, name=layer.name)([args, slot[layer.name]])
        return None

    new = graph.replay(sites, {id(model.inputs[0]): inp}, to_deploy)
    return keras.Model(inp, [new[id(t)] for t in model.outputs] if len(model.outputs) > 1
                       else new[id(model.outputs[0])], name=model.name + "_deploy")
