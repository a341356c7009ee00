"""The few things the callback does to a running Trainer (kept apart from the pure-torch modules)."""
from __future__ import annotations

import copy

import lightning.pytorch as pl
from torch.nn.parallel import DistributedDataParallel


def rebuild_optimizers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """torch-pruning replaced parameters: build the optimizers again (keeping the learning-rate
    schedule and the state of untouched parameters) and re-wrap DDP, or pruned layers stop training."""
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
