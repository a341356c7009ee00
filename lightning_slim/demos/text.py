"""Real English text that ships with Python: the documentation topics of ``pydoc_data.topics``
(79 topics, 465k characters, about 115k SmolLM2 tokens), split *by topic* into train / validation /
test so no paragraph is shared across splits.

The split is a function of the topic names only (a SHA-256 order, then a greedy fill to the asked
fraction of characters), so every run and every machine with the same Python docs gets the same
split. (Another Python minor version ships other docs, hence other numbers.)
"""

from __future__ import annotations

import hashlib
from functools import cache
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_slim.demos.data import EpochSeededSampler

SPLITS = ("train", "val", "test")


@cache
def topics() -> dict[str, str]:
    """Python's documentation topics, ``{name: text}``."""
    from pydoc_data.topics import topics as found

    return dict(found)


@cache
def topic_splits(val: float = 0.1, test: float = 0.1) -> dict[str, tuple[str, ...]]:
    """Topic names per split; validation and test each get about ``val`` / ``test`` of the
    characters, the rest is training text."""
    texts = topics()
    total = sum(len(t) for t in texts.values())
    order = sorted(texts, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    chosen: dict[str, list[str]] = {s: [] for s in SPLITS}
    budget = {"val": val * total, "test": test * total}
    for name in order:
        for split in ("test", "val"):
            if len(texts[name]) <= budget[split]:
                chosen[split].append(name)
                budget[split] -= len(texts[name])
                break
        else:
            chosen["train"].append(name)
    return {s: tuple(sorted(chosen[s])) for s in SPLITS}


def split_text(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    return "\n\n".join(topics()[name] for name in topic_splits()[split])


def lm_windows(tokenizer: Any, split: str, seq_len: int = 128) -> torch.Tensor:
    """The split's text as consecutive non-overlapping ``(N, seq_len)`` token windows (topics
    joined with the tokenizer's end-of-sequence token; the last partial window is dropped)."""
    eos = tokenizer.eos_token or ""
    text = eos.join(topics()[name] for name in topic_splits()[split])
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def paragraph_pairs(split: str, min_chars: int = 80) -> list[tuple[str, str]]:
    """Consecutive paragraph pairs of one topic: ``(paragraph, next paragraph)``, a positive pair
    for a sentence-embedding objective (each paragraph used once)."""
    pairs = []
    for name in topic_splits()[split]:
        paragraphs = [p.strip() for p in topics()[name].split("\n\n") if len(p.strip()) >= min_chars]
        pairs.extend(zip(paragraphs[0::2], paragraphs[1::2]))
    return pairs


class TensorDictDataset(Dataset):
    """Rows of equally long tensors as dicts, each with its dataset ``index`` (so callbacks can
    cache per-example values: teacher outputs, reference losses)."""

    def __init__(self, **tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: v[i] for k, v in self.tensors.items()}, "index": i}


def lm_dataset(windows: torch.Tensor) -> TensorDictDataset:
    """Hugging Face causal-LM batches: ``labels`` are the input ids (the model shifts them)."""
    return TensorDictDataset(input_ids=windows, attention_mask=torch.ones_like(windows), labels=windows.clone())


def pair_dataset(tokenizer: Any, pairs: list[tuple[str, str]], max_length: int = 64) -> TensorDictDataset:
    """Tokenized ``(anchor, positive)`` pairs: ``input_ids``/``attention_mask`` for anchors and
    ``positive_input_ids``/``positive_attention_mask`` for positives, padded to ``max_length``."""
    enc = [
        tokenizer(
            [p[i] for p in pairs], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        for i in (0, 1)
    ]
    return TensorDictDataset(
        input_ids=enc[0]["input_ids"],
        attention_mask=enc[0]["attention_mask"],
        positive_input_ids=enc[1]["input_ids"],
        positive_attention_mask=enc[1]["attention_mask"],
    )


class SplitsDataModule(pl.LightningDataModule):
    """Train / validation / test datasets; training order depends only on ``(seed, epoch)`` (so a
    resumed run sees the batches an uninterrupted one does)."""

    def __init__(self, datasets: dict[str, Dataset], batch_size: int = 8, seed: int = 0):
        super().__init__()
        self.datasets, self.batch_size, self.seed = datasets, batch_size, seed

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        data = self.datasets[split]
        sampler = EpochSeededSampler(len(data), self.seed) if shuffle else None
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def lm_datamodule(
    tokenizer: Any, seq_len: int = 128, batch_size: int = 8, seed: int = 0, limit: dict[str, int] | None = None
) -> SplitsDataModule:
    """The three splits as causal-LM windows; ``limit`` caps the windows of a split (tests)."""
    limit = limit or {}
    made = {}
    for split in SPLITS:
        windows = lm_windows(tokenizer, split, seq_len)
        made[split] = lm_dataset(windows[: limit.get(split, len(windows))])
    return SplitsDataModule(made, batch_size=batch_size, seed=seed)


def pair_datamodule(
    tokenizer: Any, max_length: int = 64, batch_size: int = 16, seed: int = 0, limit: dict[str, int] | None = None
) -> SplitsDataModule:
    """The three splits as paragraph pairs for a sentence-embedding objective."""
    limit = limit or {}
    made = {}
    for split in SPLITS:
        pairs = paragraph_pairs(split)
        made[split] = pair_dataset(tokenizer, pairs[: limit.get(split, len(pairs))], max_length)
    return SplitsDataModule(made, batch_size=batch_size, seed=seed)
