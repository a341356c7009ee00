"""``SlimCallback``: a :class:`~lightning_slim.core.contract.Technique` as a Lightning callback.

The contract (declarations, effect methods, their order) is :mod:`lightning_slim.core.contract`; this
class runs the life of a fit around it (subclasses call ``super()`` where they override):

1. ``setup``: :data:`~lightning_slim.core.contract.SETUP_ORDER`: the combination is checked
   (:func:`~lightning_slim.core.compose.check_combination`), every ``BASELINE`` technique sees the model
   as the user built it, this technique's ``validate`` raises on bad arguments or an unsupported
   model, it joins the step wrapper, a ``SWAP_MODULES`` technique's ``prepare_model`` runs and an
   ``ADD_MODULES`` technique adds its training-only modules (a ``RESTRUCTURE_MID_FIT`` technique
   restructures if it is due already).
   Lightning loads a resumed checkpoint's weights after ``setup`` (``RESTRUCTURE`` techniques resize
   the model first, in ``before_weights_load``) and builds optimizers after that.
2. training: :data:`~lightning_slim.core.contract.STEP_ORDER` inside each ``training_step``
   (:mod:`~lightning_slim.core.interception`); the usual Lightning hooks for the rest.
3. ``teardown`` (or ``on_exception``, since Lightning skips teardown when fit raises): the one way
   out: ``restore_model`` gives the user's modules back, ``release`` drops what the technique
   attached, and the step wrapper is removed.

>>> from lightning_slim.core.contract import Effect
>>> class Broken(SlimCallback):
...     effects = frozenset({Effect.ADD_LOSS})   # declared, but loss_term is not implemented
Traceback (most recent call last):
...
TypeError: Broken declares Effect.ADD_LOSS but does not implement loss_term()
"""

from __future__ import annotations

import lightning.pytorch as pl
from typing_extensions import override

from lightning_slim.core import compose, interception, log
from lightning_slim.core.contract import Effect, Technique


class SlimCallback(pl.Callback, Technique):
    _prepared: pl.LightningModule | None = None  # the module prepare_model swapped, until restore_model

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
        if Effect.ADD_MODULES in self.effects:
            self.add_training_modules(trainer, pl_module)
        if Effect.RESTRUCTURE_MID_FIT in self.effects:
            self.restructure_now(trainer, pl_module)  # before the optimizers exist: nothing to rebuild

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._leave(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._leave(pl_module)  # Lightning skips teardown when fit raises: give the module back anyway

    def _leave(self, pl_module: pl.LightningModule) -> None:
        if self._prepared is pl_module:
            self.restore_model(pl_module)
            self._prepared = None
        self.release(pl_module)
        interception.detach(pl_module, self)

    def log_scalars(self, pl_module: pl.LightningModule, values: dict[str, object], **kwargs: object) -> None:
        log.log_scalars(pl_module, self.technique, values, **kwargs)
