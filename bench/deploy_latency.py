"""Deployed latency of the noisy vs noise-free model in LiteRT, as ratios. Run by hand:

    .venv/bin/python bench/deploy_latency.py [--rounds 7] [--runs 100] [--threads 1]

Two models: (a) ResNet20, 32x32x3, width 16; (b) the default Fashion-MNIST pipeline
model, depth 8, width 16, 28x28x1 (configs/fashion_mnist_enresnet.py). Random
He-initialised weights with BatchNorm statistics set by a few training-mode passes;
"ternary" sets every 3x3 kernel to its exact ternary Q(w) (quantizers.ternary) and
exports full int8 (levels_lib.fix_quantized_weights), as `brkeras export` does.
Rows: float32 and full int8, noise off (det), noise on in the training-time form
(one random op per block, "layer") and in the deploy form (nn_deploy.deploy_model:
one NoiseBank at the input, "bank"); also the pruned ternary model
(prune.prune_blocks; random weights have no removable channel, so it equals the
unpruned one unless --dead > 0 kills that share of each block's conv2 input slices).
Timing: batch 1, `threads` threads, Interpreter.invoke, `runs` invokes per
measurement, rounds interleaved over all files (the machine is shared), the
median of the round medians is reported; ratios come from the same run.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from brkeras.deploy import prune  # noqa: E402
from brkeras.quant import ops as quantizers
from brkeras.deploy import convert as convert_lib
from brkeras.deploy import latency
from brkeras.deploy import exact_levels as levels_lib
from brkeras.nn import models
from brkeras.nn import deploy as nn_deploy
from brkeras._keras import keras  # noqa: E402

MODELS = {"resnet20_32x32x3": ((32, 32, 3), 20), "fm_d8w16_28x28x1": ((28, 28, 1), 8)}


def build(shape, depth, sigma, pool, ternary, dead, seed=0):
    keras.utils.set_random_seed(seed)
    m = models.build_model(shape, 10, depth=depth, width=16, sigma=sigma, noise_pool=pool)
    x = np.random.default_rng(seed).uniform(0, 1, (64,) + shape).astype(np.float32)
    for _ in range(20):  # BatchNorm moving statistics from training-mode passes
        m(x, training=True)
    quant = {}
    if ternary:
        rng = np.random.default_rng(seed + 1)
        for layer in m.layers:
            if isinstance(layer, keras.layers.Conv2D) and layer.kernel_size == (3, 3):
                k = quantizers.ternary(layer.kernel).numpy()
                if dead and layer.name.endswith("_conv2"):
                    k[:, :, rng.random(k.shape[2]) < dead, :] = 0
                layer.kernel.assign(k)
                quant[layer.name] = (k, 1)
    return m, quant, x[:16]


def files_for(name, shape, depth, out, dead, pool):
    made = {}
    for tern in (False, True):
        fmt = "full_int8" if tern else "float32"
        tag = "ternary_int8" if tern else "float32"
        for noise in ("det", "layer", "bank"):
            m, quant, x = build(shape, depth, 0.0 if noise == "det" else 0.1, pool, tern, dead)
            pm, rep = prune.prune_blocks(m)  # before deploy_model adds call sites to m's layers
            src = nn_deploy.deploy_model(m) if noise == "bank" else m
            f32 = convert_lib.convert(src, "float32")
            b = f32 if fmt == "float32" else levels_lib.fix_quantized_weights(
                convert_lib.convert(src, fmt, x), f32, quant)
            made[f"{tag} {noise}"] = b
            if tern and noise in ("det", "bank"):
                psrc = nn_deploy.deploy_model(pm) if noise == "bank" else pm
                pq = {k: (pm.get_layer(k).get_weights()[0], 1) for k in quant}
                pf = convert_lib.convert(psrc, "float32")
                made[f"{tag} {noise} pruned({rep['removed_channels']}ch)"] = \
                    levels_lib.fix_quantized_weights(convert_lib.convert(psrc, fmt, x), pf, pq)
    paths = {}
    for k, b in made.items():
        p = os.path.join(out, f"{name}_{k.replace(' ', '_').replace('(', '').replace(')', '')}.tflite")
        with open(p, "wb") as f:
            f.write(b)
        paths[k] = p
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pool", type=int, default=8, help="noise pool of the models (config.model.noise_pool)")
    ap.add_argument("--dead", type=float, default=0.0,
                    help="share of conv2 input slices zeroed in the ternary model (pruning demo)")
    ap.add_argument("--only", default="", help="comma-separated model names")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="deploy_latency_")
    paths = {}
    for name, (shape, depth) in MODELS.items():
        if args.only and name not in args.only.split(","):
            continue
        for k, p in files_for(name, shape, depth, out, args.dead, args.pool).items():
            paths[(name, k)] = p
    meds = {k: [] for k in paths}
    for _ in range(args.rounds):
        for k, p in paths.items():
            meds[k].append(float(np.median(latency.time_invoke(p, args.threads, args.runs, 10))))
    med = {k: float(np.median(v)) for k, v in meds.items()}
    print(f"LiteRT, batch 1, {args.threads} thread(s), median of {args.rounds} interleaved rounds "
          f"x {args.runs} invokes, noise pool {args.pool}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"| model | file | median ms | vs same det | vs float32 det |")
    print("| --- | --- | ---: | ---: | ---: |")
    for (name, k), v in med.items():
        det = med[(name, k.split()[0] + " det")]
        fdet = med[(name, "float32 det")]
        print(f"| {name} | {k} | {v:.3f} | {v / det:.2f}x | {v / fdet:.2f}x |")


if __name__ == "__main__":
    main()
