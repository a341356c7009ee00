"""``SlimCallback``: the base of every technique, and the typed contract it implements.

A technique declares what it does (``effects``, a set of :class:`~lightning_slim.contract.Effect`,
and ``export_stage``) and overrides the matching methods below; the declaration and the
overrides are checked against each other when the class is defined. The shared machinery
(:mod:`~lightning_slim.interception`, :mod:`~lightning_slim.compose`, :mod:`~lightning_slim.report`)
only ever reads these declarations. ``docs/architecture.md`` walks through a training step.

The life of a fit, as this base class runs it (subclasses call ``super()`` where they override):

1. ``setup``: the combination is checked (:func:`~lightning_slim.compose.check_combination`),
   every ``BASELINE`` technique sees the model as the user built it, this technique's
   ``validate`` raises on bad arguments or an unsupported model, it joins the step wrapper, and
   a ``SWAP_MODULES`` technique's ``prepare_model`` runs. Lightning loads a resumed checkpoint's
   weights after ``setup`` (``RESTRUCTURE`` techniques resize the model first, in
   ``before_weights_load``) and builds optimizers after that.
2. training: ``select_batch``, ``scale_loss``, ``loss_term`` inside each ``training_step``;
   ``after_optimizer_step`` after each optimizer step; the usual Lightning hooks for the rest.
3. ``teardown`` (or ``on_exception``): ``restore_model`` gives the user's modules back and the
   step wrapper is removed.

>>> from lightning_slim.contract import Effect
>>> class Broken(SlimCallback):
...     effects = frozenset({Effect.ADD_LOSS})   # declared, but loss_term is not implemented
Traceback (most recent call last):
...
TypeError: Broken declares Effect.ADD_LOSS but does not implement loss_term()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from lightning_slim import compose, interception, log
from lightning_slim.clock import Moment
from lightning_slim.contract import Capability, Effect, ExportStage


class SlimCallback(pl.Callback):
    technique: ClassVar[str] = "slim"  # the <technique> of slim/<technique>/<metric> keys
    effects: ClassVar[frozenset[Effect]] = frozenset()
    export_stage: ClassVar[ExportStage | None] = None  # set when export() changes the model

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for effect in Effect:
            for method in effect.methods:
                implemented = getattr(cls, method) is not getattr(SlimCallback, method)
                if implemented and effect not in cls.effects:
                    raise TypeError(f"{cls.__name__} implements {method}() but does not declare Effect.{effect.name}")
                if effect in cls.effects and not implemented:
                    raise TypeError(f"{cls.__name__} declares Effect.{effect.name} but does not implement {method}()")
        if (cls.export is not SlimCallback.export) != (cls.export_stage is not None):
            raise TypeError(
                f"{cls.__name__}: export() and export_stage go together (an ExportStage says when "
                "in the export chain it runs)"
            )

    # --- the contract: declarations about other techniques --------------------------------------
    def provides(self) -> Mapping[Capability, Any]:
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

    def sharded_refusal(self) -> str | None:
        """Why this technique, as configured, cannot train FSDP2-sharded (``DTensor``) parameters under
        ``ModelParallelStrategy`` (None: it can, tested in ``tests/sharded``)."""
        return "it does not train sharded parameters yet"

    # --- the contract: effects (each runs only when declared in ``effects``) -------------------
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise a clear error about bad arguments or an unsupported model, before training."""

    def select_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Any:
        """``SELECT_BATCH``: the batch the user's ``training_step`` receives instead of ``batch``."""
        return batch

    def scale_loss(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor, batch: Any, batch_idx: int
    ) -> torch.Tensor:
        """``SCALE_LOSS``: the user's loss, rescaled (before any term is added)."""
        return loss

    def loss_term(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> torch.Tensor | None:
        """``ADD_LOSS``: a term added to the loss ``training_step`` returns (None: nothing this step)."""
        return None

    def after_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """``AFTER_OPTIMIZER_STEP``: runs right after every ``optimizer.step()``."""

    def prepare_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``SWAP_MODULES``: swap modules for the fit (keep parameter objects and state-dict keys)."""

    def restore_model(self, pl_module: pl.LightningModule) -> None:
        """``SWAP_MODULES``: give the user's own modules back (with the trained parameters)."""

    def before_weights_load(self, pl_module: pl.LightningModule, state: Mapping[str, Any]) -> None:
        """``RESTRUCTURE``: resize a freshly built model to a resumed checkpoint's shapes, from this
        technique's own state in that checkpoint, before Lightning loads its weights."""

    def take_baseline(self, pl_module: pl.LightningModule) -> None:
        """``BASELINE``: see the model as the user built it, before any technique changes it."""

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

    def report_rows(self) -> dict[str, Any]:
        """This technique's lines in the compression report."""
        return {}

    # --- the life of a fit ---------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        compose.check_combination(trainer)
        for cb in compose.techniques(trainer):  # before any technique changes the model
            if Effect.BASELINE in cb.effects:
                cb.take_baseline(pl_module)
        self.validate(trainer, pl_module)
        interception.attach(pl_module, self)
        if Effect.SWAP_MODULES in self.effects:
            self.prepare_model(trainer, pl_module)
            self._prepared = pl_module

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._leave(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._leave(pl_module)  # Lightning skips teardown when fit raises: give the module back anyway

    def _leave(self, pl_module: pl.LightningModule) -> None:
        if getattr(self, "_prepared", None) is pl_module:
            self.restore_model(pl_module)
            self._prepared = None
        interception.detach(pl_module, self)

    def log_scalars(self, pl_module: pl.LightningModule, values: dict[str, Any], **kwargs: Any) -> None:
        log.log_scalars(pl_module, self.technique, values, **kwargs)
