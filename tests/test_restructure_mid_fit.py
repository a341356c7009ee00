"""``Effect.RESTRUCTURE_MID_FIT``: a technique that changes the model mid-fit declares it and implements
``restructure_now``; the machinery runs it at each batch start and rebuilds the optimizers, so the new
parameters train. It is the one path: pruning and factorization declare it, and nothing else in the
package rebuilds optimizers."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cases import small_data, small_model

import lightning_slim
from lightning_slim import IterativeMagnitudePruning, LowRankFactorization
from lightning_slim.core.callback import SlimCallback
from lightning_slim.core.contract import Effect


class CopyFirstLayer(SlimCallback):
    """Replaces ``net.0`` by a copy (new parameter objects, same values) at step 2."""

    technique = "test_restructure"
    effects = frozenset({Effect.RESTRUCTURE_MID_FIT})

    def __init__(self):
        self.replaced: torch.nn.Module | None = None
        self.at_replacement: torch.Tensor | None = None

    def restructure_now(self, trainer, pl_module) -> bool:
        if trainer.global_step != 2 or self.replaced is not None:
            return False
        self.replaced = copy.deepcopy(pl_module.net[0])
        self.at_replacement = self.replaced.weight.detach().clone()
        pl_module.net[0] = self.replaced
        return True


def optimized(trainer: pl.Trainer) -> set[int]:
    return {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}


def fit(model, callbacks, tmp_path, batches: int = 4) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=small_data())
    return trainer


def test_a_declared_restructuring_gets_rebuilt_optimizers_and_its_parameters_train(tmp_path):
    pl.seed_everything(0)
    model, cb = small_model(), CopyFirstLayer()
    old = model.net[0]
    trainer = fit(model, [cb], tmp_path)
    assert model.net[0] is cb.replaced
    assert optimized(trainer) == {id(p) for p in model.parameters()}  # the copy in, the old layer out
    assert not {id(p) for p in old.parameters()} & optimized(trainer)
    # steps 2 and 3 moved the copy's weights (a layer outside the optimizer would keep them bit for bit)
    assert not torch.equal(cb.replaced.weight.detach(), cb.at_replacement)


def test_pruning_and_factorization_declare_it():
    with pytest.raises(TypeError, match="implements restructure_now\\(\\) but does not declare"):
        type("Sneaky", (SlimCallback,), {"restructure_now": lambda self, t, m: True})
    for technique in (IterativeMagnitudePruning, LowRankFactorization):
        assert Effect.RESTRUCTURE_MID_FIT in technique.effects


def test_nothing_but_the_machinery_rebuilds_optimizers():
    """Every technique that changes the model mid-fit does so through the contract: the only call of
    ``rebuild_optimizers`` in the package is the machinery's."""
    package = Path(lightning_slim.__file__).parent
    callers = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "rebuild_optimizers" in (text := path.read_text(encoding="utf-8"))  # parse only those that name it
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) == "rebuild_optimizers"
    )
    assert callers == ["core/interception.py"], callers


def test_structural_pruning_restructures_through_the_contract(tmp_path):
    """Channels go at step 1: the optimizer the next steps use holds the pruned model's parameters."""
    pl.seed_everything(0)
    model = small_model()
    pruning = IterativeMagnitudePruning(
        {"kind": "one_shot", "sparsity": 0.5, "at": 1, "unit": "step"},
        pattern="channels",
        targets=["Conv1d"],
        scope="layer",
    )
    trainer = fit(model, [pruning], tmp_path, batches=3)
    assert model.net[0].out_channels == 8 and pruning.round == 1
    assert optimized(trainer) == {id(p) for p in model.parameters()}
