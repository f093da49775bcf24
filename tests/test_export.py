"""TFLite export: exact Binary-Relax levels in int8 files, parity, export.json pieces."""

import numpy as np
import pytest

from brkeras._keras import keras, tf
from brkeras.deploy import convert as convert_lib
from brkeras.deploy import export as deploy_export
from brkeras import errors
from brkeras.deploy import flatbuffer
from brkeras.deploy import int4
from brkeras.quant import int8_qat as int8_qat_lib
from brkeras.deploy import exact_levels as levels_lib
from brkeras.nn import models
from brkeras.nn import deploy as nn_deploy
from brkeras.deploy import parity
from brkeras.run import export as run_export
from brkeras.run import train as train_lib

from brkeras.nn.layers import FeynmanKacNoise

L = keras.layers


def tiny_resnet(sigma=0.0, width=8, num_classes=4, hw=8):
    """One pre-activation block with a strided shortcut block, layer names per design.md."""
    inp = keras.Input((hw, hw, 3))
    x = L.Conv2D(width, 3, padding="same", use_bias=False, name="m0_conv0")(inp)
    for s, stride in ((1, 1), (2, 2)):
        p = f"m0_s{s}_b0_"
        w = width * s
        h = L.ReLU(name=p + "relu1")(L.BatchNormalization(momentum=0.5, name=p + "bn1")(x))
        sc = L.Conv2D(w, 1, stride, use_bias=False, name=p + "shortcut")(h) if stride > 1 else x
        h = L.Conv2D(w, 3, stride, padding="same", use_bias=False, name=p + "conv1")(h)
        h = L.ReLU(name=p + "relu2")(L.BatchNormalization(momentum=0.5, name=p + "bn2")(h))
        h = L.Conv2D(w, 3, padding="same", use_bias=False, name=p + "conv2")(h)
        x = FeynmanKacNoise(sigma, pool=1, name=p + "noise")(L.Add(name=p + "add")([sc, h]))
    x = L.ReLU(name="m0_relu_final")(L.BatchNormalization(momentum=0.5, name="m0_bn_final")(x))
    out = L.Dense(num_classes, name="m0_logits")(L.GlobalAveragePooling2D(name="m0_pool")(x))
    return keras.Model(inp, out)


QLAYERS = ["m0_conv0", "m0_s1_b0_conv1", "m0_s1_b0_conv2", "m0_s2_b0_conv1", "m0_s2_b0_conv2"]


def set_levels(model, kmax, seed=0, zero_prob=0.3):
    """Sets the 3x3 kernels to exact Q(w) = alpha * k, |k| <= kmax, one alpha per layer.

    k rounds the current kernel w: k = clip(round(w / (max|w| / kmax)), -kmax, kmax),
    with a share zero_prob of entries zeroed at random and the top level present.
    """
    rng = np.random.default_rng(seed)
    for name in QLAYERS:
        layer = model.get_layer(name)
        w = layer.get_weights()[0]
        k = np.clip(np.round(w / (np.abs(w).max() / kmax)), -kmax, kmax).astype(np.int64)
        k[rng.random(k.shape) < zero_prob] = 0
        k.flat[0] = kmax  # the top level occurs
        alpha = np.float32(rng.uniform(0.05, 0.2))
        layer.kernel.assign((alpha * k).astype(np.float32))
    return {n: (model.get_layer(n).get_weights()[0], kmax) for n in QLAYERS}


def fit_briefly(model, x, y, epochs=4):
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)


def quantized_trained(x, y, kmax, seed, width=8, sigma=0.0):
    """A tiny model trained briefly, kernels set to exact levels, then BN/Dense refit
    (kernels frozen) so the logits have margins."""
    keras.utils.set_random_seed(seed)
    m = tiny_resnet(sigma=sigma, width=width)
    fit_briefly(m, x, y)
    quant = set_levels(m, kmax, seed=seed)
    for n in QLAYERS:
        m.get_layer(n).trainable = False
    fit_briefly(m, x, y, epochs=3)
    for n in QLAYERS:  # frozen: still exactly Q(w)
        np.testing.assert_array_equal(m.get_layer(n).get_weights()[0], quant[n][0])
    return m, quant


def data(n=200, hw=8, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.uniform(0, 0.3, (n, hw, hw, 3)).astype(np.float32)
    for c in range(3):  # classes 0-2 brighten one colour channel, class 3 none
        x[y == c, :, :, c] += 0.6
    return x, y.astype(np.int32)


@pytest.fixture(scope="module")
def ternary_files(tmp_path_factory):
    x, y = data()
    m, quant = quantized_trained(x, y, 1, seed=3)
    out = tmp_path_factory.mktemp("tern")
    # With names: the checks below find each layer's filter by its tensor name.
    entries = deploy_export.export_model(m, str(out), "det", quant, x[:50], x, y, noise=False,
                                         strip=False)
    return m, quant, out, entries


def test_stripped_files_compute_the_same_without_names(ternary_files, tmp_path):
    m, quant, named_dir, named = ternary_files
    x, y = data()
    stripped = deploy_export.export_model(m, str(tmp_path), "det", quant, x[:50], x, y,
                                          noise=False)  # strip=True, the default
    by_fmt = {e["format"]: e for e in named}
    for e in stripped:
        ref = by_fmt[e["format"]]
        b = (tmp_path / e["file"]).read_bytes()
        rb = (named_dir / ref["file"]).read_bytes()
        mo, ro = (flatbuffer._read(v) for v in (b, rb))
        assert all(t.name is None for t in mo.subgraphs[0].tensors)
        assert any(t.name for t in ro.subgraphs[0].tensors)
        # Same graph and weights: ops, tensor types, shapes, scales and buffers.
        assert [o.opcodeIndex for o in mo.subgraphs[0].operators] == \
            [o.opcodeIndex for o in ro.subgraphs[0].operators]
        for t, r in zip(mo.subgraphs[0].tensors, ro.subgraphs[0].tensors):
            assert (t.type, list(t.shape)) == (r.type, list(r.shape))
            assert int4._raw(mo, t) == int4._raw(ro, r)  # the buffer's bytes
        np.testing.assert_array_equal(parity.tflite_logits(b, x[:20]),
                                      parity.tflite_logits(rb, x[:20]))
        assert e["zipped_bytes"] < ref["zipped_bytes"] and e["size_bytes"] < ref["size_bytes"]
        assert e["storage"] == ref["storage"] and e["macs"] == ref["macs"]
        # The signature def stays: a signature runner still finds the input.
        from ai_edge_litert.interpreter import Interpreter
        runner = Interpreter(model_content=b).get_signature_runner()
        out = runner(**{next(iter(runner.get_input_details())): x[:1]})
        assert next(iter(out.values())).shape == (1, 4)


def test_exact_levels_recovers_units():
    k = np.array([[3, -7, 0, 1], [0, 0, 0, 0], [2, 4, -6, 0]])
    u = np.array([0.1, 0.0, 0.05])
    units, levels = levels_lib.exact_levels(u[:, None] * k, 7)
    # Channel 2 has only even levels: the largest exact unit is 2 * 0.05.
    np.testing.assert_allclose(units, [0.1, 0.0, 0.1])
    np.testing.assert_array_equal(levels, [[3, -7, 0, 1], [0, 0, 0, 0], [1, 2, -3, 0]])
    with pytest.raises(errors.ExportError, match="not u \\* k"):
        levels_lib.exact_levels(np.array([[0.1, 0.25, 0.37]]), 7)


def test_ternary_three_int8_levels_per_channel(ternary_files):
    m, quant, out, entries = ternary_files
    by_fmt = {e["format"]: e for e in entries}
    assert set(by_fmt) == {"float32", "dynamic_int8", "full_int8", "int4"}
    # INT4: the same exact levels packed two per byte, every ternary filter rewritten.
    assert by_fmt["int4"]["size_bytes"] < by_fmt["full_int8"]["size_bytes"]
    assert by_fmt["int4"]["int4"]["rewritten"] >= len(quant)
    b = (out / "det_full_int8.tflite").read_bytes()
    f32 = (out / "det_float32.tflite").read_bytes()
    wq = flatbuffer.weights_by_layer(b, QLAYERS)
    wf = flatbuffer.weights_by_layer(f32, QLAYERS)
    assert set(wq) == set(QLAYERS)
    for name in QLAYERS:
        w = wq[name]
        assert w["dtype"] == "INT8"
        c = w["data"].shape[0]
        assert len(w["scales"]) == c
        for o in range(c):
            assert set(np.unique(w["data"][o])) <= {-127, 0, 127}
        # scale * int8 reproduces the float filter (= Q(w), BN-folded for conv1).
        np.testing.assert_allclose(flatbuffer.dequantized(w), wf[name]["data"], rtol=1e-6, atol=1e-9)
        ref = flatbuffer.to_tflite_layout(quant[name][0])
        g = wf[name]["data"].reshape(c, -1)
        # Per channel the float filter is Q(w) times one factor (1 where no BN was folded).
        for o in range(c):
            nz = ref[o].reshape(-1) != 0
            if nz.any():
                ratio = g[o][nz] / ref[o].reshape(-1)[nz]
                np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)
                if not name.endswith("conv1"):
                    np.testing.assert_allclose(ratio, 1.0, rtol=1e-6)
        assert by_fmt["full_int8"]["weights"][name]["exact"]
        assert by_fmt["full_int8"]["weights"][name]["levels_per_channel_max"] <= 3


def test_dynamic_range_reports_small_tensors_float(ternary_files):
    _, _, _, entries = ternary_files
    dyn = {e["format"]: e for e in entries}["dynamic_int8"]["weights"]
    for name, r in dyn.items():
        # Dynamic-range quantization leaves tensors under 1024 elements in float32.
        assert r["stored"] == ("INT8" if r["elements"] >= 1024 else "FLOAT32"), (name, r)
        assert r["exact"]
    assert any(r["stored"] == "FLOAT32" for r in dyn.values())
    assert any(r["stored"] == "INT8" for r in dyn.values())


def test_parity_figures(ternary_files):
    _, _, _, entries = ternary_files
    for e in entries:
        p = e["parity"]
        assert p["examples"] == 200
        assert p["top1_agreement"] >= 0.995
        if e["format"] == "float32":
            assert p["max_abs_logit_diff"] < 1e-4
        # Accuracies can differ by at most the share of disagreeing examples.
        assert abs(p["acc_tflite"] - p["acc_keras"]) <= 1 - p["top1_agreement"] + 1e-12


def test_4bit_levels_fixed_and_exact(tmp_path):
    x, y = data(seed=2)
    m, quant = quantized_trained(x, y, 7, seed=4, width=16)
    f32 = convert_lib.convert(m, "float32")
    raw = convert_lib.convert(m, "full_int8", x[:50])
    before = levels_lib.check_weights(raw, f32, quant)
    # The converter's own scale max|f|/127 rounds the 4-bit levels.
    assert any(not r["exact"] for r in before.values())
    fixed = levels_lib.fix_quantized_weights(raw, f32, quant)
    after = levels_lib.check_weights(fixed, f32, quant)
    wq = flatbuffer.weights_by_layer(fixed, QLAYERS)
    for name in QLAYERS:
        d = wq[name]["data"]
        assert after[name]["exact"], after[name]
        assert after[name]["max_rel_err_vs_float_filter"] < 1e-6
        # int8 = 18 k with |k| <= 7: at most 15 levels per channel, all multiples of 18.
        assert np.all(d % 18 == 0) and np.abs(d).max() == 126
        assert after[name]["levels_per_channel_max"] <= 15
        if not name.endswith("conv1"):  # nothing folded: scale * int8 == Q(w)
            assert after[name]["max_rel_err_vs_qw"] < 1e-6
    par = parity.parity_deterministic(fixed, m, x, y)
    assert par["top1_agreement"] >= 0.995


def test_parity_failure_raises(tmp_path):
    x, y = data(n=60)
    m = tiny_resnet()
    other = tiny_resnet()
    fit_briefly(m, x, y)
    b = convert_lib.convert(other, "float32")
    with pytest.raises(errors.ParityError, match="agrees with Keras"):
        parity.parity_deterministic(b, m, x, y)


def test_noisy_export_random_op_and_accuracy_parity(tmp_path):
    x, y = data(n=60)
    m, quant = quantized_trained(x, y, 1, seed=5, sigma=0.1)
    es = deploy_export.export_model(m, str(tmp_path), "noisy", quant, x[:30], x, y, noise=True,
                             formats=("float32",), noise_examples=60, noise_runs=2)
    b = (tmp_path / "noisy_float32.tflite").read_bytes()
    mo = flatbuffer._read(b)
    ops = {flatbuffer.flatbuffer_utils.opcode_to_name(mo, op.opcodeIndex)
           for op in mo.subgraphs[0].operators}
    # the training-form layer draws its normals by Box-Muller on RANDOM_UNIFORM (layers.py)
    assert "RANDOM_UNIFORM" in ops and {"LOG", "COS"} <= ops
    p = es[0]["parity"]
    assert p["abs_diff"] <= p["tolerance"]
    # Exported seeds are zeroed, so two interpreters draw different noise (the
    # converter had fixed seeds: the test set a global seed).
    assert [s[1:] for s in es[0]["random_ops"]] == [(0, 0), (0, 0)]
    assert all(s[1:] != (0, 0) for s in flatbuffer.random_op_seeds(convert_lib.convert(m, "float32")))
    x0 = np.repeat(x[:1], 4, axis=0)
    l1 = parity.tflite_logits(b, x0)
    l2 = parity.tflite_logits(b, x0)
    assert np.abs(l1 - l2).max() > 0
    assert np.abs(l1[1:] - l1[:1]).max() > 0  # successive invokes differ too


# ---- deploy form of the noise, int8_qat export ----

import os  # noqa: E402
import sys  # noqa: E402

from brkeras.nn import layers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import smoke  # noqa: E402  pylint: disable=wrong-import-position


def test_noise_bank_has_the_pool_structure():
    sizes, k = [4096, 2048, 1000], 8
    tf.random.set_seed(0)
    outs = layers.bank_noise(sizes, k)
    assert [int(o.shape[0]) for o in outs] == sizes
    for n, o in zip(sizes, outs):
        q, r = layers.pool_layout_static(n, k)
        assert k * q * r >= n and q & (q - 1) == 0
        full = np.concatenate([o.numpy(), np.zeros(k * q * r - n, np.float32)]).reshape(k, q, r)
        if k * q * r == n:  # copies share |z|: the training layer's layout
            np.testing.assert_array_equal(np.abs(full), np.abs(full[:1]).repeat(k, 0))
    # 60 draws of ~900 independent normals each: per-element N(0, 1) (se of var ~0.006).
    draws = np.stack([np.concatenate([o.numpy() for o in layers.bank_noise(sizes, k)])
                      for _ in range(60)])
    assert abs(draws.mean()) < 0.02 and abs(draws.var() - 1) < 0.03
    assert np.abs(draws.mean(0)).max() < 5 / np.sqrt(60) * 1.5  # every position centred
    again = layers.bank_noise(sizes, k)
    assert np.abs(again[0].numpy() - outs[0].numpy()).max() > 0  # fresh draws per call


def test_deploy_model_same_map_and_one_random_op_each():
    keras.utils.set_random_seed(0)
    m = models.build_model((8, 8, 1), 3, depth=8, width=4, sigma=0.1, noise_pool=8)
    d = nn_deploy.deploy_model(m)
    assert d.inputs[0].shape[0] == 1 and d.get_layer("noise_bank").sizes == [256, 128, 64]
    # With sigma -> 0 both are the same deterministic map: set sigma 0 on the copies.
    for layer in d.layers:
        if isinstance(layer, layers.AddScaledNoise):
            layer.sigma = 0.0
    m0 = models.build_model((8, 8, 1), 3, depth=8, width=4, sigma=0.0)
    m0.set_weights(m.get_weights())
    x = np.random.default_rng(0).uniform(0, 1, (1, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(d(x).numpy(), m0(x).numpy(), rtol=1e-5, atol=1e-6)
    mo = flatbuffer._read(convert_lib.convert(nn_deploy.deploy_model(m), "float32"))
    ops = [flatbuffer.flatbuffer_utils.opcode_to_name(mo, op.opcodeIndex)
           for op in mo.subgraphs[0].operators]
    assert ops.count("RANDOM_STANDARD_NORMAL") == 1 and ops.count("RANDOM_UNIFORM") == 1
    assert ops.index("RANDOM_STANDARD_NORMAL") < ops.index("CONV_2D")


def test_int8_qat_export(tmp_path):
    wd = str(tmp_path)
    train_lib.train(smoke.get_config("int8_qat,tradeoff"), wd, verbose=0)
    res = run_export.export(wd)
    assert sorted(e["file"] for e in res["files"]) == ["det_qat_int8.tflite", "noisy_qat_int8.tflite"]
    assert sorted(os.listdir(os.path.join(wd, "export"))) == ["det_qat_int8.tflite",
                                                              "noisy_qat_int8.tflite"]
    for e in res["files"]:
        # Every conv and the dense layer stored int8: 7 3x3 + 2 shortcuts + 1 dense.
        assert list(e["storage"]) == ["INT8"] and e["storage"]["INT8"]["tensors"] == 10
        # the peer's cost, as for every other file (the summary compares them)
        assert 0 < e["zipped_bytes"] < e["size_bytes"] and e["macs"] > 0
        p = e["parity"]
        if e["noise"]:
            assert p["abs_diff"] <= p["tolerance"] and p["runs"] == 3
            assert sorted(o[0] for o in e["random_ops"]) == ["RANDOM_STANDARD_NORMAL",
                                                            "RANDOM_UNIFORM"]
        else:
            assert p["top1_agreement"] >= 0.9 and e["random_ops"] == []
    # The sigma-0 QAT model gets every trained variable (weights, ranges) by layer.
    qmodel = train_lib.load(wd)
    c = smoke.get_config("int8_qat,tradeoff")
    c.model.sigma = 0.0
    q0 = deploy_export.copy_weights_by_name(
        qmodel, int8_qat_lib.int8_qat(train_lib.from_config(c, (28, 28, 1), 10)))
    src, dst = qmodel.get_weights(), q0.get_weights()
    assert len(src) == len(dst) > 30
    for a, b in zip(src, dst):
        np.testing.assert_array_equal(a, b)


def test_a_layer_folded_away_is_exact_only_when_its_kernel_is_zero():
    """Group sparsity can empty a whole block; the converter then folds its conv away."""
    x, y = data(seed=2)
    m, quant = quantized_trained(x, y, 7, seed=4, width=16)
    f32 = convert_lib.convert(m, "float32")
    name, (kernel, kmax) = next(iter(quant.items()))
    gone = {f"{name}_folded": (np.zeros_like(kernel), kmax),
            f"{name}_lost": (kernel, kmax)}
    rep = levels_lib.check_weights(f32, f32, gone)
    assert rep[f"{name}_folded"] == {"stored": "folded (all-zero kernel)", "exact": True}
    assert rep[f"{name}_lost"] == {"stored": "missing", "exact": False}


def test_parity_bars_are_judged_in_whole_examples(monkeypatch):
    # 0.38 - 0.37 is 0.010000000000000009 in floats: 3 of 300 examples must pass a
    # 0.01 bar, 4 must not; likewise 24 disagreements of 300 at min_agreement 0.92.
    n, classes = 300, 10
    y = np.arange(n) % classes
    keras_out = np.eye(classes, dtype=np.float32)[np.where(np.arange(n) < 114, y, (y + 1) % classes)]

    def tflite_with(wrong_extra):
        pred = np.where(np.arange(n) < 114 - wrong_extra, y, (y + 1) % classes)
        return np.eye(classes, dtype=np.float32)[pred]

    for extra, ok in ((3, True), (4, False)):
        monkeypatch.setattr(parity, "tflite_logits", lambda *a, **k: tflite_with(extra))
        kw = dict(y=y, min_agreement=0.9, max_accuracy_drop=0.01, keras_out=keras_out)
        if ok:
            out = parity.parity_deterministic(b"", None, np.zeros((n, 1)), **kw)
            assert (out["acc_keras"], out["acc_tflite"]) == (114 / n, 111 / n)
        else:
            with pytest.raises(errors.ParityError, match="below Keras"):
                parity.parity_deterministic(b"", None, np.zeros((n, 1)), **kw)
    for flips, ok in ((24, True), (25, False)):
        pred = keras_out.argmax(1).copy()
        pred[:flips] = (pred[:flips] + 1) % classes
        monkeypatch.setattr(parity, "tflite_logits",
                            lambda *a, p=pred, **k: np.eye(classes, dtype=np.float32)[p])
        if ok:
            out = parity.parity_deterministic(b"", None, np.zeros((n, 1)), min_agreement=0.92,
                                              keras_out=keras_out)
            assert out["top1_agreement"] == 276 / n
        else:
            with pytest.raises(errors.ParityError, match="agrees with Keras"):
                parity.parity_deterministic(b"", None, np.zeros((n, 1)), min_agreement=0.92,
                                            keras_out=keras_out)
