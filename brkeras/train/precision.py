"""Mixed precision for training: the dtype policy and the CPU features that choose it.

`config.optim.dtype_policy` is one of POLICIES:

* "float32": everything in float32 (the reference).
* "mixed_bfloat16": Keras' mixed policy. Layers compute in bfloat16; every
  variable stays float32 (Keras keeps the float32 variable and casts it at
  each read inside a layer), so checkpoints, gradients, the optimizer and weight
  decay are float32. brkeras keeps in float32 as well: Binary-Relax's Q(w) and u
  (the quantizer reads the float32 variable and casts u to the layer's compute
  dtype, quant/binary_relax.py), the loss (logits are cast to float32 in
  AdversarialModel and in the attacks), BatchNorm statistics (Keras' fused
  kernel computes them in float32; batchnorm.reestimate casts its inputs), the
  attack's input and step arithmetic (attacks.py casts to float32), and the
  noise scale std(x) of FeynmanKacNoise (nn/layers.py).
* "auto": "mixed_bfloat16" where bfloat16 is fast, else "float32": a CPU that
  reports AVX512_BF16 or AMX-BF16 (Linux /proc/cpuinfo flags avx512_bf16,
  amx_bf16; False on other systems), a GPU of compute capability >= 8.0, or a
  TPU, for a model whose first stage is at least BF16_MIN_WIDTH channels wide.
  Narrower convolutions lose more to the casts than bfloat16 saves: PGD-10
  steps of the width-8 Fashion-MNIST model took 2.5x longer in bfloat16 on an
  AMD EPYC (AVX512_BF16) and 4.8x longer on an Intel Xeon (AMX), while ResNet20
  at width 16 ran 1.6x faster on both (bench/step_time.py, 2026-12-02).

The policy is applied only while the training network is BUILT (`policy_scope`:
Keras layers take their dtype policy when they are constructed, and keep it),
and the previous global policy is restored right after. `run.train.load`,
evaluation and export build float32 models: a bf16-trained run evaluates and
exports exactly like a float32 one (same variables, same checkpoint).

tfmot's 8-bit QAT (precision "int8_qat") stays float32 under any policy
(`for_precision`): its FakeQuantWithMinMaxVars kernels are float32-only.
"""

import contextlib
import sys

from brkeras._keras import keras, tf

POLICIES = ("float32", "mixed_bfloat16", "auto")
MIXED = "mixed_bfloat16"
FLOAT32_ONLY_PRECISIONS = ("int8_qat",)  # fake-quant kernels take float32 only
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_MIN_WIDTH = 16  # config.model.width from which "auto" takes bfloat16 (docstring)
CPUINFO = "/proc/cpuinfo"


def check_policy(policy):
    if policy not in POLICIES:
        raise ValueError(f"dtype_policy={policy!r} (config.optim.dtype_policy); choose one "
                         f"of {POLICIES}")
    return policy


def onednn_enabled():
    """Whether this TensorFlow runs its oneDNN CPU kernels (brkeras asks for them on x86,
    brkeras/__init__.py); None where TensorFlow does not say."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def cpu_flags(cpuinfo=None):
    """The CPU feature flags of the first processor in /proc/cpuinfo (Linux), or
    of the given cpuinfo text; an empty set where there is none to read."""
    if cpuinfo is None:
        if not sys.platform.startswith("linux"):
            return set()
        try:
            with open(CPUINFO, encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86; ARM says Features
            return set(value.split())
    return set()


def cpu_has_bf16(flags=None):
    """True when the CPU flags (default: this machine's) include a bfloat16
    matrix instruction set: AVX512_BF16 or AMX-BF16."""
    flags = cpu_flags() if flags is None else set(flags)
    return any(f in flags for f in BF16_CPU_FLAGS)


def accelerator_has_bf16():
    """True when TensorFlow sees a TPU, or a GPU of compute capability >= 8.0 (Ampere on)."""
    if tf.config.list_physical_devices("TPU"):
        return True
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            cc = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        except (ValueError, RuntimeError):
            cc = None
        if cc and tuple(cc) >= (8, 0):
            return True
    return False


def resolve(policy, cpu_flags_=None, accelerator=None, width=None):
    """The Keras policy name ("float32" or "mixed_bfloat16") for a POLICIES name.

    "auto" gives "mixed_bfloat16" when `cpu_has_bf16(cpu_flags_)` or `accelerator`
    (default: `accelerator_has_bf16()`), else "float32"; and "float32" for a
    model narrower than BF16_MIN_WIDTH (`width`: config.model.width; None = not
    known, no width rule). `cpu_flags_`: a set of flags to decide on instead of
    this machine's (tests).
    """
    check_policy(policy)
    if policy != "auto":
        return policy
    if width is not None and width < BF16_MIN_WIDTH:
        return "float32"
    if cpu_has_bf16(cpu_flags_):
        return MIXED
    if accelerator is None:
        accelerator = accelerator_has_bf16()
    return MIXED if accelerator else "float32"


def for_precision(policy, precision, **resolve_kwargs):
    """`resolve(policy)` for a model of `precision` (config.quant.precision):
    float32 for the kinds that cannot compute in bfloat16 (tfmot's int8 QAT)."""
    name = resolve(policy, **resolve_kwargs)
    return "float32" if precision in FLOAT32_ONLY_PRECISIONS else name


@contextlib.contextmanager
def policy_scope(policy):
    """Sets the global Keras dtype policy (a POLICIES name, "auto" resolved) for the
    layers built inside, and restores the previous global policy on exit."""
    name = resolve(policy)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield name
    finally:
        keras.mixed_precision.set_global_policy(previous)


def compute_dtypes(model):
    """The set of compute dtype names of the model's layers (e.g. {"bfloat16", "float32"})."""
    return {l.compute_dtype for l in [model] + list(model.submodules)
            if isinstance(l, keras.layers.Layer) and l.compute_dtype is not None}

