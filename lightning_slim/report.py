"""CompressionReport: what the model cost before ``fit`` and what its deployable form costs after.

It measures the module as the user built it (a CPU copy taken in ``setup``, measured on the
first training batch, when a real input is known), and at ``on_fit_end`` the deployable
model: a copy of the trained module passed through every lightning-slim callback's
``export`` (masks made permanent, int8 conversion...). It finds the task (``task="auto"``:
classification or language model, :mod:`lightning_slim.evaluation`) and reports the metric that
fits it, never one with the wrong meaning: accuracy for classifiers (the logged metric the user
names, and the exported model evaluated on the validation data), validation loss and perplexity
for language models (before and after, the exported model's token cross-entropy, and the logged
loss), with training throughput (tokens or examples per second) and, for language models,
generation speed at batch 1 (with a key/value cache when the model takes one). With a teacher in
the Trainer (distillation) the teacher is measured and evaluated beside the student. It adds
each technique's own rows, prints a table, logs it to W&B (table + summary) and writes
``compression_report.json`` beside the checkpoints.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_slim import log
from lightning_slim.arguments import check_choice, check_int
from lightning_slim.batches import BatchFormatError, batch_inputs, batch_targets, example_count, slice_batch
from lightning_slim.callback import SlimCallback
from lightning_slim.compose import capability, techniques
from lightning_slim.contract import Capability, Effect, ExportRefused, ExportStage
from lightning_slim.evaluation import TASKS, detect_task, evaluate
from lightning_slim.measure import (
    Artifact,
    compare_latency,
    cpu_int8_capability,
    generation_speed,
    measure,
    shipped_bytes,
)
from lightning_slim.modules import call_arguments, forward_target, output_tensor

COMPARED = ("params", "nonzero_params", "size_bytes", "macs", "latency_ms")
QUALITY = {
    "classification": ("accuracy", "export_accuracy"),
    "language_model": ("val_loss", "perplexity", "logged_val_loss", "generate_tokens_per_s", "train_tokens_per_s"),
}


def deployable_copy(trainer: pl.Trainer, pl_module: pl.LightningModule, before: ExportStage | None = None) -> nn.Module:
    """A CPU copy of the trained module passed through every technique's ``export``, in the order
    of their :class:`~lightning_slim.contract.ExportStage` (only the stages ahead of ``before``)."""
    model = copy.deepcopy(pl_module).cpu().eval()
    exporters = (
        c for c in techniques(trainer) if c.export_stage is not None and (before is None or c.export_stage < before)
    )
    for cb in sorted(exporters, key=lambda c: (c.export_stage, c.technique)):  # never the list order
        model = cb.export(model)
    return model


@torch.inference_mode()
def classification_accuracy(model: nn.Module, loader, input_fn=batch_inputs) -> float:
    """Accuracy of a classifier on ``loader`` (the model's output may be a ``ModelOutput``)."""
    correct = total = 0
    for batch in loader:
        logits = output_tensor(model(input_fn(batch).cpu()))
        correct += int((logits.argmax(-1) == batch_targets(batch).cpu()).sum())
        total += len(logits)
    return correct / max(total, 1)


def format_table(before: dict, after: dict, task: str | None = None) -> str:
    lines = [f"{'metric':<24}{'before':>16}{'after':>16}{'ratio':>10}"]
    for key in [k for k in (*COMPARED, *QUALITY.get(task, ("accuracy",))) if k in before or k in after]:
        b, a = before.get(key), after.get(key)
        ratio = f"{b / a:.2f}x" if isinstance(b, (int, float)) and isinstance(a, (int, float)) and a else ""
        fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else f"{v:,}")
        lines.append(f"{key:<24}{fmt(b):>16}{fmt(a):>16}{ratio:>10}")
    return "\n".join(lines)


def format_serving(serving: dict[str, Any]) -> str:
    """The side-by-side latency table of :meth:`CompressionReport._serving` (empty without one)."""
    batches = [k for k in serving if k.startswith("batch_")]
    if not batches:
        return ""
    cpu = serving["cpu"]
    units = [k for k in ("avx2", "avx512_vnni", "avx_vnni", "amx", "arm_dotprod") if cpu.get(k)]
    names = [k.removesuffix("_ms") for k in serving[batches[0]] if k.endswith("_ms")]
    lines = [f"serving on {cpu['model']} ({', '.join(units) or 'no int8 dot-product units'}), ms per call:"]
    lines.append(f"{'batch':<8}" + "".join(f"{n:>16}" for n in names) + f"{'deployed speed-up':>30}")
    for key in batches:
        row = serving[key]
        ups = " / ".join(f"{row[f'speedup_vs_{n}']:.2f}x vs {n}" for n in names if n != "deployed")
        lines.append(
            f"{key.removeprefix('batch_'):<8}" + "".join(f"{row[f'{n}_ms']:>16.3f}" for n in names) + f"  {ups}"
        )
    return "\n".join(lines)


class CompressionReport(SlimCallback):
    """Measure the model before and after ``fit`` and report what the techniques saved.

    Args:
        accuracy_metric: a logged metric to read as the trained classifier's accuracy (e.g.
            ``"val/acc"``). Warns at the end of fit if it was never logged. Not read for language models.
        loss_metric: a logged metric to read as a language model's validation loss (``logged_val_loss``).
        task: ``"auto"`` (from the model's output on a training batch), ``"classification"`` or
            ``"language_model"``.
        latency_batch_size: batch size for the CPU latency measurement.
        measure_latency: set False to skip timing (MACs, sizes and counts are still reported).
        evaluate_export: evaluate the model before training and its exported form after on the
            validation dataloader (accuracy, or validation loss and perplexity).
        generate_tokens: tokens generated at batch 1 to time a language model (0: not timed).
        max_eval_batches: at most this many validation batches per evaluation (None: all).
        output_path: where to write the JSON; default ``<checkpoint dir or log dir>/compression_report.json``.
        input_fn: the model's input from a batch, for batches the defaults cannot read.

    >>> CompressionReport(accuracy_metric="val/acc").accuracy_metric
    'val/acc'
    """

    technique = "report"
    effects = frozenset({Effect.BASELINE})

    def __init__(
        self,
        accuracy_metric: str | None = "val/acc",
        latency_batch_size: int = 256,
        measure_latency: bool = True,
        evaluate_export: bool = True,
        output_path: str | None = None,
        input_fn: Callable[[Any], torch.Tensor] | None = None,
        task: str = "auto",
        loss_metric: str | None = "val/loss",
        generate_tokens: int = 256,
        max_eval_batches: int | None = None,
    ):
        if latency_batch_size < 1:
            raise ValueError(f"latency_batch_size={latency_batch_size!r} must be a positive integer")
        check_choice("task", task, TASKS)
        check_int("generate_tokens", generate_tokens, minimum=0)
        check_int("max_eval_batches", max_eval_batches, minimum=1, allow_none=True)
        self.accuracy_metric, self.loss_metric, self.task_option = accuracy_metric, loss_metric, task
        self.latency_batch_size, self.generate_tokens, self.max_eval_batches = (
            latency_batch_size,
            generate_tokens,
            max_eval_batches,
        )
        self.measure_latency, self.evaluate_export = measure_latency, evaluate_export
        self.output_path, self.input_fn = output_path, input_fn
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}
        self.teacher: dict[str, Any] = {}
        self.serving: dict[str, Any] = {}
        self.techniques: dict[str, dict[str, Any]] = {}
        self.task: str | None = None
        self.task_note = ""
        self._baseline: nn.Module | None = None
        self.exported_model: nn.Module | None = None
        self.example_input: Any = None  # the measured input: a tensor or an (args, kwargs) call
        self._prompt: torch.Tensor | None = None
        self._step_start: float | None = None
        self._throughput: list[tuple[float, int]] = []  # (seconds, tokens or examples) per training step

    @override
    def take_baseline(self, pl_module) -> None:
        """Copy the model as the user built it (every technique's ``setup`` asks, before changing it)."""
        if not self.before and self._baseline is None:
            self._baseline = copy.deepcopy(pl_module).cpu()

    @override
    def on_fit_start(self, trainer, pl_module):
        self.example_input = None  # measured again on this fit's first batch
        self._throughput = []

    def _example(self, model: nn.Module, batch) -> Any:
        """The input to measure: the model's own call on this batch, repeated to ``latency_batch_size`` rows."""
        n = example_count(batch)
        rows = torch.arange(self.latency_batch_size) % n
        if self.input_fn is not None:
            return slice_batch(self.input_fn(batch).detach().cpu(), rows, size=n)
        _, target = forward_target(model)
        args, kwargs = call_arguments(target, batch)
        call = slice_batch((args, kwargs), rows, size=n)
        call = (
            tuple(a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in call[0]),
            {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in call[1].items()},
        )
        ids = call[1].get("input_ids", call[0][0] if call[0] else None)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
            self._prompt = ids[:1]
        return call[0][0] if len(call[0]) == 1 and not call[1] else call

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_start = time.perf_counter()
        if self.example_input is None:  # first batch of this fit (a resumed one too)
            try:
                self.example_input = self._example(self._baseline or pl_module, batch)
            except (BatchFormatError, ValueError) as err:
                rank_zero_warn(f"CompressionReport cannot find the inputs to measure MACs/latency: {err}")
                self.example_input = ()
            self._find_task(self._baseline or pl_module, batch)
        if self._baseline is not None and not self.before:
            if trainer.is_global_zero:
                self.before = self._measure(self._baseline)
                loader = self._val_loader(trainer, before_training=True)
                if loader is not None:
                    self.before |= self._quality(self._baseline, loader)
            self._baseline = None
        self._step_start = time.perf_counter()  # the baseline's own measurement is not training time

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._step_start is None:
            return
        seconds = time.perf_counter() - self._step_start
        tokens = self._tokens(batch)
        self._throughput.append((seconds, tokens or example_count(batch)))

    def _tokens(self, batch) -> int:
        """Real tokens of a language-model batch (the attention mask's ones, else every id), else 0."""
        if self.task != "language_model":
            return 0
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        ids = self._prompt_source(batch)
        return int(ids.numel()) if ids is not None else 0

    def _prompt_source(self, batch):
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if ids is None:
            try:
                ids = batch_inputs(batch)
            except BatchFormatError:
                return None
        return ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point() else None

    def _find_task(self, model, batch) -> None:
        if self.task is not None:
            return
        if self.task_option != "auto":
            self.task = self.task_option
            return
        with torch.random.fork_rng(devices=[]):
            self.task, self.task_note = detect_task(model, batch, self.input_fn)

    def _measure(self, model: nn.Module) -> dict[str, Any]:
        unknown = self.example_input is None or (isinstance(self.example_input, tuple) and not self.example_input)
        out = measure(model, None if unknown else self.example_input, self.measure_latency)
        if self.task == "language_model" and self.measure_latency and self.generate_tokens and self._prompt is not None:
            try:
                with torch.random.fork_rng(devices=[]):
                    out |= generation_speed(model, self._prompt, self.generate_tokens)
            except Exception as err:  # a model that cannot generate still gets the rest measured
                out["generate_error"] = f"not measurable: {type(err).__name__}: {err}"[:240]
        return out

    def _val_loader(self, trainer, before_training: bool = False):
        loaders = trainer.val_dataloaders
        if loaders is None and before_training and trainer.datamodule is not None:
            try:
                with torch.random.fork_rng(devices=[]):
                    loaders = trainer.datamodule.val_dataloader()
            except Exception:
                loaders = None
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        return loaders

    def _quality(self, model: nn.Module, loader) -> dict[str, Any]:
        if not self.evaluate_export or self.task not in ("classification", "language_model"):
            return {}
        try:
            return evaluate(model, loader, self.task, self.input_fn, self.max_eval_batches)
        except (BatchFormatError, RuntimeError, TypeError, ValueError) as err:
            rank_zero_warn(f"CompressionReport could not evaluate {type(model).__name__} on the validation data: {err}")
            return {"quality_error": f"{type(err).__name__}: {err}"[:240]}

    @override
    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        try:
            self.exported_model = deployable_copy(trainer, pl_module)
        except ExportRefused as err:  # nothing deployable to measure: say why, keep the rest of the report
            rank_zero_warn(f"CompressionReport: no deployable model: {err}")
            self.after = {"export_refused": str(err)}
            self.techniques = {
                c.technique: r for c in techniques(trainer) if c is not self for r in [c.report_rows()] if r
            }
            self._publish(trainer)
            return
        self.after = self._measure(self.exported_model)
        self._read_logged(trainer)
        loader = self._val_loader(trainer)
        if loader is not None:
            quality = self._quality(self.exported_model, loader)
            if self.task == "classification" and "accuracy" in quality:
                quality["export_accuracy"] = quality.pop("accuracy")
                quality["export_loss"] = quality.pop("loss")
            self.after |= quality
        self._train_throughput()
        floats = self._float_forms(trainer, pl_module)
        if isinstance(self.exported_model, Artifact) and "fp32_eager" in floats:
            # a file has no parameters to count: its weights are the trained float ones, converted
            counted = measure(floats["fp32_eager"], self._example_or_none(), latency=False)
            self.after |= {
                k: counted[k] for k in ("params", "nonzero_params", "macs", "macs_per_token") if k in counted
            }
            self.after["counted_on"] = "the trained float weights the artifact was converted from"
        self.serving = self._serving(floats)
        teacher = capability(trainer, Capability.TEACHER)
        if teacher is not None:
            self.teacher = self._measure(teacher) | (self._quality(teacher, loader) if loader is not None else {})
        if self.task not in ("classification", "language_model"):
            rank_zero_warn(f"CompressionReport reports no quality metric: the task is not known ({self.task_note})")
        self.techniques = {
            cb.technique: rows for cb in techniques(trainer) if cb is not self for rows in [cb.report_rows()] if rows
        }
        self._publish(trainer)

    def _example_or_none(self):
        unknown = self.example_input is None or (isinstance(self.example_input, tuple) and not self.example_input)
        return None if unknown else self.example_input

    def _float_forms(self, trainer, pl_module) -> dict[str, nn.Module]:
        """The converting techniques' float baselines of the trained model (``float_baselines``)."""
        converting = [cb for cb in techniques(trainer) if cb.export_stage == ExportStage.CONVERT]
        if not converting or not isinstance(self.example_input, torch.Tensor):
            return {}
        models: dict[str, nn.Module] = {}
        try:
            for cb in converting:
                models |= cb.float_baselines(
                    deployable_copy(trainer, pl_module, before=ExportStage.CONVERT),
                    self.example_input,
                    runtime=self.measure_latency,
                )
        except Exception as err:  # the report still shows the deployed model
            rank_zero_warn(f"CompressionReport could not build the float forms of the deployed model: {err}")
            return {}
        return models

    def _serving(self, floats: dict[str, nn.Module]) -> dict[str, Any]:
        """The deployed model beside its float forms (fp32 eager, fp32 in the deployed runtime),
        timed side by side at batch 1 and at ``latency_batch_size`` on this CPU, with the CPU's int8
        capability and the bytes shipped: what is due to the format and what to the runtime."""
        if not (self.measure_latency and floats):
            return {}
        try:
            models = {**floats, "deployed": self.exported_model}
            out: dict[str, Any] = {"cpu": cpu_int8_capability()}
            out |= {f"{name}_bytes": shipped_bytes(m) for name, m in models.items() if name != "fp32_runtime"}
            for batch in sorted({1, self.latency_batch_size}):
                ms = compare_latency(models, self.example_input[:batch])
                row = {f"{name}_ms": v for name, v in ms.items()}
                row |= {f"speedup_vs_{name}": v / ms["deployed"] for name, v in ms.items() if name != "deployed"}
                out[f"batch_{batch}"] = row
            return out
        except Exception as err:  # a model we cannot time side by side keeps the rest of its report
            rank_zero_warn(f"CompressionReport could not time the deployed model beside its float forms: {err}")
            return {"error": f"{type(err).__name__}: {err}"[:240]}

    def _read_logged(self, trainer) -> None:
        metrics = trainer.callback_metrics
        if self.task == "language_model":
            value = metrics.get(self.loss_metric) if self.loss_metric else None
            if value is not None:
                self.after |= {"logged_val_loss": float(value), "logged_perplexity": math.exp(min(float(value), 700))}
            return
        if self.accuracy_metric:
            value = metrics.get(self.accuracy_metric)
            if value is None:
                rank_zero_warn(
                    f"CompressionReport: accuracy_metric={self.accuracy_metric!r} was never logged; "
                    f"logged metrics are {sorted(metrics)}"
                )
            else:
                self.after["accuracy"] = float(value)

    def _train_throughput(self) -> None:
        steps = self._throughput[1:] or self._throughput  # the first step pays for warm-up
        if not steps:
            return
        rate = statistics.median(n / s for s, n in steps if s > 0)
        self.after["train_tokens_per_s" if self.task == "language_model" else "train_examples_per_s"] = rate

    def as_dict(self) -> dict[str, Any]:
        out = {"task": self.task, "before": self.before, "after": self.after, "techniques": self.techniques}
        if self.task_note:
            out["task_note"] = self.task_note
        if self.teacher:
            out["teacher"] = self.teacher
        if self.serving:
            out["serving"] = self.serving
        return out

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
        table = format_table(self.before, self.after, self.task)
        extra = "\n".join(
            f"{t}: " + ", ".join(f"{k}={v}" for k, v in rows.items())
            for t, rows in {**self.techniques, **({"teacher": self.teacher} if self.teacher else {})}.items()
        )
        serving = format_serving(self.serving)
        rank_zero_info(
            f"\nlightning-slim compression report (task: {self.task})\n"
            + table
            + ("\n" + serving if serving else "")
            + ("\n" + extra if extra else "")
        )
        path = self._json_path(trainer)
        os.makedirs(path.parent, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2, default=str))
        self.json_path = path
        keys = (*COMPARED, *QUALITY.get(self.task, ("accuracy", "export_accuracy")))
        rows = [[k, self.before.get(k), self.after.get(k)] for k in keys if k in self.before or k in self.after]
        log.log_table(
            trainer, "slim/report/table", ["metric", "before", "after"], [[k, _num(b), _num(a)] for k, b, a in rows]
        )
        if self.techniques:  # W&B columns hold one type: technique rows mix numbers and words
            log.log_table(
                trainer,
                "slim/report/techniques",
                ["technique", "key", "value"],
                [[t, k, str(v)] for t, r in self.techniques.items() for k, v in r.items()],
            )
        summary = {f"slim/report/{k}_before": v for k, v in self.before.items() if isinstance(v, (int, float))}
        summary |= {f"slim/report/{k}_after": v for k, v in self.after.items() if isinstance(v, (int, float))}
        summary |= {f"slim/report/teacher/{k}": v for k, v in self.teacher.items() if isinstance(v, (int, float))}
        summary |= {
            f"slim/report/{t}/{k}": v
            for t, r in self.techniques.items()
            for k, v in r.items()
            if isinstance(v, (int, float, str))
        }
        summary |= {
            f"slim/report/serving/{b}/{k}": v
            for b, row in self.serving.items()
            if b.startswith("batch_")
            for k, v in row.items()
        }
        summary["slim/report/task"] = str(self.task)
        log.set_summary(trainer, summary)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before, "task": self.task}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = dict(state_dict.get("before", {}))
        self.task = state_dict.get("task", self.task)
        if self.before:
            self._baseline = None


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
