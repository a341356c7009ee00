"""Minitron-style student of SmolLM2-135M-Instruct: cut to about half of its non-embedding
parameters by activation importance, then recovered in a Lightning ``Trainer`` with
``KnowledgeDistillation`` from SmolLM2 (top-k cached teacher) vs plain fine-tuning at equal tokens.

1. Importance: ``activation_importance`` on ``CALIBRATION`` training windows (MLP channels, heads
   per query head, the residual-stream angle between layers).
2. The student: ``cut_student`` cuts every shape of ``DEPTHS`` x ``HEADS`` with the MLP width that
   holds ``RATIO`` of the non-embedding parameters and keeps the one with the lowest loss on
   ``SEARCH`` validation windows. The same shape and layers cut by weight magnitude (the L2 scores
   of torch-pruning's ``MagnitudeImportance``, what the structured path used) is the baseline.
3. Recovery: ``demos.modules.CausalLM`` (the user-style module, no ``forward``) around a copy of the
   student, trained ``STEPS`` steps of ``BATCH`` x 128 tokens, the same data order (seed 0) in both
   arms; the test loss is measured at each of ``BUDGETS`` steps along each run.

Settings were chosen on the validation split (``python benchmarks/real/smol_student.py --tune``
prints the sweep); every reported loss is mean next-token nats on the test split.

    python benchmarks/real_models.py --arms smol_student           # about 20 minutes on 2 quiet cores
    python benchmarks/real_models.py --arms smol_student --smoke   # the plumbing, about a minute
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

if __name__ == "__main__":  # run as a script (--tune): the benchmarks folder on the path, as the driver does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_slim import KnowledgeDistillation
from lightning_slim.demos.modules import CausalLM
from lightning_slim.pruning.activations import activation_importance, weight_importance
from lightning_slim.pruning.student import StudentShape, cut, cut_student, nonembedding_parameters
from real.common import SEQ_LEN, lm_data, lm_loss, ppl, smol, trainer, windows

RATIO = 0.5  # of the teacher's non-embedding parameters
CALIBRATION = 16  # training windows (2,048 tokens) for the activation statistics
SEARCH = 16  # validation windows the student shape is chosen on
DEPTHS = (30, 27, 24)  # layers kept: the search grid (a wider grid measured: see the method card)
HEADS = ((3, 3), (2, 3))  # (key/value groups, query heads per group); within-group cuts measured far worse
BATCH = 4
STEPS = 100  # 51,200 tokens: about 20 minutes for the arm on 2 quiet cores
BUDGETS = (25, 50, 100)  # steps at which the test loss is measured along each run
LR = {"kd": 3e-4, "plain": 3e-4}
KD = dict(alpha=0.5, temperature=1.0)
TOP_K = 64  # teacher probabilities cached per token


class BudgetLoss(pl.Callback):
    """Measures the wrapped model's loss on ``ids`` after the optimizer steps in ``steps`` (the loss
    of the model trained on ``step * batch * 128`` tokens), in eval mode without gradients."""

    def __init__(self, ids: torch.Tensor, steps: tuple[int, ...]):
        self.ids, self.steps, self.losses = ids, set(steps), {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps and trainer.global_step not in self.losses:
            self.losses[trainer.global_step] = lm_loss(pl_module.model, self.ids)


def recover(student, ids, steps, budgets, lr, teacher=None, kd=None, limit=None) -> dict[int, float]:
    """Train a copy of ``student`` in a Trainer, with ``KnowledgeDistillation(**kd)`` from
    ``teacher`` (top-k cache) when given; returns ``{step: loss on ids}`` at each budget."""
    model = copy.deepcopy(student).train()
    callbacks = [BudgetLoss(ids, budgets)]
    if teacher is not None:
        callbacks.append(KnowledgeDistillation(teacher=teacher, cache_teacher={"top_k": TOP_K}, **(kd or KD)))
    torch.manual_seed(0)
    trainer(steps, callbacks).fit(CausalLM(model, lr=lr, warmup=10), datamodule=lm_data(BATCH, seed=0, limit=limit))
    return callbacks[0].losses


def make_student(teacher, n_calib: int, n_search: int, depths, heads):
    """``(student, search report, weight-magnitude student of the same shape and layers)``."""
    train_ids, val_ids = windows("train"), windows("val")
    calibration = [{"input_ids": train_ids[i : i + 8]} for i in range(0, n_calib, 8)]
    scores = activation_importance(teacher, calibration)
    student, search = cut_student(teacher, scores, RATIO, lambda m: lm_loss(m, val_ids[:n_search]), depths, heads)
    shape = StudentShape(*(search[k] for k in ("layers", "kv_heads", "queries_per_kv", "intermediate_size")))
    magnitude = copy.deepcopy(teacher)
    cut(magnitude, shape, weight_importance(teacher), search["kept_layers"])
    return student, search, magnitude


def sizes(smoke: bool) -> tuple:
    """``(steps, budgets, n_calib, n_search, depths, heads, test windows, data limit)`` of a run, or of
    its plumbing-only smoke version (shared with ``smol_student_corrected``)."""
    if smoke:
        return 2, (1, 2), 2, 2, (30, 24), ((3, 3),), windows("test")[:2], {"train": 8 * BATCH, "val": 2, "test": 2}
    return STEPS, BUDGETS, CALIBRATION, SEARCH, DEPTHS, HEADS, windows("test"), None


def run(args) -> dict:
    started = time.time()
    smoke = bool(getattr(args, "smoke", False))
    steps, budgets, n_calib, n_search, depths, heads, test, limit = sizes(smoke)

    teacher = smol()
    student, search, magnitude = make_student(teacher, n_calib, n_search, depths, heads)
    pruned_at = time.time() - started

    teacher_loss, pruned_loss = lm_loss(teacher, test), lm_loss(student, test)
    magnitude_loss = lm_loss(magnitude, test)
    del magnitude
    curves = {
        "kd": recover(student, test, steps, budgets, LR["kd"], teacher=teacher, limit=limit),
        "plain": recover(student, test, steps, budgets, LR["plain"], limit=limit),
    }
    gap = pruned_loss - teacher_loss
    per_budget = [
        {
            "step": s,
            "tokens": s * BATCH * SEQ_LEN,
            **{f"{arm}_loss": curves[arm][s] for arm in curves},
            **{f"{arm}_gap_recovered": (pruned_loss - curves[arm][s]) / gap for arm in curves},
        }
        for s in budgets
    ]
    last = per_budget[-1]
    return {
        "teacher_loss": teacher_loss,
        "pruned_loss": pruned_loss,
        "pruned_loss_weight_magnitude": magnitude_loss,
        "kd_loss": last["kd_loss"],
        "plain_loss": last["plain_loss"],
        "kd_gap_recovered": last["kd_gap_recovered"],
        "plain_gap_recovered": last["plain_gap_recovered"],
        "tokens": last["tokens"],
        "nonembedding_params_ratio": search["params_ratio"],
        "nonembedding_params": {
            "teacher": nonembedding_parameters(teacher),
            "student": nonembedding_parameters(student),
        },
        "ppl": {
            "teacher": ppl(teacher_loss),
            "pruned": ppl(pruned_loss),
            "kd": ppl(last["kd_loss"]),
            "plain": ppl(last["plain_loss"]),
        },
        "per_budget": per_budget,
        "student": {k: search[k] for k in ("layers", "kv_heads", "queries_per_kv", "intermediate_size", "kept_layers")},
        "search": {"split": "val", "windows": n_search, "candidates": search["candidates"]},
        "settings": {
            "ratio": RATIO,
            "calibration_windows": n_calib,
            "depths": list(depths),
            "heads": [list(h) for h in heads],
            "batch": BATCH,
            "steps": steps,
            "lr": LR,
            "kd": {**KD, "top_k": TOP_K, "cache": True},
            "seed": 0,
            "test_windows": len(test),
        },
        "prune_s": round(pruned_at, 1),
    }


TUNE_STEPS = 40  # shorter than STEPS: the sweep costs 8 runs
TUNE_WINDOWS = 32  # validation windows each setting is judged on
# the sweep: (arm, lr, KD arguments); KD's alpha / temperature variants at plain's best rate (3e-4)
TRIALS = [
    *[("plain", lr, None) for lr in (1e-4, 3e-4, 1e-3)],
    *[("kd", lr, dict(alpha=0.5, temperature=1.0)) for lr in (1e-4, 3e-4, 1e-3)],
    ("kd", 3e-4, dict(alpha=1.0, temperature=1.0)),
    ("kd", 3e-4, dict(alpha=0.5, temperature=2.0)),
    # from the corrected teacher (smol_student_corrected): Minitron distils with the KD term alone
    *[("kd_corrected", 3e-4, dict(alpha=alpha, temperature=1.0)) for alpha in (0.5, 1.0)],
]


def tune(trials: list[int], out: Path) -> dict:
    """Run the ``TRIALS`` numbered ``trials`` on the validation split, adding each row to ``out``
    as it ends (so the sweep can be split across processes and resumed)."""
    teacher = smol()
    student, search, _ = make_student(teacher, CALIBRATION, SEARCH, DEPTHS, HEADS)
    corrected = None
    if any(TRIALS[i][0] == "kd_corrected" for i in trials):
        from real.smol_student_corrected import corrected_teacher  # it imports this module

        corrected = corrected_teacher(teacher, STEPS)
    ids = windows("val")[:TUNE_WINDOWS]
    pruned = {"arm": "pruned", "val_loss": lm_loss(student, ids), "intermediate_size": search["intermediate_size"]}
    for i in trials:
        arm, lr, kd = TRIALS[i]
        started = time.time()
        distil_from = {"plain": None, "kd": teacher, "kd_corrected": corrected}[arm]
        loss = recover(student, ids, TUNE_STEPS, (TUNE_STEPS,), lr, distil_from, kd)[TUNE_STEPS]
        row = {
            "trial": i,
            "arm": arm,
            "lr": lr,
            **(kd or {}),
            "val_loss": loss,
            "wall_s": round(time.time() - started, 1),
        }
        print(row, flush=True)
        done = json.loads(out.read_text()) if out.exists() else {"rows": []}
        rows = sorted([r for r in done["rows"] if r.get("trial") != i] + [row], key=lambda r: r["trial"])
        out.write_text(
            json.dumps(
                {"pruned": pruned, "rows": rows, "tune_steps": TUNE_STEPS, "val_windows": TUNE_WINDOWS, "batch": BATCH},
                indent=1,
            )
            + "\n"
        )
    return json.loads(out.read_text())


if __name__ == "__main__":
    import argparse

    from common import fair_cpu

    parser = argparse.ArgumentParser(description="the validation sweep of the smol_student arm")
    parser.add_argument("--tune", action="store_true", required=True)
    parser.add_argument("--trials", type=int, nargs="+", default=list(range(len(TRIALS))), help="indices into TRIALS")
    parser.add_argument("--out", default="benchmarks/results/smol_student_tune.json")
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args()
    fair_cpu(options.threads)
    tune(options.trials, Path(options.out))
