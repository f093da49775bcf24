"""Robust evaluation of a stochastic, quantized model in memory: `evaluate_model`.

The EnResNet's Feynman-Kac noise stays on at test time, so every accuracy here
comes in two kinds, always named:
  single    the prediction of one forward pass (one noise draw);
  expected  the argmax of the mean softmax over `eval.eot_samples` draws.
and every gradient attack is run in two ways:
  plain     gradients of one forward pass per step;
  eot       gradients averaged over `eval.eot_samples` draws (EOT), the sound
            attack on a randomised model.
Attacks follow SPEC 5, scaled to the run's training eps: FGSM; IFGSM-20 (20
steps of eps/8, no random start); PGD-20 (random start, steps of eps/4); CW-L2
(Adam, c = 10, 50 steps), reported plainly and with the reference's rescaling
x + eps (x_cw - x) ("cw_rescaled").

Sanity checks (stored and printed; a violation is a warning, never hidden):
robust <= natural; PGD <= FGSM (also at every eps of the sweep); accuracy
non-increasing over the eps sweep, and the strongest sweep attack near chance at
the largest eps; more steps and restarts never raise accuracy;
EOT never raises accuracy. Comparisons allow the sampling noise of the model's
randomness (two binomial standard errors; zero for a deterministic model).

`evaluate_model` returns a dict (`brkeras evaluate` writes it as eval.json):
  n_examples, eps, noise {sigma, draws, stochastic}, training {completed_epochs,
  finished}, natural_acc {single, expected};
  attacks {name: {settings, plain, eot}} for config.eval.attacks, plus
  cw_rescaled after cw; plain/eot = {single, expected[, mean_linf, mean_l2]} or
  None (eot is None for attacks not in eot_attacks and for a deterministic model);
  eps_sweep {eps, n_examples, attacks {fgsm, pgd20: {single: [...], expected: [...]}}};
  more_effort {pgd20, steps_x2, restarts_x2, n_examples}; worst_case {expected,
  n_examples, members, strongest, broken_only_by}; sanity [{check, held,
  detail}]; sparsity (brkeras.sparsity.report of the exact quantized kernels, or
  of the 3x3 conv kernels of a float model); time_s. A mode's entry also has
  time_s, and an EOT entry its draws.

AutoAttack's "rand" version (Croce and Hein 2020, SPEC 10) for a randomised
model: APGD-CE and APGD-DLR (apgd.py; `apgd_steps` steps with its step-size
schedule, `apgd_eot_samples` EOT draws), rows "apgd_ce" and "apgd_dlr". Attacks
in `eot_only` run only with EOT on a stochastic model (their plain run would be
a weaker copy at the same cost).

Worst case per example (the headline robust accuracy): an example is robust
when its expected prediction is right on the clean image and on the x_adv of
every L-inf attack and mode run on all examples (cw_rescaled included, it lies
in the eps-ball; plain CW is L2 and unbounded, so it is not a member; the eps
sweep and the more-effort runs use a subset and are not members either):
  worst_case = mean_i prod_a correct_a(i)  <=  min_a accuracy_a.
With `return_adversarial`, evaluate_model also returns per example the x_adv
of the first member that broke it (else of the strongest member), for transfer
to the exported files.

Cost: every (attack, mode) is one pass of nb_iter x draws gradient calls per
batch; predictions are one compiled forward pass per draw over batches of
`predict_batch_size`; the eps sweep and the more-effort baseline reuse the main
runs at the main eps (and the natural accuracy at eps 0) instead of repeating them.
The attacks and predictions run on `attack_network(model)`: for a Binary-Relax
model its plain float copy with the constant Q(w) (no quantizer work per call),
and in every model each conv -> BatchNorm pair folded into one conv (nn/fold.py),
checked to give the model's logits before use; eval.json's "attack_network"
says what was done.

Every figure is a mean of per-example correctness, so `evaluate_model` is
`summarize([evaluate_examples(...)])`: `evaluate_examples` keeps the per-example
arrays of a slice of the images (a "part"), and `summarize` merges the parts of
disjoint slices into the result, which run/eval_shards.py uses to evaluate
slices in worker processes side by side.
"""

import contextlib
import dataclasses
import math
import time
from typing import Callable

import numpy as np

from brkeras.nn import fold
from brkeras.nn import graph
from brkeras.nn import layers as layers_lib
from brkeras.quant import binary_relax
from brkeras.quant import sparsity
from brkeras.robust import apgd as apgd_lib
from brkeras.robust import attacks
from brkeras.robust.sanity import sanity_checks
from brkeras._keras import keras, tf

# Settings of the attacks relative to the eval eps (SPEC 5 at CIFAR scale:
# IFGSM-20 steps 1/255 of an 8/255 ball, PGD-20 steps 2/255) and CW's reference values.
# APGD (SPEC 10): AutoAttack's 100 steps cut to 40 (its schedule scales with nb_iter);
# apgd_eot_samples = 0 uses the evaluation's eot_samples.
DEFAULT_PARAMS = dict(ifgsm_step_fraction=1 / 8, pgd_step_fraction=1 / 4, cw_c=10.0,
                      cw_kappa=0.0, cw_lr=6e-4, cw_steps=50, apgd_steps=40, apgd_restarts=1,
                      apgd_rho=0.75, apgd_eot_samples=0)


@dataclasses.dataclass(frozen=True)
class Attack:
    """An attack of the evaluation: its settings at radius eps, and how to run it.

    settings(eps, params) -> dict (stored in eval.json); run(model_fn, x, y,
    settings, eot_samples) -> x_adv.
    """
    name: str
    settings: Callable
    run: Callable


def _linf_steps(steps, fraction_key, rand_init):
    def settings(eps, p):
        return {"norm": "linf", "eps": eps, "eps_iter": eps * p[fraction_key], "nb_iter": steps,
                "rand_init": rand_init}
    return settings


def _run_pgd(model_fn, x, y, s, eot):
    return attacks.pgd(model_fn, x, s["eps"], s["eps_iter"], s["nb_iter"], y=y,
                       rand_init=s["rand_init"], restarts=s.get("restarts", 1), eot_samples=eot)


def _apgd_settings(loss):
    def settings(eps, p):
        s = {"norm": "linf", "eps": eps, "nb_iter": int(p["apgd_steps"]), "loss": loss,
             "restarts": int(p["apgd_restarts"]), "rho": float(p["apgd_rho"])}
        if int(p["apgd_eot_samples"]) > 0:
            s["eot_samples"] = int(p["apgd_eot_samples"])  # the draws of its EOT mode
        return s
    return settings


def _run_apgd(model_fn, x, y, s, eot):
    return apgd_lib.apgd(model_fn, x, s["eps"], nb_iter=s["nb_iter"], norm=np.inf,
                         loss=s["loss"], y=y, restarts=s["restarts"], rho=s["rho"],
                         eot_samples=eot)


# The one registry of evaluation attacks: the CLI, the config check, the
# pipeline's summary and the report read their names from here.
ATTACKS = {
    "fgsm": Attack("fgsm", lambda eps, p: {"norm": "linf", "eps": eps},
                   lambda f, x, y, s, eot: attacks.fgsm(f, x, s["eps"], y=y, eot_samples=eot)),
    "ifgsm20": Attack("ifgsm20", _linf_steps(20, "ifgsm_step_fraction", False), _run_pgd),
    "pgd20": Attack("pgd20", _linf_steps(20, "pgd_step_fraction", True), _run_pgd),
    "cw": Attack("cw", lambda eps, p: {"norm": "l2", "c": p["cw_c"], "kappa": p["cw_kappa"],
                                       "lr": p["cw_lr"], "steps": p["cw_steps"],
                                       "rescale_eps": eps},
                 lambda f, x, y, s, eot: attacks.cw_l2(f, x, y=y, c=s["c"], kappa=s["kappa"],
                                                       lr=s["lr"], steps=s["steps"],
                                                       eot_samples=eot)),
    "apgd_ce": Attack("apgd_ce", _apgd_settings("ce"), _run_apgd),
    "apgd_dlr": Attack("apgd_dlr", _apgd_settings("dlr"), _run_apgd),
}


def _params(params):
    p = dict(DEFAULT_PARAMS)
    p.update({k: v for k, v in dict(params or {}).items() if k in DEFAULT_PARAMS})
    return p


def attack_settings(name, params, eps):
    """The settings of attack `name` at L-inf radius eps (for the report and the call)."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {tuple(ATTACKS)}")
    return ATTACKS[name].settings(eps, _params(params))


def run_attack(name, settings, model_fn, x, y, eot):
    return ATTACKS[name].run(model_fn, x, y, settings, eot)


def _noise_layers(net):
    return [l for l in net.layers if isinstance(l, (layers_lib.FeynmanKacNoise,
                                                    layers_lib.AddScaledNoise)) and l.sigma > 0]


@contextlib.contextmanager
def noise_off(net):
    """Within the block, `net`'s noise layers are the identity (sigma 0; eager calls)."""
    layers = _noise_layers(net)
    sigmas = [l.sigma for l in layers]
    try:
        for l in layers:
            l.sigma = 0.0
        yield net
    finally:
        for l, sigma in zip(layers, sigmas):
            l.sigma = sigma


def _same_logits(want, got):
    """The check of every rebuilt network: rtol and atol 1e-4 of the largest logit."""
    return np.allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def split_at_noise(net, check_x=None):
    """(prefix, suffix) Keras models of a functional model cut before its noise, or None.

    prefix: x -> [h_1, ...], the tensors computed before any noise layer that the
    noise layers (or layers after them) read: deterministic (BatchNorm in inference
    mode, no random op). suffix: [h_1, ...] -> logits, the rest, with the same layer
    objects (shared weights). net(x) and suffix(prefix(x)) have one distribution,
    so an EOT average over K draws needs the prefix once and the suffix K times:
    for the default EnResNet (stem and stage-1 block at full resolution) the prefix
    is about half of a forward and backward pass. With check_x (a few images), the
    cut is checked: with every noise sigma set to 0 both must give net's logits.
    None when the model has no noise, is not a single-input functional model, or
    calls a layer more than once.
    """
    noise = {id(l) for l in _noise_layers(net)}
    if not noise or len(getattr(net, "inputs", []) or []) != 1 or len(net.outputs) != 1:
        return None
    try:
        sites = graph.call_sites(net)
    except ValueError:  # a layer called more than once
        return None
    noisy, cut, after = set(), [], []
    for layer, node in sites:
        ins = graph.flat(node.input_tensors)
        if id(layer) in noise or any(id(t) in noisy for t in ins):
            cut += [t for t in ins if id(t) not in noisy and all(t is not c for c in cut)]
            after.append((layer, node))
            noisy.update(id(t) for t in graph.flat(node.output_tensors))
    if id(net.outputs[0]) not in noisy:
        return None
    prefix = keras.Model(net.inputs, cut, name=net.name + "_prefix")
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in cut]
    new = graph.replay(after, {id(t): i for t, i in zip(cut, inputs)})
    suffix = keras.Model(inputs, new[id(net.outputs[0])], name=net.name + "_suffix")
    if check_x is not None:
        with noise_off(net):
            xc = tf.constant(check_x, tf.float32)
            a = net(xc, training=False).numpy()
            b = suffix(graph.flat(prefix(xc, training=False)), training=False).numpy()
        if not _same_logits(a, b):
            return None
    return prefix, suffix


def _logits_without_noise(net, x):
    with noise_off(net):
        return net(tf.constant(x, tf.float32), training=False).numpy()


def attack_network(net, check_x):
    """(the network the attacks run on, what was done): `net`'s function in a
    cheaper form. A Binary-Relax model (in exact mode: evaluate_model sets it)
    becomes its plain float copy with the constant Q(w)
    (binary_relax.exact_float_model: no quantizer work per call); then every
    float32 conv -> BatchNorm pair is folded (nn/fold.py). Each step is kept only
    when its logits on `check_x` with the noise off match `net`'s
    (rtol and atol 1e-4 of the largest logit); a step that fails or raises is
    skipped, and its reason recorded under "fallback". Inference only: the copy
    shares or copies `net`'s weights at this moment.
    """
    done = {"exact_float_copy": False, "folded_batchnorm": 0, "checked_examples": 0}
    steps = [("exact_float_copy", "exact float copy", _exact_float_step),
             ("folded_batchnorm", "BatchNorm fold", fold.fold_batchnorm)]
    if not binary_relax.br_quantizers(net):
        steps = steps[1:]
    fallback, ref, out = [], None, net
    for key, label, step in steps:
        try:
            candidate, value = step(out)
        except Exception as e:  # pylint: disable=broad-except  # a layer the copy cannot rebuild
            fallback.append(f"{label}: {e!r}")
            continue
        if candidate is out:  # nothing to do (no foldable pair)
            continue
        if ref is None:
            ref = _logits_without_noise(net, check_x)
        got = _logits_without_noise(candidate, check_x)
        if _same_logits(ref, got):
            out, done[key] = candidate, value
        else:
            fallback.append(f"{label}: logits differ by {float(np.abs(got - ref).max()):.3g}")
    if out is not net:
        done["checked_examples"] = int(len(check_x))
    if fallback:
        done["fallback"] = "; ".join(fallback)
    return out, done


def _exact_float_step(net):
    if not binary_relax.br_state(net)[1]:
        raise ValueError("the Binary-Relax model is not in exact mode (binary_relax.set_exact)")
    return binary_relax.exact_float_model(net), True


class StochasticModel:
    """The network in inference mode with its prediction over noise draws.

    One callable object, so the attacks trace once per model; `predict` runs one
    compiled tf.function (all draws of a batch in one call, any batch size).
    `eot_split` = (prefix_fn, suffix_fn, num_classes): the cut of `split_at_noise`
    (for a deterministic or uncuttable model prefix_fn is x -> [x]): the EOT loops
    of attacks.py and apgd.py and the expected prediction run the deterministic
    prefix once per point, and trace one copy of the suffix.
    """

    def __init__(self, net, draws, batch_size, predict_batch_size=None, check_x=None):
        self.net, self.draws, self.batch_size = net, int(draws), int(batch_size)
        self.predict_batch_size = int(predict_batch_size or batch_size)
        classes = int(net.outputs[0].shape[-1])
        split = split_at_noise(net, check_x) if self.draws > 1 else None
        if split is not None:
            prefix, suffix = split
            self.eot_split = (lambda x: graph.flat(prefix(x, training=False)),
                              lambda h: suffix(h, training=False), classes)
        else:
            self.eot_split = (lambda x: [x], lambda h: net(h[0], training=False), classes)
        self.split = split is not None
        spec = tf.TensorSpec([None] + list(net.inputs[0].shape[1:]), tf.float32)
        self._predict = tf.function(self._predictions, input_signature=[spec],
                                    autograph=False)

    def __call__(self, x):
        return self.net(x, training=False)

    def _predictions(self, x):
        """(argmax of draw 1, argmax of the mean softmax over `draws` draws)."""
        h, draw = self.eot_split[0](x), self.eot_split[1]
        p = tf.nn.softmax(tf.cast(draw(h), tf.float32))
        total = p
        if self.draws > 1:  # a loop: the graph holds one copy of the model
            _, total = tf.while_loop(
                    lambda k, t: k < self.draws,
                    lambda k, t: (k + 1, t + tf.nn.softmax(tf.cast(draw(h), tf.float32))),
                    (tf.constant(1), p))
        return (tf.argmax(p, -1, output_type=tf.int32),
                tf.argmax(total, -1, output_type=tf.int32))

    def predict(self, x):
        """(single-draw predictions, expected predictions) over `draws` noise draws."""
        single, expected = [], []
        for i in range(0, len(x), self.predict_batch_size):
            s, e = self._predict(tf.constant(x[i:i + self.predict_batch_size], tf.float32))
            single.append(s.numpy())
            expected.append(e.numpy())
        return np.concatenate(single), np.concatenate(expected)

    def correct(self, x, y):
        """Per-example correctness (single draw, expected prediction), bool [N] each."""
        s, e = self.predict(x)
        return s == y, e == y

    def accuracy(self, x, y):
        return _acc(*self.correct(x, y))


def _acc(single_correct, expected_correct):
    return {"single": float(np.mean(single_correct)), "expected": float(np.mean(expected_correct))}


class WorstCaseExamples:
    """Per example, the x_adv of the first member that broke it (expected prediction),
    else that of the strongest member so far (lowest accuracy): two arrays, however
    many attacks are added."""

    def __init__(self, x):
        self.x_adv = np.array(x, np.float32, copy=True)
        self.source = np.full(len(x), -1, np.int32)  # index into self.names
        self.broken = np.zeros(len(x), bool)
        self.names, self._best = [], math.inf

    def add(self, name, correct, x_adv):
        i = len(self.names)
        self.names.append(name)
        acc = float(np.mean(correct))
        if acc < self._best:  # the strongest so far: its x_adv for the unbroken
            keep = ~self.broken & correct
            self.x_adv[keep], self.source[keep] = x_adv[keep], i
            self._best = acc
        new = ~self.broken & ~correct
        self.x_adv[new], self.source[new] = x_adv[new], i
        self.broken |= ~correct


def worst_case(members):
    """The worst case over `members` {name: expected-prediction correctness bool [n]}.

    robust_i = AND_a correct_a(i); returns (dict(expected = mean robust, n_examples,
    members, strongest (the attack member of lowest accuracy), broken_only_by
    {member: examples no other member broke}), robust [n]).
    """
    names = list(members)
    c = np.stack([np.asarray(members[k], bool) for k in names])
    robust = c.all(0)
    only = {}
    for i, k in enumerate(names):
        others = np.delete(c, i, axis=0).all(0) if len(names) > 1 else np.ones_like(robust)
        only[k] = int(np.sum(~c[i] & others))
    attack_members = [k for k in names if k != "natural"]
    strongest = min(attack_members, key=lambda k: float(np.mean(members[k]))) \
        if attack_members else None
    return {"expected": float(np.mean(robust)), "n_examples": int(len(robust)),
            "members": names, "strongest": strongest, "broken_only_by": only}, robust


def adversarial_examples(model, name, settings, x, y, eot, progress=None):
    """x_adv of attack `name` on a StochasticModel, batch by batch (NumPy in and out)."""
    out = []
    for i in range(0, len(x), model.batch_size):
        xb, yb = x[i:i + model.batch_size], y[i:i + model.batch_size]
        out.append(run_attack(name, settings, model, tf.constant(xb), tf.constant(yb), eot).numpy())
        if progress is not None:
            progress.add(1)
    return np.concatenate(out)


def model_kernels(net):
    """The exact quantized kernels Q(w) of a Binary-Relax model; for any other model
    (float, int8 QAT) the float kernels of its 3x3 convs, unwrapping tfmot wrappers."""
    kernels = binary_relax.quantized_kernels(net)
    if kernels:
        return kernels
    out = {}
    for layer in net.layers:
        inner = getattr(layer, "layer", layer)  # a tfmot QuantizeWrapper holds the conv
        if isinstance(inner, keras.layers.Conv2D) and tuple(inner.kernel_size) == (3, 3):
            # the float variable (inside a wrapper, inner.kernel is the fake-quant tensor)
            float_kernel = [w for w in layer.weights if w.name.endswith("kernel:0")]
            out[inner.name] = float_kernel[0].numpy()
    return out


def check_arguments(attack_names, eot_attacks, eot_samples, batch_size, sweep_examples,
                    eps_sweep, eot_only=(), predict_batch_size=1, attack_params=None):
    """Raises ValueError naming the argument (and its config.eval field) that is wrong."""
    unknown = [a for a in list(attack_names) + list(eot_attacks) + list(eot_only)
               if a not in ATTACKS]
    if unknown:
        raise ValueError(f"attacks / eot_attacks / eot_only (config.eval.attacks / eot_attacks "
                         f"/ eot_only) list unknown attacks {unknown}; choose from "
                         f"{tuple(ATTACKS)}")
    p = _params(attack_params)
    for field in ("apgd_steps", "apgd_restarts"):
        if int(p[field]) < 1:
            raise ValueError(f"{field}={p[field]} (config.eval.{field}); it must be >= 1")
    if int(p["apgd_eot_samples"]) < 0 or not 0 < float(p["apgd_rho"]) <= 1:
        raise ValueError(f"apgd_eot_samples={p['apgd_eot_samples']}, apgd_rho={p['apgd_rho']} "
                         "(config.eval): give draws >= 0 (0 = eot_samples) and rho in (0, 1]")
    for field, v in (("eot_samples", eot_samples), ("batch_size", batch_size),
                     ("sweep_examples", sweep_examples),
                     ("predict_batch_size", predict_batch_size)):
        if int(v) < 1:
            raise ValueError(f"{field}={v} (config.eval.{field}); it must be >= 1")
    if eps_sweep is not None:
        sweep = [float(e) for e in eps_sweep]
        if not sweep or min(sweep) < 0 or sweep != sorted(sweep):
            raise ValueError(f"eps_sweep={tuple(eps_sweep)} (config.eval.eps_sweep); give one "
                             "or more eps >= 0 in ascending order, e.g. (0.0, 0.1, 0.3)")


def _progress(n, verbose, unit):
    return keras.utils.Progbar(n, verbose=verbose, unit_name=unit)


def _restarts_x2(m, settings, x, y, first=None):
    """PGD-20 with 2 restarts, as attacks.pgd(restarts=2) picks: per example the first
    run's x_adv unless the second is misclassified or of higher CE where the first is
    not misclassified (each judged on one draw). `first`: an independent PGD-20 run
    already made (the main plain run), which serves as restart 1."""
    if first is None:
        return adversarial_examples(m, "pgd20", {**settings, "restarts": 2}, x, y, 1)
    second = adversarial_examples(m, "pgd20", settings, x, y, 1)

    def score(x_adv):
        z = np.concatenate([m(tf.constant(x_adv[i:i + m.batch_size])).numpy()
                            for i in range(0, len(x_adv), m.batch_size)]).astype(np.float64)
        z = z - z.max(1, keepdims=True)
        ce = np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]
        return z.argmax(1) != y, ce

    (w1, l1), (w2, l2) = score(first), score(second)
    take = ~w1 & (w2 | (l2 > l1))
    return np.where(take.reshape((-1,) + (1,) * (first.ndim - 1)), second, first)


def _modes(name, eot_attacks, eot_only, draws, settings):
    """[(mode, draws)] of attack `name`: plain, and EOT for a stochastic model."""
    if name not in eot_attacks or draws <= 1:
        return [("plain", 1)]
    eot = [("eot", int(settings.get("eot_samples", draws)))]
    return eot if name in eot_only else [("plain", 1)] + eot


def evaluate_model(model, x, y, *, eps, attacks=("fgsm", "ifgsm20", "pgd20", "cw"),
                   eot_attacks=("pgd20",), eot_samples=4, batch_size=200, eps_sweep=None,
                   sweep_examples=300, more_effort=True, num_classes=None, attack_params=None,
                   eot_only=(), predict_batch_size=1000, return_adversarial=False, verbose=0):
    """Robust evaluation of a (stochastic, quantized) Keras model on arrays.

    Args:
        model: a Keras model that maps float32 images in [0, 1] to logits. A
            Binary-Relax model is evaluated with its exact weights Q(w) (its phase
            is restored afterwards). Feynman-Kac noise stays on.
        x, y: test images (N, H, W, C) float32 in [0, 1] (uint8 is scaled by 1/255)
            and integer labels (N,).
        eps: L-inf radius of every attack (CW reports its rescaling to eps).
        attacks: names from ATTACKS, run plainly.
        eot_attacks: those also run with gradients averaged over `eot_samples`
            noise draws (only for a stochastic model; an attack's settings may
            name its own draws, e.g. APGD's apgd_eot_samples).
        eot_only: those of eot_attacks run only with EOT on a stochastic model
            (names not in eot_attacks are ignored: they run plainly).
        eot_samples: noise draws for EOT gradients and for the expected prediction.
        batch_size: examples per attack batch.
        eps_sweep: ascending radii for FGSM and PGD-20 on the first
            `sweep_examples` examples (None: no sweep).
        more_effort: PGD-20 with 2x steps and 2x restarts on those examples.
        num_classes: for the near-chance check (default: the model's output width).
        attack_params: overrides of DEFAULT_PARAMS (step fractions, CW and APGD settings).
        predict_batch_size: examples per compiled prediction call.
        return_adversarial: also return {"x", "y", "x_adv", "robust", "source",
            "members"}: per example the worst-case x_adv (see the module docstring),
            its worst-case robustness and the index into members of the attack
            that made it.
        verbose: 1 for progress bars and messages.

    Returns:
        A dict with the content of eval.json (see the module docstring); with
        return_adversarial, (that dict, the arrays).

    Example:
        result = evaluate_model(qnet, x_test, y_test, eps=0.1, attacks=("fgsm", "pgd20"),
                                eot_samples=2)
        result["attacks"]["pgd20"]["eot"]["expected"], result["worst_case"]["expected"]
    """
    t0 = time.time()
    part = evaluate_examples(model, x, y, eps=eps, attacks=attacks, eot_attacks=eot_attacks,
                             eot_samples=eot_samples, batch_size=batch_size, eps_sweep=eps_sweep,
                             sweep_examples=sweep_examples, more_effort=more_effort,
                             num_classes=num_classes, attack_params=attack_params,
                             eot_only=eot_only, predict_batch_size=predict_batch_size,
                             verbose=verbose)
    result, adversarial = summarize([part], verbose=verbose)
    result["time_s"] = round(time.time() - t0, 1)
    return (result, adversarial) if return_adversarial else result


def evaluate_examples(model, x, y, *, eps, attacks=("fgsm", "ifgsm20", "pgd20", "cw"),
                      eot_attacks=("pgd20",), eot_samples=4, batch_size=200, eps_sweep=None,
                      sweep_examples=300, more_effort=True, num_classes=None,
                      attack_params=None, eot_only=(), predict_batch_size=1000, verbose=0):
    """The per-example work of `evaluate_model` (same arguments): a "part".

    Every result of an evaluation is a mean over examples of per-example
    correctness, so a part holds those per-example arrays (and each member's
    x_adv), and `summarize` turns one part, or the parts of disjoint slices of
    the images evaluated side by side (run/eval_shards.py), into eval.json.
    The first min(len(x), sweep_examples) examples are this part's eps-sweep
    and more-effort examples.

    Returns {"meta": JSON-able dict, "arrays": {"a/b/c": np.ndarray}}.
    """
    t0 = time.time()
    attack_names = tuple(attacks)
    check_arguments(attack_names, eot_attacks, eot_samples, batch_size, sweep_examples, eps_sweep,
                    eot_only, predict_batch_size, attack_params)
    x = np.asarray(x)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    y = np.asarray(y).reshape(-1).astype(np.int32)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x has {len(x)} examples and y {len(y)}; give the same number >= 1")
    if not 0 <= float(eps) <= 1:
        raise ValueError(f"eps={eps}; give an L-inf radius in [0, 1]")
    params = _params(attack_params)
    eps = float(eps)
    n = len(y)
    sigma = layers_lib.noise_sigma(model)
    stochastic = sigma > 0
    draws = int(eot_samples) if stochastic else 1
    if num_classes is None:
        num_classes = int(model.outputs[0].shape[-1])
    say = print if verbose else (lambda *a, **k: None)
    k = min(n, int(sweep_examples))  # examples of the eps sweep and more effort
    meta = {"n": n, "sweep_n": k, "eps": eps, "num_classes": int(num_classes),
            "noise": {"sigma": sigma, "draws": draws, "stochastic": stochastic},
            "runs": [], "settings": {}, "times": {},
            "eps_sweep": None if eps_sweep is None else [float(e) for e in eps_sweep],
            "more_effort": bool(more_effort)}
    arrays = {}

    def keep(prefix, correct, x_adv=None):
        arrays[f"{prefix}/single"], arrays[f"{prefix}/expected"] = correct
        if x_adv is not None:
            arrays[f"{prefix}/x_adv"] = x_adv

    restore_phase = None
    if binary_relax.br_quantizers(model):
        restore_phase = binary_relax.br_state(model)[1]
        binary_relax.set_exact(model, True)
    try:
        net, meta["attack_network"] = attack_network(model, x[:8])
        m = StochasticModel(net, draws, batch_size, predict_batch_size, check_x=x[:8])
        nat = m.correct(x, y)
        keep("natural", nat)
        say(f"[evaluate] {n} test examples, natural accuracy {_acc(*nat)}", flush=True)
        n_batches = math.ceil(n / m.batch_size)
        plain = {}  # attack -> (single, expected) correctness of its plain run at eps
        plain_pgd_x = None  # the main plain PGD-20 x_adv of the first k examples
        for name in attack_names:
            settings = attack_settings(name, params, eps)
            meta["settings"][name] = settings
            for mode, eot in _modes(name, eot_attacks, eot_only, draws, settings):
                say(f"[evaluate] {name} ({mode}{f', {eot} draws' if eot > 1 else ''})",
                    flush=True)
                t_mode = time.time()
                x_adv = adversarial_examples(m, name, settings, x, y, eot,
                                             _progress(n_batches, verbose, "batch"))
                # A non-finite x_adv is an attack failure, not an error of the model:
                # count it (sanity check "finite x_adv") and keep the clean image.
                bad = ~np.isfinite(x_adv.reshape(n, -1)).all(1)
                if bad.any():
                    x_adv = np.where(bad.reshape((-1,) + (1,) * (x.ndim - 1)), x, x_adv)
                    say(f"[evaluate] WARNING {name} ({mode}) gave non-finite x_adv for "
                        f"{int(bad.sum())} examples; counted as not broken", flush=True)
                c = m.correct(x_adv, y)
                run = f"run/{name}/{mode}"
                member = settings.get("norm") == "linf"
                keep(run, c, x_adv if member else None)
                arrays[f"{run}/nonfinite"] = bad
                arrays[f"{run}/linf"] = np.abs(x_adv - x).reshape(n, -1).max(1)
                arrays[f"{run}/l2"] = np.sqrt(((x_adv - x) ** 2).reshape(n, -1).sum(1))
                if mode == "plain":
                    plain[name] = c
                    if name == "pgd20":  # restart 1 of the more-effort restarts_x2
                        plain_pgd_x = x_adv[:k]
                if name == "cw":  # x + eps (x_cw - x) lies in the L-inf eps-ball
                    x_r = attacks_rescale(x, x_adv, eps)
                    keep(f"run/cw_rescaled/{mode}", m.correct(x_r, y), x_r)
                meta["runs"].append([name, mode, int(eot), bool(member)])
                meta["times"][f"{name}/{mode}"] = round(time.time() - t_mode, 1)
        xs, ys = x[:k], y[:k]

        def subset_correct(name, e):
            """Per-example correctness of plain attack `name` at radius e on the first k
            examples; the natural run (e = 0) and the main runs (e = eps) are reused."""
            if e == 0:
                return nat[0][:k], nat[1][:k]
            if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12) and name in plain:
                return plain[name][0][:k], plain[name][1][:k]
            return m.correct(adversarial_examples(m, name, attack_settings(name, params, e),
                                                  xs, ys, 1), ys)

        if eps_sweep is not None:
            say(f"[evaluate] eps sweep over {meta['eps_sweep']} on {k} examples", flush=True)
            bar = _progress(2 * len(meta["eps_sweep"]), verbose, "eps")
            for name in SWEEP_ATTACKS:
                for i, e in enumerate(meta["eps_sweep"]):
                    keep(f"sweep/{name}/{i}", subset_correct(name, e))
                    bar.add(1)
        if more_effort:
            base = attack_settings("pgd20", params, eps)
            keep("more/pgd20", subset_correct("pgd20", eps))
            keep("more/steps_x2", m.correct(adversarial_examples(
                m, "pgd20", {**base, "nb_iter": 40}, xs, ys, 1), ys))
            keep("more/restarts_x2", m.correct(_restarts_x2(m, base, xs, ys, plain_pgd_x), ys))
        meta["sparsity"] = sparsity.report(model_kernels(model))
    finally:
        if restore_phase is not None:
            binary_relax.set_exact(model, restore_phase)
    arrays["x"], arrays["y"] = x, y
    meta["time_s"] = round(time.time() - t0, 1)
    return {"meta": meta, "arrays": arrays}


SWEEP_ATTACKS = ("fgsm", "pgd20")
MORE_EFFORT = ("pgd20", "steps_x2", "restarts_x2")


def summarize(parts, positions=None, verbose=0):
    """eval.json's dict and the worst-case adversarial arrays from `evaluate_examples` parts.

    parts: made with the same arguments on disjoint slices of the images.
    positions: per part, the index of each of its examples in the images
    evaluated (None: one part, in order); the eps sweep and more-effort
    examples are the first sweep_n of each part and must be, together, the
    first sum(sweep_n) images. A mode's time_s is the longest of its parts'
    (parts run side by side)."""
    metas = [p["meta"] for p in parts]
    if positions is None:
        if len(parts) != 1:
            raise ValueError(f"summarize got {len(parts)} parts and no positions; give the "
                             "index of each part's examples among the images evaluated")
        positions = [np.arange(metas[0]["n"])]
    positions = [np.asarray(pos, np.int64) for pos in positions]
    n, k = sum(mt["n"] for mt in metas), sum(mt["sweep_n"] for mt in metas)
    for mt, pos in zip(metas, positions):
        if len(pos) != mt["n"] or (mt["sweep_n"] and pos[:mt["sweep_n"]].max() >= k):
            raise ValueError("summarize: positions do not match the parts' examples")
    if sorted(np.concatenate(positions).tolist()) != list(range(n)):
        raise ValueError(f"summarize: the positions of the parts are not a permutation of {n} "
                         "examples")
    first = metas[0]
    for mt in metas[1:]:
        for key in ("eps", "noise", "runs", "settings", "eps_sweep", "more_effort"):
            if mt[key] != first[key]:
                raise ValueError(f"summarize: parts made with different {key}")

    def gather(key, sweep=False):
        """The per-example array `key` of every part, in the order of the images."""
        chunks = [p["arrays"][key] for p in parts]
        out = np.empty((k if sweep else n,) + chunks[0].shape[1:], chunks[0].dtype)
        for chunk, pos, mt in zip(chunks, positions, metas):
            out[pos[:mt["sweep_n"]] if sweep else pos] = chunk
        return out

    def correct(prefix, sweep=False):
        return gather(f"{prefix}/single", sweep), gather(f"{prefix}/expected", sweep)

    say = print if verbose else (lambda *a, **kw: None)
    x, y = gather("x"), gather("y")
    nat = correct("natural")
    result = {"n_examples": n, "eps": first["eps"], "noise": first["noise"],
              "attack_network": first["attack_network"], "natural_acc": _acc(*nat),
              "attacks": {}}
    members = {"natural": nat[1]}  # worst-case members: expected correctness [n]
    worst_x = WorstCaseExamples(x)

    def record(label, c, x_adv):
        members[label] = c[1]
        worst_x.add(label, c[1], x_adv)

    for name, mode, eot, member in first["runs"]:
        settings = first["settings"][name]
        if name not in result["attacks"]:
            result["attacks"][name] = {"settings": settings, "plain": None, "eot": None}
            if name == "cw":
                result["attacks"]["cw_rescaled"] = {
                    "settings": {**settings, "note": "x + eps * (x_cw - x), as the reference"},
                    "plain": None, "eot": None}
        run = f"run/{name}/{mode}"
        c = correct(run)
        entry = _acc(*c)
        entry["nonfinite_examples"] = int(gather(f"{run}/nonfinite").sum())
        entry["mean_linf"] = float(gather(f"{run}/linf").mean())
        entry["mean_l2"] = float(gather(f"{run}/l2").mean())
        if mode == "eot":
            entry["draws"] = eot
        if member:
            record(f"{name}/{mode}", c, gather(f"{run}/x_adv"))
        if name == "cw":
            c_r = correct(f"run/cw_rescaled/{mode}")
            result["attacks"]["cw_rescaled"][mode] = _acc(*c_r)
            record(f"cw_rescaled/{mode}", c_r, gather(f"run/cw_rescaled/{mode}/x_adv"))
        entry["time_s"] = max(mt["times"][f"{name}/{mode}"] for mt in metas)
        result["attacks"][name][mode] = entry
    if first["eps_sweep"] is not None:
        result["eps_sweep"] = {
            "eps": first["eps_sweep"], "n_examples": k,
            "attacks": {name: _sweep_lists([_acc(*correct(f"sweep/{name}/{i}", sweep=True))
                                            for i in range(len(first["eps_sweep"]))])
                        for name in SWEEP_ATTACKS}}
    if first["more_effort"]:
        result["more_effort"] = {key: _acc(*correct(f"more/{key}", sweep=True))
                                 for key in MORE_EFFORT}
        result["more_effort"]["n_examples"] = k
    result["worst_case"], robust = worst_case(members)
    say(f"[evaluate] worst case over {len(members)} attacks and modes: "
        f"{result['worst_case']['expected']:.4f}", flush=True)
    result["sanity"] = sanity_checks(result, n, first["noise"]["stochastic"],
                                     first["num_classes"], k)
    result["sparsity"] = first["sparsity"]
    result["time_s"] = max(mt["time_s"] for mt in metas)
    return result, {"x": x, "y": y, "x_adv": worst_x.x_adv, "robust": robust,
                    "source": worst_x.source, "members": np.array(worst_x.names)}


def _sweep_lists(accs):
    return {"single": [a["single"] for a in accs], "expected": [a["expected"] for a in accs]}


def attacks_rescale(x, x_adv, eps):
    return attacks.rescale(x, x_adv, eps).numpy()
