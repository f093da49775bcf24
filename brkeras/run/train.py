"""`brkeras train`: a whole training run in a work dir, and `load` of a trained one.

`train(config, workdir)` checkpoints every epoch (tf.train.Checkpoint: weights,
optimizer, Binary-Relax lam and phase, epoch), resumes an interrupted work dir
from its last completed epoch, and stops on a NaN or Inf loss keeping the last
good checkpoint. `load(workdir)` rebuilds the network from config.json and
restores its weights.

Reliability: the work dir's lock (run/lock.py) is held throughout; at an epoch
end the checkpoint is written first, then metrics.jsonl and state.json, with
Ctrl-C held off until all three are done; a failed write (full disk,
permissions) removes that epoch's files and stops with a WorkdirError. Every
epoch draws its data order and its random ops (noise, PGD starts) from
(config.seed, epoch) alone, so a resumed run computes what an uninterrupted one
does.
"""

import contextlib
import glob
import os
import shutil
import time

import numpy as np
from absl import logging

from brkeras import data
from brkeras import errors
from brkeras.errors import NonFiniteLossError
from brkeras.nn import models
from brkeras.quant import binary_relax, group_sparsity, schedule as schedule_lib
from brkeras.robust import losses
from brkeras.run import config as config_lib
from brkeras.run import console
from brkeras.run import lock as lock_lib
from brkeras.run import workdir as workdir_lib
from brkeras.train import batchnorm
from brkeras.train.adversarial_model import AdversarialModel
from brkeras.train import distribute
from brkeras.train import precision
from brkeras.train import weight_average
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

    init_weights: float weights of a trained EnResNet of the same architecture
    (`initial_weights`: a float run's, or a Binary-Relax run's w), set before
    quantization so the quantized model starts from them, the usual way to
    quantize a trained network.
    """
    net = from_config(config, input_shape, num_classes)
    if init_weights is not None:
        net.set_weights(init_weights)
    return quantize_from_config(net, config.quant)


def initial_weights(config):
    """The float weights of the finished run `config.init_from`, or None if unset.

    That run must have the same architecture and data set, and be a float model
    or a Binary-Relax one; of a Binary-Relax run the quantized kernels come as its
    float weights w (what Binary-Relax trains), not as Q(w), so that training goes
    on from where that run stopped (e.g. pruning a trained ternary model).
    """
    source = config.get("init_from", "")
    if not source:
        return None
    src = workdir_lib.load_config(source)
    if not workdir_lib.read_state(source)["finished"]:
        raise workdir_lib.WorkdirError(f"config.init_from={source} is not a finished run; "
                                       "train it first")
    problem = config_lib.init_source_problem(src, config)
    if problem:
        raise ValueError(f"config.init_from={source}: {problem}")
    trained = load(source)
    if src.quant.precision == "float":
        return trained.get_weights()
    info = data.info(src.data.name)
    with precision.policy_scope("float32"):
        float_net = from_config(src, info.image_shape, info.num_classes)
    return binary_relax.copy_to_float(trained, float_net, latent=True).get_weights()


def make_optimizer(config, steps_per_epoch):
    o = config.optim
    boundaries = [int(m) * steps_per_epoch for m in o.milestones if 0 < m < o.epochs]
    values = [o.lr * o.gamma ** i for i in range(len(boundaries) + 1)]
    lr = (keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
          if boundaries else o.lr)
    return keras.optimizers.SGD(learning_rate=lr, momentum=o.momentum, nesterov=o.nesterov)


def make_trainer(config, net, steps_per_epoch):
    """The AdversarialModel that trains `net` as `config` says (loss, attack, weight
    decay), compiled with `make_optimizer`. Under a strategy, call it in its scope."""
    trainer = AdversarialModel(
        net, losses.get(config.loss.name, config.loss.a, config.loss.beta),
        weight_decay=config.optim.weight_decay, **attack_arguments(config.adv))
    trainer.compile(optimizer=make_optimizer(config, steps_per_epoch))
    return trainer


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
        total_epochs=c.optim.epochs, steps_per_epoch=steps_per_epoch,
        cost_power=sp.get("cost_power", 0.0), cost=sp.get("cost", "macs"))


class EpochLogger(keras.callbacks.Callback):
    """Checks the loss every batch and, at each epoch end, checkpoints, logs, records state.

    Order at an epoch end: checkpoint, metrics line, state.json (`_save_epoch`),
    so every logged epoch has its checkpoint. A resume trusts the checkpoint's
    epoch counter and drops any metrics line past it; a checkpoint past the
    metrics (a kill between the two) is trained again (`_logged_checkpoint`).
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
                  # oneDNN's results differ run to run on some CPUs (README): say which ran
                  "onednn": precision.onednn_enabled(),
                  **{k: float(v) for k, v in logs.items()}}
        if lam is not None:
            record.update(br_lam=lam, br_exact=bool(exact))
        with console.sigint_deferred():  # Ctrl-C: after the epoch is fully recorded
            self.epoch_var.assign(epoch + 1)
            _save_epoch(self.manager, epoch + 1, self.workdir if self.write else None, record)


def _remove_temp_files(directory, number):
    """tf's temp files of a save of checkpoint `number` (and of the state file) in `directory`."""
    prefix = os.path.join(directory, f"ckpt-{number}")
    for path in glob.glob(glob.escape(prefix) + "_temp*") + glob.glob(
            os.path.join(glob.escape(directory), "checkpoint.tmp*")):
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _drop_checkpoint(directory, number):
    """Removes checkpoint `number` of `directory` with tf's temp files of it, and points
    the checkpoint state back at the newest remaining one."""
    prefix = os.path.join(directory, f"ckpt-{number}")
    _remove_temp_files(directory, number)
    for path in glob.glob(glob.escape(prefix) + ".*"):
        os.remove(path)
    state = tf.train.get_checkpoint_state(directory)
    listed = [] if state is None else list(state.all_model_checkpoint_paths)
    if os.path.basename(prefix) not in {os.path.basename(p) for p in listed}:
        return  # the save failed before recording it: the state is right as it is
    keep = [p for p in listed if os.path.basename(p) != os.path.basename(prefix)
            and os.path.exists(os.path.join(directory, os.path.basename(p)) + ".index")]
    try:
        if keep:
            tf.compat.v1.train.update_checkpoint_state(directory, keep[-1], keep)
        else:
            os.remove(os.path.join(directory, "checkpoint"))
    finally:
        _remove_temp_files(directory, number)  # tf's temp file of a state write that failed too


def _save_epoch(manager, number, workdir=None, record=None, resave=False):
    """Saves checkpoint `number`, then (chief: `workdir` given) logs `record` and the state.

    A failed write removes this epoch's checkpoint (and, in workdir, its metrics
    line and state) so that checkpoints and metrics still agree, and raises a
    WorkdirError that says what to free or fix; a later `train` resumes after
    epoch number - 1. resave: checkpoint `number` exists and is being written
    again (the BatchNorm re-estimation); a failure removes only the temp files
    and keeps it, and the next `train` redoes the re-estimation.
    """
    try:
        manager.save(checkpoint_number=number)
        if workdir is not None and record is not None:
            workdir_lib.record_epoch(workdir, record)
    except (tf.errors.OpError, OSError) as e:
        reason = console.write_failure(e)
        where = workdir or os.path.dirname(manager.directory)
        what = reason or f"{type(e).__name__}: {str(e).splitlines()[0]}"
        fix = console.how_to_fix(reason, where)
        if resave:
            with contextlib.suppress(OSError):
                _remove_temp_files(manager.directory, number)
            raise workdir_lib.WorkdirError(
                f"could not save the re-estimated BatchNorm statistics in {where}: {what}. "
                f"{fix}: the checkpoint of epoch {number} is kept and the re-estimation is "
                "redone.") from e
        cleanup_failed = None
        try:
            _drop_checkpoint(manager.directory, number)
            # Only what this epoch changed: on a full disk every write may fail.
            if workdir is not None:
                if any(r.get("epoch", 0) >= number for r in workdir_lib.read_metrics(workdir)):
                    workdir_lib.truncate_metrics(workdir, number - 1)
                if workdir_lib.read_state(workdir)["completed_epochs"] >= number:
                    workdir_lib.write_state(workdir, number - 1, finished=False)
        except (tf.errors.OpError, OSError) as cleanup_error:
            cleanup_failed = cleanup_error
        kept = (f"training resumes after epoch {number - 1}, whose checkpoint is kept"
                if number > 1 else "training starts again at epoch 1")
        also = (f" (cleaning up failed too: {cleanup_failed}; remove {manager.directory}/"
                f"ckpt-{number}* by hand)" if cleanup_failed else "")
        raise workdir_lib.WorkdirError(
            f"could not save epoch {number} in {where}: {what}{also}. {fix}: {kept}.") from e


def _logged_checkpoint(workdir, latest):
    """The checkpoint to resume from: `latest`, unless a kill fell between its save and
    its metrics line; then the one of the last logged epoch (None: from scratch)."""
    number = int(latest.rsplit("-", 1)[1])
    logged = max((int(r.get("epoch", 0)) for r in workdir_lib.read_metrics(workdir)), default=0)
    if logged >= number:
        return latest
    if logged == 0:
        return None
    prior = f"{latest.rsplit('-', 1)[0]}-{logged}"
    return prior if os.path.exists(prior + ".index") else latest


def epoch_seed(seed, epoch):
    """The seed of epoch `epoch` (0-based) of a run seeded `seed`: data order and random ops."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] >> 1)


class _OneEpoch(keras.callbacks.Callback):
    """Ends `fit` after one epoch: `train` calls fit once per epoch, with that epoch's seed."""

    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


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


def _checkpoint(net, optimizer, epoch_var, average=None):
    extra = {} if average is None else {"weight_average": average}
    return tf.train.Checkpoint(net=net, optimizer=optimizer, epoch=epoch_var, **extra)


def attack_arguments(adv):
    """AdversarialModel's attack keyword arguments from config.adv (a config written
    before config.adv.method existed trains with PGD, as it did)."""
    method = adv.get("method", "pgd")
    eps_iter = (adv.get("nfgsm_step", 1.0) * adv.eps if method == "nfgsm" else adv.eps_iter)
    return dict(eps=adv.eps, eps_iter=eps_iter, steps=adv.steps, rand_init=adv.rand_init,
                attack=method, noise_scale=adv.get("nfgsm_noise", 2.0))


def train(config, workdir, overwrite=False, verbose=None):
    """Trains `config` into `workdir`; resumes an unfinished run there. Returns the history rows.

    verbose: Keras' fit verbosity; None = bars on a terminal, else one line per
    epoch (console.progress_verbose). Holds the lock of the dir this process
    writes (the chief: workdir; another worker: its scratch dir) throughout.
    """
    config_lib.validate(config)
    if verbose is None:
        verbose = console.progress_verbose()
    # First: MultiWorkerMirroredStrategy must exist before any other TF op runs.
    strategy = distribute.make_strategy(config.strategy)
    chief = distribute.is_chief()
    write_dir = workdir if chief else distribute.worker_scratch_dir(workdir)
    with contextlib.ExitStack() as held:
        error, mode = None, "worker"
        try:
            held.enter_context(lock_lib.hold(write_dir, "train"))
            # The data is checked before anything is written.
            data.info(config.data.name)
            data.load_arrays(config.data.name, "train", config.data.max_train_examples,
                             config.data.data_dir)
            if chief:
                mode = workdir_lib.prepare_for_training(workdir, config, overwrite=overwrite)
            elif overwrite and os.path.isdir(write_dir):
                for name in set(os.listdir(write_dir)) - {workdir_lib.LOCK}:
                    path = os.path.join(write_dir, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        except (errors.BrkerasError, OSError, ValueError) as e:
            error = e
        distribute._check_workers_ready(strategy, error)
        return _train(config, workdir, write_dir, chief, mode, strategy, verbose)


def _train(config, workdir, write_dir, chief, mode, strategy, verbose):
    """The body of `train`, in a prepared, locked work dir."""
    keras.utils.set_random_seed(config.seed)

    info = data.info(config.data.name)
    # Each worker restores from the dir it writes (chief: the run's ckpt/); a worker
    # without one reads the chief's if it can see it (a shared work dir).
    latest = tf.train.latest_checkpoint(os.path.join(write_dir, workdir_lib.CKPT)) or (
        None if chief else tf.train.latest_checkpoint(os.path.join(workdir, workdir_lib.CKPT)))
    if chief and latest and not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # (multi-worker: the workers restore their own newest checkpoint and agree on
        # the epoch after restoring, so the chief must not roll back alone)
        latest = _logged_checkpoint(workdir, latest)
    # A resumed run restores every weight from its checkpoint: skip the source run.
    init_weights = None if latest else initial_weights(config)
    n_train = len(data.load_arrays(config.data.name, "train", config.data.max_train_examples,
                                   config.data.data_dir)[1])
    steps = int(config.optim.steps_per_epoch) or int(np.ceil(n_train / config.optim.batch_size))

    with strategy.scope():
        with precision.policy_scope(precision.for_precision(  # bf16 layers, float32 variables
                config.optim.get("dtype_policy", "float32"), config.quant.precision,
                width=config.model.width)):
            net = build_network(config, info.image_shape, info.num_classes, init_weights)
        trainer = make_trainer(config, net, steps)
        # Step logs (progress bar, NaN check) hold each replica's own metric means;
        # Keras' default "sum" would add them up. Epoch logs are global either way.
        trainer.distribute_reduction_method = "first"
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="completed_epochs")
        ema = float(config.optim.get("ema_decay", 0.0))
        average = (weight_average.WeightAverage(net.trainable_variables, ema) if ema else None)
        ckpt = _checkpoint(net, trainer.optimizer, epoch_var, average)
    manager = tf.train.CheckpointManager(ckpt, os.path.join(write_dir, workdir_lib.CKPT),
                                         max_to_keep=2)
    if latest:
        ckpt.restore(latest)
    initial_epoch = distribute._agree_on_epoch(strategy, manager, ckpt, epoch_var)
    if chief:  # drop metric lines past the checkpoint (work dirs of older versions logged first)
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
    if average is not None:  # after the prox: it averages the weights the next step starts from
        callbacks.insert(len(callbacks) - 1, weight_average.WeightAverageCallback(average))
    for epoch in range(initial_epoch, config.optim.epochs):
        # Everything random in this epoch follows from (config.seed, epoch): the
        # data order, and the random ops of a freshly traced train step (a retrace
        # per epoch; a cached trace would continue its random streams, which a
        # resumed process cannot).
        seed = epoch_seed(config.seed, epoch)
        tf.random.set_seed(seed)
        trainer.make_train_function(force=True)
        # A new TensorBoard each fit: fit's end closes its writers.
        tb = [keras.callbacks.TensorBoard(os.path.join(workdir, workdir_lib.TB),
                                          write_graph=False, profile_batch=0)] if chief else []
        trainer.fit(train_dataset(config, seed=seed), epochs=config.optim.epochs,
                    initial_epoch=epoch,
                    steps_per_epoch=steps if config.optim.steps_per_epoch else None,
                    callbacks=callbacks + tb + [_OneEpoch()], verbose=verbose)
    if average is not None:
        # From the last checkpoint alone (and idempotent): a kill before state.json
        # says finished redoes it on resume.
        average.apply()
        if verbose:
            print(f"[train] weights set to their moving average (decay {ema})", flush=True)
    n_bn = int(config.optim.get("bn_reestimate_batches", 0))
    if n_bn:
        # Computed from the final weights alone: a kill before state.json says
        # finished just redoes it on resume, with the same seed.
        tf.random.set_seed(epoch_seed(config.seed, config.optim.epochs))
        report = reestimate_batchnorm(trainer, config, n_bn)
        with console.sigint_deferred():
            _save_epoch(manager, config.optim.epochs, workdir if chief else None, resave=True)
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
    with precision.policy_scope("float32"):  # whatever policy trained it (precision.py)
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
