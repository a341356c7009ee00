"""A fifth technique defined entirely in the test suite: the contract is enough to add one.

``WeightClipping`` adds an L2 penalty to the loss (``ADD_LOSS``) and clamps every Linear/Conv
weight into ``[-clip, clip]`` right after each optimizer step (``AFTER_OPTIMIZER_STEP``); it keeps
a step count for exact resumes. Nothing in ``lightning_slim`` knows its name: this file and its
YAML (``weight_clipping.yaml``, next to it) are all it takes for the generic suite to train it,
resume it, run it under DDP, build it from LightningCLI and read its keys back from W&B.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from typing_extensions import override

from cases import Case
from lightning_slim.core.callback import SlimCallback
from lightning_slim.core.contract import Effect
from lightning_slim.targets import select_modules


class WeightClipping(SlimCallback):
    technique = "clipping"
    effects = frozenset({Effect.ADD_LOSS, Effect.AFTER_OPTIMIZER_STEP})

    def __init__(self, clip: float = 0.2, penalty: float = 1e-3):
        if not clip > 0:
            raise ValueError(f"clip={clip!r} must be positive")
        self.clip, self.penalty, self.clamped_steps = clip, penalty, 0
        self._weights: list[torch.nn.Parameter] = []

    @override
    def validate(self, trainer, pl_module) -> None:
        layers = select_modules(pl_module, None, default=(torch.nn.Linear, torch.nn.Conv1d), what="clipping")
        self._weights = [m.weight for m in layers.values()]

    @override
    def loss_term(self, trainer, pl_module, batch, batch_idx, seen) -> torch.Tensor:
        term = self.penalty * sum(w.pow(2).sum() for w in self._weights)
        self.log_scalars(pl_module, {"penalty": term.detach()})
        return term

    @override
    def after_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        with torch.no_grad():
            for w in self._weights:
                w.clamp_(-self.clip, self.clip)
        self.clamped_steps += 1

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"clamped_steps": self.clamped_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clamped_steps = state_dict["clamped_steps"]


def _within(module, clip=0.2):
    weights = [m.weight for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))]
    assert weights and all(float(w.detach().abs().max()) <= clip + 1e-7 for w in weights)


def _check(trainer, module, cb):
    _within(module)
    assert cb.clamped_steps == trainer.global_step > 0
    assert float(trainer.callback_metrics["slim/clipping/penalty"]) > 0


CASES = [
    Case(
        name="weight_clipping",
        callback=WeightClipping,
        check=_check,
        check_module=_within,
        config=str(Path(__file__).with_name("weight_clipping.yaml")),
        wandb_keys=("slim/clipping/penalty",),
    )
]
