"""Data: tensorflow-datasets, offline Fashion-MNIST and .npz files as tf.data pipelines.

`load(name, split, batch_size=...)` gives batches (x float32 [0, 1] NHWC, y int32);
`load_arrays(name, split)` the raw arrays; `info(name)` shape and class count.
"""

from brkeras.data.fashion_mnist_offline import (FASHION_MNIST_DEBIAN_DIR,
                                                prepare_fashion_mnist_offline,
                                                restore_fashion_mnist)
from brkeras.data.pipeline import augment_batch, load, to_float
from brkeras.data.sources import KNOWN, DatasetInfo, clear_cache, info, load_arrays

__all__ = ["DatasetInfo", "KNOWN", "FASHION_MNIST_DEBIAN_DIR", "info", "load", "load_arrays",
           "to_float", "augment_batch", "restore_fashion_mnist", "prepare_fashion_mnist_offline",
           "clear_cache"]
