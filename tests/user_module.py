"""A user's own LightningModule and data, as plain as they come: layer names no config knows, the
metric logged as ``val_acc`` (not this library's ``val/acc``), ``(x, y)`` batches, random 8x8 "digits".
Tests copy it next to a script or put this folder on ``PYTHONPATH``: it imports nothing from the tests."""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Digits(pl.LightningModule):
    def __init__(self, width: int = 16):
        super().__init__()
        self.example_input_array = torch.zeros(1, 1, 8, 8)
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
        self.pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        return self.out(self.pool(self.body(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class RandomDigits(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=32)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=96)
