"""LightningModules around pretrained Hugging Face models, written as users write them: the model
is an attribute, ``training_step`` calls it with the batch's keys and returns its loss. No
``forward`` is defined: the callbacks must work on such a module without one."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int) -> dict:
    """Linear warm-up then cosine decay to 10% of the peak, stepped per optimizer step."""
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}


class CausalLM(pl.LightningModule):
    """Fine-tunes a causal LM on ``{input_ids, attention_mask, labels}`` batches with the model's
    own (shifted) loss; logs ``train/loss``, ``val/loss`` and ``test/loss`` (mean next-token nats)."""

    def __init__(self, model: nn.Module, lr: float = 1e-4, warmup: int = 10, weight_decay: float = 0.0):
        super().__init__()
        self.model, self.lr, self.warmup, self.weight_decay = model, lr, warmup, weight_decay

    def _loss(self, batch) -> torch.Tensor:
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        ).loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self._loss(batch))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": cosine_schedule(opt, total, min(self.warmup, total))}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: the mean of
    the real tokens' hidden states, L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


class SentenceEncoder(pl.LightningModule):
    """Fine-tunes a sentence encoder (MiniLM) with the in-batch contrastive loss sentence-transformers
    trains it with (MultipleNegativesRankingLoss, scale 20) on ``(anchor, positive)`` pairs; logs
    ``train/loss``, ``val/loss``, ``test/loss``."""

    def __init__(self, model: nn.Module, lr: float = 2e-5, warmup: int = 10, scale: float = 20.0):
        super().__init__()
        self.model, self.lr, self.warmup, self.scale = model, lr, warmup, scale

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def _loss(self, batch) -> torch.Tensor:
        a = self.embed(batch["input_ids"], batch["attention_mask"])
        p = self.embed(batch["positive_input_ids"], batch["positive_attention_mask"])
        scores = self.scale * a @ p.t()
        return F.cross_entropy(scores, torch.arange(len(a), device=a.device))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self._loss(batch))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": cosine_schedule(opt, total, min(self.warmup, total))}
