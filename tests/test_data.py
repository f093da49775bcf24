"""Tests for brkeras.data: tfds (mocked), offline Fashion-MNIST, .npz files."""

import gzip
import hashlib
import os

import numpy as np
import pytest

from brkeras import data
from brkeras.data import fashion_mnist_offline as fmnist
from brkeras.run import config as config_lib
from brkeras.run import train as train_lib
from brkeras._keras import tf

import tensorflow_datasets as tfds  # noqa: E402  (after brkeras._keras)

DEBIAN = data.FASHION_MNIST_DEBIAN_DIR
HAVE_DEBIAN = all(os.path.isfile(os.path.join(DEBIAN, f)) for f in fmnist.FASHION_MNIST_FILES)
CIFAR_SMALL = "/work/shared/data/cifar10_small.npz"


def _collect(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return xs, ys


def _registered_tsv():
    """{file name: (size, sha256)} read straight from tfds' fashion_mnist checksums file."""
    path = os.path.join(os.path.dirname(tfds.__file__), "url_checksums", "fashion_mnist.txt")
    out = {}
    with open(path) as fh:
        for line in fh:
            url, size, sha, fname = line.rstrip("\n").split("\t")
            out[fname] = (int(size), sha)
    return out


def _sha256(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _aug_reference_matches(src, out, pad=4):
    """True iff every out[i] is some zero-padded crop of src[i], flipped or not."""
    b, h, w, _ = src.shape
    padded = np.pad(src, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    for i in range(b):
        cands = [padded[i, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1)
                 for dx in range(2 * pad + 1)]
        cands += [c[:, ::-1] for c in cands]
        if not any(np.array_equal(out[i], c) for c in cands):
            return False
    return True


# ---------------------------------------------------------------------------
# info, names


def test_info_known():
    assert data.info("fashion_mnist") == data.DatasetInfo("fashion_mnist", (28, 28, 1), 10, False)
    assert data.info("mnist").image_shape == (28, 28, 1)
    assert data.info("cifar10") == data.DatasetInfo("cifar10", (32, 32, 3), 10, True)
    assert data.info("cifar100").num_classes == 100 and data.info("cifar100").augment
    assert data.info("svhn_cropped") == data.DatasetInfo("svhn_cropped", (32, 32, 3), 10, False)


@pytest.mark.parametrize("name", ["imagenet2012", "cifar11", "/nonexistent/dir/file.npz"])
def test_unknown_name_lists_known_and_writes_nothing(name, tmp_path):
    for fn in (lambda: data.info(name),
               lambda: data.load(name, "train", batch_size=4, data_dir=str(tmp_path)),
               lambda: data.load_arrays(name, "test", data_dir=str(tmp_path))):
        with pytest.raises(ValueError) as e:
            fn()
        for known in data.KNOWN:
            assert known in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_split_and_batch(tmp_path):
    path = _write_npz(tmp_path / "d.npz")
    with pytest.raises(ValueError, match="split"):
        data.load(str(path), "validation", batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        data.load(str(path), "train", batch_size=0)
    with pytest.raises(ValueError, match="max_examples"):
        data.load_arrays(str(path), "train", max_examples=-1)


# ---------------------------------------------------------------------------
# augmentation


def test_augment_batch_is_crop_and_flip():
    rng = np.random.default_rng(0)
    src = rng.uniform(0.01, 1.0, size=(16, 8, 8, 3)).astype(np.float32)  # no exact zeros
    out = data.augment_batch(tf.constant(src), tf.constant([3, 4], tf.int64)).numpy()
    assert out.shape == src.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert _aug_reference_matches(src, out)
    # Not a no-op, and the offsets differ between examples.
    assert not np.array_equal(out, src)
    zero_rows = [(out[i] == 0).all(axis=(1, 2)).sum() for i in range(16)]
    assert len(set(zero_rows)) > 1
    # Stateless: same seed, same result; another seed, another result.
    again = data.augment_batch(tf.constant(src), tf.constant([3, 4], tf.int64)).numpy()
    other = data.augment_batch(tf.constant(src), tf.constant([5, 4], tf.int64)).numpy()
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other)


def test_to_float_maps_uint8_to_unit_interval():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    y = data.to_float(x).numpy()
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x / 255.0, rtol=0, atol=1e-7)
    assert y.min() == 0.0 and y.max() == 1.0


# ---------------------------------------------------------------------------
# tfds, mocked (offline)


@pytest.fixture
def mock_tfds():
    data.clear_cache()
    with tfds.testing.mock_data(num_examples=10):
        yield
    data.clear_cache()


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "svhn_cropped"])
def test_mock_pipeline_shapes_values(mock_tfds, name):
    inf = data.info(name)
    x_np, y_np = data.load_arrays(name, "train")
    assert x_np.shape == (10, *inf.image_shape) and x_np.dtype == np.uint8
    assert y_np.dtype == np.int32 and 0 <= y_np.min() and y_np.max() < inf.num_classes
    ds = data.load(name, "train", batch_size=4, shuffle=False, augment=False)
    xs, ys = _collect(ds)
    assert [x.shape for x in xs] == [(4, *inf.image_shape), (4, *inf.image_shape),
                                     (2, *inf.image_shape)]
    assert all(x.dtype == np.float32 for x in xs) and all(y.dtype == np.int32 for y in ys)
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)
    np.testing.assert_allclose(x_all, x_np / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(y_all, y_np)
    assert 0.0 <= x_all.min() and x_all.max() <= 1.0
    # drop_remainder: only full batches.
    xs, _ = _collect(data.load(name, "test", batch_size=4, drop_remainder=True))
    assert [x.shape[0] for x in xs] == [4, 4]


def test_mock_max_examples_and_augment(mock_tfds):
    x_np, y_np = data.load_arrays("cifar10", "train", max_examples=6)
    assert x_np.shape == (6, 32, 32, 3) and y_np.shape == (6,)
    ds = data.load("cifar10", "train", batch_size=4, max_examples=6, shuffle=False)
    xs, ys = _collect(ds)  # augment defaults to True for cifar10 train
    assert [x.shape for x in xs] == [(4, 32, 32, 3), (2, 32, 32, 3)]
    x_all = np.concatenate(xs)
    assert 0.0 <= x_all.min() and x_all.max() <= 1.0
    assert _aug_reference_matches(x_np / np.float32(255.0), x_all)
    assert not np.allclose(x_all, x_np / 255.0)
    np.testing.assert_array_equal(np.concatenate(ys), y_np)
    # Test split: no augmentation, no shuffle by default.
    xs, _ = _collect(data.load("cifar10", "test", batch_size=5, max_examples=5))
    x_t, _ = data.load_arrays("cifar10", "test", max_examples=5)
    np.testing.assert_allclose(xs[0], x_t / 255.0, rtol=0, atol=1e-7)


def test_download_failure_says_how_to_get_data(tmp_path, monkeypatch):
    def fail(self, *a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    with pytest.raises(RuntimeError, match="internet access") as e:
        data.load_arrays("mnist", "train", data_dir=str(tmp_path))
    assert ".npz" in str(e.value)
    # Fashion-MNIST without the Debian files: points to the package.
    monkeypatch.setattr(fmnist, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "absent"))
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
        data.load_arrays("fashion_mnist", "train", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------
# .npz files


def _write_npz(path, n_train=20, n_test=8, shape=(6, 6, 3), classes=5, seed=0, **override):
    rng = np.random.default_rng(seed)
    arrays = dict(
        x_train=rng.integers(0, 256, size=(n_train, *shape), dtype=np.uint8),
        y_train=rng.integers(0, classes, size=n_train).astype(np.int64),
        x_test=rng.integers(0, 256, size=(n_test, *shape), dtype=np.uint8),
        y_test=rng.integers(0, classes, size=n_test).astype(np.uint8),
    )
    arrays["y_train"][0] = classes - 1  # fix the class count
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_npz_load(tmp_path):
    path = str(_write_npz(tmp_path / "d.npz"))
    ref = np.load(path)
    assert data.info(path) == data.DatasetInfo(path, (6, 6, 3), 5, False)
    x, y = data.load_arrays(path, "train")
    np.testing.assert_array_equal(x, ref["x_train"])
    np.testing.assert_array_equal(y, ref["y_train"])
    assert x.dtype == np.uint8 and y.dtype == np.int32
    assert not x.flags.writeable  # shared through the cache
    assert data.load_arrays(path, "train")[0] is x  # cached
    x3, y3 = data.load_arrays(path, "test", max_examples=3)
    np.testing.assert_array_equal(x3, ref["x_test"][:3])
    np.testing.assert_array_equal(y3, ref["y_test"][:3])

    xs, ys = _collect(data.load(path, "test", batch_size=3))
    assert [x.shape for x in xs] == [(3, 6, 6, 3), (3, 6, 6, 3), (2, 6, 6, 3)]
    np.testing.assert_allclose(np.concatenate(xs), ref["x_test"] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(np.concatenate(ys), ref["y_test"])


def test_npz_shuffle_seeded_and_reshuffled(tmp_path):
    path = str(_write_npz(tmp_path / "d.npz", n_train=64))
    ref = np.load(path)

    def first_epochs(seed, epochs=2):
        ds = data.load(path, "train", batch_size=64, seed=seed)  # shuffled by default
        return [np.concatenate(_collect(ds)[1]) for _ in range(epochs)]

    a1, a2 = first_epochs(0)
    (b1,) = first_epochs(0, 1)
    (c1,) = first_epochs(1, 1)
    for ep in (a1, a2):  # a permutation of the labels
        np.testing.assert_array_equal(np.sort(ep), np.sort(ref["y_train"]))
    np.testing.assert_array_equal(a1, b1)  # same seed, same order
    assert not np.array_equal(a1, a2)  # reshuffled each epoch
    assert not np.array_equal(a1, c1)
    assert not np.array_equal(a1, ref["y_train"])

    # repeat=True: an endless stream of full epochs.
    ds = data.load(path, "train", batch_size=16, repeat=True, drop_remainder=True)
    ys = [y.numpy() for _, y in ds.take(8)]  # two epochs
    np.testing.assert_array_equal(np.sort(np.concatenate(ys[:4])), np.sort(ref["y_train"]))


def test_pipeline_runs_without_the_autotuner(tmp_path):
    # The autotuner's thread stalled the end of every training epoch (pipeline.py);
    # the training pipeline's own options must not switch it back on.
    path = str(_write_npz(tmp_path / "d.npz"))
    for split in ("train", "test"):
        ds = data.load(path, split, batch_size=4)
        assert ds.options().autotune.enabled is False
    config = config_lib.base_config()
    config.data.name = path
    config.optim.batch_size = 4
    assert train_lib.train_dataset(config).options().autotune.enabled is False


@pytest.mark.parametrize("override, match", [
    (dict(y_test=None), r"missing key\(s\) \['y_test'\]"),
    (dict(x_train=np.zeros((20, 6, 6, 3), np.float32)), "x_train must be uint8"),
    (dict(x_test=np.zeros((8, 6, 6), np.uint8)), "x_test must be uint8 with 4 dims"),
    (dict(x_test=np.zeros((8, 3, 6, 6), np.uint8)), "channels"),
    (dict(y_train=np.zeros((20, 5), np.int64)), "y_train must be 1-D integer"),
    (dict(y_train=np.zeros(20, np.float32)), "y_train must be 1-D integer"),
    (dict(y_test=np.zeros(7, np.int64)), "y_test has 7 labels but x_test has 8"),
    (dict(y_test=np.full(8, -1, np.int64)), "negative labels"),
    (dict(x_test=np.zeros((8, 5, 5, 3), np.uint8)), "differ in shape"),
])
def test_npz_errors(tmp_path, override, match):
    path = str(_write_npz(tmp_path / "bad.npz", **override))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=match):
        data.load(path, "train", batch_size=4)
    with pytest.raises(ValueError, match=match):
        data.info(path)
    assert sorted(os.listdir(tmp_path)) == before


def test_npz_refuses_pickle_and_garbage(tmp_path):
    obj = np.empty(20, dtype=object)
    obj[:] = [{"a": i} for i in range(20)]
    path = str(_write_npz(tmp_path / "obj.npz", y_train=obj))
    with pytest.raises(ValueError, match="without pickle"):
        data.load_arrays(path, "train")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz"):
        data.load_arrays(str(junk), "train")


@pytest.mark.skipif(not os.path.isfile(CIFAR_SMALL), reason="cifar10_small.npz absent")
def test_cifar10_small_npz():
    inf = data.info(CIFAR_SMALL)
    assert inf.image_shape == (32, 32, 3) and inf.num_classes == 10
    x, y = data.load_arrays(CIFAR_SMALL, "test")
    assert x.shape == (2000, 32, 32, 3) and np.bincount(y).tolist() == [200] * 10
    xb, yb = next(iter(data.load(CIFAR_SMALL, "train", batch_size=32, augment=True)))
    assert xb.shape == (32, 32, 32, 3) and yb.shape == (32,)
    assert 0.0 <= float(tf.reduce_min(xb)) and float(tf.reduce_max(xb)) <= 1.0


# ---------------------------------------------------------------------------
# Offline Fashion-MNIST


needs_debian = pytest.mark.skipif(
    not HAVE_DEBIAN, reason=f"Fashion-MNIST IDX files absent ({DEBIAN}); "
    "apt-get install dataset-fashion-mnist")


def test_restore_missing_sources_says_apt_get(tmp_path):
    manual = tmp_path / "manual"
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.restore_fashion_mnist(str(manual), source_dir=str(tmp_path / "absent"))
    assert not manual.exists()


def test_gzip_header_restoration_layout():
    # A gzip header without FNAME, MTIME 0: FLG gets bit 3, MTIME and the name go in.
    raw = b"\x1f\x8b\x08\x00" + b"\x00" * 4 + b"\x00\x03" + b"DEFLATE"
    out = fmnist._restore_gzip_header(raw, "abc", 1504176606)
    assert out == (b"\x1f\x8b\x08\x08" + (1504176606).to_bytes(4, "little") + b"\x00\x03"
                   + b"abc\x00DEFLATE")
    assert fmnist._restore_gzip_header(out, "abc", 1) == out  # FNAME present: unchanged
    with pytest.raises(ValueError, match="not a gzip"):
        fmnist._restore_gzip_header(b"PK\x03\x04" + b"\x00" * 10, "abc", 1)


@needs_debian
def test_restored_bytes_match_registered_checksums(tmp_path):
    reg = _registered_tsv()
    assert sorted(reg) == sorted(fmnist.FASHION_MNIST_FILES)
    paths = data.restore_fashion_mnist(str(tmp_path / "manual"))
    for fname, (size, sha) in reg.items():
        assert os.path.getsize(paths[fname]) == size
        assert _sha256(paths[fname]) == sha
        # The Debian copy itself does NOT match: that is why restoration is needed.
        assert _sha256(os.path.join(DEBIAN, fname)) != sha


@needs_debian
def test_restore_checksum_mismatch_writes_nothing(tmp_path):
    builder = tfds.builder("fashion_mnist", data_dir=str(tmp_path / "tfds"))
    reg = dict(fmnist._registered_fashion_mnist(builder))
    f = "t10k-labels-idx1-ubyte.gz"
    reg[f] = type(reg[f])(size=reg[f].size, checksum="0" * 64, filename=reg[f].filename)
    manual = tmp_path / "manual"
    with pytest.raises(ValueError, match="registers"):
        data.restore_fashion_mnist(str(manual), registered=reg)
    assert not manual.exists()


@needs_debian
def test_tfds_itself_rejects_a_tampered_manual_file(tmp_path):
    builder = tfds.builder("fashion_mnist", data_dir=str(tmp_path))
    manual = fmnist._manual_dir(builder)
    paths = data.restore_fashion_mnist(manual, registered=fmnist._registered_fashion_mnist(builder))
    p = paths["train-labels-idx1-ubyte.gz"]
    raw = bytearray(open(p, "rb").read())
    raw[-20] ^= 0xFF
    open(p, "wb").write(bytes(raw))
    with pytest.raises(tfds.core.download.download_manager.NonMatchingChecksumError):
        fmnist._download_and_prepare_manual(builder, manual)
    assert not builder.is_prepared()


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    """Real Fashion-MNIST prepared ONCE, through the automatic (offline) route."""
    if not HAVE_DEBIAN:
        pytest.skip(f"Fashion-MNIST IDX files absent ({DEBIAN})")
    d = str(tmp_path_factory.mktemp("tfds"))
    data.load_arrays("fashion_mnist", "test", max_examples=1, data_dir=d)
    return d


@needs_debian
def test_fashion_mnist_offline_real(fashion_dir):
    # The automatic route used the restored, verified files in the manual dir.
    builder = tfds.builder("fashion_mnist", data_dir=fashion_dir)
    assert builder.is_prepared()
    manual = fmnist._manual_dir(builder)
    assert manual.startswith(fashion_dir)
    for fname, (_, sha) in _registered_tsv().items():
        assert _sha256(os.path.join(manual, fname)) == sha

    x, y = data.load_arrays("fashion_mnist", "train", data_dir=fashion_dir)
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [6000] * 10
    x, y = data.load_arrays("fashion_mnist", "test", data_dir=fashion_dir)
    assert x.shape == (10000, 28, 28, 1)
    assert np.bincount(y).tolist() == [1000] * 10
    assert x.min() == 0 and x.max() == 255
    # Same (image, label) pairs as the IDX files (tfds stores them in another order).
    with gzip.open(os.path.join(DEBIAN, "t10k-images-idx3-ubyte.gz")) as fh:
        x_idx = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(10000, 28, 28, 1)
    with gzip.open(os.path.join(DEBIAN, "t10k-labels-idx1-ubyte.gz")) as fh:
        y_idx = np.frombuffer(fh.read(), np.uint8, offset=8)

    def pairs(xx, yy):
        return sorted(xx[i].tobytes() + bytes([int(yy[i])]) for i in range(len(yy)))

    assert pairs(x, y) == pairs(x_idx, y_idx)

    ds = data.load("fashion_mnist", "test", batch_size=128, data_dir=fashion_dir)
    n, lo, hi = 0, 1.0, 0.0
    for xb, yb in ds:
        assert xb.shape[1:] == (28, 28, 1) and xb.dtype == tf.float32 and yb.dtype == tf.int32
        n += int(xb.shape[0])
        lo, hi = min(lo, float(tf.reduce_min(xb))), max(hi, float(tf.reduce_max(xb)))
    assert n == 10000 and lo == 0.0 and hi == 1.0

    x_cap, _ = data.load_arrays("fashion_mnist", "train", max_examples=300, data_dir=fashion_dir)
    np.testing.assert_array_equal(
        x_cap, data.load_arrays("fashion_mnist", "train", data_dir=fashion_dir)[0][:300])


_LOAD_FIVE = """
import sys
from brkeras import data
x, y = data.load_arrays("fashion_mnist", "test", max_examples=5, data_dir=sys.argv[1])
print(list(y))
"""


@needs_debian
def test_two_processes_prepare_one_data_dir(tmp_path):
    # The pipeline's workers may both find the data unprepared: one builds it
    # (under sources._preparing's lock), the other waits and reads it.
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top
    d = str(tmp_path / "tfds")
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD_FIVE, d], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert outs[0][0].splitlines()[-1] == outs[1][0].splitlines()[-1]
    assert tfds.builder("fashion_mnist", data_dir=d).is_prepared()
