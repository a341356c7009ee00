"""What the report shows a person (issue 20): a real table through rich's console (the one Lightning's
progress bar draws on, so the bar cannot cut through it), the baseline named for what it is, the
techniques' rows readable, latency with its spread, timed so that drift on a shared machine cancels,
and the path of the JSON it wrote."""

from __future__ import annotations

import io
import re
import time

import lightning.pytorch as pl
from cases import small_data, small_model
from lightning.pytorch.callbacks import RichProgressBar

from lightning_slim import CompressionReport, IterativeMagnitudePruning
from lightning_slim.reporting.console import render, rows
from lightning_slim.reporting.measure import interleaved_timings

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_the_report_is_a_table_printed_whole_through_the_progress_bars_console(tmp_path):
    pl.seed_everything(0)
    screen = io.StringIO()
    bar = RichProgressBar(console_kwargs={"file": screen, "force_terminal": True, "width": 110})
    pruning = IterativeMagnitudePruning({"kind": "imp", "rounds": 1, "rate": 0.8, "every": 1})
    report = CompressionReport(output_path=str(tmp_path / "report.json"))
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=4,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[pruning, report, bar],
        default_root_dir=tmp_path,
    )
    trainer.fit(small_model(), datamodule=small_data())
    text = ANSI.sub("", screen.getvalue())
    start = text.index("lightning-slim compression report (task: classification)")
    end = text.index(f"JSON: {report.json_path}", start)  # the path of the file it wrote, printed
    block = text[start:end]
    assert "Epoch" not in block  # the live bar was redrawn below the report, not through it
    header = next(line for line in block.splitlines() if "metric" in line)
    assert header.split() == ["metric", "at", "fit", "start", "after", "fit", "change"]  # not "before"
    assert "at fit start: the model as the user built it, before training" in block  # what the column is
    lines = {line.split("  ")[1].strip(): line for line in block.splitlines() if line.startswith("  ")}
    assert "±" in lines["latency ms, batch 1"] and "±" in lines["latency ms, batch 100"]  # with its spread
    assert re.search(r"non-zero parameters .* 4\.\d\dx fewer", block)  # 80% of weights pruned
    assert re.search(r"accuracy, validation .* [+-][0-9.]+ *$", block, re.M)  # quality: a difference, not a ratio
    # technique rows: one per line, rounded, no empty values or raw containers
    assert re.search(r"pruning +mode +unstructured", block)
    assert "={}" not in block and "untouched" not in block and not re.search(r"\d\.\d{6,}", block)  # no raw float reprs


def test_change_is_a_ratio_for_costs_a_difference_for_quality_and_says_when_latency_is_noise():
    report = {
        "task": "classification",
        "before": {"params": 2474, "nonzero_params": 2474, "latency_ms": 1.0, "latency_iqr_ms": 0.2},
        "after": {"params": 2474, "nonzero_params": 510, "latency_ms": 0.95, "latency_iqr_ms": 0.2},
    }
    report["before"] |= {"accuracy": 0.095, "latency_ms_batch_1": 0.5, "latency_iqr_ms_batch_1": 0.01}
    report["after"] |= {"export_accuracy": 0.18, "latency_ms_batch_1": 0.25, "latency_iqr_ms_batch_1": 0.01}
    report["after"] |= {"latency_batch": 32}
    change = {r.label: r.change for r in rows(report)}
    assert change["parameters"] == "same" and change["non-zero parameters"] == "4.85x fewer"
    assert change["latency ms, batch 1"] == "2.00x faster"  # medians 0.25 ms apart, spreads 0.01 ms
    assert change["latency ms, batch 32"] == "within noise (1.05x)"  # 0.05 ms apart, spreads 0.2 ms
    assert change["accuracy, validation"] == "+0.085"
    assert render(report) is not None


def test_interleaved_timing_cancels_drift_that_timing_one_after_the_other_does_not():
    """Two identical functions on a machine that slows down as it goes (each call sleeps a little
    longer than the one before): timed one after the other, the second looks twice as slow;
    interleaved, as the report times models, they compare equal."""
    calls = [0]

    def drifting():
        calls[0] += 1
        time.sleep(0.0005 + 0.00005 * calls[0])  # 0.05 ms slower per call

    one_after = {}
    for name in ("a", "b"):
        one_after |= interleaved_timings({name: drifting}, warmup=0, rounds=20)
    ratio = one_after["b"].median_ms / one_after["a"].median_ms
    # medians at calls ~10 and ~30: 1.0 ms vs 2.0 ms, a ratio near 2 (sleep overshoot only adds to both)
    assert ratio > 1.4, ratio
    calls[0] = 0
    side_by_side = interleaved_timings({"a": drifting, "b": drifting}, warmup=0, rounds=20)
    ratio = side_by_side["b"].median_ms / side_by_side["a"].median_ms
    # interleaved, neighbouring calls differ by 0.05 ms of drift on ~1.5 ms: a ratio within a few
    # percent of 1; the bound leaves room for the scheduler's jitter on a loaded machine
    assert 0.8 < ratio < 1.25, ratio
    assert side_by_side["a"].samples == side_by_side["b"].samples == 20
    assert side_by_side["a"].iqr_ms > 0  # the drift shows up as spread
