"""How the callbacks compose in one Trainer, and the combinations that cannot work.

The order of effects in a training step is fixed by the shared wrapper
(:mod:`lightning_slim.interception`), not by the order of the callback list:

1. ``OnlineDataSelection`` scores the super-batch and keeps the chosen sub-batch;
2. the user's ``training_step`` runs on that sub-batch (through fake quantization when
   ``QuantizationAwareTraining`` is active, with pruned weights at exactly zero);
3. ``KnowledgeDistillation`` adds its term on the same sub-batch;
4. after each optimizer step ``IterativeMagnitudePruning`` re-applies its masks.

At export the deployable model is built in ``export_order``: pruning makes its masks
permanent (10), then quantization converts to int8 (1000), so the int8 weights of pruned
positions are exact zeros.
"""
from __future__ import annotations

from collections import Counter

import lightning.pytorch as pl


class IncompatibleCallbacksError(ValueError):
    """Two lightning-slim callbacks were combined in a way that cannot work."""


def check_combination(trainer: pl.Trainer) -> None:
    """Raise :class:`IncompatibleCallbacksError` before training for combinations that cannot work."""
    from lightning_slim.callback import SlimCallback

    slim = [cb for cb in trainer.callbacks if isinstance(cb, SlimCallback)]
    twice = [t for t, n in Counter(cb.technique for cb in slim).items() if n > 1]
    if twice:
        raise IncompatibleCallbacksError(
            f"more than one {twice[0]!r} callback in one Trainer ({[type(c).__name__ for c in slim if c.technique == twice[0]]}); "
            "they would fight over the same model: use one, with a schedule that covers both needs")
    by = {cb.technique: cb for cb in slim}
    pruning, quant = by.get("pruning"), by.get("quantization")
    if pruning is not None and quant is not None and getattr(pruning, "structured", False):
        # measured: removing channels from layers that are already fake-quantized hangs in
        # torch-pruning's tracing; pruning them first and quantizing the smaller model works
        last = max(t for t, _ in pruning.events)
        unit = pruning.schedule.unit
        if unit != quant.unit or last >= quant.start_after:
            raise IncompatibleCallbacksError(
                f"IterativeMagnitudePruning(structured=True) prunes channels until {unit} {last}, but "
                f"QuantizationAwareTraining starts fake quantization at {quant.unit} {quant.start_after}; "
                "every channel-pruning event must come before fake quantization starts (same unit), e.g. "
                f"start_after={last + 1} with unit={unit!r}")
    selection = by.get("selection")
    if selection is not None and getattr(selection, "reference", None) == "teacher":
        if not any(hasattr(cb, "teacher") and cb is not selection for cb in trainer.callbacks):
            raise IncompatibleCallbacksError(
                "OnlineDataSelection(reference='teacher') needs a callback with a teacher "
                "(KnowledgeDistillation) in the same Trainer")
