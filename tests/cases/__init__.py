"""The registry of callbacks for the generic suite (tests/test_generic.py), as in Composer.

Each technique adds a module here defining ``CASES = [Case(...), ...]``; ``all_cases()``
collects them. Everything a Case builds must be picklable (ddp_spawn) and deterministic.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl

from lightning_slim.demos.data import MNIST1DDataModule
from lightning_slim.demos.models import MNIST1DCNN


def small_data(**kwargs) -> MNIST1DDataModule:
    """800 training / 200 test examples: 8 steps an epoch at batch 100."""
    kwargs.setdefault("num_samples", 1000)
    kwargs.setdefault("batch_size", 100)
    return MNIST1DDataModule(**kwargs)


def small_model(**kwargs) -> pl.LightningModule:
    kwargs.setdefault("channels", 16)
    return MNIST1DCNN(**kwargs)


@dataclass
class Case:
    name: str  # also the LightningCLI config: callbacks/<name>.yaml, unless `config` names another file
    callback: Callable[[], pl.Callback]
    model: Callable[[], pl.LightningModule] = small_model
    data: Callable[[], pl.LightningDataModule] = small_data
    epochs: int = 3
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    # slim/ keys a user must find in the W&B run (history or summary)
    wandb_keys: tuple[str, ...] = ()
    # behaviour that must hold after a short fit: check(trainer, module, callback)
    check: Callable[[pl.Trainer, pl.LightningModule, pl.Callback], None] | None = None
    # behaviour of the module that must hold after a 2-process ddp_spawn fit: check_module(module)
    check_module: Callable[[pl.LightningModule], None] | None = None
    # extra LightningCLI arguments (model/data) for the YAML round trip
    cli_args: tuple[str, ...] = ()
    # load the module's weights from a checkpoint into a fresh model (structural pruning overrides)
    resume_atol: float = 0.0
    # the LightningCLI YAML of a technique that does not ship with the package (default callbacks/<name>.yaml)
    config: str | None = None

    def __repr__(self) -> str:
        return self.name


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        cases += importlib.import_module(f"{__name__}.{info.name}").CASES
    return cases


class CleanDistributedExit(pl.Callback):
    """Test-only: end a ``ddp_spawn`` fit with both ranks destroying the process group together.

    Otherwise each spawned rank tears gloo down from Lightning's ``atexit`` hook on its own, and
    now and then one aborts at interpreter exit ("terminate called without an active
    exception", SIGABRT) after training has finished. That is a platform flake, not the code
    under test; we remove it rather than retry around it.
    """

    def teardown(self, trainer, pl_module, stage):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
