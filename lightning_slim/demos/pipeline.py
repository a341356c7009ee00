"""All four techniques on one student in one ``Trainer.fit``: the recipe the demo and the
pipeline benchmark run, and the accounting that compares the result with the teacher.

Order of effects (see :mod:`lightning_slim.core.compose`): data selection picks each step's
sub-batch (learnability against the teacher), distillation adds its term on that sub-batch,
the student trains with fake-quantized weights/activations once QAT starts, pruning masks
are re-applied after every optimizer step, and the export makes the masks permanent before
converting to int8.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_slim.reporting.measure import count_macs, cpu_latency_ms, shipped_bytes


def compression_callbacks(
    teacher: nn.Module,
    epochs: int,
    keep: float | None = 0.5,
    sparsity: float = 0.5,
    alpha: float = 0.7,
    temperature: float = 4.0,
    report_path: str | None = None,
    measure_latency: bool = True,
) -> list[pl.Callback]:
    """The four technique callbacks plus a CompressionReport, configured for ``epochs`` of training
    (``keep=None``: no data selection, the recipe for clean data, where it does not pay).

    Pruning reaches ``sparsity`` gradually over the first ~60% of training, QAT starts after
    the pruning ends (so the int8 ranges are learnt on the final sparse weights), and both
    the teacher's outputs and its reference losses are cached by example index (batches
    must carry indices: ``MNIST1DDataModule(with_index=True)``).
    """
    from lightning_slim import (
        CompressionReport,
        IterativeMagnitudePruning,
        KnowledgeDistillation,
        OnlineDataSelection,
        QuantizationAwareTraining,
    )

    if epochs < 3:
        raise ValueError(f"epochs={epochs!r}: the pipeline needs at least 3 epochs (prune, then quantize)")
    prune_end = max(1, round(0.6 * epochs))
    selection = (
        []
        if keep is None
        else [OnlineDataSelection(keep=keep, score="learnability", reference="teacher", cache_reference=True)]
    )
    return [
        *selection,
        KnowledgeDistillation(teacher=teacher, alpha=alpha, temperature=temperature, cache_teacher=True),
        IterativeMagnitudePruning(
            {"kind": "gradual", "final_sparsity": sparsity, "start": 0, "end": prune_end, "every": 1, "unit": "epoch"}
        ),
        QuantizationAwareTraining(start_after=prune_end, freeze_bn_after=None),
        CompressionReport(accuracy_metric="val/acc", output_path=report_path, measure_latency=measure_latency),
    ]


def find(trainer: pl.Trainer, technique: str):
    """The callback of ``technique`` in the trainer, or None."""
    from lightning_slim.core.compose import techniques

    return next((cb for cb in techniques(trainer) if cb.technique == technique), None)


def training_compute(trainer: pl.Trainer, student: nn.Module, teacher: nn.Module, example) -> dict[str, float]:
    """The student pipeline's training compute in MACs: student training (3 units a trained
    example), selection's scoring forwards (1), and every teacher forward (distillation and
    the selection reference)."""
    student_macs, teacher_macs = count_macs(student, example[:1]), count_macs(teacher, example[:1])
    kd = find(trainer, "distillation").report_rows()
    selection = find(trainer, "selection")
    if selection is not None:
        sel = selection.report_rows()
    else:  # every example seen is trained on, and none is scored
        trained = kd["student_examples"]
        sel = {"examples_seen": trained, "examples_trained": trained, "scoring_forwards": 0, "reference_forwards": 0}
    teacher_forwards = kd["teacher_examples"] + sel["reference_forwards"]
    total = student_macs * (3 * sel["examples_trained"] + sel["scoring_forwards"]) + teacher_macs * teacher_forwards
    return {
        "student_macs_per_example": student_macs,
        "teacher_macs_per_example": teacher_macs,
        "examples_seen": sel["examples_seen"],
        "examples_trained": sel["examples_trained"],
        "teacher_forwards": teacher_forwards,
        "pipeline_macs": total,
    }


def compare_deployables(models: dict[str, nn.Module], example, repeats: int = 20) -> dict[str, Any]:
    """Bytes as saved and CPU latency of each model, timed side by side (interleaved rounds,
    median of rounds) so drift on a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(3):
        for name, model in models.items():
            times[name].append(cpu_latency_ms(model, example, warmup=2, repeats=repeats))
    out: dict[str, Any] = {}
    for name, model in models.items():
        out[f"{name}_bytes"] = shipped_bytes(model)
        out[f"{name}_latency_ms"] = sorted(times[name])[1]
    return out


def train_teacher(data, epochs: int, root: str) -> tuple[nn.Module, int]:
    """Train ``MNIST1DTeacherCNN``; returns (teacher, training examples)."""
    from lightning_slim.demos.models import MNIST1DTeacherCNN

    teacher = MNIST1DTeacherCNN(lr=3e-3, lr_schedule="cosine")
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, default_root_dir=root, enable_checkpointing=False, enable_model_summary=False
    )
    trainer.fit(teacher, datamodule=data)
    examples = trainer.global_step * data.batch_size  # full batches: drop nothing, count nothing twice
    return teacher.eval(), min(examples, epochs * len(data.y_train))


def run_pipeline(
    num_samples: int = 20000,
    teacher_epochs: int = 8,
    student_epochs: int = 20,
    seed: int = 0,
    logger: Any = False,
    out: str = "pipeline_output",
    keep: float | None = None,
    sparsity: float = 0.3,
    channels: int = 32,
    validation: bool = False,
    **trainer_kwargs,
) -> tuple[dict[str, Any], pl.Trainer]:
    """Teacher, then the compressed student (``MNIST1DCNN(channels)``) in one fit; returns
    (summary, the student's trainer).

    The summary compares the teacher (fp32) with the exported int8 student: accuracy on the
    test split (``validation=True``: on a clean 20% holdout carved from the training split, to
    choose settings without looking at the test split), bytes as saved, CPU latency at batch 256
    (side by side), and the training compute of the whole pipeline (teacher and scoring forwards
    included) over the teacher's.
    """
    from lightning_slim.demos.data import MNIST1DDataModule
    from lightning_slim.demos.models import MNIST1DCNN
    from lightning_slim.reporting.report import classification_accuracy

    pl.seed_everything(seed, verbose=False)
    data = MNIST1DDataModule(
        num_samples=num_samples, batch_size=128, with_index=True, seed=seed, holdout_fraction=0.2 if validation else 0.0
    )
    data.setup()
    teacher, teacher_examples = train_teacher(data, teacher_epochs, f"{out}/teacher")
    data.batch_size = round(128 / (keep or 1.0))  # super-batches: the student trains on 128 per step
    student = MNIST1DCNN(channels=channels, lr=1e-2, lr_schedule="cosine")
    callbacks = compression_callbacks(
        teacher, student_epochs, keep=keep, sparsity=sparsity, report_path=f"{out}/compression_report.json"
    )
    trainer = pl.Trainer(
        max_epochs=student_epochs, logger=logger, callbacks=callbacks, default_root_dir=out, **trainer_kwargs
    )
    trainer.fit(student, datamodule=data)
    report = find(trainer, "report")
    int8 = report.exported_model
    example = data.x_test[:256]
    scored = data.holdout_dataloader() if validation else data.test_dataloader()
    summary = {
        "split": "holdout" if validation else "test",
        "teacher_acc": classification_accuracy(teacher.cpu(), scored),
        "student_acc": classification_accuracy(int8, scored),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "student_nonzero_params": report.after["nonzero_params"],
        **compare_deployables({"teacher": teacher.cpu(), "student": int8}, example),
        **training_compute(trainer, student, teacher, example),
    }
    if report.serving:  # the same student in fp32 eager and fp32 in the runtime, timed beside the int8 one
        summary["student_serving"] = report.serving
    summary["latency_speedup"] = summary["teacher_latency_ms"] / summary["student_latency_ms"]
    summary["teacher_train_macs"] = 3 * teacher_examples * summary["teacher_macs_per_example"]
    summary["size_ratio"] = summary["teacher_bytes"] / summary["student_bytes"]
    summary["train_compute_ratio"] = summary["pipeline_macs"] / summary["teacher_train_macs"]
    return summary, trainer
