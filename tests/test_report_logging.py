"""What the callbacks log (issue 20), read back from real runs: each warning once per run, a metric
that is never logged named with the closest one, and a W&B run (offline, read from disk) where
constants are run config, tables are logged once, the report's summary follows the one naming
scheme of docs/logging.md, and no summary value is empty."""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
from cases import small_data, small_model
from cases.distillation import make_callback as distillation
from lightning.pytorch.loggers import CSVLogger
from wandb_offline import read_run

from lightning_slim import (
    CompressionReport,
    IterativeMagnitudePruning,
    OnlineDataSelection,
    QuantizationAwareTraining,
)
from lightning_slim.core.log import MetricNotLoggedWarning, NoWandbLoggerWarning, read_metric
from lightning_slim.demos.models import MNIST1DCNN

DOCS = Path(__file__).resolve().parents[1] / "docs" / "logging.md"
IMP = {"kind": "imp", "rounds": 2, "rate": 0.5, "every": 1, "unit": "epoch"}  # rounds at epochs 1 and 2


def trainer(tmp_path, callbacks, **kwargs):
    args = dict(
        max_epochs=1,
        limit_train_batches=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    return pl.Trainer(**(args | kwargs))


def caught(fit) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fit()
    return seen


def test_no_wandb_logger_is_said_once_per_run(tmp_path):
    for run in range(2):  # once in each run, not once per process
        callbacks = [IterativeMagnitudePruning(IMP), CompressionReport(measure_latency=False)]
        fit = trainer(tmp_path, callbacks, max_epochs=3, logger=CSVLogger(tmp_path / str(run)))  # not W&B
        seen = caught(lambda fit=fit: fit.fit(small_model(), datamodule=small_data()))
        said = [w for w in seen if issubclass(w.category, NoWandbLoggerWarning)]
        # the pruning table and summary, the report's two tables and summary: one warning naming them all
        assert len(said) == 1, [str(w.message) for w in said]
        assert "tables, plots, histograms, the run summary, artifacts" in str(said[0].message)


class LogsValAcc(MNIST1DCNN):
    """A user's module that logs ``val_acc`` where the callbacks default to ``val/acc``."""

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())


def test_a_metric_that_is_never_logged_warns_once_per_reader_with_the_closest_name(tmp_path):
    report = CompressionReport(accuracy_metric="val/acc", measure_latency=False)
    fit = trainer(tmp_path, [report], max_epochs=2, logger=False)
    seen = caught(lambda: fit.fit(LogsValAcc(channels=8), datamodule=small_data()))
    said = [str(w.message) for w in seen if issubclass(w.category, MetricNotLoggedWarning)]
    assert said == [
        "CompressionReport(accuracy_metric='val/acc'): 'val/acc' was never logged; logged metrics are "
        "['train/loss', 'val_acc'] (did you mean 'val_acc'?)"
    ]
    assert "accuracy" not in report.after  # nothing with the wrong meaning in its place
    # the helper every callback reading a metric uses: once per run and reader, None when missing
    reader = "IterativeMagnitudePruning(accuracy_metric='val/acc')"
    again = caught(lambda: [read_metric(fit, "val/acc", reader, must_exist=True) for _ in range(3)])
    assert [issubclass(w.category, MetricNotLoggedWarning) for w in again] == [True]
    assert read_metric(fit, "val_acc", reader, must_exist=True) == float(fit.callback_metrics["val_acc"])
    assert not caught(lambda: read_metric(fit, "val/acc", reader))  # mid-run reads do not warn
    # no suggestion that is only spelled alike: train/loss is not what val/loss means
    (loss,) = caught(lambda: read_metric(fit, "val/loss", "CompressionReport(loss_metric='val/loss')", True))
    assert str(loss.message).endswith("logged metrics are ['train/loss', 'val_acc']")


def documented_patterns() -> list[re.Pattern]:
    """Every key of docs/logging.md's table, placeholders as the names they stand for."""
    fill = {
        "<model>": "(fit_start|trained|deployed|teacher|fp32_eager|fp32_runtime)",
        "<technique>": "(pruning|quantization|distillation|selection)",
        "<what>": "(macs|latency|quality|generate)",
        "<layer>": r"[\w.]+",
        "<row>": r"\w+",
        "<part>": r"[\w.]+",
        "<count>": r"\w+",
    }
    out = []
    for key in re.findall(r"^\| `(slim/[^`]+)` \|", DOCS.read_text(), re.M):
        pattern = re.escape(key)
        for name, regex in fill.items():
            pattern = pattern.replace(re.escape(name), regex)
        out.append(re.compile(pattern + "$"))
    return out


def test_a_wandb_run_has_constants_as_config_tables_once_and_one_documented_summary_scheme(tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    pl.seed_everything(0)
    callbacks = [
        IterativeMagnitudePruning(IMP),
        QuantizationAwareTraining(start_after=1),
        distillation(),
        OnlineDataSelection(keep=0.5, score="hard"),
        CompressionReport(output_path=str(tmp_path / "report.json")),
    ]
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="slim-tests")
    fit = trainer(tmp_path, callbacks, max_epochs=3, limit_train_batches=4, logger=logger, log_every_n_steps=1)
    fit.fit(small_model(), datamodule=small_data(with_index=True))
    wandb.finish()
    run = read_run(tmp_path)
    history = Counter(k for row in run.history for k in row)
    # constants: once as run config, not a metric at each of the 12 steps
    settings = {
        "slim/quantization/weight_bits": 8,
        "slim/quantization/activation_bits": 8,
        "slim/distillation/alpha": 0.5,
        "slim/distillation/temperature": 4.0,
    }
    for key, value in settings.items():
        assert history[key] == 0 and run.config[key] == value, (key, history[key], run.config.get(key))
    assert history["slim/distillation/kd_loss"] == 12 and history["slim/quantization/phase"] == 12  # what changes
    # tables: each logged once at the end (was: pruning's and quantization's again every round / epoch)
    tables = ("slim/pruning/accuracy_vs_sparsity", "slim/quantization/layer_error", "slim/report/table")
    for key in (*tables, "slim/report/techniques"):
        assert history[f"{key}/nrows"] == 1, (key, history[f"{key}/nrows"])
    assert len(run.artifacts) == len(set(run.artifacts)) >= 4  # one version of each table's artifact
    assert [row[0] for row in run.tables()["slim/pruning/accuracy_vs_sparsity"]["data"]] == [0, 1, 2]
    # the summary: no empty values, and every report key is a documented slim/report/<subject>/<metric>
    assert not [k for k, v in run.summary.items() if v in ("", None) or (isinstance(v, float) and math.isnan(v))]
    tables_in_summary = tuple(f"{key}/" for key in (*tables, "slim/report/techniques"))
    report_keys = [k for k in run.summary if k.startswith("slim/report/") and not k.startswith(tables_in_summary)]
    patterns = documented_patterns()
    undocumented = [k for k in report_keys if not any(p.match(k) for p in patterns)]
    assert not undocumented, undocumented
    assert run.summary["slim/report/deployed/size_bytes"] < run.summary["slim/report/fit_start/size_bytes"]
    assert run.summary["slim/report/teacher/params"] > run.summary["slim/report/fit_start/params"]
    assert (
        run.summary["slim/report/deployed/latency_ms"] > 0 and run.summary["slim/report/run/task"] == "classification"
    )
    assert run.summary["slim/report/pruning/sparsity"] == callbacks[0].report_rows()["sparsity"]
    for key in settings:  # and the config keys are documented too
        assert any(p.match(key) for p in patterns), key
