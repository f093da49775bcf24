"""Mixed precision (train/precision.py): choosing the policy, bfloat16 training with
float32 variables, checkpoints and `load` independent of the policy, Q(w) levels."""

import os
import sys

import numpy as np
import pytest

from brkeras.nn import models
from brkeras.quant import binary_relax
from brkeras.run import config as config_lib
from brkeras.run import train as train_lib
from brkeras.train import adversarial_model
from brkeras.train import precision
from brkeras._keras import keras, tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import smoke  # noqa: E402  pylint: disable=wrong-import-position

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R)
flags\t\t: fpu vme sse2 ssse3 fma avx avx2 avx512f avx512bw {extra}
bogomips\t: 4800.00

processor\t: 1
flags\t\t: fpu vme sse2 ssse3 fma avx avx2 avx512f avx512bw {extra}
"""


def _global():
    return keras.mixed_precision.global_policy().name


# ---------------------------------------------------------------- the choice
def test_auto_is_bf16_exactly_when_the_cpu_reports_it():
    def auto(extra, accelerator=False):
        flags = precision.cpu_flags(CPUINFO.format(extra=extra))
        assert {"avx2", "avx512f"} <= flags
        return precision.resolve("auto", cpu_flags_=flags, accelerator=accelerator)

    assert auto("avx512_bf16 avx512_vnni") == "mixed_bfloat16"  # Cooper Lake, Zen 4
    assert auto("amx_tile amx_int8 amx_bf16") == "mixed_bfloat16"  # Sapphire Rapids
    assert auto("avx512_vnni avx512_fp16") == "float32"  # no bfloat16 instructions
    assert auto("") == "float32"
    assert auto("", accelerator=True) == "mixed_bfloat16"  # a bf16 GPU or a TPU


def test_auto_keeps_narrow_models_in_float32():
    # Width 8 ran 2.5-4.8x slower in bfloat16 on both bf16 CPUs here; 16 ran 1.6x faster.
    bf16 = {"avx512_bf16", "amx_bf16"}
    assert precision.resolve("auto", cpu_flags_=bf16, width=8) == "float32"
    assert precision.resolve("auto", cpu_flags_=bf16, width=16) == "mixed_bfloat16"
    assert precision.resolve("auto", cpu_flags_=bf16, width=None) == "mixed_bfloat16"
    assert precision.resolve("auto", cpu_flags_=set(), accelerator=True, width=4) == "float32"
    # An explicit policy is taken as given, whatever the width.
    assert precision.resolve("mixed_bfloat16", cpu_flags_=set(), width=8) == "mixed_bfloat16"
    assert precision.for_precision("auto", "ternary", cpu_flags_=bf16, width=8) == "float32"
    assert precision.cpu_flags("processor : 0\nmodel name : x\n") == set()
    arm = precision.cpu_flags("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert "bf16" in arm and not precision.cpu_has_bf16(arm)  # only the x86 flags count


def test_explicit_policies_pass_and_unknown_ones_raise():
    for name in ("float32", "mixed_bfloat16"):
        assert precision.resolve(name, cpu_flags_=set(), accelerator=False) == name
        assert precision.resolve(name, cpu_flags_={"avx512_bf16"}, accelerator=True) == name
    with pytest.raises(ValueError, match="dtype_policy.*float32"):
        precision.resolve("mixed_float16")


def test_cpu_flags_come_from_proc_cpuinfo_on_linux_only(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(extra="avx512_bf16"))
    monkeypatch.setattr(precision, "CPUINFO", str(info))
    monkeypatch.setattr(precision.sys, "platform", "linux")
    assert precision.cpu_has_bf16()
    monkeypatch.setattr(precision.sys, "platform", "darwin")  # no /proc/cpuinfo to trust
    assert precision.cpu_flags() == set() and not precision.cpu_has_bf16()
    monkeypatch.setattr(precision.sys, "platform", "linux")
    monkeypatch.setattr(precision, "CPUINFO", str(tmp_path / "missing"))
    assert precision.cpu_flags() == set() and not precision.cpu_has_bf16()


def test_this_machine_resolves_auto_by_its_own_flags():
    flags = precision.cpu_flags()
    want = ("mixed_bfloat16" if {"avx512_bf16", "amx_bf16"} & flags
            or precision.accelerator_has_bf16() else "float32")
    assert precision.resolve("auto") == want


def test_int8_qat_stays_float32_under_any_policy():
    assert precision.for_precision("mixed_bfloat16", "int8_qat") == "float32"
    assert precision.for_precision("auto", "int8_qat", cpu_flags_={"amx_bf16"}) == "float32"
    for prec in ("float", "ternary", "4bit"):
        assert precision.for_precision("mixed_bfloat16", prec) == "mixed_bfloat16"
        assert precision.for_precision("float32", prec) == "float32"
    # why: tfmot's fake-quant kernels take float32 only
    with precision.policy_scope("mixed_bfloat16"):
        net = models.build_model((8, 8, 1), 3, depth=8, width=2, sigma=0.0)
        with pytest.raises(TypeError, match="float32"):
            binary_relax.quantize_model(net, "int8_qat")


def test_policy_scope_restores_the_global_policy():
    assert _global() == "float32"
    with precision.policy_scope("mixed_bfloat16") as name:
        assert name == _global() == "mixed_bfloat16"
    assert _global() == "float32"
    with pytest.raises(RuntimeError):
        with precision.policy_scope("mixed_bfloat16"):
            raise RuntimeError("inside")
    assert _global() == "float32"


def test_config_field_takes_the_policies():
    c = config_lib.base_config()
    assert c.optim.dtype_policy == "float32"
    for name in precision.POLICIES:
        c.optim.dtype_policy = name
        config_lib.validate(c)
    c.optim.dtype_policy = "bfloat16"
    with pytest.raises(ValueError, match="dtype_policy"):
        config_lib.validate(c)
    old = config_lib.base_config()
    del old.optim["dtype_policy"]  # a work dir's config.json from before the field
    config_lib.validate(old)


# ---------------------------------------------------------------- bf16 training
def _toy_data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n).astype(np.int32)
    x = (rng.uniform(0.1, 0.4, size=(n, 8, 8, 1)) + 0.25 * y[:, None, None, None])
    return x.astype(np.float32), y


def _net(sigma=0.1, prec="ternary", width=4):
    net = models.build_model((8, 8, 1), 3, depth=8, width=width, sigma=sigma)
    return binary_relax.quantize_model(net, prec, per_channel=True)


@pytest.fixture(scope="module")
def bf16_trained():
    """A tiny ternary EnResNet trained for 2 steps under mixed_bfloat16 (once per module)."""
    keras.utils.set_random_seed(0)
    with precision.policy_scope("mixed_bfloat16"):
        net = _net()
    trainer = adversarial_model.AdversarialModel(net, "tradeoff", eps=0.1, eps_iter=0.05,
                                                 steps=1, weight_decay=5e-4)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True))
    x, y = _toy_data(64)
    before = [w.numpy().copy() for w in net.trainable_weights]
    hist = trainer.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return net, trainer, before, hist, x


def test_bf16_training_computes_in_bf16_with_float32_variables(bf16_trained):
    net, trainer, before, hist, x = bf16_trained
    assert _global() == "float32"
    assert np.isfinite(hist.history["loss"][-1])
    assert "bfloat16" in precision.compute_dtypes(net)
    assert net(x[:4]).dtype == tf.bfloat16 and trainer(x[:4]).dtype == tf.float32
    assert {v.dtype for v in net.weights} <= {tf.float32, tf.int32}  # int32: tfmot's step
    slots = trainer.optimizer.variables
    slots = slots() if callable(slots) else slots
    assert slots and all(v.dtype == tf.float32 for v in slots if v.dtype.is_floating)
    moved = [np.abs(w.numpy() - b).max() for w, b in zip(net.trainable_weights, before)]
    assert min(moved) > 0  # every variable got a float32 gradient step
    lam, _ = binary_relax.br_state(net)
    assert lam == 1.0  # BR state variables read as float32 (no schedule here)


def test_bf16_checkpoint_restores_into_a_float32_model_that_evaluates_and_exports_alike(
        bf16_trained, tmp_path):
    net, _, _, _, x = bf16_trained
    path = tf.train.Checkpoint(net=net).save(str(tmp_path / "ckpt"))
    keras.utils.set_random_seed(1)
    f32 = _net()  # built under the float32 policy, other initial weights
    tf.train.Checkpoint(net=f32).restore(path).assert_existing_objects_matched()
    assert precision.compute_dtypes(f32) == {"float32"}
    for a, b in zip(net.weights, f32.weights):
        assert a.shape == b.shape and b.dtype == a.dtype
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for m in (net, f32):
        binary_relax.set_exact(m)  # (the fixture's net stays exact: this test runs last)
    qa, qb = binary_relax.quantized_kernels(net), binary_relax.quantized_kernels(f32)
    assert sorted(qa) == sorted(qb)
    for name in qa:
        np.testing.assert_array_equal(qa[name], qb[name])
    # the deploy copy (export) is the same float32 model, whatever policy trained it
    copies = [binary_relax.copy_to_float(m, models.build_model((8, 8, 1), 3, depth=8, width=4,
                                                               sigma=0.0)) for m in (net, f32)]
    for a, b in zip(*(c.get_weights() for c in copies)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(copies[0](x).numpy(), copies[1](x).numpy())


def test_bf16_run_in_a_work_dir_loads_as_float32(tmp_path):
    wd = str(tmp_path / "run")
    c = smoke.get_config("ternary,tradeoff")
    c.optim.dtype_policy = "mixed_bfloat16"
    c.optim.epochs, c.data.max_train_examples, c.optim.bn_reestimate_batches = 1, 128, 1
    c.model.sigma = 0.0  # deterministic outputs to compare
    rows = train_lib.train(c, wd, verbose=0)
    assert len(rows) == 1 and np.isfinite(rows[0]["loss"]) and _global() == "float32"
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # a caller's global policy
    try:
        net = train_lib.load(wd)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert precision.compute_dtypes(net) == {"float32"}
    assert binary_relax.br_state(net)[1] is True  # exact Q(w), as for a float32 run
    again = train_lib.load(wd)
    x = np.random.default_rng(0).uniform(size=(8, 28, 28, 1)).astype(np.float32)
    np.testing.assert_array_equal(net(x).numpy(), again(x).numpy())
    assert net(x).dtype == tf.float32


# ---------------------------------------------------------------- Q(w) levels
@pytest.mark.parametrize("prec,levels", [("ternary", 3), ("4bit", 15)])
def test_quantized_weights_keep_their_levels_under_bf16(prec, levels):
    keras.utils.set_random_seed(0)
    with precision.policy_scope("mixed_bfloat16"):
        net = models.build_model((8, 8, 1), 3, depth=8, width=16, sigma=0.0)
        qnet = binary_relax.quantize_model(net, prec)  # one scale per layer
    binary_relax.set_exact(qnet)
    qnet(np.zeros((1, 8, 8, 1), np.float32))  # eager: each wrapper keeps the u it used
    found = binary_relax.br_quantizers(qnet)
    assert found
    for wrapper, weight, quantizer, _ in found:
        u = wrapper.layer.kernel
        assert u.dtype == tf.bfloat16 and weight.dtype == tf.float32
        q32 = quantizer.q_fn(weight).numpy()  # Q(w) in float32, as export computes it
        assert q32.dtype == np.float32
        u32 = tf.cast(u, tf.float32).numpy()
        np.testing.assert_array_equal(u32, tf.cast(tf.cast(q32, tf.bfloat16), tf.float32).numpy())
        assert len(np.unique(u32)) == len(np.unique(q32)) <= levels  # no level merged
        if q32.size >= 2000:  # the 3x3x16x16 kernels and larger use every level
            assert len(np.unique(q32)) == levels
