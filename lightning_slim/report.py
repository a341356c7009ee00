"""CompressionReport: what the model cost before ``fit`` and what its deployable form costs after.

It measures the module as the user built it (a CPU copy taken in ``setup``, measured on the
first training batch, when a real input is known), and at ``on_fit_end`` the deployable
model: a copy of the trained module passed through every lightning-slim callback's
``export`` (masks made permanent, int8 conversion...). It reads the accuracy from the metric
the user names, evaluates the exported model on the validation data when batches are
``(x, y)`` classification, adds each technique's own rows, prints a table, logs it to W&B
(table + summary) and writes ``compression_report.json`` beside the checkpoints.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_slim import log
from lightning_slim.batches import BatchFormatError, batch_inputs, batch_targets
from lightning_slim.callback import SlimCallback
from lightning_slim.compose import techniques
from lightning_slim.contract import Effect
from lightning_slim.measure import measure

COMPARED = ("params", "nonzero_params", "size_bytes", "macs", "latency_ms")


def deployable_copy(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
    """A CPU copy of the trained module passed through every technique's ``export``, in the order
    of their :class:`~lightning_slim.contract.ExportStage`."""
    model = copy.deepcopy(pl_module).cpu().eval()
    exporters = (c for c in techniques(trainer) if c.export_stage is not None)
    for cb in sorted(exporters, key=lambda c: (c.export_stage, c.technique)):  # never the list order
        model = cb.export(model)
    return model


@torch.inference_mode()
def classification_accuracy(model: nn.Module, loader, input_fn=batch_inputs) -> float:
    correct = total = 0
    for batch in loader:
        logits = model(input_fn(batch).cpu())
        correct += int((logits.argmax(-1) == batch_targets(batch).cpu()).sum())
        total += len(logits)
    return correct / max(total, 1)


def format_table(before: dict, after: dict) -> str:
    lines = [f"{'metric':<18}{'before':>16}{'after':>16}{'ratio':>10}"]
    for key in [k for k in (*COMPARED, "accuracy") if k in before or k in after]:
        b, a = before.get(key), after.get(key)
        ratio = f"{b / a:.2f}x" if isinstance(b, (int, float)) and isinstance(a, (int, float)) and a else ""
        fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else f"{v:,}")
        lines.append(f"{key:<18}{fmt(b):>16}{fmt(a):>16}{ratio:>10}")
    return "\n".join(lines)


class CompressionReport(SlimCallback):
    """Measure the model before and after ``fit`` and report what the techniques saved.

    Args:
        accuracy_metric: a logged metric to read as the trained model's accuracy (e.g. ``"val/acc"``).
            Warns at the end of fit if it was never logged.
        latency_batch_size: batch size for the CPU latency measurement.
        measure_latency: set False to skip timing (MACs, sizes and counts are still reported).
        evaluate_export: evaluate the exported model's accuracy on the validation dataloader.
        output_path: where to write the JSON; default ``<checkpoint dir or log dir>/compression_report.json``.

    >>> CompressionReport(accuracy_metric="val/acc").accuracy_metric
    'val/acc'
    """

    technique = "report"
    effects = frozenset({Effect.BASELINE})

    def __init__(self, accuracy_metric: str | None = "val/acc", latency_batch_size: int = 256,
                 measure_latency: bool = True, evaluate_export: bool = True, output_path: str | None = None,
                 input_fn: Callable[[Any], torch.Tensor] | None = None):
        if latency_batch_size < 1:
            raise ValueError(f"latency_batch_size={latency_batch_size!r} must be a positive integer")
        self.accuracy_metric = accuracy_metric
        self.latency_batch_size = latency_batch_size
        self.measure_latency, self.evaluate_export = measure_latency, evaluate_export
        self.output_path, self.input_fn = output_path, input_fn or batch_inputs
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}
        self.techniques: dict[str, dict[str, Any]] = {}
        self._baseline: nn.Module | None = None
        self.exported_model: nn.Module | None = None
        self.example_input: torch.Tensor | None = None

    @override
    def take_baseline(self, pl_module) -> None:
        """Copy the model as the user built it (every technique's ``setup`` asks, before changing it)."""
        if not self.before and self._baseline is None:
            self._baseline = copy.deepcopy(pl_module).cpu()

    @override
    def on_fit_start(self, trainer, pl_module):
        self.example_input = None  # measured again on this fit's first batch

    def _example(self, batch) -> torch.Tensor:
        x = self.input_fn(batch).detach().cpu()
        reps = -(-self.latency_batch_size // x.shape[0])
        return x.repeat(reps, *([1] * (x.dim() - 1)))[: self.latency_batch_size]

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.example_input is None:  # first batch of this fit (a resumed one too)
            try:
                self.example_input = self._example(batch)
            except BatchFormatError as err:
                rank_zero_warn(f"CompressionReport cannot find the inputs to measure MACs/latency: {err}")
                self.example_input = torch.empty(0)
        if self._baseline is not None and not self.before:
            example = self.example_input if self.example_input.numel() else None
            self.before = measure(self._baseline, example, self.measure_latency) if trainer.is_global_zero else {}
            self._baseline = None

    @override
    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        example = self.example_input if self.example_input is not None and self.example_input.numel() else None
        self.exported_model = deployable_copy(trainer, pl_module)
        self.after = measure(self.exported_model, example, self.measure_latency)
        if self.accuracy_metric:
            value = trainer.callback_metrics.get(self.accuracy_metric)
            if value is None:
                rank_zero_warn(f"CompressionReport: accuracy_metric={self.accuracy_metric!r} was never logged; "
                               f"logged metrics are {sorted(trainer.callback_metrics)}")
            else:
                self.after["accuracy"] = float(value)
        if self.evaluate_export:
            self._evaluate_export(trainer)
        self.techniques = {cb.technique: rows for cb in techniques(trainer) if cb is not self
                           for rows in [cb.report_rows()] if rows}
        self._publish(trainer)

    def _evaluate_export(self, trainer) -> None:
        loaders = trainer.val_dataloaders
        if loaders is None:
            return
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        try:
            self.after["export_accuracy"] = classification_accuracy(self.exported_model, loader, self.input_fn)
        except (BatchFormatError, RuntimeError, TypeError) as err:
            rank_zero_warn(f"CompressionReport could not evaluate the exported model: {err}")

    def as_dict(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after, "techniques": self.techniques}

    def _json_path(self, trainer) -> Path:
        if self.output_path:
            return Path(self.output_path)
        ckpt = trainer.checkpoint_callback
        # not trainer.log_dir: it broadcasts, and only rank zero gets here
        logger_dir = getattr(trainer.logger, "log_dir", None) or getattr(trainer.logger, "save_dir", None)
        base = getattr(ckpt, "dirpath", None) or logger_dir or trainer.default_root_dir
        return Path(base) / "compression_report.json"

    @rank_zero_only
    def _publish(self, trainer) -> None:
        table = format_table(self.before, self.after)
        extra = "\n".join(f"{t}: " + ", ".join(f"{k}={v}" for k, v in rows.items())
                          for t, rows in self.techniques.items())
        rank_zero_info("\nlightning-slim compression report\n" + table + ("\n" + extra if extra else ""))
        path = self._json_path(trainer)
        os.makedirs(path.parent, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2, default=str))
        self.json_path = path
        rows = [[k, self.before.get(k), self.after.get(k)] for k in (*COMPARED, "accuracy", "export_accuracy")
                if k in self.before or k in self.after]
        log.log_table(trainer, "slim/report/table", ["metric", "before", "after"],
                      [[k, _num(b), _num(a)] for k, b, a in rows])
        if self.techniques:  # W&B columns hold one type: technique rows mix numbers and words
            log.log_table(trainer, "slim/report/techniques", ["technique", "key", "value"],
                          [[t, k, str(v)] for t, r in self.techniques.items() for k, v in r.items()])
        summary = {f"slim/report/{k}_before": v for k, v in self.before.items() if isinstance(v, (int, float))}
        summary |= {f"slim/report/{k}_after": v for k, v in self.after.items() if isinstance(v, (int, float))}
        summary |= {f"slim/report/{t}/{k}": v for t, r in self.techniques.items() for k, v in r.items()
                    if isinstance(v, (int, float, str))}
        log.set_summary(trainer, summary)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = dict(state_dict.get("before", {}))
        if self.before:
            self._baseline = None


def _num(v):
    return float(v) if isinstance(v, (int, float)) else None
