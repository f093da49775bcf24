"""tf.data pipelines for brkeras: tensorflow-datasets, offline Fashion-MNIST, .npz.

One entry point, `load(name, split, batch_size=...)`, returns a batched, prefetched
`tf.data.Dataset` of `(x, y)`: x float32 in [0, 1], NHWC (no mean/std
normalisation, attacks work in the [0, 1] box), y int32 labels. `name` is one of
`KNOWN` (tensorflow-datasets names) or a path to an `.npz` file. `info(name)`
gives image shape, class count and whether CIFAR-style augmentation is the
default; `load_arrays(name, split)` gives the raw numpy arrays (x uint8, y int32).

Where the data comes from, in this order:
1. The tfds data set is already prepared in `data_dir`: it is just read.
2. `fashion_mnist` with the Debian package `dataset-fashion-mnist` installed:
   prepared offline (below).
3. Otherwise the normal tfds download; if that fails the error says how to get
   the data.
4. `.npz` files (keys x_train, y_train, x_test, y_test; x uint8 NHWC, y integer
   labels 0..K-1; optional class_names) are read with `np.load` without pickle
   and validated.

Validation across splits: every split's images have the same shape and
channels, and its labels are integers in [0, num_classes), num_classes being the
data set's (tfds) or, for an .npz, len(class_names) if given, else the number of
distinct labels over all splits (so train labels 50-59 with test labels 0-9 are
an error, not 60 classes).
"""

import collections
import contextlib
import dataclasses
import fcntl
import os
import threading
import zipfile

import numpy as np

from brkeras.data import fashion_mnist_offline as fmnist
from brkeras.errors import DataError
from brkeras.data.fashion_mnist_offline import _builder, _tfds


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and the pipeline need to know about a data set."""

    name: str
    image_shape: tuple  # (H, W, C)
    num_classes: int
    augment: bool  # CIFAR-style augmentation is the default for training


KNOWN = {
    "fashion_mnist": DatasetInfo("fashion_mnist", (28, 28, 1), 10, False),
    "mnist": DatasetInfo("mnist", (28, 28, 1), 10, False),
    "cifar10": DatasetInfo("cifar10", (32, 32, 3), 10, True),
    "cifar100": DatasetInfo("cifar100", (32, 32, 3), 100, True),
    "svhn_cropped": DatasetInfo("svhn_cropped", (32, 32, 3), 10, False),
}


SPLITS = ("train", "test")


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _is_npz(name):
    return str(name).endswith(".npz") or os.path.isfile(str(name))


def _check_name(name):
    """Raises ValueError unless name is a KNOWN tfds name or an existing .npz file."""
    name = str(name)
    if name in KNOWN:
        return
    if _is_npz(name) and os.path.isfile(name):
        return
    what = "no such file" if name.endswith(".npz") else "not a known data set"
    raise ValueError(
        f"Unknown data set {name!r} ({what}). Use one of {sorted(KNOWN)} "
        "(tensorflow-datasets) or the path of an existing .npz file with keys "
        f"{', '.join(NPZ_KEYS)}."
    )


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {SPLITS}")


def info(name):
    """DatasetInfo(name, image_shape, num_classes, augment) for a KNOWN name or an .npz.

    For an .npz, image_shape comes from x_train, num_classes is len(class_names)
    if present, else the number of distinct labels over both splits (the labels
    are checked to be 0..num_classes-1), and augment is False (pass
    `augment=True` to `load` for CIFAR-like files).
    """
    _check_name(name)
    if name in KNOWN:
        return KNOWN[name]
    arrays = _npz_arrays(name)
    return DatasetInfo(str(name), tuple(int(d) for d in arrays["x_train"].shape[1:]),
                       arrays["num_classes"], False)


_CACHE = collections.OrderedDict()


_CACHE_SIZE = 6


_CACHE_LOCK = threading.Lock()


def _cached(key, make):
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    value = make()
    with _CACHE_LOCK:
        _CACHE[key] = value
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return value


def clear_cache():
    """Drops the decoded arrays kept in memory."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _readonly(a):
    # Arrays are shared through the cache: callers must not mutate them.
    a.flags.writeable = False
    return a


def _validate_npz(path, d):
    """Checks keys, dtypes, shapes and labels; returns the four arrays + num_classes."""
    missing = [k for k in NPZ_KEYS if k not in d]
    if missing:
        raise ValueError(
            f"{path}: missing key(s) {missing}; an .npz data set needs {list(NPZ_KEYS)} "
            f"(found {sorted(d)})."
        )
    out = {}
    for split in SPLITS:
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(
                f"{path}: x_{split} must be uint8 with 4 dims (N, H, W, C); got "
                f"dtype {x.dtype}, shape {x.shape}. Convert with "
                "np.asarray(x * 255, np.uint8) and add a channel axis for grey images."
            )
        if x.shape[-1] not in (1, 3):
            raise ValueError(
                f"{path}: x_{split} has shape {x.shape}; the last axis must be the "
                "channels (1 or 3), NHWC."
            )
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{path}: y_{split} must be 1-D integer labels; got dtype {y.dtype}, "
                f"shape {y.shape} (one-hot labels: use y.argmax(-1))."
            )
        if len(y) != len(x):
            raise ValueError(
                f"{path}: y_{split} has {len(y)} labels but x_{split} has {len(x)} images."
            )
        if len(y) and y.min() < 0:
            raise ValueError(f"{path}: y_{split} has negative labels (min {y.min()}); "
                             "labels must be >= 0.")
        out[f"x_{split}"] = _readonly(x)
        out[f"y_{split}"] = _readonly(y.astype(np.int32))
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise ValueError(
            f"{path}: x_train images {out['x_train'].shape[1:]} and x_test images "
            f"{out['x_test'].shape[1:]} differ in shape; every split needs the same "
            "(height, width, channels)."
        )
    labels = np.union1d(out["y_train"], out["y_test"])
    if "class_names" in d:
        n = int(np.asarray(d["class_names"]).shape[0])
        source = f"len(class_names) = {n}"
    else:
        n = int(len(labels))
        source = f"the {n} distinct labels of y_train and y_test"
    for split in SPLITS:
        _check_labels(f"{path}: y_{split}", out[f"y_{split}"], n, source,
                      "relabel to 0..K-1, e.g. np.unique(np.concatenate([y_train, y_test]), "
                      "return_inverse=True), or add class_names (one per class)")
    out["num_classes"] = n
    return out


def _check_labels(what, y, num_classes, source, fix):
    """Raises ValueError unless every label is in [0, num_classes)."""
    if not len(y):
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = np.unique(y[(y < 0) | (y >= num_classes)])
        shown = ", ".join(str(int(v)) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(
            f"{what} has labels outside [0, {num_classes}) ({shown}; min {lo}, max {hi}); "
            f"num_classes = {num_classes} from {source}. Labels must be 0..{num_classes - 1}: "
            f"{fix}.")


def _npz_arrays(path):
    path = os.path.abspath(str(path))
    st = os.stat(path)

    def make():
        if not zipfile.is_zipfile(path):  # else np.load would try (and refuse) pickle
            raise ValueError(f"{path}: not a readable .npz file (not a zip archive); "
                             "write it with np.savez / np.savez_compressed.")
        try:
            with np.load(path, allow_pickle=False) as f:
                d = {k: f[k] for k in f.files}
        except ValueError as e:  # object arrays need pickle, which we refuse
            raise ValueError(f"{path}: cannot read without pickle ({e}); store plain "
                             "numeric arrays (uint8 images, integer labels).") from e
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e}).") from e
        return _validate_npz(path, d)

    return _cached(("npz", path, st.st_mtime_ns, st.st_size), make)


@contextlib.contextmanager
def _preparing(builder):
    """Holds an OS lock (fcntl.flock) on the tfds data dir's root while `builder`'s data
    set is prepared, so two processes (the pipeline's workers) never build it at
    once; the second one waits and then finds it prepared. Where the file system
    has no flock, it runs unlocked."""
    root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
    os.makedirs(root, exist_ok=True)
    fd = os.open(os.path.join(root, f".brkeras-prepare-{builder.name}.lock"),
                 os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _ensure_prepared(name, data_dir):
    """A prepared tfds builder: reuse, offline Fashion-MNIST, or normal download."""
    builder = _builder(name, data_dir)
    if builder.is_prepared():
        return builder
    with _preparing(builder):
        builder = _builder(name, data_dir)  # another process may have prepared it meanwhile
        if builder.is_prepared():
            return builder
        return _prepare(builder, name, data_dir)


def _prepare(builder, name, data_dir):
    if name == "fashion_mnist" and all(
            os.path.isfile(os.path.join(fmnist.FASHION_MNIST_DEBIAN_DIR, f))
            for f in fmnist.FASHION_MNIST_FILES):
        return fmnist.prepare_fashion_mnist_offline(data_dir, fmnist.FASHION_MNIST_DEBIAN_DIR)
    try:
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - any failure gets the same advice
        how = (fmnist._HOW_TO_GET_FASHION_MNIST if name == "fashion_mnist" else
               "Give tensorflow-datasets internet access (it downloads the data once "
               "into data_dir), or pass the path of an .npz file with x_train/y_train/"
               "x_test/y_test (uint8 NHWC images, integer labels) instead.")
        raise DataError(
            f"Could not download and prepare tfds data set {name!r} into "
            f"{os.fspath(builder.data_dir)}: {type(e).__name__}: {e}. {how}") from e
    return builder


def _tfds_arrays(name, split, max_examples, data_dir):
    def make():
        tfds = _tfds()
        builder = _ensure_prepared(name, data_dir)
        sl = f"{split}[:{max_examples}]" if max_examples else split
        # Batches of 4096 rather than batch_size=-1: that one needs the split size
        # from metadata (unknown under tfds.testing.mock_data).
        ds = builder.as_dataset(split=sl, as_supervised=True).batch(4096)
        xs, ys = [], []
        for xb, yb in tfds.as_numpy(ds):
            xs.append(xb)
            ys.append(yb)
        if not xs:
            raise DataError(f"{name} {sl}: the prepared data set is empty")
        x, y = np.concatenate(xs), np.concatenate(ys)
        if max_examples:
            x, y = x[:max_examples], y[:max_examples]
        shape = KNOWN[name].image_shape
        if x.shape[1:] != shape:
            raise DataError(f"{name}: images have shape {x.shape[1:]}, expected {shape}")
        n = KNOWN[name].num_classes
        _check_labels(f"{name} {sl}", y, n, f"the data set's info ({name} has {n} classes)",
                      f"the prepared copy in {os.fspath(builder.data_dir)} is not {name}; "
                      "delete it and prepare it again")
        return _readonly(np.asarray(x, np.uint8)), _readonly(np.asarray(y, np.int32))

    return _cached(("tfds", name, split, int(max_examples), data_dir or ""), make)


def load_arrays(name, split, max_examples=0, data_dir=""):
    """(x uint8 (N, H, W, C), y int32 (N,)) of a split; the first max_examples if > 0.

    The arrays are cached and read-only (copy before modifying).
    """
    _check_name(name)
    _check_split(split)
    if not (isinstance(max_examples, (int, np.integer)) and max_examples >= 0):
        raise ValueError(f"max_examples={max_examples!r}; use an int >= 0 (0 = all)")
    if name in KNOWN:
        return _tfds_arrays(name, split, int(max_examples), data_dir)
    a = _npz_arrays(name)
    x, y = a[f"x_{split}"], a[f"y_{split}"]
    if max_examples:
        x, y = x[:max_examples], y[:max_examples]
    return x, y
