"""Selection during recovery: a SmolLM2 student cut out of SmolLM2-135M-Instruct is recovered with
knowledge distillation from the unpruned model, training on ``rows`` of every super-batch of
``super_batch`` windows chosen either uniformly or by learnability (student loss minus the KD
teacher's loss, RHO-LOSS with the teacher as the reference model), for the same number of optimizer
steps. Reported: the tokens and MACs each arm trained on to reach the uniform arm's final loss.

    python benchmarks/real_models.py --arms selection             # the arm, on the test split
    python benchmarks/real/selection.py --split val --out /tmp/sel_val.json   # choosing settings
    python benchmarks/real_models.py --arms selection --smoke     # plumbing, about a minute

Both arms are real Lightning fits of ``demos.modules.CausalLM`` with ``KnowledgeDistillation`` and
``OnlineDataSelection`` (``score="uniform"``: the control, no scoring; ``"learnability"`` with
``reference="teacher"`` and ``cache_reference=True``: each window's teacher loss computed once,
the first time it is seen). The same student weights, the same super-batch stream (data seed),
the same optimizer and schedule in both. The loss curve (mean next-token nats on ``split``) is
measured every ``eval_every`` steps by a callback, outside the counted compute.

Compute, in MACs from ``measure.macs_of`` on one 128-token window (torch-pruning's counter: the
linear layers and the output head; attention products computed functionally are not counted, the
same omission for both models): training an example costs 3 student forwards, a scoring forward 1
(``*_macs``: the student's training plus its scoring forwards). The reference's forwards (teacher
MACs per window, once per window seen) and the KD teacher's forwards (the same number in both arms:
one per trained example) are stated separately, never hidden in or left out of a ratio.

The student comes from :func:`make_student` (today's depth pruning: ``choose_layers`` on validation
windows, then ``keep_layers``); it is one replaceable function of ``(teacher, calibration windows)``.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import as the driver does, from benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_slim import KnowledgeDistillation, OnlineDataSelection
from lightning_slim.demos.modules import CausalLM
from lightning_slim.pruning.depth import choose_layers, keep_layers
from lightning_slim.reporting.measure import macs_of
from real.common import SEQ_LEN, lm_data, lm_loss, smol, trainer, windows


@dataclass(frozen=True)
class Settings:
    keep_layers: int = 20  # of SmolLM2's 30
    calibration_windows: int = 16  # validation windows that choose the layers
    super_batch: int = 8  # windows per loader batch
    rows: int = 4  # windows trained on per step
    steps: int = 32
    lr: float = 2e-4
    warmup: int = 4
    alpha: float = 0.5  # KD weight (the task loss gets 1 - alpha)
    temperature: float = 1.0
    eval_every: int = 8
    eval_windows: int | None = 48  # the split's first windows (None: all of them)
    data_seed: int = 0
    selection_seed: int = 0
    limit: dict | None = None  # windows per split (smoke)


FULL = Settings()
SMOKE = Settings(
    calibration_windows=2,
    super_batch=4,
    rows=2,
    steps=2,
    eval_every=1,
    eval_windows=2,
    warmup=1,
    limit={"train": 8, "val": 4, "test": 4},
)


def make_student(teacher: nn.Module, calibration: torch.Tensor, keep: int = FULL.keep_layers) -> tuple[nn.Module, dict]:
    """Today's student: ``teacher``'s copy with the contiguous run of layers whose removal costs the
    least loss on ``calibration`` dropped (:func:`~lightning_slim.pruning.depth.choose_layers`), down
    to ``keep`` layers. Any ``(teacher, calibration) -> (student, info)`` can take its place."""
    student = copy.deepcopy(teacher)
    kept, losses = choose_layers(student, keep, lambda m: lm_loss(m, calibration))
    keep_layers(student, kept)
    return student, {"method": "depth (choose_layers + keep_layers)", "kept_layers": kept, "dropped_loss": losses}


def nonembedding_params(model: nn.Module) -> int:
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embedding)


class Curve(pl.Callback):
    """The student's loss on ``ids`` after every ``every`` optimizer steps (and the last), with the
    selection ledger's counts at that moment (what was trained and scored up to there)."""

    def __init__(self, ids: torch.Tensor, every: int, selection: OnlineDataSelection, kd: KnowledgeDistillation):
        self.ids, self.every, self.selection, self.kd = ids, every, selection, kd
        self.points: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        ledger = self.selection.ledger
        self.points.append(
            {
                "step": step,
                "loss": lm_loss(pl_module.model, self.ids),
                "examples_trained": ledger.examples_trained,
                "examples_seen": ledger.examples_seen,
                "learner_forwards": ledger.learner_forwards,
                "reference_forwards": ledger.reference_forwards,
                "kd_teacher_examples": self.kd.report_rows().get("teacher_examples", 0),
            }
        )


def fit_arm(score: str, student: nn.Module, teacher: nn.Module, s: Settings, eval_ids: torch.Tensor) -> dict:
    module = CausalLM(student.train(), lr=s.lr, warmup=s.warmup)  # from_pretrained gave it in eval mode
    kd = KnowledgeDistillation(teacher=teacher, alpha=s.alpha, temperature=s.temperature)
    reference = {"reference": "teacher", "cache_reference": True} if score == "learnability" else {}
    selection = OnlineDataSelection(
        batch_size=s.rows, score=score, seed=s.selection_seed, histogram_every_n_steps=0, **reference
    )
    curve = Curve(eval_ids, s.eval_every, selection, kd)
    started, cpu = time.time(), time.process_time()
    trainer(s.steps, callbacks=[kd, selection, curve]).fit(
        module, datamodule=lm_data(batch_size=s.super_batch, seed=s.data_seed, limit=s.limit)
    )
    return {
        "curve": curve.points,
        "ledger": selection.ledger.summary(),
        "train_s": round(time.time() - started, 1),  # wall, with the curve's evaluations
        "train_cpu_s": round(time.process_time() - cpu, 1),  # this process's CPU time (all its threads)
    }


def to_target(arm: dict, target: float, macs: dict[str, float]) -> dict | None:
    """Tokens and MACs at the first curve point at or below ``target`` (None: never reached)."""
    point = next((p for p in arm["curve"] if p["loss"] <= target), None)
    if point is None:
        return None
    return {
        "step": point["step"],
        "loss": point["loss"],
        "tokens": point["examples_trained"] * SEQ_LEN,
        "tokens_scored": point["learner_forwards"] * SEQ_LEN,
        "macs": (3 * point["examples_trained"] + point["learner_forwards"]) * macs["student"],
        "reference_macs": point["reference_forwards"] * macs["teacher"],
        "kd_teacher_macs": point["kd_teacher_examples"] * macs["teacher"],
    }


def run(args, student_fn: Callable[[nn.Module, torch.Tensor], tuple[nn.Module, dict]] = make_student) -> dict:
    s = SMOKE if getattr(args, "smoke", False) else FULL
    s = replace(s, **{k: v for k, v in (getattr(args, "selection_settings", None) or {}).items()})
    split = getattr(args, "split", "test")
    torch.manual_seed(0)
    teacher = smol()
    calibration = windows("val")[: s.calibration_windows]
    eval_ids = windows(split)[: s.eval_windows]
    started = time.time()
    student, student_info = student_fn(teacher, calibration)
    student_info["build_s"] = round(time.time() - started, 1)
    student_info["nonembedding_params_ratio"] = nonembedding_params(student) / nonembedding_params(teacher)
    one = eval_ids[:1]
    macs = {
        name: float(macs_of(m, lambda mm: mm(input_ids=one, use_cache=False)))
        for name, m in (("student", student), ("teacher", teacher))
    }
    start_loss, teacher_loss = lm_loss(student, eval_ids), lm_loss(teacher, eval_ids)
    arms = {}
    for score in ("uniform", "learnability"):
        arms[score] = fit_arm(score, copy.deepcopy(student), teacher, s, eval_ids)
        arms[score]["final_loss"] = arms[score]["curve"][-1]["loss"]
        print(f"selection: {score} {arms[score]['final_loss']:.4f} in {arms[score]['train_s']} s", flush=True)
    target = arms["uniform"]["final_loss"]
    reached = {score: to_target(arm, target, macs) for score, arm in arms.items()}
    uniform, learn = reached["uniform"], reached["learnability"]
    return {
        "split": split,
        "settings": asdict(s),
        "teacher_loss": teacher_loss,
        "student_loss_before": start_loss,
        "target_loss": target,
        "uniform_final_loss": target,
        "learnability_final_loss": arms["learnability"]["final_loss"],
        "uniform_tokens": uniform["tokens"],
        "learnability_tokens": None if learn is None else learn["tokens"],
        "uniform_macs": uniform["macs"],
        "learnability_macs": None if learn is None else learn["macs"],
        "learnability_reference_macs": None if learn is None else learn["reference_macs"],
        "kd_teacher_macs": {k: None if v is None else v["kd_teacher_macs"] for k, v in reached.items()},
        "to_target": reached,
        "macs_per_window": macs,
        "student": student_info,
        "arms": arms,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the arm alone (e.g. on the validation split, to choose settings)."""
    import argparse
    import json

    from common import fair_cpu

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], help="settings to override, e.g. rows=2 steps=24")
    p.add_argument("--out")
    args = p.parse_args(argv)
    fair_cpu(args.threads)
    fields = {f: type(getattr(FULL, f)) for f in asdict(FULL) if getattr(FULL, f) is not None}
    args.selection_settings = {k: fields.get(k, int)(v) for k, v in (item.split("=", 1) for item in args.set)}
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
