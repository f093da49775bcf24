import numpy as np
import pytest

from brkeras.robust import losses
from brkeras._keras import tf


def _np_ce(y, logits):
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def _np_kl(lp, lq):
    def logsm(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    a, b = logsm(lp), logsm(lq)
    return (np.exp(a) * (a - b)).sum(axis=1)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=16)
    nat = rng.normal(size=(16, 10)).astype(np.float32)
    adv = rng.normal(size=(16, 10)).astype(np.float32)
    return y, nat, adv


def test_tradeoff_equals_formula(batch):
    y, nat, adv = batch
    got = losses.get("tradeoff", a=8.0)(tf.constant(y), tf.constant(nat), tf.constant(adv))
    want = 8.0 * _np_ce(y, adv) + _np_ce(y, nat)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert losses.get("tradeoff").attack == "ce"


def test_pgd_and_natural_use_one_side(batch):
    y, nat, adv = batch
    np.testing.assert_allclose(losses.get("pgd")(y, nat, adv).numpy(), _np_ce(y, adv), rtol=1e-5)
    np.testing.assert_allclose(losses.get("natural")(y, nat, adv).numpy(), _np_ce(y, nat), rtol=1e-5)
    assert losses.get("natural").attack is None
    assert not losses.get("pgd").needs_natural


def test_trades_equals_formula(batch):
    y, nat, adv = batch
    got = losses.get("trades", beta=6.0)(y, nat, adv).numpy()
    np.testing.assert_allclose(got, _np_ce(y, nat) + 6.0 * _np_kl(nat, adv), rtol=1e-5)
    assert losses.get("trades").attack == "kl"
    # KL of a distribution with itself is zero.
    np.testing.assert_allclose(losses.kl_divergence(nat, nat).numpy(), 0.0, atol=1e-6)


def test_unknown_loss_lists_names():
    with pytest.raises(ValueError, match="tradeoff"):
        losses.get("madry")
