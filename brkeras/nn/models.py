"""Pre-activation (En)ResNet for small images, as a functional tf_keras model.

Member m (SPEC section 1, layer names of docs/design.md):

    h = conv0(x)                                   # 3x3, width channels
    per stage s = 1..3 (width * 2^(s-1) channels, stride 2 at s = 2, 3 on block 0),
    per block b = 0..n-1, n = (depth - 2) / 6:
        out = relu1(bn1(h))
        shortcut = conv1x1_stride(out) if the shape changes else h
        out = conv2(relu2(bn2(conv1(out))))         # 3x3 convs, no bias
        h = noise(out + shortcut)                   # FeynmanKacNoise
    logits_m = dense(pool(relu(bn_final(h))))

With M > 1 members (independent weights, same input) the output `logits` is the
mean of the members' logits. Initialisers follow the PyTorch reference: convs
He-normal with fan_out (std = sqrt(2 / (k*k*c_out)), not truncated), the dense
layer uniform(+-1/sqrt(fan_in)) kernel and zero bias. BatchNorm uses PyTorch's
momentum 0.1 (Keras momentum 0.9) and eps 1e-5. Convs use "same" padding (Keras
pads stride-2 convs bottom/right, PyTorch symmetric; shapes are equal).
"""

from brkeras.nn import layers
from brkeras._keras import keras

VALID_DEPTHS = "8, 14, 20, 32, 44, 56, 110, ... (6n+2)"


def conv_init():
    """He-normal, fan_out: N(0, 2 / (k*k*c_out)), as PyTorch kaiming_normal_(mode='fan_out')."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def dense_init():
    """uniform(+-1/sqrt(fan_in)), PyTorch's default nn.Linear kernel."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def _check(input_shape, num_classes, depth, width, ensemble):
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape={input_shape!r}: give (height, width, channels), "
                         "e.g. (32, 32, 3) or (28, 28, 1)")
    if int(depth) != depth or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth={depth!r}: a pre-activation ResNet for small images has "
                         f"depth 6n+2 with n >= 1: {VALID_DEPTHS}")
    if int(width) != width or width < 1:
        raise ValueError(f"width={width!r}: channels of stage 1 must be an integer >= 1 (16 for ResNet20)")
    if int(ensemble) != ensemble or ensemble < 1:
        raise ValueError(f"ensemble={ensemble!r}: the number of members M must be an integer >= 1")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be an integer >= 1")


def _bn(name):
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


def _conv(filters, kernel, stride, name):
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                               kernel_initializer=conv_init(), name=name)


def _block(h, filters, stride, p, sigma, noise_pool):
    """One pre-activation basic block; `p` is the name prefix, e.g. 'm0_s2_b0'."""
    out = keras.layers.ReLU(name=f"{p}_relu1")(_bn(f"{p}_bn1")(h))
    if stride != 1 or h.shape[-1] != filters:
        shortcut = _conv(filters, 1, stride, f"{p}_shortcut")(out)
    else:
        shortcut = h
    out = _conv(filters, 3, stride, f"{p}_conv1")(out)
    out = keras.layers.ReLU(name=f"{p}_relu2")(_bn(f"{p}_bn2")(out))
    out = _conv(filters, 3, 1, f"{p}_conv2")(out)
    out = keras.layers.Add(name=f"{p}_add")([out, shortcut])
    return layers.FeynmanKacNoise(sigma, noise_pool, name=f"{p}_noise")(out)


def _member(x, m, num_classes, depth, width, sigma, noise_pool):
    n = (depth - 2) // 6
    h = _conv(width, 3, 1, f"m{m}_conv0")(x)
    for s in (1, 2, 3):
        for b in range(n):
            stride = 2 if (s > 1 and b == 0) else 1
            h = _block(h, width * 2 ** (s - 1), stride, f"m{m}_s{s}_b{b}", sigma, noise_pool)
    h = keras.layers.ReLU(name=f"m{m}_relu_final")(_bn(f"m{m}_bn_final")(h))
    h = keras.layers.GlobalAveragePooling2D(name=f"m{m}_pool")(h)
    return keras.layers.Dense(num_classes, kernel_initializer=dense_init(), name=f"m{m}_logits")(h)


def build_model(input_shape, num_classes, depth=20, width=16, ensemble=1, sigma=0.1,
                noise_pool=8, name="enresnet"):
    """En_M pre-activation ResNet-`depth`; outputs logits of shape [batch, num_classes].

    Args:
        input_shape: (H, W, C) of the images, any size (28x28x1, 32x32x3, ...).
        num_classes: number of logits.
        depth: 6n+2 (8, 14, 20, 32, 44, 56, 110).
        width: channels of stage 1; stages have width, 2*width, 4*width.
        ensemble: M members with independent weights; the output is the mean of
            their logits (layer `logits`); M = 1 outputs `m0_logits` directly.
        sigma: Feynman-Kac noise scale (0 = plain ResNet, no random op).
        noise_pool: 1 = exact i.i.d. normals; k > 1 = pooled draws (layers.py).
        name: model name.
    """
    _check(input_shape, num_classes, depth, width, ensemble)
    x = keras.Input(shape=tuple(input_shape), name="image")
    outs = [_member(x, m, int(num_classes), int(depth), int(width), sigma, noise_pool)
            for m in range(int(ensemble))]
    y = outs[0] if len(outs) == 1 else keras.layers.Average(name="logits")(outs)
    return keras.Model(x, y, name=name)
