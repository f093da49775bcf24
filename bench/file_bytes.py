"""Where the zipped bytes of a TFLite file go, and what the best coding would leave.

Run by hand (not a test):
  .venv/bin/python bench/file_bytes.py runs/pipeline/ternary_tradeoff_sparse/export/det_pruned_full_int8.tflite
      [more files ...]
Prints, per file, its raw and zipped size (ZIP_DEFLATED, as the pipeline
reports it) and the zipped bytes of each part, measured by zeroing that part
and zipping again: ternary conv filters (int8 values in {-127, 0, 127}), other
int8 conv filters, dense weights, int32 biases, 1-D int8 constants (BatchNorm
scale and shift), the float quantization scales of every tensor, and the rest
(operators, shapes, zero points, names, signature). For the ternary filters it
also prints their per-tensor entropy, the size an ideal entropy coder would give
them, and the zipped size of the file with that coding instead of deflate's.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app  # noqa: E402

from brkeras._keras import tf  # noqa: E402,F401  (TF chosen through brkeras)
from brkeras.deploy.cost import zipped_size as zipped  # noqa: E402  (the pipeline's measure)
from tensorflow.lite.python import schema_py_generated as schema_fb  # noqa: E402
from tensorflow.lite.tools import flatbuffer_utils  # noqa: E402

_INT8, _INT32 = schema_fb.TensorType.INT8, schema_fb.TensorType.INT32


def _values(mo, t):
    data = mo.buffers[t.buffer].data
    if data is None or len(data) == 0:
        return None
    return np.asarray(data, np.uint8)


def _is_ternary(t, raw):
    return (t.type == _INT8 and len(t.shape) == 4
            and set(np.unique(raw.view(np.int8)).tolist()) <= {-127, 0, 127})


PARTS = (  # name, predicate(tensor, raw bytes)
    ("ternary conv filters", _is_ternary),
    ("other int8 conv filters", lambda t, raw: t.type == _INT8 and len(t.shape) == 4
     and not _is_ternary(t, raw)),
    ("dense weights", lambda t, raw: t.type == _INT8 and len(t.shape) == 2),
    ("int32 biases", lambda t, raw: t.type == _INT32),
    ("1-D int8 constants", lambda t, raw: t.type == _INT8 and len(t.shape) == 1),
)


def _zeroed(tflite_bytes, predicate=None, scales=False):
    mo = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    for t in mo.subgraphs[0].tensors:
        if scales:
            q = t.quantization
            if q is not None and q.scale is not None and len(q.scale):
                q.scale = np.zeros(len(q.scale), np.float32)
            continue
        raw = _values(mo, t)
        if raw is not None and predicate(t, raw):
            mo.buffers[t.buffer].data = np.zeros_like(raw)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(mo))


def ternary_entropy_bytes(tflite_bytes):
    """(count, bytes at the per-tensor entropy of the three levels) of the ternary filters."""
    mo = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    n, bits = 0, 0.0
    for t in mo.subgraphs[0].tensors:
        raw = _values(mo, t)
        if raw is not None and _is_ternary(t, raw):
            _, counts = np.unique(raw.view(np.int8), return_counts=True)
            p = counts / counts.sum()
            bits += float(-(counts * np.log2(p)).sum())
            n += int(raw.size)
    return n, bits / 8


def report(path):
    b = open(path, "rb").read()
    total = zipped(b)
    print(f"{path}\n  raw {len(b)} B, zipped {total} B")
    rest = total
    for name, pred in PARTS:
        part = total - zipped(_zeroed(b, pred))
        rest -= part
        print(f"  {name:<26} {part:>7} B zipped")
    part = total - zipped(_zeroed(b, scales=True))
    rest -= part
    print(f"  {'quantization scales':<26} {part:>7} B zipped")
    print(f"  {'the rest (graph, names)':<26} {rest:>7} B zipped")
    n, ent = ternary_entropy_bytes(b)
    if n:
        deflated = total - zipped(_zeroed(b, PARTS[0][1]))
        best = total - deflated + ent
        print(f"  ternary: {n} weights, {8 * deflated / n:.2f} bits each zipped, entropy "
              f"{8 * ent / n:.2f} bits ({ent:.0f} B); entropy-coded the file would zip to "
              f"about {best:.0f} B")
    return total


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("give one or more .tflite files")
    for path in argv[1:]:
        if not os.path.isfile(path):
            raise app.UsageError(f"{path}: no such file")
        report(path)


if __name__ == "__main__":
    app.run(main)
