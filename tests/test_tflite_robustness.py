"""Attacks on the shipped .tflite files (deploy/robustness.py) and the evaluate_tflite stage."""

import copy
import json
import os
import sys

import numpy as np
import pytest

from brkeras import data
from brkeras import errors
from brkeras._keras import keras
from brkeras.deploy import convert as convert_lib
from brkeras.deploy import export as deploy_export
from brkeras.deploy import flatbuffer
from brkeras.deploy import parity
from brkeras.deploy import robustness
from brkeras.nn import deploy as nn_deploy
from brkeras.nn import models
from brkeras.robust import attacks
from brkeras.robust.square import square_attack
from brkeras.run import evaluate as run_evaluate
from brkeras.run import export as run_export
from brkeras.run import pipeline
from brkeras.run import summary
from brkeras.run import train as train_lib
from brkeras.run import workdir as workdir_lib
from brkeras.train import batchnorm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import smoke  # noqa: E402  pylint: disable=wrong-import-position

EPS = 0.1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A naturally trained tiny noisy EnResNet, its noise-off and noisy int8 files."""
    xt, yt = data.load_arrays("fashion_mnist", "train", 2000)
    xe, ye = data.load_arrays("fashion_mnist", "test", 100)
    xt, xe = xt.astype(np.float32) / 255.0, xe.astype(np.float32) / 255.0
    keras.utils.set_random_seed(0)
    m = models.build_model((28, 28, 1), 10, depth=8, width=4, sigma=0.1)
    m.compile(keras.optimizers.Adam(0.01),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m.fit(xt, yt.astype(np.int32), epochs=3, batch_size=64, verbose=0)
    # ~100 steps leave BatchNorm's moving averages stale (test accuracy 0.26-0.61
    # by seed and CPU); statistics of the final weights make it 0.63-0.71
    batchnorm.reestimate(m, [xt[i:i + 250] for i in range(0, len(xt), 250)])
    det = deploy_export.architecture_copy(m, 0.0)
    det.set_weights(m.get_weights())
    out = tmp_path_factory.mktemp("tflite")
    paths = {"det": str(out / "det_dynamic_int8.tflite"),
             "noisy": str(out / "noisy_dynamic_int8.tflite")}
    with open(paths["det"], "wb") as f:
        f.write(convert_lib.convert(det, "dynamic_int8"))
    with open(paths["noisy"], "wb") as f:
        f.write(flatbuffer.unseed_random_ops(convert_lib.convert(nn_deploy.deploy_model(m),
                                                                 "dynamic_int8")))
    records = [dict(file=os.path.basename(paths["det"]), path=paths["det"], noise=False,
                    format="dynamic_int8"),
               dict(file=os.path.basename(paths["noisy"]), path=paths["noisy"], noise=True,
                    format="dynamic_int8")]
    return m, det, records, xe, ye.astype(np.int64)


def test_square_on_a_tflite_file_stays_in_the_ball_and_breaks_a_natural_model(files):
    _, _, records, x, y = files
    runner = parity.TFLiteModel(records[0]["path"])
    before = float(np.mean(runner.logits(x).argmax(1) == y))
    x_adv, info = square_attack(runner.logits, x, EPS, n_queries=300, y=y, seed=0)
    assert np.abs(x_adv - x).max() <= EPS + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    after = float(np.mean(runner.logits(x_adv).argmax(1) == y))
    # well above chance (0.1): 0.63-0.71 over seeds and CPUs
    assert before > 0.5 and after <= before - 0.3, (before, after)
    assert np.all(info["queries"] <= 300) and info["success"].mean() >= 1 - after - 1e-9


def test_square_sharded_is_the_one_stream_attack_per_shard(files):
    """shards=1 is square_attack with default_rng(seed); with 3 shards each is
    square_attack on its slice with default_rng([*seed, j]), in x's order, whatever
    the number of threads."""
    _, _, records, x, y = files
    path, x, y = records[0]["path"], x[:30], y[:30]  # the noise-off file: deterministic
    kw = dict(n_queries=60, p_init=0.05, eot_samples=1)
    runner = parity.TFLiteModel(path)
    one, info1 = robustness.square_sharded(path, x, y, EPS, shards=1, workers=2, seed=(0, 1),
                                           **kw)
    ref, ref_info = square_attack(runner.logits, x, EPS, y=y, seed=np.random.default_rng([0, 1]),
                                  **kw)
    np.testing.assert_array_equal(one, ref)
    np.testing.assert_array_equal(info1["queries"], ref_info["queries"])
    three, info3 = robustness.square_sharded(path, x, y, EPS, shards=3, workers=3, seed=(0, 1),
                                             **kw)
    for j, idx in enumerate(np.array_split(np.arange(30), 3)):
        part, part_info = square_attack(runner.logits, x[idx], EPS, y=y[idx],
                                        seed=np.random.default_rng([0, 1, j]), **kw)
        np.testing.assert_array_equal(three[idx], part)
        np.testing.assert_array_equal(info3["success"][idx], part_info["success"])
    assert set(info3) == set(ref_info) and len(info3["margin"]) == 30
    serial, _ = robustness.square_sharded(path, x, y, EPS, shards=3, workers=1, seed=(0, 1), **kw)
    np.testing.assert_array_equal(serial, three)  # threads change the time, not the result
    few, _ = robustness.square_sharded(path, x[:2], y[:2], EPS, shards=8, workers=2, seed=0, **kw)
    assert few.shape == x[:2].shape  # more shards than examples: the empty ones are skipped
    for bad in (dict(shards=0), dict(workers=0)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            robustness.square_sharded(path, x, y, EPS, **bad, **kw)


def test_evaluate_files_transfer_and_square(files):
    m, det, records, x, y = files
    x_adv = attacks.pgd(lambda v: m(v, training=False), x, EPS, EPS / 4, 20, y=y).numpy()
    robust = np.argmax(m.predict(x_adv, verbose=0), 1) == y
    r = robustness.evaluate_files(records, x, y, x_adv, eps=EPS, draws=2, square_examples=50,
                                  square_queries=100, whitebox_robust=robust, seed=0)
    assert r["n_examples"] == 100 and r["eps"] == EPS and set(r["files"]) == {
            "det_dynamic_int8.tflite", "noisy_dynamic_int8.tflite"}
    d, n = r["files"]["det_dynamic_int8.tflite"], r["files"]["noisy_dynamic_int8.tflite"]
    assert d["draws"] == 1 and n["draws"] == 2 and not d["noise"] and n["noise"]
    keras_det = float(np.mean(np.argmax(det.predict(x, verbose=0), 1) == y))
    assert abs(d["natural"] - keras_det) <= 0.02  # int8 rounding flips at most 2 of 100
    for e in (d, n):
        assert e["transfer"] < e["natural"] - 0.2  # PGD's examples transfer to the files
        sq = e["square"]
        assert sq["n_examples"] == 50 and sq["n_queries"] == 100 and sq["max_linf"] <= EPS + 1e-6
        assert 0 <= sq["accuracy"] <= 1 and sq["mean_queries"] <= 100
    assert r["whitebox"] == {"worst_case": float(robust.mean()),
                             "square_subset": float(robust[:50].mean())}
    assert [c["check"] for c in r["sanity"]] == [
            "black-box >= white-box (Square on det_dynamic_int8.tflite)",
            "black-box >= white-box (Square on noisy_dynamic_int8.tflite)"]


def test_blackbox_below_whitebox_is_flagged(files):
    _, _, records, x, y = files
    # a white-box evaluation that (wrongly) found every example robust: masking-like
    r = robustness.evaluate_files(records[:1], x, y, x, eps=EPS, square_examples=50,
                                  square_queries=200, whitebox_robust=np.ones(len(x), bool))
    (c,) = r["sanity"]
    assert not c["held"] and "gradient masking" in c["detail"]


def test_evaluate_files_refuses_bad_input(files):
    _, _, records, x, y = files
    with pytest.raises(ValueError, match="outside the eps"):
        robustness.evaluate_files(records, x, y, np.clip(x + 0.2, 0, 1), eps=EPS)
    with pytest.raises(ValueError, match="files is empty"):
        robustness.evaluate_files([], x, y, x, eps=EPS)
    with pytest.raises(ValueError, match="square_queries"):
        robustness.evaluate_files(records, x, y, x, eps=EPS, square_queries=0)
    with pytest.raises(ValueError, match="tflite_workers"):
        robustness.evaluate_files(records, x, y, x, eps=EPS, workers=0)


# ---- the evaluate_tflite stage ---------------------------------------------------------


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A smoke work dir through train, evaluate, export and evaluate_tflite."""
    wd = str(tmp_path_factory.mktemp("stage_tflite"))
    config = smoke.get_config("float,natural")
    config.optim.epochs = 1
    train_lib.train(config, wd, verbose=0)
    over = copy.deepcopy(config)
    over.eval.attacks = ("fgsm", "pgd20")
    over.eval.eot_attacks = ("pgd20",)
    over.eval.max_examples = 32
    over.eval.batch_size = 32
    over.eval.eps_sweep = (0.0, 0.1)
    over.eval.square_examples = 16
    over.eval.square_queries = 20
    over.export.formats = ("dynamic_int8",)
    over.export.prune = False
    over.export.parity_examples = 32
    ev = run_evaluate.evaluate(wd, overrides=over, verbose=0)
    run_export.export(wd, overrides=over)
    result = run_evaluate.evaluate_tflite(wd, overrides=over, verbose=0)
    return wd, over, ev, result


def test_stage_writes_tflite_eval_json(staged):
    wd, _, ev, r = staged
    with open(os.path.join(wd, workdir_lib.TFLITE_EVAL_JSON)) as f:
        assert json.load(f) == json.loads(json.dumps(r))
    assert sorted(r["files"]) == ["det_dynamic_int8.tflite", "noisy_dynamic_int8.tflite"]
    assert r["n_examples"] == 32 and r["eps"] == pytest.approx(0.1)
    # the images of adversarial.npz, as eval.json names them
    assert r["images"] == dict(ev["images"], count=32)
    assert r["whitebox"]["worst_case"] == pytest.approx(ev["worst_case"]["expected"])
    for e in r["files"].values():
        assert e["square"]["n_examples"] == 16 and e["square"]["n_queries"] == 20
    assert pipeline.STAGES["evaluate_tflite"][2] == workdir_lib.TFLITE_EVAL_JSON


def test_adversarial_npz_is_plain_arrays(staged):
    wd, _, ev, _ = staged
    with np.load(os.path.join(wd, workdir_lib.ADVERSARIAL_NPZ)) as d:  # allow_pickle=False
        assert set(d.files) == {"x", "y", "x_adv", "robust", "source", "members", "eps"}
        assert d["x"].shape == d["x_adv"].shape == (32, 28, 28, 1)
        assert d["robust"].mean() == pytest.approx(ev["worst_case"]["expected"])
        assert np.abs(d["x_adv"] - d["x"]).max() <= float(d["eps"]) + 1e-6
        assert d["members"].tolist() == ev["worst_case"]["members"][1:]


def test_summary_row_has_the_file_columns(staged):
    wd, _, ev, r = staged
    row = summary.model_row(os.path.dirname(wd), os.path.basename(wd))
    assert set(row) == set(summary.ROW_KEYS)
    assert row["worst_case"] == ev["worst_case"]["expected"]
    assert row["transfer_det"] == r["files"]["det_dynamic_int8.tflite"]["transfer"]
    assert row["square_noisy"] == r["files"]["noisy_dynamic_int8.tflite"]["square"]["accuracy"]
    assert row["square_examples"] == 16
    text = summary.markdown([row])
    assert "| worst case |" in text and "TFLite transfer" in text


def test_stage_needs_evaluate_and_export_first(staged, tmp_path):
    wd, over, _, _ = staged
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (workdir_lib.CONFIG, workdir_lib.EXPORT_JSON):
        with open(os.path.join(wd, name)) as src, open(bare / name, "w") as dst:
            dst.write(src.read())
    with pytest.raises(errors.WorkdirError, match="brkeras evaluate"):
        run_evaluate.evaluate_tflite(str(bare), overrides=over, verbose=0)


def test_tflite_workers_default_to_the_cores():
    assert run_evaluate.tflite_workers({"tflite_workers": 0}) == min(8, os.cpu_count() or 1)
    assert run_evaluate.tflite_workers({"tflite_workers": 3}) == 3
    with pytest.raises(ValueError, match="config.eval.tflite_workers"):
        run_evaluate.tflite_workers({"tflite_workers": -1})
