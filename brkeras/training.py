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

import json
import os
import shutil
import time

import numpy as np
from absl import logging

from brkeras import attacks
from brkeras import batchnorm
from brkeras import config as config_lib
from brkeras import data
from brkeras import losses
from brkeras import models
from brkeras import quantize
from brkeras import workdir as workdir_lib
from brkeras.errors import NonFiniteLossError
from brkeras._keras import keras, tf


def trades_attack(model_fn, x, eps, eps_iter, nb_iter, clip_min=0.0, clip_max=1.0):
    """TRADES' inner maximisation: L-inf PGD on KL(f(x) || f(x')) from x + U[-0.001, 0.001]
    (TRADES starts from x + 0.001 N(0, I); a start this small only breaks the tie at x)."""
    p_logits = tf.stop_gradient(model_fn(x))
    return attacks.pgd(model_fn, x, eps, eps_iter, nb_iter, clip_min=clip_min,
                       clip_max=clip_max, y=p_logits, rand_init=True,
                       rand_minmax=min(0.001, eps), loss_fn=losses.kl_divergence)


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
            logits_nat = (self.net(x, training=True) if self.loss_spec.second_forward
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
        logits_nat = self.net(x, training=False)
        logits_adv = self.net(x_adv, training=False)
        self.loss_tracker.update_state(tf.reduce_mean(self.loss_spec(y, logits_nat, logits_adv)))
        self.nat_acc.update_state(y, logits_nat)
        self.adv_acc.update_state(y, logits_adv)
        return {m.name: m.result() for m in self.metrics}


def build_network(config, input_shape, num_classes, init_weights=None):
    """The EnResNet of `config`, quantized as config.quant says (not compiled).

    init_weights: the weights of a trained float EnResNet of the same architecture
    (see `initial_weights`), set before quantization so the quantized model starts
    from them, the usual way to quantize a trained network.
    """
    net = models.from_config(config, input_shape, num_classes)
    if init_weights is not None:
        net.set_weights(init_weights)
    return quantize.quantize_model(net, config.quant)


def initial_weights(config):
    """The float weights of the finished run `config.init_from`, or None if unset.

    That run must be a float model with the same architecture and data set.
    """
    source = config.get("init_from", "")
    if not source:
        return None
    src = workdir_lib.load_config(source)
    if not workdir_lib.read_state(source)["finished"]:
        raise workdir_lib.WorkdirError(f"config.init_from={source} is not a finished run; "
                                       "train it first")
    if src.quant.precision != "float":
        raise ValueError(f"config.init_from={source} is a {src.quant.precision} model; "
                         "start from a float model")
    for field in ("depth", "width", "ensemble"):
        if src.model[field] != config.model[field]:
            raise ValueError(f"config.init_from={source} has model.{field}="
                             f"{src.model[field]}, this run {config.model[field]}; they must match")
    if src.data.name != config.data.name:
        raise ValueError(f"config.init_from={source} was trained on {src.data.name}, "
                         f"this run uses {config.data.name}")
    return load(source).get_weights()


def make_optimizer(config, steps_per_epoch):
    o = config.optim
    boundaries = [int(m) * steps_per_epoch for m in o.milestones if 0 < m < o.epochs]
    values = [o.lr * o.gamma ** i for i in range(len(boundaries) + 1)]
    lr = (keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
          if boundaries else o.lr)
    return keras.optimizers.SGD(learning_rate=lr, momentum=o.momentum, nesterov=o.nesterov)


def make_strategy(name):
    """The tf.distribute strategy of `config.strategy`.

    "default": one device; "mirrored": MirroredStrategy over this machine's
    devices (GPUs, or logical CPU devices); "multi_worker":
    MultiWorkerMirroredStrategy from TF_CONFIG. That one configures collective
    ops, so it must exist before any other TensorFlow op of the process runs.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("config.strategy='multi_worker' needs the TF_CONFIG environment "
                             "variable (cluster and task); see docs/multi_worker.md")
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as e:
            raise RuntimeError(
                f"{e}: config.strategy='multi_worker' must be set up before any other "
                "TensorFlow op of the process runs; call training.train in a fresh process "
                "(e.g. `brkeras train`), not after other TensorFlow work") from e
    raise ValueError(f"config.strategy={name!r}; choose one of {config_lib.STRATEGIES}")


def _task():
    """(type, index, cluster) of TF_CONFIG; ("worker", 0, {}) without it."""
    tf_config = os.environ.get("TF_CONFIG")
    if not tf_config:
        return "worker", 0, {}
    try:
        parsed = json.loads(tf_config)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}); see docs/multi_worker.md") from e
    task = parsed.get("task", {})
    return task.get("type", "worker"), int(task.get("index", 0)), parsed.get("cluster", {})


def is_chief():
    """True unless this process is a non-chief worker of a multi-worker run.

    The chief is task "chief" if the cluster has one, else worker 0 (as in
    MultiWorkerMirroredStrategy).
    """
    kind, index, cluster = _task()
    if "chief" in cluster:
        return kind == "chief"
    return kind == "worker" and index == 0


def worker_scratch_dir(workdir):
    """Where a non-chief worker writes its checkpoints: <workdir>/workertemp_<index>.

    Every worker must save (saving reads synchronised variables, a collective
    op), but only the chief's files are the run's (tf.distribute convention). The
    name is stable across restarts, so a worker without a shared file system can
    resume from its own copy; `train` removes it when the run finishes.
    """
    kind, index, _ = _task()
    return os.path.join(workdir, f"{kind}temp_{index}")


def _check_workers_ready(strategy, error):
    """Raises `error`, and on every other worker too, if a worker failed to set up.

    Without this the healthy workers would wait forever in the first collective op.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        if error is not None:
            raise error
        return
    flag = 0 if error is not None else 1
    ready = strategy.gather(strategy.run(lambda: tf.constant([flag], tf.int64)), axis=0).numpy()
    if error is not None:
        raise error
    if not ready.all():
        raise workdir_lib.WorkdirError(
            "another worker could not prepare its work dir (see its log, e.g. a finished run "
            "needs --overwrite on every worker); stopped")


def _agree_on_epoch(strategy, manager, ckpt, epoch_var):
    """The epoch every worker resumes after: the smallest one the workers restored.

    Each worker restores from the checkpoint dir it sees, and a kill during
    saving can leave one worker a checkpoint ahead; that one then restores
    `ckpt-<min epoch>` (CheckpointManager keeps two). One process: no-op.
    """
    mine = int(epoch_var.numpy())
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return mine
    local = strategy.run(lambda: tf.constant([mine], tf.int64))
    epochs = [int(e) for e in strategy.gather(local, axis=0).numpy()]  # all workers call it
    target = min(epochs)
    if target == mine:
        return mine
    path = os.path.join(manager.directory, f"ckpt-{target}")
    if target == 0 or path not in manager.checkpoints:
        raise workdir_lib.WorkdirError(
            f"the workers restored different epochs {epochs} and this one has no checkpoint "
            f"of epoch {target} in {manager.directory}. Give every worker the work dir it "
            "used before (one shared dir, or the same per-machine dirs), or start over in "
            "a new work dir.")
    ckpt.restore(path).assert_existing_objects_matched()
    logging.info("workers restored epochs %s; all resume after epoch %d", epochs, target)
    return target


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


def train_dataset(config, seed=None, repeat=None):
    """The training pipeline of `config`: global batches of config.optim.batch_size.

    seed: the shuffle seed (default config.seed); repeat: repeat forever (default:
    when config.optim.steps_per_epoch fixes the epoch length).

    The pipeline gathers batches by index (Dataset.range), so there are no files
    to shard. DATA sharding: every worker builds the same seeded global batches
    and keeps its own slice of each (under a multi-worker strategy).
    """
    ds = data.load(config.data.name, "train", batch_size=config.optim.batch_size,
                   augment=config.data.augment, shuffle=True,
                   max_examples=config.data.max_train_examples,
                   data_dir=config.data.data_dir,
                   seed=config.seed if seed is None else seed,
                   repeat=bool(config.optim.steps_per_epoch) if repeat is None else repeat)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


BN_REPORT = workdir_lib.BATCHNORM


def reestimate_batchnorm(trainer, config, num_batches):
    """`batchnorm.reestimate` on the inputs the training loss sees.

    num_batches training batches (a seeded shuffle of the run's data), each as
    its adversarial examples, crafted as in training, and, for a loss with a
    natural term, as itself. Returns the re-estimation report.
    """
    ds = train_dataset(config, seed=config.seed + 1, repeat=True)
    # x itself for a loss without an attack.
    craft = tf.function(lambda x, y: trainer.adversarial_examples(x, y, training=True))

    def inputs():
        for x, y in ds.take(num_batches):
            yield craft(x, y)
            if trainer.loss_spec.second_forward:
                yield x

    report = batchnorm.reestimate(trainer.net, inputs())
    return {"training_batches": int(num_batches), **report}


def _checkpoint(net, optimizer, epoch_var):
    return tf.train.Checkpoint(net=net, optimizer=optimizer, epoch=epoch_var)


def train(config, workdir, overwrite=False, verbose=1):
    """Trains `config` into `workdir`; resumes an unfinished run there. Returns the history rows."""
    config_lib.validate(config)
    # First: MultiWorkerMirroredStrategy must exist before any other TF op runs.
    strategy = make_strategy(config.strategy)
    chief = is_chief()
    write_dir = workdir if chief else worker_scratch_dir(workdir)
    error, mode = None, "worker"
    try:
        if chief:
            mode = workdir_lib.prepare_for_training(workdir, config, overwrite=overwrite)
        elif overwrite and os.path.isdir(write_dir):
            shutil.rmtree(write_dir)
    except (workdir_lib.WorkdirError, OSError) as e:
        error = e
    _check_workers_ready(strategy, error)
    keras.utils.set_random_seed(config.seed)

    info = data.info(config.data.name)
    # Each worker restores from the dir it writes (chief: the run's ckpt/); a worker
    # without one reads the chief's if it can see it (a shared work dir).
    latest = tf.train.latest_checkpoint(os.path.join(write_dir, workdir_lib.CKPT)) or (
        None if chief else tf.train.latest_checkpoint(os.path.join(workdir, workdir_lib.CKPT)))
    # A resumed run restores every weight from its checkpoint: skip the source run.
    init_weights = None if latest else initial_weights(config)
    train_ds = train_dataset(config)
    n_train = len(data.load_arrays(config.data.name, "train", config.data.max_train_examples,
                                   config.data.data_dir)[1])
    steps = int(config.optim.steps_per_epoch) or int(np.ceil(n_train / config.optim.batch_size))

    with strategy.scope():
        net = build_network(config, info.image_shape, info.num_classes, init_weights)
        optimizer = make_optimizer(config, steps)
        trainer = AdversarialModel(
            net, losses.get(config.loss.name, config.loss.a, config.loss.beta),
            eps=config.adv.eps, eps_iter=config.adv.eps_iter, steps=config.adv.steps,
            rand_init=config.adv.rand_init, weight_decay=config.optim.weight_decay)
        trainer.compile(optimizer=optimizer)
        # Step logs (progress bar, NaN check) hold each replica's own metric means;
        # Keras' default "sum" would add them up. Epoch logs are global either way.
        trainer.distribute_reduction_method = "first"
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="completed_epochs")
        ckpt = _checkpoint(net, optimizer, epoch_var)
    manager = tf.train.CheckpointManager(ckpt, os.path.join(write_dir, workdir_lib.CKPT),
                                         max_to_keep=2)
    if latest:
        ckpt.restore(latest)
    initial_epoch = _agree_on_epoch(strategy, manager, ckpt, epoch_var)
    if chief:  # drop metric lines past the checkpoint (a kill between the two)
        workdir_lib.truncate_metrics(workdir, initial_epoch)
    if initial_epoch:
        logging.info("resuming %s from epoch %d", workdir, initial_epoch)
        if verbose:
            print(f"[train] resuming {workdir} after epoch {initial_epoch}", flush=True)
    elif verbose:
        print(f"[train] {mode} run in {workdir}", flush=True)

    callbacks = [EpochLogger(workdir, manager, epoch_var, net, write=chief)]
    if quantize.br_quantizers(net):
        callbacks.insert(0, quantize.schedule_for(config, steps))
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(workdir, workdir_lib.TB),
                                                     write_graph=False, profile_batch=0))
    if initial_epoch < config.optim.epochs:
        trainer.fit(train_ds, epochs=config.optim.epochs, initial_epoch=initial_epoch,
                    steps_per_epoch=steps if config.optim.steps_per_epoch else None,
                    callbacks=callbacks, verbose=verbose)
    n_bn = int(config.optim.get("bn_reestimate_batches", 0))
    if n_bn:
        # Computed from the final weights alone: a kill before state.json says
        # finished just redoes it on resume.
        report = reestimate_batchnorm(trainer, config, n_bn)
        manager.save(checkpoint_number=config.optim.epochs)
        if chief:
            workdir_lib.write_json(os.path.join(workdir, BN_REPORT), report)
        if verbose:
            worst = max(report["layers"].values(), key=lambda r: r["variance_ratio"])
            print(f"[train] BatchNorm statistics re-estimated on {n_bn} batches "
                  f"(largest moving-variance error x{worst['variance_ratio']:.2f}, "
                  f"see {BN_REPORT})", flush=True)
    if chief:
        workdir_lib.write_state(workdir, config.optim.epochs, finished=True)
        return workdir_lib.read_metrics(workdir)
    shutil.rmtree(write_dir, ignore_errors=True)  # the worker's scratch copy is done
    return []


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
