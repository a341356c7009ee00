"""Logging shared by every callback (every key is listed in ``docs/logging.md``).

- **Scalars** that change during training are ``slim/<technique>/<metric>`` and go through
  ``pl_module.log``, so every logger, ``EarlyStopping`` and ``ModelCheckpoint`` see them.
- **Settings** that stay fixed for a run (bit widths, a constant KD weight) are run config, not
  metrics: :func:`log_config` sends each one to every logger's ``log_hyperparams`` once per run.
- **Tables, plots, histograms, the summary and artifacts** go to Weights & Biases only when a
  ``WandbLogger`` is attached (with the trainer's step); without one, one warning per run. W&B
  stores every logged table as a new artifact version, so a table is logged once per run, at
  the end; logging the same key again warns. Summary values that are empty (None, ``""``, NaN, an
  empty container) are left out. We never call the global ``wandb.log``.
- **Warnings** that would repeat every step or every call are shown once per run
  (:func:`warn_once`).
- **Metrics the user names** (``accuracy_metric="val/acc"``): :func:`read_metric` reads one and,
  where it must exist, warns once per run if it was never logged, naming what is logged and the
  closest name.

"Per run" means per ``Trainer``: the state is kept beside each trainer and goes with it.
"""

from __future__ import annotations

import difflib
import math
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn


class NoWandbLoggerWarning(UserWarning):
    """W&B-only output (tables, histograms, artifacts) was skipped: no WandbLogger is attached."""


class MetricNotLoggedWarning(UserWarning):
    """A metric a callback was told to read (``accuracy_metric``...) was never logged in this run."""


@dataclass
class _Run:
    warned: set[str] = field(default_factory=set)
    config: dict[str, Any] = field(default_factory=dict)
    tables: set[str] = field(default_factory=set)
    found: set[str] = field(default_factory=set)  # user-named metrics read at least once


_runs: weakref.WeakKeyDictionary[pl.Trainer, _Run] = weakref.WeakKeyDictionary()


def _run(trainer: pl.Trainer) -> _Run:
    if trainer not in _runs:
        _runs[trainer] = _Run()
    return _runs[trainer]


def metric_key(technique: str, name: str) -> str:
    return f"slim/{technique}/{name}"


def warn_once(trainer: pl.Trainer, key: str, message: str, category: type[Warning] = UserWarning) -> None:
    """``rank_zero_warn(message)`` the first time ``key`` is warned about in this run only."""
    seen = _run(trainer).warned
    if key not in seen:
        seen.add(key)
        rank_zero_warn(message, category=category)


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


def log_config(trainer: pl.Trainer, technique: str, values: Mapping[str, Any]) -> None:
    """Settings of this run (``slim/<technique>/<name>``) as run config, through every logger's
    ``log_hyperparams``: sent the first time each is seen in a run (and again only if it changes),
    so it may be called from a hook that runs every step. A value that is scheduled (an annealed
    KD weight) is a metric instead: log it with :func:`log_scalars`."""
    state = _run(trainer)
    new = {}
    for name, value in values.items():
        value = value.item() if isinstance(value, torch.Tensor) else value
        key = metric_key(technique, name)
        if key not in state.config or state.config[key] != value:
            state.config[key] = new[key] = value
    if new and trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_hyperparams(new)


def read_metric(trainer: pl.Trainer, name: str | None, user: str, must_exist: bool = False) -> float | None:
    """The current value of a metric the module logs (``trainer.callback_metrics[name]``), or None.

    ``user`` names who reads it (``"CompressionReport(accuracy_metric='val/acc')"``). With
    ``must_exist`` (the end of training: it will not come later), a metric that was never found
    in this run warns once, with the metrics that are logged and the closest name::

        value = log.read_metric(trainer, self.accuracy_metric, "MyCallback(accuracy_metric=...)",
                                must_exist=True)
    """
    if not name:
        return None
    state, metrics = _run(trainer), trainer.callback_metrics
    value = metrics.get(name)
    if value is not None:
        state.found.add(name)
        return float(value)
    if must_exist and name not in state.found:
        logged = sorted(metrics)
        close = difflib.get_close_matches(
            name, logged, n=1, cutoff=0.8
        )  # val_acc for val/acc; not train/loss for val/loss
        warn_once(
            trainer,
            f"metric:{user}:{name}",
            f"{user}: {name!r} was never logged; logged metrics are {logged}"
            + (f" (did you mean {close[0]!r}?)" if close else ""),
            MetricNotLoggedWarning,
        )
    return None


def wandb_logger(trainer: pl.Trainer) -> Any | None:
    """The attached ``WandbLogger``, or None after warning (once per run) that W&B output is skipped."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":  # no wandb import unless one is attached
            return logger
    warn_once(
        trainer,
        "no-wandb",
        "lightning-slim: no WandbLogger attached, so W&B-only output (tables, plots, histograms, the run "
        "summary, artifacts) is skipped; scalars still reach every logger",
        NoWandbLoggerWarning,
    )
    return None


def _table_logger(trainer: pl.Trainer, key: str) -> Any | None:
    logged = _run(trainer).tables
    if key in logged:
        warn_once(
            trainer,
            f"table-again:{key}",
            f"lightning-slim: the W&B table {key!r} was logged again in this run; W&B keeps every log as a "
            "new artifact version: log a table once, at the end of fit",
        )
    logged.add(key)
    return wandb_logger(trainer)


@rank_zero_only
def log_table(trainer: pl.Trainer, key: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> None:
    """A W&B table (once per run: at the end of fit)."""
    logger = _table_logger(trainer, key)
    if logger is not None:
        logger.log_table(key=key, columns=columns, data=[list(r) for r in rows], step=trainer.global_step)


@rank_zero_only
def log_histogram(trainer: pl.Trainer, key: str, values: torch.Tensor) -> None:
    logger = wandb_logger(trainer)
    if logger is not None:
        import wandb

        values = values.detach().float().cpu().flatten().numpy()
        logger.log_metrics({key: wandb.Histogram(values)}, step=trainer.global_step)


@rank_zero_only
def log_line_plot(
    trainer: pl.Trainer, key: str, columns: list[str], rows: Iterable[Iterable[Any]], x: str, y: str, title: str
) -> None:
    """A W&B table plus a line plot of ``y`` against ``x`` drawn from it (once per run: at the end of fit)."""
    logger = _table_logger(trainer, key)
    if logger is not None:
        import wandb

        table = wandb.Table(columns=columns, data=[list(r) for r in rows])
        plot = wandb.plot.line(table, x, y, title=title)
        logger.log_metrics({key: table, f"{key}_plot": plot}, step=trainer.global_step)


def is_empty(value: Any) -> bool:
    """None, ``""``, NaN or an empty container: nothing to show."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, (str, Mapping, list, tuple, set)) and not value


@rank_zero_only
def set_summary(trainer: pl.Trainer, values: Mapping[str, Any]) -> None:
    """Values for the W&B run summary; empty ones (:func:`is_empty`) are left out."""
    logger = wandb_logger(trainer)
    if logger is not None:
        for k, v in values.items():
            if not is_empty(v):
                logger.experiment.summary[k] = v


@rank_zero_only
def log_artifact(
    trainer: pl.Trainer, path: str, name: str, kind: str = "model", metadata: Mapping[str, Any] | None = None
) -> None:
    logger = wandb_logger(trainer)
    if logger is not None:
        import wandb

        artifact = wandb.Artifact(name=name, type=kind, metadata=dict(metadata or {}))
        artifact.add_file(str(path))
        logger.experiment.log_artifact(artifact)
