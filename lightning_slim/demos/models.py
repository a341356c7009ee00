"""Reference LightningModules for the demo, examples, benchmarks and tests.

They are ordinary user code: nothing in them knows about lightning-slim's callbacks.
Each logs ``train/loss``, ``val/loss``, ``val/acc`` and ``test/acc`` (torchmetrics), and
offers ``per_sample_loss(batch)`` for data selection.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_slim.batches import batch_inputs, batch_targets

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("none", "cosine")


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classification around ``self.net`` with a configurable optimizer.

    Subclasses build ``self.net``. ``lr_schedule="cosine"`` decays the learning rate per
    step to zero over the run (``trainer.estimated_stepping_batches``).
    """

    def __init__(
        self,
        lr: float = 1e-2,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        lr_schedule: str = "none",
        momentum: float = 0.9,
        num_classes: int = 10,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={lr_schedule!r} is not one of {LR_SCHEDULES}")
        if not lr > 0:
            raise ValueError(f"lr={lr!r} must be positive")
        self.save_hyperparameters()
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch) -> torch.Tensor:
        return F.cross_entropy(self(batch_inputs(batch)), batch_targets(batch), reduction="none")

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch_inputs(batch)), batch_targets(batch))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits, y = self(batch_inputs(batch)), batch_targets(batch)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.test_acc(self(batch_inputs(batch)), batch_targets(batch))
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if h.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        else:
            cls = torch.optim.Adam if h.optimizer == "adam" else torch.optim.AdamW
            opt = cls(params, lr=h.lr, weight_decay=h.weight_decay)
        if h.lr_schedule == "none":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _conv_stack(
    conv: type[nn.Module],
    bn: type[nn.Module],
    channels: int,
    batch_norm: bool,
    first: tuple[int, int, int],
    rest: tuple[int, int, int],
    depth: int,
    in_ch: int = 1,
):
    layers, c_in = [], in_ch
    for i in range(depth):
        k, s, p = first if i == 0 else rest
        layers.append(conv(c_in, channels, k, stride=s, padding=p))
        if batch_norm:
            layers.append(bn(channels))
        layers.append(nn.ReLU())
        c_in = channels
    return layers


class MNIST1DCNN(ClassifierModule):
    """The MNIST-1D paper's CNN: three stride-2 Conv1d layers and a linear classifier.

    With the default 25 channels it has 5,210 parameters (the paper reports 94% test accuracy).
    Wider ``channels`` and ``batch_norm=True`` give the teacher / conv-QAT variants.
    """

    def __init__(self, channels: int = 25, batch_norm: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.example_input_array = torch.zeros(1, 1, 40)
        self.net = nn.Sequential(
            *_conv_stack(nn.Conv1d, nn.BatchNorm1d, channels, batch_norm, (5, 2, 1), (3, 2, 1), 3),
            nn.Flatten(),
            nn.Linear(channels * 5, self.hparams.num_classes),
        )


class MNIST1DTeacherCNN(MNIST1DCNN):
    """A wider, batch-normalised MNIST-1D CNN that serves as a distillation teacher."""

    def __init__(self, channels: int = 128, batch_norm: bool = True, **kwargs):
        super().__init__(channels=channels, batch_norm=batch_norm, **kwargs)


class MNIST1DMLP(ClassifierModule):
    """The MNIST-1D paper's MLP: 40-100-100-10 with ReLU (the paper reports 68%)."""

    def __init__(self, hidden: int = 100, depth: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.example_input_array = torch.zeros(1, 1, 40)
        layers, width = [nn.Flatten()], 40
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, self.hparams.num_classes))


class _Block(nn.Module):
    """Pre-norm transformer block built from nn.Linear only (so Linear-only QAT covers it)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


class _PatchTransformer(nn.Module):
    def __init__(self, length: int, patch: int, dim: int, depth: int, heads: int, num_classes: int):
        super().__init__()
        if length % patch:
            raise ValueError(f"patch={patch} must divide the sequence length {length}")
        self.patch = patch
        self.embed = nn.Linear(patch, dim)
        self.position = nn.Embedding(length // patch, dim)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        tokens = self.embed(x.flatten(1).unflatten(1, (-1, self.patch)))
        tokens = tokens + self.position.weight
        return self.head(self.norm(self.blocks(tokens)).mean(1))


class MNIST1DTransformer(ClassifierModule):
    """A tiny patch transformer for MNIST-1D: Linear- and Embedding-heavy."""

    def __init__(self, patch: int = 5, dim: int = 64, depth: int = 2, heads: int = 4, **kwargs):
        kwargs.setdefault("lr", 3e-3)
        super().__init__(**kwargs)
        self.example_input_array = torch.zeros(1, 1, 40)
        self.net = _PatchTransformer(40, patch, dim, depth, heads, self.hparams.num_classes)


class DigitsCNN(ClassifierModule):
    """A small Conv2d network for scikit-learn's 8x8 digits."""

    def __init__(self, channels: int = 16, batch_norm: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.example_input_array = torch.zeros(1, 1, 8, 8)
        self.net = nn.Sequential(
            *_conv_stack(nn.Conv2d, nn.BatchNorm2d, channels, batch_norm, (3, 1, 1), (3, 1, 1), 2),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(channels * 16, self.hparams.num_classes),
        )
