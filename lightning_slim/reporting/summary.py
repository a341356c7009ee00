"""The compression report in W&B: the run summary under one naming scheme and two tables, logged
once at the end of fit (``docs/logging.md`` lists every key).

Summary keys are ``slim/report/<subject>/<metric>``:

- ``<subject>`` is a model: ``fit_start`` (as the user built it), ``trained`` (what the module logged
  during fit, and training throughput), ``deployed`` (the exported model), ``teacher``,
  ``fp32_eager`` / ``fp32_runtime`` (a converting technique's float forms of the trained model);
  or a technique (``pruning``, ``quantization``...: its report rows); or ``run`` (task, CPU);
- ``<metric>`` has the same name whichever model it measures: ``params``, ``size_bytes``, ``macs``,
  ``latency_ms`` (at the latency batch) and ``latency_ms_batch_1``, ``latency_iqr_ms``...,
  ``accuracy``, ``val_loss``, ``perplexity``; a technique's per-layer row is ``<row>/<layer>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from lightning_slim.core import log
from lightning_slim.reporting import console

# after-fit keys that describe training (what the module logged, throughput), not the deployed model
TRAINED = {
    "accuracy": "accuracy",
    "logged_val_loss": "val_loss",
    "logged_perplexity": "perplexity",
    "train_examples_per_s": "train_examples_per_s",
    "train_tokens_per_s": "train_tokens_per_s",
}
DEPLOYED_RENAMED = {"export_accuracy": "accuracy", "export_loss": "loss"}
INT8_UNITS = ("avx2", "avx512_vnni", "avx_vnni", "amx", "arm_dotprod")


def _scalar(value: Any) -> Any:
    if isinstance(value, (list, tuple, set)):
        return ", ".join(str(v) for v in value)
    return value if isinstance(value, (bool, int, float, str)) else None


def _flat(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``{prefix/key: value}``, a dict value one level down (``prefix/key/inner``); scalars only."""
    out = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out |= {f"{prefix}/{key}/{k}": _scalar(v) for k, v in value.items()}
        else:
            out[f"{prefix}/{key}"] = _scalar(value)
    return out


def models(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The report's measurements by model, each under the metric names every model shares."""
    after = report.get("after", {})
    out = {
        "fit_start": dict(report.get("before", {})),
        "trained": {TRAINED[k]: v for k, v in after.items() if k in TRAINED},
        "deployed": {DEPLOYED_RENAMED.get(k, k): v for k, v in after.items() if k not in TRAINED},
        "teacher": dict(report.get("teacher", {})),
    }
    serving = report.get("serving", {})
    batches = {k: row for k, row in serving.items() if k.startswith("batch_")}
    latency_batch = after.get("latency_batch")
    for key, row in batches.items():
        suffix = "" if key == f"batch_{latency_batch}" else f"_{key}"
        for name, value in row.items():
            if name.startswith("speedup_vs_"):
                out["deployed"][f"{name}{suffix}"] = value
            elif name.endswith("_iqr_ms"):
                out.setdefault(name.removesuffix("_iqr_ms"), {})[f"latency_iqr_ms{suffix}"] = value
            elif name.endswith("_ms"):
                out.setdefault(name.removesuffix("_ms"), {})[f"latency_ms{suffix}"] = value
    for name in ("fp32_eager", "fp32_runtime"):
        if f"{name}_bytes" in serving:
            out.setdefault(name, {})["size_bytes"] = serving[f"{name}_bytes"]
    return {name: values for name, values in out.items() if values}


def summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """Every scalar of the report as ``slim/report/<subject>/<metric>``."""
    out: dict[str, Any] = {}
    for subject, values in models(report).items():
        out |= _flat(f"slim/report/{subject}", values)
    for technique, rows in report.get("techniques", {}).items():
        out |= _flat(f"slim/report/{technique}", rows)
    run: dict[str, Any] = {"task": report.get("task")}
    cpu = report.get("cpu")
    if cpu:
        run |= {
            "cpu": cpu.get("model"),
            "int8_units": [k for k in INT8_UNITS if cpu.get(k)],
            "torch_threads": cpu.get("torch_threads"),
        }
    out |= _flat("slim/report/run", run)
    return {k: v for k, v in out.items() if not log.is_empty(v)}


def publish(trainer: pl.Trainer, report: Mapping[str, Any]) -> None:
    """The models table, the techniques table and the summary, to W&B (once, at the end of fit)."""
    table = console.rows(report)
    teacher = bool(report.get("teacher"))
    columns = ["metric", "at_fit_start", "after_fit", *(["teacher"] if teacher else []), "change"]
    log.log_table(
        trainer,
        "slim/report/table",
        columns,
        [[r.label, r.before, r.after, *([r.teacher] if teacher else []), r.change] for r in table],
    )
    techniques = [
        [technique, key, console.readable(value)]
        for technique, rows in report.get("techniques", {}).items()
        for key, value in rows.items()
        if not log.is_empty(value)
    ]
    if techniques:  # W&B columns hold one type: technique rows mix numbers and words
        log.log_table(trainer, "slim/report/techniques", ["technique", "item", "value"], techniques)
    log.set_summary(trainer, summary(report))
