"""Host benchmark schema, benchmark_model log parsing, Android script prerequisites."""

import json
import os
import subprocess

import pytest

from brkeras._keras import keras
from brkeras.quant import binary_relax
from brkeras.deploy import convert as convert_lib
from brkeras.deploy import flatbuffer
from brkeras.deploy import latency
from brkeras.deploy import export as deploy_export
from brkeras.run import benchmark as run_benchmark
from brkeras.run import export as run_export
from brkeras.run import summary
from brkeras.run import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "deploy", "android", "run_benchmark.sh")

LOG = """\
STARTING!
Log parameter values verbosely: [0]
Num threads: [2]
Graph: [/data/local/tmp/brkeras/det_full_int8.tflite]
Use xnnpack: [1]
Loaded model /data/local/tmp/brkeras/det_full_int8.tflite
INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
The input model file size (MB): 0.31
Initialized session in 12.5ms.
Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
count=180 first=4100 curr=2700 min=2600 max=4100 avg=2790.5 std=120

Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
count=372 first=2750 curr=2690 min=2580 max=3300 avg=2688.25 std=85

Inference timings in us: Init: 12500, First inference: 4100, Warmup (avg): 2790.5, Inference (avg): 2688.25
"""


def test_parse_benchmark_model_output():
    r = latency.parse_benchmark_model_output(LOG, size_bytes=1234)
    assert r["file"] == "det_full_int8.tflite"
    assert r["threads"] == 2
    assert r["runs"] == 372  # the timed block, not the warm-up block
    assert r["median_ms"] == pytest.approx(2.68825)
    assert r["median_is"] == "avg"
    assert r["p90_ms"] is None
    assert r["min_ms"] == pytest.approx(2.58) and r["max_ms"] == pytest.approx(3.3)
    assert r["init_ms"] == pytest.approx(12.5) and r["first_ms"] == pytest.approx(4.1)
    assert r["size_bytes"] == 1234
    with_median = LOG.replace("std=85", "std=85 p5=2600 median=2650 p95=2900")
    r2 = latency.parse_benchmark_model_output(with_median)
    assert r2["median_ms"] == pytest.approx(2.65) and r2["median_is"] == "median"
    assert r2["p95_ms"] == pytest.approx(2.9)
    profiled = LOG + "Timings (microseconds): count=50 first=1 curr=1 min=1 max=1 avg=1 std=0\n"
    assert latency.parse_benchmark_model_output(profiled)["runs"] == 372
    with pytest.raises(ValueError, match="count="):
        latency.parse_benchmark_model_output("ERROR: Could not open model\n")


def test_parse_cli_appends_bench_json(tmp_path):
    log = tmp_path / "a.log"
    log.write_text(LOG)
    out = tmp_path / "bench.json"
    for _ in range(2):
        latency._main(["parse", str(out), str(log), "999", "use_gpu=false", "host.abi=arm64-v8a"])
    b = json.loads(out.read_text())
    assert b["host"] == {"kind": "android", "abi": "arm64-v8a"}
    assert len(b["results"]) == 2
    assert set(latency.RESULT_KEYS) <= set(b["results"][0])
    assert b["results"][0]["use_gpu"] == "false" and b["results"][0]["size_bytes"] == 999


def test_summarize_percentiles():
    s = latency.summarize(list(range(1, 101)))
    assert s["median_ms"] == 50.5 and s["p90_ms"] == pytest.approx(90.1) and s["runs"] == 100


def _tiny_tflite(path):
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="m0_conv0")(inp)
    out = keras.layers.Dense(3, name="m0_logits")(keras.layers.GlobalAveragePooling2D()(x))
    b = convert_lib.convert(keras.Model(inp, out), "float32")
    path.write_bytes(b)
    return len(b)


def test_bench_json_schema(tmp_path):
    (tmp_path / "export").mkdir()
    size = _tiny_tflite(tmp_path / "export" / "det_float32.tflite")
    b = run_benchmark.benchmark(str(tmp_path), threads=(1, 2), runs=15, warmup=2)
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert on_disk["results"] == b["results"]
    assert on_disk["host"]["cpu_count"] == os.cpu_count()
    assert [(r["file"], r["threads"], r["runs"], r["size_bytes"], r["rounds"])
            for r in b["results"]] == [("det_float32.tflite", 1, 15, size, 5),
                                       ("det_float32.tflite", 2, 15, size, 5)]
    for r in b["results"]:
        assert set(latency.RESULT_KEYS) <= set(r)
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] < 1000
    table = latency.markdown_table(b).splitlines()
    assert len(table) == 4 and table[2].startswith("| det_float32.tflite | 1 |")
    with pytest.raises(ValueError, match="threads"):
        latency.benchmark_files([str(tmp_path / "export" / "det_float32.tflite")], threads=(0,))
    with pytest.raises(FileNotFoundError, match="brkeras export"):
        run_benchmark.benchmark(str(tmp_path / "nothing"), threads=(1,), runs=1)


def _fake_timer(monkeypatch, ms_of):
    """Replaces time_invoke by one that logs its calls and returns ms_of(path) per invoke."""
    calls = []

    def fake(path, num_threads=1, runs=200, warmup=20, seed=0):
        calls.append((os.path.basename(os.path.dirname(os.path.dirname(path))) + "/" +
                      os.path.basename(path), num_threads, runs, seed))
        return [ms_of(path)] * runs

    monkeypatch.setattr(latency, "time_invoke", fake)
    return calls


def test_alternating_times_interleaves_files_and_splits_the_runs(tmp_path, monkeypatch):
    (tmp_path / "m" / "export").mkdir(parents=True)
    a, b = (str(tmp_path / "m" / "export" / n) for n in ("a.tflite", "b.tflite"))
    for p in (a, b):
        open(p, "wb").close()
    calls = _fake_timer(monkeypatch, lambda p: 1.0)
    times = latency.alternating_times([a, b], threads=(1, 2), runs=7, rounds=3, warmup=0)
    # round r: every thread count, the files in turn, reversed on odd rounds; 7 = 3 + 2 + 2
    assert calls == [("m/a.tflite", 1, 3, 0), ("m/b.tflite", 1, 3, 0),
                     ("m/a.tflite", 2, 3, 0), ("m/b.tflite", 2, 3, 0),
                     ("m/b.tflite", 1, 2, 1), ("m/a.tflite", 1, 2, 1),
                     ("m/b.tflite", 2, 2, 1), ("m/a.tflite", 2, 2, 1),
                     ("m/a.tflite", 1, 2, 2), ("m/b.tflite", 1, 2, 2),
                     ("m/a.tflite", 2, 2, 2), ("m/b.tflite", 2, 2, 2)]
    assert {k: len(v) for k, v in times.items()} == {(a, 1): 7, (b, 1): 7, (a, 2): 7, (b, 2): 7}
    calls.clear()
    latency.alternating_times([a], runs=2, rounds=5, warmup=0)  # at most `runs` rounds
    assert [c[2] for c in calls] == [1, 1]
    with pytest.raises(ValueError, match="rounds"):
        latency.alternating_times([a], rounds=0)
    with pytest.raises(FileNotFoundError, match="brkeras export"):
        latency.alternating_times([a, str(tmp_path / "missing.tflite")])


def _model_dir(pipeline_dir, name, files):
    """A model work dir whose export.json lists `files` [(file, format, noise, pruned)]."""
    d = pipeline_dir / name / "export"
    d.mkdir(parents=True)
    for f, _, _, _ in files:
        (d / f).write_bytes(b"tflite")
    (pipeline_dir / name / "export.json").write_text(json.dumps({"files": [
        dict(file=f, format=fmt, noise=noise, pruned=pruned, size_bytes=6)
        for f, fmt, noise, pruned in files]}))


def test_compare_models_times_the_shipped_files_side_by_side(tmp_path, monkeypatch):
    _model_dir(tmp_path, "float", [("det_full_int8.tflite", "full_int8", False, False),
                                   ("noisy_dynamic_int8.tflite", "dynamic_int8", True, False)])
    _model_dir(tmp_path, "ternary", [("det_full_int8.tflite", "full_int8", False, False),
                                     ("det_pruned_full_int8.tflite", "full_int8", False, True)])
    _model_dir(tmp_path, "qat", [("det_qat_int8.tflite", "qat_int8", False, False)])
    os.makedirs(tmp_path / "failed")  # a model whose export did not run: left out
    ms = {"float": 2.0, "ternary": 0.5, "qat": 1.0}
    calls = _fake_timer(monkeypatch, lambda p: ms[p.split(os.sep)[-3]])
    names = ["float", "ternary", "qat", "failed"]
    out = run_benchmark.compare_models(str(tmp_path), names, baseline="qat", threads=(1, 2),
                                       runs=4, rounds=2)
    # the pruned full int8 file is what the ternary model ships
    assert {c[0] for c in calls} == {"float/det_full_int8.tflite", "qat/det_qat_int8.tflite",
                                     "ternary/det_pruned_full_int8.tflite"}
    assert [(r["model"], r["file"], r["threads"]) for r in out["results"]] == [
        ("float", "det_full_int8.tflite", 1), ("float", "det_full_int8.tflite", 2),
        ("ternary", "det_pruned_full_int8.tflite", 1),
        ("ternary", "det_pruned_full_int8.tflite", 2),
        ("qat", "det_qat_int8.tflite", 1), ("qat", "det_qat_int8.tflite", 2)]
    assert [r["speedup"] for r in out["results"]] == [0.5, 0.5, 2.0, 2.0, 1.0, 1.0]
    assert out["baseline"] == "qat" and out["rounds"] == 2 and out["runs"] == 4
    assert json.loads((tmp_path / "latency.json").read_text()) == json.loads(json.dumps(out))
    assert run_benchmark.comparison_is_current(str(tmp_path), names, "qat")
    assert run_benchmark.comparison_is_current(str(tmp_path), names)  # baseline as stored
    assert not run_benchmark.comparison_is_current(str(tmp_path), names, "float")
    assert not run_benchmark.comparison_is_current(str(tmp_path), names[:2], "qat")
    t = os.path.getmtime(tmp_path / "latency.json") + 5
    os.utime(tmp_path / "ternary" / "export.json", (t, t))  # a newer export: timed again
    assert not run_benchmark.comparison_is_current(str(tmp_path), names, "qat")
    # the summary rows carry the side-by-side figures
    row = summary.model_row(str(tmp_path), "ternary", out)
    assert row["side_by_side_ms"] == {"1": 0.5, "2": 0.5}
    assert row["speedup_vs_baseline"] == {"1": 2.0, "2": 2.0}
    text = summary.markdown([row], out)
    assert "| 0.500 / 0.500 | 2.00 / 2.00 |" in text and "baseline qat;" in text
    assert summary.model_row(str(tmp_path), "failed", out)["side_by_side_ms"] is None
    with pytest.raises(ValueError, match="baseline model 'failed' has no shipped file"):
        run_benchmark.compare_models(str(tmp_path), names, baseline="failed", runs=1)
    with pytest.raises(FileNotFoundError, match="export stage"):
        run_benchmark.compare_models(str(tmp_path), ["failed"], runs=1)


# ---- deploy/android/run_benchmark.sh prerequisites ----

def _arm64_elf(path):
    """A file whose ELF header says 64-bit aarch64 (enough for the script's check)."""
    h = bytearray(64)
    h[0:4] = b"\x7fELF"
    h[4] = 2
    h[18:20] = b"\xb7\x00"
    path.write_bytes(bytes(h))
    return path


def _run(args, path_dirs):
    env = {"PATH": os.pathsep.join(path_dirs), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["/bin/bash", SCRIPT] + args, capture_output=True, text=True,
                          env=env, timeout=30)


def _fake_adb(d, devices_output):
    d.mkdir()
    adb = d / "adb"
    adb.write_text("#!/bin/sh\nif [ \"$1\" = devices ]; then printf '%b' \"" + devices_output +
                   "\"; exit 0; fi\necho \"fake adb: $*\" >&2; exit 1\n")
    adb.chmod(0o755)
    return str(d)


def test_android_script_without_adb(tmp_path):
    model = tmp_path / "m.tflite"
    model.write_bytes(b"x")
    r = _run(["--binary", str(_arm64_elf(tmp_path / "bm")), str(model)], ["/usr/bin", "/bin"])
    assert r.returncode == 3, r.stderr
    assert "adb is not on PATH" in r.stderr and "platform-tools" in r.stderr
    assert "1 prerequisite(s) missing" in r.stderr


def test_android_script_no_device_and_other_problems(tmp_path):
    fake = _fake_adb(tmp_path / "bin", "List of devices attached\\n\\n")
    r = _run(["--binary", "/bin/ls", str(tmp_path / "missing.tflite")], [fake, "/usr/bin", "/bin"])
    assert r.returncode == 4, r.stderr
    assert "no Android device attached" in r.stderr and "USB debugging" in r.stderr
    assert "not an arm64 (aarch64) ELF" in r.stderr  # /bin/ls is x86-64 (or not aarch64)
    assert "missing.tflite' does not exist" in r.stderr
    assert "3 prerequisite(s) missing" in r.stderr


def test_android_script_unauthorized_and_missing_binary(tmp_path):
    model = tmp_path / "m.tflite"
    model.write_bytes(b"x")
    fake = _fake_adb(tmp_path / "bin", "List of devices attached\\nABC123\\tunauthorized\\n\\n")
    r = _run([str(model)], [fake, "/usr/bin", "/bin"])
    assert r.returncode == 4
    assert "unauthorized" in r.stderr
    assert "no benchmark_model binary given" in r.stderr
    r = _run(["--binary", str(tmp_path / "nope"), str(model)], [fake, "/usr/bin", "/bin"])
    assert "'" + str(tmp_path / "nope") + "' does not exist" in r.stderr


def test_android_script_device_ok_runs_past_checks(tmp_path):
    # With a device and valid inputs the checks pass and the script reaches adb shell
    # (which the fake adb fails): exit code is not a prerequisite code.
    model = tmp_path / "m.tflite"
    model.write_bytes(b"x")
    fake = _fake_adb(tmp_path / "bin", "List of devices attached\\nABC123\\tdevice\\n\\n")
    r = _run(["--binary", str(_arm64_elf(tmp_path / "bm")), str(model)],
             [fake, "/usr/bin", "/bin"])
    assert "MISSING" not in r.stderr
    assert r.returncode not in (2, 3, 4, 5, 6, 7)
    assert "fake adb: shell getprop" in r.stderr


def test_android_script_usage_error():
    r = _run(["--bogus"], ["/usr/bin", "/bin"])
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr




# ---- end to end on a smoke-trained work dir: export.json, bench.json, atomic export ----

import sys  # noqa: E402

import numpy as np  # noqa: E402

from brkeras import errors  # noqa: E402

sys.path.insert(0, REPO)
from configs import smoke  # noqa: E402  pylint: disable=wrong-import-position

FILE_KEYS = {"file", "format", "size_bytes", "noise", "pruned", "weights", "batch", "random_ops",
             "storage", "parity", "sparsity", "quantization"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("smoke_ternary"))
    train_lib.train(smoke.get_config("ternary,tradeoff"), wd, verbose=0)
    result = run_export.export(wd)
    return wd, result


def test_export_json_schema_and_exact_levels(exported):
    wd, result = exported
    on_disk = json.loads(open(os.path.join(wd, "export.json")).read())
    assert on_disk["min_agreement"] == 0.9  # configs/smoke.py's config.export.min_agreement
    names = sorted(e["file"] for e in on_disk["files"])
    pruned = [n for n in names if "pruned" in n]
    # noisy deploys have no full int8 (convert_lib.noisy_formats)
    base = sorted([f"det_{f}.tflite" for f in ("float32", "dynamic_int8", "full_int8")]
                  + [f"noisy_{f}.tflite" for f in ("float32", "dynamic_int8")])
    assert sorted(set(names) - set(pruned)) == base
    assert sorted(os.listdir(os.path.join(wd, "export"))) == names
    assert not [d for d in os.listdir(wd) if d.startswith(run_export.TMP_PREFIX)]
    qnames = sorted(binary_relax.quantized_kernels(train_lib.load(wd)))
    assert len(qnames) == 7  # depth 8: conv0 + 3 blocks x (conv1, conv2)
    for e in on_disk["files"]:
        assert FILE_KEYS <= set(e), e["file"]
        assert e["quantization"] == {"precision": "ternary", "max_level": 1}
        assert sorted(e["weights"]) == qnames
        b = open(os.path.join(wd, "export", e["file"]), "rb").read()
        assert len(b) == e["size_bytes"]
        for name in qnames:
            r = e["weights"][name]
            assert r["exact"], (e["file"], name, r)
            assert r["max_rel_err_vs_float_filter"] <= 1e-5
            if r["stored"] == "INT8":  # ternary: int8 in {-127, 0, 127}, nothing else
                assert set(r["int8_values"]) <= {-127, 0, 127}
                assert r["levels_per_channel_max"] <= 3
        # The shipped bytes carry no tensor names (export.strip_names), and their int8
        # 3x3 conv filters are the ternary kernels checked above (all 7 in full int8).
        wts = flatbuffer.weight_tensors(b)
        assert wts and all(w["name"] == "" for w in wts)
        tern = [w for w in wts if w["op"] == "CONV_2D" and w["shape"][1:3] == [3, 3]
                and w["dtype"] == "INT8"]
        assert len(tern) == sum(r["stored"] == "INT8" for r in e["weights"].values())
        for w in tern:
            assert set(np.unique(w["data"]).tolist()) <= {-127, 0, 127}, e["file"]
        if e["format"] == "full_int8":
            # 7 3x3 convs, 2 1x1 shortcuts (stages 2, 3), the dense layer: all int8
            assert e["storage"] == {"INT8": {"tensors": 10, "elements": e["storage"]["INT8"]["elements"]}}
        if e["noise"]:
            assert e["batch"] == 1  # deploy form: fixed batch, one NoiseBank
            assert sorted(o[0] for o in e["random_ops"]) == ["RANDOM_STANDARD_NORMAL",
                                                            "RANDOM_UNIFORM"]
            assert all(o[1:] == [0, 0] for o in e["random_ops"])
            p = e["parity"]
            assert p["runs"] == 3 and p["examples"] == 64 and p["abs_diff"] <= p["tolerance"]
        else:
            assert e["random_ops"] == []
            p = e["parity"]
            assert p["examples"] == 64 and p["top1_agreement"] >= 0.9
            assert abs(p["acc_tflite"] - p["acc_keras"]) <= 1 - p["top1_agreement"] + 1e-12
            if e["format"] == "float32":
                assert p["max_abs_logit_diff"] < 1e-4


def test_bench_json_end_to_end(exported):
    wd, result = exported
    b = run_benchmark.benchmark(wd)  # config.bench of configs/smoke.py: threads (1,), 5 runs
    on_disk = json.loads(open(os.path.join(wd, "bench.json")).read())
    assert on_disk["results"] == b["results"]
    sizes = {e["file"]: e["size_bytes"] for e in result["files"]}
    assert sorted(r["file"] for r in b["results"]) == sorted(sizes)
    for r in b["results"]:
        assert set(latency.RESULT_KEYS) <= set(r)
        assert (r["threads"], r["runs"], r["size_bytes"]) == (1, 5, sizes[r["file"]])
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] < 1000


def test_failed_parity_leaves_previous_export(exported, monkeypatch):
    wd, _ = exported
    before = {f: open(os.path.join(wd, "export", f), "rb").read()
              for f in os.listdir(os.path.join(wd, "export"))}
    json_before = open(os.path.join(wd, "export.json")).read()
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise errors.ParityError("forced parity failure")

    monkeypatch.setattr(deploy_export, "parity_deterministic", failing)
    monkeypatch.setattr(deploy_export, "parity_stochastic", failing)  # fail on the first file
    with pytest.raises(errors.ParityError, match="forced") as e:
        run_export.export(wd)
    assert isinstance(e.value, errors.BrkerasError) and calls == [1]
    after = {f: open(os.path.join(wd, "export", f), "rb").read()
             for f in os.listdir(os.path.join(wd, "export"))}
    assert after == before and open(os.path.join(wd, "export.json")).read() == json_before
    assert not [d for d in os.listdir(wd) if d.startswith(run_export.TMP_PREFIX)]
    # Without a previous export, a failure leaves neither export/ nor export.json.
    fresh = os.path.join(os.path.dirname(wd), "fresh_copy")
    os.makedirs(fresh)
    for f in ("config.json", "state.json"):
        open(os.path.join(fresh, f), "w").write(open(os.path.join(wd, f)).read())
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.copytree(os.path.join(wd, "ckpt"), os.path.join(fresh, "ckpt"))
    with pytest.raises(errors.ParityError):
        run_export.export(fresh)
    assert sorted(os.listdir(fresh)) == ["ckpt", "config.json", "state.json"]
