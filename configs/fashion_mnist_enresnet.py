"""Fashion-MNIST EnResNet at CPU scale: the default of `make run`.

Runs:
  brkeras pipeline --config=configs/fashion_mnist_enresnet.py --workdir=runs/pipeline
  brkeras train --config=configs/fashion_mnist_enresnet.py:ternary,tradeoff --workdir=runs/t
ARG: comma-separated tokens: a precision (float, binary, ternary, ternary_twn,
4bit, kbit, int8_qat), a loss (natural, pgd, tradeoff, trades), enM, dN, wN.
Default: float, tradeoff.

Setting (SPEC 2, Madry-style Fashion-MNIST): L-inf eps 0.1; training attack
PGD-3 with steps of 0.04 and a random start (cheaper than the reference's 8-10
steps of 0.02; evaluation uses PGD-20, EOT and the other SPEC 5 attacks);
En1ResNet8 of width 8 with Feynman-Kac noise sigma 0.1; SGD-Nesterov, lr 0.05,
/10 for the last epoch; 4 epochs of the first 30,000 training images.
The pipeline trains the float model first and fine-tunes every other model from
it (pipeline.finetune: 3 epochs of 20,000 images, Binary-Relax phase I for the
first epoch with lam growing per step to 10, exact Q(w) after).

Cost and result on 2 CPU cores (2026-11-27, `make run`, 1000 test images,
expected prediction over 4 noise draws, PGD-20 with EOT gradients):
  float from scratch, 2.3 min:          85.1% natural, 73.1% PGD-20 EOT
  4-bit fine-tuned from it, 1 min:      84.4% natural, 72.6% PGD-20 EOT
  ternary fine-tuned from it, 1 min:    81.7% natural, 64.8% PGD-20 EOT
  tfmot 8-bit QAT from it, 2.2 min:     84.9% natural, 72.9% PGD-20 EOT
The full pipeline figures are in README.md. The reference's 90.9% / 68.1%
(Madry-style PGD training, SPEC 6) needs longer runs, e.g.
--config.optim.epochs=30 --config.optim.milestones='(20,25)'
--config.data.max_train_examples=0 --config.adv.steps=10 --config.adv.eps_iter=0.02;
that has not been measured here.
"""

from brkeras import config as config_lib


def get_config(arg=None):
    c = config_lib.base_config()
    c.data.name = "fashion_mnist"
    c.data.augment = False
    c.data.max_train_examples = 30_000

    c.model.depth = 8
    c.model.width = 8

    c.adv.eps = 0.1
    c.adv.eps_iter = 0.04
    c.adv.steps = 3

    c.optim.epochs = 4
    c.optim.batch_size = 128
    c.optim.lr = 0.05
    c.optim.milestones = (3,)

    # Binary-Relax compressed to a short run: lam grows per step by rho per epoch
    # (to 10 after one epoch), exact Q(w) for the second half.
    c.quant.rho = 10.0
    c.quant.lam_per_step = True
    c.quant.phase2_fraction = 0.5

    c.eval.max_examples = 1000
    c.eval.eot_samples = 4
    c.eval.eot_attacks = ("pgd20",)
    c.eval.sweep_examples = 300
    c.eval.eps_sweep = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)

    c.export.representative_examples = 200
    c.export.parity_examples = 1000
    # Per-tensor int8 activations broke one ternary model here (accuracy 81% -> 40%):
    # such a file is dropped with its reason in export.json, the rest still ships.
    c.export.optional_formats = ("full_int8",)
    c.bench.runs = 200

    c.pipeline.finetune.from_model = "float,tradeoff"
    c.pipeline.finetune.epochs = 3
    c.pipeline.finetune.lr = 0.05
    c.pipeline.finetune.milestones = (2,)
    c.pipeline.finetune.max_train_examples = 20_000
    c.pipeline.finetune.phase2_fraction = 0.34
    return config_lib.apply_arg(c, arg)
