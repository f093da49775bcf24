"""brkeras: robust and efficient EnResNets in TensorFlow/Keras, shipped as TFLite.

Implements Li, Wang and Xin, "An Integrated Approach to Produce Robust Deep
Neural Network Models with High Efficiency": Feynman-Kac noisy ensembles of
pre-activation ResNets (EnResNet), PGD adversarial training, Binary-Relax weight
quantization and the paper's trade-off loss.

The public API takes models, arrays and keyword arguments (never a config or a
work dir, except `load`):

    import brkeras
    from brkeras import keras          # the tf_keras that tfmot needs

    net = brkeras.build_model((28, 28, 1), 10, depth=8, width=8, sigma=0.1)
    qnet = brkeras.quantize_model(net, precision="ternary", per_channel=True)
    trainer = brkeras.AdversarialModel(qnet, loss="tradeoff", eps=0.1, eps_iter=0.04, steps=3)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True))
    trainer.fit(x, y, epochs=2, callbacks=[brkeras.BinaryRelaxSchedule(rho=10.0, phase2_epoch=1)])
    result = brkeras.evaluate_model(qnet, x_test, y_test, eps=0.1)
    files = brkeras.export_tflite(qnet, "out/", representative_data=x[:32],
                                  parity_data=(x_test, y_test))

Names are imported lazily, so `import brkeras` (and the command line's --help)
does not import TensorFlow until a name needs it.
"""

import importlib
import os
import platform
import sys

if "tensorflow" not in sys.modules:  # brkeras._keras explains why, and warns otherwise
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    if platform.machine().lower() in ("x86_64", "amd64"):
        # TensorFlow (Linux) turns its oneDNN kernels on by default only on x86 CPUs
        # with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX. On an AVX2-only CPU they
        # make brkeras's training step 2.6x and its attacks 1.6-1.9x faster (README,
        # "oneDNN on CPUs without AVX-512"), so brkeras asks for them; a user's own
        # setting (0) wins.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "keras": ("brkeras._keras", "keras"),
    "tf": ("brkeras._keras", "tf"),
    "build_model": ("brkeras.nn.models", "build_model"),
    "FeynmanKacNoise": ("brkeras.nn.layers", "FeynmanKacNoise"),
    "quantize_model": ("brkeras.quant.binary_relax", "quantize_model"),
    "custom_object_scope": ("brkeras.quant.binary_relax", "custom_object_scope"),
    "BinaryRelaxSchedule": ("brkeras.quant.schedule", "BinaryRelaxSchedule"),
    "AdversarialModel": ("brkeras.train.adversarial_model", "AdversarialModel"),
    "evaluate_model": ("brkeras.robust.evaluation", "evaluate_model"),
    "export_tflite": ("brkeras.deploy.export", "export_tflite"),
    "load": ("brkeras.run.train", "load"),
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'brkeras' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
