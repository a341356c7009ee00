"""The one wrapper around a LightningModule's ``training_step`` that callbacks share.

Lightning ignores what callback hooks return, so a callback cannot change the batch or
the loss from a hook. The strategy looks ``training_step`` up on the module instance at
every call (DDP included), so we set one wrapper as an instance attribute in ``setup``
and remove it in ``teardown``. Callbacks join it as *participants*:

1. ``transform_batch(trainer, pl_module, batch, batch_idx) -> batch`` runs first, in
   ascending ``step_order`` (data selection picks the sub-batch here);
2. the user's own ``training_step`` runs on the resulting batch;
3. ``transform_loss(trainer, pl_module, loss, batch, batch_idx) -> Tensor`` (optional) may
   rescale the user's loss, before any term is added (a term cannot scale it: gradients);
4. ``extra_loss(trainer, pl_module, batch, batch_idx) -> Tensor | None`` runs in
   ascending ``step_order`` and each term is added to the returned loss (a tensor, or
   the ``"loss"`` entry of a dict). Lightning then scales by gradient accumulation.

However many callbacks take part, there is one wrapper; the module is back to its
class's ``training_step`` once the last participant leaves.
"""
from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl
import torch

_ATTR = "_slim_step_interceptor"

# step_order conventions: selection first, then loss terms
ORDER_SELECTION = 0
ORDER_LOSS = 100


class _Interceptor:
    def __init__(self, pl_module: pl.LightningModule):
        self.pl_module = pl_module
        self.participants: list[Any] = []
        self.active = False  # True while the user's training_step runs inside the wrapper
        # Lightning inspects training_step (is_overridden, signature): show it the user's own
        self.__wrapped__ = type(pl_module).training_step

    def __call__(self, batch, *args, **kwargs):
        module = self.pl_module
        trainer = module._trainer  # None outside a fit (the property would raise)
        batch_idx = args[0] if args else kwargs.get("batch_idx", 0)
        ordered = sorted(self.participants, key=lambda p: getattr(p, "step_order", ORDER_LOSS))
        for p in ordered:
            if hasattr(p, "transform_batch"):
                batch = p.transform_batch(trainer, module, batch, batch_idx)
        self.active = True
        try:
            output = type(module).training_step(module, batch, *args, **kwargs)
        finally:
            self.active = False
        if output is None:  # the user skipped this batch
            return output
        loss = output["loss"] if isinstance(output, Mapping) else output
        for p in ordered:  # rescale the user's own loss (distillation's (1 - alpha) * loss)
            if hasattr(p, "transform_loss"):
                loss = p.transform_loss(trainer, module, loss, batch, batch_idx)
        for p in ordered:
            if hasattr(p, "extra_loss"):
                term = p.extra_loss(trainer, module, batch, batch_idx)
                if term is not None:
                    loss = loss + term
        if isinstance(output, Mapping):
            return {**output, "loss": loss}
        return loss


def attach(pl_module: pl.LightningModule, participant: Any) -> None:
    """Make ``participant`` take part in every ``training_step`` of ``pl_module``."""
    if hasattr(participant, "extra_loss") and not pl_module.automatic_optimization:
        raise RuntimeError(
            f"{type(participant).__name__} adds a loss term to training_step's loss, which needs "
            "automatic optimization; this module sets automatic_optimization=False"
        )
    interceptor = pl_module.__dict__.get(_ATTR)
    if interceptor is None:
        interceptor = _Interceptor(pl_module)
        pl_module.__dict__[_ATTR] = interceptor
        pl_module.__dict__["training_step"] = interceptor
    if participant not in interceptor.participants:
        interceptor.participants.append(participant)


def detach(pl_module: pl.LightningModule, participant: Any) -> None:
    """Remove ``participant``; restore the module's own ``training_step`` when none is left."""
    interceptor = pl_module.__dict__.get(_ATTR)
    if interceptor is None:
        return
    if participant in interceptor.participants:
        interceptor.participants.remove(participant)
    if not interceptor.participants:
        del pl_module.__dict__[_ATTR]
        if pl_module.__dict__.get("training_step") is interceptor:
            del pl_module.__dict__["training_step"]


def in_training_step(pl_module: torch.nn.Module) -> bool:
    """True while the user's ``training_step`` runs inside the wrapper (for forward hooks)."""
    interceptor = pl_module.__dict__.get(_ATTR)
    return bool(interceptor and interceptor.active)
