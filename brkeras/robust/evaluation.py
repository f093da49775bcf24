"""Robust evaluation of a stochastic, quantized model in memory: `evaluate_model`.

The EnResNet's Feynman-Kac noise stays on at test time, so every accuracy here
comes in two kinds, always named:
  single    the prediction of one forward pass (one noise draw);
  expected  the argmax of the mean softmax over `eval.eot_samples` draws.
and every gradient attack is run in two ways:
  plain     gradients of one forward pass per step;
  eot       gradients averaged over `eval.eot_samples` draws (EOT), the sound
            attack on a randomised model.
Attacks follow SPEC 5, scaled to the run's training eps: FGSM; IFGSM-20 (20
steps of eps/8, no random start); PGD-20 (random start, steps of eps/4); CW-L2
(Adam, c = 10, 50 steps), reported plainly and with the reference's rescaling
x + eps (x_cw - x) ("cw_rescaled").

Sanity checks (stored and printed; a violation is a warning, never hidden):
robust <= natural; PGD <= FGSM; accuracy non-increasing over the eps sweep and
near chance at the largest eps; more steps and restarts never raise accuracy;
EOT never raises accuracy. Comparisons allow the sampling noise of the model's
randomness (two binomial standard errors; zero for a deterministic model).

`evaluate_model` returns a dict (`brkeras evaluate` writes it as eval.json):
  n_examples, eps, noise {sigma, draws, stochastic}, training {completed_epochs,
  finished}, natural_acc {single, expected};
  attacks {name: {settings, plain, eot}} for config.eval.attacks, plus
  cw_rescaled after cw; plain/eot = {single, expected[, mean_linf, mean_l2]} or
  None (eot is None for attacks not in eot_attacks and for a deterministic model);
  eps_sweep {eps, n_examples, attacks {fgsm, pgd20: {single: [...], expected: [...]}}};
  more_effort {pgd20, steps_x2, restarts_x2, n_examples}; sanity [{check, held,
  detail}]; sparsity (brkeras.sparsity.report of the exact quantized kernels, or
  of the 3x3 conv kernels of a float model); time_s.
"""

import dataclasses
import math
import time
from typing import Callable

import numpy as np

from brkeras.nn import layers as layers_lib
from brkeras.quant import binary_relax
from brkeras.quant import sparsity
from brkeras.robust import attacks
from brkeras.robust.sanity import sanity_checks
from brkeras._keras import keras, tf

# Settings of the attacks relative to the eval eps (SPEC 5 at CIFAR scale:
# IFGSM-20 steps 1/255 of an 8/255 ball, PGD-20 steps 2/255) and CW's reference values.
DEFAULT_PARAMS = dict(ifgsm_step_fraction=1 / 8, pgd_step_fraction=1 / 4, cw_c=10.0,
                      cw_kappa=0.0, cw_lr=6e-4, cw_steps=50)


@dataclasses.dataclass(frozen=True)
class Attack:
    """An attack of the evaluation: its settings at radius eps, and how to run it.

    settings(eps, params) -> dict (stored in eval.json); run(model_fn, x, y,
    settings, eot_samples) -> x_adv.
    """
    name: str
    settings: Callable
    run: Callable


def _linf_steps(steps, fraction_key, rand_init):
    def settings(eps, p):
        return {"norm": "linf", "eps": eps, "eps_iter": eps * p[fraction_key], "nb_iter": steps,
                "rand_init": rand_init}
    return settings


def _run_pgd(model_fn, x, y, s, eot):
    return attacks.pgd(model_fn, x, s["eps"], s["eps_iter"], s["nb_iter"], y=y,
                       rand_init=s["rand_init"], restarts=s.get("restarts", 1), eot_samples=eot)


# The one registry of evaluation attacks: the CLI, the config check, the
# pipeline's summary and the report read their names from here.
ATTACKS = {
    "fgsm": Attack("fgsm", lambda eps, p: {"norm": "linf", "eps": eps},
                   lambda f, x, y, s, eot: attacks.fgsm(f, x, s["eps"], y=y, eot_samples=eot)),
    "ifgsm20": Attack("ifgsm20", _linf_steps(20, "ifgsm_step_fraction", False), _run_pgd),
    "pgd20": Attack("pgd20", _linf_steps(20, "pgd_step_fraction", True), _run_pgd),
    "cw": Attack("cw", lambda eps, p: {"norm": "l2", "c": p["cw_c"], "kappa": p["cw_kappa"],
                                       "lr": p["cw_lr"], "steps": p["cw_steps"],
                                       "rescale_eps": eps},
                 lambda f, x, y, s, eot: attacks.cw_l2(f, x, y=y, c=s["c"], kappa=s["kappa"],
                                                       lr=s["lr"], steps=s["steps"],
                                                       eot_samples=eot)),
}


def _params(params):
    p = dict(DEFAULT_PARAMS)
    p.update({k: v for k, v in dict(params or {}).items() if k in DEFAULT_PARAMS})
    return p


def attack_settings(name, params, eps):
    """The settings of attack `name` at L-inf radius eps (for the report and the call)."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {tuple(ATTACKS)}")
    return ATTACKS[name].settings(eps, _params(params))


def run_attack(name, settings, model_fn, x, y, eot):
    return ATTACKS[name].run(model_fn, x, y, settings, eot)


class StochasticModel:
    """The network in inference mode with its prediction over noise draws.

    One callable object, so the attacks trace once per model.
    """

    def __init__(self, net, draws, batch_size):
        self.net, self.draws, self.batch_size = net, int(draws), int(batch_size)

    def __call__(self, x):
        return self.net(x, training=False)

    def predict(self, x):
        """(single-draw predictions, expected predictions) over `draws` noise draws."""
        single, expected = [], []
        for i in range(0, len(x), self.batch_size):
            xb = tf.constant(x[i:i + self.batch_size])
            probs = [tf.nn.softmax(self(xb)).numpy() for _ in range(self.draws)]
            single.append(probs[0].argmax(1))
            expected.append(np.mean(probs, axis=0).argmax(1))
        return np.concatenate(single), np.concatenate(expected)

    def accuracy(self, x, y):
        s, e = self.predict(x)
        return {"single": float(np.mean(s == y)), "expected": float(np.mean(e == y))}


def adversarial_examples(model, name, settings, x, y, eot, progress=None):
    """x_adv of attack `name` on a StochasticModel, batch by batch (NumPy in and out)."""
    out = []
    for i in range(0, len(x), model.batch_size):
        xb, yb = x[i:i + model.batch_size], y[i:i + model.batch_size]
        out.append(run_attack(name, settings, model, tf.constant(xb), tf.constant(yb), eot).numpy())
        if progress is not None:
            progress.add(1)
    return np.concatenate(out)


def model_kernels(net):
    """The exact quantized kernels Q(w) of a Binary-Relax model; for any other model
    (float, int8 QAT) the float kernels of its 3x3 convs, unwrapping tfmot wrappers."""
    kernels = binary_relax.quantized_kernels(net)
    if kernels:
        return kernels
    out = {}
    for layer in net.layers:
        inner = getattr(layer, "layer", layer)  # a tfmot QuantizeWrapper holds the conv
        if isinstance(inner, keras.layers.Conv2D) and tuple(inner.kernel_size) == (3, 3):
            # the float variable (inside a wrapper, inner.kernel is the fake-quant tensor)
            float_kernel = [w for w in layer.weights if w.name.endswith("kernel:0")]
            out[inner.name] = float_kernel[0].numpy()
    return out


def check_arguments(attack_names, eot_attacks, eot_samples, batch_size, sweep_examples,
                    eps_sweep):
    """Raises ValueError naming the argument (and its config.eval field) that is wrong."""
    unknown = [a for a in list(attack_names) + list(eot_attacks) if a not in ATTACKS]
    if unknown:
        raise ValueError(f"attacks / eot_attacks (config.eval.attacks / eot_attacks) list "
                         f"unknown attacks {unknown}; choose from {tuple(ATTACKS)}")
    for field, v in (("eot_samples", eot_samples), ("batch_size", batch_size),
                     ("sweep_examples", sweep_examples)):
        if int(v) < 1:
            raise ValueError(f"{field}={v} (config.eval.{field}); it must be >= 1")
    if eps_sweep is not None:
        sweep = [float(e) for e in eps_sweep]
        if not sweep or min(sweep) < 0 or sweep != sorted(sweep):
            raise ValueError(f"eps_sweep={tuple(eps_sweep)} (config.eval.eps_sweep); give one "
                             "or more eps >= 0 in ascending order, e.g. (0.0, 0.1, 0.3)")


def _progress(n, verbose, unit):
    return keras.utils.Progbar(n, verbose=verbose, unit_name=unit)


def evaluate_model(model, x, y, *, eps, attacks=("fgsm", "ifgsm20", "pgd20", "cw"),
                   eot_attacks=("pgd20",), eot_samples=4, batch_size=200, eps_sweep=None,
                   sweep_examples=300, more_effort=True, num_classes=None, attack_params=None,
                   verbose=0):
    """Robust evaluation of a (stochastic, quantized) Keras model on arrays.

    Args:
        model: a Keras model that maps float32 images in [0, 1] to logits. A
            Binary-Relax model is evaluated with its exact weights Q(w) (its phase
            is restored afterwards). Feynman-Kac noise stays on.
        x, y: test images (N, H, W, C) float32 in [0, 1] (uint8 is scaled by 1/255)
            and integer labels (N,).
        eps: L-inf radius of every attack (CW reports its rescaling to eps).
        attacks: names from ATTACKS, run plainly.
        eot_attacks: those also run with gradients averaged over `eot_samples`
            noise draws (only for a stochastic model).
        eot_samples: noise draws for EOT gradients and for the expected prediction.
        batch_size: examples per attack batch.
        eps_sweep: ascending radii for FGSM and PGD-20 on the first
            `sweep_examples` examples (None: no sweep).
        more_effort: PGD-20 with 2x steps and 2x restarts on those examples.
        num_classes: for the near-chance check (default: the model's output width).
        attack_params: overrides of DEFAULT_PARAMS (step fractions, CW settings).
        verbose: 1 for progress bars and messages.

    Returns:
        A dict with the content of eval.json (see the module docstring).

    Example:
        result = evaluate_model(qnet, x_test, y_test, eps=0.1, attacks=("fgsm", "pgd20"),
                                eot_samples=2)
        result["attacks"]["pgd20"]["eot"]["expected"]
    """
    t0 = time.time()
    attack_names = tuple(attacks)
    check_arguments(attack_names, eot_attacks, eot_samples, batch_size, sweep_examples, eps_sweep)
    x = np.asarray(x)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    y = np.asarray(y).reshape(-1).astype(np.int32)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x has {len(x)} examples and y {len(y)}; give the same number >= 1")
    if not 0 <= float(eps) <= 1:
        raise ValueError(f"eps={eps}; give an L-inf radius in [0, 1]")
    params = _params(attack_params)
    eps = float(eps)
    n = len(y)
    sigma = layers_lib.noise_sigma(model)
    stochastic = sigma > 0
    draws = int(eot_samples) if stochastic else 1
    if num_classes is None:
        num_classes = int(model.outputs[0].shape[-1])
    say = print if verbose else (lambda *a, **k: None)
    restore_phase = None
    if binary_relax.br_quantizers(model):
        restore_phase = binary_relax.br_state(model)[1]
        binary_relax.set_exact(model, True)
    try:
        m = StochasticModel(model, draws, batch_size)
        result = {"n_examples": n, "eps": eps,
                  "noise": {"sigma": sigma, "draws": draws, "stochastic": stochastic},
                  "natural_acc": m.accuracy(x, y), "attacks": {}}
        say(f"[evaluate] {n} test examples, natural accuracy {result['natural_acc']}", flush=True)
        n_batches = math.ceil(n / m.batch_size)
        for name in attack_names:
            settings = attack_settings(name, params, eps)
            entry = {"settings": settings, "plain": None, "eot": None}
            rescaled = {"settings": {**settings, "note": "x + eps * (x_cw - x), as the reference"},
                        "plain": None, "eot": None}
            modes = [("plain", 1)] + ([("eot", draws)] if name in eot_attacks and draws > 1 else [])
            for mode, eot in modes:
                say(f"[evaluate] {name} ({mode})", flush=True)
                x_adv = adversarial_examples(m, name, settings, x, y, eot,
                                             _progress(n_batches, verbose, "batch"))
                entry[mode] = m.accuracy(x_adv, y)
                entry[mode]["mean_linf"] = float(np.abs(x_adv - x).reshape(n, -1).max(1).mean())
                entry[mode]["mean_l2"] = float(
                    np.sqrt(((x_adv - x) ** 2).reshape(n, -1).sum(1)).mean())
                if name == "cw":
                    rescaled[mode] = m.accuracy(attacks_rescale(x, x_adv, eps), y)
            result["attacks"][name] = entry
            if name == "cw":
                result["attacks"]["cw_rescaled"] = rescaled
        k = min(n, int(sweep_examples))
        xs, ys = x[:k], y[:k]
        at_eps = {}  # (attack, eps) -> accuracy, reused by the more-effort baseline
        if eps_sweep is not None:
            sweep = {"eps": [float(e) for e in eps_sweep], "n_examples": k, "attacks": {}}
            say(f"[evaluate] eps sweep over {sweep['eps']} on {k} examples", flush=True)
            bar = _progress(2 * len(sweep["eps"]), verbose, "eps")
            for name in ("fgsm", "pgd20"):
                accs = {"single": [], "expected": []}
                for e in sweep["eps"]:
                    a = (m.accuracy(xs, ys) if e == 0 else m.accuracy(
                        adversarial_examples(m, name, attack_settings(name, params, e), xs, ys, 1),
                        ys))
                    at_eps[(name, e)] = a
                    accs["single"].append(a["single"])
                    accs["expected"].append(a["expected"])
                    bar.add(1)
                sweep["attacks"][name] = accs
            result["eps_sweep"] = sweep
        if more_effort:
            base = attack_settings("pgd20", params, eps)
            baseline = at_eps.get(("pgd20", eps)) or m.accuracy(
                adversarial_examples(m, "pgd20", base, xs, ys, 1), ys)
            result["more_effort"] = {
                "pgd20": baseline,
                "steps_x2": m.accuracy(adversarial_examples(m, "pgd20", {**base, "nb_iter": 40},
                                                            xs, ys, 1), ys),
                "restarts_x2": m.accuracy(adversarial_examples(m, "pgd20", {**base, "restarts": 2},
                                                               xs, ys, 1), ys),
                "n_examples": k}
        result["sanity"] = sanity_checks(result, n, stochastic, num_classes, k)
        result["sparsity"] = sparsity.report(model_kernels(model))
    finally:
        if restore_phase is not None:
            binary_relax.set_exact(model, restore_phase)
    result["time_s"] = round(time.time() - t0, 1)
    return result


def attacks_rescale(x, x_adv, eps):
    return attacks.rescale(x, x_adv, eps).numpy()
