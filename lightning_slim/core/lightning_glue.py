"""Every use of Lightning beyond its public callback API, in one place.

Lightning has no public way to do these; each is used where it is the only way, and the
tests run against the Lightning version the package declares as its lowest:

- ``module._trainer``: the trainer of a module, or None outside a fit (the public property raises);
- ``trainer.fit_loop._data_source``: the dataloader given to ``fit`` when there is no datamodule;
- ``trainer._logger_connector.should_update_logs``: whether this step reaches the loggers;
- ``strategy.setup_optimizers`` / ``configure_ddp``: rebuild optimizers (and re-wrap DDP) after
  parameters were replaced, or the replaced layers silently stop training;
- the sharded strategies: which one a Trainer runs (FSDP2 through ``ModelParallelStrategy`` is supported),
  and the data-parallel mesh it shards over.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import Strategy
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def trainer_of(module: pl.LightningModule) -> pl.Trainer | None:
    return module._trainer


def train_loader(trainer: pl.Trainer) -> Any | None:
    """The train DataLoader the fit will use, built but not iterated (None if unavailable)."""
    try:
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader()
        source = trainer.fit_loop._data_source  # the loader or module given to fit()
        return source.dataloader() if source.is_defined() else None
    except Exception:
        return None


def should_log(trainer: pl.Trainer) -> bool:
    """Lightning's own decision (``log_every_n_steps``): log only what loggers will receive."""
    try:
        return bool(trainer._logger_connector.should_update_logs)
    except AttributeError:
        return True


def sharded_strategy(strategy: Strategy) -> str | None:
    """The name of a sharded strategy (FSDP, DeepSpeed, model parallel), else None (by class name:
    DeepSpeed's module imports deepspeed)."""
    names = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
    for cls in type(strategy).__mro__:
        if cls.__name__ in names:
            return cls.__name__
    return None


def data_parallel_mesh(strategy: Strategy) -> DeviceMesh | None:
    """The mesh FSDP2 shards over under ``ModelParallelStrategy`` (its data-parallel dimension), else None."""
    if sharded_strategy(strategy) != "ModelParallelStrategy":
        return None
    return strategy.device_mesh["data_parallel"]


def rebuild_optimizers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Parameters were replaced (torch-pruning): build the optimizers again, keeping their
    hyper-parameters, the learning-rate schedule and the state of untouched parameters, and
    re-wrap DDP."""
    old_opts = trainer.optimizers
    old_scheds = [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs]
    trainer.strategy.setup_optimizers(trainer)
    for old, new in zip(old_opts, trainer.optimizers):
        for g_old, g_new in zip(old.param_groups, new.param_groups):
            g_new.update({k: v for k, v in g_old.items() if k != "params"})
            for p_old, p_new in zip(g_old["params"], g_new["params"]):
                if p_old is p_new and p_old in old.state:  # unpruned parameter: keep its moments
                    new.state[p_new] = old.state[p_old]
    for config, state in zip(trainer.lr_scheduler_configs, old_scheds):
        config.scheduler.load_state_dict(state)
    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel):
        strategy.model = pl_module
        strategy.configure_ddp()
