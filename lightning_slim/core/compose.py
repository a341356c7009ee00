"""How techniques compose in one Trainer: the checks that run before training, all driven by
what each technique declares (:mod:`lightning_slim.core.contract`), none by technique names.

The order of effects in a step is :data:`~lightning_slim.core.contract.STEP_ORDER`, not the order
of the callback list; the export chain runs in :func:`~lightning_slim.core.contract.export_chain`
order. With the techniques of this package (:func:`describe_effects` prints this table for any
list of callbacks):

1. at the batch's start ``IterativeMagnitudePruning`` (and any technique doing the same) restructures the
   model when one of their events is due (the optimizers are rebuilt after);
2. ``OnlineDataSelection`` selects the sub-batch;
3. the user's ``training_step`` runs on it (fake-quantized layers once QAT is active; pruned
   weights exactly zero), ``KnowledgeDistillation``'s student calls recorded;
4. ``KnowledgeDistillation`` rescales the user's loss by ``1 - alpha`` and adds its term;
5. after each optimizer step ``IterativeMagnitudePruning`` re-applies its masks;
6. at export: masks made permanent, distillation's projections removed, int8 conversion.

Refused before training: two techniques of one kind; a sharded strategy other than FSDP2 through
``ModelParallelStrategy``, or one whose technique declares it cannot train sharded parameters
(``sharded_refusal``, also for a resume); a technique whose
``requires()`` no other one ``provides()``; a technique that restructures the model
(``restructures_until``) at or after the moment another needs its structure fixed
(``structure_fixed_from``: channel pruning after fake quantization starts hung in torch-pruning).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.pytorch.strategies import Strategy
from torch import nn

from lightning_slim.core import sharding
from lightning_slim.core.contract import STEP_ORDER, Capability, Effect, ExportStage, Technique, export_chain
from lightning_slim.core.lightning_glue import sharded_strategy


class IncompatibleCallbacksError(ValueError):
    """Two lightning-slim callbacks were combined in a way that cannot work."""


class UnsupportedStrategyError(ValueError):
    """The Trainer's strategy is one the techniques do not support (yet)."""


SUPPORTED_STRATEGIES = "single-device, DDP (strategy='ddp' or 'ddp_spawn')"
SHARDED_STRATEGY = "ModelParallelStrategy (FSDP2: fully_shard in configure_model, tensor_parallel_size=1)"
SHARDED_SUPPORT = (
    "IterativeMagnitudePruning with unstructured or N:M magnitude pruning (any rewind; Wanda importance too) and "
    "KnowledgeDistillation (logits, features, cache_teacher by dataset index; the teacher replicated or "
    "sharded), OnlineDataSelection (also with a reference "
    "nn.Module or teacher, reference_losses, cache_reference or joint=True), "
    "QuantizationAwareTraining (either runtime, BatchNorms folded, frozen ranges, export_path), "
    "low-rank factorization in setup (at=0) and CompressionReport work"
)


def techniques(trainer: pl.Trainer) -> list[Technique]:
    """The Trainer's techniques, in the order of its callback list."""
    return [cb for cb in trainer.callbacks if isinstance(cb, Technique)]


def deployable_copy(trainer: pl.Trainer, pl_module: pl.LightningModule, before: ExportStage | None = None) -> nn.Module:
    """A CPU copy of the trained module passed through every technique's ``export``, in the order
    of :func:`~lightning_slim.core.contract.export_chain` (only the stages ahead of ``before``)."""
    model = copy.deepcopy(pl_module).cpu().eval()
    for cb in export_chain(techniques(trainer), before):
        model = cb.export(model)
    return model


def whole_module(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module | None:
    """The trained module, whole, to pass to :func:`deployable_copy`: itself when unsharded; under FSDP2 an
    unsharded CPU copy on rank 0 from the full state dict (None on the other ranks), after every technique
    gathered what its export reads. A collective when sharded: every rank calls it at the same point
    (``on_fit_end``; not ``on_train_end`` or ``teardown``, see docs/sharded.md)."""
    if sharding.any_sharded(pl_module.parameters()):
        for cb in techniques(trainer):
            cb.gather_for_export()
    return sharding.unsharded_copy(pl_module)


def capability(trainer: pl.Trainer, what: Capability, asker: Technique | None = None) -> object | None:
    """What another technique in the Trainer provides as ``what`` (None if nobody does)."""
    for cb in techniques(trainer):
        if cb is not asker and what in cb.provides():
            return cb.provides()[what]
    return None


def check_combination(trainer: pl.Trainer) -> None:
    """Raise before training for combinations and strategies that cannot work."""
    slim = techniques(trainer)
    if sharded_strategy(trainer.strategy) is not None:
        check_sharded(trainer.strategy, slim, trainer.ckpt_path)
    twice = [t for t, n in Counter(cb.technique for cb in slim).items() if n > 1]
    if twice:
        names = [type(c).__name__ for c in slim if c.technique == twice[0]]
        raise IncompatibleCallbacksError(
            f"more than one {twice[0]!r} callback in one Trainer ({names}); they would "
            "fight over the same model: use one, with a schedule that covers both needs"
        )
    selectors = [type(c).__name__ for c in slim if Effect.SELECT_BATCH in c.effects]
    if len(selectors) > 1:
        raise IncompatibleCallbacksError(f"{selectors} all select the batch of each step; use one")
    for cb in slim:
        for need in cb.requires():
            if capability(trainer, need, asker=cb) is None:
                raise IncompatibleCallbacksError(
                    f"{type(cb).__name__} needs a {need.value!r} that another callback provides (e.g. "
                    "KnowledgeDistillation provides its teacher); none in this Trainer does"
                )
    for a in slim:
        until = a.restructures_until()
        for b in slim:
            fixed = b.structure_fixed_from()
            if a is b or until is None or fixed is None or until.before(fixed):
                continue
            hint = (
                f"e.g. start it at {until.unit} {until.value + 1}"
                if until.unit == fixed.unit
                else f"give both schedules the same unit ({until.unit!r})"
            )
            raise IncompatibleCallbacksError(
                f"{type(a).__name__} changes the model's structure until {until}, but {type(b).__name__} needs it "
                f"fixed from {fixed}: every restructuring must come before that, in the same unit; {hint}"
            )


def check_sharded(strategy_object: Strategy, slim: list[Technique], ckpt_path: str | None = None) -> None:
    """Sharded strategies: FSDP2 through ``ModelParallelStrategy`` for the techniques (as configured)
    that declare they work on sharded parameters, and resume, as configured (``sharded_refusal() is None``)."""
    strategy = sharded_strategy(strategy_object)
    if strategy is None or not slim:
        return
    names = [type(c).__name__ for c in slim]
    if strategy != "ModelParallelStrategy":
        raise UnsupportedStrategyError(
            f"{strategy} is not supported by {names}; for sharded training use {SHARDED_STRATEGY} "
            f"(docs/sharded.md), otherwise {SUPPORTED_STRATEGIES}"
        )
    resuming = ckpt_path is not None
    refused = {type(c).__name__: why for c in slim if (why := c.sharded_refusal(resuming)) is not None}
    if refused:
        lines = "; ".join(f"{name}: {why}" for name, why in refused.items())
        raise UnsupportedStrategyError(
            f"{strategy} shards the model across ranks, and {lines}. Under {SHARDED_STRATEGY} (docs/sharded.md): "
            f"{SHARDED_SUPPORT}; otherwise {SUPPORTED_STRATEGIES}"
        )


def describe_effects(callbacks: Iterable[object]) -> list[tuple[str, str]]:
    """``(effect, technique)`` rows in the order they act: set-up, a step, then export.

    >>> from lightning_slim import IterativeMagnitudePruning
    >>> describe_effects([IterativeMagnitudePruning()])  # doctest: +NORMALIZE_WHITESPACE
    [('before_weights_load', 'pruning'), ('restructure_now', 'pruning'), ('after_optimizer_step', 'pruning'),
     ('export: FINALIZE_WEIGHTS', 'pruning')]
    """
    slim = sorted((c for c in callbacks if isinstance(c, Technique)), key=lambda c: c.technique)
    setup = [Effect.BASELINE, Effect.SWAP_MODULES, Effect.ADD_MODULES, Effect.RESTRUCTURE]
    rows = [(e.value, c.technique) for e in (*setup, *STEP_ORDER) for c in slim if e in c.effects]
    return rows + [(f"export: {c.export_stage.name}", c.technique) for c in export_chain(slim)]
