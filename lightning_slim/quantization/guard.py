"""The phase-switch guard of QAT (plain Python, no torch or Lightning): a training loss that explodes
after fake quantization starts, ranges freeze or BatchNorm freezes is caught, named and kept for the export."""

from __future__ import annotations

from typing import Any

BN_FREEZE_LR_FRACTION = 0.1  # measured: frozen at 26% of OneCycle's peak, a BN ResNet diverged in 3 steps


def bn_freeze_warning(step: int, lr: float | None, peak_lr: float, lowest_lr: float) -> str | None:
    """The warning for BatchNorm freezing while a scheduled learning rate is still above
    ``BN_FREEZE_LR_FRACTION`` of its peak (a constant lr has no better moment to wait for)."""
    if not (lowest_lr < peak_lr and lr is not None and lr > BN_FREEZE_LR_FRACTION * peak_lr):
        return None
    return (
        f"QuantizationAwareTraining: BatchNorm freezes at step {step} with lr={lr:.3g}, {lr / peak_lr:.0%} of the "
        f"peak {peak_lr:.3g}: frozen at a high learning rate, a BN ResNet diverged within a few steps (a plain "
        f"fit too); freeze_bn_after belongs where the lr has decayed below {BN_FREEZE_LR_FRACTION:.0%} of its "
        "peak, or leave it None"
    )


class DivergenceGuard:
    """Watches the training loss across QAT's phase switches (fake quantization starts, ranges freeze,
    BatchNorm freezes). A loss that is not finite, or a median of the last ``patience`` losses above
    ``factor`` times the median of the ``window`` losses before the last switch, is divergence (one noisy
    batch is not): :meth:`update` returns the message once, naming the step, the switch and its likely
    cause; :attr:`diverged` keeps it (for the export).

    >>> guard = DivergenceGuard(window=4, patience=2)
    >>> for step, loss in enumerate([1.0, 0.9, 0.8, 0.7]):
    ...     guard.update(step, loss)
    >>> guard.switch(4, "BatchNorm froze", lr=0.05, peak_lr=0.1)
    >>> guard.update(4, 9.0) is None, guard.update(5, 9.5).split(" against")[0]
    (True, 'QuantizationAwareTraining: the training loss exploded at step 5 (9.5,')
    """

    CAUSES: dict[str, str] = {  # noqa: RUF012 (read-only)
        "fake quantization started": "activation ranges too narrow for the trained model, or too high a "
        "learning rate for the quantized weights: start later or at a lower learning rate",
        "ranges froze": "the frozen ranges clip activations the model still changes: freeze them later",
        "BatchNorm froze": "a BatchNorm frozen at a high learning rate: without batch statistics the network "
        "is not normalized and large steps blow up (a plain fit diverges the same way); set freeze_bn_after "
        "where the learning rate has decayed (the last 10-20% of a OneCycle/cosine schedule) or leave it None",
    }

    def __init__(self, factor: float = 3.0, window: int = 20, patience: int = 5):
        self.factor, self.window, self.patience = factor, window, patience
        self.history: list[float] = []
        self.last_switch: dict[str, Any] | None = None
        self.diverged: dict[str, Any] | None = None

    def switch(self, step: int, what: str, lr: float | None = None, peak_lr: float | None = None) -> None:
        finite = sorted(v for v in self.history[-self.window :] if v == v and abs(v) != float("inf"))
        reference = finite[len(finite) // 2] if finite else None
        self.last_switch = {"step": step, "what": what, "reference": reference, "lr": lr, "peak_lr": peak_lr}

    def update(self, step: int, loss: float) -> str | None:
        self.history = [*self.history[-(max(self.window, self.patience) - 1) :], loss]
        s = self.last_switch
        if self.diverged is not None or s is None:
            return None
        recent = sorted(self.history[-self.patience :])
        finite = loss == loss and abs(loss) != float("inf")
        rising = (
            s["reference"] is not None
            and step - s["step"] + 1 >= self.patience  # only losses after the switch
            and recent[len(recent) // 2] > self.factor * max(s["reference"], 1e-3)
        )
        if finite and not rising:
            return None
        self.diverged = {"step": step, "loss": loss, **{f"after_{k}": v for k, v in s.items()}}
        lr = f" at lr={s['lr']:.3g} ({s['lr'] / s['peak_lr']:.0%} of the peak)" if s["lr"] and s["peak_lr"] else ""
        return (
            f"QuantizationAwareTraining: the training loss exploded at step {step} ({loss:.4g}, against a median "
            f"of {s['reference']} before) {step - s['step']} steps after {s['what']} at step {s['step']}{lr}. "
            f"Likely cause: {self.CAUSES.get(s['what'], 'the phase switch')}. The export refuses this model unless "
            "export_diverged=True"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "last_switch": self.last_switch, "diverged": self.diverged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.last_switch, self.diverged = state.get("last_switch"), state.get("diverged")
