"""Channel (group) sparsity during training: proximal group lasso and transformed l1.

After Z. Li and J. Xin, "Channel Pruning in Quantization-aware Training: an
Adaptive Projection-gradient Descent-shrinkage-splitting Method" (arXiv
2204.04375): a group penalty lam * sum_g P(||w_g||_2) on the FLOAT weights w
(which Binary-Relax keeps and trains), applied by a proximal (shrinkage) step
after every optimizer update, so whole groups become exactly zero:

    w <- prox_{t P}(w),   t = lr_k * lam_k,

with lr_k the step size of the update just applied (proximal gradient / ISTA).

Penalties P(r) of a group norm r = ||w_g||_2 and their proximal maps
(argmin_x 0.5 (x - r)^2 + t P(x), applied to the norm; the direction of w_g is kept):

- group lasso, P(r) = r:  w_g <- w_g * max(0, 1 - t / ||w_g||_2)   (group soft threshold);
- transformed l1 (TL1), P(r) = rho_a(r) = (a + 1) r / (a + r), a > 0, with the closed
  form of S. Zhang and J. Xin, "Minimization of transformed L1 penalty: closed form
  representation and iterative thresholding algorithms" (Commun. Math. Sci. 15(2), 2017):
      threshold t* = t (a + 1) / a            if t <= a^2 / (2 (a + 1))   (subcritical),
                   = sqrt(2 t (a + 1)) - a/2  otherwise                  (supercritical);
      g(r) = 2/3 (a + r) cos(phi / 3) - 2a/3 + r/3,
      phi  = arccos(1 - 27 t a (a + 1) / (2 (a + r)^3))          for r > t*, else 0.
  TL1 tends to l0 as a -> 0 and to l1 as a -> inf; it shrinks large groups less than
  the group lasso (g(r) -> r as r -> inf). The paper's abstract proposes a
  complementary TL1 penalty to stabilise training at extreme compression; how it is
  combined with the group lasso there is not public here, so this module offers it
  as an alternative penalty on the same groups.

Which groups (structural, see `block_groups`). Channel c of the block-private chain
conv1 -> bn2 -> relu2 -> conv2 of each pre-activation residual block:
conv2's input slice kernel2[:, :, c, :] (HWIO), optionally joined with conv1's filter
kernel1[..., c] (and its bias c) and bn2's gamma_c, beta_c, all sharing ONE norm.
A zero conv2 input slice is a dead input that `deploy.prune.prune_blocks` removes
exactly. Residual-stream channels (the stem conv, conv2 outputs, shortcuts, anything
joined by an Add) are never grouped: the Feynman-Kac noise scales with std(out) over
the whole stream tensor, so removing a stream channel (even an all-zero one) changes
the noise, and bn1 of the next block maps a zero channel to a non-zero constant.
Structurally, a stream tensor has several consumers (the Add and the next bn1), so
the private-chain test below excludes it without relying on layer names.

For a Binary-Relax model the shrinkage acts on the float kernel w of each
QuantizeWrapper; Q(w) of an all-zero input slice is zero for the ternary and k-bit
quantizers (|w| = 0 is below every threshold), but NOT for "binary" (sign(0) = +1).
"""

import dataclasses
import math
import sys

import numpy as np

from brkeras._keras import keras, tf

__all__ = [
        "group_norms", "group_soft_threshold", "tl1_threshold", "group_tl1_shrink",
        "joint_group_shrink", "BlockGroup", "block_groups", "zero_group_share", "cost_weights",
        "GroupSparsity", "PENALTIES", "COST_MEASURES",
]

PENALTIES = ("group_l1", "tl1")
COST_MEASURES = ("macs", "params")
_KINDS = {"l1": "group_l1", "group_l1": "group_l1", "tl1": "tl1"}


# ---- Pure functions -------------------------------------------------------------


def _axis(x, axis):
    rank = x.shape.rank
    if rank is None:
        raise ValueError("group shrinkage needs a tensor of known rank")
    if not -rank <= axis < rank:
        raise ValueError(f"axis={axis} out of range for a tensor of rank {rank}")
    return axis % rank


def _group_sq_norms(x, axis):
    """sum of x^2 over every axis but `axis`: shape [x.shape[axis]]."""
    axis = _axis(x, axis)
    other = [i for i in range(x.shape.rank) if i != axis]
    return tf.reduce_sum(tf.square(x), axis=other) if other else tf.square(x)


def _broadcast(v, x, axis):
    """Reshape the per-group vector `v` to broadcast against `x` along `axis`."""
    axis = _axis(x, axis)
    shape = [1] * x.shape.rank
    shape[axis] = -1
    return tf.reshape(tf.cast(v, x.dtype), shape)


def group_norms(w, axis):
    """||w_g||_2 for each group g = slice of w along `axis` (reduce over all other axes)."""
    w = tf.convert_to_tensor(w)
    return tf.sqrt(_group_sq_norms(w, axis))


def _as(x, dtype):
    # tf.cast(python_float, tf.float64) would round through float32 first.
    if tf.is_tensor(x) or isinstance(x, tf.Variable):
        return tf.cast(x, dtype)
    return tf.convert_to_tensor(np.asarray(x, dtype.as_numpy_dtype))


def _l1_factor(norms, t):
    # max(0, 1 - t / r); r = 0 gives factor 1 (divide_no_nan) and the group stays 0.
    t = _as(t, norms.dtype)
    return tf.maximum(0.0, 1.0 - tf.math.divide_no_nan(t, norms))


def tl1_threshold(norms, t, a):
    """Proximal map of t * rho_a on nonnegative group norms r (Zhang and Xin 2017).

    prox(r) = argmin_{x >= 0} 0.5 (x - r)^2 + t (a + 1) x / (a + x)
            = g(r) if r > t* else 0,
    t*   = t (a + 1) / a if t <= a^2 / (2 (a + 1)) else sqrt(2 t (a + 1)) - a / 2,
    g(r) = 2/3 (a + r) cos(phi / 3) - 2a/3 + r/3,
    phi  = arccos(1 - 27 t a (a + 1) / (2 (a + r)^3)).

    Evaluated in the algebraically equal, cancellation-free form
    g(r) = r - 4/3 (a + r) sin^2(phi / 6), phi = 2 arcsin(sqrt(e / 2)),
    e = 27 t a (a + 1) / (2 (a + r)^3), so t = 0 is exactly the identity.
    """
    r = tf.convert_to_tensor(norms)
    if not r.dtype.is_floating:
        r = tf.cast(r, tf.float32)
    t = _as(t, r.dtype)
    a = _as(a, r.dtype)
    t_star = tf.where(t <= a * a / (2.0 * (a + 1.0)), t * (a + 1.0) / a,
                      tf.sqrt(2.0 * t * (a + 1.0)) - a / 2.0)
    e = 27.0 * t * a * (a + 1.0) / (2.0 * tf.pow(a + r, 3))
    # e <= 2 for every r > t* (arccos argument >= -1); the clip only guards rounding.
    phi = 2.0 * tf.asin(tf.sqrt(tf.clip_by_value(e / 2.0, 0.0, 1.0)))
    g = r - (4.0 / 3.0) * (a + r) * tf.square(tf.sin(phi / 6.0))
    return tf.where(r > t_star, g, tf.zeros_like(r))


def _tl1_factor(norms, t, a):
    return tf.math.divide_no_nan(tl1_threshold(norms, t, a), norms)


def _factor(norms, t, kind, a):
    kind = _kind(kind)
    return _l1_factor(norms, t) if kind == "group_l1" else _tl1_factor(norms, t, a)


def _kind(kind):
    if kind not in _KINDS:
        raise ValueError(f"penalty kind {kind!r}; choose 'l1' (group lasso) or 'tl1'")
    return _KINDS[kind]


def group_soft_threshold(w, t, axis):
    """Group soft threshold (prox of t * sum_g ||w_g||_2).

    w_g <- w_g * max(0, 1 - t / ||w_g||_2) for each slice g of w along `axis`
    (for an HWIO conv2 kernel and axis=2, group c is kernel[:, :, c, :]).
    Zero groups stay zero (no NaN); t = 0 is the identity.
    """
    w = tf.convert_to_tensor(w)
    return w * _broadcast(_l1_factor(group_norms(w, axis), t), w, axis)


def group_tl1_shrink(w, t, a, axis):
    """Group TL1 shrink: w_g <- w_g * tl1_threshold(||w_g||, t, a) / ||w_g|| (0 for zero groups)."""
    w = tf.convert_to_tensor(w)
    return w * _broadcast(_tl1_factor(group_norms(w, axis), t, a), w, axis)


def joint_group_shrink(members, t, kind="l1", a=1.0):
    """Shrink groups spread over several tensors that share one norm.

    members: [(tensor, axis)], each tensor with the same number n of slices along
    its axis; group c is the union of the c-th slices of all members, with norm
    r_c = sqrt(sum_m ||slice_c(member_m)||^2). Each member is multiplied along its
    axis by the same factor f_c: max(0, 1 - t / r_c) for kind "l1", and
    tl1_threshold(r_c, t, a) / r_c for "tl1". Returns the new member tensors.
    """
    kind = _kind(kind)
    members = [(tf.convert_to_tensor(x), int(axis)) for x, axis in members]
    if not members:
        raise ValueError("joint_group_shrink needs at least one (tensor, axis) member")
    sizes = {int(x.shape[_axis(x, ax)]) for x, ax in members}
    if len(sizes) != 1:
        raise ValueError(f"joint_group_shrink: members have {sorted(sizes)} slices along their "
                         "axes; every member of a joint group needs the same channel count")
    dtype = members[0][0].dtype
    sq = tf.add_n([tf.cast(_group_sq_norms(x, ax), dtype) for x, ax in members])
    f = _factor(tf.sqrt(sq), t, kind, a)
    return [x * _broadcast(f, x, ax) for x, ax in members]


# ---- Group discovery ------------------------------------------------------------


def _quantize_wrapper_class():
    # tfmot is heavy to import; a model that holds QuantizeWrappers has imported it.
    tfmot = sys.modules.get("tensorflow_model_optimization")
    return tfmot.quantization.keras.QuantizeWrapper if tfmot is not None else None


def _inner(layer):
    qw = _quantize_wrapper_class()
    return layer.layer if qw is not None and isinstance(layer, qw) else layer


def _is_wrapper(layer):
    return _inner(layer) is not layer


def _weight_named(layer, suffix):
    """The variable of `layer` whose name ends with `suffix` (QuantizeWrapper: the float one)."""
    if not _is_wrapper(layer):
        return getattr(layer, suffix.split(":")[0], None)
    found = [w for w in layer.weights if w.name.endswith(suffix)]
    if len(found) > 1:
        raise ValueError(f"layer {layer.name!r} has {len(found)} weights ending in {suffix!r}; "
                         "cannot tell which is the float one")
    return found[0] if found else None


def _is_conv2d(layer, kernel_size=None):
    inner = _inner(layer)
    # exact class: Conv2DTranspose subclasses Conv2D and must not pass as one.
    return (type(inner) is keras.layers.Conv2D and inner.groups == 1
            and inner.data_format == "channels_last"
            and (kernel_size is None or tuple(inner.kernel_size) == kernel_size))


def _is_channel_bn(layer):
    if not isinstance(layer, keras.layers.BatchNormalization):
        return False
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return [int(a) % 4 for a in axis] == [3]


def _is_plain_relu(layer):
    if not isinstance(layer, keras.layers.ReLU):
        return False
    cfg = layer.get_config()
    return not cfg.get("negative_slope") and not cfg.get("threshold")


def _as_list(x):
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _graph(model):
    """(consumers, producers, calls, outputs) of the nodes of functional `model` only:
    layers shared with other graphs do not leak their other calls in."""
    consumers, producers, calls = {}, {}, {}
    for nodes in model._nodes_by_depth.values():  # pylint: disable=protected-access
        for node in nodes:
            calls[id(node.layer)] = calls.get(id(node.layer), 0) + 1
            ins = _as_list(node.inbound_layers)
            producers.setdefault(id(node.layer), []).extend(ins)
            for il in ins:
                consumers.setdefault(id(il), []).append(node.layer)
    outputs = {id(t._keras_history.layer) for t in model.outputs}  # pylint: disable=protected-access
    return consumers, producers, calls, outputs


def _functional_graphs(model, seen=None):
    """`model` if functional, and every functional model nested in it (e.g. the
    `net` of a subclassed trainer), each once."""
    seen = set() if seen is None else seen
    if id(model) in seen:
        return []
    seen.add(id(model))
    out = [model] if getattr(model, "_is_graph_network", False) else []
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.Model):
            out.extend(_functional_graphs(layer, seen))
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class BlockGroup:
    """Channel groups of one private chain conv1 -> bn2 -> relu2 -> conv2.

    conv1, bn2, relu2, conv2: the layers as they sit in the model (QuantizeWrappers
    for quantized convs). kernel1, kernel2: their FLOAT kernel variables (HWIO);
    bias1: conv1's bias variable or None; gamma, beta: bn2's (None when the BN has
    no scale / center). channels: the chain's width (group count).
    """

    conv1: object
    bn2: object
    relu2: object
    conv2: object
    kernel1: object
    kernel2: object
    bias1: object
    gamma: object
    beta: object
    channels: int

    @property
    def name(self):
        """The original (unwrapped) name of conv2."""
        return _inner(self.conv2).name

    @property
    def conv1_name(self):
        return _inner(self.conv1).name

    def channel_macs(self):
        """Multiply-accumulates per example that channel c costs, and `prune_blocks` saves:
        conv1's filter c (H1 W1 kh kw C_in) plus conv2's input slice c (H2 W2 kh kw C_out)."""
        total = 0
        for layer, kernel, in_axis in ((self.conv1, self.kernel1, 2), (self.conv2, self.kernel2, 3)):
            # node 0: the model's own call (evaluation may have called the layer again)
            h, w = (int(d) for d in layer.get_output_shape_at(0)[1:3])
            kh, kw, _, _ = (int(d) for d in kernel.shape)
            total += h * w * kh * kw * int(kernel.shape[in_axis])
        return total

    def channel_params(self):
        """Parameters that channel c holds, and `prune_blocks` removes: conv1's filter c
        (kh kw C_in, plus its bias), bn2's per-channel values (gamma, beta, moving mean
        and variance; in a TFLite file they fold into conv1's scale and bias) and
        conv2's input slice c (kh kw C_out)."""
        kh1, kw1, c_in, _ = (int(d) for d in self.kernel1.shape)
        kh2, kw2, _, c_out = (int(d) for d in self.kernel2.shape)
        return (kh1 * kw1 * c_in + (self.bias1 is not None) + len(self.bn2.weights)
                + kh2 * kw2 * c_out)

    def channel_cost(self, measure):
        """`channel_macs` for measure "macs", `channel_params` for "params"."""
        if measure not in COST_MEASURES:
            raise ValueError(f"cost measure {measure!r}; choose one of {COST_MEASURES}")
        return self.channel_macs() if measure == "macs" else self.channel_params()

    def members(self, include_conv1=False, include_bn2=False):
        """[(variable, axis)] of group c: conv2 input slice c, optionally conv1 filter c
        (and bias c), bn2 gamma_c and beta_c."""
        out = [(self.kernel2, 2)]
        if include_conv1:
            out.append((self.kernel1, 3))
            if self.bias1 is not None:
                out.append((self.bias1, 0))
        if include_bn2:
            out.extend((v, 0) for v in (self.gamma, self.beta) if v is not None)
        return out


def block_groups(model):
    """Every private chain Conv2D -> BatchNormalization -> ReLU -> Conv2D(3x3) of `model`.

    Found from the functional graph (and functional models nested in it), not from
    names: each of the four layers is called once in the graph, conv1's, bn2's and
    relu2's outputs have exactly one consumer each (the next layer of the chain) and
    are not model outputs, and conv2 reads relu2 alone. A QuantizeWrapper counts as
    the layer it wraps. Stream tensors (stem conv, conv2 outputs, shortcuts, Adds)
    have several consumers or are not conv outputs feeding a BN, so they never form
    a group (see the module docstring for why they must not).

    Returns: [BlockGroup], in graph order.
    """
    graphs = _functional_graphs(model)
    if not graphs:
        raise ValueError(f"block_groups: {type(model).__name__} {model.name!r} is not a functional "
                         "model and holds none; build the network with the functional API")
    found, seen = [], set()
    for g in graphs:
        consumers, producers, calls, outputs = _graph(g)

        def only_consumer(layer):
            c = consumers.get(id(layer), [])
            ok = len(c) == 1 and calls.get(id(layer)) == 1 and id(layer) not in outputs
            return c[0] if ok else None

        for conv1 in g.layers:
            if not _is_conv2d(conv1) or calls.get(id(conv1)) != 1:
                continue
            bn2 = only_consumer(conv1)
            if bn2 is None or not _is_channel_bn(bn2):
                continue
            relu2 = only_consumer(bn2)
            if relu2 is None or not _is_plain_relu(relu2):
                continue
            conv2 = only_consumer(relu2)
            if (conv2 is None or not _is_conv2d(conv2, (3, 3)) or calls.get(id(conv2)) != 1
                    or producers.get(id(conv2)) != [relu2] or id(conv2) in seen):
                continue
            k1, k2 = _weight_named(conv1, "kernel:0"), _weight_named(conv2, "kernel:0")
            if k1 is None or k2 is None:
                raise ValueError(f"block_groups: no float kernel in {conv1.name!r} or "
                                 f"{conv2.name!r}; is the model built?")
            c = int(k1.shape[-1])
            if int(k2.shape[2]) != c:
                continue
            seen.add(id(conv2))
            bias1 = _weight_named(conv1, "bias:0") if _inner(conv1).use_bias else None
            found.append(BlockGroup(conv1, bn2, relu2, conv2, k1, k2, bias1,
                                    bn2.gamma, bn2.beta, c))
    return found


def zero_group_share(model, groups=None):
    """Share of block channels whose conv2 input slice kernel2[:, :, c, :] is all zero.

    Those are the dead inputs `prune_blocks` removes. Reads the float kernels
    (for Binary-Relax models, w; see the module docstring for Q(w)).
    Returns {"share", "zero_groups", "groups", "layers": {conv2 name:
    {"channels", "zero_groups", "dead_inputs": [c, ...]}}}.
    """
    groups = block_groups(model) if groups is None else groups
    layers, zero, total = {}, 0, 0
    for g in groups:
        k2 = np.asarray(g.kernel2.numpy())
        dead = np.flatnonzero(np.all(k2 == 0, axis=(0, 1, 3)))
        layers[g.name] = dict(channels=int(g.channels), zero_groups=int(dead.size),
                              dead_inputs=dead.tolist())
        zero += int(dead.size)
        total += int(g.channels)
    return dict(share=float(zero / total) if total else 0.0, zero_groups=int(zero),
                groups=int(total), layers=layers)


def cost_weights(groups, power, measure="macs"):
    """Per channel of `groups` (concatenated in order), (m / mean m)^power with m the
    channel's cost: `channel_macs` ("macs") or `channel_params` ("params"); all ones
    for power 0."""
    if measure not in COST_MEASURES:
        raise ValueError(f"cost measure {measure!r}; choose one of {COST_MEASURES}")
    sizes = [g.channels for g in groups]
    if power == 0:
        return np.ones(sum(sizes), np.float32)
    m = np.repeat([float(g.channel_cost(measure)) for g in groups], sizes)
    return ((m / m.mean()) ** float(power)).astype(np.float32)


# ---- Training callback ----------------------------------------------------------


def _current_lr(optimizer):
    """Step size of the update just applied (call after apply_gradients)."""
    opt = optimizer
    while hasattr(opt, "inner_optimizer"):  # LossScaleOptimizer
        opt = opt.inner_optimizer
    schedule_cls = keras.optimizers.schedules.LearningRateSchedule
    if isinstance(opt, keras.optimizers.legacy.Optimizer):
        lr = opt._get_hyper("learning_rate")  # pylint: disable=protected-access
        step = tf.cast(opt.iterations - 1, tf.float32)  # iterations is already incremented
        lr = lr(step) if isinstance(lr, schedule_cls) else tf.cast(lr, tf.float32)
        decay = float(getattr(opt, "_initial_decay", 0.0) or 0.0)
        return lr / (1.0 + decay * step) if decay else lr
    lr = opt.learning_rate
    # The new optimizer evaluates a schedule into `learning_rate` at apply_gradients;
    # a raw schedule here (another optimizer class) is evaluated at the step just taken.
    if isinstance(lr, schedule_cls):
        lr = lr(opt.iterations - 1)
    return tf.cast(lr, tf.float32)


def _is_real(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) \
        and math.isfinite(float(x))


class GroupSparsity(keras.callbacks.Callback):
    """Proximal group shrinkage of the block channels after every training batch.

    After the optimizer update of step k (on_train_batch_end), every group c of every
    `block_groups` chain is shrunk by the proximal map of t * P, t = lr_k * lam_k:
    P(r) = r (penalty "group_l1": w_g *= max(0, 1 - t / ||w_g||)) or
    P(r) = rho_a(r) ("tl1", `tl1_threshold`). The group is conv2's input slice c,
    joined with conv1's filter c (`include_conv1`) and bn2's gamma_c, beta_c
    (`include_bn2`) into one norm.

    cost_power p (0 = off): group c of chain b gets the threshold t * w_b with
    w_b = (m_b / mean_c m)^p, m_b the channel's cost (mean over all channels), so a
    channel that costs more is shrunk harder. cost "macs": m_b =
    `BlockGroup.channel_macs` (the MACs its removal saves; p = 1 is MorphNet's FLOP
    regulariser, Gordon et al., CVPR 2018, on the group norm); cost "params": m_b =
    `BlockGroup.channel_params` (the weights it removes from the file: with
    He-initialised kernels every group norm starts near the same value, so the
    unweighted penalty favours no stage, while a wide late stage holds most of the
    weights and a narrow early one most of the MACs per channel). The target below
    then picks the K smallest ||w_g|| / w_b.

    lam_k = 0 before `start_epoch`, then strength * min(1, (e - start_epoch +
    (batch + 1) / steps_per_epoch) / warmup_epochs) (warmup_epochs = 0: strength at
    once): a pure function of (epoch, batch), like BinaryRelaxSchedule, so resuming
    at an epoch is exact and nothing is stored.

    target_share (0 = off): let K = ceil(target_share * G) of the G groups. When the
    prox of a step would leave >= K groups at zero, the target is reached: that step
    instead sets the K groups of smallest norm to exactly zero and leaves the others
    unshrunk (shrinking stops; the zeros are held, since momentum moves a zeroed
    group off zero at the next update). Derived from the weights each step: no state.

    Logs at epoch end: "group_zero_share" (`zero_group_share`) and "group_lam"
    (lam at the last batch). History sees them; put CSVLogger / TensorBoard AFTER
    this callback in the list for them to see them too.

    Works under tf.distribute (the update runs in the cross-replica context of the
    callback: plain assign of mirrored variables). With steps_per_execution = n > 1,
    Keras calls the callback once per n steps and t is multiplied by n.

    Args:
        strength: lam, the penalty weight (>= 0).
        start_epoch: first epoch (0-based) with lam > 0.
        start_fraction: alternative to start_epoch: start at round(start_fraction *
            total_epochs) (needs total_epochs).
        warmup_epochs: lam ramps linearly from 0 to strength over these epochs.
        target_share: stop shrinking once this share of groups is zero, in [0, 1).
        penalty: "group_l1" or "tl1".
        tl1_a: a > 0 of rho_a (small: close to l0; large: close to l1).
        include_conv1: join conv1's filter c (and bias c) into group c.
        include_bn2: join bn2's gamma_c and beta_c into group c.
        cost_power: weight the threshold of each group by its cost to this power
            (0 = every channel alike; 1 with cost "macs" = MorphNet's FLOP weighting).
        cost: the cost measure, "macs" or "params" (see above).
        total_epochs: the run's epochs, to resolve start_fraction and check the schedule.
        steps_per_epoch: for the ramp within an epoch; 0 = Keras' params["steps"]
            (when unknown, lam ramps once per epoch).
    """

    def __init__(self, strength, start_epoch=0, start_fraction=None, warmup_epochs=0,
                 target_share=0.0, penalty="group_l1", tl1_a=1.0, include_conv1=False,
                 include_bn2=False, total_epochs=None, steps_per_epoch=0, cost_power=0.0,
                 cost="macs"):
        super().__init__()
        if cost not in COST_MEASURES:
            raise ValueError(f"GroupSparsity(cost={cost!r}): choose one of {COST_MEASURES} "
                             "(what a removed channel saves: MACs per example or weights)")
        if not (_is_real(cost_power) and cost_power >= 0):
            raise ValueError(f"GroupSparsity(cost_power={cost_power!r}): give an exponent >= 0 "
                             "(0 = no cost weighting, 1 = threshold proportional to the channel's cost)")
        if cost_power > 0 and penalty != "group_l1":
            # the target's ranking ||w_g|| / w_b is the weighted group lasso's order only
            raise ValueError(f"GroupSparsity(cost_power={cost_power!r}, penalty={penalty!r}): "
                             "cost weighting is for penalty='group_l1'; set cost_power=0 for tl1")
        if not (_is_real(strength) and strength >= 0):
            raise ValueError(f"GroupSparsity(strength={strength!r}): give the penalty weight lam "
                             "as a finite float >= 0 (0 disables the shrinkage)")
        if penalty not in PENALTIES:
            raise ValueError(f"GroupSparsity(penalty={penalty!r}): choose one of {PENALTIES}")
        if not (_is_real(tl1_a) and tl1_a > 0):
            raise ValueError(f"GroupSparsity(tl1_a={tl1_a!r}): the TL1 parameter a must be a "
                             "finite float > 0 (e.g. 1.0; small a is closer to l0)")
        if not (_is_real(target_share) and 0.0 <= target_share < 1.0):
            raise ValueError(f"GroupSparsity(target_share={target_share!r}): give a share in "
                             "[0, 1) (0 = no target); a share of 1 would remove every channel")
        if warmup_epochs < 0:
            raise ValueError(f"GroupSparsity(warmup_epochs={warmup_epochs!r}): must be >= 0")
        if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 0:
            raise ValueError(f"GroupSparsity(steps_per_epoch={steps_per_epoch!r}): give an "
                             "integer >= 0 (0 = take it from fit)")
        if total_epochs is not None and (int(total_epochs) != total_epochs or total_epochs < 1):
            raise ValueError(f"GroupSparsity(total_epochs={total_epochs!r}): give the run's "
                             "number of epochs, an integer >= 1, or None")
        if start_fraction is not None:
            if start_epoch:
                raise ValueError("GroupSparsity: give start_epoch or start_fraction, not both")
            if total_epochs is None:
                raise ValueError("GroupSparsity(start_fraction=...): also give total_epochs, "
                                 "or resolve the fraction yourself and pass start_epoch")
            if not 0.0 <= start_fraction < 1.0:
                raise ValueError(f"GroupSparsity(start_fraction={start_fraction!r}): give a "
                                 "fraction of training in [0, 1)")
            start_epoch = int(round(start_fraction * total_epochs))
        if int(start_epoch) != start_epoch or start_epoch < 0:
            raise ValueError(f"GroupSparsity(start_epoch={start_epoch!r}): give an integer >= 0")
        if total_epochs is not None and start_epoch + warmup_epochs > total_epochs:
            raise ValueError(f"GroupSparsity: start_epoch + warmup_epochs = "
                             f"{start_epoch + warmup_epochs} exceeds total_epochs={total_epochs}, "
                             "so lam never reaches strength; start earlier or shorten warmup")
        self.strength = float(strength)
        self.start_epoch = int(start_epoch)
        self.warmup_epochs = float(warmup_epochs)
        self.target_share = float(target_share)
        self.penalty = penalty
        self.tl1_a = float(tl1_a)
        self.include_conv1 = bool(include_conv1)
        self.include_bn2 = bool(include_bn2)
        self.cost_power = float(cost_power)
        self.cost = cost
        self.total_epochs = None if total_epochs is None else int(total_epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self._epoch = 0
        self._reset()

    def _reset(self):
        self._groups = None
        self._fn = None
        self._fn_for = (None, None)  # (model, optimizer) the compiled step belongs to
        self._exec_steps = 1

    def lam(self, epoch, step=None, steps_per_epoch=None):
        """lam after batch `step` (0-based; None = the epoch's start) of `epoch`."""
        if self.strength == 0.0 or epoch < self.start_epoch:
            return 0.0
        if self.warmup_epochs == 0:
            return self.strength
        n = steps_per_epoch if steps_per_epoch is not None else self._steps()
        frac = (step + 1) / n if (n and step is not None) else 0.0
        progress = (epoch - self.start_epoch + frac) / self.warmup_epochs
        return self.strength * min(1.0, progress)

    def _steps(self):
        if self.steps_per_epoch:
            return self.steps_per_epoch
        return (self.params or {}).get("steps") or 0

    def on_train_begin(self, logs=None):
        self._build()

    def _build(self):
        # One compiled step per (model, optimizer), built once: walking the model
        # every batch would cost more than the update itself.
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if self._fn is not None and self._fn_for[0] is model and self._fn_for[1] is optimizer:
            return
        if optimizer is None:
            raise ValueError("GroupSparsity: compile the model with an optimizer before fit")
        groups = block_groups(model)
        if not groups:
            raise ValueError("GroupSparsity: the model has no private conv1 -> bn2 -> relu2 -> "
                             "conv2 chain (pre-activation residual block); nothing to sparsify")
        spe = getattr(model, "_steps_per_execution", None)
        self._exec_steps = int(spe.numpy()) if spe is not None else 1
        self._groups = groups
        self._fn = self._make_step(groups, optimizer)
        self._fn_for = (model, optimizer)

    def _make_step(self, groups, optimizer):
        members = [g.members(self.include_conv1, self.include_bn2) for g in groups]
        sizes = [g.channels for g in groups]
        total = sum(sizes)
        k = min(total, max(1, math.ceil(self.target_share * total - 1e-9))) \
            if self.target_share > 0 else 0
        kind, a = self.penalty, self.tl1_a
        weights = tf.constant(cost_weights(groups, self.cost_power, self.cost), tf.float32)

        @tf.function
        def step(lam):
            t = _current_lr(optimizer) * lam
            values = [[(tf.convert_to_tensor(v), ax) for v, ax in ms] for ms in members]
            sq = [tf.add_n([_group_sq_norms(x, ax) for x, ax in vs]) for vs in values]
            norms = tf.sqrt(tf.concat(sq, axis=0))
            w = tf.cast(weights, norms.dtype)
            f = _factor(norms, t * w, kind, a)
            if k:
                zero_after = tf.reduce_sum(tf.cast((f == 0) | (norms == 0), tf.int32))
                # the k groups the weighted prox would zero first
                _, idx = tf.math.top_k(-norms / w, k=k)
                held = tf.tensor_scatter_nd_update(tf.ones_like(f), idx[:, None],
                                                   tf.zeros([k], f.dtype))
                f = tf.where(zero_after >= k, held, f)
            for (ms, vs), fg in zip(zip(members, values), tf.split(f, sizes)):
                for (var, ax), (x, _) in zip(ms, vs):
                    var.assign(x * _broadcast(fg, x, ax))
            return t

        return step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        lam = self.lam(self._epoch, batch)
        if lam <= 0.0:
            return
        if self._fn is None:
            self._build()
        self._fn(tf.constant(lam * self._exec_steps, tf.float32))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self._groups is None:
            self._build()
        logs["group_zero_share"] = zero_group_share(self.model, self._groups)["share"]
        n = self._steps()
        logs["group_lam"] = self.lam(epoch, n - 1 if n else None)
