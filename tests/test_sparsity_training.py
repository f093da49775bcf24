"""Channel sparsity through the whole run: train -> load -> export (pruned, INT4)."""

import json
import os
import sys

import numpy as np
import pytest

from brkeras.deploy import int4
from brkeras.quant import binary_relax
from brkeras.quant.group_sparsity import block_groups, zero_group_share
from brkeras.run import export as run_export
from brkeras.run import train as train_lib
from brkeras.run import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import smoke  # noqa: E402  pylint: disable=wrong-import-position


def sparse_config():
    c = smoke.get_config("ternary,tradeoff,sparse")
    c.quant.per_channel = True
    c.export.formats = ("float32", "full_int8", "int4")
    c.export.min_agreement = 0.9
    c.export.min_agreement_full_int8 = 0.85
    c.export.max_accuracy_drop_full_int8 = 0.1
    return c


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("sparse") / "run")
    rows = train_lib.train(sparse_config(), wd, verbose=0)
    return wd, rows


def test_training_reaches_the_target_share_and_logs_it(sparse_run):
    wd, rows = sparse_run
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["group_lam"] == 100.0 for r in rows)
    # target_share 0.5 of the 4 + 8 + 16 block channels of the width-4 smoke model
    assert rows[-1]["group_zero_share"] == pytest.approx(14 / 28)
    net = train_lib.load(wd)
    share = zero_group_share(net)
    assert share["zero_groups"] == 14 and share["groups"] == 28
    # Zero float slices are zero in Q(w) too, so the exact deploy weights keep them.
    kernels = binary_relax.quantized_kernels(net)
    dead = 0
    for g in block_groups(net):
        k2 = kernels[g.name]
        dead += int(np.sum(np.all(k2 == 0, axis=(0, 1, 3))))
    assert dead >= 14  # ternary may zero a few more slices that fell below its threshold


def test_export_ships_pruned_int8_and_int4_files_that_match_keras(sparse_run):
    wd, _ = sparse_run
    result = run_export.export(wd)
    with open(os.path.join(wd, workdir_lib.EXPORT_JSON)) as f:
        assert json.load(f)["files"] == json.loads(json.dumps(result["files"]))
    det = result["pruning"]["det"]
    assert det["removed_channels"] >= 14 - 3  # a block keeps >= 1 channel
    assert det["after"]["macs"] < det["before"]["macs"]
    files = {f["file"]: f for f in result["files"]}
    for name in ("det_full_int8", "det_pruned_full_int8", "det_int4", "det_pruned_int4",
                 "noisy_float32", "noisy_pruned_float32"):
        assert name + ".tflite" in files, sorted(files)
    pruned, unpruned = files["det_pruned_full_int8.tflite"], files["det_full_int8.tflite"]
    assert pruned["macs"] < unpruned["macs"] and pruned["size_bytes"] < unpruned["size_bytes"]
    assert pruned["zipped_bytes"] < pruned["size_bytes"]
    assert pruned["parity"]["top1_agreement"] >= 0.85
    noisy = files["noisy_pruned_float32.tflite"]["parity"]
    assert noisy["abs_diff"] <= noisy["tolerance"]
    # INT4: every quantized conv filter packed; smaller than its int8 file; levels exact.
    i4 = files["det_pruned_int4.tflite"]
    assert i4["int4"]["rewritten"] >= 5 and i4["size_bytes"] < pruned["size_bytes"]
    assert i4["parity"]["top1_agreement"] >= 0.85
    with open(os.path.join(wd, "export", "det_pruned_int4.tflite"), "rb") as f:
        tensors = int4.int4_tensors(f.read())
    assert tensors and all(set(np.unique(t["levels"])) <= {-7, 0, 7} for t in tensors)


def test_sparse_run_resumes_with_the_same_schedule(tmp_path, train_killed_after_first_epoch,
                                                   sparse_run):
    """The callback keeps no state: a run killed after epoch 1 resumes to the same lam
    and the same share of zero groups as the uninterrupted run."""
    _, rows_full = sparse_run
    wd = str(tmp_path / "killed")
    train_killed_after_first_epoch(sparse_config(), wd)
    rows = train_lib.train(sparse_config(), wd, verbose=0)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r, full in zip(rows, rows_full):
        assert r["group_lam"] == full["group_lam"]
        assert r["group_zero_share"] == full["group_zero_share"] == pytest.approx(0.5)
