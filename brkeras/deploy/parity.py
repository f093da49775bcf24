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


def parity_deterministic(tflite, model, x, y=None, min_agreement=0.995, batch_size=50,
                         max_accuracy_drop=None, keras_out=None):
    """Noise-off parity: top-1 agreement and max |logit difference|; raises ParityError.

    agreement = mean(argmax tflite == argmax keras) must be >= min_agreement; with
    max_accuracy_drop (and labels y), acc_keras - acc_tflite must be <= it too.
    keras_out: the model's logits on x if already computed (the model is deterministic).
    """
    lk = keras_logits(model, x, batch_size) if keras_out is None else keras_out
    lt = tflite_logits(tflite, x, batch_size)
    agree = float(np.mean(lk.argmax(1) == lt.argmax(1)))
    out = dict(examples=int(len(x)), top1_agreement=agree,
               max_abs_logit_diff=float(np.abs(lk - lt).max()),
               min_agreement=min_agreement)
    if y is not None:
        y = np.asarray(y).reshape(-1)
        out["acc_keras"] = float(np.mean(lk.argmax(1) == y))
        out["acc_tflite"] = float(np.mean(lt.argmax(1) == y))
        if max_accuracy_drop is not None:
            out["max_accuracy_drop"] = max_accuracy_drop
            drop = out["acc_keras"] - out["acc_tflite"]
            if drop > max_accuracy_drop:
                raise ParityError(
                    f"{os.path.basename(str(tflite))}: TFLite accuracy {out['acc_tflite']:.4f} is "
                    f"{drop:.4f} below Keras {out['acc_keras']:.4f} (> {max_accuracy_drop}); "
                    "the export is not faithful")
    if agree < min_agreement:
        raise ParityError(f"{os.path.basename(str(tflite))}: TFLite top-1 agrees with Keras on "
                          f"{agree:.4f} of {len(x)} examples "
                          f"< {min_agreement} (max |logit diff| {out['max_abs_logit_diff']:.4g}); "
                          "the export is not faithful")
    return out


def parity_stochastic(tflite, model, x, y, runs=3, z=4.0):
    """Noise-on parity: natural accuracy of TFLite vs Keras, batch 1, over `runs` draws.

    Passes when |mean acc_tflite - mean acc_keras| <= z * se, with
    se = sqrt(2 p (1 - p) / (n runs)) (binomial standard error of a difference of
    two mean accuracies, p the pooled accuracy) plus 1/n; raises ParityError.
    Batch 1 on both sides because std(out) of the noise is over the whole batch.
    """
    y = np.asarray(y).reshape(-1)
    n = len(x)
    fn = inference_fn(model)
    acc_k, acc_t = [], []
    for _ in range(runs):
        pk = np.array([int(np.argmax(fn(tf.constant(x[i:i + 1], tf.float32)).numpy()))
                       for i in range(n)])
        acc_k.append(float(np.mean(pk == y)))
        acc_t.append(float(np.mean(tflite_logits(tflite, x, 1).argmax(1) == y)))
    p = (np.mean(acc_k) + np.mean(acc_t)) / 2
    tol = z * np.sqrt(2 * p * (1 - p) / (n * runs)) + 1.0 / n
    diff = abs(np.mean(acc_t) - np.mean(acc_k))
    out = dict(examples=n, runs=runs, acc_keras_runs=acc_k, acc_tflite_runs=acc_t,
               acc_keras_mean=float(np.mean(acc_k)), acc_tflite_mean=float(np.mean(acc_t)),
               acc_keras_std=float(np.std(acc_k)), acc_tflite_std=float(np.std(acc_t)),
               abs_diff=float(diff), tolerance=float(tol))
    if diff > tol:
        raise ParityError(f"noisy TFLite accuracy {np.mean(acc_t):.4f} vs Keras {np.mean(acc_k):.4f} "
                          f"differs by {diff:.4f} > tolerance {tol:.4f} over {runs} runs of {n}")
    return out
