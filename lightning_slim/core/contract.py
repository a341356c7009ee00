"""The contract between techniques: what each one declares it does to a step and to the model.

A technique is a :class:`~lightning_slim.core.callback.SlimCallback` subclass. It declares its
``effects`` as data (a set of :class:`Effect`) and implements the typed method each effect
names; the class is checked when it is defined, so a declared effect without its method, or
an effect method without its declaration, is an error at import time. The shared machinery
iterates over these declarations and never asks for a technique by name:

- :mod:`lightning_slim.core.interception` runs one training step: ``select_batch`` (one technique
  at most), the user's ``training_step``, ``scale_loss``, ``loss_term``; then
  ``after_optimizer_step`` right after every optimizer step;
- :mod:`lightning_slim.core.callback` runs the model's life: ``take_baseline`` before any technique
  changes the model, ``prepare_model`` / ``restore_model`` around ``fit`` (module swaps),
  ``before_weights_load`` before a resumed checkpoint's weights are loaded (resizing),
  ``restructure_now`` at the start of every training epoch and batch (rebuilding the optimizers
  when it changed the model: the one path that changes the model mid-fit);
- :mod:`lightning_slim.core.compose` checks what techniques declare about each other:
  ``provides()`` / ``requires()`` (e.g. a teacher) and the timeline constraint that no
  technique restructures the model (``restructures_until``) after another one needs its
  structure fixed (``structure_fixed_from``);
- :mod:`lightning_slim.reporting.report` builds the deployable model by calling ``export`` in the order
  of each technique's :class:`ExportStage`, and collects ``report_rows``.

>>> sorted(e.name for e in Effect)[:3]
['ADD_LOSS', 'AFTER_OPTIMIZER_STEP', 'BASELINE']
>>> ExportStage.FINALIZE_WEIGHTS < ExportStage.CONVERT
True
"""

from __future__ import annotations

import enum


class Effect(enum.Enum):
    """What a technique does, each with the one method that does it (the enum's value)."""

    SELECT_BATCH = "select_batch"  # picks the sub-batch the user's training_step receives
    SCALE_LOSS = "scale_loss"  # rescales the user's own loss, before any term is added
    ADD_LOSS = "loss_term"  # adds a term to the loss training_step returns
    AFTER_OPTIMIZER_STEP = "after_optimizer_step"  # acts right after every optimizer step
    SWAP_MODULES = "prepare_model"  # swaps modules for the fit (restore_model puts them back)
    RESTRUCTURE = "before_weights_load"  # changes parameter shapes; resizes a fresh model on resume
    RESTRUCTURE_MID_FIT = "restructure_now"  # changes the model mid-fit; the machinery rebuilds the optimizers
    BASELINE = "take_baseline"  # sees the model as the user built it, before any other effect

    @property
    def methods(self) -> tuple[str, ...]:
        return ("prepare_model", "restore_model") if self is Effect.SWAP_MODULES else (self.value,)


class ExportRefused(ValueError):
    """A technique's ``export`` refuses the trained model (e.g. its training diverged): the report
    records the reason instead of measuring a broken model."""


class ExportStage(enum.IntEnum):
    """When a technique's ``export`` runs in the chain that builds the deployable model."""

    FINALIZE_WEIGHTS = 10  # float weights take their final values (pruning masks made permanent)
    REMOVE_TRAINING_PARTS = 20  # training-only modules go (distillation's feature projections)
    CONVERT = 30  # the numeric format changes (int8): last, it needs the final float weights


class Capability(str, enum.Enum):
    """Things one technique lends to another in the same Trainer."""

    TEACHER = "teacher"  # a frozen model that scores or teaches (distillation's teacher)
