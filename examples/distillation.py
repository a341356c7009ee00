"""Distil a 106k-parameter teacher into the 5k-parameter MNIST-1D CNN with one callback.

    python examples/distillation.py            # about a minute on 2 CPU cores
    python examples/distillation.py --wandb    # also log to an offline W&B run

1. Train the teacher like any model and keep its checkpoint.
2. Add ``KnowledgeDistillation`` to the student's Trainer: the student's module is unchanged.
   (From YAML: ``--config callbacks/distillation.yaml`` with ``teacher_checkpoint`` set to the path.)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning.pytorch as pl

from lightning_slim import MNIST1DCNN, CompressionReport, KnowledgeDistillation, MNIST1DDataModule, MNIST1DTeacherCNN


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--wandb", action="store_true")
    args = p.parse_args()
    pl.seed_everything(0)
    out = Path(tempfile.mkdtemp(prefix="slim_kd_"))
    # with_index=True: batches are (x, y, index), so the teacher's outputs can be cached per example
    data = MNIST1DDataModule(num_samples=args.num_samples, with_index=True)

    teacher = MNIST1DTeacherCNN(lr_schedule="cosine")
    trainer = pl.Trainer(max_epochs=args.epochs, logger=False, enable_progress_bar=False, default_root_dir=out)
    trainer.fit(teacher, datamodule=data)
    ckpt = out / "teacher.ckpt"
    trainer.save_checkpoint(ckpt)

    kd = KnowledgeDistillation(
        teacher_checkpoint=str(ckpt),
        teacher_class="lightning_slim.MNIST1DTeacherCNN",  # or teacher=teacher
        alpha=0.9,
        temperature=4.0,  # (1 - alpha) * your loss + alpha * T^2 * KL(teacher || student)
        cache_teacher=True,  # the teacher runs once per training example
    )
    logger = False
    if args.wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(offline=True, save_dir=str(out), project="lightning-slim-examples")
    student = MNIST1DCNN(lr_schedule="cosine")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=logger,
        log_every_n_steps=10,
        enable_progress_bar=False,
        default_root_dir=out,
        callbacks=[kd, CompressionReport(accuracy_metric="val/acc")],
    )
    trainer.fit(student, datamodule=data)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "slim/"))}
    print(
        f"student val/acc {metrics['val/acc']}, teacher-student agreement "
        f"{metrics.get('slim/distillation/agreement')}; teacher forward examples {kd.counts['teacher_examples']} "
        f"for {kd.counts['student_examples']} student examples; cache {kd.cache.nbytes / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
