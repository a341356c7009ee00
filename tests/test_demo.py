"""`make demo`'s job, shrunk: teacher, the four-technique student, W&B offline run with the
int8 model as an artifact, and the final comparison."""

from __future__ import annotations

import json

import torch
from wandb_offline import read_run

from lightning_slim import demo
from lightning_slim.quantization.export import load_int8


def test_demo_end_to_end_small(tmp_path):
    summary = demo.main(
        ["--out", str(tmp_path), "--num-samples", "1000", "--teacher-epochs", "1", "--student-epochs", "3"]
    )
    saved = json.loads((tmp_path / "demo_summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert summary["student_bytes"] < summary["teacher_bytes"] and summary["examples_trained"] > 0
    assert summary["examples_trained"] == summary["examples_seen"] // 2  # selection kept half
    run = read_run(tmp_path)
    assert "compressed-student" in run.artifacts
    assert run.summary["demo/size_ratio"] == summary["size_ratio"]
    assert {"slim/selection/examples_trained", "slim/distillation/kd_loss"} & run.keys()
    # the saved int8 model loads back without the training code and predicts 10 classes
    assert load_int8(tmp_path / "student_int8.pt2")(torch.zeros(5, 1, 40)).shape == (5, 10)
