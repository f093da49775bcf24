"""robust.evaluation: APGD in the attack registry, the worst case per example, the
prefix shared by EOT draws, the reuse of runs, and the new sanity checks."""

import numpy as np
import pytest

from brkeras import data
from brkeras._keras import keras, tf
from brkeras.nn import models
from brkeras.robust import evaluation
from brkeras.robust import sanity
from brkeras.train import batchnorm

EPS = 0.03


def _fmnist(n_train=2000, n_test=200):
    xt, yt = data.load_arrays("fashion_mnist", "train", n_train)
    xe, ye = data.load_arrays("fashion_mnist", "test", n_test)
    return ((xt.astype(np.float32) / 255.0, yt.astype(np.int32)),
            (xe.astype(np.float32) / 255.0, ye.astype(np.int32)))


def _trained(sigma, seed=0):
    """A depth-8 width-4 EnResNet trained naturally for 3 epochs on 2000 images (seconds),
    its BatchNorm statistics re-estimated (after ~100 steps the moving averages are
    stale: test accuracy 0.26-0.61 by seed and CPU, 0.63-0.71 after)."""
    (xt, yt), test = _fmnist()
    keras.utils.set_random_seed(seed)
    m = models.build_model((28, 28, 1), 10, depth=8, width=4, sigma=sigma)
    m.compile(keras.optimizers.Adam(0.01),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m.fit(xt, yt, epochs=3, batch_size=64, verbose=0)
    batchnorm.reestimate(m, [xt[i:i + 250] for i in range(0, len(xt), 250)])
    return m, test


@pytest.fixture(scope="module")
def noisy():
    m, (x, y) = _trained(0.1)
    result, adv = evaluation.evaluate_model(
        m, x, y, eps=EPS, attacks=("fgsm", "pgd20", "apgd_ce", "apgd_dlr"),
        eot_attacks=("pgd20", "apgd_ce", "apgd_dlr"), eot_only=("apgd_ce", "apgd_dlr"),
        eot_samples=2, batch_size=100, eps_sweep=(0.0, EPS, 0.1), sweep_examples=100,
        attack_params={"apgd_steps": 20}, return_adversarial=True)
    return m, x, y, result, adv


@pytest.fixture(scope="module")
def deterministic():
    m, (x, y) = _trained(0.0, seed=1)
    result, adv = evaluation.evaluate_model(
        m, x, y, eps=EPS, attacks=("fgsm", "pgd20", "cw", "apgd_dlr"), eot_attacks=("pgd20",),
        eot_samples=2, batch_size=64, eps_sweep=(0.0, EPS, 0.1), sweep_examples=100,
        attack_params={"apgd_steps": 20, "cw_steps": 5}, return_adversarial=True)
    return m, x, y, result, adv


# ---- APGD rows -----------------------------------------------------------------------


def test_apgd_rows_run_with_eot_only(noisy):
    _, _, _, r, _ = noisy
    atk = r["attacks"]
    for name, loss in (("apgd_ce", "ce"), ("apgd_dlr", "dlr")):
        assert atk[name]["settings"] == {"norm": "linf", "eps": EPS, "nb_iter": 20, "loss": loss,
                                         "restarts": 1, "rho": 0.75}
        assert atk[name]["plain"] is None  # eot_only: no weaker plain copy on a noisy model
        e = atk[name]["eot"]
        assert e["draws"] == 2 and 0 < e["mean_linf"] <= EPS + 1e-6 and e["time_s"] >= 0
    assert atk["pgd20"]["plain"] is not None and atk["pgd20"]["eot"]["draws"] == 2


def test_apgd_is_at_least_as_strong_as_pgd20(noisy):
    _, _, _, r, _ = noisy
    atk = r["attacks"]
    nat, pgd = r["natural_acc"]["expected"], atk["pgd20"]["eot"]["expected"]
    assert nat > 0.5 and pgd < nat - 0.05  # a trained model (chance: 0.1), and the attack matters
    for name in ("apgd_ce", "apgd_dlr"):
        # within two binomial standard errors: the expected prediction of 2 draws is noisy
        a = atk[name]["eot"]["expected"]
        assert a <= pgd + sanity.tolerance(a, pgd, 200, True), (name, a, pgd)
    # ... and the worst case, which has both, is below PGD-20 EOT outright
    assert r["worst_case"]["expected"] <= pgd
    checks = {c["check"]: c for c in r["sanity"]}
    for name in ("apgd_ce", "apgd_dlr"):
        assert checks[f"APGD <= PGD-20 ({name} eot vs PGD-20 eot)"]["held"]


def test_apgd_plain_on_a_deterministic_model(deterministic):
    _, _, _, r, _ = deterministic
    e = r["attacks"]["apgd_dlr"]
    # no noise: 2 of 200 examples of slack for the random starts of both attacks
    assert e["eot"] is None
    assert e["plain"]["expected"] <= r["attacks"]["pgd20"]["plain"]["expected"] + 0.01


# ---- worst case ----------------------------------------------------------------------


def test_worst_case_is_below_every_attack(noisy):
    _, x, y, r, adv = noisy
    wc = r["worst_case"]
    assert wc["members"] == ["natural", "fgsm/plain", "pgd20/plain", "pgd20/eot", "apgd_ce/eot",
                             "apgd_dlr/eot"]
    accs = [r["natural_acc"]["expected"]] + [r["attacks"][k.split("/")[0]][k.split("/")[1]]
                                             ["expected"] for k in wc["members"][1:]]
    assert wc["expected"] <= min(accs)
    assert wc["expected"] == pytest.approx(adv["robust"].mean())
    assert wc["strongest"] == wc["members"][1 + int(np.argmin(accs[1:]))]
    assert sum(wc["broken_only_by"].values()) <= len(y) * (1 - wc["expected"])
    assert {c["check"]: c["held"] for c in r["sanity"]}["worst case <= every attack"]
    # the worst-case examples: in the ball and the box, one per example
    assert adv["x_adv"].shape == x.shape and adv["y"].tolist() == y.tolist()
    assert np.abs(adv["x_adv"] - x).max() <= EPS + 1e-6
    assert adv["x_adv"].min() >= 0 and adv["x_adv"].max() <= 1
    assert adv["members"].tolist() == wc["members"][1:]
    assert adv["source"].min() >= 0 and adv["source"].max() < len(wc["members"]) - 1


def test_worst_case_examples_are_the_breaking_ones(deterministic):
    m, x, y, r, adv = deterministic
    pred = lambda v: np.argmax(m.predict(v, verbose=0), 1)  # noqa: E731
    nat = pred(x) == y
    right = pred(adv["x_adv"]) == y
    # a deterministic model: an example right on its clean image but not robust was
    # broken by an attack, and its stored x_adv is that attack's
    assert not np.any(right[nat & ~adv["robust"]])
    assert np.all(right[adv["robust"]])
    # cw (L2, unbounded) is not a member; cw_rescaled (in the eps-ball) is
    assert "cw/plain" not in r["worst_case"]["members"]
    assert "cw_rescaled/plain" in r["worst_case"]["members"]


def test_worst_case_function():
    members = {"natural": np.array([1, 1, 1, 0], bool), "a": np.array([1, 0, 1, 1], bool),
               "b": np.array([1, 0, 0, 1], bool)}
    wc, robust = evaluation.worst_case(members)
    assert robust.tolist() == [True, False, False, False]
    assert wc["expected"] == 0.25 and wc["strongest"] == "b"
    assert wc["broken_only_by"] == {"natural": 1, "a": 0, "b": 1}


def test_worst_case_examples_tracker():
    x = np.zeros((4, 2), np.float32)
    t = evaluation.WorstCaseExamples(x)
    t.add("a", np.array([1, 0, 1, 1], bool), np.full((4, 2), 1.0, np.float32))
    t.add("b", np.array([0, 0, 1, 1], bool), np.full((4, 2), 2.0, np.float32))  # stronger
    t.add("c", np.array([1, 1, 1, 1], bool), np.full((4, 2), 3.0, np.float32))  # weaker
    # example 1: first broken by a; 0: by b; 2, 3: unbroken, the strongest (b)
    assert t.x_adv[:, 0].tolist() == [2.0, 1.0, 2.0, 2.0]
    assert t.source.tolist() == [1, 0, 1, 1]


# ---- no repeated work ----------------------------------------------------------------


def test_sweep_and_more_effort_reuse_the_main_runs(deterministic):
    _, _, _, r, _ = deterministic
    sweep, k = r["eps_sweep"], r["eps_sweep"]["n_examples"]
    assert k == 100 and r["n_examples"] == 200 and sweep["eps"][1] == EPS
    # both are the main plain PGD-20 run on the first k examples (PGD starts at random:
    # two runs would differ)
    assert r["more_effort"]["pgd20"]["expected"] == sweep["attacks"]["pgd20"]["expected"][1]
    assert r["more_effort"]["pgd20"]["single"] == sweep["attacks"]["pgd20"]["single"][1]


def test_reuse_is_exact_on_the_first_examples():
    """With sweep_examples = all examples the reused numbers equal the main ones."""
    m, (x, y) = _trained(0.0, seed=2)
    r = evaluation.evaluate_model(m, x[:64], y[:64], eps=EPS, attacks=("fgsm", "pgd20"),
                                  eot_attacks=(), batch_size=64, eps_sweep=(0.0, EPS),
                                  sweep_examples=64)
    for name in ("fgsm", "pgd20"):
        assert r["eps_sweep"]["attacks"][name]["expected"] == [
                r["natural_acc"]["expected"], r["attacks"][name]["plain"]["expected"]]
    main = r["attacks"]["pgd20"]["plain"]
    assert r["more_effort"]["pgd20"] == {"single": main["single"], "expected": main["expected"]}


# ---- the deterministic prefix of the EOT draws ---------------------------------------


def test_split_at_noise_cuts_before_the_first_noise():
    keras.utils.set_random_seed(3)
    m = models.build_model((28, 28, 1), 10, depth=8, width=4, sigma=0.1)
    x = np.random.default_rng(0).uniform(size=(16, 28, 28, 1)).astype(np.float32)
    prefix, suffix = evaluation.split_at_noise(m, check_x=x[:4])
    assert [t.name.split("/")[0] for t in prefix.outputs] == ["m0_s1_b0_add"]
    h = prefix(x, training=False)
    np.testing.assert_array_equal(h.numpy(), prefix(x, training=False).numpy())  # no noise
    # with the noise off, suffix(prefix(x)) is the model
    for layer in evaluation._noise_layers(m):  # pylint: disable=protected-access
        layer.sigma = 0.0
    np.testing.assert_allclose(suffix([h]).numpy(), m(x).numpy(), rtol=1e-5, atol=1e-5)
    assert evaluation.split_at_noise(m) is None  # sigma 0 everywhere: nothing to split
    two = models.build_model((28, 28, 1), 10, depth=8, width=4, ensemble=2, sigma=0.1)
    p2, _ = evaluation.split_at_noise(two, check_x=x[:4])
    assert len(p2.outputs) == 2  # one cut per member


def test_split_eot_gradient_equals_the_full_one():
    """Without noise both EOT paths are exact functions of x: the gradients must agree."""
    # pylint: disable=protected-access
    from brkeras.robust import attacks, apgd  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(4)
    m = models.build_model((28, 28, 1), 10, depth=8, width=4, sigma=0.1)
    x = np.random.default_rng(1).uniform(size=(8, 28, 28, 1)).astype(np.float32)
    y = np.arange(8, dtype=np.int32)
    sm = evaluation.StochasticModel(m, 3, 8, check_x=x[:4])
    assert sm.split and len(sm.eot_split) == 3
    for layer in evaluation._noise_layers(m):
        layer.sigma = 0.0
    xt, yt, three = tf.constant(x), tf.constant(y), tf.constant(3)
    full = lambda v: m(v, training=False)  # noqa: E731
    g_split, z_split = attacks._eot_grad(sm, xt, yt, three, False)
    g_full, z_full = attacks._eot_grad(full, xt, yt, three, False)
    np.testing.assert_allclose(g_split.numpy(), g_full.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(z_split.numpy(), z_full.numpy(), rtol=1e-5, atol=1e-5)
    l_s, g_s, _ = apgd._eval(sm, xt, yt, None, three, "dlr")
    l_f, g_f, _ = apgd._eval(full, xt, yt, None, three, "dlr")
    np.testing.assert_allclose(l_s.numpy(), l_f.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_s.numpy(), g_f.numpy(), rtol=1e-4, atol=1e-6)


# ---- sanity checks -------------------------------------------------------------------


def _result():
    def acc(a):
        return {"single": a, "expected": a}
    return {"natural_acc": acc(0.8),
            "attacks": {"pgd20": {"plain": acc(0.5), "eot": acc(0.45)},
                        "apgd_ce": {"plain": None, "eot": acc(0.43)},
                        "apgd_dlr": {"plain": None, "eot": acc(0.44)}},
            "worst_case": {"expected": 0.4, "members": ["natural", "pgd20/plain", "pgd20/eot",
                                                        "apgd_ce/eot", "apgd_dlr/eot"]}}


def _failed(r, stochastic=True):
    return [c["check"] for c in sanity.sanity_checks(r, 1000, stochastic, 10, 300)
            if not c["held"]]


def test_sanity_new_checks_hold_and_flag():
    r = _result()
    names = [c["check"] for c in sanity.sanity_checks(r, 1000, True, 10, 300)]
    assert "APGD <= PGD-20 (apgd_ce eot vs PGD-20 eot)" in names
    assert "worst case <= every attack" in names
    assert _failed(r) == []
    r["attacks"]["apgd_dlr"]["eot"]["expected"] = 0.52  # far above PGD-20 EOT (0.45)
    assert _failed(r) == ["APGD <= PGD-20 (apgd_dlr eot vs PGD-20 eot)"]
    r = _result()
    r["worst_case"]["expected"] = 0.44  # above APGD-CE's 0.43: not a worst case
    assert _failed(r, stochastic=False) == ["worst case <= every attack"]
    # the tolerance of APGD vs PGD stays even for a deterministic model (random starts)
    r = _result()
    r["attacks"]["apgd_ce"]["eot"]["expected"] = 0.46
    assert _failed(r, stochastic=False) == []


def test_blackbox_check():
    held = sanity.blackbox_check("Square on f.tflite", 0.62, 0.60, 200)
    assert held["held"] and held["check"] == "black-box >= white-box (Square on f.tflite)"
    low = sanity.blackbox_check("Square on f.tflite", 0.40, 0.60, 200)
    assert not low["held"] and "gradient masking" in low["detail"]
    tol = sanity.tolerance(0.55, 0.60, 200, True)
    assert sanity.blackbox_check("x", 0.60 - tol + 1e-9, 0.60, 200)["held"]
