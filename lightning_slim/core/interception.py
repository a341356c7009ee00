"""Where techniques act inside a fit: the one place every mechanism lives.

Lightning ignores what callback hooks return, so a callback cannot change the batch or the
loss from a hook; it has no hook after ``optimizer.step()`` or before a resumed checkpoint's
weights are loaded; and a technique's own hooks may be overridden by its subclass. Four
mechanisms fill the gaps, each driven by what the techniques declare
(:class:`~lightning_slim.core.contract.Effect`), never by their names:

1. **the step wrapper**: the strategy looks ``training_step`` up on the module instance at
   every call (DDP included), so one wrapper is set as an instance attribute while any
   technique takes part. It runs ``select_batch`` (at most one technique), the user's own
   ``training_step`` on that batch, recording what a ``WATCH_STEP`` technique's modules did in it,
   ``scale_loss`` on the user's loss, then adds each ``loss_term`` (handed that record; techniques
   in name order, whatever the callback list's order); Lightning then divides by gradient
   accumulation itself. Forward hooks of swapped or calibrating modules that must see only the
   user's step ask :func:`in_training_step`.
2. **optimizer post-step hooks**: ``after_optimizer_step`` runs right after every step of every
   optimizer of the fit (also optimizers rebuilt mid-fit: hooks are added before each step).
3. **the batch-start hook**: the module's ``on_train_batch_start`` (Lightning calls it after the
   callbacks' and before the optimizer's closure runs ``training_step``) is wrapped so
   ``RESTRUCTURE_MID_FIT`` techniques change the model between steps; the optimizers are rebuilt
   once after them (:func:`~lightning_slim.core.lightning_glue.rebuild_optimizers`).
4. **the checkpoint pre-load hook**: the module's ``on_load_checkpoint`` (which Lightning calls
   right before loading the weights) is wrapped so ``RESTRUCTURE`` techniques resize the model
   from their own saved state first.

Module swaps (``SWAP_MODULES``: ``prepare_model`` / ``restore_model``) and the baseline are run by
:class:`~lightning_slim.core.callback.SlimCallback`'s ``setup`` / ``teardown``. Once the last technique
leaves, the module is its class's own again.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping

import lightning.pytorch as pl
import torch

from lightning_slim.core.contract import STEP_ORDER, Batch, Effect, Technique
from lightning_slim.core.lightning_glue import rebuild_optimizers, trainer_of
from lightning_slim.core.step_record import StepRecord, record_calls

_ATTR = "_slim_step_interceptor"
# who joins the wrapper: the step's effects, RESTRUCTURE (the pre-load hook) and SWAP_MODULES (swapped
# modules ask in_training_step: QAT's activation observers record the user's step, in any mode)
STEP_EFFECTS = frozenset({*STEP_ORDER, Effect.RESTRUCTURE, Effect.SWAP_MODULES})  # STEP_ORDER: the batch start too
LOSS_EFFECTS = frozenset({Effect.SCALE_LOSS, Effect.ADD_LOSS})


class _Interceptor:
    def __init__(self, pl_module: pl.LightningModule):
        self.pl_module = pl_module
        self.participants: list[Technique] = []
        self.active = False  # True while the user's training_step runs inside the wrapper
        self.hooked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> hook handle
        # Lightning inspects training_step (is_overridden, signature): show it the user's own
        self.__wrapped__ = type(pl_module).training_step

    def doing(self, effect: Effect) -> list[Technique]:
        return sorted((p for p in self.participants if effect in p.effects), key=lambda p: p.technique)

    def __call__(self, batch: Batch, *args: object, **kwargs: object) -> object:
        module = self.pl_module
        trainer = trainer_of(module)
        batch_idx = args[0] if args else kwargs.get("batch_idx", 0)
        if trainer is not None:
            self._hook_optimizers(trainer)
        for p in self.doing(Effect.SELECT_BATCH):
            batch = p.select_batch(trainer, module, batch, batch_idx)
        seen: dict[int, StepRecord] = {}
        with contextlib.ExitStack() as recording:
            for p in self.doing(Effect.WATCH_STEP):
                seen[id(p)] = recording.enter_context(record_calls(*p.watched_modules(module)))
            self.active = True
            try:
                output = type(module).training_step(module, batch, *args, **kwargs)
            finally:
                self.active = False
        if output is None:  # the user skipped this batch
            return output
        loss = output["loss"] if isinstance(output, Mapping) else output
        for p in self.doing(Effect.SCALE_LOSS):
            loss = p.scale_loss(trainer, module, loss, batch, batch_idx)
        for p in self.doing(Effect.ADD_LOSS):
            term = p.loss_term(trainer, module, batch, batch_idx, seen.get(id(p)))
            if term is not None:
                loss = loss + term
        return {**output, "loss": loss} if isinstance(output, Mapping) else loss

    # --- optimizer post-step hooks ------------------------------------------------------------------
    def _hook_optimizers(self, trainer: pl.Trainer) -> None:
        if not self.doing(Effect.AFTER_OPTIMIZER_STEP):
            return
        for opt in trainer.optimizers:
            if opt not in self.hooked:
                self.hooked[opt] = opt.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        trainer = trainer_of(self.pl_module)
        for p in self.doing(Effect.AFTER_OPTIMIZER_STEP):
            p.after_optimizer_step(trainer, self.pl_module, optimizer)

    # --- the batch-start hook ---------------------------------------------------------------------
    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> int | None:
        trainer = trainer_of(self.pl_module)
        changed = [p.restructure_now(trainer, self.pl_module) for p in self.doing(Effect.RESTRUCTURE_MID_FIT)]
        if any(changed) and trainer.optimizers:
            rebuild_optimizers(trainer, self.pl_module)
        return type(self.pl_module).on_train_batch_start(self.pl_module, batch, batch_idx)

    # --- the checkpoint pre-load hook -------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, object]) -> None:
        states = checkpoint.get("callbacks", {})
        for p in self.doing(Effect.RESTRUCTURE):
            p.before_weights_load(self.pl_module, states.get(p.state_key) or {})
        type(self.pl_module).on_load_checkpoint(self.pl_module, checkpoint)

    def close(self) -> None:
        for handle in list(self.hooked.values()):
            handle.remove()
        self.hooked = weakref.WeakKeyDictionary()


def attach(pl_module: pl.LightningModule, participant: Technique) -> None:
    """Make ``participant`` act in every training step of ``pl_module`` (as its effects declare)."""
    if not participant.effects & STEP_EFFECTS:
        return
    if participant.effects & LOSS_EFFECTS and not pl_module.automatic_optimization:
        raise RuntimeError(
            f"{type(participant).__name__} changes the loss training_step returns, which needs automatic "
            "optimization; this module sets automatic_optimization=False"
        )
    interceptor = pl_module.__dict__.get(_ATTR)
    if interceptor is None:
        interceptor = _Interceptor(pl_module)
        pl_module.__dict__[_ATTR] = interceptor
        pl_module.__dict__["training_step"] = interceptor
        pl_module.__dict__["on_load_checkpoint"] = interceptor.on_load_checkpoint
        pl_module.__dict__["on_train_batch_start"] = interceptor.on_train_batch_start
    if participant not in interceptor.participants:
        selectors = interceptor.doing(Effect.SELECT_BATCH)
        if Effect.SELECT_BATCH in participant.effects and selectors:
            raise RuntimeError(
                f"{type(participant).__name__} and {type(selectors[0]).__name__} both select the "
                "batch of each step; use one"
            )
        interceptor.participants.append(participant)


def detach(pl_module: pl.LightningModule, participant: Technique) -> None:
    """Remove ``participant``; restore the module's own methods when none is left."""
    interceptor = pl_module.__dict__.get(_ATTR)
    if interceptor is None:
        return
    if participant in interceptor.participants:
        interceptor.participants.remove(participant)
    if not interceptor.participants:
        interceptor.close()
        del pl_module.__dict__[_ATTR]
        for name in ("training_step", "on_load_checkpoint", "on_train_batch_start"):
            pl_module.__dict__.pop(name, None)


def in_training_step(pl_module: torch.nn.Module) -> bool:
    """True while the user's ``training_step`` runs inside the wrapper (for forward hooks)."""
    interceptor = pl_module.__dict__.get(_ATTR)
    return bool(interceptor and interceptor.active)


class InTrainingStep:
    """``when`` for forward hooks that must see only the user's step (picklable, unlike a lambda)."""

    def __init__(self, pl_module: torch.nn.Module):
        self.pl_module = pl_module

    def __call__(self) -> bool:
        return in_training_step(self.pl_module)
