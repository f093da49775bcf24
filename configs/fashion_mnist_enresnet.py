"""Fashion-MNIST EnResNet at CPU scale (the default of `make run`).

Runs:
  brkeras train --config=configs/fashion_mnist_enresnet.py:ternary,tradeoff --workdir=runs/fm_t
ARG: comma-separated tokens: a precision (float, binary, ternary, ternary_twn,
4bit, kbit, int8_qat), a loss (natural, pgd, tradeoff, trades), enM, dN, wN.
Default: float, tradeoff.

Setting (SPEC 2, Madry-style Fashion-MNIST): L-inf eps 0.1, PGD steps of 0.02,
En1ResNet8 of width 16 with Feynman-Kac noise sigma 0.1, SGD-Nesterov.
Cost and result here (2 CPU cores): see the measured figures in README.md.
"""

from brkeras import config as config_lib


def get_config(arg=None):
    c = config_lib.base_config()
    c.data.name = "fashion_mnist"
    c.data.augment = False
    c.data.max_train_examples = 20_000
    c.data.max_test_examples = 1000

    c.model.depth = 8
    c.model.width = 16

    c.adv.eps = 0.1
    c.adv.eps_iter = 0.02
    c.adv.steps = 7

    c.optim.epochs = 6
    c.optim.batch_size = 128
    c.optim.lr = 0.05
    c.optim.milestones = (4, 5)

    # Binary-Relax schedule compressed to a short run: relaxed for 4 epochs,
    # lam growing fast, exact Q(w) for the last 2.
    c.quant.rho = 1.5
    c.quant.phase2_fraction = 4 / 6

    c.eval.max_examples = 1000
    c.eval.eps_sweep = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3)
    return config_lib.apply_arg(c, arg)
