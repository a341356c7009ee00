"""``make demo``: train on MNIST-1D with lightning-slim callbacks and print what they saved.

W&B runs offline by default (``wandb sync <run dir>`` uploads it later); set
``WANDB_MODE=online`` with your W&B credentials configured to log online instead.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from lightning_slim.data import MNIST1DDataModule
from lightning_slim.models import MNIST1DCNN
from lightning_slim.report import CompressionReport


def wandb_logger(save_dir: Path, name: str) -> WandbLogger:
    online = os.environ.get("WANDB_MODE") == "online"
    os.environ.setdefault("WANDB_CONSOLE", "off")
    return WandbLogger(project="lightning-slim-demo", name=name, save_dir=str(save_dir), offline=not online)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_output", help="folder for checkpoints, W&B run and report")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=10000)
    args = p.parse_args(argv)
    out = Path(args.out)
    pl.seed_everything(0)
    data = MNIST1DDataModule(num_samples=args.num_samples, batch_size=100)
    report = CompressionReport(accuracy_metric="val/acc", output_path=str(out / "compression_report.json"))
    trainer = pl.Trainer(max_epochs=args.epochs, logger=wandb_logger(out, "cnn"), callbacks=[report],
                         default_root_dir=out)
    trainer.fit(MNIST1DCNN(lr_schedule="cosine"), datamodule=data)
    import wandb

    wandb.finish()
    print(f"\nreport: {report.json_path}\nW&B run (offline): {out / 'wandb'}  ->  `wandb sync` it to upload")
    return report.as_dict()


if __name__ == "__main__":
    main()
