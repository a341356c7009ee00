"""`make demo`'s job, shrunk: teacher, the four-technique student, W&B offline run with the
int8 model as an artifact, and the final comparison."""

from __future__ import annotations

import json

import torch
from wandb_offline import read_run

from lightning_slim.demos import demo
from lightning_slim.quantization.export import load_int8


def test_demo_end_to_end_small(tmp_path):
    summary = demo.main(
        ["--out", str(tmp_path), "--num-samples", "1000", "--teacher-epochs", "1", "--student-epochs", "3"]
    )
    saved = json.loads((tmp_path / "demo_summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert summary["student_bytes"] < summary["teacher_bytes"] and summary["examples_trained"] > 0
    assert summary["examples_trained"] == summary["examples_seen"] > 0  # no selection on clean data by default
    run = read_run(tmp_path)
    assert "compressed-student" in run.artifacts
    assert run.summary["demo/size_ratio"] == summary["size_ratio"]
    assert {"slim/distillation/kd_loss", "slim/pruning/sparsity"} <= run.keys()
    # the shipped file is the ONNX model; it loads back without the training code and predicts 10 classes
    assert summary["model_path"].endswith("student_int8.onnx")
    assert summary["student_bytes"] == (tmp_path / "student_int8.onnx").stat().st_size
    assert load_int8(tmp_path / "student_int8.onnx")(torch.zeros(5, 1, 40)).shape == (5, 10)
    # the closing table states the targets and the student's fp32 / fp32-runtime / int8 latencies
    table = demo.closing_table(summary)
    assert "target <= 2" in table and "fp32 ONNX Runtime" in table and "batch 256" in table


def test_demo_with_data_selection_trains_on_the_kept_fraction(tmp_path):
    small = ["--num-samples", "1000", "--teacher-epochs", "1", "--student-epochs", "3"]
    summary = demo.main(["--out", str(tmp_path), *small, "--keep", "0.5"])
    assert summary["examples_trained"] == summary["examples_seen"] // 2
