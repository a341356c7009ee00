"""What the real-model arms share: the models, the splits, the loss they are judged by, and a
quiet Trainer. Every arm reports mean next-token nats (``lm_loss``) on the ``test`` split and
chooses its settings on ``val``."""

from __future__ import annotations

import contextlib
import math
from functools import cache

import torch
from common import quiet_trainer

from lightning_slim.demos import pretrained, text

SEQ_LEN = 128


@cache
def smol_tokenizer():
    return pretrained.load_smollm2()[1]


def smol():
    """A fresh SmolLM2-135M-Instruct (float32, eval mode as from_pretrained returns it)."""
    return pretrained.load_smollm2()[0]


@cache
def windows(split: str) -> torch.Tensor:
    """The split's 128-token windows of SmolLM2 tokens."""
    return text.lm_windows(smol_tokenizer(), split, SEQ_LEN)


@torch.no_grad()
def lm_loss(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token nats over every predicted position of ``ids`` (``(N, T)`` full windows:
    each window's loss is a mean over its T-1 positions, so the mean of means is the token mean)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        total += model(input_ids=chunk, labels=chunk, use_cache=False).loss.item() * len(chunk)
    model.train(was_training)
    return total / len(ids)


def ppl(loss: float) -> float:
    return math.exp(loss)


def lm_data(batch_size: int = 4, seed: int = 0, limit: dict[str, int] | None = None):
    return text.lm_datamodule(smol_tokenizer(), SEQ_LEN, batch_size=batch_size, seed=seed, limit=limit)


def trainer(max_steps: int, callbacks=(), **kwargs):
    """A Trainer for a fixed token budget: no validation inside the fit (the arms evaluate the
    split they report), no checkpoints, no logger."""
    return quiet_trainer(max_steps=max_steps, callbacks=list(callbacks), limit_val_batches=0, **kwargs)


@contextlib.contextmanager
def one_thread():
    """torch on one thread for the block (the arms that time models side by side), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
