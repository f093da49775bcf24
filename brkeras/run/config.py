"""The config schema every experiment config starts from.

Config files under `configs/` call `base_config()` and override fields; the
command line overrides them again (`--config.adv.eps=0.05`). Every reference
choice of SPEC sections 1-5 is a named field here, with the reference default.
"""

import importlib.util
import os

import ml_collections

PRECISIONS = ("float", "binary", "ternary", "ternary_twn", "4bit", "kbit", "int8_qat")
LOSSES = ("natural", "pgd", "tradeoff", "trades")
STRATEGIES = ("default", "mirrored", "multi_worker")
SPARSITY_PENALTIES = ("group_l1", "tl1")
SPARSITY_COSTS = ("macs", "params")  # group_sparsity.COST_MEASURES (config stays TF-free)
BR_PRECISIONS = tuple(p for p in PRECISIONS if p not in ("float", "int8_qat"))  # binary_relax's


def base_config():
    """Paper-scale defaults (CIFAR-10, ResNet20, 200 epochs); configs override."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10"  # tfds name, or a path to an .npz file
    c.data.data_dir = ""  # tfds data dir; "" = tfds default (~/tensorflow_datasets)
    c.data.augment = True  # pad-4 random crop + horizontal flip
    c.data.max_train_examples = 0  # 0 = all
    c.data.max_test_examples = 0  # 0 = all
    c.data.shuffle_buffer = 10_000

    c.model = ml_collections.ConfigDict()
    c.model.depth = 20  # 6n+2
    c.model.width = 16  # channels of the first stage (16/32/64 for ResNet20)
    c.model.ensemble = 1  # M of En_M
    c.model.sigma = 0.1  # Feynman-Kac noise scale; 0 = plain ResNet
    c.model.noise_pool = 8  # 1 = i.i.d. normals; k = a pool of N/k normals with random signs (layers.py)

    c.quant = ml_collections.ConfigDict()
    c.quant.precision = "float"  # one of PRECISIONS
    c.quant.bits = 4  # for "kbit"
    c.quant.per_channel = False  # one scale per layer (ref) or per output channel
    c.quant.layers = ("conv3x3",)  # layer kinds to quantize (quantize.LAYER_KINDS)
    # Regexes (re.search) on layer names kept float although of a quantized kind,
    # e.g. ("conv0$",) for the stem, as the reference's commented-out `'conv0' not in n`.
    c.quant.keep_float = ()
    c.quant.lam0 = 1.0
    c.quant.rho = 1.05  # lam *= rho once per epoch (paper's code; 1.04 in the BR demo)
    c.quant.lam_per_step = False  # True: the same curve lam0*rho^(epoch+step/steps), per step
    c.quant.phase2_epoch = 120  # exact Q(w) from this epoch on (paper's code)
    c.quant.phase2_fraction = -1.0  # if >= 0, overrides phase2_epoch as a fraction of epochs

    # Channel sparsity during training (quant/group_sparsity.py): a proximal group
    # penalty on the float weights after every step, so block-private channels become
    # exactly zero and deploy/prune.py removes them. Off in the reference.
    c.sparsity = ml_collections.ConfigDict()
    c.sparsity.enabled = False  # ARG token "sparse" turns it on, "dense" off
    c.sparsity.strength = 0.0  # lam; the threshold of a step is lr * lam
    c.sparsity.penalty = "group_l1"  # or "tl1" (transformed l1, tl1_a)
    c.sparsity.tl1_a = 1.0
    c.sparsity.start_fraction = 0.0  # of optim.epochs: shrink from this epoch on
    c.sparsity.warmup_epochs = 0  # lam ramps linearly from 0 over these epochs
    c.sparsity.target_share = 0.0  # stop at this share of zero groups (0 = no target)
    c.sparsity.include_conv1 = False  # conv1's filter c joins group c
    c.sparsity.include_bn2 = False  # and bn2's gamma_c, beta_c
    c.sparsity.cost_power = 0.0  # threshold x (channel cost / mean)^p; 1 = MorphNet's FLOPs
    c.sparsity.cost = "macs"  # the channel cost of cost_power: "macs" or "params"

    c.adv = ml_collections.ConfigDict()
    c.adv.eps = 8 / 255
    c.adv.eps_iter = 2 / 255
    c.adv.steps = 10
    c.adv.rand_init = True
    # The training attack: "pgd" (steps x eps_iter, projected) or "nfgsm" (de Jorge et
    # al. 2022: one step of nfgsm_step * eps from x + U[-k eps, k eps], k = nfgsm_noise,
    # unprojected; one gradient instead of `steps`).
    c.adv.method = "pgd"
    c.adv.nfgsm_noise = 2.0
    c.adv.nfgsm_step = 1.0

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "tradeoff"  # one of LOSSES
    c.loss.a = 8.0  # tradeoff: a * CE(adv) + CE(nat)
    c.loss.beta = 6.0  # trades

    c.optim = ml_collections.ConfigDict()
    c.optim.epochs = 200
    c.optim.steps_per_epoch = 0  # 0 = one pass over the (capped) training set
    c.optim.batch_size = 128
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4  # L2 added to the gradient of the float weights
    c.optim.milestones = (80, 120, 160)  # lr *= gamma at these epochs
    c.optim.gamma = 0.1
    # After the last epoch, replace BatchNorm's moving statistics by the mean batch
    # statistics of the final weights over this many training batches (0 = off, the
    # reference). Undoes the damage of quantized weights flipping levels (batchnorm.py).
    c.optim.bn_reestimate_batches = 0
    c.optim.dtype_policy = "float32"  # or "mixed_bfloat16", "auto" (train/precision.py)
    # > 0: the trained weights are replaced by their exponential moving average over
    # the steps, decay ema_decay (train/weight_average.py; needs bn_reestimate_batches,
    # since the averaged weights need their own BatchNorm statistics). 0 = off.
    c.optim.ema_decay = 0.0

    c.eval = ml_collections.ConfigDict()
    c.eval.max_examples = 1000
    # The images evaluated are [first_example, first_example + max_examples) of `split`:
    # "test", or "train" for images that training did not use (first_example >=
    # data.max_train_examples), a validation set to choose settings on, so that the
    # test images stay unseen (README, the held-out check).
    c.eval.split = "test"
    c.eval.first_example = 0
    c.eval.batch_size = 200
    c.eval.eot_samples = 8  # noise draws for EOT gradients and expected predictions
    c.eval.eps_sweep = (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255)
    # apgd_ce, apgd_dlr: AutoAttack's "rand" version for randomised models (SPEC 10)
    c.eval.attacks = ("fgsm", "ifgsm20", "pgd20", "cw", "apgd_ce", "apgd_dlr")
    c.eval.eot_attacks = ("fgsm", "ifgsm20", "pgd20", "apgd_ce", "apgd_dlr")  # also with EOT
    # of eot_attacks, run only with EOT on a noisy model (plain would be a weaker copy)
    c.eval.eot_only = ("apgd_ce", "apgd_dlr")
    c.eval.predict_batch_size = 1000  # examples per compiled prediction call
    # `brkeras evaluate` splits the images among this many worker processes
    # (run/eval_shards.py; the same results up to the noise draws). 0 = one per
    # core, at most one per batch_size images; 1 = in the calling process.
    c.eval.shards = 0
    # Attack steps relative to config.adv.eps, as SPEC 5 at CIFAR scale:
    # IFGSM-20 steps 1/255 of an 8/255 ball, PGD-20 steps 2/255.
    c.eval.ifgsm_step_fraction = 1 / 8
    c.eval.pgd_step_fraction = 1 / 4
    c.eval.cw_c = 10.0
    c.eval.cw_kappa = 0.0
    c.eval.cw_lr = 6e-4
    c.eval.cw_steps = 50
    c.eval.sweep_examples = 500  # examples for the eps sweep and the step/restart checks
    # APGD (robust/apgd.py): steps (its step-size schedule scales with them), random
    # starts, the checkpoint threshold rho, EOT draws of its EOT mode (0 = eot_samples).
    c.eval.apgd_steps = 40
    c.eval.apgd_restarts = 1
    c.eval.apgd_rho = 0.75
    c.eval.apgd_eot_samples = 0
    # `brkeras evaluate_tflite`: the exported files under attack (deploy/robustness.py):
    # the evaluation's worst-case x_adv on the first tflite_examples (0 = all), and
    # Square Attack (L-inf, queries per example) on the first square_examples.
    c.eval.tflite_examples = 0
    c.eval.square_examples = 200
    c.eval.square_queries = 500
    c.eval.square_p_init = 0.05
    c.eval.square_eot_samples = 1  # draws per query on a noisy file
    # Square's examples, in square_shards fixed shards (each its own random stream, so
    # results do not depend on the machine), attacked by this many threads with one
    # interpreter each (0 = one per CPU core, at most 8): a batch-1 noisy file is
    # otherwise one core's work.
    c.eval.square_shards = 8
    c.eval.tflite_workers = 0

    c.export = ml_collections.ConfigDict()
    c.export.formats = ("float32", "dynamic_int8", "full_int8")
    c.export.prune = True
    c.export.representative_examples = 200
    c.export.parity_examples = 1000
    c.export.min_agreement = 0.995  # noise-off top-1 agreement of TFLite with Keras
    # Full int8 quantizes activations too (per tensor), which flips 1-3% of the
    # top-1s of a small model with no loss of accuracy: it must agree on 95% and
    # lose at most 1 point of accuracy.
    c.export.min_agreement_full_int8 = 0.95
    c.export.max_accuracy_drop_full_int8 = 0.01
    # Formats whose failed parity check drops the file (listed in export.json
    # under "dropped", with the reason) instead of failing the whole export.
    c.export.optional_formats = ()
    # Files without tensor names (deploy/flatbuffer.strip_names); False for a viewer.
    c.export.strip_names = True

    c.bench = ml_collections.ConfigDict()
    c.bench.threads = (1, 2)
    c.bench.runs = 200  # timed invokes per file and thread count
    c.bench.rounds = 5  # ... split over this many alternating rounds (deploy/latency.py)
    # The pipeline also times the shipped file of every model side by side
    # (latency.json); speed-ups are against this model ("" or a model not in
    # pipeline.models: the first one).
    c.bench.baseline_model = ""

    c.strategy = "default"  # one of STRATEGIES
    # A finished float run (work dir) whose weights initialise this one before
    # quantization; "" = random initialisation.
    c.init_from = ""

    # `brkeras pipeline`: one work dir per model, each an ARG of apply_arg.
    c.pipeline = ml_collections.ConfigDict()
    c.pipeline.models = ("float,tradeoff", "ternary,tradeoff", "4bit,tradeoff",
                         "ternary,pgd", "int8_qat,tradeoff")
    c.pipeline.stages = ("train", "evaluate", "export", "benchmark")
    # Start every other model from this one's weights ("" = all from scratch),
    # with this shorter schedule.
    c.pipeline.finetune = ml_collections.ConfigDict()
    c.pipeline.finetune.from_model = ""
    c.pipeline.finetune.epochs = 3
    c.pipeline.finetune.lr = 0.05
    c.pipeline.finetune.milestones = (2,)
    c.pipeline.finetune.max_train_examples = 20_000
    c.pipeline.finetune.phase2_fraction = 0.34
    # (model ARG, source ARG) pairs: these models fine-tune from another model of the
    # pipeline (listed before them, float or Binary-Relax) instead of from_model,
    # e.g. ("ternary,tradeoff,sparse", "ternary,tradeoff"): quantize, then prune.
    c.pipeline.finetune.sources = ()
    # Worker processes running models side by side (run/workers.py; 1 = one model
    # at a time in the pipeline's own process). Each gets cores / workers threads
    # (all cores when it is the only job that can run); the jobs of a model
    # narrower than 8 channels get at least 2 (workers.thread_floor); the
    # benchmark stages run afterwards, alone.
    c.pipeline.workers = 1
    return c


def validate(c):
    """Raises ValueError naming the field and its allowed values."""
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)

    need(c.quant.precision in PRECISIONS,
         f"config.quant.precision={c.quant.precision!r}; choose one of {PRECISIONS}")
    need(c.loss.name in LOSSES, f"config.loss.name={c.loss.name!r}; choose one of {LOSSES}")
    need(c.strategy in STRATEGIES,
         f"config.strategy={c.strategy!r}; choose one of {STRATEGIES}")
    need((c.model.depth - 2) % 6 == 0 and c.model.depth >= 8,
         f"config.model.depth={c.model.depth}; a pre-activation ResNet has depth 6n+2 "
         "(8, 14, 20, 32, 44, 56, 110)")
    need(c.model.ensemble >= 1, "config.model.ensemble must be >= 1")
    need(c.model.sigma >= 0, "config.model.sigma must be >= 0")
    need(c.model.noise_pool >= 1, "config.model.noise_pool must be >= 1")
    need(c.optim.epochs >= 1, "config.optim.epochs must be >= 1")
    need(c.optim.batch_size >= 1, "config.optim.batch_size must be >= 1")
    need(c.optim.get("bn_reestimate_batches", 0) >= 0,
         "config.optim.bn_reestimate_batches must be >= 0 (0 = off)")
    ema = c.optim.get("ema_decay", 0.0)
    need(isinstance(ema, (int, float)) and not isinstance(ema, bool) and 0.0 <= ema < 1.0,
         f"config.optim.ema_decay={ema!r}; give a decay in [0, 1) (0 = off; 0.99 averages "
         "about the last 100 steps)")
    need(not ema or c.optim.get("bn_reestimate_batches", 0) > 0,
         f"config.optim.ema_decay={ema} needs config.optim.bn_reestimate_batches > 0 (e.g. "
         "50): the averaged weights are a network no BatchNorm statistic was gathered for")
    need(c.optim.get("dtype_policy", "float32") in ("float32", "mixed_bfloat16", "auto"),
         f"config.optim.dtype_policy={c.optim.get('dtype_policy')!r}; choose float32, "
         "mixed_bfloat16 or auto (bfloat16 where the CPU or accelerator has it)")
    need(0 <= c.adv.eps_iter and 0 <= c.adv.eps <= 1,
         "config.adv.eps must be in [0, 1] and eps_iter >= 0")
    need(c.adv.steps >= 0, "config.adv.steps must be >= 0")
    need(c.adv.get("method", "pgd") in ("pgd", "nfgsm"),
         f"config.adv.method={c.adv.get('method')!r}; choose pgd or nfgsm")
    need(c.adv.get("nfgsm_noise", 2.0) >= 0 and c.adv.get("nfgsm_step", 1.0) >= 0,
         "config.adv.nfgsm_noise and config.adv.nfgsm_step (units of eps) must be >= 0")
    need(not (c.adv.get("method", "pgd") == "nfgsm" and c.loss.name == "trades"
              and c.adv.get("nfgsm_noise", 2.0) == 0),
         "config.adv.nfgsm_noise=0 with the TRADES loss: KL(f(x) || f(x')) has zero gradient "
         "at x' = x, so there would be no attack; give nfgsm_noise > 0 (2 in the paper)")
    # an old work dir's config has no square_shards: its Square ran as one stream (1)
    need(c.eval.get("tflite_workers", 0) >= 0 and c.eval.get("square_shards", 1) >= 1,
         "config.eval.tflite_workers must be >= 0 (0 = one per core) and "
         "config.eval.square_shards >= 1")
    shards = c.eval.get("shards", 0)
    need(isinstance(shards, int) and not isinstance(shards, bool) and shards >= 0,
         f"config.eval.shards={shards!r}; give a whole number >= 0 (0 = one worker process "
         "per CPU core, 1 = evaluate in this process)")
    workers = c.pipeline.get("workers", 1)
    need(isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1,
         f"config.pipeline.workers={workers!r}; give a whole number >= 1 (1 = one model at "
         "a time; 2 runs two side by side, e.g. on 2 CPU cores)")
    need(c.quant.rho >= 1 and c.quant.lam0 >= 0,
         "config.quant.rho must be >= 1 and config.quant.lam0 >= 0")
    need(c.quant.phase2_fraction <= 1, "config.quant.phase2_fraction must be <= 1 (< 0 = off)")
    bench = c.get("bench")
    if bench is not None:
        need(bench.get("runs", 1) >= 1 and bench.get("rounds", 1) >= 1,
             f"config.bench.runs={bench.get('runs')} and config.bench.rounds="
             f"{bench.get('rounds')} must be >= 1")
    sp = c.get("sparsity")
    if sp is not None and sp.enabled:
        need(sp.strength > 0, f"config.sparsity.strength={sp.strength}; give lam > 0 with "
             "config.sparsity.enabled (or the ARG token 'dense' to turn sparsity off)")
        need(sp.penalty in SPARSITY_PENALTIES, f"config.sparsity.penalty={sp.penalty!r}; "
             f"choose one of {SPARSITY_PENALTIES}")
        need(sp.tl1_a > 0, "config.sparsity.tl1_a must be > 0")
        need(sp.get("cost_power", 0.0) >= 0, "config.sparsity.cost_power must be >= 0 "
             "(0 = every channel alike, 1 = threshold proportional to its cost, config.sparsity.cost)")
        need(sp.get("cost_power", 0.0) == 0 or sp.penalty == "group_l1",
             "config.sparsity.cost_power > 0 needs config.sparsity.penalty='group_l1'")
        need(sp.get("cost", "macs") in SPARSITY_COSTS, f"config.sparsity.cost="
             f"{sp.get('cost')!r}; choose one of {SPARSITY_COSTS} (what a removed channel "
             "saves: MACs per example or weights in the file)")
        need(0 <= sp.start_fraction < 1, "config.sparsity.start_fraction must be in [0, 1)")
        need(sp.warmup_epochs >= 0, "config.sparsity.warmup_epochs must be >= 0")
        need(0 <= sp.target_share < 1, "config.sparsity.target_share must be in [0, 1) (0 = none)")
        need(c.quant.precision != "binary",
             "config.sparsity with quant.precision='binary': binary Q(w) = mean|w| sign(w) is "
             "never zero, so no channel can be removed; use ternary or k-bit")
    return c


def init_source_problem(source, config):
    """Why a finished run of config `source` cannot start a run of `config` through
    init_from (`train.initial_weights`), or "" if it can: it must be a float or a
    Binary-Relax run of the same network (depth, width, ensemble) and data set.
    One rule for the train stage and for the pipeline's check before any work."""
    if source.quant.precision not in ("float",) + BR_PRECISIONS:
        return (f"it is a {source.quant.precision} model (a tfmot int8 QAT model is no start "
                f"for another model); start from a float or a Binary-Relax model {BR_PRECISIONS}")
    for section, name in (("model", "depth"), ("model", "width"), ("model", "ensemble"),
                          ("data", "name")):
        if source[section][name] != config[section][name]:
            return (f"it has {section}.{name}={source[section][name]!r}, this run "
                    f"{config[section][name]!r}; a run starts from one of the same network and data")
    return ""


def phase2_epoch(c):
    """The epoch at which Binary-Relax switches to exact Q(w)."""
    if c.quant.phase2_fraction >= 0:
        return int(round(c.quant.phase2_fraction * c.optim.epochs))
    return int(c.quant.phase2_epoch)


def from_file(path, arg=None):
    """`get_config(arg)` of the config file at `path` (a Python file, as --config takes),
    so one config can start from another's ConfigDict."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def apply_arg(c, arg):
    """Applies a config-file ARG such as "ternary,tradeoff,en2,d56" to `c`.

    Tokens: a precision (PRECISIONS), a loss (LOSSES), `sparse` / `dense`
    (config.sparsity.enabled), `enM` (ensemble of M members), `dN` (depth N),
    `wN` (first-stage width N). Unknown tokens raise.
    """
    for token in filter(None, (arg or "").split(",")):
        token = token.strip()
        if token in PRECISIONS:
            c.quant.precision = token
        elif token in LOSSES:
            c.loss.name = token
        elif token in ("sparse", "dense"):
            c.sparsity.enabled = token == "sparse"
        elif token.startswith("en") and token[2:].isdigit():
            c.model.ensemble = int(token[2:])
        elif token.startswith("d") and token[1:].isdigit():
            c.model.depth = int(token[1:])
        elif token.startswith("w") and token[1:].isdigit():
            c.model.width = int(token[1:])
        else:
            raise ValueError(
                f"unknown config argument {token!r}; use comma-separated tokens: a "
                f"precision {PRECISIONS}, a loss {LOSSES}, sparse or dense, enM (ensemble "
                "size), dN (depth), wN (width), e.g. ternary,tradeoff,sparse,en2,d20")
    return c


def stage_config(stored, override=None):
    """The config of a later stage: the run's stored config, with the eval, export
    and bench sections of `override` (a --config given to evaluate/export/benchmark)."""
    c = ml_collections.ConfigDict(stored)
    if override is not None:
        with c.unlocked():
            for section in ("eval", "export", "bench"):
                if section in override:
                    c[section] = ml_collections.ConfigDict(override[section].to_dict())
    return c
