"""The pipeline's side-by-side comparison: summary.json and summary.md.

summary.json = {"models": [row, ...]}, one row per pipeline model, in the order
of config.pipeline.models; ROW_KEYS documents a row. A value is None when the
stage that produces it has not run (or the model has no such file).
"""

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
    ("TFLite KB", "size of the int8 TFLite file without noise (full int8, or the QAT model's; "
                  "pruned when pruning removed channels)"),
    ("latency ms", "LiteRT median latency, batch 1, 1 thread: noisy deploy (dynamic-range int8 "
                   "or QAT int8) / that noise-off int8 file"),
)


ROW_KEYS = {
    "model": "the model's work dir name under the pipeline dir",
    "epochs": "training epochs logged in metrics.jsonl",
    "train_time_s": "sum of the epochs' wall times (s)",
    "n_test": "test examples of the evaluation",
    "natural": "natural accuracy, expected prediction",
    "natural_single": "natural accuracy, single noise draw",
    "fgsm": "FGSM accuracy, plain attack, expected prediction",
    "ifgsm20": "IFGSM-20 accuracy, plain attack, expected prediction",
    "pgd20": "PGD-20 accuracy, plain attack, expected prediction",
    "pgd20_eot": "PGD-20 accuracy, EOT attack, expected prediction",
    "cw": "CW-L2 accuracy, expected prediction",
    "cw_rescaled": "CW-L2 with the reference's eps rescaling, expected prediction",
    "zero_share": "share of zero weights over the quantized layers",
    "channel_sparsity": "share of all-zero input-channel slices",
    "filter_sparsity": "share of all-zero output channels",
    "sanity_failed": "names of the evaluation's failed sanity checks",
    "tflite_file": "the noise-off int8 file (full int8 or QAT int8; the noisy one if none)",
    "tflite_bytes": "its size in bytes",
    "latency_ms_noise": "LiteRT median latency of the noisy int8 deploy, 1 thread (ms)",
    "latency_ms_no_noise": "the same for the noise-off int8 file (ms)",
    "tflite_dropped": "files the export dropped after a failed parity check (optional formats)",
}


def _read(path):
    return workdir_lib.read_json(path) if os.path.exists(path) else None


def _acc(ev, attack, mode="plain"):
    if not ev:
        return None
    entry = ev["natural_acc"] if attack == "natural" else (ev["attacks"].get(attack) or {}).get(mode)
    return None if not entry else entry["expected"]


def _deploy_file(export, noise):
    """The int8 file a user would ship (pruned if available): with noise, dynamic-range
    int8 (export.noisy_formats has no full int8); without, full int8; or the tfmot
    QAT model's own int8 file."""
    if not export:
        return None
    # in order of preference; noise off falls back to dynamic int8 when full int8
    # was not exported (or was dropped by its parity check)
    wanted = (("dynamic_int8", "qat_int8") if noise
              else ("full_int8", "qat_int8", "dynamic_int8"))
    files = [f for f in export["files"] if f["noise"] == noise and f["format"] in wanted]
    files.sort(key=lambda f: (wanted.index(f["format"]), not f["pruned"]))
    return files[0] if files else None


def _latency(bench, name):
    if not bench or not name:
        return None
    times = [r["median_ms"] for r in bench["results"] if r["file"] == name and r["threads"] == 1]
    return times[0] if times else None


def model_row(pipeline_dir, name):
    """The ROW_KEYS dict of the model work dir pipeline_dir/name."""
    wd = os.path.join(pipeline_dir, name)
    ev = _read(os.path.join(wd, "eval.json"))
    ex = _read(os.path.join(wd, "export.json"))
    be = _read(os.path.join(wd, "bench.json"))
    metrics = workdir_lib.read_metrics(wd)
    noisy, det = _deploy_file(ex, True), _deploy_file(ex, False)
    shipped = det or noisy
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
        "tflite_file": shipped["file"] if shipped else None,
        "tflite_bytes": shipped["size_bytes"] if shipped else None,
        "latency_ms_noise": _latency(be, noisy and noisy["file"]),
        "latency_ms_no_noise": _latency(be, det and det["file"]),
        "tflite_dropped": [d["file"] for d in ex.get("dropped", [])] if ex else [],
    }


def _ms(a, b):
    if a is None and b is None:
        return "-"
    return " / ".join("-" if v is None else f"{v:.3f}" for v in (a, b))


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
    dropped = [f"- {r['model']}: {', '.join(r['tflite_dropped'])}" for r in rows
               if r.get("tflite_dropped")]
    if dropped:
        text += ("\nTFLite files dropped after a failed parity check (reasons in the model's "
                 "export.json):\n" + "\n".join(dropped) + "\n")
    return text


def write(pipeline_dir, names):
    """Writes summary.json and summary.md for the model dirs `names`; returns the rows."""
    rows = [model_row(pipeline_dir, n) for n in names]
    workdir_lib.write_json(os.path.join(pipeline_dir, "summary.json"), {"models": rows})
    text = markdown(rows)
    with open(os.path.join(pipeline_dir, "summary.md"), "w") as f:
        f.write(f"# brkeras pipeline summary\n\n{text}")
    print(text, flush=True)
    return rows
