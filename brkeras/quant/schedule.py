"""The Binary-Relax relaxation schedule: lam = lam0 * rho^t and the switch to exact Q(w)."""

from brkeras.quant.binary_relax import _require_br, set_br_state
from brkeras._keras import keras


class BinaryRelaxSchedule(keras.callbacks.Callback):
    """Sets lam = lam0 * rho**epoch and phase II from `phase2_epoch` on.

    With `steps_per_epoch` > 0, lam also grows within the epoch,
    lam = lam0 * rho**(epoch + step / steps_per_epoch): the same curve, sampled
    every step instead of once per epoch (the reference). Short runs with few
    phase-I epochs need it, or lam jumps by a large factor rho at each epoch.
    A pure function of (epoch, step), so resuming at any epoch is correct.
    """

    def __init__(self, lam0=1.0, rho=1.05, phase2_epoch=120, steps_per_epoch=0):
        super().__init__()
        if lam0 < 0 or rho < 1 or steps_per_epoch < 0:
            raise ValueError(f"BinaryRelaxSchedule(lam0={lam0}, rho={rho}, steps_per_epoch="
                             f"{steps_per_epoch}): need lam0 >= 0, rho >= 1, steps >= 0")
        self.lam0, self.rho, self.phase2_epoch = float(lam0), float(rho), int(phase2_epoch)
        self.steps_per_epoch = int(steps_per_epoch)
        self._epoch = 0
        self._lam_vars = []

    def state(self, epoch, step=0):
        """(lam, exact) at `step` of `epoch`."""
        t = epoch + (step / self.steps_per_epoch if self.steps_per_epoch else 0.0)
        return float(self.lam0 * self.rho ** t), epoch >= self.phase2_epoch

    def set_model(self, model):
        super().set_model(model)
        self._lam_vars = []

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        lam, exact = self.state(epoch)
        set_br_state(self.model, lam=lam, exact=exact)

    def on_train_batch_begin(self, batch, logs=None):
        if self.steps_per_epoch and batch and self._epoch < self.phase2_epoch:
            if not self._lam_vars:  # found once: a walk of the model costs ~5% of a step
                self._lam_vars = [qvars["br_lam"] for *_, qvars in _require_br(self.model)]
            lam = self.state(self._epoch, batch)[0]
            for var in self._lam_vars:
                var.assign(lam)
