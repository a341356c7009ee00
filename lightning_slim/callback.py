"""The base every lightning-slim callback shares: a technique name, up-front validation,
joining the training-step wrapper, and what it contributes to the compression report.

Contract for subclasses (see DESIGN.md):

- ``setup`` (call ``super().setup(...)`` first) lets any ``CompressionReport`` copy the model as
  the user built it, validates, and joins the step wrapper. After that a subclass may change
  the model's structure in ``setup``: Lightning loads a resumed checkpoint's weights right
  after ``setup`` and builds optimizers / wraps DDP after that, so a checkpoint of a
  restructured model (fake-quantized, channel-pruned) must be matched there.
- ``export(model)`` turns a trained copy of the module into its deployable form (masks made
  permanent, int8 conversion...). Exports are applied in ascending ``export_order``.
- ``report_rows()`` returns the technique's lines for the compression report.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_slim import compose, interception, log


class SlimCallback(pl.Callback):
    technique: str = "slim"
    export_order: int = 100

    # --- hooks subclasses override -------------------------------------------------------
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise a clear error about bad arguments or an unsupported model, before training."""

    def export(self, model: nn.Module) -> nn.Module:
        """The deployable form of a trained copy of the module (may modify ``model`` in place)."""
        return model

    def report_rows(self) -> dict[str, Any]:
        return {}

    # --- shared plumbing -------------------------------------------------------------------
    def _joins_step(self) -> bool:
        return hasattr(self, "transform_batch") or hasattr(self, "extra_loss")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for cb in trainer.callbacks:  # before any technique changes the model
            if hasattr(cb, "take_baseline"):
                cb.take_baseline(pl_module)
        compose.check_combination(trainer)
        self.validate(trainer, pl_module)
        if self._joins_step():
            interception.attach(pl_module, self)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._joins_step():
            interception.detach(pl_module, self)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown when fit raises: leave the user's module unwrapped anyway
        if self._joins_step():
            interception.detach(pl_module, self)

    def log_scalars(self, pl_module: pl.LightningModule, values: dict[str, Any], **kwargs) -> None:
        log.log_scalars(pl_module, self.technique, values, **kwargs)
