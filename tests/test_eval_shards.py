"""Evaluation in shards (run/eval_shards.py): the split of the images, the merge of
per-example parts (robust/evaluation.summarize), and `brkeras evaluate` with two
worker processes against one."""

import copy
import json
import os
import sys

import ml_collections
import numpy as np
import pytest

from brkeras import data
from brkeras._keras import keras
from brkeras.nn import models
from brkeras.robust import evaluation
from brkeras.run import eval_shards
from brkeras.run import evaluate as run_evaluate
from brkeras.run import train as train_lib
from brkeras.run import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import smoke  # noqa: E402  pylint: disable=wrong-import-position


def _ev(**fields):
    ev = ml_collections.ConfigDict({"shards": 0, "batch_size": 200, "sweep_examples": 300})
    ev.update(fields)
    return ev


def test_shard_count():
    assert eval_shards.count(_ev(), 1000, cores=2) == 2
    assert eval_shards.count(_ev(), 1000, cores=2, floor=2) == 1  # a model needing 2 threads
    assert eval_shards.count(_ev(), 1000, cores=8) == 5  # at most one per batch of 200
    assert eval_shards.count(_ev(), 300, cores=2) == 1  # less than two batches
    assert eval_shards.count(_ev(sweep_examples=1), 1000, cores=2) == 1  # a sweep example each
    assert eval_shards.count(_ev(shards=1), 1000, cores=8) == 1
    assert eval_shards.count(_ev(shards=3), 1000, cores=2) == 3  # asked: as asked
    assert eval_shards.count(_ev(shards=9), 4, cores=2) == 4
    with pytest.raises(ValueError, match="config.eval.shards=-1"):
        eval_shards.count(_ev(shards=-1), 1000, cores=2)


@pytest.mark.parametrize("n,k,shards", [(1000, 300, 2), (10, 10, 3), (7, 3, 3), (5, 2, 1)])
def test_positions_cover_the_images_with_sweep_examples_first(n, k, shards):
    pos = eval_shards.positions(n, k, shards)
    assert sorted(np.concatenate(pos).tolist()) == list(range(n))
    sweep_n = [int(np.sum(p < k)) for p in pos]
    assert sum(sweep_n) == k and max(sweep_n) - min(sweep_n) <= 1 and min(sweep_n) >= 1
    for p, s in zip(pos, sweep_n):
        assert (p[:s] < k).all() and (p[s:] >= k).all()  # its sweep examples first
    sizes = [len(p) for p in pos]
    assert max(sizes) - min(sizes) <= 2


def test_positions_refuse_more_shards_than_sweep_examples():
    with pytest.raises(ValueError, match="3 shards for 2 eps-sweep examples"):
        eval_shards.positions(10, 2, 3)


@pytest.fixture(scope="module")
def part():
    """One part of a small noisy model's evaluation on 40 images (sweep on 16)."""
    keras.utils.set_random_seed(3)
    x, y = data.load_arrays("fashion_mnist", "test", 40)
    m = models.build_model((28, 28, 1), 10, depth=8, width=4, sigma=0.1)
    return evaluation.evaluate_examples(
        m, x.astype(np.float32) / 255.0, y, eps=0.1, attacks=("fgsm", "pgd20", "cw"),
        eot_attacks=("pgd20",), eot_samples=2, batch_size=20, eps_sweep=(0.0, 0.05, 0.1),
        sweep_examples=16, attack_params={"cw_steps": 3})


def _split(part, pos):
    """The parts that shards with images `pos` would return, cut out of one part."""
    meta, arrays = part["meta"], part["arrays"]
    k = meta["sweep_n"]
    out = []
    for p in pos:
        sweep = p[p < k]
        sub = {}
        for key, a in arrays.items():
            sub[key] = a[sweep] if key.startswith(("sweep/", "more/")) else a[p]
        out.append({"meta": dict(meta, n=len(p), sweep_n=len(sweep)), "arrays": sub})
    return out


def _without_times(result):
    r = copy.deepcopy(result)
    r.pop("time_s")
    for entry in r["attacks"].values():
        for mode in ("plain", "eot"):
            if entry[mode] is not None:
                entry[mode].pop("time_s", None)
    return r


def test_merged_parts_give_the_result_of_the_whole(part):
    whole, whole_adv = evaluation.summarize([part])
    pos = eval_shards.positions(40, 16, 3)
    merged, merged_adv = evaluation.summarize(_split(part, pos), pos)
    assert _without_times(merged) == _without_times(whole)
    for key in ("x", "y", "x_adv", "robust", "source", "members"):
        np.testing.assert_array_equal(merged_adv[key], whole_adv[key])
    assert merged["worst_case"]["expected"] == pytest.approx(np.mean(whole_adv["robust"]))
    assert merged["eps_sweep"]["n_examples"] == merged["more_effort"]["n_examples"] == 16


def test_summarize_refuses_parts_that_do_not_fit(part):
    pos = eval_shards.positions(40, 16, 2)
    parts = _split(part, pos)
    with pytest.raises(ValueError, match="no positions"):
        evaluation.summarize(parts)
    with pytest.raises(ValueError, match="not a permutation"):
        evaluation.summarize(parts, [pos[0], pos[0]])
    other = copy.deepcopy(parts)
    other[1]["meta"]["eps"] = 0.2
    with pytest.raises(ValueError, match="different eps"):
        evaluation.summarize(other, pos)


def test_a_part_survives_its_npz(part, tmp_path):
    path = str(tmp_path / "part.npz")
    eval_shards.save_part(path, part)
    back = eval_shards.load_part(path)
    assert back["meta"] == _jsonish(part["meta"])  # JSON: tuples come back as lists
    assert sorted(back["arrays"]) == sorted(part["arrays"])
    for key, a in part["arrays"].items():
        np.testing.assert_array_equal(back["arrays"][key], a)
    a, _ = evaluation.summarize([back])
    b, _ = evaluation.summarize([part])
    assert _without_times(a) == _without_times(b)


def _jsonish(meta):
    return json.loads(json.dumps(meta))


def test_evaluate_in_two_shards_writes_a_whole_eval_json(tmp_path):
    wd = str(tmp_path / "run")
    config = smoke.get_config("ternary,tradeoff")
    config.optim.epochs = 1
    train_lib.train(config, wd, verbose=0)
    over = copy.deepcopy(config)
    over.eval.max_examples = 48
    over.eval.batch_size = 24
    over.eval.sweep_examples = 20
    over.eval.attacks = ("fgsm", "pgd20")
    over.eval.eot_attacks = ("pgd20",)
    over.eval.shards = 2
    two = run_evaluate.evaluate(wd, overrides=over, verbose=0)
    with open(os.path.join(wd, workdir_lib.ADVERSARIAL_NPZ), "rb") as f:
        with np.load(f) as d:
            adv = {k: d[k] for k in d.files}
    over.eval.shards = 1
    one = run_evaluate.evaluate(wd, overrides=over, verbose=0)
    assert two["shards"] == 2 and "shards" not in one
    assert not [f for f in os.listdir(wd) if f.startswith(".eval-shards-")]  # cleaned up

    def keys(d):
        return {k: keys(v) for k, v in d.items()} if isinstance(d, dict) else None

    two.pop("shards")
    assert keys(two) == keys(one)
    assert two["n_examples"] == 48 and two["eps_sweep"]["n_examples"] == 20
    # the same images and labels, in order; the accuracies differ by the noise draws only
    np.testing.assert_array_equal(adv["y"], data.load_arrays("fashion_mnist", "test", 48)[1])
    assert abs(two["natural_acc"]["expected"] - one["natural_acc"]["expected"]) <= 0.15
    assert two["worst_case"]["expected"] == pytest.approx(float(np.mean(adv["robust"])))
    assert np.abs(adv["x_adv"] - adv["x"]).max() <= float(config.adv.eps) + 1e-6
    assert len(two["sanity"]) == len(one["sanity"]) > 0


def test_a_negative_shard_count_is_refused_by_the_config_check():
    from brkeras.run import config as config_lib  # pylint: disable=g-import-not-at-top
    c = smoke.get_config("float,tradeoff")
    c.eval.shards = -1
    with pytest.raises(ValueError, match="config.eval.shards=-1"):
        config_lib.validate(c)
    c.eval.shards = 2
    config_lib.validate(c)
