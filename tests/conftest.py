"""Shared fixtures: keep TensorFlow quiet and small on a 2-core machine."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The tests assert values of seeded runs, so they need kernels that give the same
# numbers every run. TensorFlow's Eigen kernels do; its oneDNN kernels, which brkeras
# turns on for users (brkeras/__init__.py), did not on an AVX2 EPYC: one seeded
# 2-epoch training reached 0.525-0.625 natural accuracy over six processes, and
# Eigen 0.65 every time (README, "oneDNN on CPUs without AVX-512"). A user's own
# TF_ENABLE_ONEDNN_OPTS=1 still wins (`TF_ENABLE_ONEDNN_OPTS=1 make test`).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import brkeras  # noqa: E402,F401  (chooses tf_keras before TensorFlow is imported)

import pytest  # noqa: E402


@pytest.fixture
def train_killed_after_first_epoch(monkeypatch):
    """run(config, workdir): `train` killed (KeyboardInterrupt) right after epoch 1 is
    recorded, as Ctrl-C or a kill between epochs would leave the work dir."""
    from brkeras.run import train as train_lib

    def run(config, workdir):
        original = train_lib.EpochLogger.on_epoch_end

        def killed(self, epoch, logs=None):
            original(self, epoch, logs)
            if epoch == 0:
                raise KeyboardInterrupt("killed")

        monkeypatch.setattr(train_lib.EpochLogger, "on_epoch_end", killed)
        try:
            with pytest.raises(KeyboardInterrupt):
                train_lib.train(config, workdir, verbose=0)
        finally:
            monkeypatch.setattr(train_lib.EpochLogger, "on_epoch_end", original)

    return run


@pytest.fixture(scope="session")
def blobs_mlp():
    """A 64-64-10 ReLU MLP trained ~1 s on 10 Gaussian blobs in [0, 1]^(8x8), with 200
    test images: (Keras model, x [200, 8, 8, 1] float32, y [200] int32). A model that
    attacks can break, small enough for any test."""
    import numpy as np
    from brkeras._keras import keras

    def sample(rng, n, mu):
        y = rng.integers(0, 10, n)
        x = (mu[y] + 0.2 * rng.standard_normal((n, 64))).clip(0, 1)
        return x.reshape(n, 8, 8, 1).astype(np.float32), y.astype(np.int32)

    rng = np.random.default_rng(0)
    mu = rng.uniform(0.3, 0.7, (10, 64))
    xtr, ytr = sample(rng, 2000, mu)
    xte, yte = sample(rng, 200, mu)
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.layers.Flatten(input_shape=(8, 8, 1)),
                          keras.layers.Dense(64, activation="relu"),
                          keras.layers.Dense(10)])
    m.compile(keras.optimizers.Adam(1e-2),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m.fit(xtr, ytr, epochs=5, batch_size=100, verbose=0)
    return m, xte, yte
