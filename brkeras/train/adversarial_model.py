"""Adversarial training through plain `model.fit`: the PGD (or N-FGSM) train step.

`AdversarialModel` wraps the (possibly tfmot-quantized) functional network and
shares its variables. Its `train_step` crafts L-inf PGD examples (or N-FGSM's
single unprojected step, `attack="nfgsm"`) on the current
weights u (the Binary-Relax quantizer's forward does not depend on the training
flag, so the attack and the loss see the same u), stops the gradient through
them, and applies the named loss of `brkeras.robust.losses`. L2 weight decay is
added to the gradient of the float weights, as PyTorch's SGD does. Because it is
a `train_step`, `fit`, callbacks and tf.distribute strategies work unchanged.
Under a mixed dtype policy (train/precision.py) the network's logits are cast
to float32 before the attack's loss, the training loss and the metrics.
"""

import numpy as np

from brkeras.robust import attacks
from brkeras.robust import losses
from brkeras._keras import keras, tf


def trades_attack(model_fn, x, eps, eps_iter, nb_iter, clip_min=0.0, clip_max=1.0,
                  method="pgd", noise_scale=2.0):
    """TRADES' inner maximisation of KL(f(x) || f(x')): L-inf PGD from x + U[-0.001, 0.001]
    (TRADES starts from x + 0.001 N(0, I); a start this small only breaks the tie at x),
    or with method="nfgsm" one N-FGSM step from x + U[-noise_scale eps, noise_scale eps]."""
    p_logits = tf.stop_gradient(tf.cast(model_fn(x), tf.float32))
    if method == "nfgsm":
        return attacks.nfgsm(model_fn, x, eps, eps_iter, noise_scale, clip_min=clip_min,
                             clip_max=clip_max, y=p_logits, loss_fn=losses.kl_divergence)
    return attacks.pgd(model_fn, x, eps, eps_iter, nb_iter, clip_min=clip_min,
                       clip_max=clip_max, y=p_logits, rand_init=True,
                       rand_minmax=min(0.001, eps), loss_fn=losses.kl_divergence)


ATTACKS = ("pgd", "nfgsm")  # training attacks: config.adv.method


class AdversarialModel(keras.Model):
    """Trains `net` with PGD (or N-FGSM) examples crafted inside the train step.

    Args:
        net: the functional network (float or `quantize_model`-ed); shares its variables.
        loss: a name of robust.losses.NAMES ("natural", "pgd", "tradeoff", "trades")
            or a `losses.get(name, a=..., beta=...)`.
        eps, eps_iter, steps: L-inf radius, step and number of PGD steps.
        rand_init: PGD's uniform random start.
        attack: "pgd" (Madry's PGD, `steps` steps of eps_iter) or "nfgsm" (one step
            of eps_iter from x + U[-noise_scale eps, noise_scale eps], unprojected:
            attacks.nfgsm; de Jorge et al. use eps_iter = eps, noise_scale = 2;
            `steps` and `rand_init` are then unused).
        noise_scale: N-FGSM's noise radius in units of eps.
        weight_decay: L2 coefficient added to the gradient of every trainable weight.

    Example:
        trainer = AdversarialModel(qnet, loss="tradeoff", eps=0.1, eps_iter=0.04, steps=3)
        trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True))
        trainer.fit(x, y, batch_size=64, epochs=2)

    Metrics: `loss`, `nat_acc` (natural accuracy on the batch) and `adv_acc`
    (accuracy on the batch's adversarial examples). `test_step` reports the
    same for held-out data with the network in inference mode.
    """

    def __init__(self, net, loss, eps, eps_iter, steps, rand_init=True,
                 weight_decay=0.0, attack="pgd", noise_scale=2.0, **kwargs):
        super().__init__(name=kwargs.pop("name", "adversarial_trainer"), **kwargs)
        if eps < 0 or eps_iter < 0 or steps < 0:
            raise ValueError(f"eps, eps_iter and steps must be >= 0, got {eps}, {eps_iter}, {steps}")
        if attack not in ATTACKS:
            raise ValueError(f"attack={attack!r}; choose one of {ATTACKS} (config.adv.method)")
        if noise_scale < 0:
            raise ValueError(f"noise_scale={noise_scale}; N-FGSM's noise radius must be >= 0 "
                             "(config.adv.nfgsm_noise)")
        if isinstance(loss, str):
            loss = losses.get(loss)
        if not isinstance(loss, losses.Loss):
            raise ValueError(f"loss={loss!r}; give a name of {losses.NAMES} or losses.get(...)")
        if attack == "nfgsm" and noise_scale == 0 and loss.attack == "kl":
            raise ValueError("attack='nfgsm' with noise_scale=0 and a KL loss (TRADES): the KL "
                             "gradient is zero at x' = x, so there would be no attack; give "
                             "noise_scale > 0 (2 in the paper)")
        self.net = net
        self.loss_spec = loss
        self.eps, self.eps_iter, self.steps = float(eps), float(eps_iter), int(steps)
        self.rand_init = bool(rand_init)
        self.attack, self.noise_scale = attack, float(noise_scale)
        self.weight_decay = float(weight_decay)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.nat_acc = keras.metrics.SparseCategoricalAccuracy(name="nat_acc")
        self.adv_acc = keras.metrics.SparseCategoricalAccuracy(name="adv_acc")

    @property
    def metrics(self):
        return [self.loss_tracker, self.nat_acc, self.adv_acc]

    def call(self, x, training=False):
        return self._logits(x, training)

    def _logits(self, x, training):
        """The network's logits in float32 (the loss and the metrics are float32
        whatever the network computes in, e.g. bfloat16 under a mixed policy)."""
        return tf.cast(self.net(x, training=training), tf.float32)

    def adversarial_examples(self, x, y, training):
        """PGD (or N-FGSM) examples for the loss's attack ("ce" or "kl"); x itself if none."""
        kind = self.loss_spec.attack
        if kind is None or self.eps == 0 or (self.attack == "pgd" and self.steps == 0):
            return x
        model_fn = lambda z: self._logits(z, training)  # noqa: E731
        if kind == "kl":
            return trades_attack(model_fn, x, self.eps, self.eps_iter, self.steps,
                                 method=self.attack, noise_scale=self.noise_scale)
        if self.attack == "nfgsm":
            return attacks.nfgsm(model_fn, x, self.eps, self.eps_iter, self.noise_scale, y=y)
        return attacks.pgd(model_fn, x, self.eps, self.eps_iter, self.steps, norm=np.inf,
                           clip_min=0.0, clip_max=1.0, y=y, rand_init=self.rand_init)

    def train_step(self, batch):
        x, y = batch
        # BatchNorm in training mode during the attack, as the reference does.
        x_adv = tf.stop_gradient(self.adversarial_examples(x, y, training=True))
        with tf.GradientTape() as tape:
            logits_adv = self._logits(x_adv, True)
            logits_nat = (self._logits(x, True) if self.loss_spec.second_forward
                          else logits_adv)
            per_example = self.loss_spec(y, logits_nat, logits_adv)
            loss = tf.nn.compute_average_loss(per_example)
        variables = self.net.trainable_variables
        grads = tape.gradient(loss, variables)
        if self.weight_decay:
            # Gradients are summed over replicas; keep the decay's total at wd * w.
            wd = self.weight_decay / tf.distribute.get_strategy().num_replicas_in_sync
            grads = [g + wd * v for g, v in zip(grads, variables)]
        self.optimizer.apply_gradients(zip(grads, variables))
        self.loss_tracker.update_state(tf.reduce_mean(per_example))
        self.nat_acc.update_state(y, logits_nat)
        self.adv_acc.update_state(y, logits_adv)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, batch):
        x, y = batch
        x_adv = self.adversarial_examples(x, y, training=False)
        logits_nat = self._logits(x, False)
        logits_adv = self._logits(x_adv, False)
        self.loss_tracker.update_state(tf.reduce_mean(self.loss_spec(y, logits_nat, logits_adv)))
        self.nat_acc.update_state(y, logits_nat)
        self.adv_acc.update_state(y, logits_adv)
        return {m.name: m.result() for m in self.metrics}
