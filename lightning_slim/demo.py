"""``make demo``: the whole compression pipeline on MNIST-1D, end to end, on a laptop CPU.

1. trains the teacher (``MNIST1DTeacherCNN``, 106k parameters);
2. trains the paper's 5k-parameter CNN as a student in ONE ``Trainer.fit`` with data
   selection (learnability against the teacher), distillation, gradual pruning and
   quantization-aware training, logging to W&B (offline by default: ``wandb sync`` the run
   folder later; ``WANDB_MODE=online`` with your credentials logs online);
3. exports the int8 student, logs it as a W&B artifact and prints teacher vs student:
   accuracy, size, latency, parameters, training examples and compute.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from lightning_slim import log
from lightning_slim.pipeline import find, run_pipeline


def wandb_logger(save_dir: Path, name: str):
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_CONSOLE", "off")
    online = os.environ.get("WANDB_MODE") == "online"
    save_dir.mkdir(parents=True, exist_ok=True)
    return WandbLogger(project="lightning-slim-demo", name=name, save_dir=str(save_dir), offline=not online)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_output", help="folder for the W&B run, the report and the int8 model")
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--student-epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    torch.set_flush_denormal(True)
    logger = wandb_logger(out, "compressed-student")
    summary, trainer = run_pipeline(
        args.num_samples,
        args.teacher_epochs,
        args.student_epochs,
        args.seed,
        logger=logger,
        out=str(out),
        log_every_n_steps=10,
    )
    from lightning_slim.quantization.export import save_int8

    model_path = save_int8(find(trainer, "report").exported_model, torch.zeros(2, 1, 40), out / "student_int8.pt2")
    log.log_artifact(trainer, str(model_path), "compressed-student", metadata=summary)
    log.set_summary(trainer, {f"demo/{k}": v for k, v in summary.items()})
    import wandb

    wandb.finish()
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{'':<22}{'teacher':>14}{'int8 student':>16}")
    for name, t, s in [
        ("test accuracy", summary["teacher_acc"], summary["student_acc"]),
        ("parameters (nonzero)", summary["teacher_params"], summary["student_nonzero_params"]),
        ("bytes as saved", summary["teacher_bytes"], summary["student_bytes"]),
        ("latency ms (b=256)", summary["teacher_latency_ms"], summary["student_latency_ms"]),
    ]:
        fmt = (lambda v: f"{v:.4f}") if isinstance(t, float) else (lambda v: f"{v:,}")
        print(f"{name:<22}{fmt(t):>14}{fmt(s):>16}")
    print(
        f"(the same student in fp32: {summary['student_fp32_latency_ms']:.2f} ms; int8 kernels pay off only on CPUs "
        "with int8 dot-product units, VNNI/AMX)"
    )
    print(
        f"\nsize {summary['size_ratio']:.1f}x smaller, {summary['latency_speedup']:.1f}x faster; training compute "
        f"(teacher and scoring forwards included) {summary['train_compute_ratio']:.2f}x the teacher's own; the "
        f"student trained on {summary['examples_trained']:,} of the {summary['examples_seen']:,} examples it saw"
    )
    print(f"int8 model: {model_path} (torch.export; load with lightning_slim.quantization.export.load_int8)")
    print(f"W&B run (offline): {out / 'wandb'}  ->  `wandb sync` it to upload")
    return summary


if __name__ == "__main__":
    main()
