"""The pipeline's side-by-side comparison: summary.json, summary.md and a plot."""

import json
import os

from brkeras import report
from brkeras import workdir as workdir_lib

COLUMNS = (
    ("model", "the pipeline model: precision, loss"),
    ("natural", "natural accuracy, expected prediction (%)"),
    ("FGSM", "FGSM accuracy, plain attack, expected prediction (%)"),
    ("IFGSM-20", "IFGSM-20 accuracy, plain attack, expected prediction (%)"),
    ("PGD-20", "PGD-20 accuracy, plain attack, expected prediction (%)"),
    ("PGD-20 EOT", "PGD-20 accuracy with EOT gradients, expected prediction (%)"),
    ("CW", "CW-L2 accuracy (reference settings), expected prediction (%)"),
    ("zero weights", "share of zero weights in the quantized layers (%)"),
    ("channel sparsity", "share of all-zero input-channel slices (reference definition, %)"),
    ("TFLite KB", "size of the deployable int8 TFLite file (noise on; pruned when pruning removed channels)"),
    ("latency ms", "LiteRT median latency of that file, batch 1, 1 thread, noise on / off"),
)


def _read(path):
    return json.load(open(path)) if os.path.exists(path) else None


def _acc(ev, attack, mode="plain"):
    if not ev:
        return None
    entry = ev["natural_acc"] if attack == "natural" else (ev["attacks"].get(attack) or {}).get(mode)
    return None if not entry else entry["expected"]


def _deploy_file(export, noise):
    """The int8 file a user would ship: dynamic-range int8 (pruned if available), or the
    tfmot QAT model's own int8 file."""
    if not export:
        return None
    files = [f for f in export["files"]
             if f["noise"] == noise and f["format"] in ("dynamic_int8", "qat_int8")]
    files.sort(key=lambda f: not f["pruned"])
    return files[0] if files else None


def _latency(bench, name):
    if not bench or not name:
        return None
    times = [r["median_ms"] for r in bench["results"] if r["file"] == name and r["threads"] == 1]
    return times[0] if times else None


def model_row(pipeline_dir, name):
    wd = os.path.join(pipeline_dir, name)
    ev = _read(os.path.join(wd, "eval.json"))
    ex = _read(os.path.join(wd, "export.json"))
    be = _read(os.path.join(wd, "bench.json"))
    metrics = workdir_lib.read_metrics(wd)
    noisy, det = _deploy_file(ex, True), _deploy_file(ex, False)
    sp = ev["sparsity"]["overall"] if ev else {}
    return {
        "model": name,
        "epochs": len(metrics),
        "train_time_s": round(sum(r.get("time_s", 0) for r in metrics), 1),
        "n_test": ev["n_examples"] if ev else None,
        "natural": _acc(ev, "natural"),
        "natural_single": ev["natural_acc"]["single"] if ev else None,
        "fgsm": _acc(ev, "fgsm"),
        "ifgsm20": _acc(ev, "ifgsm20"),
        "pgd20": _acc(ev, "pgd20"),
        "pgd20_eot": _acc(ev, "pgd20", "eot"),
        "cw": _acc(ev, "cw"),
        "cw_rescaled": _acc(ev, "cw_rescaled"),
        "zero_share": sp.get("zero_share"),
        "channel_sparsity": sp.get("channel_sparsity"),
        "filter_sparsity": sp.get("filter_sparsity"),
        "sanity_failed": [c["check"] for c in ev["sanity"] if not c["held"]] if ev else None,
        "tflite_file": noisy["file"] if noisy else None,
        "tflite_bytes": noisy["size_bytes"] if noisy else None,
        "latency_ms_noise": _latency(be, noisy and noisy["file"]),
        "latency_ms_no_noise": _latency(be, det and det["file"]),
    }


def _ms(a, b):
    if a is None:
        return "-"
    return f"{a:.3f} / {b:.3f}" if b is not None else f"{a:.3f}"


def markdown(rows):
    body = [[r["model"], report.pct(r["natural"]), report.pct(r["fgsm"]), report.pct(r["ifgsm20"]),
             report.pct(r["pgd20"]), report.pct(r["pgd20_eot"]), report.pct(r["cw"]),
             report.pct(r["zero_share"]), report.pct(r["channel_sparsity"]),
             "-" if r["tflite_bytes"] is None else f"{r['tflite_bytes'] / 1024:.1f}",
             _ms(r["latency_ms_noise"], r["latency_ms_no_noise"])] for r in rows]
    table = report.table([c for c, _ in COLUMNS], body)
    legend = "\n".join(f"- **{c}**: {d}" for c, d in COLUMNS)
    warnings = [f"- {r['model']}: {', '.join(r['sanity_failed'])}" for r in rows
                if r["sanity_failed"]]
    text = table + "\n\n" + legend + "\n"
    text += ("\nSanity checks that failed:\n" + "\n".join(warnings) + "\n" if warnings
             else "\nAll sanity checks held.\n")
    return text


def write(pipeline_dir, names):
    rows = [model_row(pipeline_dir, n) for n in names]
    workdir_lib.write_json(os.path.join(pipeline_dir, "summary.json"), {"models": rows})
    text = markdown(rows)
    with open(os.path.join(pipeline_dir, "summary.md"), "w") as f:
        f.write(f"# brkeras pipeline summary\n\n{text}")
    print(text, flush=True)
    return rows
