"""The contract between techniques, in one file: what a technique declares and the methods it implements.

A technique is a :class:`Technique` (in practice a :class:`~lightning_slim.core.callback.SlimCallback`,
which adds Lightning's callback hooks). It declares, as class attributes:

- ``technique``: its name in metric keys, ``slim/<technique>/<metric>``;
- ``effects``: a set of :class:`Effect`, each carried out by the one method the effect names;
- ``export_stage`` (and ``export_order`` within a stage): when its ``export`` runs in the chain that
  builds the deployable model.

The declaration and the overrides are checked against each other when the class is defined, so a
declared effect without its method, or an effect method without its declaration, is a ``TypeError``
at import time. The machinery reads only these declarations and never asks for a technique by name:

- :mod:`~lightning_slim.core.callback` runs :data:`SETUP_ORDER` in ``setup`` and gives the model back in
  ``teardown``;
- :mod:`~lightning_slim.core.interception` runs :data:`STEP_ORDER` inside every training step;
- :mod:`~lightning_slim.core.compose` checks what techniques declare about each other before training;
- :mod:`~lightning_slim.reporting.report` calls ``export`` in :func:`export_chain` order.

>>> [e.name for e in STEP_ORDER]
['RESTRUCTURE_MID_FIT', 'SELECT_BATCH', 'WATCH_STEP', 'SCALE_LOSS', 'ADD_LOSS', 'AFTER_OPTIMIZER_STEP']
>>> ExportStage.FINALIZE_WEIGHTS < ExportStage.CONVERT
True
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # annotations only: the contract imports neither torch nor Lightning at run time
    import lightning.pytorch as pl
    import torch
    from torch import nn

    from lightning_slim.core.clock import Moment
    from lightning_slim.core.step_record import StepRecord

Batch = object  # whatever the user's DataLoader yields; techniques read it through lightning_slim.batches


class Effect(enum.Enum):
    """What a technique does, each with the one method that does it (the enum's value)."""

    BASELINE = "take_baseline"  # sees the model as the user built it, before any other effect
    SWAP_MODULES = "prepare_model"  # swaps modules for the fit (restore_model puts them back)
    ADD_MODULES = "add_training_modules"  # adds training-only modules before the optimizers are built
    RESTRUCTURE = "before_weights_load"  # changes parameter shapes; resizes a fresh model on resume
    RESTRUCTURE_MID_FIT = "restructure_now"  # changes the model between steps (optimizers rebuilt after)
    SELECT_BATCH = "select_batch"  # picks the sub-batch the user's training_step receives
    WATCH_STEP = "watched_modules"  # sees what named modules did in the user's step (given to loss_term)
    SCALE_LOSS = "scale_loss"  # rescales the user's own loss, before any term is added
    ADD_LOSS = "loss_term"  # adds a term to the loss training_step returns
    AFTER_OPTIMIZER_STEP = "after_optimizer_step"  # acts right after every optimizer step

    @property
    def methods(self) -> tuple[str, ...]:
        return ("prepare_model", "restore_model") if self is Effect.SWAP_MODULES else (self.value,)


# The order of set-up (``SlimCallback.setup``, once per technique, before the first step): the
# combination is checked, every BASELINE technique copies the model, the technique validates its
# arguments against the model, joins the step wrapper, swaps its modules and adds its training-only
# modules (so the optimizers Lightning builds next train them). Lightning then loads a
# resumed checkpoint's weights (RESTRUCTURE techniques resize the model first) and builds optimizers.
SETUP_ORDER: tuple[str, ...] = (
    "check_combination",
    Effect.BASELINE.value,
    "validate",
    "attach",
    Effect.SWAP_MODULES.value,
    Effect.ADD_MODULES.value,
    Effect.RESTRUCTURE_MID_FIT.value,  # a restructuring due at the start (or kept from an earlier fit)
    Effect.RESTRUCTURE.value,
)
# The order inside one training step (``interception``); techniques doing the same effect act in the
# order of their ``technique`` names, so the callback list's order never changes a result.
STEP_ORDER: tuple[Effect, ...] = (
    Effect.RESTRUCTURE_MID_FIT,  # at the batch's start, before Lightning's optimizer closure
    Effect.SELECT_BATCH,  # before the user's training_step
    Effect.WATCH_STEP,  # around it: the calls of the watched modules are recorded
    Effect.SCALE_LOSS,  # after it, on the user's loss
    Effect.ADD_LOSS,
    Effect.AFTER_OPTIMIZER_STEP,  # right after optimizer.step()
)


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


class Technique:
    """The contract every technique implements. Each method runs only when its effect is declared."""

    technique: ClassVar[str] = "slim"  # the <technique> of slim/<technique>/<metric> keys
    effects: ClassVar[frozenset[Effect]] = frozenset()
    export_stage: ClassVar[ExportStage | None] = None  # set when export() changes the model
    export_order: ClassVar[int] = 0  # within one export_stage: lower first (ties: by technique name)
    state_key: str  # where its state sits in a checkpoint (Lightning's Callback.state_key)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for effect in Effect:
            for method in effect.methods:
                implemented = getattr(cls, method) is not getattr(Technique, method)
                if implemented and effect not in cls.effects:
                    raise TypeError(f"{cls.__name__} implements {method}() but does not declare Effect.{effect.name}")
                if effect in cls.effects and not implemented:
                    raise TypeError(f"{cls.__name__} declares Effect.{effect.name} but does not implement {method}()")
        if (cls.export is not Technique.export) != (cls.export_stage is not None):
            raise TypeError(
                f"{cls.__name__}: export() and export_stage go together (an ExportStage says when "
                "in the export chain it runs)"
            )

    # --- declarations about other techniques ------------------------------------------------------
    def provides(self) -> Mapping[Capability, object]:
        """What this technique lends to others in the same Trainer (e.g. its teacher)."""
        return {}

    def requires(self) -> set[Capability]:
        """What this technique needs another technique to provide."""
        return set()

    def restructures_until(self) -> Moment | None:
        """The last moment at which this technique may change the model's parameter shapes."""
        return None

    def structure_fixed_from(self) -> Moment | None:
        """From this moment on, this technique needs no other to change the model's structure."""
        return None

    def sharded_refusal(self, resuming: bool = False) -> str | None:
        """Why this technique, as configured, cannot train FSDP2-sharded (``DTensor``) parameters under
        Lightning's ``ModelParallelStrategy``, or (``resuming``) resume such a fit from Lightning's
        distributed checkpoint, whose callback state is rank 0's (None: it can, tested in ``tests/sharded``)."""
        return "it does not train sharded parameters yet"

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise a clear error about bad arguments or an unsupported model, before training."""

    # --- effects, in SETUP_ORDER then STEP_ORDER ---------------------------------------------------
    def take_baseline(self, pl_module: pl.LightningModule) -> None:
        """``BASELINE``: see the model as the user built it, before any technique changes it."""

    def prepare_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``SWAP_MODULES``: swap modules for the fit (keep parameter objects and state-dict keys)."""

    def restore_model(self, pl_module: pl.LightningModule) -> None:
        """``SWAP_MODULES``: give the user's own modules back (with the trained parameters)."""

    def add_training_modules(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``ADD_MODULES``: add modules only training needs (distillation's feature projections) to the
        model in ``setup``, before the optimizers are built. They stay on the module (its checkpoints
        hold them, a second fit keeps training them); an ``export`` at ``REMOVE_TRAINING_PARTS`` drops
        them from the deployable model."""

    def before_weights_load(self, pl_module: pl.LightningModule, state: Mapping[str, object]) -> None:
        """``RESTRUCTURE``: resize a freshly built model to a resumed checkpoint's shapes, from this
        technique's own state in that checkpoint, before Lightning loads its weights."""

    def restructure_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """``RESTRUCTURE_MID_FIT``: change the model's structure (replace or resize modules) if it is
        time to; called in ``setup`` and at the start of every training batch. Return True when
        parameters changed: mid-fit, the machinery then rebuilds the optimizers (keeping the state of
        untouched parameters and the learning-rate schedule). Declare ``restructures_until`` too."""
        return False

    def select_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Batch, batch_idx: int) -> Batch:
        """``SELECT_BATCH``: the batch the user's ``training_step`` receives instead of ``batch``."""
        return batch

    def watched_modules(self, pl_module: pl.LightningModule) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        """``WATCH_STEP``: ``(calls, features)``: the modules whose outermost calls (arguments and output)
        and the modules whose outputs (one per call) the machinery records while the user's
        ``training_step`` runs, and hands to ``loss_term`` as a :class:`StepRecord`. Recorded only
        inside that step: never in validation, a probe or the teacher."""
        return {}, {}

    def scale_loss(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor, batch: Batch, batch_idx: int
    ) -> torch.Tensor:
        """``SCALE_LOSS``: the user's loss, rescaled (before any term is added)."""
        return loss

    def loss_term(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Batch, batch_idx: int, seen: StepRecord | None
    ) -> torch.Tensor | None:
        """``ADD_LOSS``: a term added to the loss ``training_step`` returns (None: nothing this step);
        ``seen``: what the watched modules did in this step (``WATCH_STEP``; None without it)."""
        return None

    def after_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """``AFTER_OPTIMIZER_STEP``: runs right after every ``optimizer.step()``."""

    def release(self, pl_module: pl.LightningModule) -> None:
        """Drop what this technique attached for the fit (hooks, a baseline copy): the one way out,
        called once when the fit ends or raises, after ``restore_model``."""

    # --- export and report ------------------------------------------------------------------------
    def gather_for_export(self) -> None:
        """Under FSDP2, what ``export`` reads whole (e.g. masks held per shard), gathered: every rank calls
        it at the same point (a collective) before ``export`` runs on rank 0 alone (default: nothing)."""

    def export(self, model: nn.Module) -> nn.Module:
        """The deployable form of a trained copy of the module (may modify ``model`` in place)."""
        return model

    def float_baselines(self, model: nn.Module, example: torch.Tensor, runtime: bool = True) -> dict[str, nn.Module]:
        """``CONVERT`` stage: what the report times this technique's export against, side by side:
        ``"fp32_eager"`` (``model``, a copy of the trained module before the conversion, in float
        PyTorch) and, when the export runs in another runtime and ``runtime`` is set (the report
        times them), ``"fp32_runtime"`` (the same float model in that runtime), so a user sees what
        is due to the format and what to the runtime."""
        return {}

    def report_rows(self) -> dict[str, object]:
        """This technique's lines in the compression report."""
        return {}


def export_chain(techniques: Iterable[Technique], before: ExportStage | None = None) -> list[Technique]:
    """The techniques whose ``export`` builds the deployable model, in the order they run: by
    ``export_stage``, then ``export_order``, then name, never the callback list's order (only the
    stages ahead of ``before`` when it is given)."""
    chain = [t for t in techniques if t.export_stage is not None and (before is None or t.export_stage < before)]
    return sorted(chain, key=lambda t: (t.export_stage, t.export_order, t.technique))
