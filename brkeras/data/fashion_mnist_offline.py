"""Fashion-MNIST for tensorflow-datasets without network, from Debian's package.

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

import hashlib
import os
import struct


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
