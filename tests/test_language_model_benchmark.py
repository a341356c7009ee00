"""``benchmarks/language_model.py --smoke`` runs end to end (tiny Llamas, a few steps: teacher, plain /
top-k KD / full-logit KD students, a student cut out of the teacher, pruning, QAT exported to ONNX
Runtime, selection) and writes every key the issue asks for, with finite numbers: the full
benchmark cannot rot unnoticed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_language_model_benchmark_smoke(tmp_path):
    out = tmp_path / "lm.json"
    env = {**os.environ, "LIGHTNING_SLIM_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "benchmarks/language_model.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    r = json.loads(out.read_text())

    for key in (
        "teacher_val_loss",
        "student_val_loss",
        "kd_val_loss",
        "kd_full_val_loss",
        "gap_closed",
        "kd_step_time_ratio",
        "wall_s",
    ):
        assert _finite(r[key]), (key, r[key])
    pruned = r["pruned"]
    for key in ("unstructured_50", "2:4", "wanda_2:4"):
        assert _finite(pruned[key]), (key, pruned[key])
    for key in ("loss", "macs_ratio", "latency_speedup"):
        assert _finite(pruned["heads_mlp_2x_macs"][key]), key
    assert pruned["heads_mlp_2x_macs"]["macs_ratio"] > 1
    q = r["quantized"]
    for key in ("loss", "bytes", "ms"):
        assert _finite(q["fp32"][key]), key
    for arm in ("int8", "int4"):
        for key in ("loss", "bytes_ratio", "latency_speedup"):
            assert _finite(q[arm][key]), (arm, key)
        assert q[arm]["bytes_ratio"] > 1  # the artifact really is smaller than the fp32 file
    assert "MatMulIntegerToFloat" in q["int8"]["ops"] or "QGemm" in q["int8"]["ops"]
    assert "MatMulNBits" in q["int4"]["ops"]
    sel = r["selection"]
    assert {"steps_to_target", "compute_to_target"} <= set(sel)
    for key in ("steps_to_target", "compute_to_target"):
        assert sel[key] is None or _finite(sel[key]), (key, sel[key])
    assert r["distillation"]["student_over_teacher_params"] <= 0.25
    derived = r["student_from_teacher"]  # the teacher cut to the budget: its cheapest layers dropped
    assert derived["teacher_over_student_params"] >= 4 and derived["within_quarter_of_teacher"]
    dropped = min(derived["val_loss_without_layers"], key=derived["val_loss_without_layers"].get)
    first, last = map(int, dropped.split("-"))
    assert not set(range(first, last + 1)) & set(derived["kept_layers"])
    for key in ("student_loss", "kd_loss", "gap_closed_by_kd", "gap_closed_by_teacher_init", "latency_speedup"):
        assert _finite(derived[key]), key
    assert derived["macs_ratio"] > 1  # fewer layers, heads and channels: less work per token
    assert r["settings"]["mode"] == "smoke"
