"""Binary-Relax weight quantization as a tfmot QuantizeConfig.

Float weights w are kept and trained; the layer computes with
    phase I (relaxed): u = (lam * Q(w) + w) / (1 + lam),
    phase II (exact):  u = Q(w),
and the gradient of the loss at u is passed to w unchanged (straight-through,
du/dw := I). lam and the phase are two non-trainable variables of each wrapped
layer (`br_lam`, `br_exact`), saved and checkpointed with the model and set once
per epoch by `BinaryRelaxSchedule`, a pure function of the epoch.

The forward map depends on lam and the phase only, never on Keras' `training`
flag: the PGD attack inside a train step and the loss see the same u. Evaluation
and export force phase II with `set_exact(model)`.

Only the kernels of the layer kinds in `config.quant.layers` are wrapped
(default: every 3x3 conv); a weight-only tfmot scheme (no layout transform, an
empty registry) keeps tfmot from adding fake-quant ops anywhere else.
"""

import contextlib
import re

import tensorflow_model_optimization as tfmot

from brkeras.quant import ops as quantizers
from brkeras._keras import keras, tf

_qk = tfmot.quantization.keras
QuantizeWrapper = _qk.QuantizeWrapper


# Layer kinds that config.quant.layers may name: kind -> (exact class, kernel size).
# Exact class match: Conv2DTranspose subclasses Conv2D and must not pass as one.
LAYER_KINDS = {
        "conv3x3": (keras.layers.Conv2D, (3, 3)),
        "conv1x1": (keras.layers.Conv2D, (1, 1)),
        "dense": (keras.layers.Dense, None),
}


BR_PRECISIONS = tuple(quantizers.QUANTIZERS)


def layer_kind(layer):
    """The LAYER_KINDS name of `layer`, or None."""
    for kind, (cls, kernel_size) in LAYER_KINDS.items():
        if type(layer) is cls and (kernel_size is None
                                   or tuple(layer.kernel_size) == kernel_size):
            return kind
    return None


def _true_value(v):
    """The value of `v` in the dtype it is stored in. Under a mixed dtype policy a
    layer reads its float32 variables through Keras AutoCastVariables, which
    read as the compute dtype (bfloat16) inside the layer's call; this reads the
    float32 variable underneath (same handle, so gradients still reach it)."""
    inner = getattr(v, "_variable", None)
    if inner is not None and hasattr(v, "true_dtype"):
        v = inner
    return tf.convert_to_tensor(v)


def binary_relax(w, q_fn, lam, exact):
    """Binary-Relax forward with a straight-through gradient.

    Forward: u = Q(w) if exact >= 0.5 else (lam * Q(w) + w) / (1 + lam), with
    Q = q_fn. Pseudo-gradient: dL/dw := dL/du (du/dw taken as the identity);
    no gradient to lam or exact.

    Q(w) and u are computed in the dtype w is stored in (float32), also under a
    mixed policy; only u is then cast to the dtype w reads as there (the layer's
    compute dtype, e.g. bfloat16), so the levels of Q(w) are those of float32.
    """
    out_dtype = tf.as_dtype(w.dtype)  # an AutoCastVariable: the compute dtype
    w = _true_value(w)
    lam = tf.cast(_true_value(lam), w.dtype)
    exact = tf.cast(_true_value(exact), w.dtype)

    @tf.custom_gradient
    def _forward(w, lam, exact):
        q = q_fn(w)
        u = tf.where(exact >= 0.5, q, (lam * q + w) / (1.0 + lam))

        def grad(du):
            return du, tf.zeros_like(lam), tf.zeros_like(exact)

        return u, grad

    u = _forward(w, lam, exact)
    return u if u.dtype == out_dtype else tf.cast(u, out_dtype)


class BinaryRelaxQuantizer(_qk.quantizers.Quantizer):
    """tfmot Quantizer computing u of Binary-Relax (see `binary_relax`).

    Holds the hyper-parameters of Q (precision, bits, per_channel); its state
    (lam, phase) lives in two non-trainable variables of the wrapping layer.
    """

    def __init__(self, precision="binary", bits=4, per_channel=False):
        self.q_fn = quantizers.get(precision, bits=bits, per_channel=per_channel)
        self.precision = precision
        self.bits = int(bits)
        self.per_channel = bool(per_channel)

    def build(self, tensor_shape, name, layer):
        # ONLY_FIRST_REPLICA: a value assigned in a replica context (or from a
        # callback) stays identical on every replica under MirroredStrategy.
        agg = tf.VariableAggregation.ONLY_FIRST_REPLICA
        lam = layer.add_weight("br_lam", shape=(), dtype=tf.float32, trainable=False,
                               initializer=keras.initializers.Constant(1.0), aggregation=agg)
        exact = layer.add_weight("br_exact", shape=(), dtype=tf.float32, trainable=False,
                                 initializer=keras.initializers.Constant(0.0), aggregation=agg)
        return {"br_lam": lam, "br_exact": exact}

    def __call__(self, inputs, training, weights, **kwargs):
        del training  # deliberately ignored: see the module docstring
        return binary_relax(inputs, self.q_fn, weights["br_lam"], weights["br_exact"])

    def get_config(self):
        return {"precision": self.precision, "bits": self.bits, "per_channel": self.per_channel}

    def __eq__(self, other):
        return isinstance(other, BinaryRelaxQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


class BinaryRelaxQuantizeConfig(_qk.QuantizeConfig):
    """Quantizes the kernel only: no activation or output quantizers."""

    def __init__(self, precision="binary", bits=4, per_channel=False):
        self.precision = precision
        self.bits = int(bits)
        self.per_channel = bool(per_channel)

    def get_weights_and_quantizers(self, layer):
        return [(layer.kernel, BinaryRelaxQuantizer(self.precision, self.bits, self.per_channel))]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        layer.kernel = quantize_weights[0]

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {"precision": self.precision, "bits": self.bits, "per_channel": self.per_channel}

    def __eq__(self, other):
        return (isinstance(other, BinaryRelaxQuantizeConfig)
                and self.get_config() == other.get_config())

    def __ne__(self, other):
        return not self.__eq__(other)


class _NoOpLayoutTransform(_qk.QuantizeLayoutTransform):
    def apply(self, model, layer_quantize_map):
        return model, layer_quantize_map


class _EmptyRegistry(_qk.QuantizeRegistry):
    """A registry that supports no layer: only annotated layers get wrapped."""

    def get_quantize_config(self, layer):
        return None

    def supports(self, layer):
        return False


class WeightOnlyScheme(_qk.QuantizeScheme):
    """tfmot scheme that wraps the annotated layers and touches nothing else.

    tfmot's default 8-bit scheme adds an input fake-quant and output
    fake-quants on supported layers feeding annotated ones; this one does not.
    """

    def get_layout_transformer(self):
        return _NoOpLayoutTransform()

    def get_quantize_registry(self):
        return _EmptyRegistry()


def _check_layers(layers):
    layers = tuple(layers)
    unknown = [k for k in layers if k not in LAYER_KINDS]
    if unknown:
        raise ValueError(f"config.quant.layers names unknown layer kinds {unknown}; "
                         f"choose from {tuple(LAYER_KINDS)}")
    return layers


def _keep_float_patterns(patterns):
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"config.quant.keep_float has the invalid regex {pattern!r}: {e}; "
                             "give layer-name patterns such as 'conv0$'") from None
    return patterns


def _kept_float(name, patterns):
    return any(re.search(p, name) for p in patterns)


PRECISIONS = ("float", "int8_qat") + BR_PRECISIONS


def quantize_model(model, precision, *, bits=4, per_channel=False, layers=("conv3x3",),
                   keep_float=()):
    """Returns the model to train at `precision`.

    Args:
        model: a functional tf_keras model (e.g. `brkeras.build_model(...)`).
        precision: "float" (returns `model` itself), "int8_qat" (tfmot's default
            8-bit QAT of every supported layer, see `quant.int8_qat`), or a
            Binary-Relax precision of `BR_PRECISIONS` ("binary", "ternary",
            "ternary_twn", "4bit", "kbit").
        bits: levels of "kbit" (2..8).
        per_channel: one scale per output channel instead of one per layer.
        layers: layer kinds to quantize (keys of LAYER_KINDS).
        keep_float: regexes (re.search) on layer names that stay float although
            of a quantized kind, e.g. ("conv0$",) for the stem.

    Returns:
        For Binary-Relax, a new functional model in which the layers of the kinds
        `layers` are QuantizeWrappers computing u (weights copied from `model`),
        everything else untouched. Under a tf.distribute strategy, call it inside
        `strategy.scope()`.

    Example:
        qnet = quantize_model(build_model((28, 28, 1), 10, depth=8), "ternary",
                              per_channel=True)
    """
    if precision == "float":
        return model
    if precision == "int8_qat":
        from brkeras.quant.int8_qat import int8_qat  # pylint: disable=g-import-not-at-top

        return int8_qat(model)
    if precision not in BR_PRECISIONS:
        raise ValueError(f"precision={precision!r} (config.quant.precision); choose one of "
                         f"{PRECISIONS}")
    kinds = _check_layers(layers)
    keep_float = _keep_float_patterns(keep_float)
    bits, per_channel = int(bits), bool(per_channel)
    quantizers.get(precision, bits=bits, per_channel=per_channel)  # validates early
    config = BinaryRelaxQuantizeConfig(precision, bits, per_channel)

    def annotate(layer):
        # Wrap the original layer object: its weights carry over to quantize_apply.
        if layer_kind(layer) in kinds and not _kept_float(layer.name, keep_float):
            return _qk.quantize_annotate_layer(layer, quantize_config=config)
        return layer

    if not any(layer_kind(l) in kinds and not _kept_float(l.name, keep_float)
               for l in model.layers):
        raise ValueError(f"the model has no layer of the kinds {kinds} to quantize "
                         f"outside keep_float={keep_float}; layers (config.quant.layers) "
                         f"must name kinds present in the model (known kinds: "
                         f"{tuple(LAYER_KINDS)})")
    with custom_object_scope():
        annotated = keras.models.clone_model(model, clone_function=annotate)
        return _qk.quantize_apply(annotated, scheme=WeightOnlyScheme())


def custom_objects():
    """Every custom object brkeras defines, by name (for deserialization)."""
    objs = {
            "BinaryRelaxQuantizer": BinaryRelaxQuantizer,
            "BinaryRelaxQuantizeConfig": BinaryRelaxQuantizeConfig,
    }
    from brkeras.nn import layers  # pylint: disable=g-import-not-at-top

    objs.update(FeynmanKacNoise=layers.FeynmanKacNoise, NoiseBank=layers.NoiseBank,
                AddScaledNoise=layers.AddScaledNoise)
    return objs


@contextlib.contextmanager
def custom_object_scope():
    """Registers brkeras' and tfmot's custom objects (QuantizeWrapper etc.)."""
    with _qk.quantize_scope(custom_objects()):
        yield


def br_quantizers(model):
    """[(wrapper, float_weight, quantizer, {"br_lam", "br_exact"})] of every BR
    quantizer in `model`, nested models and wrapping models included."""
    found, seen = [], set()
    for layer in [model] + list(model.submodules):
        if not isinstance(layer, QuantizeWrapper) or id(layer) in seen:
            continue
        seen.add(id(layer))
        for weight, quantizer, qvars in getattr(layer, "_weight_vars", []):
            if isinstance(quantizer, BinaryRelaxQuantizer):
                found.append((layer, weight, quantizer, qvars))
    return found


def _require_br(model):
    found = br_quantizers(model)
    if not found:
        raise ValueError("the model has no Binary-Relax quantizer; quantize it with "
                         "quantize.quantize_model and a BR precision first")
    return found


def set_br_state(model, lam=None, exact=None):
    """Assigns lam and/or the phase (exact: bool) to every BR quantizer.

    Call from a cross-replica context (a callback, or outside strategy.run).
    """
    for _, _, _, qvars in _require_br(model):
        if lam is not None:
            qvars["br_lam"].assign(float(lam))
        if exact is not None:
            qvars["br_exact"].assign(1.0 if exact else 0.0)


def set_exact(model, exact=True):
    """Phase II (u = Q(w) exactly) in every BR quantizer; for evaluation/export."""
    set_br_state(model, exact=exact)


def br_state(model):
    """(lam, exact) of the model's BR quantizers (all are set together)."""
    _, _, _, qvars = _require_br(model)[0]
    return float(qvars["br_lam"].numpy()), bool(qvars["br_exact"].numpy() >= 0.5)


def quantized_kernels(model):
    """{original layer name: exact Q(w) of its float kernel (HWIO / (in, out))}."""
    return {wrapper.layer.name: quantizer.q_fn(weight).numpy()
            for wrapper, weight, quantizer, _ in br_quantizers(model)}


def _float_weights_by_layer(qmodel, latent=False):
    """{original layer name: [(variable name, value)]} of a quantized model, in
    the order of the un-wrapped layer's weights, BR-quantized kernels replaced
    by Q(w) (latent: left as the float w) and tfmot/BR bookkeeping variables dropped."""
    out = {}
    for layer in qmodel.layers:
        if not isinstance(layer, QuantizeWrapper):
            out[layer.name] = [(w.name, w.numpy()) for w in layer.weights]
            continue
        quantizer_of = {}
        skip = {id(layer.optimizer_step)}
        for w, q, qvars in layer._weight_vars:
            if not isinstance(q, BinaryRelaxQuantizer):
                raise ValueError(f"copy_to_float: layer {layer.name!r} is not Binary-Relax "
                                 f"quantized ({type(q).__name__}); only BR models have a "
                                 "float deploy copy (convert int8 QAT models directly)")
            quantizer_of[id(w)] = q
            skip.update(id(v) for v in qvars.values())
        if layer._quantize_activations or layer._output_quantizers:
            raise ValueError(f"copy_to_float: layer {layer.name!r} quantizes activations; "
                             "only weight-only Binary-Relax models are supported")
        # Wrapped layer: the inner layer's weights are the wrapper's, less bookkeeping
        # (the inner layer's own list is empty once its kernel is replaced by u).
        values = []
        for w in layer.weights:
            if id(w) in skip:
                continue
            q = quantizer_of.get(id(w))
            exact = q is not None and not latent
            values.append((w.name, q.q_fn(w).numpy() if exact else w.numpy()))
        out[layer.layer.name] = values
    return out


def copy_to_float(qmodel, float_model, latent=False):
    """Fills `float_model` (same architecture and layer names, not quantized)
    with the weights of `qmodel`, every BR-quantized kernel replaced by its
    exact Q(w): the deploy model. With `latent`, the kernels are the float
    weights w that Binary-Relax trains instead (a start for further Binary-Relax
    training, not a deploy model). Returns `float_model`."""
    src = _float_weights_by_layer(qmodel, latent)
    for layer in float_model.layers:
        if not layer.weights:
            continue
        if layer.name not in src:
            raise ValueError(f"copy_to_float: layer {layer.name!r} of the float model has no "
                             "counterpart in the quantized model; build both from the same "
                             "architecture (same layer names)")
        values = src[layer.name]
        want = [tuple(w.shape) for w in layer.weights]
        got = [tuple(v.shape) for _, v in values]
        if want != got:
            raise ValueError(f"copy_to_float: layer {layer.name!r} weight shapes differ: float "
                             f"model {want}, quantized model {got} "
                             f"({[n for n, _ in values]})")
        layer.set_weights([v for _, v in values])
    return float_model


def architecture_copy(model, sigma=None, unwrap=False):
    """A fresh functional copy of `model`'s architecture (new, untrained weights).

    sigma: replaces the scale of every FeynmanKacNoise (0 = the deterministic
    deploy; the layer then is the identity). unwrap: tfmot QuantizeWrappers are
    replaced by a fresh copy of the layer they wrap (same name), which gives the
    float deploy architecture of a Binary-Relax model. Layer names are kept, so
    weights pair by name (`copy_to_float`, `deploy.export.copy_weights_by_name`).
    """
    from brkeras.nn import layers  # pylint: disable=g-import-not-at-top

    def clone(layer):
        if unwrap and isinstance(layer, QuantizeWrapper):
            layer = layer.layer
        cfg = layer.get_config()
        if sigma is not None and isinstance(layer, layers.FeynmanKacNoise):
            cfg["sigma"] = float(sigma)
        return layer.__class__.from_config(cfg)

    with custom_object_scope():
        return keras.models.clone_model(model, clone_function=clone)


def exact_float_model(qmodel):
    """The plain Keras model that computes what the Binary-Relax model `qmodel`
    computes in exact mode: no QuantizeWrapper, every quantized kernel the constant
    Q(w) (the deploy model before TFLite). Its noise layers are fresh copies."""
    return copy_to_float(qmodel, architecture_copy(qmodel, unwrap=True))
