"""brkeras: robust and efficient EnResNets in TensorFlow/Keras, shipped as TFLite.

Implements Li, Wang and Xin, "An Integrated Approach to Produce Robust Deep
Neural Network Models with High Efficiency": Feynman-Kac noisy ensembles of
pre-activation ResNets (EnResNet), PGD adversarial training, Binary-Relax weight
quantization and the paper's trade-off loss.
"""

from brkeras import _keras  # noqa: F401  (chooses tf_keras before anything else)

__version__ = "0.1.0"


def load(workdir):
    """Returns the trained model of `workdir`, ready for evaluation (weights Q(w))."""
    from brkeras import training  # pylint: disable=g-import-not-at-top

    return training.load(workdir)
