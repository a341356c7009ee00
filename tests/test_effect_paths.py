"""Each declared effect is the one path by which a technique changes the model's structure.

Every module or parameter registered on the user's model during a fit must happen inside the
method of an effect its technique declares (``prepare_model`` / ``restore_model`` for
``SWAP_MODULES``, ``before_weights_load`` for ``RESTRUCTURE``, ...), never in a raw Lightning hook,
so docs/architecture.md's table of effects is what the code does. Global registration hooks see
every ``setattr`` of a module or parameter; the stack says which technique method was running.
"""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import pytest
from cases import Case, all_cases
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from lightning_slim import IterativeMagnitudePruning
from lightning_slim.core.contract import Effect, Technique

EFFECT_METHODS = {m: e for e in Effect for m in e.methods}


def channel_pruning() -> IterativeMagnitudePruning:
    """Structural pruning removes channels mid-fit (the generic cases prune weights only)."""
    return IterativeMagnitudePruning(
        {"kind": "one_shot", "sparsity": 0.5, "at": 1, "unit": "step"}, pattern="channels", targets=["Conv1d"]
    )


CASES = [*all_cases(), Case("pruning_channels", channel_pruning, epochs=1, trainer_kwargs={"limit_train_batches": 3})]


def technique_frames() -> list[tuple[Technique, str]]:
    """``(technique, method)`` of every frame on the stack running a method of a Technique."""
    found = []
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Technique):
            found.append((owner, frame.f_code.co_name))
        frame = frame.f_back
    return found


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_structure_changes_only_through_declared_effects(case, tmp_path):
    module = case.model()
    changes: list[str] = []
    declared_changes: list[tuple[str, str]] = []

    def registered(parent, name, value):
        if value is None or not any(parent is m for m in module.modules()):
            return None  # a copy (export, the report's baseline) or an unrelated model
        frames = technique_frames()
        declared = [
            (type(t).__name__, method)
            for t, method in frames
            if method in EFFECT_METHODS and EFFECT_METHODS[method] in t.effects
        ]
        if frames and not declared:  # a technique changed the model outside its declared effects
            changes.append(f"{type(frames[-1][0]).__name__}: {[m for _, m in frames]} set {name!r}")
        declared_changes.extend(declared[-1:])
        return None

    handles = [
        register_module_module_registration_hook(registered),
        register_module_parameter_registration_hook(registered),
    ]
    try:
        trainer = pl.Trainer(
            max_epochs=case.epochs,
            callbacks=[case.callback()],
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            **case.trainer_kwargs,
        )
        trainer.fit(module, datamodule=case.data())
    finally:
        for h in handles:
            h.remove()
    assert not changes, changes
    methods = {method for _, method in declared_changes}
    if case.name == "pruning_channels":  # the hooks saw a real restructuring, inside restructure_now
        assert module.net[0].out_channels < 16 and "restructure_now" in methods, methods
    if case.name.startswith("factorization"):
        assert "restructure_now" in methods, methods
