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
   labels >= 0) are read with `np.load` without pickle and validated.

The offline Fashion-MNIST route. The Debian package installs the four original IDX
files under /usr/share/datasets/fashion-mnist, but re-gzipped headers: the FNAME
field (original file name) is dropped and MTIME is reset, so the bytes differ from
the files tfds registers and tfds rejects them by checksum. The compressed data
stream is untouched, so restoring the 10-byte header + FNAME makes the files
byte-identical to the registered ones:

    FLG |= 0x08 (FNAME present); MTIME = 1504176606 (train files) or
    1504176627 (t10k files); XFL, OS unchanged (0, 3);
    then "train-images-idx3-ubyte" + NUL etc. before the deflate stream.

`restore_fashion_mnist` does that in memory, checks each result against the
sha256 that tfds registers for the file (`builder.url_infos`) and only then
writes it to `<data_dir>/downloads/manual/fashion_mnist/<url basename>` (never
into /usr/share). tfds' download manager looks for `manual_dir / <registered
file name>` before downloading, so `download_and_prepare` with that manual dir
builds `fashion_mnist` without network, and re-validates size and checksum itself
(`force_checksums_validation=True`). Nothing skips verification: a mismatch raises.
"""

import collections
import dataclasses
import hashlib
import os
import struct
import threading
import zipfile

import numpy as np

from brkeras._keras import tf

__all__ = [
    "DatasetInfo",
    "KNOWN",
    "FASHION_MNIST_DEBIAN_DIR",
    "info",
    "load",
    "load_arrays",
    "to_float",
    "augment_batch",
    "restore_fashion_mnist",
    "prepare_fashion_mnist_offline",
    "clear_cache",
]


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

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# Original gzip MTIME of the files on the Fashion-MNIST server (what tfds hashed).
FASHION_MNIST_MTIME = {"train": 1504176606, "t10k": 1504176627}
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_HOW_TO_GET_FASHION_MNIST = (
    "Install the Debian package with `apt-get install dataset-fashion-mnist` "
    f"(files under {FASHION_MNIST_DEBIAN_DIR}), or give tensorflow-datasets "
    "internet access, or pass the path of an .npz file with x_train/y_train/"
    "x_test/y_test instead."
)


# ---------------------------------------------------------------------------
# Name resolution and info


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

    For an .npz, image_shape comes from x_train, num_classes is
    max(max label + 1, len(class_names) if present), and augment is False (pass
    `augment=True` to `load` for CIFAR-like files).
    """
    _check_name(name)
    if name in KNOWN:
        return KNOWN[name]
    arrays = _npz_arrays(name)
    n = int(max(arrays["y_train"].max(initial=-1), arrays["y_test"].max(initial=-1))) + 1
    n = max(n, arrays.get("num_names", 0))
    return DatasetInfo(str(name), tuple(int(d) for d in arrays["x_train"].shape[1:]), n, False)


# ---------------------------------------------------------------------------
# Cache of decoded arrays (so repeated epochs and repeated `load` calls are cheap)

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


# ---------------------------------------------------------------------------
# .npz files


def _validate_npz(path, d):
    """Checks keys, dtypes and shapes; returns the four arrays (+ num_names)."""
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
            f"{out['x_test'].shape[1:]} differ in shape."
        )
    if "class_names" in d:
        out["num_names"] = int(np.asarray(d["class_names"]).shape[0])
    return out


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


# ---------------------------------------------------------------------------
# Offline Fashion-MNIST


def _tfds():
    import tensorflow_datasets as tfds  # heavy; only when a tfds data set is used

    return tfds


def _builder(name, data_dir):
    return _tfds().builder(name, data_dir=data_dir or None)


def _restore_gzip_header(raw, fname, mtime):
    """The original gzip bytes from a copy whose FNAME was dropped and MTIME reset.

    Header (RFC 1952): ID1 ID2 CM FLG | MTIME (4, little endian) | XFL OS [FNAME NUL].
    Map: FLG -> FLG | 0x08, MTIME -> mtime, insert fname + NUL after byte 10; the
    deflate stream and trailer are kept. A file that already has FNAME is returned as is.
    """
    if raw[:3] != b"\x1f\x8b\x08":
        raise ValueError(f"{fname}: not a gzip (deflate) file")
    flg = raw[3]
    if flg & 0x08:
        return raw
    if flg & ~0x08 & 0xFF:  # FTEXT/FHCRC/FEXTRA/FCOMMENT would change the layout
        raise ValueError(f"{fname}: unexpected gzip flags {flg:#04x}; cannot restore")
    return (raw[:3] + bytes([flg | 0x08]) + struct.pack("<I", mtime) + raw[8:10]
            + fname.encode("latin-1") + b"\0" + raw[10:])


def _registered_fashion_mnist(builder):
    """{file name: UrlInfo} that tfds registers for fashion_mnist."""
    infos = {os.path.basename(u): ui for u, ui in (builder.url_infos or {}).items()}
    missing = [f for f in FASHION_MNIST_FILES if f not in infos or not infos[f].checksum]
    if missing:
        raise RuntimeError(f"tensorflow-datasets registers no checksum for {missing}; "
                           "cannot verify the offline Fashion-MNIST files.")
    return infos


def _manual_dir(builder):
    # builder.data_dir = <root>/fashion_mnist/<version>
    root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
    return os.path.join(root, "downloads", "manual", "fashion_mnist")


def restore_fashion_mnist(manual_dir, source_dir=FASHION_MNIST_DEBIAN_DIR, registered=None):
    """Writes the four registered Fashion-MNIST .gz files into manual_dir.

    Reads the Debian copies from source_dir, restores the gzip header
    (`_restore_gzip_header`), and checks size and sha256 against `registered`
    ({file name: tfds UrlInfo}; default: what tfds registers for fashion_mnist)
    BEFORE writing anything. Files already present with the right checksum are kept.
    Raises FileNotFoundError (how to get the files) or ValueError (checksum mismatch).
    Returns {file name: path written}.
    """
    missing = [f for f in FASHION_MNIST_FILES
               if not os.path.isfile(os.path.join(source_dir, f))]
    if missing:
        raise FileNotFoundError(
            f"Offline Fashion-MNIST files {missing} not found in {source_dir}. "
            + _HOW_TO_GET_FASHION_MNIST)
    if registered is None:
        registered = _registered_fashion_mnist(_builder("fashion_mnist", ""))
    restored = {}
    for f in FASHION_MNIST_FILES:
        with open(os.path.join(source_dir, f), "rb") as fh:
            raw = fh.read()
        data = _restore_gzip_header(raw, f[: -len(".gz")], FASHION_MNIST_MTIME[f.split("-")[0]])
        want = registered[f]
        got = hashlib.sha256(data).hexdigest()
        if got != want.checksum or len(data) != want.size:
            raise ValueError(
                f"{os.path.join(source_dir, f)}: after restoring the gzip header the file "
                f"has sha256 {got} ({len(data)} bytes) but tensorflow-datasets registers "
                f"{want.checksum} ({want.size} bytes). The Debian package may have changed; "
                "not using it. " + _HOW_TO_GET_FASHION_MNIST)
        restored[f] = data
    os.makedirs(manual_dir, exist_ok=True)
    out = {}
    for f, data in restored.items():
        path = os.path.join(manual_dir, f)
        out[f] = path
        if os.path.isfile(path) and _sha256_file(path) == registered[f].checksum:
            continue
        tmp = path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)  # atomic: a partial file never has the final name
    return out


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_fashion_mnist_offline(data_dir="", source_dir=FASHION_MNIST_DEBIAN_DIR):
    """Builds tfds `fashion_mnist` in data_dir from the Debian IDX files, no network.

    Restores and verifies the files (`restore_fashion_mnist`) into
    `<data_dir>/downloads/manual/fashion_mnist`, then runs
    `download_and_prepare` with that manual_dir and forced checksum validation.
    Returns the prepared builder (already prepared: returned as is).
    """
    builder = _builder("fashion_mnist", data_dir)
    if builder.is_prepared():
        return builder
    manual_dir = _manual_dir(builder)
    restore_fashion_mnist(manual_dir, source_dir, _registered_fashion_mnist(builder))
    _download_and_prepare_manual(builder, manual_dir)
    return builder


def _download_and_prepare_manual(builder, manual_dir):
    tfds = _tfds()
    config = tfds.download.DownloadConfig(
        manual_dir=manual_dir,
        try_download_gcs=False,
        force_checksums_validation=True,  # never build from unverified bytes
    )
    builder.download_and_prepare(download_config=config)


# ---------------------------------------------------------------------------
# tfds data sets


def _ensure_prepared(name, data_dir):
    """A prepared tfds builder: reuse, offline Fashion-MNIST, or normal download."""
    builder = _builder(name, data_dir)
    if builder.is_prepared():
        return builder
    if name == "fashion_mnist" and all(
            os.path.isfile(os.path.join(FASHION_MNIST_DEBIAN_DIR, f))
            for f in FASHION_MNIST_FILES):
        return prepare_fashion_mnist_offline(data_dir, FASHION_MNIST_DEBIAN_DIR)
    try:
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - any failure gets the same advice
        how = (_HOW_TO_GET_FASHION_MNIST if name == "fashion_mnist" else
               "Give tensorflow-datasets internet access (it downloads the data once "
               "into data_dir), or pass the path of an .npz file with x_train/y_train/"
               "x_test/y_test (uint8 NHWC images, integer labels) instead.")
        raise RuntimeError(
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
            raise RuntimeError(f"{name} {sl}: the prepared data set is empty")
        x, y = np.concatenate(xs), np.concatenate(ys)
        if max_examples:
            x, y = x[:max_examples], y[:max_examples]
        shape = KNOWN[name].image_shape
        if x.shape[1:] != shape:
            raise RuntimeError(f"{name}: images have shape {x.shape[1:]}, expected {shape}")
        return _readonly(np.asarray(x, np.uint8)), _readonly(np.asarray(y, np.int32))

    return _cached(("tfds", name, split, int(max_examples), data_dir or ""), make)


# ---------------------------------------------------------------------------
# Public loaders


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

    ds = ds.map(fetch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
