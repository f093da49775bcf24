"""Training losses by name: natural, PGD (Madry), the paper's trade-off, TRADES.

Every loss maps `(y, logits_nat, logits_adv) -> per-example loss` (shape [B]);
the train step averages over the global batch, so the losses stay correct under
tf.distribute. `Loss.attack` says which adversarial example the train step must
craft for it: "ce" (PGD on the cross-entropy), "kl" (PGD on KL(f(x) || f(x')),
TRADES) or None (no attack).

  natural:  CE(f(x), y)
  pgd:      CE(f(x_adv), y)                                  (Madry et al. 2018)
  tradeoff: a * CE(f(x_adv), y) + CE(f(x), y),  a = 8         (Li, Wang, Xin, eq. 9)
  trades:   CE(f(x), y) + beta * KL(f(x) || f(x')),  beta = 6  (Zhang et al. 2019)
"""

import dataclasses
from typing import Optional

from brkeras._keras import tf

NAMES = ("natural", "pgd", "tradeoff", "trades")


def cross_entropy(y, logits):
    """Per-example softmax cross-entropy of integer labels y."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(y, tf.int32), logits=logits)


def kl_divergence(logits_p, logits_q):
    """Per-example KL(softmax(p) || softmax(q)) = sum_k p_k (log p_k - log q_k)."""
    log_p = tf.nn.log_softmax(logits_p)
    log_q = tf.nn.log_softmax(logits_q)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def natural_loss(y, logits_nat, logits_adv=None):
    del logits_adv
    return cross_entropy(y, logits_nat)


def pgd_loss(y, logits_nat, logits_adv):
    del logits_nat
    return cross_entropy(y, logits_adv)


def tradeoff_loss(y, logits_nat, logits_adv, a=8.0):
    return a * cross_entropy(y, logits_adv) + cross_entropy(y, logits_nat)


def trades_loss(y, logits_nat, logits_adv, beta=6.0):
    return cross_entropy(y, logits_nat) + beta * kl_divergence(logits_nat, logits_adv)


@dataclasses.dataclass(frozen=True)
class Loss:
    """A named loss with its hyper-parameters and what it needs from the step."""
    name: str
    a: float = 8.0
    beta: float = 6.0

    @property
    def attack(self) -> Optional[str]:
        return {"natural": None, "pgd": "ce", "tradeoff": "ce", "trades": "kl"}[self.name]

    @property
    def needs_natural(self) -> bool:
        return self.name != "pgd"

    @property
    def second_forward(self) -> bool:
        """True if the step needs f(x) besides f(x_adv) (tradeoff, trades)."""
        return self.attack is not None and self.needs_natural

    def __call__(self, y, logits_nat, logits_adv):
        if self.name == "natural":
            return natural_loss(y, logits_nat)
        if self.name == "pgd":
            return pgd_loss(y, logits_nat, logits_adv)
        if self.name == "tradeoff":
            return tradeoff_loss(y, logits_nat, logits_adv, self.a)
        return trades_loss(y, logits_nat, logits_adv, self.beta)


def get(name, a=8.0, beta=6.0):
    """Returns the loss `name` (one of NAMES) with its hyper-parameters."""
    if name not in NAMES:
        raise ValueError(f"unknown loss {name!r}; choose one of {NAMES}")
    if a < 0 or beta < 0:
        raise ValueError(f"loss weights must be >= 0, got a={a}, beta={beta}")
    return Loss(name, float(a), float(beta))
