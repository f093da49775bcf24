"""`brkeras train`: a whole training run in a work dir, and `load` of a trained one.

`train(config, workdir)` checkpoints every epoch (tf.train.Checkpoint: weights,
optimizer, Binary-Relax lam and phase, epoch), resumes an interrupted work dir
from its last completed epoch, and stops on a NaN or Inf loss keeping the last
good checkpoint. `load(workdir)` rebuilds the network from config.json and
restores its weights.
"""

import os
import shutil
import time

import numpy as np
from absl import logging

from brkeras import data
from brkeras.errors import NonFiniteLossError
from brkeras.nn import models
from brkeras.quant import binary_relax, group_sparsity, schedule as schedule_lib
from brkeras.robust import losses
from brkeras.run import config as config_lib
from brkeras.run import workdir as workdir_lib
from brkeras.train import batchnorm
from brkeras.train.adversarial_model import AdversarialModel
from brkeras.train import distribute
from brkeras._keras import keras, tf


def from_config(config, input_shape, num_classes):
    """build_model from `config.model` (depth, width, ensemble, sigma, noise_pool)."""
    c = config.model
    return models.build_model(input_shape, num_classes, depth=c.depth, width=c.width,
                       ensemble=c.ensemble, sigma=c.sigma, noise_pool=c.noise_pool)


def quantize_from_config(net, quant):
    """`binary_relax.quantize_model` with the fields of config.quant."""
    return binary_relax.quantize_model(
        net, quant.precision, bits=quant.get("bits", 4), per_channel=quant.get("per_channel", False),
        layers=tuple(quant.get("layers", ("conv3x3",))), keep_float=quant.get("keep_float", ()))


def build_network(config, input_shape, num_classes, init_weights=None):
    """The EnResNet of `config`, quantized as config.quant says (not compiled).

    init_weights: the weights of a trained float EnResNet of the same architecture
    (see `initial_weights`), set before quantization so the quantized model starts
    from them, the usual way to quantize a trained network.
    """
    net = from_config(config, input_shape, num_classes)
    if init_weights is not None:
        net.set_weights(init_weights)
    return quantize_from_config(net, config.quant)


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


def schedule_for(c, steps_per_epoch=0):
    """The BinaryRelaxSchedule of a full experiment config (config.base_config()),
    with phase II at `config.phase2_epoch(c)` (fraction form included); lam grows
    every step when c.quant.lam_per_step (then `steps_per_epoch` is needed)."""
    if not c.quant.get("lam_per_step", False):
        steps_per_epoch = 0
    return schedule_lib.BinaryRelaxSchedule(c.quant.lam0, c.quant.rho, config_lib.phase2_epoch(c),
                               steps_per_epoch)


def group_sparsity_for(c, steps_per_epoch):
    """The GroupSparsity callback of config.sparsity."""
    sp = c.sparsity
    return group_sparsity.GroupSparsity(
        sp.strength, start_fraction=sp.start_fraction, warmup_epochs=sp.warmup_epochs,
        target_share=sp.target_share, penalty=sp.penalty, tl1_a=sp.tl1_a,
        include_conv1=sp.include_conv1, include_bn2=sp.include_bn2,
        total_epochs=c.optim.epochs, steps_per_epoch=steps_per_epoch)


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
        lam, exact = (binary_relax.br_state(self.net) if binary_relax.br_quantizers(self.net)
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
    strategy = distribute.make_strategy(config.strategy)
    chief = distribute.is_chief()
    write_dir = workdir if chief else distribute.worker_scratch_dir(workdir)
    error, mode = None, "worker"
    try:
        if chief:
            mode = workdir_lib.prepare_for_training(workdir, config, overwrite=overwrite)
        elif overwrite and os.path.isdir(write_dir):
            shutil.rmtree(write_dir)
    except (workdir_lib.WorkdirError, OSError) as e:
        error = e
    distribute._check_workers_ready(strategy, error)
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
    initial_epoch = distribute._agree_on_epoch(strategy, manager, ckpt, epoch_var)
    if chief:  # drop metric lines past the checkpoint (a kill between the two)
        workdir_lib.truncate_metrics(workdir, initial_epoch)
    if initial_epoch:
        logging.info("resuming %s from epoch %d", workdir, initial_epoch)
        if verbose:
            print(f"[train] resuming {workdir} after epoch {initial_epoch}", flush=True)
    elif verbose:
        print(f"[train] {mode} run in {workdir}", flush=True)

    callbacks = [EpochLogger(workdir, manager, epoch_var, net, write=chief)]
    if config.get("sparsity") is not None and config.sparsity.enabled:
        # Before EpochLogger, which logs the zero-group share it adds to the epoch's logs.
        callbacks.insert(0, group_sparsity_for(config, steps))
    if binary_relax.br_quantizers(net):
        callbacks.insert(0, schedule_for(config, steps))
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
    if binary_relax.br_quantizers(net):
        binary_relax.set_exact(net, True)
    return net
