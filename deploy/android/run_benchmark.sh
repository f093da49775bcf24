#!/usr/bin/env bash
# Benchmarks .tflite files on an attached Android device with TFLite's benchmark_model
# and writes the results in the bench.json schema of brkeras/benchmark.py.
#
# Usage:
#   deploy/android/run_benchmark.sh --binary PATH/benchmark_model [--out bench_android.json]
#       [--threads "1 2"] [--num_runs 50] [--use_xnnpack true|false] [--use_gpu true|false]
#       MODEL.tflite [MODEL.tflite ...]
#
# Exit codes: 0 ok, 2 usage, 3 adb missing, 4 no usable device, 5 benchmark_model
# binary missing / not arm64, 6 model file missing, 7 python missing, 8 a run failed.
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
binary=""
out="bench_android.json"
threads="1 2"
num_runs=50
use_xnnpack=true
use_gpu=false
models=()
remote_dir=/data/local/tmp/brkeras

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;  # --opt=v -> --opt v
        --binary|--out|--threads|--num_runs|--use_xnnpack|--use_gpu)
            # The option names are the variable names.
            [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; usage >&2; exit 2; }
            printf -v "${1#--}" '%s' "$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) models+=("$1"); shift ;;
    esac
done

# ---- prerequisites: report every problem, exit with the first one's code ----
problems=0
first_code=0
fail() {  # fail CODE MESSAGE
    echo "MISSING: $2" >&2
    problems=$((problems + 1))
    [ "$first_code" -eq 0 ] && first_code=$1
}

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    fail 7 "python ('$python') not found; set PYTHON=/path/to/.venv/bin/python (it parses the logs)"
fi

if ! command -v adb >/dev/null 2>&1; then
    fail 3 "adb is not on PATH. Install the Android SDK platform-tools (Debian: 'apt-get install adb'; or https://developer.android.com/tools/releases/platform-tools) and add the directory holding adb to PATH."
else
    devices="$(adb devices 2>/dev/null | sed '1d' | awk 'NF >= 2 {print $2}')"
    n_ok="$(printf '%s\n' "$devices" | grep -cx 'device')"
    if [ "$n_ok" -eq 0 ]; then
        if printf '%s\n' "$devices" | grep -qx 'unauthorized'; then
            fail 4 "a device is attached but unauthorized: unlock it and accept the 'Allow USB debugging' prompt, then rerun."
        else
            fail 4 "no Android device attached ('adb devices' lists none in state 'device'). Connect a phone with USB debugging enabled (Settings > Developer options) or start an emulator, and check with 'adb devices'."
        fi
    elif [ "$n_ok" -gt 1 ] && [ -z "${ANDROID_SERIAL:-}" ]; then
        fail 4 "$n_ok devices attached; choose one with ANDROID_SERIAL=<serial> (see 'adb devices')."
    fi
fi

if [ -z "$binary" ]; then
    fail 5 "no benchmark_model binary given. Pass --binary PATH; build it for android_arm64 (docs/android_benchmark.md) or download a prebuilt nightly android_aarch64_benchmark_model."
elif [ ! -f "$binary" ]; then
    fail 5 "benchmark_model binary '$binary' does not exist. Check the path (Bazel puts it in bazel-bin/.../tools/benchmark/benchmark_model)."
else
    # ELF header: bytes 0-3 '\x7fELF', byte 4 = 2 (64-bit), bytes 18-19 = b7 00 (EM_AARCH64).
    magic="$(od -An -tx1 -N4 "$binary" | tr -d ' \n')"
    class="$(od -An -tx1 -j4 -N1 "$binary" | tr -d ' \n')"
    machine="$(od -An -tx1 -j18 -N2 "$binary" | tr -d ' \n')"
    if [ "$magic" != "7f454c46" ] || [ "$class" != "02" ] || [ "$machine" != "b700" ]; then
        fail 5 "'$binary' is not an arm64 (aarch64) ELF executable (magic=$magic class=$class machine=$machine). Build with --config=android_arm64 (docs/android_benchmark.md)."
    fi
fi

if [ "${#models[@]}" -eq 0 ]; then
    fail 6 "no model files given. Pass the .tflite files, e.g. WORKDIR/export/*.tflite (run 'brkeras export' first)."
fi
for m in "${models[@]}"; do
    if [ ! -f "$m" ]; then
        fail 6 "model file '$m' does not exist. Run 'brkeras export --workdir=...' and pass WORKDIR/export/*.tflite."
    fi
done

if [ "$problems" -gt 0 ]; then
    echo "$problems prerequisite(s) missing; nothing was run." >&2
    exit "$first_code"
fi

# ---- run ----
set -e
model_name="$(adb shell getprop ro.product.model | tr -d '\r')"
abi="$(adb shell getprop ro.product.cpu.abi | tr -d '\r')"
sdk="$(adb shell getprop ro.build.version.sdk | tr -d '\r')"
adb shell mkdir -p "$remote_dir"
adb push "$binary" "$remote_dir/benchmark_model" >/dev/null
adb shell chmod +x "$remote_dir/benchmark_model"
logdir="$(mktemp -d)"
for m in "${models[@]}"; do
    base="$(basename "$m")"
    size="$(wc -c < "$m" | tr -d ' ')"
    adb push "$m" "$remote_dir/$base" >/dev/null
    for t in $threads; do
        log="$logdir/${base%.tflite}_t$t.log"
        echo "== $base threads=$t xnnpack=$use_xnnpack gpu=$use_gpu"
        if ! adb shell "$remote_dir/benchmark_model" --graph="$remote_dir/$base" \
                --num_threads="$t" --num_runs="$num_runs" --use_xnnpack="$use_xnnpack" \
                --use_gpu="$use_gpu" > "$log" 2>&1; then
            echo "benchmark_model failed on $base (threads=$t); log: $log" >&2
            tail -20 "$log" >&2
            exit 8
        fi
        PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -m brkeras.benchmark parse \
            "$out" "$log" "$size" "use_xnnpack=$use_xnnpack" "use_gpu=$use_gpu" \
            "host.device=$model_name" "host.abi=$abi" "host.sdk=$sdk"
    done
done
echo "results in $out (logs in $logdir)"
