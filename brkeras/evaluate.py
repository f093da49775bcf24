"""Robust evaluation of a stochastic, quantized model: `brkeras evaluate --workdir=DIR`.

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

Writes eval.json, report.md and plots/*.png into the work dir. eval.json:
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

import math
import os
import time

import numpy as np

from brkeras import attacks
from brkeras import config as config_lib
from brkeras import data
from brkeras import quantize
from brkeras import sparsity
from brkeras import training
from brkeras import workdir as workdir_lib
from brkeras._keras import keras, tf

ATTACKS = ("fgsm", "ifgsm20", "pgd20", "cw")
EVAL_JSON = "eval.json"
REPORT_MD = "report.md"


def attack_settings(name, cfg, eps):
    """The settings of attack `name` at L-inf radius eps (for the report and the call)."""
    if name == "fgsm":
        return {"norm": "linf", "eps": eps}
    if name == "ifgsm20":
        return {"norm": "linf", "eps": eps, "eps_iter": eps * cfg.ifgsm_step_fraction,
                "nb_iter": 20, "rand_init": False}
    if name == "pgd20":
        return {"norm": "linf", "eps": eps, "eps_iter": eps * cfg.pgd_step_fraction,
                "nb_iter": 20, "rand_init": True}
    if name == "cw":
        return {"norm": "l2", "c": cfg.cw_c, "kappa": cfg.cw_kappa, "lr": cfg.cw_lr,
                "steps": cfg.cw_steps, "rescale_eps": eps}
    raise ValueError(f"unknown attack {name!r}; choose from {ATTACKS}")


def run_attack(name, settings, model_fn, x, y, eot):
    s = settings
    if name == "fgsm":
        return attacks.fgsm(model_fn, x, s["eps"], y=y, eot_samples=eot)
    if name in ("ifgsm20", "pgd20"):
        return attacks.pgd(model_fn, x, s["eps"], s["eps_iter"], s["nb_iter"], y=y,
                           rand_init=s["rand_init"], restarts=s.get("restarts", 1),
                           eot_samples=eot)
    return attacks.cw_l2(model_fn, x, y=y, c=s["c"], kappa=s["kappa"], lr=s["lr"],
                         steps=s["steps"], eot_samples=eot)


class _Model:
    """The network in inference mode; one callable object so attacks trace once."""

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


def _adversarial(model, name, settings, x, y, eot, progress=None):
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
    kernels = quantize.quantized_kernels(net)
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


def tolerance(p1, p2, n, stochastic):
    """Slack of a comparison of two accuracies measured on n examples.

    0 for a deterministic model; else two binomial standard errors,
    2 sqrt(v / n) with v = max(p1 (1 - p1), p2 (1 - p2), 1 / n) (the floor keeps
    a small slack when both accuracies are 0 or 1).
    """
    if not stochastic:
        return 0.0
    n = max(int(n), 1)
    v = max(p1 * (1 - p1), p2 * (1 - p2), 1.0 / n)
    return 2.0 * math.sqrt(v / n)


def check_eval_config(ev):
    """Raises ValueError naming the config.eval field that cannot be evaluated."""
    unknown = [a for a in list(ev.attacks) + list(ev.eot_attacks) if a not in ATTACKS]
    if unknown:
        raise ValueError(f"config.eval.attacks / eot_attacks list unknown attacks {unknown}; "
                         f"choose from {ATTACKS}")
    for field in ("eot_samples", "batch_size", "sweep_examples"):
        if int(ev[field]) < 1:
            raise ValueError(f"config.eval.{field}={ev[field]}; it must be >= 1")
    if int(ev.max_examples) < 0:
        raise ValueError(f"config.eval.max_examples={ev.max_examples}; give >= 1 (0 = all)")
    sweep = [float(e) for e in ev.eps_sweep]
    if not sweep or min(sweep) < 0 or sweep != sorted(sweep):
        raise ValueError(f"config.eval.eps_sweep={tuple(ev.eps_sweep)}; give one or more "
                         "eps >= 0 in ascending order, e.g. (0.0, 0.1, 0.3)")


def sanity_checks(result, n, stochastic, num_classes, sweep_n):
    """The checks of SPEC 5 on an eval.json-shaped dict; a list of {"check", "held", "detail"}.

    Each comparison lhs <= rhs allows `tolerance(lhs, rhs, n, stochastic)`:
      robust <= natural   every attack, mode (plain/eot) and kind (single/expected);
      PGD-20 <= FGSM      expected accuracy, per mode;
      EOT <= plain        expected accuracy, per attack run with EOT;
      eps sweep           expected accuracy non-increasing between consecutive eps
                          (sweep_n examples), and <= 1/num_classes + 0.1 at the
                          largest eps when that eps is > 0;
      more effort         PGD-20 with 2x steps or 2x restarts <= PGD-20 (sweep_n).
    Sections missing from `result` (eps_sweep, more_effort) are not checked.
    """
    checks = []

    def check(name, lhs, rhs, n_ex, what):
        tol = tolerance(lhs, rhs, n_ex, stochastic)
        checks.append({"check": name, "held": bool(lhs <= rhs + tol),
                       "detail": f"{what}: {lhs:.4f} <= {rhs:.4f} (+ tolerance {tol:.4f})"})

    nat = result["natural_acc"]
    atk = result.get("attacks", {})
    for name, r in atk.items():
        for mode in ("plain", "eot"):
            if r.get(mode):
                for kind in ("single", "expected"):
                    check(f"robust <= natural ({name}, {mode}, {kind})", r[mode][kind], nat[kind],
                          n, f"{name} {mode} {kind} vs natural {kind}")
    if "pgd20" in atk and "fgsm" in atk:
        for mode in ("plain", "eot"):
            if atk["pgd20"].get(mode) and atk["fgsm"].get(mode):
                check(f"PGD-20 <= FGSM ({mode}, expected)", atk["pgd20"][mode]["expected"],
                      atk["fgsm"][mode]["expected"], n, "expected accuracy")
    for name, r in atk.items():
        if r.get("eot") and r.get("plain"):
            check(f"EOT <= plain ({name}, expected)", r["eot"]["expected"],
                  r["plain"]["expected"], n, "EOT never raises accuracy")
    sweep = result.get("eps_sweep")
    for name in (sweep or {}).get("attacks", {}):
        accs = sweep["attacks"][name]["expected"]
        if len(accs) != len(sweep["eps"]):
            raise ValueError(f"eps_sweep of {name} has {len(accs)} accuracies for "
                             f"{len(sweep['eps'])} eps values")
        for (e0, a0), (e1, a1) in zip(zip(sweep["eps"], accs), zip(sweep["eps"][1:], accs[1:])):
            check(f"non-increasing in eps ({name}, {e0:g} -> {e1:g})", a1, a0, sweep_n,
                  "expected accuracy")
        if accs and sweep["eps"][-1] > 0:
            chance = 1.0 / num_classes
            last = accs[-1]
            checks.append({"check": f"near chance at eps={sweep['eps'][-1]:g} ({name})",
                           "held": bool(last <= chance + 0.1),
                           "detail": f"expected accuracy {last:.4f} vs chance {chance:.2f} (+0.10)"})
    more = result.get("more_effort")
    if more:
        for label in ("steps_x2", "restarts_x2"):
            check(f"more effort never raises accuracy (PGD-20 {label})", more[label]["expected"],
                  more["pgd20"]["expected"], sweep_n, "expected accuracy")
    return checks


def evaluate(workdir, overrides=None, verbose=1):
    """Evaluates the trained model of `workdir`; writes eval.json, report.md, plots."""
    t0 = time.time()
    config = config_lib.stage_config(workdir_lib.load_config(workdir), overrides)
    ev = config.eval
    check_eval_config(ev)
    state = workdir_lib.read_state(workdir)
    net = training.load(workdir)
    info = data.info(config.data.name)
    x_u8, y = data.load_arrays(config.data.name, "test", ev.max_examples, config.data.data_dir)
    x = (x_u8.astype(np.float32) / 255.0)
    y = y.astype(np.int32)
    n = len(y)
    stochastic = float(config.model.sigma) > 0
    draws = int(ev.eot_samples) if stochastic else 1
    model = _Model(net, draws, ev.batch_size)
    eps = float(config.adv.eps)
    say = print if verbose else (lambda *a, **k: None)

    result = {"workdir": os.path.abspath(workdir), "n_examples": n, "eps": eps,
              "training": {"completed_epochs": int(state["completed_epochs"]),
                           "finished": bool(state["finished"])},
              "noise": {"sigma": float(config.model.sigma), "draws": draws,
                        "stochastic": stochastic},
              "natural_acc": model.accuracy(x, y), "attacks": {}}
    if not state["finished"]:
        say(f"[evaluate] WARNING {workdir} holds an unfinished training "
            f"({state['completed_epochs']} epochs done); evaluating its last checkpoint", flush=True)
    say(f"[evaluate] {n} test examples, natural accuracy {result['natural_acc']}", flush=True)
    n_batches = math.ceil(n / model.batch_size)
    for name in ev.attacks:
        settings = attack_settings(name, ev, eps)
        entry = {"settings": settings, "plain": None, "eot": None}
        rescaled_entry = {"settings": {**settings, "note": "x + eps * (x_cw - x), as the reference"},
                          "plain": None, "eot": None}
        modes = [("plain", 1)] + ([("eot", draws)] if name in ev.eot_attacks and draws > 1 else [])
        for mode, eot in modes:
            bar = keras.utils.Progbar(n_batches, verbose=verbose, unit_name="batch")
            say(f"[evaluate] {name} ({mode})", flush=True)
            x_adv = _adversarial(model, name, settings, x, y, eot, bar)
            entry[mode] = model.accuracy(x_adv, y)
            entry[mode]["mean_linf"] = float(np.abs(x_adv - x).reshape(n, -1).max(1).mean())
            entry[mode]["mean_l2"] = float(np.sqrt(((x_adv - x) ** 2).reshape(n, -1).sum(1)).mean())
            if name == "cw":
                rescaled_entry[mode] = model.accuracy(attacks.rescale(x, x_adv, eps).numpy(), y)
        result["attacks"][name] = entry
        if name == "cw":
            result["attacks"]["cw_rescaled"] = rescaled_entry

    # eps sweep and the more-effort checks on the first sweep_examples examples.
    m = min(n, int(ev.sweep_examples))
    xs, ys = x[:m], y[:m]
    sweep = {"eps": [float(e) for e in ev.eps_sweep], "n_examples": m, "attacks": {}}
    say(f"[evaluate] eps sweep over {sweep['eps']} on {m} examples", flush=True)
    bar = keras.utils.Progbar(2 * len(sweep["eps"]), verbose=verbose, unit_name="eps")
    at_eps = {}  # (attack, eps) -> accuracy, reused by the more-effort baseline
    for name in ("fgsm", "pgd20"):
        accs = {"single": [], "expected": []}
        for e in sweep["eps"]:
            a = (model.accuracy(xs, ys) if e == 0 else
                 model.accuracy(_adversarial(model, name, attack_settings(name, ev, e), xs, ys, 1), ys))
            at_eps[(name, e)] = a
            accs["single"].append(a["single"])
            accs["expected"].append(a["expected"])
            bar.add(1)
        sweep["attacks"][name] = accs
    result["eps_sweep"] = sweep
    base = attack_settings("pgd20", ev, eps)
    baseline = at_eps.get(("pgd20", eps)) or model.accuracy(
        _adversarial(model, "pgd20", base, xs, ys, 1), ys)
    more = {"pgd20": baseline,
            "steps_x2": model.accuracy(_adversarial(model, "pgd20", {**base, "nb_iter": 40},
                                                    xs, ys, 1), ys),
            "restarts_x2": model.accuracy(_adversarial(model, "pgd20", {**base, "restarts": 2},
                                                       xs, ys, 1), ys),
            "n_examples": m}
    result["more_effort"] = more
    result["sanity"] = sanity_checks(result, n, stochastic, info.num_classes, m)
    result["sparsity"] = sparsity.report(model_kernels(net))
    result["time_s"] = round(time.time() - t0, 1)

    from brkeras import report  # pylint: disable=g-import-not-at-top
    report.write_eval_report(workdir, result, workdir_lib.read_metrics(workdir))
    # eval.json last: the pipeline takes it as the mark of a finished evaluation.
    workdir_lib.write_json(os.path.join(workdir, EVAL_JSON), result)
    failed = [c for c in result["sanity"] if not c["held"]]
    for c in failed:
        say(f"[evaluate] WARNING sanity check failed: {c['check']}: {c['detail']}", flush=True)
    say(f"[evaluate] {len(result['sanity']) - len(failed)}/{len(result['sanity'])} sanity "
        f"checks held; wrote {os.path.join(workdir, EVAL_JSON)} and {REPORT_MD} "
        f"({result['time_s']} s)", flush=True)
    return result
