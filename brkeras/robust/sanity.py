"""The sanity checks of a robustness evaluation (SPEC 5), with the sampling slack of a stochastic model."""

import math


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


def sanity_checks(result, n, stochastic, num_classes, sweep_n):
    """The checks of SPEC 5 on an eval.json-shaped dict; a list of {"check", "held", "detail"}.

    Each comparison lhs <= rhs allows `tolerance(lhs, rhs, n, stochastic)`:
      robust <= natural   every attack, mode (plain/eot) and kind (single/expected);
      PGD-20 <= FGSM      expected accuracy, per mode;
      EOT <= plain        expected accuracy, per attack run with EOT;
      eps sweep           expected accuracy non-increasing between consecutive eps
                          (sweep_n examples), PGD-20 <= FGSM at every eps > 0, and
                          the strongest sweep attack <= 1/num_classes + 0.1 at
                          the largest eps when that eps is > 0 (FGSM alone may
                          stay above chance far beyond the training radius
                          without masking: Carlini et al. 2019 ask iterative
                          attacks to succeed there, single steps to be weaker);
      more effort         PGD-20 with 2x steps or 2x restarts <= PGD-20 (sweep_n);
      APGD <= PGD-20      expected accuracy of each apgd_* attack per mode, against
                          PGD-20's same mode (else its plain run); two binomial
                          standard errors even for a deterministic model (both
                          attacks start at random);
      finite x_adv        no attack gave a NaN or Inf example (those are kept clean);
      worst case          worst_case <= every member's expected accuracy (exact:
                          one set of per-example results, no tolerance).
    Sections missing from `result` (eps_sweep, more_effort, worst_case) are not checked.
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
    for name, r in atk.items():
        for mode in ("plain", "eot"):
            if r.get(mode) and "nonfinite_examples" in r[mode]:
                bad = int(r[mode]["nonfinite_examples"])
                checks.append({"check": f"finite x_adv ({name}, {mode})", "held": bad == 0,
                               "detail": f"{bad} examples with a non-finite x_adv (kept clean)"})
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
    sweep_accs = (sweep or {}).get("attacks", {})
    for name in sweep_accs:
        accs = sweep_accs[name]["expected"]
        if len(accs) != len(sweep["eps"]):
            raise ValueError(f"eps_sweep of {name} has {len(accs)} accuracies for "
                             f"{len(sweep['eps'])} eps values")
        for (e0, a0), (e1, a1) in zip(zip(sweep["eps"], accs), zip(sweep["eps"][1:], accs[1:])):
            check(f"non-increasing in eps ({name}, {e0:g} -> {e1:g})", a1, a0, sweep_n,
                  "expected accuracy")
    if "pgd20" in sweep_accs and "fgsm" in sweep_accs:
        for e, a_pgd, a_fgsm in zip(sweep["eps"], sweep_accs["pgd20"]["expected"],
                                    sweep_accs["fgsm"]["expected"]):
            if e > 0:
                check(f"PGD-20 <= FGSM (sweep, eps={e:g})", a_pgd, a_fgsm, sweep_n,
                      "expected accuracy")
    if sweep_accs and sweep["eps"] and sweep["eps"][-1] > 0:
        # ~0 at a large radius is asked of the evaluation's strongest attack: a single
        # step may stay well above chance there without any masking (its linear
        # model of the loss is poor that far out); PGD-20 <= FGSM is checked above
        chance, e_max = 1.0 / num_classes, sweep["eps"][-1]
        last = {name: sweep_accs[name]["expected"][-1] for name in sweep_accs}
        strongest = min(last, key=last.get)
        each = ", ".join(f"{k} {v:.4f}" for k, v in last.items())
        checks.append({"check": f"near chance at eps={e_max:g} (strongest: {strongest})",
                       "held": bool(last[strongest] <= chance + 0.1),
                       "detail": f"expected accuracy {each} vs chance {chance:.2f} (+0.10)"})
    more = result.get("more_effort")
    if more:
        for label in ("steps_x2", "restarts_x2"):
            check(f"more effort never raises accuracy (PGD-20 {label})", more[label]["expected"],
                  more["pgd20"]["expected"], sweep_n, "expected accuracy")
    pgd = atk.get("pgd20") or {}
    for name, r in atk.items():
        if not name.startswith("apgd") or not (pgd.get("plain") or pgd.get("eot")):
            continue
        for mode in ("plain", "eot"):
            if r.get(mode):
                ref = mode if pgd.get(mode) else "plain"
                lhs, rhs = r[mode]["expected"], pgd[ref]["expected"]
                tol = tolerance(lhs, rhs, n, True)
                checks.append({"check": f"APGD <= PGD-20 ({name} {mode} vs PGD-20 {ref})",
                               "held": bool(lhs <= rhs + tol),
                               "detail": f"expected accuracy: {lhs:.4f} <= {rhs:.4f} "
                                         f"(+ tolerance {tol:.4f})"})
    wc = result.get("worst_case")
    if wc:
        accs = {k: (nat["expected"] if k == "natural" else
                    atk[k.split("/")[0]][k.split("/")[1]]["expected"]) for k in wc["members"]}
        low = min(accs, key=accs.get)
        checks.append({"check": "worst case <= every attack",
                       "held": bool(wc["expected"] <= accs[low] + 1e-12),
                       "detail": f"worst case {wc['expected']:.4f} <= {accs[low]:.4f} "
                                 f"({low}, the lowest of {len(accs)} members)"})
    return checks


def blackbox_check(label, blackbox_acc, whitebox_acc, n):
    """Black-box >= white-box: a query attack (Square on the shipped file) should not
    find more errors than the white-box worst case on the same n examples.

    Held when blackbox_acc >= whitebox_acc - tolerance(both, n, stochastic=True)
    (the file differs from the Keras model by int8 rounding and noise draws). A
    black-box accuracy far below the white-box one means the gradients misled the
    white-box attacks (gradient masking) or the file is less robust than the
    Keras model; either way the white-box number overstates the file's robustness.
    """
    tol = tolerance(blackbox_acc, whitebox_acc, n, True)
    return {"check": f"black-box >= white-box ({label})",
            "held": bool(blackbox_acc >= whitebox_acc - tol),
            "detail": f"Square on the file {blackbox_acc:.4f} >= white-box worst case "
                      f"{whitebox_acc:.4f} (- tolerance {tol:.4f}) on {n} examples; below it "
                      "means gradient masking or a file less robust than the Keras model"}
