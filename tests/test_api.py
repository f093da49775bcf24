"""The public API, exactly as the README's "Use it from Keras" shows it."""

import os
import platform
import subprocess
import sys

import numpy as np


def test_readme_example_runs_as_written(tmp_path):
    import brkeras
    from brkeras import keras  # the tf_keras that tfmot needs, public

    out_dir = str(tmp_path / "brkeras_api_demo")
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(256, 28, 28, 1)).astype("float32"); y = rng.integers(0, 10, 256)
    x_test, y_test = x[:64], y[:64]

    net = brkeras.build_model((28, 28, 1), 10, depth=8, width=8, ensemble=1, sigma=0.1)
    qnet = brkeras.quantize_model(net, precision="ternary", per_channel=True)
    trainer = brkeras.AdversarialModel(qnet, loss="tradeoff", eps=0.1, eps_iter=0.04, steps=3)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True))
    trainer.fit(x, y, batch_size=64, epochs=2,
                callbacks=[brkeras.BinaryRelaxSchedule(lam0=1.0, rho=10.0, phase2_epoch=1)])
    result = brkeras.evaluate_model(qnet, x_test, y_test, eps=0.1, attacks=("fgsm", "pgd20"),
                                    eot_samples=2)
    # On toy data, near-tied logits can flip under int8 activations: optional_formats
    # drops such a file (files["dropped"] says why) instead of raising ParityError.
    files = brkeras.export_tflite(qnet, out_dir, formats=("float32", "full_int8"),
                                  representative_data=x[:32], parity_data=(x_test, y_test),
                                  optional_formats=("full_int8",))

    # evaluate_model: the eval.json content, with the attacks asked for.
    assert result["n_examples"] == 64 and result["eps"] == 0.1
    assert set(result["attacks"]) == {"fgsm", "pgd20"}
    assert result["noise"] == {"sigma": 0.1, "draws": 2, "stochastic": True}
    pgd = result["attacks"]["pgd20"]
    assert pgd["plain"]["mean_linf"] <= 0.1 + 1e-6 and pgd["eot"] is not None
    assert 0 <= pgd["eot"]["expected"] <= result["natural_acc"]["expected"] + 0.2
    assert all("held" in c for c in result["sanity"])
    # Ternary: three levels per layer and a share of exact zeros in the report.
    assert 0 < result["sparsity"]["overall"]["zero_share"] < 1
    # export_tflite: records of files that exist, with their parity checks.
    recs = files["files"]
    shipped = {(r["format"], r["noise"]) for r in recs}
    assert shipped >= {("float32", True), ("float32", False)}
    # full int8 either ships with its parity check or is dropped with the reason
    assert all(d["format"] == "full_int8" and d["reason"] for d in files["dropped"])
    assert ("full_int8", False) in shipped or files["dropped"]
    for r in recs:
        assert os.path.getsize(r["path"]) == r["size_bytes"] > 0
        assert r["parity"]
    # The model was evaluated in exact Q(w) and handed back in the phase it had.
    from brkeras.quant import binary_relax
    assert binary_relax.br_state(qnet)[1] is True  # phase II since epoch 1


def test_public_names_resolve_lazily():
    import brkeras
    for name in brkeras.__all__:
        assert getattr(brkeras, name) is not None
    try:
        brkeras.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("unknown names must raise AttributeError")


_ONEDNN_PROBE = (
    "import os, brkeras; from brkeras.train import precision; "
    "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), precision.onednn_enabled())")
_TF_FIRST_PROBE = (
    "import os, tensorflow, brkeras; print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'))")


def _run_probe(probe, env_value):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if env_value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = env_value
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_importing_brkeras_turns_onednn_on_unless_the_user_said_no():
    value, enabled = _run_probe(_ONEDNN_PROBE, None)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert value == "None"  # left to TensorFlow off x86
        return
    assert value == "1"
    if sys.platform.startswith("linux"):  # TF's Linux x86 wheels are built with oneDNN
        assert enabled == "True"
        assert _run_probe(_ONEDNN_PROBE, "0") == ["0", "False"]  # the user's choice wins
    # Too late once TensorFlow is loaded: brkeras then leaves the variable alone.
    assert _run_probe(_TF_FIRST_PROBE, None) == ["None"]
