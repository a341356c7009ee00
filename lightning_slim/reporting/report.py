"""CompressionReport: what the model cost at the start of ``fit`` and what its deployable form costs after.

At fit start it measures the module as the user built it (a CPU copy taken in ``setup``, before any
callback changes it; measured on the first training batch, when a real input is known); at
``on_fit_end`` the deployable model: a copy of the trained module passed through every technique's
``export`` (masks made permanent, int8 conversion...). It finds the task (classification or language
model, :mod:`lightning_slim.reporting.evaluation`) and reports the quality metric that fits it (accuracy;
validation loss and perplexity), never one with the wrong meaning, with training throughput, a
language model's generation speed, and the teacher beside the student under distillation. Latency
is timed at the end with every model side by side (:mod:`lightning_slim.reporting.latency`). It prints
a table (:mod:`lightning_slim.reporting.console`), writes ``compression_report.json`` beside the
checkpoints and logs to W&B (:mod:`lightning_slim.reporting.summary`; keys in ``docs/logging.md``).
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

import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_slim.batches import BatchFormatError, batch_inputs, example_count
from lightning_slim.core import log
from lightning_slim.core.arguments import check_choice, check_int
from lightning_slim.core.callback import SlimCallback
from lightning_slim.core.compose import capability, deployable_copy, techniques, whole_module
from lightning_slim.core.contract import Capability, Effect, ExportRefused, ExportStage
from lightning_slim.modules import output_tensor
from lightning_slim.reporting import console, summary
from lightning_slim.reporting.evaluation import TASKS, detect_task, evaluate
from lightning_slim.reporting.latency import measured_call, prompt_of, serving_rows, time_models
from lightning_slim.reporting.measure import (
    Artifact,
    cpu_int8_capability,
    main_input,
    measure,
    real_tokens,
    shipped_bytes,
)

BASELINE = (
    "at fit start: the model as the user built it, before training and before any callback changed it "
    "(untrained, or pretrained as loaded); after fit: the deployable model every callback's export made"
)


@torch.inference_mode()
def classification_accuracy(model: nn.Module, loader, input_fn=batch_inputs) -> float:
    """Accuracy of a classifier on ``loader`` (the model's output may be a ``ModelOutput``)."""
    from lightning_slim.batches import batch_targets

    correct = total = 0
    for batch in loader:
        logits = output_tensor(model(input_fn(batch).cpu()))
        correct += int((logits.argmax(-1) == batch_targets(batch).cpu()).sum())
        total += len(logits)
    return correct / max(total, 1)


class CompressionReport(SlimCallback):
    """Measure the model at the start of ``fit`` and its deployable form after, and report what the
    techniques saved. Every key it logs is listed in ``docs/logging.md``.

    Args:
        accuracy_metric: a logged metric to read as the trained classifier's accuracy (e.g.
            ``"val/acc"``). Warns at the end of fit if it was never logged. Not read for language models.
        loss_metric: a logged metric to read as a language model's validation loss (``logged_val_loss``);
            warns at the end of fit if it was never logged.
        task: ``"auto"`` (from the model's output on a training batch), ``"classification"`` or
            ``"language_model"``.
        latency_batch_size: rows per call for the CPU latency measurement, besides batch 1 (one
            request), which is always timed. None (default) picks it from the task's own data: the
            first training batch's size (the shape the user's loader feeds), cut so that one call's
            output stays within 256 MiB (measured from one row's output). A language model with a
            49,152-token vocabulary at 128 tokens returns 25 MB of logits per row, so it is timed
            at batch 1 and at its training batch of, say, 4 (100 MB), not at 256 rows (6 GB). An
            integer is used as given (rows of the first batch repeated as needed).
        measure_latency: set False to skip timing (MACs, sizes and counts are still reported); with
            it, the model as built is kept as a CPU copy until the end of fit, to be timed beside
            the deployed one.
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
        latency_batch_size: int | None = None,
        measure_latency: bool = True,
        evaluate_export: bool = True,
        output_path: str | None = None,
        input_fn: Callable[[Any], torch.Tensor] | None = None,
        task: str = "auto",
        loss_metric: str | None = "val/loss",
        generate_tokens: int = 256,
        max_eval_batches: int | None = None,
    ):
        check_int("latency_batch_size", latency_batch_size, minimum=1, allow_none=True)
        check_choice("task", task, TASKS)
        check_int("generate_tokens", generate_tokens, minimum=0)
        check_int("max_eval_batches", max_eval_batches, minimum=1, allow_none=True)
        self.accuracy_metric, self.loss_metric, self.task_option = accuracy_metric, loss_metric, task
        self.latency_batch_size, self.generate_tokens = latency_batch_size, generate_tokens
        self.max_eval_batches = max_eval_batches
        self.measure_latency, self.evaluate_export = measure_latency, evaluate_export
        self.output_path, self.input_fn = output_path, input_fn
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}
        self.teacher: dict[str, Any] = {}
        self.serving: dict[str, Any] = {}
        self.techniques: dict[str, dict[str, Any]] = {}
        self.task: str | None = None
        self.task_note = ""
        self.json_path: Path | None = None
        self._baseline: nn.Module | None = None
        self._baseline_taken = False
        self.exported_model: nn.Module | None = None
        self.example_input: Any = None  # the measured input: a tensor or an (args, kwargs) call
        self._prompt: torch.Tensor | None = None
        self._step_start: float | None = None
        self._throughput: list[tuple[float, int]] = []  # (seconds, tokens or examples) per training step

    @override
    def sharded_refusal(self, resuming: bool = False) -> str | None:
        return None  # the baseline is copied before configure_model shards; the end from the full state dict

    @override
    def take_baseline(self, pl_module) -> None:
        """Copy the model as the user built it (every technique's ``setup`` asks, before changing it:
        the first call of a fit counts). A resumed fit then loads the first fit's numbers
        (``load_state_dict``); the copy, the same architecture, is still what gets timed."""
        if self._baseline_taken:
            return
        self._baseline_taken = True
        self.before, self.after, self.teacher, self.serving, self.techniques = {}, {}, {}, {}, {}
        self._baseline = copy.deepcopy(pl_module).cpu()

    @override
    def release(self, pl_module) -> None:  # the next fit takes its own baseline
        self._baseline_taken, self._baseline = False, None

    @override
    def on_fit_start(self, trainer, pl_module):
        self.example_input = None  # measured again on this fit's first batch
        self._throughput = []

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.example_input is None:  # first batch of this fit (a resumed one too)
            model = self._baseline if self._baseline is not None else pl_module
            self._find_task(model, batch)
            try:
                rows, timed = self.latency_batch_size, self.measure_latency
                self.example_input = measured_call(model, batch, self.input_fn, rows, timed)
                self._prompt = prompt_of(self.example_input)
            except (BatchFormatError, ValueError) as err:
                rank_zero_warn(f"CompressionReport cannot find the inputs to measure MACs/latency: {err}")
                self.example_input = ()
        if self._baseline is not None and not self.before:
            if trainer.is_global_zero:
                self.before = self._measure(self._baseline)
                loader = self._val_loader(trainer, before_training=True)
                if loader is not None:
                    self.before |= self._quality(self._baseline, loader)
            if not (self.measure_latency and trainer.is_global_zero):  # else timed beside the deployed one
                self._baseline = None
        self._step_start = time.perf_counter()  # the baseline's own measurement is not training time

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._step_start is None:
            return
        seconds = time.perf_counter() - self._step_start
        tokens = real_tokens(batch) if self.task == "language_model" else 0
        self._throughput.append((seconds, tokens or example_count(batch)))

    def _find_task(self, model, batch) -> None:
        if self.task is not None:
            return
        if self.task_option != "auto":
            self.task = self.task_option
            return
        with torch.random.fork_rng(devices=[]):
            self.task, self.task_note = detect_task(model, batch, self.input_fn)

    def _example_or_none(self):
        unknown = self.example_input is None or (isinstance(self.example_input, tuple) and not self.example_input)
        return None if unknown else self.example_input

    def _measure(self, model: nn.Module) -> dict[str, Any]:
        """Counts, bytes and MACs (latency is timed at the end, side by side)."""
        return measure(model, self._example_or_none(), latency=False)

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
        whole = whole_module(trainer, pl_module)  # FSDP2: a collective, every rank; the whole model on rank 0
        if whole is None or not trainer.is_global_zero:
            self._baseline = None
            return
        self.techniques = {
            cb.technique: rows for cb in techniques(trainer) if cb is not self for rows in [cb.report_rows()] if rows
        }
        try:
            self.exported_model = deployable_copy(trainer, whole)
        except ExportRefused as err:  # nothing deployable to measure: say why, keep the rest of the report
            rank_zero_warn(f"CompressionReport: no deployable model: {err}")
            self.after = {"export_refused": str(err)}
            self._baseline = None
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
        floats = self._float_forms(trainer, whole)
        if isinstance(self.exported_model, Artifact) and "fp32_eager" in floats:
            # a file has no parameters to count: its weights are the trained float ones, converted
            counted = measure(floats["fp32_eager"], self._example_or_none(), latency=False)
            self.after |= {
                k: counted[k] for k in ("params", "nonzero_params", "macs", "macs_per_token") if k in counted
            }
            self.after["counted_on"] = "the trained float weights the artifact was converted from"
        teacher = capability(trainer, Capability.TEACHER)
        if teacher is not None:
            self.teacher = self._measure(teacher) | (self._quality(teacher, loader) if loader is not None else {})
        self._time_everything(floats, teacher)
        if self.task not in ("classification", "language_model"):
            rank_zero_warn(f"CompressionReport reports no quality metric: the task is not known ({self.task_note})")
        self._baseline = None
        self._publish(trainer)

    def _float_forms(self, trainer, pl_module) -> dict[str, nn.Module]:
        """The converting techniques' float baselines of the trained model (``float_baselines``)."""
        converting = [cb for cb in techniques(trainer) if cb.export_stage == ExportStage.CONVERT]
        example = self._example_or_none()
        if not converting or example is None:
            return {}
        try:  # the contract takes the main input tensor (token ids for a keyword call)
            main = main_input(example)
            models: dict[str, nn.Module] = {}
            for cb in converting:
                models |= cb.float_baselines(
                    deployable_copy(trainer, pl_module, before=ExportStage.CONVERT), main, runtime=self.measure_latency
                )
        except Exception as err:  # the report still shows the deployed model
            rank_zero_warn(f"CompressionReport could not build the float forms of the deployed model: {err}")
            return {}
        return models

    def _time_everything(self, floats: dict[str, nn.Module], teacher: nn.Module | None) -> None:
        """Every model timed side by side (:func:`~lightning_slim.reporting.latency.time_models`): fills
        the latency keys of ``before``, ``after`` and ``teacher``, and the ``serving`` rows of a
        converting technique (the deployed model beside its float forms: what is due to the format
        and what to the runtime)."""
        example = self._example_or_none()
        if not self.measure_latency or example is None:
            return
        models = {"fit_start": self._baseline, "teacher": teacher, **floats, "deployed": self.exported_model}
        models = {name: m for name, m in models.items() if m is not None}
        lm = self.task == "language_model"
        times = time_models(
            models, example, self._prompt if lm else None, self.generate_tokens, ("fit_start", "teacher", "deployed")
        )
        for name, side in (("fit_start", self.before), ("teacher", self.teacher), ("deployed", self.after)):
            side |= times.get(name, {})
        if floats:
            sizes = {n: shipped_bytes(m) if n != "fp32_runtime" else None for n, m in floats.items()}
            self.serving = serving_rows(times, sizes | {"deployed": self.after["size_bytes"]})

    def _read_logged(self, trainer) -> None:
        if self.task == "language_model":
            user = f"CompressionReport(loss_metric={self.loss_metric!r})"
            value = log.read_metric(trainer, self.loss_metric, user, must_exist=True)
            if value is not None:
                self.after |= {"logged_val_loss": value, "logged_perplexity": math.exp(min(value, 700))}
            return
        user = f"CompressionReport(accuracy_metric={self.accuracy_metric!r})"
        value = log.read_metric(trainer, self.accuracy_metric, user, must_exist=True)
        if value is not None:
            self.after["accuracy"] = value

    def _train_throughput(self) -> None:
        steps = self._throughput[1:] or self._throughput  # the first step pays for warm-up
        if not steps:
            return
        rate = statistics.median(n / s for s, n in steps if s > 0)
        self.after["train_tokens_per_s" if self.task == "language_model" else "train_examples_per_s"] = rate

    def as_dict(self) -> dict[str, Any]:
        out = {"task": self.task, "baseline": BASELINE, "before": self.before, "after": self.after}
        out["techniques"] = self.techniques
        if self.task_note:
            out["task_note"] = self.task_note
        if self.teacher:
            out["teacher"] = self.teacher
        if self.serving:
            out["serving"] = self.serving
        if self.measure_latency and "latency_ms" in self.after:
            out["cpu"] = cpu_int8_capability() | {"torch_threads": torch.get_num_threads()}
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
        report = self.as_dict()
        path = self._json_path(trainer)
        os.makedirs(path.parent, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))
        self.json_path = path
        console.show(report, path)
        summary.publish(trainer, report)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before, "task": self.task}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = dict(state_dict.get("before", {}))
        self.task = state_dict.get("task", self.task)
        if self.before and not self.measure_latency:
            self._baseline = None  # with timing it stays: the same architecture as built, timed at the end
