"""``make demo``: the whole compression pipeline on MNIST-1D, end to end, on a laptop CPU.

1. trains the teacher (``MNIST1DTeacherCNN``, 106k parameters);
2. trains an 8.0k-parameter CNN (the paper's CNN at 32 channels, 1/13 of the teacher) as a student
   in ONE ``Trainer.fit`` with distillation (teacher outputs cached), gradual pruning to 30% and
   quantization-aware training, logging to W&B
   (offline by default: ``wandb sync`` the run folder later; ``WANDB_MODE=online`` with your
   credentials logs online). Data selection (``--keep``) is off by default: on clean data it
   costs accuracy and saves no compute (the selection method card); it is the recipe for noisy
   or redundant data;
3. exports the int8 student as an ONNX file served by ONNX Runtime, logs it as a W&B artifact
   and prints teacher vs student (accuracy on the test split, bytes as saved, latency), the
   student in fp32 eager / fp32 ONNX Runtime / int8 ONNX Runtime side by side, and the issue's
   targets (within 2 points, >= 20x smaller, >= 3x faster).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from lightning_slim.core import log
from lightning_slim.demos.pipeline import find, run_pipeline


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
    p.add_argument("--student-epochs", type=int, default=20)
    p.add_argument("--keep", type=float, default=None, help="data selection: train on this fraction (default: off)")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--channels", type=int, default=32, help="the student MNIST1DCNN's width (25: the paper's CNN)")
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
        keep=args.keep,
        sparsity=args.sparsity,
        channels=args.channels,
        log_every_n_steps=10,
    )
    from lightning_slim.quantization.export import save_int8
    from lightning_slim.quantization.serving import OrtModel

    student = find(trainer, "report").exported_model
    suffix = ".onnx" if isinstance(student, OrtModel) else ".pt2"
    model_path = save_int8(student, torch.zeros(2, 1, 40), out / f"student_int8{suffix}")
    log.log_artifact(trainer, str(model_path), "compressed-student", metadata=_scalars(summary))
    log.set_summary(trainer, {f"demo/{k}": v for k, v in _scalars(summary).items()})
    import wandb

    wandb.finish()
    summary["model_path"] = str(model_path)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(closing_table(summary))
    return summary


def _scalars(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}


def closing_table(summary: dict) -> str:
    """Teacher vs int8 student, the student's serving table, and the targets met or missed."""
    lines = [f"\n{'':<24}{'teacher (fp32)':>16}{'int8 student':>16}"]
    for name, t, s in [
        ("test accuracy", summary["teacher_acc"], summary["student_acc"]),
        ("parameters (nonzero)", summary["teacher_params"], summary["student_nonzero_params"]),
        ("bytes as saved", summary["teacher_bytes"], summary["student_bytes"]),
        ("latency ms (batch 256)", summary["teacher_latency_ms"], summary["student_latency_ms"]),
    ]:
        fmt = (lambda v: f"{v:.4f}") if isinstance(t, float) else (lambda v: f"{v:,}")
        lines.append(f"{name:<24}{fmt(t):>16}{fmt(s):>16}")
    serving = summary.get("student_serving", {})
    for key in (k for k in serving if k.startswith("batch_")):
        row = serving[key]
        lines.append(
            f"student at batch {key.removeprefix('batch_')}: fp32 eager {row['fp32_eager_ms']:.3f} ms, fp32 ONNX "
            f"Runtime {row.get('fp32_runtime_ms', float('nan')):.3f} ms, int8 {row['deployed_ms']:.3f} ms"
        )
    gap = summary["teacher_acc"] - summary["student_acc"]
    met = lambda ok: "met" if ok else "MISSED"
    lines.append(
        f"\naccuracy {100 * gap:+.2f} points below the teacher (target <= 2: {met(gap <= 0.02)}); "
        f"{summary['size_ratio']:.1f}x smaller (target >= 20: {met(summary['size_ratio'] >= 20)}); "
        f"{summary['latency_speedup']:.1f}x faster (target >= 3: {met(summary['latency_speedup'] >= 3)})"
    )
    lines.append(
        f"training compute (teacher and scoring forwards included) {summary['train_compute_ratio']:.2f}x the "
        f"teacher's own; the student trained on {summary['examples_trained']:,} of the "
        f"{summary['examples_seen']:,} examples it saw"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
