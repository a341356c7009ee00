"""The accuracy-vs-sparsity curve ``IterativeMagnitudePruning`` records at each round boundary and at
the end of training: rows ``[round, sparsity, accuracy, step]``, the accuracy read from a logged
metric. A metric that is never logged (``val_acc`` logged where ``val/acc`` is expected) would make
every accuracy NaN; it is warned once, with the metrics that were logged (an info line when the
training never validated)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_slim.core import log


class MissingMetricWarning(UserWarning):
    """A metric a callback reads (``accuracy_metric``) was not among the logged metrics."""


class AccuracyCurve:
    """Rows ``[round, sparsity, accuracy or None, step]`` (saved in checkpoints as plain lists)."""

    KEY = "slim/pruning/accuracy_vs_sparsity"

    def __init__(self, metric: str | None):
        self.metric = metric
        self.rows: list[list] = []
        self._said = False

    def record(self, trainer: pl.Trainer, round_: int, sparsity: float, final: bool = False) -> None:
        self.rows.append([round_, sparsity, self.read(trainer, final), trainer.global_step])

    def read(self, trainer: pl.Trainer, final: bool = False) -> float | None:
        """The metric's current value, or None. Missing although validation logged other ``val`` metrics,
        or at the end of a training that validated, the name is wrong: warned once. Missing at the end of
        a training that never validated: said once in an info line (the curve has no accuracy)."""
        if not self.metric:
            return None
        metrics: Mapping[str, Any] = trainer.callback_metrics
        value = metrics.get(self.metric)
        if value is not None:
            return float(value)
        validating = sum(trainer.num_val_batches or [0]) > 0
        validated = any(k.startswith("val") for k in metrics) or (final and validating)
        if not self._said and (validated or final):
            self._said = True
            message = (
                f"IterativeMagnitudePruning: accuracy_metric={self.metric!r} was not logged, so the "
                f"accuracy-vs-sparsity curve has no accuracy; logged metrics are {sorted(metrics)}. "
                "Pass the name your module logs (e.g. accuracy_metric='val_acc'), or accuracy_metric=None"
            )
            if validated:
                rank_zero_warn(message, category=MissingMetricWarning)
            else:
                rank_zero_info(f"{message} (no validation ran)")
        return None

    def log(self, trainer: pl.Trainer) -> None:
        rows = [[r, s, float("nan") if a is None else a, st] for r, s, a, st in self.rows]
        log.log_line_plot(
            trainer,
            self.KEY,
            ["round", "sparsity", "accuracy", "step"],
            rows,
            x="sparsity",
            y="accuracy",
            title="accuracy vs sparsity over pruning rounds",
        )
