"""lightning-slim on a LightningModule of your own: a small CNN on scikit-learn's 8x8 digits, written as
anyone would write it (nothing in it knows about lightning-slim), then three callbacks on a plain Trainer:
gradual pruning to 50%, int8 quantization-aware training exported to ONNX, and the compression report.

python examples/quickstart.py      (needs scikit-learn: pip install "lightning-slim[demo]"; ~20 s on a laptop CPU)
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_slim import CompressionReport, IterativeMagnitudePruning, QuantizationAwareTraining


class DigitsClassifier(pl.LightningModule):
    """Your model: its own layer names, its own metric name (``val_acc``), ``(x, y)`` batches."""

    def __init__(self, width: int = 32, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()
        )
        self.classifier = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * 16, 10))
        self.example_input_array = torch.zeros(1, 1, 8, 8)  # Lightning's summary (and structural pruning) use it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class DigitsData(pl.LightningDataModule):
    """Your data: scikit-learn's bundled digits (1,797 images, nothing downloaded), 80/20 split."""

    def __init__(self, batch_size: int = 64):
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        split = len(y) * 4 // 5
        self.train_set = TensorDataset(x[order[:split]], y[order[:split]])
        self.val_set = TensorDataset(x[order[split:]], y[order[split:]])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=len(self.val_set))


def main() -> pl.Trainer:
    pl.seed_everything(0)
    prune = {"kind": "gradual", "final_sparsity": 0.5, "start": 0, "end": 4, "every": 1, "unit": "epoch"}
    trainer = pl.Trainer(
        max_epochs=8,
        logger=False,
        callbacks=[
            IterativeMagnitudePruning(prune, accuracy_metric="val_acc"),  # 50% of the weights zero by epoch 4
            QuantizationAwareTraining(start_after=4, export_path="digits_int8.onnx"),  # int8 from epoch 4 on
            CompressionReport(accuracy_metric="val_acc", output_path="compression_report.json"),
        ],
    )
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())
    return trainer


if __name__ == "__main__":
    main()
