"""An exponential moving average of the trained weights (Polyak averaging).

Weight averaging is part of the strongest adversarial-training recipes (Gowal et
al. 2020, Rebuffi et al. 2021 evaluate the EMA of the weights). For Binary-Relax
it also settles latent weights that flip between ternary levels from step to
step: their average sits on one side of the threshold. brkeras re-estimates the
BatchNorm statistics for the averaged network (config validation asks for it).
On the default sparse ternary fine-tune (5 epochs) it measured no gain (README,
"Channel sparsity"); it is an option for longer runs.

Math (`ema_decay`): after optimizer step n (n = 1, 2, ...), for every averaged
variable v with shadow s,

    d_n = min(decay, (1 + n) / (10 + n))      (TF's ExponentialMovingAverage warm-up)
    s  <- d_n * s + (1 - d_n) * v

`apply_average` then sets v <- s, except where v is exactly zero: an exact zero
in the trained weights is a structural decision (the group-sparsity prox holds
pruned channels at zero; their average only decays towards it), so the averaged
network keeps every removed channel removed.

The shadows and the step count live in a `WeightAverage` tf.Module: put it in
the training checkpoint, and a resumed run continues the same average.
"""

from brkeras._keras import keras, tf

WARMUP_OFFSET = 10.0


def ema_decay(decay, count):
    """d_n of the docstring: `decay` capped by the warm-up (1 + n) / (10 + n)."""
    count = tf.cast(count, tf.float32)
    return tf.minimum(tf.cast(decay, tf.float32), (1.0 + count) / (WARMUP_OFFSET + count))


def ema_update(shadow, value, decay):
    """decay * shadow + (1 - decay) * value (arrays or tensors)."""
    return decay * shadow + (1.0 - decay) * value


def apply_average(value, shadow):
    """The averaged weight: `shadow`, but exactly zero where `value` is."""
    return tf.where(tf.equal(value, 0), tf.zeros_like(shadow), tf.cast(shadow, value.dtype))


class WeightAverage(tf.Module):
    """Shadow copies of `variables`, updated by `update()` after each optimizer step.

    Create it under the distribution strategy's scope (the shadows mirror the
    variables) and after the weights it starts from are set: the shadows start
    as copies of them.

    Args:
        variables: the variables to average (e.g. `net.trainable_variables`).
        decay: the EMA decay in (0, 1), e.g. 0.99 (about the last 100 steps).
    """

    def __init__(self, variables, decay, name="weight_average"):
        super().__init__(name=name)
        decay = float(decay)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"WeightAverage(decay={decay!r}): give a decay in (0, 1), e.g. 0.99 "
                             "(the average then spans about 1 / (1 - decay) steps)")
        variables = list(variables)
        if not variables:
            raise ValueError("WeightAverage: no variables to average; build the model first")
        self.decay = decay
        self._variables = variables
        self.shadows = [tf.Variable(v.read_value(), trainable=False,
                                    name=v.name.split(":")[0].replace("/", "_") + "_ema")
                        for v in variables]
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="ema_updates")
        self._update_fn = None

    def update(self):
        """One averaging step (call after each optimizer update)."""
        if self._update_fn is None:
            self._update_fn = tf.function(self._update)
        self._update_fn()

    def _update(self):
        self.count.assign_add(1)
        d = ema_decay(self.decay, self.count)
        for s, v in zip(self.shadows, self._variables):
            s.assign(ema_update(s, tf.cast(v, s.dtype), d))

    def apply(self):
        """Sets every variable to its average (zeros of the trained weights kept)."""
        for s, v in zip(self.shadows, self._variables):
            v.assign(apply_average(v, s))


class WeightAverageCallback(keras.callbacks.Callback):
    """Calls `average.update()` after every training batch.

    Put it after callbacks that change the weights after the optimizer step (the
    group-sparsity prox), so the average sees the weights the next step starts
    from. With steps_per_execution = n > 1 Keras calls it once per n steps, and
    the average then samples every n-th step.
    """

    def __init__(self, average):
        super().__init__()
        self.average = average

    def on_train_batch_end(self, batch, logs=None):
        self.average.update()
