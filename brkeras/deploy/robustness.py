"""Robustness of the shipped TFLite files, run through LiteRT: transfer and Square Attack.

The white-box evaluation (robust/evaluation.py) attacks the Keras model; what
ships is a TFLite file (int8 rounding; noise off, or noise drawn by the file's
own random ops). Two attacks measure the file itself:

  transfer  the worst-case adversarial examples of the Keras evaluation (per
            example the x_adv of an attack that broke it, else the strongest
            attack's), classified by the file;
  square    Square Attack (L-inf, robust/square.py) with the file as its only
            oracle: queries, no gradients, so gradient masking and int8 rounding
            cannot hide errors from it.

Accuracies are of the expected prediction: argmax of the mean softmax over
`draws` invokes for a noisy file (each invoke draws fresh noise), one invoke
for a noise-off file. Square's own success flag is judged on noisy margins
(biased low: it keeps the lowest of many noisy estimates), so its x_adv are
judged again with fresh draws.

Cost (LiteRT, 1 thread): a noise-off file runs in batches; a noisy file has a
fixed batch of 1 (its NoiseBank), so Square costs ~examples x queries x
square_eot_samples invokes of ~0.1 ms for the default Fashion-MNIST model.
That is one core's work, so Square's examples are split into `shards` fixed
shards, each with its own random stream (the results depend on seed and shards,
not on the machine), attacked by `workers` threads with one interpreter each
(LiteRT's invoke releases the GIL; the threads in use are workers x
num_threads). shards=1 is the one-stream attack.
"""

import concurrent.futures
import time

import numpy as np

from brkeras.deploy.parity import TFLiteModel
from brkeras.robust import sanity
from brkeras.robust.square import square_attack


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def expected_predictions(runner, x, draws, batch_size=256):
    """argmax_c of the mean softmax over `draws` calls of runner(x) (a TFLiteModel)."""
    p = 0.0
    for _ in range(max(1, int(draws))):
        p = p + _softmax(np.asarray(runner.logits(x, batch_size), np.float64))
    return np.asarray(p).argmax(1)


def _check_shards(shards, workers):
    """shards and workers as ints >= 1, else a ValueError naming the config field."""
    if int(shards) < 1:
        raise ValueError(f"shards={shards} (config.eval.square_shards); it must be >= 1")
    if int(workers) < 1:
        raise ValueError(f"workers={workers}; pass >= 1 (config.eval.tflite_workers=0 becomes "
                         "the core count in run.evaluate.tflite_workers)")
    return int(shards), int(workers)


def square_sharded(path, x, y, eps, *, shards=1, workers=1, seed=0, num_threads=1,
                   batch_size=256, **square_kwargs):
    """Square Attack on the TFLite file `path`, its examples in `shards` shards
    attacked by `workers` threads.

    Shard j (np.array_split of x's order) runs `square_attack` with its own
    interpreter and the generator np.random.default_rng([*seed, j]); with shards=1,
    default_rng(seed): the one-stream attack. seed is an int or a sequence of ints.
    Returns (x_adv, info) in the order of x; the same for any `workers`.
    """
    shards, workers = _check_shards(shards, workers)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples and y {len(y)}; give the same number")
    seed = [int(s) for s in np.atleast_1d(seed)]
    parts = np.array_split(np.arange(len(x)), shards)

    def attack(j):
        runner = TFLiteModel(path, num_threads=num_threads)
        rng = np.random.default_rng(seed + [j] if shards > 1 else seed)
        return square_attack(lambda a: runner.logits(a, batch_size), x[parts[j]], eps,
                             y=y[parts[j]], seed=rng, **square_kwargs)

    jobs = [j for j in range(len(parts)) if len(parts[j])]
    if workers == 1 or len(jobs) == 1:
        results = [attack(j) for j in jobs]
    else:
        with concurrent.futures.ThreadPoolExecutor(min(workers, len(jobs))) as pool:
            results = list(pool.map(attack, jobs))
    info = {key: np.concatenate([r[1][key] for r in results]) for key in results[0][1]}
    return np.concatenate([r[0] for r in results]), info


def _check(files, x, y, x_adv, eps, draws, square_examples, square_queries, whitebox_robust,
           workers, shards, square_p_init, square_eot_samples):
    if not files:
        raise ValueError("files is empty: pass [{'file', 'path', 'noise'}] of the exported "
                         "files to attack (export.json's records)")
    for f in files:
        if not {"file", "path", "noise"} <= set(f):
            raise ValueError(f"file record {f} needs 'file', 'path' and 'noise'")
    if x.shape != x_adv.shape or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x {x.shape}, x_adv {x_adv.shape} and y {y.shape}: give the same "
                         "examples (>= 1), clean and adversarial")
    if not 0 <= eps <= 1:
        raise ValueError(f"eps={eps}; give the L-inf radius of the evaluation, in [0, 1]")
    _check_shards(shards, workers)
    for name, field, v in (("draws", "eot_samples", draws),
                           ("square_queries", "square_queries", square_queries),
                           ("square_eot_samples", "square_eot_samples", square_eot_samples)):
        if int(v) < 1:
            raise ValueError(f"{name}={v} (config.eval.{field}); it must be >= 1")
    if not 0 < float(square_p_init) <= 1:
        raise ValueError(f"square_p_init={square_p_init} (config.eval.square_p_init); give a "
                         "share of the image in (0, 1], e.g. 0.05")
    if int(square_examples) < 0:
        raise ValueError(f"square_examples={square_examples} (config.eval.square_examples); "
                         "give >= 0 (0 = no Square Attack)")
    if whitebox_robust is not None and len(whitebox_robust) != len(x):
        raise ValueError(f"whitebox_robust has {len(whitebox_robust)} entries for {len(x)} "
                         "examples; pass the evaluation's per-example worst case")


def evaluate_files(files, x, y, x_adv, *, eps, draws=4, square_examples=200, square_queries=500,
                   square_p_init=0.05, square_eot_samples=1, whitebox_robust=None, seed=0,
                   batch_size=256, num_threads=1, shards=1, workers=1, verbose=0):
    """Transfer and Square Attack accuracies of TFLite files.

    Args:
        files: [{"file": name, "path": path, "noise": bool, ...}] (export.json records).
        x, y: clean images float32 [N, H, W, C] in [0, 1] and int labels [N].
        x_adv: the white-box worst-case adversarial examples of the same N images.
        eps: L-inf radius (Square's ball; x_adv is checked to lie in it).
        draws: invokes per expected prediction of a noisy file.
        square_examples: Square attacks the first of these examples (0 = skip).
        square_queries, square_p_init, square_eot_samples: Square's budget per
            example (the clean query included), initial square share, draws per query.
        whitebox_robust: bool [N], the Keras worst case per example, for the
            black-box >= white-box check on the Square examples.
        seed: Square's random squares and signs (one stream per file and shard).
        num_threads: LiteRT threads per interpreter.
        shards, workers: Square's examples in that many shards, attacked by that
            many threads (square_sharded); the results depend on shards only.

    Returns:
        dict(eps, n_examples, draws, files {name: {noise, format, draws, natural,
        transfer, square {accuracy, attack_success, n_examples, n_queries,
        mean_queries, max_linf, p_init, eot_samples, time_s}, time_s}},
        whitebox {worst_case, square_subset}, sanity [...], time_s).
    """
    t0 = time.time()
    x = np.asarray(x, np.float32)
    x_adv = np.asarray(x_adv, np.float32)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    eps = float(eps)
    _check(files, x, y, x_adv, eps, draws, square_examples, square_queries, whitebox_robust,
           workers, shards, square_p_init, square_eot_samples)
    linf = float(np.abs(x_adv - x).reshape(len(x), -1).max())
    if linf > eps + 1e-5:
        raise ValueError(f"x_adv is up to {linf:.4g} from x, outside the eps={eps} ball; pass "
                         "the evaluation's worst-case examples at the same eps")
    say = print if verbose else (lambda *a, **k: None)
    k = min(int(square_examples), len(x))
    out = dict(eps=eps, n_examples=int(len(x)), draws=int(draws), files={}, sanity=[])
    if whitebox_robust is not None:
        wb = np.asarray(whitebox_robust, bool)
        out["whitebox"] = {"worst_case": float(wb.mean()),
                           "square_subset": float(wb[:k].mean()) if k else None}
    for i, f in enumerate(files):
        t_file = time.time()
        runner = TFLiteModel(f["path"], num_threads=num_threads)
        d = int(draws) if f["noise"] else 1
        entry = dict(noise=bool(f["noise"]), format=f.get("format"), draws=d)
        entry["natural"] = float(np.mean(expected_predictions(runner, x, d, batch_size) == y))
        entry["transfer"] = float(np.mean(expected_predictions(runner, x_adv, d, batch_size)
                                          == y))
        say(f"[evaluate_tflite] {f['file']}: natural {entry['natural']:.4f}, transfer of the "
            f"worst case {entry['transfer']:.4f}", flush=True)
        entry["square"] = None
        if k:
            t_sq = time.time()
            x_sq, info = square_sharded(
                    f["path"], x[:k], y[:k], eps, shards=shards, workers=workers,
                    seed=(int(seed), i),
                    num_threads=num_threads, batch_size=batch_size,
                    n_queries=int(square_queries), p_init=float(square_p_init),
                    eot_samples=int(square_eot_samples) if f["noise"] else 1)
            acc = float(np.mean(expected_predictions(runner, x_sq, d, batch_size) == y[:k]))
            entry["square"] = dict(
                accuracy=acc, attack_success=float(np.mean(info["success"])), n_examples=k,
                n_queries=int(square_queries), mean_queries=float(np.mean(info["queries"])),
                max_linf=float(np.abs(x_sq - x[:k]).reshape(k, -1).max()),
                p_init=float(square_p_init),
                eot_samples=int(square_eot_samples) if f["noise"] else 1, shards=int(shards),
                workers=int(workers), time_s=round(time.time() - t_sq, 1))
            say(f"[evaluate_tflite] {f['file']}: Square ({square_queries} queries, {k} "
                f"examples) accuracy {acc:.4f} ({entry['square']['time_s']} s)", flush=True)
            if whitebox_robust is not None:
                out["sanity"].append(sanity.blackbox_check(
                        f"Square on {f['file']}", acc, out["whitebox"]["square_subset"], k))
        entry["time_s"] = round(time.time() - t_file, 1)
        out["files"][f["file"]] = entry
    out["time_s"] = round(time.time() - t0, 1)
    return out
