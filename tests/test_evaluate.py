"""brkeras.evaluate: eval.json schema and values, report, plots, sanity checks, errors."""

import copy
import json
import math
import os
import shutil
import struct
import sys

import numpy as np
import pytest

from brkeras import errors
from brkeras.quant import sparsity
from brkeras.quant import binary_relax
from brkeras.run import evaluate as run_evaluate
from brkeras.robust import sanity
from brkeras.run import train as train_lib
from brkeras.train import precision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import smoke  # noqa: E402  pylint: disable=wrong-import-position

LINF_ATTACKS = ("fgsm", "ifgsm20", "pgd20")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the IHDR chunk of a PNG file; fails on a non-PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def ternary(tmp_path_factory):
    """A smoke-trained ternary model, evaluated once with the smoke config."""
    wd = str(tmp_path_factory.mktemp("eval_ternary"))
    config = smoke.get_config("ternary,tradeoff")
    train_lib.train(config, wd, verbose=0)
    result = run_evaluate.evaluate(wd, verbose=0)
    return wd, config, result


@pytest.fixture(scope="module")
def deterministic(tmp_path_factory):
    """A sigma = 0 model (no noise: single = expected), evaluated with a short eval section."""
    wd = str(tmp_path_factory.mktemp("eval_det"))
    config = smoke.get_config("float,natural")
    config.model.sigma = 0.0
    config.optim.epochs = 1
    train_lib.train(config, wd, verbose=0)
    over = copy.deepcopy(config)
    over.eval.attacks = ("fgsm", "pgd20")
    over.eval.eot_attacks = ("fgsm", "pgd20")  # listed, but sigma 0 leaves nothing to average
    over.eval.max_examples = 32
    over.eval.first_example = 16  # images 16-47 of the test split
    over.eval.batch_size = 32
    over.eval.eps_sweep = (0.0, 0.3)
    return wd, over, run_evaluate.evaluate(wd, overrides=over, verbose=0)


# ---- eval.json: schema and values ------------------------------------------------


def test_eval_json_on_disk_is_the_returned_result(ternary):
    wd, _, result = ternary
    with open(os.path.join(wd, "eval.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["onednn"] == precision.onednn_enabled()  # which kernels ran the attacks


def test_natural_accuracy_and_counts(ternary):
    wd, config, r = ternary
    n = config.eval.max_examples
    assert r["n_examples"] == n == 64
    assert r["eps"] == pytest.approx(config.adv.eps)
    assert r["noise"] == {"sigma": 0.1, "draws": config.eval.eot_samples, "stochastic": True}
    assert r["training"] == {"completed_epochs": config.optim.epochs, "finished": True}
    assert set(r["natural_acc"]) == {"single", "expected"}
    for v in r["natural_acc"].values():
        assert 0 <= v <= 1
        assert v * n == pytest.approx(round(v * n))  # a count of n examples


def test_attack_entries(ternary):
    _, config, r = ternary
    n, eps = r["n_examples"], config.adv.eps
    atk = r["attacks"]
    assert list(atk) == ["fgsm", "ifgsm20", "pgd20", "cw", "cw_rescaled"]
    assert atk["fgsm"]["settings"] == {"norm": "linf", "eps": eps}
    assert atk["ifgsm20"]["settings"] == {"norm": "linf", "eps": eps, "eps_iter": eps / 8,
                                          "nb_iter": 20, "rand_init": False}
    assert atk["pgd20"]["settings"] == {"norm": "linf", "eps": eps, "eps_iter": eps / 4,
                                        "nb_iter": 20, "rand_init": True}
    assert atk["cw"]["settings"] == {"norm": "l2", "c": 10.0, "kappa": 0.0, "lr": 6e-4,
                                     "steps": 50, "rescale_eps": eps}
    assert atk["cw_rescaled"]["settings"]["note"].startswith("x + eps * (x_cw - x)")
    for name in LINF_ATTACKS:
        for mode in ("plain", "eot"):  # all three are in the smoke config's eot_attacks
            e = atk[name][mode]
            assert {"single", "expected", "mean_linf", "mean_l2"} <= set(e)
            for kind in ("single", "expected"):
                assert 0 <= e[kind] <= 1 and e[kind] * n == pytest.approx(round(e[kind] * n))
            # L-inf attacks stay in the eps-ball; FGSM moves every pixel (clipped) by ~eps
            assert 0 < e["mean_linf"] <= eps + 1e-6
        assert atk["fgsm"]["plain"]["mean_linf"] == pytest.approx(eps, abs=1e-5)
    for name in ("cw", "cw_rescaled"):
        assert atk[name]["eot"] is None  # cw is not in eot_attacks
        assert set(atk[name]["plain"]) >= {"single", "expected"}
    assert atk["cw"]["plain"]["mean_l2"] >= 0


def test_eps_sweep(ternary):
    _, config, r = ternary
    sweep = r["eps_sweep"]
    assert sweep["eps"] == pytest.approx(list(config.eval.eps_sweep))
    assert sweep["n_examples"] == min(r["n_examples"], config.eval.sweep_examples)
    assert set(sweep["attacks"]) == {"fgsm", "pgd20"}
    for accs in sweep["attacks"].values():
        assert set(accs) == {"single", "expected"}
        for kind in ("single", "expected"):
            assert len(accs[kind]) == len(config.eval.eps_sweep)
            assert all(0 <= a <= 1 for a in accs[kind])
    # PGD-20 at eps 0.3 on a near-chance model leaves few correct examples
    assert sweep["attacks"]["pgd20"]["expected"][-1] <= 0.2


def test_sanity_list_and_more_effort(ternary):
    _, _, r = ternary
    assert set(r["more_effort"]) == {"pgd20", "steps_x2", "restarts_x2", "n_examples"}
    checks = r["sanity"]
    assert all(set(c) == {"check", "held", "detail"} for c in checks)
    assert all(isinstance(c["held"], bool) for c in checks)
    names = [c["check"] for c in checks]
    assert len(names) == len(set(names))
    # 5 attacks x plain (2 kinds) + 3 x eot (2 kinds); PGD<=FGSM x2; EOT<=plain x3;
    # sweep: 2 attacks x 2 steps, PGD-20 <= FGSM at the 2 eps > 0, near chance once;
    # 2 more-effort checks; worst case;
    # finite x_adv per attack and mode run (4 plain, cw_rescaled derives from cw; 3 eot)
    assert len(checks) == 10 + 6 + 2 + 3 + 7 + 2 + 1 + 7
    assert all(c["held"] for c in checks if c["check"].startswith("finite x_adv"))
    # the stored checks are exactly what the pure function gives on the stored result
    n, m = r["n_examples"], r["eps_sweep"]["n_examples"]
    assert sanity.sanity_checks(r, n, True, 10, m) == checks


def test_sparsity_matches_the_quantized_kernels(ternary):
    wd, _, r = ternary
    expected = sparsity.report(binary_relax.quantized_kernels(train_lib.load(wd)))
    assert json.loads(json.dumps(expected)) == r["sparsity"]
    overall = r["sparsity"]["overall"]
    # depth 8: conv0 + one block of two 3x3 convs in each of 3 stages
    assert overall["layers"] == len(r["sparsity"]["layers"]) == 7
    assert overall["zeros"] == sum(s["zeros"] for s in r["sparsity"]["layers"].values())
    assert overall["zero_share"] == pytest.approx(overall["zeros"] / overall["params"])
    assert 0 < overall["zero_share"] < 1  # ternary: |w| < 0.7 mean|w| become 0
    assert all(s["distinct_values"] <= 3 for s in r["sparsity"]["layers"].values())


# ---- report.md and plots ----------------------------------------------------------


def test_report_mentions_every_attack_and_check(ternary):
    wd, _, r = ternary
    with open(os.path.join(wd, "report.md")) as f:
        text = f.read()
    for name in r["attacks"]:
        assert f"| {name} |" in text
    for c in r["sanity"]:
        assert c["check"] in text
    assert "**single**" in text and "**expected**" in text and "EOT" in text
    assert "## Accuracy vs eps" in text and "## More attack effort" in text
    pct = f"{100 * r['natural_acc']['expected']:.2f}"
    assert f"| natural | - | {100 * r['natural_acc']['single']:.2f} | {pct} |" in text


def test_plots_are_pngs(ternary):
    wd, _, _ = ternary
    for name in ("accuracy_vs_eps.png", "sparsity_per_layer.png", "training_curves.png"):
        w, h = png_size(os.path.join(wd, "plots", name))
        assert w >= 300 and h >= 200
        assert f"plots/{name}" in open(os.path.join(wd, "report.md")).read()


# ---- deterministic model ------------------------------------------------------------


def test_deterministic_single_equals_expected_and_no_eot(deterministic):
    _, over, r = deterministic
    assert r["noise"] == {"sigma": 0.0, "draws": 1, "stochastic": False}
    assert r["n_examples"] == over.eval.max_examples == 32
    assert r["images"] == {"split": "test", "first": 16}
    adv = np.load(os.path.join(r["workdir"], "adversarial.npz"))
    np.testing.assert_array_equal(adv["y"], run_evaluate.eval_images(over)[1])
    assert r["natural_acc"]["single"] == r["natural_acc"]["expected"]
    assert list(r["attacks"]) == ["fgsm", "pgd20"]
    for entry in r["attacks"].values():
        assert entry["eot"] is None
        assert entry["plain"]["single"] == entry["plain"]["expected"]
    sweep = r["eps_sweep"]
    for accs in sweep["attacks"].values():
        assert accs["single"] == accs["expected"]
        # eps 0 on the same examples of a deterministic model is the natural accuracy
        assert accs["expected"][0] == r["natural_acc"]["expected"]
    assert not any(c["check"].startswith("EOT") for c in r["sanity"])
    assert all("(+ tolerance 0.0000)" in c["detail"] for c in r["sanity"]
               if "tolerance" in c["detail"])
    assert "sigma 0: a deterministic model" in open(os.path.join(r["workdir"], "report.md")).read()


# ---- sanity_checks as a pure function ------------------------------------------------


def consistent():
    """A hand-made result in which every sanity check holds exactly."""
    def acc(a):
        return {"single": a, "expected": a}
    return {
        "natural_acc": acc(0.8),
        "attacks": {"fgsm": {"plain": acc(0.5), "eot": acc(0.4)},
                    "pgd20": {"plain": acc(0.3), "eot": acc(0.2)},
                    "cw": {"plain": acc(0.6), "eot": None}},
        "eps_sweep": {"eps": [0.0, 0.1, 0.3], "n_examples": 100,
                      "attacks": {"fgsm": acc([0.8, 0.5, 0.05]), "pgd20": acc([0.8, 0.3, 0.0])}},
        "more_effort": {"pgd20": acc(0.3), "steps_x2": acc(0.25), "restarts_x2": acc(0.28),
                        "n_examples": 100},
    }


def failed(result, stochastic=False):
    return [c["check"] for c in sanity.sanity_checks(result, 100, stochastic, 10, 100)
            if not c["held"]]


def test_sanity_consistent_result_passes():
    checks = sanity.sanity_checks(consistent(), 100, False, 10, 100)
    # 3 attacks x plain x 2 kinds + 2 x eot x 2; PGD<=FGSM x2; EOT<=plain x2; sweep 2 x 2
    # steps + PGD<=FGSM at 2 eps + near chance; more effort 2
    assert len(checks) == 6 + 4 + 2 + 2 + 7 + 2
    assert all(c["held"] for c in checks)
    assert all("tolerance 0.0000" in c["detail"] for c in checks if "tolerance" in c["detail"])


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["attacks"]["fgsm"]["plain"].update(expected=0.81),
     ["robust <= natural (fgsm, plain, expected)"]),
    (lambda r: r["attacks"]["pgd20"]["plain"].update(expected=0.55),
     ["PGD-20 <= FGSM (plain, expected)"]),
    (lambda r: r["eps_sweep"]["attacks"]["fgsm"].update(expected=[0.8, 0.3, 0.35]),
     ["non-increasing in eps (fgsm, 0.1 -> 0.3)"]),
    (lambda r: r["eps_sweep"]["attacks"]["pgd20"].update(expected=[0.8, 0.5, 0.5]),
     ["PGD-20 <= FGSM (sweep, eps=0.3)"]),  # FGSM reaches chance: the check is PGD's
    (lambda r: [r["eps_sweep"]["attacks"][a].update(expected=[0.8, 0.5, 0.4])
                for a in ("fgsm", "pgd20")],
     ["near chance at eps=0.3 (strongest: fgsm)"]),
    (lambda r: r["eps_sweep"]["attacks"]["fgsm"].update(expected=[0.8, 0.55, 0.3]),
     []),  # a single step above chance far out, PGD-20 at 0: no masking, no flag
    (lambda r: r["attacks"]["fgsm"]["eot"].update(expected=0.6),
     ["EOT <= plain (fgsm, expected)"]),
    (lambda r: r["more_effort"]["steps_x2"].update(expected=0.35),
     ["more effort never raises accuracy (PGD-20 steps_x2)"]),
    (lambda r: r["more_effort"]["restarts_x2"].update(expected=0.31),
     ["more effort never raises accuracy (PGD-20 restarts_x2)"]),
])
def test_sanity_flags_each_violation(edit, expected):
    r = consistent()
    edit(r)
    assert failed(r) == expected


def test_sanity_tolerance_for_a_stochastic_model():
    r = consistent()
    r["attacks"]["fgsm"]["plain"]["expected"] = 0.81  # 1 point above natural
    assert failed(r, stochastic=True) == []
    tol = 2 * math.sqrt(0.8 * 0.2 / 100)  # max p(1-p) of 0.81 and 0.8 is 0.8 * 0.2
    detail = [c["detail"] for c in sanity.sanity_checks(r, 100, True, 10, 100)
              if c["check"] == "robust <= natural (fgsm, plain, expected)"][0]
    assert detail.endswith(f"(+ tolerance {tol:.4f})")
    r["attacks"]["fgsm"]["plain"]["expected"] = 0.95  # far beyond two standard errors
    assert failed(r, stochastic=True) == ["robust <= natural (fgsm, plain, expected)"]


def test_tolerance_values():
    assert sanity.tolerance(0.5, 0.5, 100, False) == 0.0
    assert sanity.tolerance(0.5, 0.3, 100, True) == pytest.approx(0.1)
    assert sanity.tolerance(0.0, 0.0, 100, True) == pytest.approx(2 * math.sqrt(0.01 / 100))


def test_sanity_skips_missing_sections():
    r = consistent()
    del r["eps_sweep"], r["more_effort"]
    assert len(sanity.sanity_checks(r, 100, False, 10, 100)) == 6 + 4 + 2 + 2


# ---- errors -------------------------------------------------------------------------


def test_unknown_attack_is_a_clear_error(ternary):
    wd, config, _ = ternary
    before = os.path.getmtime(os.path.join(wd, "eval.json"))
    over = copy.deepcopy(config)
    over.eval.attacks = ("fgsm", "deepfool")
    with pytest.raises(ValueError, match=r"unknown attacks \['deepfool'\].*choose from"):
        run_evaluate.evaluate(wd, overrides=over, verbose=0)
    assert os.path.getmtime(os.path.join(wd, "eval.json")) == before


@pytest.mark.parametrize("field, value, match", [
    ("eps_sweep", (0.3, 0.1), "ascending"),
    ("eps_sweep", (), "ascending"),
    ("eot_samples", 0, "eot_samples"),
    ("first_example", -1, "first_example"),
    ("split", "validation", "eval.split"),
])
def test_bad_eval_config_is_a_clear_error(ternary, field, value, match):
    wd, config, _ = ternary
    over = copy.deepcopy(config)
    over.eval[field] = value
    with pytest.raises(ValueError, match=match):
        run_evaluate.evaluate(wd, overrides=over, verbose=0)


def test_eval_images_from_first_example_and_split(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(12, 4, 4, 1), dtype=np.uint8)
    y_train = np.arange(12) % 3
    x_test, y_test = x_train[:10] // 2, y_train[:10]
    path = str(tmp_path / "d.npz")
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    config = smoke.get_config()
    config.data.name = path
    config.eval.first_example, config.eval.max_examples = 4, 3
    x, y = run_evaluate.eval_images(config)
    np.testing.assert_allclose(x, x_test[4:7] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y, y_test[4:7])
    config.eval.max_examples = 0  # all from index 4 on
    assert len(run_evaluate.eval_images(config)[1]) == 6
    config.eval.first_example = 10
    with pytest.raises(ValueError, match="first_example=10.*has 10 images"):
        run_evaluate.eval_images(config)
    # training images as a validation set: only those the run did not train on
    config.eval.split, config.data.max_train_examples = "train", 8
    config.eval.first_example = 8
    x, y = run_evaluate.eval_images(config)
    np.testing.assert_allclose(x, x_train[8:] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y, y_train[8:])
    config.eval.first_example = 7
    with pytest.raises(ValueError, match="trained on the first 8"):
        run_evaluate.eval_images(config)
    config.data.max_train_examples, config.eval.first_example = 0, 8
    with pytest.raises(ValueError, match="trained on all of them"):
        run_evaluate.eval_images(config)


def test_untrained_workdir_says_train_first(tmp_path, ternary):
    with pytest.raises(errors.WorkdirError, match="brkeras train"):
        run_evaluate.evaluate(str(tmp_path / "empty"), verbose=0)
    # a config but no checkpoint (a training killed before its first epoch)
    wd = tmp_path / "no_ckpt"
    wd.mkdir()
    shutil.copy(os.path.join(ternary[0], "config.json"), wd / "config.json")
    with pytest.raises(errors.WorkdirError, match="train it"):
        run_evaluate.evaluate(str(wd), verbose=0)
    assert not (wd / "eval.json").exists()
