"""Adversarial training through plain `model.fit`: the PGD train step, checkpoints, resume.

`AdversarialModel` wraps the (possibly tfmot-quantized) functional network and
shares its variables. Its `train_step` crafts L-inf PGD examples on the current
weights u (the Binary-Relax quantizer's forward does not depend on the training
flag, so the attack and the loss see the same u), stops the gradient through
them, and applies the named loss of `brkeras.losses`. L2 weight decay is added
to the gradient of the float weights, as PyTorch's SGD does. Because it is a
`train_step`, `fit`, callbacks and tf.distribute strategies work unchanged.

`train(config, workdir)` runs a whole training: checkpoints every epoch
(tf.train.Checkpoint: weights, optimizer, Binary-Relax lam and phase, epoch),
resumes an interrupted work dir from its last completed epoch, and stops on a
NaN or Inf loss keeping the last good checkpoint.
"""

import os
import time

import numpy as np
from absl import logging

from brkeras import attacks
from brkeras import config as config_lib
from brkeras import data
from brkeras import losses
from brkeras import models
from brkeras import quantize
from brkeras import workdir as workdir_lib
from brkeras.errors import NonFiniteLossError
from brkeras._keras import keras, tf


def trades_attack(model_fn, x, eps, eps_iter, nb_iter, clip_min=0.0, clip_max=1.0):
    """TRADES' inner maximisation: PGD on KL(f(x) || f(x')), start x + 0.001 N(0, I)."""
    p_logits = tf.stop_gradient(model_fn(x))
    x_adv = tf.clip_by_value(x + 0.001 * tf.random.normal(tf.shape(x)), clip_min, clip_max)
    for _ in range(nb_iter):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            loss = tf.reduce_sum(losses.kl_divergence(p_logits, model_fn(x_adv)))
        grad = tape.gradient(loss, x_adv)
        x_adv = x_adv + eps_iter * tf.sign(grad)
        x_adv = tf.clip_by_value(tf.clip_by_value(x_adv, x - eps, x + eps), clip_min, clip_max)
    return tf.stop_gradient(x_adv)


class AdversarialModel(keras.Model):
    """Trains `net` with PGD examples crafted inside the train step.

    Metrics: `loss`, `nat_acc` (natural accuracy on the batch) and `adv_acc`
    (accuracy on the batch's adversarial examples). `test_step` reports the
    same for held-out data with the network in inference mode.
    """

    def __init__(self, net, loss, eps, eps_iter, steps, rand_init=True,
                 weight_decay=0.0, **kwargs):
        super().__init__(name=kwargs.pop("name", "adversarial_trainer"), **kwargs)
        if eps < 0 or eps_iter < 0 or steps < 0:
            raise ValueError(f"eps, eps_iter and steps must be >= 0, got {eps}, {eps_iter}, {steps}")
        self.net = net
        self.loss_spec = loss
        self.eps, self.eps_iter, self.steps = float(eps), float(eps_iter), int(steps)
        self.rand_init = bool(rand_init)
        self.weight_decay = float(weight_decay)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.nat_acc = keras.metrics.SparseCategoricalAccuracy(name="nat_acc")
        self.adv_acc = keras.metrics.SparseCategoricalAccuracy(name="adv_acc")

    @property
    def metrics(self):
        return [self.loss_tracker, self.nat_acc, self.adv_acc]

    def call(self, x, training=False):
        return self.net(x, training=training)

    def adversarial_examples(self, x, y, training):
        """PGD examples for the loss's attack ("ce" or "kl"); x itself if none."""
        kind = self.loss_spec.attack
        if kind is None or self.steps == 0 or self.eps == 0:
            return x
        model_fn = lambda z: self.net(z, training=training)  # noqa: E731
        if kind == "kl":
            return trades_attack(model_fn, x, self.eps, self.eps_iter, self.steps)
        return attacks.pgd(model_fn, x, self.eps, self.eps_iter, self.steps, norm=np.inf,
                           clip_min=0.0, clip_max=1.0, y=y, rand_init=self.rand_init)

    def train_step(self, batch):
        x, y = batch
        # BatchNorm in training mode during the attack, as the reference does.
        x_adv = tf.stop_gradient(self.adversarial_examples(x, y, training=True))
        with tf.GradientTape() as tape:
            logits_adv = self.net(x_adv, training=True)
            logits_nat = (self.net(x, training=True) if self.loss_spec.needs_natural
                          and self.loss_spec.attack is not None else logits_adv)
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
        logits_nat = self.net(x, training=False)
        logits_adv = self.net(x_adv, training=False)
        self.loss_tracker.update_state(tf.reduce_mean(self.loss_spec(y, logits_nat, logits_adv)))
        self.nat_acc.update_state(y, logits_nat)
        self.adv_acc.update_state(y, logits_adv)
        return {m.name: m.result() for m in self.metrics}


def build_network(config, input_shape, num_classes):
    """The EnResNet of `config`, quantized as config.quant says (not compiled)."""
    net = models.from_config(config, input_shape, num_classes)
    return quantize.quantize_model(net, config.quant)


def make_optimizer(config, steps_per_epoch):
    o = config.optim
    boundaries = [int(m) * steps_per_epoch for m in o.milestones if 0 < m < o.epochs]
    values = [o.lr * o.gamma ** i for i in range(len(boundaries) + 1)]
    lr = (keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
          if boundaries else o.lr)
    return keras.optimizers.SGD(learning_rate=lr, momentum=o.momentum, nesterov=o.nesterov)


def make_strategy(name):
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("config.strategy='multi_worker' needs the TF_CONFIG environment "
                             "variable (cluster and task); see docs/multi_worker.md")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"config.strategy={name!r}; choose one of {config_lib.STRATEGIES}")


def is_chief():
    """True unless this process is a non-chief worker of a multi-worker run."""
    tf_config = os.environ.get("TF_CONFIG")
    if not tf_config:
        return True
    import json  # pylint: disable=g-import-not-at-top
    task = json.loads(tf_config).get("task", {})
    kind, index = task.get("type", "worker"), task.get("index", 0)
    cluster = json.loads(tf_config).get("cluster", {})
    if "chief" in cluster:
        return kind == "chief"
    return kind == "worker" and index == 0


class EpochLogger(keras.callbacks.Callback):
    """Checks the loss every batch and, at each epoch end, logs, checkpoints, records state.

    Order at an epoch end: metrics line, checkpoint, state.json. A resume trusts
    the checkpoint's epoch counter and drops any metrics line past it.
    """

    def __init__(self, workdir, manager, epoch_var, net, write=True):
        super().__init__()
        self.workdir, self.manager, self.epoch_var, self.net = workdir, manager, epoch_var, net
        self.write = write
        self._t0 = None

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.time()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            done = int(self.epoch_var.numpy())
            raise NonFiniteLossError(
                f"training loss became {loss} at epoch {done + 1}, batch {batch + 1}; "
                f"stopped. The last good checkpoint (epoch {done}) is kept in "
                f"{os.path.join(self.workdir, workdir_lib.CKPT)}. Lower config.optim.lr "
                "or check the data, then train again in a new work dir (or --overwrite).")

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        for k, v in logs.items():
            if not np.isfinite(v):
                raise NonFiniteLossError(f"{k} became {v} at epoch {epoch + 1}; stopped "
                                         "without checkpointing this epoch")
        lam, exact = (quantize.br_state(self.net) if quantize.br_quantizers(self.net)
                      else (None, None))
        record = {"epoch": epoch + 1, "time_s": round(time.time() - self._t0, 2),
                  "lr": float(keras.backend.get_value(self.model.optimizer.learning_rate)),
                  **{k: float(v) for k, v in logs.items()}}
        if lam is not None:
            record.update(br_lam=lam, br_exact=bool(exact))
        self.epoch_var.assign(epoch + 1)
        if self.write:
            workdir_lib.append_metrics(self.workdir, record)
        self.manager.save(checkpoint_number=epoch + 1)
        if self.write:
            workdir_lib.write_state(self.workdir, epoch + 1, finished=False)


def _checkpoint(net, optimizer, epoch_var):
    return tf.train.Checkpoint(net=net, optimizer=optimizer, epoch=epoch_var)


def train(config, workdir, overwrite=False, verbose=1):
    """Trains `config` into `workdir`; resumes an unfinished run there. Returns the history rows."""
    config_lib.validate(config)
    chief = is_chief()
    mode = workdir_lib.prepare_for_training(workdir, config, overwrite=overwrite) if chief else "worker"
    keras.utils.set_random_seed(config.seed)
    strategy = make_strategy(config.strategy)

    info = data.info(config.data.name)
    train_ds = data.load(config.data.name, "train", batch_size=config.optim.batch_size,
                         augment=config.data.augment, shuffle=True,
                         max_examples=config.data.max_train_examples,
                         data_dir=config.data.data_dir, seed=config.seed,
                         repeat=bool(config.optim.steps_per_epoch))
    n_train = len(data.load_arrays(config.data.name, "train", config.data.max_train_examples,
                                   config.data.data_dir)[1])
    steps = int(config.optim.steps_per_epoch) or int(np.ceil(n_train / config.optim.batch_size))

    with strategy.scope():
        net = build_network(config, info.image_shape, info.num_classes)
        optimizer = make_optimizer(config, steps)
        trainer = AdversarialModel(
            net, losses.get(config.loss.name, config.loss.a, config.loss.beta),
            eps=config.adv.eps, eps_iter=config.adv.eps_iter, steps=config.adv.steps,
            rand_init=config.adv.rand_init, weight_decay=config.optim.weight_decay)
        trainer.compile(optimizer=optimizer)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="completed_epochs")
        ckpt = _checkpoint(net, optimizer, epoch_var)
    ckpt_dir = os.path.join(workdir, workdir_lib.CKPT)
    if not chief:  # non-chief workers write to a scratch dir (tf.distribute convention)
        ckpt_dir = os.path.join(workdir, "workers", str(os.getpid()), workdir_lib.CKPT)
    manager = tf.train.CheckpointManager(ckpt, ckpt_dir, max_to_keep=2)

    initial_epoch = 0
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint)
        initial_epoch = int(epoch_var.numpy())
        if chief:
            workdir_lib.truncate_metrics(workdir, initial_epoch)
        logging.info("resuming %s from epoch %d", workdir, initial_epoch)
        if verbose:
            print(f"[train] resuming {workdir} after epoch {initial_epoch}", flush=True)
    elif verbose:
        print(f"[train] {mode} run in {workdir}", flush=True)

    callbacks = [EpochLogger(workdir, manager, epoch_var, net, write=chief)]
    if quantize.br_quantizers(net):
        callbacks.insert(0, quantize.schedule_for(config))
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(workdir, workdir_lib.TB),
                                                     write_graph=False, profile_batch=0))
    if initial_epoch < config.optim.epochs:
        trainer.fit(train_ds, epochs=config.optim.epochs, initial_epoch=initial_epoch,
                    steps_per_epoch=steps if config.optim.steps_per_epoch else None,
                    callbacks=callbacks, verbose=verbose)
    if chief:
        workdir_lib.write_state(workdir, config.optim.epochs, finished=True)
    return workdir_lib.read_metrics(workdir) if chief else []


def load(workdir):
    """The trained network of `workdir` with its exact quantized weights Q(w), noise on."""
    config = workdir_lib.load_config(workdir)
    info = data.info(config.data.name)
    net = build_network(config, info.image_shape, info.num_classes)
    latest = tf.train.latest_checkpoint(os.path.join(workdir, workdir_lib.CKPT))
    if latest is None:
        raise workdir_lib.WorkdirError(
            f"{workdir} has no checkpoint yet; train it with `brkeras train --workdir={workdir}`")
    try:
        tf.train.Checkpoint(net=net).restore(latest).expect_partial().assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError, IndexError) as e:
        raise workdir_lib.WorkdirError(
            f"checkpoint {latest} does not match the model of {workdir}/config.json or is "
            f"corrupt: {e}") from e
    if quantize.br_quantizers(net):
        quantize.set_exact(net, True)
    return net
