"""The plumbing of ``benchmarks/real/selection.py`` (selection during recovery), on a random-weight
Llama and byte windows in place of SmolLM2 and its text: both arms are real Trainer fits, the curve
and the ledger agree, and the result has the keys issue 19 asks for, with tokens and MACs that follow
from the counts. (The arm on SmolLM2 itself is run by ``benchmarks/real_models.py --arms selection``.)"""

from __future__ import annotations

import functools
import math
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from test_lm_distillation import llama
from zoo.models import text_windows

from lightning_slim.demos.text import SplitsDataModule, lm_dataset

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
arm = pytest.importorskip("real.selection")

SEQ = 128  # the arm counts tokens as 128 per window


def fake_windows(split: str):
    return text_windows(SEQ)[:, :SEQ] if split == "train" else text_windows(SEQ, split="val")[:, :SEQ]


def fake_data(batch_size: int, seed: int, limit: dict):
    made = {split: lm_dataset(fake_windows(split)[: limit[split]]) for split in ("train", "val", "test")}
    return SplitsDataModule(made, batch_size=batch_size, seed=seed)


def test_both_arms_fit_and_report_tokens_and_macs_to_the_uniform_final_loss(monkeypatch):
    monkeypatch.setattr(arm, "smol", lambda: llama(16, 0).eval())
    monkeypatch.setattr(arm, "windows", fake_windows)
    monkeypatch.setattr(arm, "lm_data", fake_data)
    result = arm.run(Namespace(smoke=True), student_fn=functools.partial(arm.make_student, keep=1))
    s = arm.SMOKE
    assert result["student"]["kept_layers"] in ([0], [1]) and 0 < result["student"]["nonembedding_params_ratio"] < 1
    for score in ("uniform", "learnability"):
        run = result["arms"][score]
        assert [p["step"] for p in run["curve"]] == list(range(1, s.steps + 1))  # every eval_every=1 step
        assert run["ledger"]["examples_trained"] == s.steps * s.rows  # the same trained rows in both arms
        assert run["curve"][-1]["kd_teacher_examples"] == s.steps * s.rows  # KD's teacher on trained rows only
    learn = result["arms"]["learnability"]["ledger"]
    assert (
        learn["scoring_forwards"] == s.steps * s.super_batch
        and result["arms"]["uniform"]["ledger"]["scoring_forwards"] == 0
    )
    assert result["target_loss"] == result["arms"]["uniform"]["curve"][-1]["loss"]
    assert result["uniform_tokens"] == s.steps * s.rows * SEQ
    student_macs = result["macs_per_window"]["student"]
    assert result["uniform_macs"] == 3 * s.steps * s.rows * student_macs
    reached = result["to_target"]["learnability"]
    if reached is None:  # it never got to uniform's final loss: reported as such, not as a number
        assert result["learnability_tokens"] is None and result["learnability_macs"] is None
    else:
        point = next(p for p in result["arms"]["learnability"]["curve"] if p["step"] == reached["step"])
        assert point["loss"] <= result["target_loss"]
        assert result["learnability_tokens"] == point["examples_trained"] * SEQ
        assert result["learnability_macs"] == (3 * point["examples_trained"] + point["learner_forwards"]) * student_macs
        assert (
            result["learnability_reference_macs"] == point["reference_forwards"] * result["macs_per_window"]["teacher"]
        )
    assert all(math.isfinite(v) for v in (result["teacher_loss"], result["student_loss_before"]))
