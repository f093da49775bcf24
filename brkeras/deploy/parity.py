"""Running TFLite files, and checking that they compute what the Keras model computes."""

import os
import weakref

import numpy as np

from brkeras.errors import ParityError
from brkeras._keras import tf


def tflite_logits(path_or_bytes, x, batch_size=1, num_threads=1):
    """Logits of a TFLite model on float32 images x (N, H, W, C), batch by batch."""
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

    kw = dict(num_threads=num_threads)
    if isinstance(path_or_bytes, (bytes, bytearray)):
        interp = Interpreter(model_content=bytes(path_or_bytes), **kw)
    else:
        interp = Interpreter(model_path=str(path_or_bytes), **kw)
    inp = interp.get_input_details()[0]
    x = np.asarray(x, np.float32)
    shape = [batch_size] + list(x.shape[1:])
    interp.resize_tensor_input(inp["index"], shape)
    interp.allocate_tensors()
    out_idx = interp.get_output_details()[0]["index"]
    outs = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        if len(xb) != batch_size:
            interp.resize_tensor_input(inp["index"], [len(xb)] + list(x.shape[1:]))
            interp.allocate_tensors()
        interp.set_tensor(inp["index"], xb)
        interp.invoke()
        outs.append(interp.get_tensor(out_idx).copy())
    return np.concatenate(outs)


class TFLiteModel:
    """A LiteRT interpreter kept open: `logits(x)` batch by batch, for many calls.

    The input is resized only when the batch changes. A file with a fixed batch
    (the noisy deploy: its NoiseBank draws for batch 1) runs at that batch
    whatever `batch_size` asks. Each invoke of a noisy file draws fresh noise
    (the export zeroes the random ops' seeds).
    """

    def __init__(self, path_or_bytes, num_threads=1):
        from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

        kw = dict(num_threads=num_threads)
        if isinstance(path_or_bytes, (bytes, bytearray)):
            self.interp = Interpreter(model_content=bytes(path_or_bytes), **kw)
            self.name = "<bytes>"
        else:
            self.interp = Interpreter(model_path=str(path_or_bytes), **kw)
            self.name = os.path.basename(str(path_or_bytes))
        inp = self.interp.get_input_details()[0]
        self._in = inp["index"]
        self._out = self.interp.get_output_details()[0]["index"]
        sig = inp.get("shape_signature", inp["shape"])
        self.fixed_batch = None if int(sig[0]) == -1 else int(sig[0])
        self._shape = None

    def _resize(self, shape):
        if self._shape != shape:
            self.interp.resize_tensor_input(self._in, list(shape))
            self.interp.allocate_tensors()
            self._shape = shape

    def logits(self, x, batch_size=256):
        """Logits [N, K] of float32 images x [N, H, W, C], `batch_size` per invoke."""
        x = np.asarray(x, np.float32)
        bs = self.fixed_batch or max(1, int(batch_size))
        if self.fixed_batch and len(x) % bs:
            raise ValueError(f"{self.name} runs batches of {bs} only; pass a multiple of {bs} "
                             "examples")
        outs = []
        for i in range(0, len(x), bs):
            xb = x[i:i + bs]
            self._resize((len(xb),) + x.shape[1:])
            self.interp.set_tensor(self._in, xb)
            self.interp.invoke()
            outs.append(self.interp.get_tensor(self._out).copy())
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    __call__ = logits


_INFER = weakref.WeakKeyDictionary()


def inference_fn(model):
    """One tf.function per model, traced once for any batch size (no retracing warnings)."""
    fn = _INFER.get(model)
    if fn is None:
        spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32)
        fn = tf.function(lambda t: model(t, training=False), input_signature=[spec])
        _INFER[model] = fn
    return fn


def keras_logits(model, x, batch_size=100):
    """Logits of a Keras model (inference mode) on x, batch by batch."""
    fn = inference_fn(model)
    return np.concatenate([fn(tf.constant(x[i:i + batch_size], tf.float32)).numpy()
                           for i in range(0, len(x), batch_size)])


def agreement_bar(min_agreement, fmt):
    """The top-1 agreement bar of format `fmt`: `min_agreement` is one share for
    every format or a dict {format: share}."""
    return float(min_agreement[fmt] if isinstance(min_agreement, dict) else min_agreement)


def _examples(share, n):
    """The number of the n examples that `share` allows (rounding error forgiven)."""
    return int(np.floor(float(share) * n + 1e-6))


def parity_deterministic(tflite, model, x, y=None, min_agreement=0.995, batch_size=50,
                         max_accuracy_drop=None, keras_out=None):
    """Noise-off parity: top-1 agreement and max |logit difference|; raises ParityError.

    agreement = mean(argmax tflite == argmax keras) must be >= min_agreement; with
    max_accuracy_drop (and labels y), acc_keras - acc_tflite must be <= it too.
    keras_out: the model's logits on x if already computed (the model is deterministic).
    """
    lk = keras_logits(model, x, batch_size) if keras_out is None else keras_out
    lt = tflite_logits(tflite, x, batch_size)
    n = len(x)
    agree_count = int(np.sum(lk.argmax(1) == lt.argmax(1)))
    agree = agree_count / n
    out = dict(examples=int(n), top1_agreement=agree,
               max_abs_logit_diff=float(np.abs(lk - lt).max()),
               min_agreement=min_agreement)
    if y is not None:
        y = np.asarray(y).reshape(-1)
        right_keras = int(np.sum(lk.argmax(1) == y))
        right_tflite = int(np.sum(lt.argmax(1) == y))
        out["acc_keras"], out["acc_tflite"] = right_keras / n, right_tflite / n
        if max_accuracy_drop is not None:
            out["max_accuracy_drop"] = max_accuracy_drop
            drop = out["acc_keras"] - out["acc_tflite"]
            # Bars are judged in whole examples: 0.38 - 0.37 is 0.0100000...09 in floats.
            if right_keras - right_tflite > _examples(max_accuracy_drop, n):
                raise ParityError(
                    f"{os.path.basename(str(tflite))}: TFLite accuracy {out['acc_tflite']:.4f} is "
                    f"{drop:.4f} below Keras {out['acc_keras']:.4f} (> {max_accuracy_drop}); "
                    "the export is not faithful")
    if agree_count < n - _examples(1.0 - min_agreement, n):
        raise ParityError(f"{os.path.basename(str(tflite))}: TFLite top-1 agrees with Keras on "
                          f"{agree:.4f} of {len(x)} examples "
                          f"< {min_agreement} (max |logit diff| {out['max_abs_logit_diff']:.4g}); "
                          "the export is not faithful")
    return out


def noise_statistics(keras_draws, tflite_draws, z=4.0, mean_tol=0.25, std_rtol=0.1):
    """Do two stochastic models give the same logit distribution per example? Pure NumPy.

    keras_draws, tflite_draws: logits [K, n, C] of K independent draws on the same
    n examples (K >= 2). Per example i and class c: means m, sample variances v
    (ddof 1), d = m_t - m_k, se2 = (v_k + v_t) / K (the sampling variance of d),
    s2 = (v_k + v_t) / 2 (the variance of one draw). Examples are independent, so
    sums over them have standard errors from their own spread (delta method):

    mean test (per example): excess = sum_i a_i / sum_i b_i with
      a_i = sum_c (d^2 - se2), b_i = sum_c s2; E[excess] = 0 when the means agree,
      = b^2 / s2 for a per-example bias b. se = sqrt(sum_i (a_i - excess b_i)^2) / sum b.
      Holds when excess <= mean_tol^2 + z se: the means may differ by mean_tol
      single-draw standard deviations (int8 rounding), or by sampling noise.
    std test: ratio = sqrt(sum v_t / sum v_k); log ratio^2 = log V_t - log V_k has
      se = sqrt(n / (n - 1) sum_i g_i^2), g_i = sum_c v_t / V_t - sum_c v_k / V_k.
      Holds when |log ratio^2| <= max(z se, 2 log(1 + std_rtol)).
    A file exported without its noise has ratio 0; with sigma doubled, ratio ~2.
    """
    lk = np.asarray(keras_draws, np.float64)
    lt = np.asarray(tflite_draws, np.float64)
    if lk.shape != lt.shape or lk.ndim != 3 or lk.shape[0] < 2 or lk.shape[1] < 2:
        raise ValueError(f"keras_draws {lk.shape} and tflite_draws {lt.shape}: give logits "
                         "[K, n, C] of the same shape with K >= 2 draws and n >= 2 examples")
    k, n = lk.shape[:2]
    vk, vt = lk.var(0, ddof=1), lt.var(0, ddof=1)
    d = lt.mean(0) - lk.mean(0)
    a = (d ** 2 - (vk + vt) / k).sum(1)
    b = ((vk + vt) / 2).sum(1)
    if b.sum() > 0:
        excess = float(a.sum() / b.sum())
        se_excess = float(np.sqrt(((a - excess * b) ** 2).sum()) / b.sum())
    else:  # both deterministic: the means must agree exactly
        excess, se_excess = (0.0 if np.all(d == 0) else float("inf")), 0.0
    mean_bar = mean_tol ** 2 + z * se_excess
    mean_test = dict(excess=excess, se=se_excess, bar=float(mean_bar),
                     rms_bias_in_draw_std=float(np.sqrt(max(excess, 0.0))),
                     held=bool(excess <= mean_bar))
    sk, st = vk.sum(1), vt.sum(1)
    if sk.sum() > 0 and st.sum() > 0:
        log_r2 = float(np.log(st.sum()) - np.log(sk.sum()))
        g = st / st.sum() - sk / sk.sum()
        se_log = float(np.sqrt(n / (n - 1) * (g ** 2).sum()))
    else:
        log_r2 = 0.0 if sk.sum() == st.sum() else (float("inf") if st.sum() else -float("inf"))
        se_log = 0.0
    std_bar = max(z * se_log, 2 * np.log1p(std_rtol))
    std_test = dict(ratio=float(np.exp(log_r2 / 2)), se_log_ratio2=se_log,
                    band=[float(np.exp(-std_bar / 2)), float(np.exp(std_bar / 2))],
                    held=bool(abs(log_r2) <= std_bar))
    return dict(draws=int(k), examples=int(n), mean_test=mean_test, std_test=std_test)


def parity_stochastic(tflite, model, x, y, runs=3, z=4.0, mean_tol=0.25, std_rtol=0.1):
    """Noise-on parity of a TFLite file with its Keras model, batch 1, `runs` draws per
    example; raises ParityError naming the check that failed.

    accuracy: |mean acc_tflite - mean acc_keras| <= z * se, se = sqrt(2 p (1 - p) /
      (n runs)) (binomial standard error of a difference of two mean accuracies, p
      the pooled accuracy) plus 1/n;
    noise (runs >= 2): `noise_statistics` of the per-example logits: the mean logits
      and the logit standard deviation over the draws must agree within their
      sampling error (a file without its noise, or with another sigma, fails).
    Batch 1 on both sides because std(out) of the noise is over the whole batch.
    Cost: n * runs calls of each model (the export's default: 200 x 3).
    """
    y = np.asarray(y).reshape(-1)
    x = np.asarray(x, np.float32)
    n = len(x)
    fn = inference_fn(model)
    runner = TFLiteModel(tflite)
    lk = np.stack([np.concatenate([fn(tf.constant(x[i:i + 1])).numpy() for i in range(n)])
                   for _ in range(runs)])
    lt = np.stack([runner.logits(x, 1) for _ in range(runs)])
    acc_k = [float(np.mean(l.argmax(1) == y)) for l in lk]
    acc_t = [float(np.mean(l.argmax(1) == y)) for l in lt]
    p = (np.mean(acc_k) + np.mean(acc_t)) / 2
    tol = z * np.sqrt(2 * p * (1 - p) / (n * runs)) + 1.0 / n
    diff = abs(np.mean(acc_t) - np.mean(acc_k))
    out = dict(examples=n, runs=runs, acc_keras_runs=acc_k, acc_tflite_runs=acc_t,
               acc_keras_mean=float(np.mean(acc_k)), acc_tflite_mean=float(np.mean(acc_t)),
               acc_keras_std=float(np.std(acc_k)), acc_tflite_std=float(np.std(acc_t)),
               abs_diff=float(diff), tolerance=float(tol))
    name = os.path.basename(str(tflite)) if not isinstance(tflite, (bytes, bytearray)) \
        else "noisy TFLite"
    if diff > tol:
        raise ParityError(f"{name}: noisy TFLite accuracy {np.mean(acc_t):.4f} vs Keras "
                          f"{np.mean(acc_k):.4f} differs by {diff:.4f} > tolerance {tol:.4f} "
                          f"over {runs} runs of {n}")
    if runs >= 2 and n >= 2:
        stats = noise_statistics(lk, lt, z, mean_tol, std_rtol)
        out["noise"] = stats
        st, mt = stats["std_test"], stats["mean_test"]
        if not st["held"]:
            raise ParityError(
                f"{name}: the logit standard deviation over noise draws is {st['ratio']:.3f}x "
                f"Keras's (allowed {st['band'][0]:.3f}-{st['band'][1]:.3f}, {runs} draws of "
                f"{n} examples): the file's noise is broken (exported without noise, or with "
                "another sigma); export the trained model again")
        if not mt["held"]:
            raise ParityError(
                f"{name}: the per-example mean logits differ from Keras's by "
                f"{mt['rms_bias_in_draw_std']:.3f} single-draw standard deviations (excess "
                f"{mt['excess']:.4f} > bar {mt['bar']:.4f}, {runs} draws of {n} examples): "
                "the file does not compute the noisy model; export it again")
    return out
