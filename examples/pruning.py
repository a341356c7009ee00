"""Prune an existing LightningModule without touching its code.

    python examples/pruning.py            # lottery ticket, then channel pruning (about a minute on 2 cores)

1. Lottery-ticket IMP with late rewinding: every 2 epochs prune 50% of the remaining Conv/Linear
   weights and rewind weights, optimizer and LR schedule to step 20; the CompressionReport shows
   what is left. 2. Structural pruning: remove 30% of the Conv channels after 2 epochs, save
   checkpoints, and load the small model back from one with ``load_pruned``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_slim import MNIST1DCNN, CompressionReport, IterativeMagnitudePruning, MNIST1DDataModule
from lightning_slim.pruning import load_pruned


def trainer(epochs: int, callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def lottery_ticket(data: MNIST1DDataModule, workdir: Path) -> None:
    pruning = IterativeMagnitudePruning(
        schedule={"kind": "imp", "rounds": 3, "rate": 0.5, "every": 2, "unit": "epoch"},  # 50%, 75%, 87.5%
        rewind="step",
        rewind_step=20,
    )
    report = CompressionReport(accuracy_metric="val/acc", measure_latency=False)
    trainer(8, [pruning, report], enable_checkpointing=False, default_root_dir=workdir).fit(
        MNIST1DCNN(channels=32), datamodule=data
    )
    for round_, sparsity, acc, step in pruning.curve:
        print(f"round {round_}: sparsity {sparsity:.3f}  val/acc {acc:.3f}  (step {step})")
    # report.exported_model is the deployable copy: plain tensors, zeros where pruned, no hooks


def channel_pruning(data: MNIST1DDataModule, workdir: Path) -> None:
    pruning = IterativeMagnitudePruning(
        schedule={"kind": "one_shot", "sparsity": 0.3, "at": 2}, pattern="channels", targets=["Conv1d"], scope="layer"
    )
    ckpt = ModelCheckpoint(dirpath=workdir, save_last=True)
    model = MNIST1DCNN(channels=128, lr=3e-3, lr_schedule="cosine")
    trainer(4, [pruning, ckpt, CompressionReport(accuracy_metric="val/acc")], default_root_dir=workdir).fit(
        model, datamodule=data
    )
    # a fresh model built as usual is resized to the checkpoint's shapes, then loaded
    small = load_pruned(MNIST1DCNN(channels=128), str(workdir / "last.ckpt")).eval()
    x = data.x_test[:256]
    with torch.inference_mode():
        same = torch.equal(small(x).argmax(-1), model.cpu().eval()(x).argmax(-1))
    print(f"loaded {sum(p.numel() for p in small.parameters()):,} parameters; same predictions: {same}")
    # resuming needs nothing special: trainer.fit(MNIST1DCNN(channels=128), ckpt_path=workdir / "last.ckpt")
    # with the same IterativeMagnitudePruning callback resizes the model before the weights load


if __name__ == "__main__":
    pl.seed_everything(0)
    dm = MNIST1DDataModule(num_samples=5000, batch_size=100)
    with tempfile.TemporaryDirectory() as tmp:  # checkpoints and compression_report.json go here
        lottery_ticket(dm, Path(tmp))
        channel_pruning(dm, Path(tmp))
