"""A seconds-long run on real Fashion-MNIST data, for tests and a quick look.

Runs:
  brkeras train --config=configs/smoke.py:ternary,tradeoff --workdir=/tmp/smoke
Expect: 2 epochs of 4 steps on 256 Fashion-MNIST images with a depth-8, width-4
EnResNet; accuracies near chance (it checks the machinery, not the learning).
"""

from brkeras.run import config as config_lib


def get_config(arg=None):
    c = config_lib.base_config()
    c.data.name = "fashion_mnist"
    c.data.augment = False
    c.data.max_train_examples = 256
    c.data.max_test_examples = 64

    c.model.depth = 8
    c.model.width = 4

    c.adv.eps = 0.1
    c.adv.eps_iter = 0.05
    c.adv.steps = 2

    c.optim.epochs = 2
    c.optim.batch_size = 64
    c.optim.lr = 0.05
    c.optim.milestones = (1,)
    c.optim.bn_reestimate_batches = 2

    c.quant.phase2_fraction = 0.5
    # For the token "sparse": strong enough to reach the target share (half the block channels) in one step.
    c.sparsity.strength = 100.0
    c.sparsity.target_share = 0.5

    c.eval.max_examples = 64
    c.eval.batch_size = 64
    c.eval.eot_samples = 2
    c.eval.eps_sweep = (0.0, 0.1, 0.3)
    # without APGD, which would double the evaluation (tests/test_worst_case.py runs it)
    c.eval.attacks = ("fgsm", "ifgsm20", "pgd20", "cw")
    c.eval.square_examples = 32  # evaluate_tflite: seconds
    c.eval.square_queries = 50
    c.export.representative_examples = 16
    c.export.parity_examples = 64
    # An untrained model's logits are near ties, so full-int8 rounding flips a few
    # top-1s; the 99.5% bar is for trained models (the default config).
    c.export.min_agreement = 0.9
    c.bench.runs = 5
    c.bench.threads = (1,)
    return config_lib.apply_arg(c, arg)
