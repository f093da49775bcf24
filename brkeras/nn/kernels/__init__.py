"""Fused CPU kernels for the hot path of EnResNet training, built on the host.

`fk_noise.cc` computes the Feynman-Kac noise map (nn/layers.py) and its pullback
in two passes over the tensor each, where the TF-op path takes about twenty
(casts, moments, the pooled product, x + p and the pullback, each a kernel of
its own). The uniforms are TF's stateless Philox stream of a key and counter
that TF ops draw, generated in the kernel bit for bit as TF's (scalar) kernel
would, 16 counters at a time; the signs stay TF random ops. So the distribution,
the seeding and the deploy form do not change, and with the same seed both paths
give the same values up to float rounding (tests/test_noise_kernel.py).

Build it once per TensorFlow install (`make setup` does; needs g++):

    python -m brkeras.nn.kernels

It compiles against the installed TensorFlow's headers and framework library
(tf.sysconfig flags) into `_fk_noise.so` beside the source. `fk_noise_ops()` loads
it, and returns None (the TF-op path runs) when it is missing, older than its
source, built for another TensorFlow, turned off with BRKERAS_FUSED_KERNELS=0, or
inside `disabled()` (how TFLite conversions trace: the op is no TFLite builtin).
"""

import contextlib
import os
import subprocess
import warnings

_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(_DIR, "fk_noise.cc")
LIBRARY = os.path.join(_DIR, "_fk_noise.so")
ENV_SWITCH = "BRKERAS_FUSED_KERNELS"  # "0" = always the TF-op path

_cache = {}


_disabled_depth = [0]


def enabled():
    """False inside `disabled()` or when BRKERAS_FUSED_KERNELS=0 (read at every call)."""
    return _disabled_depth[0] == 0 and os.environ.get(ENV_SWITCH, "1") != "0"


def builtin_ops_only():
    """True inside `disabled()`: graphs traced there leave this process (TFLite), so
    the noise layer draws with TFLite builtins only (nn/layers.py)."""
    return _disabled_depth[0] > 0


@contextlib.contextmanager
def disabled():
    """Models traced inside use the TF-op path: for graphs that leave this process,
    e.g. a TFLite conversion of a model holding FeynmanKacNoise layers (deploy/convert.py
    converts under it; the kernel's op is not a TFLite builtin)."""
    _disabled_depth[0] += 1
    try:
        yield
    finally:
        _disabled_depth[0] -= 1


def unavailable_reason():
    """Why fk_noise_ops() is None, or None when it loads."""
    fk_noise_ops()
    return _cache.get("reason")


def fk_noise_ops():
    """The loaded op module (brkeras_fk_noise, brkeras_fk_noise_grad), or None."""
    if not enabled():
        return None
    if "ops" not in _cache:
        _cache["ops"], _cache["reason"] = _load()
        if _cache["ops"] is None:
            warnings.warn(f"brkeras: fused noise kernel not used ({_cache['reason']}); the TF-op "
                          "path runs (same values, slower)", RuntimeWarning, stacklevel=2)
    return _cache["ops"]


def _load():
    from brkeras._keras import tf  # pylint: disable=g-import-not-at-top
    if not os.path.exists(LIBRARY):
        return None, f"{LIBRARY} not built; run `python -m brkeras.nn.kernels`"
    if os.path.getmtime(LIBRARY) < os.path.getmtime(SOURCE):
        return None, f"{LIBRARY} is older than its source; run `python -m brkeras.nn.kernels`"
    if tf.config.list_logical_devices("GPU"):
        return None, "the kernel is CPU-only and a GPU is visible"
    try:
        return tf.load_op_library(LIBRARY), None
    except (tf.errors.NotFoundError, OSError) as e:  # e.g. built for another TensorFlow
        return None, f"{LIBRARY} does not load ({e}); rebuild with `python -m brkeras.nn.kernels`"


def _accepts(flag):
    """Whether g++ knows `flag` (GCC < 12 has no -mno-avx512fp16)."""
    r = subprocess.run(["g++", flag, "-fsyntax-only", "-x", "c++", os.devnull],
                       capture_output=True, check=False)
    return r.returncode == 0


def compile_command(output=LIBRARY):
    """The g++ command line that builds `output` against the installed TensorFlow.

    -march=native, less AVX512-FP16: with it on (Sapphire Rapids and later) the
    Eigen headers that TensorFlow ships fail to compile (PacketMathFP16.h uses
    templates its Eigen no longer declares); the kernel has no FP16 code."""
    from brkeras._keras import tf  # pylint: disable=g-import-not-at-top
    arch = ["-march=native"] + [f for f in ("-mno-avx512fp16",) if _accepts(f)]
    return (["g++", "-shared", "-fPIC", "-O3", *arch, "-Wno-deprecated-declarations", "-o", output, SOURCE]
            + tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags())


def _compiler_errors(stderr, limit=4000):
    """The compiler's error lines first (its warnings about TF's headers run to pages)."""
    errors = [line for line in stderr.splitlines() if " error: " in line or line.startswith("error")]
    return ("\n".join(errors[:20]) + "\n...\n" if errors else "") + stderr[-limit:]


def build():
    """Compiles the kernel (to a temporary file, then renamed: a failed build keeps the
    old library). Raises RuntimeError with the compiler's message on failure."""
    tmp = LIBRARY + f".tmp{os.getpid()}"
    cmd = compile_command(tmp)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise RuntimeError("g++ not found: install it (Debian: apt-get install g++) to build the "
                           "fused kernel; without it the TF-op path runs") from e
    if r.returncode != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"building {LIBRARY} failed:\n{' '.join(cmd)}\n{_compiler_errors(r.stderr)}")
    os.replace(tmp, LIBRARY)
    _cache.clear()
    return LIBRARY

