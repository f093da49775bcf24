"""tfmot's standard 8-bit quantization-aware training, the peer of Binary-Relax."""

from brkeras.quant.binary_relax import _qk, custom_object_scope
from brkeras._keras import keras


def int8_qat(model):
    """tfmot's standard 8-bit QAT (`quantize_model`), tolerating custom layers.

    tfmot's `quantize_model` annotates every layer and then fails on layers its
    default registry does not know ("Layer noise:<FeynmanKacNoise> is not
    supported"). Here such layers are left unannotated (they stay float, with
    no fake-quant on their output); every other layer gets tfmot's default
    8-bit treatment, as in quantize_model. The layout transform rebuilds the
    model from its config, so custom layers must be registered: this runs
    inside `custom_object_scope()`, which knows FeynmanKacNoise.
    """
    registry = _default_8bit_registry()

    def annotate(layer):
        if isinstance(layer, keras.layers.InputLayer):
            return layer
        if registry.supports(layer):
            return _qk.quantize_annotate_layer(layer)
        return layer  # unsupported (custom) layer: left unannotated, stays float

    with custom_object_scope():
        annotated = keras.models.clone_model(model, clone_function=annotate)
        return _qk.quantize_apply(annotated)


def _default_8bit_registry():
    return _qk.default_8bit.Default8BitQuantizeScheme().get_quantize_registry()
