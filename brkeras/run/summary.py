"""The pipeline's side-by-side comparison: summary.json and summary.md.

summary.json = {"models": [row, ...]}, one row per pipeline model, in the order
of config.pipeline.models; ROW_KEYS documents a row. A value is None when the
stage that produces it has not run (or the model has no such file).
"""

import os

from brkeras.run import report
from brkeras.run import workdir as workdir_lib

def _pct(key):
    return lambda r: report.pct(r[key])


def _kb(key):
    return lambda r: "-" if r.get(key) is None else f"{r[key] / 1024:.1f}"


def _pair(a, b, fmt):
    def cell(r):
        if r.get(a) is None and r.get(b) is None:
            return "-"
        return " / ".join("-" if r.get(k) is None else fmt(r[k]) for k in (a, b))
    return cell


def _ms(v):
    return f"{v:.3f}"


def _k(v):
    return f"{v / 1e3:.0f}k" if v < 1e6 else f"{v / 1e6:.2f}M"


# (header, description, cell of a row): one definition per column.
COLUMNS = (
    ("model", "the pipeline model: precision, loss", lambda r: r["model"]),
    ("natural", "natural accuracy, expected prediction (%)", _pct("natural")),
    ("FGSM", "FGSM accuracy, plain attack, expected prediction (%)", _pct("fgsm")),
    ("IFGSM-20", "IFGSM-20 accuracy, plain attack, expected prediction (%)", _pct("ifgsm20")),
    ("PGD-20", "PGD-20 accuracy, plain attack, expected prediction (%)", _pct("pgd20")),
    ("PGD-20 EOT", "PGD-20 accuracy with EOT gradients, expected prediction (%)",
     _pct("pgd20_eot")),
    ("worst case", "the headline robust accuracy: share of examples that no attack of the "
                   "evaluation broke (every L-inf attack and mode run on all examples, EOT "
                   "where it applies, expected prediction; %)", _pct("worst_case")),
    ("APGD-CE / DLR", "APGD-CE and APGD-DLR accuracy (AutoAttack's rand version: EOT "
                      "gradients on a noisy model), expected prediction (%)",
     _pair("apgd_ce", "apgd_dlr", report.pct)),
    ("CW", "CW-L2 accuracy (reference settings), expected prediction (%)", _pct("cw")),
    ("TFLite transfer", "the worst-case adversarial examples on the shipped files: noise-off "
                        "int8 / noisy int8, expected prediction over the noise (%)",
     _pair("transfer_det", "transfer_noisy", report.pct)),
    ("Square TFLite", "Square Attack (L-inf, queries only) on those files through LiteRT, "
                      "on the first square_examples examples (%)",
     _pair("square_det", "square_noisy", report.pct)),
    ("zero weights", "share of zero weights in the quantized layers (%)", _pct("zero_share")),
    ("channel sparsity", "share of all-zero input-channel slices (reference definition, %)",
     _pct("channel_sparsity")),
)

# The efficiency of what ships: pruning, MACs, sizes and latency.
EFFICIENCY = (
    ("model", "the pipeline model", lambda r: r["model"]),
    ("removed channels", "block-private channels pruning removed (%), of all such channels",
     _pct("removed_share")),
    ("params", "parameters of the noise-off deploy model: shipped (pruned) / unpruned",
     _pair("params_after", "params_before", _k)),
    ("MACs", "multiply-accumulates per image of the shipped noise-off TFLite file, and of the "
             "unpruned one", _pair("tflite_macs", "tflite_macs_unpruned", _k)),
    ("file", "the shipped noise-off file (full int8, pruned when pruning removed channels; "
             "the QAT model's own int8 file)", lambda r: r["tflite_file"] or "-"),
    ("KB", "its size, raw / zipped (ZIP_DEFLATED, tfmot's convention)",
     _pair("tflite_bytes", "tflite_zipped_bytes", lambda v: f"{v / 1024:.1f}")),
    ("INT4 KB", "the packed INT4 file of a ternary/4-bit model, raw / zipped",
     _pair("int4_bytes", "int4_zipped_bytes", lambda v: f"{v / 1024:.1f}")),
    ("latency ms", "LiteRT median, batch 1, 1 thread: shipped file / unpruned file "
                   "(same format)", _pair("latency_ms_no_noise", "latency_ms_unpruned", _ms)),
    ("INT4 ms", "the INT4 file (builtin kernels; XNNPACK does not take INT4 filters)",
     lambda r: "-" if r.get("latency_ms_int4") is None else _ms(r["latency_ms_int4"])),
    ("noisy ms", "the noisy deploy (dynamic-range int8 or QAT int8)",
     lambda r: "-" if r.get("latency_ms_noise") is None else _ms(r["latency_ms_noise"])),
    ("side by side ms", "LiteRT median of the shipped file when the shipped files of all "
                        "models are timed in the same alternating rounds (latency.json), at "
                        "each thread count of config.bench.threads (1 / 2 ...)",
     lambda r: _per_threads(r.get("side_by_side_ms"), _ms)),
    ("x baseline", "speed-up of that file over the baseline model's file in the same rounds "
                   "(baseline median / this median; > 1 = faster), per thread count",
     lambda r: _per_threads(r.get("speedup_vs_baseline"), lambda v: f"{v:.2f}")),
)


def _per_threads(d, fmt):
    """'a / b' of a {threads: value} dict, in ascending thread count; '-' if none."""
    if not d:
        return "-"
    return " / ".join(fmt(d[k]) for k in sorted(d, key=int))


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
    "worst_case": "worst case per example over the evaluation's attacks, expected prediction "
                  "(the headline)",
    "apgd_ce": "APGD-CE accuracy, EOT attack (plain for a deterministic model), expected",
    "apgd_dlr": "APGD-DLR accuracy, EOT attack (plain for a deterministic model), expected",
    "transfer_det": "the worst-case x_adv on the noise-off int8 file (tflite_eval.json)",
    "transfer_noisy": "the same on the noisy int8 file, expected prediction over draws",
    "square_det": "Square Attack accuracy on the noise-off int8 file",
    "square_noisy": "Square Attack accuracy on the noisy int8 file, expected prediction",
    "square_examples": "examples Square Attack ran on",
    "zero_share": "share of zero weights over the quantized layers",
    "channel_sparsity": "share of all-zero input-channel slices",
    "filter_sparsity": "share of all-zero output channels",
    "sanity_failed": "names of the evaluation's failed sanity checks",
    "tflite_file": "the noise-off int8 file (full int8 or QAT int8; the noisy one if none)",
    "tflite_bytes": "its size in bytes",
    "latency_ms_noise": "LiteRT median latency of the noisy int8 deploy, 1 thread (ms)",
    "latency_ms_no_noise": "the same for the noise-off int8 file (ms)",
    "tflite_dropped": "files the export dropped after a failed parity check (optional formats)",
    "tflite_zipped_bytes": "its ZIP_DEFLATED size in bytes",
    "tflite_macs": "its multiply-accumulates per image (deploy.cost.tflite_macs)",
    "tflite_macs_unpruned": "the same for the unpruned file of the same format",
    "latency_ms_unpruned": "LiteRT median latency of that unpruned file, 1 thread (ms)",
    "removed_channels": "block-private channels removed by pruning (noise-off deploy)",
    "removed_share": "removed_channels / all block-private channels",
    "params_before": "parameters of the noise-off deploy model before pruning",
    "params_after": "the same after pruning",
    "int4_file": "the packed INT4 file (ternary / 4-bit models)",
    "int4_bytes": "its size in bytes",
    "int4_zipped_bytes": "its ZIP_DEFLATED size in bytes",
    "latency_ms_int4": "its LiteRT median latency, 1 thread (ms)",
    "side_by_side_ms": "{threads: LiteRT median ms} of the shipped noise-off file, timed with "
                       "those of all models in the same alternating rounds (latency.json)",
    "speedup_vs_baseline": "{threads: the baseline model's median / this one's} in those rounds",
}


def _read(path):
    return workdir_lib.read_json(path) if os.path.exists(path) else None


def _acc(ev, attack, mode="plain"):
    if not ev:
        return None
    entry = ev["natural_acc"] if attack == "natural" else (ev["attacks"].get(attack) or {}).get(mode)
    return None if not entry else entry["expected"]


def _file(export, noise, fmt, pruned):
    if not export:
        return None
    hits = [f for f in export["files"]
            if f["noise"] == noise and f["format"] == fmt and f["pruned"] == pruned]
    return hits[0] if hits else None


def _pruning(export):
    """(removed channels, share of all block-private channels, params before, after)."""
    rep = ((export or {}).get("pruning") or {}).get("det")
    if not rep:
        return None, None, None, None
    total = sum(b["channels"] for b in rep["blocks"].values())
    removed = rep["removed_channels"]
    return (removed, removed / total if total else 0.0, rep["before"]["params"],
            rep["after"]["params"])


def _latency(bench, name):
    if not bench or not name:
        return None
    times = [r["median_ms"] for r in bench["results"] if r["file"] == name and r["threads"] == 1]
    return times[0] if times else None


def _acc_eot(ev, attack):
    """The EOT run's expected accuracy, else the plain run's (a deterministic model)."""
    v = _acc(ev, attack, "eot")
    return _acc(ev, attack) if v is None else v


def _tflite(te, noise, key):
    """A tflite_eval.json value of the shipped file with or without noise (None if absent)."""
    hits = [f for f in ((te or {}).get("files") or {}).values() if f["noise"] == noise]
    if not hits:
        return None
    if key == "square":
        return (hits[0].get("square") or {}).get("accuracy")
    return hits[0].get(key)


def _side_by_side(latency, name, key):
    """{str(threads): value} of model `name` in latency.json, or None."""
    hits = {str(r["threads"]): r[key] for r in (latency or {}).get("results", [])
            if r["model"] == name}
    return hits or None


def model_row(pipeline_dir, name, latency=None):
    """The ROW_KEYS dict of the model work dir pipeline_dir/name (latency: the pipeline
    dir's latency.json, if any)."""
    wd = os.path.join(pipeline_dir, name)
    ev = _read(os.path.join(wd, workdir_lib.EVAL_JSON))
    ex = _read(os.path.join(wd, workdir_lib.EXPORT_JSON))
    be = _read(os.path.join(wd, workdir_lib.BENCH_JSON))
    te = _read(os.path.join(wd, workdir_lib.TFLITE_EVAL_JSON))
    metrics = workdir_lib.read_metrics(wd)
    noisy, det = workdir_lib.shipped_file(ex, True), workdir_lib.shipped_file(ex, False)
    shipped = det or noisy
    sp = ev["sparsity"]["overall"] if ev else {}
    unpruned = det and (_file(ex, False, det["format"], False) if det["pruned"] else det)
    int4 = _file(ex, False, "int4", True) or _file(ex, False, "int4", False)
    removed, removed_share, params_before, params_after = _pruning(ex)
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
        "worst_case": (ev.get("worst_case") or {}).get("expected") if ev else None,
        "apgd_ce": _acc_eot(ev, "apgd_ce"),
        "apgd_dlr": _acc_eot(ev, "apgd_dlr"),
        "transfer_det": _tflite(te, False, "transfer"),
        "transfer_noisy": _tflite(te, True, "transfer"),
        "square_det": _tflite(te, False, "square"),
        "square_noisy": _tflite(te, True, "square"),
        "square_examples": max([(f.get("square") or {}).get("n_examples", 0)
                                for f in te["files"].values()], default=None) if te else None,
        "zero_share": sp.get("zero_share"),
        "channel_sparsity": sp.get("channel_sparsity"),
        "filter_sparsity": sp.get("filter_sparsity"),
        "sanity_failed": [c["check"] for c in ev["sanity"] if not c["held"]] if ev else None,
        "tflite_file": shipped["file"] if shipped else None,
        "tflite_bytes": shipped["size_bytes"] if shipped else None,
        "latency_ms_noise": _latency(be, noisy and noisy["file"]),
        "latency_ms_no_noise": _latency(be, det and det["file"]),
        "tflite_dropped": [d["file"] for d in ex.get("dropped", [])] if ex else [],
        "tflite_zipped_bytes": shipped.get("zipped_bytes") if shipped else None,
        "tflite_macs": shipped.get("macs") if shipped else None,
        "tflite_macs_unpruned": unpruned.get("macs") if unpruned else None,
        "latency_ms_unpruned": _latency(be, unpruned and unpruned["file"]),
        "removed_channels": removed,
        "removed_share": removed_share,
        "params_before": params_before,
        "params_after": params_after,
        "int4_file": int4["file"] if int4 else None,
        "int4_bytes": int4["size_bytes"] if int4 else None,
        "int4_zipped_bytes": int4.get("zipped_bytes") if int4 else None,
        "latency_ms_int4": _latency(be, int4 and int4["file"]),
        "side_by_side_ms": _side_by_side(latency, name, "median_ms"),
        "speedup_vs_baseline": _side_by_side(latency, name, "speedup"),
    }


def _table(columns, rows):
    table = report.table([c for c, _, _ in columns], [[cell(r) for _, _, cell in columns]
                                                     for r in rows])
    legend = "\n".join(f"- **{c}**: {d}" for c, d, _ in columns)
    return table + "\n\n" + legend + "\n"


def _latency_note(latency):
    if not latency:
        return ""
    h = latency["host"]
    threads = sorted({r["threads"] for r in latency["results"]})
    return (f"\nSide by side: the shipped files of {len(latency['results']) // len(threads)} "
            f"models, {latency['runs']} invokes each in {latency['rounds']} alternating rounds, "
            f"batch 1, threads {' / '.join(map(str, threads))}; baseline "
            f"{latency['baseline']}; {h['cpu']} ({h['cpu_count']} cores), LiteRT "
            f"{h['litert']}, load average {latency['load_avg']}.\n")


def markdown(rows, latency=None):
    text = "## Accuracy and robustness\n\n" + _table(COLUMNS, rows)
    text += ("\n## Efficiency of the shipped files\n\n" + _table(EFFICIENCY, rows)
             + _latency_note(latency))
    warnings = [f"- {r['model']}: {', '.join(r['sanity_failed'])}" for r in rows
                if r["sanity_failed"]]
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
    latency = _read(os.path.join(pipeline_dir, workdir_lib.LATENCY_JSON))
    rows = [model_row(pipeline_dir, n, latency) for n in names]
    workdir_lib.write_json(os.path.join(pipeline_dir, workdir_lib.SUMMARY_JSON), {"models": rows})
    text = markdown(rows, latency)
    with open(os.path.join(pipeline_dir, workdir_lib.SUMMARY_MD), "w") as f:
        f.write(f"# brkeras pipeline summary\n\n{text}")
    print(text, flush=True)
    return rows
