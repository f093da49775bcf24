"""CIFAR-10 EnResNet at paper scale: run on a GPU machine, not here.

Runs:
  brkeras train --config=configs/cifar10_enresnet.py:4bit,tradeoff,en2,d20 --workdir=runs/c10
ARG: comma-separated tokens: a precision (float, binary, ternary, ternary_twn,
4bit, kbit, int8_qat), a loss (pgd, tradeoff, trades, natural), enM (ensemble
size), dN (depth 6n+2). Default: float, tradeoff, En1ResNet20.

The SPEC defaults of the public reference code: ResNet20 (16/32/64), Feynman-Kac
sigma 0.1, PGD eps 8/255, step 2/255, 10 steps, random start; SGD lr 0.1,
Nesterov momentum 0.9, weight decay 5e-4, batch 128, lr / 10 at epochs 80, 120,
160 of 200; pad-4 crop + flip; Binary-Relax lam0 1, rho 1.05 per epoch, exact
Q(w) from epoch 120; trade-off a = 8.
Expected (reference anchors, SPEC 6): Madry PGD training of a ResNet about 87%
natural / 47% PGD-20 (WideResNet); EnResNet headline 85.6% / 57.9% IFGSM-20;
4-bit trade-off En1ResNet56 channel sparsity about 33%. Cost: about 2 s per
PGD-10 step of ResNet20 at batch 128 on 2 CPU cores, i.e. days here: use a GPU.
Offline here, `--config.data.name=/path/cifar10_small.npz` runs on an .npz proxy.
"""

from brkeras.run import config as config_lib


def get_config(arg=None):
    c = config_lib.base_config()  # the paper-scale defaults live there
    c.data.name = "cifar10"
    c.data.augment = True
    return config_lib.apply_arg(c, arg)
