"""tf.data pipelines of float32 [0, 1] image batches, with CIFAR-style augmentation."""

import numpy as np

from brkeras.data.sources import _check_name, _check_split, info, load_arrays
from brkeras._keras import tf


def to_float(x):
    """uint8 images -> float32 in [0, 1]: x / 255."""
    return tf.cast(x, tf.float32) / 255.0


def augment_batch(x, seed, pad=4):
    """CIFAR-style augmentation of a batch (B, H, W, C), stateless given seed (shape [2]).

    Per example: zero-pad `pad` pixels on each side, take the H x W window at
    offsets (dy, dx) uniform in {0, ..., 2 pad}, then flip left-right with
    probability 1/2. Values stay in the input range (zero padding included).
    """
    seed = tf.cast(seed, tf.int64)
    b, h, w = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    xp = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    off = tf.random.stateless_uniform([b, 2], seed=seed, minval=0, maxval=2 * pad + 1,
                                      dtype=tf.int32)
    rows = off[:, :1] + tf.range(h)[None, :]  # (B, H)
    cols = off[:, 1:] + tf.range(w)[None, :]  # (B, W)
    xc = tf.gather(xp, rows, axis=1, batch_dims=1)  # (B, H, W + 2 pad, C)
    xc = tf.gather(xc, cols, axis=2, batch_dims=1)  # (B, H, W, C)
    flip = tf.random.stateless_uniform([b], seed=seed + [0, 1]) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(xc, axis=[2]), xc)


# A batch is one gather (plus an augmentation): two in flight keep any training
# step fed, so tf.data's autotuner has nothing to tune. It is off because its
# model thread made each iterator's destructor wait: the end of every `fit` epoch
# stalled for up to 20 s (py-spy: ~IteratorResource -> RootDataset::Iterator
# waiting on its thread; 2026-12-07, about 120 s of a 1545 s `make run`).
_PARALLEL_BATCHES = 2


def _options():
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def load(name, split, *, batch_size, augment=None, shuffle=None, max_examples=0,
         data_dir="", seed=0, repeat=False, drop_remainder=False):
    """A tf.data pipeline of batches (x float32 [0, 1] NHWC, y int32).

    name: a KNOWN tfds name or an .npz path. split: "train" or "test".
    augment: CIFAR-style (pad-4 random crop + horizontal flip); None = the data
      set's default (`info(name).augment`) on the train split, off on test.
    shuffle: None = on for train, off for test; reshuffled every epoch, seeded.
    max_examples: keep the first N examples (0 = all). repeat: repeat forever.
    The decoded uint8 arrays live in memory (cached across calls); batches are
    gathered from them by index, so an epoch costs no decoding.
    """
    _check_name(name)
    _check_split(split)
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r}; use an int >= 1")
    x, y = load_arrays(name, split, max_examples=max_examples, data_dir=data_dir)
    if len(x) == 0:
        raise ValueError(f"{name} {split}: no examples")
    if augment is None:
        augment = info(name).augment and split == "train"
    if shuffle is None:
        shuffle = split == "train"

    x_t, y_t = tf.constant(x), tf.constant(y)
    n = int(len(x))
    ds = tf.data.Dataset.range(n)
    if shuffle:  # shuffling indices: a full-size buffer costs 8 bytes per example
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    if augment:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, seeds))

        def fetch(idx, s):
            pair = tf.stack([s, tf.constant(0, tf.int64)])  # stateless seed, new per batch
            return augment_batch(to_float(tf.gather(x_t, idx)), pair), tf.gather(y_t, idx)
    else:
        def fetch(idx):
            return to_float(tf.gather(x_t, idx)), tf.gather(y_t, idx)

    ds = ds.map(fetch, num_parallel_calls=_PARALLEL_BATCHES, deterministic=True)
    return ds.prefetch(_PARALLEL_BATCHES).with_options(_options())
