"""Logging shared by every callback.

Scalars are ``slim/<technique>/<metric>`` and go through ``pl_module.log`` so every logger,
``EarlyStopping`` and ``ModelCheckpoint`` see them. Tables, histograms, summaries and
artifacts go to Weights & Biases only when a ``WandbLogger`` is attached (with the trainer's
step); without one we warn once and carry on. We never call the global ``wandb.log``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

_warned: set[str] = set()


class NoWandbLoggerWarning(UserWarning):
    """W&B-only output (tables, histograms, artifacts) was skipped: no WandbLogger is attached."""


def metric_key(technique: str, name: str) -> str:
    return f"slim/{technique}/{name}"


def log_scalars(pl_module: pl.LightningModule, technique: str, values: Mapping[str, Any], **kwargs) -> None:
    """``pl_module.log`` each value as ``slim/<technique>/<name>`` (in hooks where logging is allowed)."""
    kwargs.setdefault("on_step", True)
    kwargs.setdefault("on_epoch", False)
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
        pl_module.log(metric_key(technique, name), value, **kwargs)


@rank_zero_only
def log_metrics_now(trainer: pl.Trainer, technique: str, values: Mapping[str, float]) -> None:
    """Send scalars straight to every logger, for hooks where ``pl_module.log`` is not allowed
    (``on_fit_start``, ``on_train_end``, ``on_fit_end``...)."""
    metrics = {metric_key(technique, k): float(v) for k, v in values.items()}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def wandb_logger(trainer: pl.Trainer, purpose: str = "") -> Any | None:
    """The attached ``WandbLogger``, or None after warning once that ``purpose`` is skipped."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":  # no wandb import unless one is attached
            return logger
    key = purpose or "wandb"
    if key not in _warned:
        _warned.add(key)
        rank_zero_warn(
            f"lightning-slim: no WandbLogger attached; skipping {purpose or 'W&B-only logging'}"
            " (scalars still reach every logger)",
            category=NoWandbLoggerWarning,
        )
    return None


@rank_zero_only
def log_table(trainer: pl.Trainer, key: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> None:
    logger = wandb_logger(trainer, f"W&B table {key}")
    if logger is not None:
        logger.log_table(key=key, columns=columns, data=[list(r) for r in rows], step=trainer.global_step)


@rank_zero_only
def log_histogram(trainer: pl.Trainer, key: str, values: torch.Tensor) -> None:
    logger = wandb_logger(trainer, f"W&B histogram {key}")
    if logger is not None:
        import wandb

        values = values.detach().float().cpu().flatten().numpy()
        logger.log_metrics({key: wandb.Histogram(values)}, step=trainer.global_step)


@rank_zero_only
def log_line_plot(
    trainer: pl.Trainer, key: str, columns: list[str], rows: Iterable[Iterable[Any]], x: str, y: str, title: str
) -> None:
    """A W&B table plus a line plot of ``y`` against ``x`` drawn from it."""
    logger = wandb_logger(trainer, f"W&B plot {key}")
    if logger is not None:
        import wandb

        table = wandb.Table(columns=columns, data=[list(r) for r in rows])
        plot = wandb.plot.line(table, x, y, title=title)
        logger.log_metrics({key: table, f"{key}_plot": plot}, step=trainer.global_step)


@rank_zero_only
def set_summary(trainer: pl.Trainer, values: Mapping[str, Any]) -> None:
    logger = wandb_logger(trainer, "W&B summary")
    if logger is not None:
        for k, v in values.items():
            logger.experiment.summary[k] = v


@rank_zero_only
def log_artifact(
    trainer: pl.Trainer, path: str, name: str, kind: str = "model", metadata: Mapping[str, Any] | None = None
) -> None:
    logger = wandb_logger(trainer, f"W&B artifact {name}")
    if logger is not None:
        import wandb

        artifact = wandb.Artifact(name=name, type=kind, metadata=dict(metadata or {}))
        artifact.add_file(str(path))
        logger.experiment.log_artifact(artifact)
