"""The ``smol_student`` arm's KD recovery with a *corrected* teacher: SmolLM2 first fine-tuned on the
same training windows (Minitron's "teacher correction", Sreenivas et al. 2024: distil from a teacher
adapted to the distillation data, not from the untouched one).

Why: in ``smol_student`` and ``smol_2of4`` plain fine-tuning beat KD, and both students ended below the
untouched teacher's test loss: on this in-domain text the untouched teacher is a worse model than the
student becomes, so its soft targets pull the student back. Same student (``make_student``), same
recovery (``recover``: steps, batch, learning rate, alpha, temperature, top-k, data order) as
``smol_student``'s KD arm; only the teacher differs. No setting was tuned for this arm: the teacher's
fine-tuning uses the dense fine-tuning rate the ``smol_2of4`` arm uses (1e-4) for the student's budget.

    python benchmarks/real_models.py --arms smol_student_corrected
"""

from __future__ import annotations

import copy
import time

import torch

from lightning_slim.demos.modules import CausalLM
from real.common import SEQ_LEN, lm_data, lm_loss, ppl, smol, trainer
from real.smol_student import BATCH, LR, make_student, recover, sizes

TEACHER_LR = 1e-4  # the smol_2of4 arm's dense fine-tuning rate


def corrected_teacher(teacher, steps: int, limit=None):
    """A copy of ``teacher`` fine-tuned ``steps`` steps on the training windows (same order, seed 0)."""
    model = copy.deepcopy(teacher).train()
    torch.manual_seed(0)
    trainer(steps).fit(CausalLM(model, lr=TEACHER_LR, warmup=10), datamodule=lm_data(BATCH, seed=0, limit=limit))
    return model.eval()


def run(args) -> dict:
    started = time.time()
    steps, budgets, n_calib, n_search, depths, heads, test, limit = sizes(bool(getattr(args, "smoke", False)))

    teacher = smol()
    student, search, magnitude = make_student(teacher, n_calib, n_search, depths, heads)
    del magnitude
    teacher_loss, pruned_loss = lm_loss(teacher, test), lm_loss(student, test)
    corrected = corrected_teacher(teacher, steps, limit)
    corrected_loss = lm_loss(corrected, test)
    del teacher
    curve = recover(student, test, steps, budgets, LR["kd"], teacher=corrected, limit=limit)
    gap = pruned_loss - teacher_loss
    return {
        "teacher_loss": teacher_loss,
        "corrected_teacher_loss": corrected_loss,
        "pruned_loss": pruned_loss,
        "kd_corrected_loss": curve[steps],
        "kd_corrected_gap_recovered": (pruned_loss - curve[steps]) / gap,
        "per_budget": [{"step": s, "tokens": s * BATCH * SEQ_LEN, "kd_corrected_loss": curve[s]} for s in budgets],
        "ppl": {
            "teacher": ppl(teacher_loss),
            "corrected_teacher": ppl(corrected_loss),
            "kd_corrected": ppl(curve[steps]),
        },
        "student": {k: search[k] for k in ("layers", "kv_heads", "queries_per_kv", "intermediate_size")},
        "tokens": steps * BATCH * SEQ_LEN,
        "teacher_correction": {"steps": steps, "lr": TEACHER_LR, "tokens": steps * BATCH * SEQ_LEN},
        "arm_s": round(time.time() - started, 1),
    }
