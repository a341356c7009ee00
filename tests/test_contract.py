"""The technique contract: declarations checked at class definition, composition driven by them,
sharded strategies refused, and no technique changing the order in which the data arrives."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from cases import all_cases
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_slim.core import compose
from lightning_slim.core.callback import SlimCallback
from lightning_slim.core.clock import Moment
from lightning_slim.core.contract import Capability, Effect, ExportStage


def test_declarations_and_methods_must_agree():
    with pytest.raises(TypeError, match="implements select_batch\\(\\) but does not declare Effect.SELECT_BATCH"):
        type("Sneaky", (SlimCallback,), {"select_batch": lambda self, *a: a[2]})
    with pytest.raises(TypeError, match="declares Effect.SWAP_MODULES but does not implement restore_model"):
        type(
            "HalfSwap",
            (SlimCallback,),
            {"effects": frozenset({Effect.SWAP_MODULES}), "prepare_model": lambda self, t, m: None},
        )
    with pytest.raises(TypeError, match="export\\(\\) and export_stage go together"):
        type("Exporter", (SlimCallback,), {"export": lambda self, m: m})
    ok = type("Ok", (SlimCallback,), {"export_stage": ExportStage.CONVERT, "export": lambda self, m: m})
    assert ok.export_stage is ExportStage.CONVERT


def test_sharded_strategies_are_refused_with_what_is_supported():
    from lightning_slim import IterativeMagnitudePruning

    def trainer(strategy, callback):
        return SimpleNamespace(strategy=strategy, callbacks=[callback], ckpt_path=None)

    with pytest.raises(compose.UnsupportedStrategyError, match="FSDPStrategy is not supported.*ModelParallelStrategy"):
        compose.check_combination(trainer(FSDPStrategy(), IterativeMagnitudePruning()))
    channels = IterativeMagnitudePruning(pattern="channels")
    with pytest.raises(compose.UnsupportedStrategyError, match="ModelParallelStrategy shards the model.*DDP"):
        compose.check_combination(trainer(ModelParallelStrategy(), channels))
    compose.check_combination(trainer(ModelParallelStrategy(), IterativeMagnitudePruning()))  # tests/sharded
    compose.check_combination(trainer(DDPStrategy(), channels))  # fine


class Restructures(SlimCallback):
    technique = "test_restructures"

    def restructures_until(self):
        return Moment("epoch", 3)


class FixesStructure(SlimCallback):
    technique = "test_fixes"

    def __init__(self, at):
        self.at = at

    def structure_fixed_from(self):
        return self.at

    def requires(self):
        return {Capability.TEACHER}


def test_constraints_come_from_declarations_not_names():
    check = lambda *cbs: compose.check_combination(SimpleNamespace(strategy=DDPStrategy(), callbacks=list(cbs)))
    teacher = type(
        "Lends",
        (SlimCallback,),
        {"technique": "test_lends", "provides": lambda self: {Capability.TEACHER: torch.nn.Linear(1, 1)}},
    )()
    check(Restructures(), FixesStructure(Moment("epoch", 4)), teacher)
    with pytest.raises(
        compose.IncompatibleCallbacksError,
        match="until epoch 3, but FixesStructure needs it fixed from epoch 3.*start it at epoch 4",
    ):
        check(Restructures(), FixesStructure(Moment("epoch", 3)), teacher)
    with pytest.raises(compose.IncompatibleCallbacksError, match="same unit"):
        check(Restructures(), FixesStructure(Moment("step", 900)), teacher)
    with pytest.raises(compose.IncompatibleCallbacksError, match="needs a 'teacher'"):
        check(FixesStructure(Moment("epoch", 9)))


class RecordYielded(pl.Callback):
    """Every batch exactly as the DataLoader yielded it (before any selection): labels and input sums."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((batch[1].tolist(), batch[0].flatten(1).sum(1).tolist()))


def _yielded(case, callbacks):
    pl.seed_everything(0)
    module = case.model()
    module.example_input_array = None  # techniques must find a sample batch without iterating the loader
    record = RecordYielded()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[*callbacks, record],
    )
    trainer.fit(module, datamodule=case.data())
    return record.batches


@pytest.mark.parametrize("case", all_cases(), ids=repr)
def test_no_technique_changes_the_order_the_data_arrives_in(case):
    assert _yielded(case, [case.callback()]) == _yielded(case, [])
