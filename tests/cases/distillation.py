"""KnowledgeDistillation in the generic suite: teacher built from a checkpoint + class path (as in
YAML), logit KD, one feature pair with a learned projection, and the teacher-output cache."""

from __future__ import annotations

import functools
import os

import lightning
import torch

from lightning_slim.demos.data import cache_dir
from lightning_slim.demos.models import MNIST1DTeacherCNN
from lightning_slim.distillation import KnowledgeDistillation
from lightning_slim.distillation.callback import PROJECTIONS

from . import Case, small_data


def teacher_checkpoint() -> str:
    """A deterministic 32-channel teacher saved as a Lightning checkpoint (built once, atomically)."""
    path = cache_dir() / "distillation_test_teacher.ckpt"
    if not path.exists():
        with torch.random.fork_rng():  # leave the global RNG alone
            torch.manual_seed(1234)
            teacher = MNIST1DTeacherCNN(channels=32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(
            {
                "state_dict": teacher.state_dict(),
                "hyper_parameters": dict(teacher.hparams),
                "pytorch-lightning_version": lightning.__version__,
            },
            tmp,
        )
        tmp.replace(path)
    return str(path)


def make_callback() -> KnowledgeDistillation:
    return KnowledgeDistillation(
        teacher_checkpoint=teacher_checkpoint(),
        teacher_class="lightning_slim.MNIST1DTeacherCNN",
        alpha=0.5,
        temperature=4.0,
        features={"pairs": {"net.5": "net.8"}},
        cache_teacher=True,
    )


def _check(trainer, module, cb):
    teacher = cb.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # the teacher is neither saved with the student nor seen by its optimizer
    assert all(k.startswith(("net.", PROJECTIONS)) for k in module.state_dict())
    in_opt = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in teacher.parameters())
    assert all(id(p) in in_opt for p in getattr(module, PROJECTIONS).parameters())
    # the cache made the teacher run once per training example (800), not once per step (3 epochs)
    assert cb.counts["teacher_examples"] == 800 and cb.counts["student_examples"] == 2400
    assert cb.counts["cache_hits"] == 1600 and len(cb.cache) == 800
    rows = cb.report_rows()
    assert rows["teacher_macs_per_example"] > 0 and rows["cache_bytes"] > 0
    for key in ("kd_loss", "task_loss", "feature_loss", "agreement"):
        assert torch.isfinite(trainer.callback_metrics[f"slim/distillation/{key}"])
    assert "training_step" not in module.__dict__ and not module._forward_hooks


def _check_module(module):
    # ddp_spawn returns weights only (loaded non-strictly): the student, with no hook or wrapper left on it
    assert not module._forward_hooks and "training_step" not in module.__dict__


CASES = [
    Case(
        name="distillation",
        callback=make_callback,
        data=functools.partial(small_data, with_index=True),
        check=_check,
        check_module=_check_module,
        trainer_kwargs={"log_every_n_steps": 4},  # values are logged on Lightning's logging steps only
        cli_args=("--data.with_index=true", f"--trainer.callbacks.init_args.teacher_checkpoint={teacher_checkpoint()}"),
        wandb_keys=(
            "slim/distillation/kd_loss",
            "slim/distillation/task_loss",
            "slim/distillation/agreement",
            "slim/distillation/feature_loss",
            "slim/distillation/cache_hit_rate",
        ),
    )
]
