"""The one place where brkeras chooses its Keras.

tensorflow-model-optimization (tfmot) quantizes only tf_keras (Keras 2) models:
a Keras 3 model fails in `quantize_apply`. Importing tfmot sets
TF_USE_LEGACY_KERAS=1 as a side effect, which silently switches `tf.keras` under
any code that already uses it. So brkeras decides explicitly, first: set the
variable before TensorFlow is imported, and import `tf_keras` by name. Every
brkeras module gets Keras from here (`from brkeras._keras import keras, tf`);
none imports `keras` or uses `tf.keras` directly.
"""

import os
import sys

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    # TensorFlow was imported first; tf.keras may already be Keras 3 for the
    # caller, but brkeras itself still uses tf_keras by name below.
    import warnings

    warnings.warn(
            "TensorFlow was imported before brkeras without TF_USE_LEGACY_KERAS=1; "
            "brkeras uses tf_keras explicitly, but `tf.keras` in your own code may "
            "be Keras 3, whose models tfmot cannot quantize. Import brkeras first "
            "or set TF_USE_LEGACY_KERAS=1.",
            stacklevel=2,
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["tf", "keras"]
