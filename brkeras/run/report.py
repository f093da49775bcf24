"""Markdown tables and PNG plots of a run: what people would rather look at than read."""

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

from brkeras.run.workdir import PLOTS, REPORT_MD


def pct(v):
    return "-" if v is None else f"{100 * v:.2f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_accuracy_vs_eps(sweep, path):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, accs in sweep["attacks"].items():
        ax.plot(sweep["eps"], [100 * a for a in accs["expected"]], "o-", label=f"{name} expected")
        ax.plot(sweep["eps"], [100 * a for a in accs["single"]], "x--", label=f"{name} single draw")
    ax.set_xlabel("L-inf eps")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"accuracy vs eps ({sweep['n_examples']} test examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sparsity(report, path):
    layers = report["layers"]
    names = list(layers)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.35 * len(names) + 2), 3.8))
    xs = range(len(names))
    ax.bar([i - 0.2 for i in xs], [100 * layers[n]["zero_share"] for n in names], 0.4,
           label="zero weights")
    ax.bar([i + 0.2 for i in xs], [100 * layers[n]["channel_sparsity"] for n in names], 0.4,
           label="zero input channels")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=70, fontsize=7)
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    ax.set_title("sparsity per quantized layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TRAIN_ATTACK_LABELS = {"pgd": "PGD (train attack)",
                       "nfgsm": "N-FGSM (train attack, up to (k+1) eps)"}


def plot_training_curves(metrics, path, train_attack="pgd"):
    if not metrics:
        return False
    epochs = [r["epoch"] for r in metrics]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(epochs, [r["loss"] for r in metrics], "o-")
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss")
    a1.grid(alpha=0.3)
    for key, label in (("nat_acc", "natural"),
                       ("adv_acc", TRAIN_ATTACK_LABELS.get(train_attack, train_attack))):
        if key in metrics[0]:
            a2.plot(epochs, [100 * r[key] for r in metrics], "o-", label=label)
    a2.set_xlabel("epoch")
    a2.set_ylabel("training batch accuracy (%)")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_eval_report(workdir, result, metrics, train_attack="pgd"):
    """report.md and plots/ of an evaluation result (the eval.json dict).

    Plots: plots/accuracy_vs_eps.png, plots/sparsity_per_layer.png and, when
    `metrics` (the metrics.jsonl rows) is not empty, plots/training_curves.png
    (its adversarial curve labelled by `train_attack`, config.adv.method).
    """
    plots = os.path.join(workdir, PLOTS)
    os.makedirs(plots, exist_ok=True)
    plot_accuracy_vs_eps(result["eps_sweep"], os.path.join(plots, "accuracy_vs_eps.png"))
    plot_sparsity(result["sparsity"], os.path.join(plots, "sparsity_per_layer.png"))
    has_curves = plot_training_curves(metrics, os.path.join(plots, "training_curves.png"),
                                      train_attack)

    nat = result["natural_acc"]
    noise = result["noise"]
    rows = [["natural", "-", pct(nat["single"]), pct(nat["expected"]), "-", "-"]]
    for name, r in result["attacks"].items():
        plain, eot = r.get("plain") or {}, r.get("eot") or {}
        settings = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in r["settings"].items() if k != "note")
        rows.append([name, settings, pct(plain.get("single")), pct(plain.get("expected")),
                     pct(eot.get("single")), pct(eot.get("expected"))])
    sp = result["sparsity"]["overall"]
    sweep = result["eps_sweep"]
    more = result.get("more_effort")
    training = result.get("training")
    trained = ("" if not training or training["finished"] else
               f" **Training unfinished** ({training['completed_epochs']} epochs done): "
               "this is its last checkpoint.")
    lines = [
        f"# Evaluation of `{os.path.basename(workdir)}`",
        "",
        f"{result['n_examples']} test examples; L-inf eps {result['eps']:g}. Feynman-Kac noise "
        f"sigma={noise['sigma']:g} stays on at test time"
        + (f": **single** = one forward pass, **expected** = argmax of the mean softmax over "
           f"{noise['draws']} draws; **plain** attacks use one draw per gradient, **EOT** "
           f"attacks average gradients over {noise['draws']} draws."
           if noise["stochastic"] else " (sigma 0: a deterministic model, single = expected).")
        + trained,
        "",
        "## Accuracy (%)",
        "",
        table(["attack", "settings", "plain single", "plain expected", "EOT single",
               "EOT expected"], rows),
        "",
        ("`cw` is the plain Carlini-Wagner L2 result; `cw_rescaled` applies the reference's "
         "rescaling x + eps (x_cw - x), which is not a projection onto an eps-ball.\n"
         if "cw" in result["attacks"] else ""),
        "## Accuracy vs eps (%, expected / single)",
        "",
        f"On the first {sweep['n_examples']} test examples; eps 0 is the natural accuracy.",
        "",
        table(["attack"] + [f"eps={e:g}" for e in sweep["eps"]],
              [[name] + [f"{pct(a)} / {pct(b)}" for a, b in zip(accs["expected"], accs["single"])]
               for name, accs in sweep["attacks"].items()]),
        "",
        "![accuracy vs eps](plots/accuracy_vs_eps.png)",
        "",
    ]
    if more:
        lines += [
            f"## More attack effort (PGD-20 at eps {result['eps']:g}, {more['n_examples']} "
            "examples, %)",
            "",
            table(["attack", "single", "expected"],
                  [[label, pct(more[key]["single"]), pct(more[key]["expected"])]
                   for key, label in (("pgd20", "PGD-20"), ("steps_x2", "PGD-40 (2x steps)"),
                                      ("restarts_x2", "PGD-20, 2 restarts"))]),
            "",
        ]
    lines += [
        "## Sanity checks",
        "",
        table(["check", "held", "detail"],
              [[c["check"], "yes" if c["held"] else "**NO**", c["detail"]]
               for c in result["sanity"]]),
        "",
        "## Sparsity",
        "",
        f"Overall over {sp['layers']} layers, {sp['params']} weights: zero weights "
        f"{pct(sp['zero_share'])}%, channel sparsity (all-zero input slices) "
        f"{pct(sp['channel_sparsity'])}%, filter sparsity (all-zero output channels) "
        f"{pct(sp['filter_sparsity'])}%.",
        "",
        table(["layer", "weights", "zero %", "channel sparsity %", "filter sparsity %",
               "distinct values"],
              [[n, s["params"], pct(s["zero_share"]), pct(s["channel_sparsity"]),
                pct(s["filter_sparsity"]), s.get("distinct_values", "-")]
               for n, s in result["sparsity"]["layers"].items()]),
        "",
        "![sparsity per layer](plots/sparsity_per_layer.png)",
        "",
    ]
    if has_curves:
        lines += ["## Training", "", "![training curves](plots/training_curves.png)", ""]
    with open(os.path.join(workdir, REPORT_MD), "w") as f:
        f.write("\n".join(lines))
