"""The tiny models of the sharded scenarios: a transformers Llama sharded per decoder layer and CNNs, each
with its data set and a ``configure_model`` that shards it under ``ModelParallelStrategy`` (unsharded in
the one-process reference)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import TensorDataset

LOCAL_BATCH, WORLD = 4, 2  # the one-process reference trains on batches of LOCAL_BATCH * WORLD
STEPS = 6


class TinyLlama(pl.LightningModule):
    """A real transformers Llama from a small config; an odd vocabulary makes lm_head's shards uneven (32/31 rows)."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=63,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
        self.model = LlamaForCausalLM(config)

    def configure_model(self):
        if self.device_mesh is None:  # the one-process reference: unsharded
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:  # per decoder layer, as users shard
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens, use_cache=False).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    @staticmethod
    def data() -> TensorDataset:
        return TensorDataset(
            torch.randint(0, 63, (LOCAL_BATCH * WORLD * STEPS, 16), generator=torch.Generator().manual_seed(1))
        )


class TinyCNN(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(48, 10),
        )

    def configure_model(self):
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for i in (0, 3):
            fully_shard(self.net[i], mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    @staticmethod
    def data() -> TensorDataset:
        g = torch.Generator().manual_seed(1)
        n = LOCAL_BATCH * WORLD * STEPS
        return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


class TinyCNNBN(TinyCNN):
    """TinyCNN with a BatchNorm after each conv (QAT folds it in), laid out so that TinyCNN's configure_model
    shards the convs (0 and 3) on their own and the BatchNorms with the root: the conv's forward reads their
    gathered parameters."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)),
            nn.Conv2d(8, 11, 3, padding=1),  # 11 channels: uneven blocks of rows (6 and 5), of conv and BatchNorm
            nn.BatchNorm2d(11),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(44, 10),
        )


class ScheduledCNN(TinyCNN):
    """TinyCNN with a per-step LR schedule, what ``rewind="lr"`` puts back."""

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        decay = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


class IndexedCNN(TinyCNN):
    """Batches ``(x, y, dataset index)``: what a precomputed reference-loss cache is keyed by."""

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return nn.functional.cross_entropy(self.net(x), y)

    @staticmethod
    def data() -> TensorDataset:
        x, y = TinyCNN.data().tensors
        return TensorDataset(x, y, torch.arange(len(x)))


class IndexedLlama(TinyLlama):
    """TinyLlama whose batches carry each example's dataset index, ``(tokens, labels, index)``: the cache's key."""

    def training_step(self, batch, batch_idx):
        tokens, labels, _ = batch
        return self.model(input_ids=tokens, labels=labels, use_cache=False).loss

    @staticmethod
    def data() -> TensorDataset:
        (tokens,) = TinyLlama.data().tensors
        return TensorDataset(tokens, tokens, torch.arange(len(tokens)))


class RepeatedLlama(IndexedLlama):
    """Twelve examples, each four times (its index is the example's): with the cache shared across ranks, at
    step 2 (seed 0) rank 0 has seen all of its batch and rank 1 has not, and at several steps both ranks
    compute one example at once."""

    @staticmethod
    def data() -> TensorDataset:
        (tokens,) = TinyLlama.data().tensors
        index = torch.arange(len(tokens)) % 12
        return TensorDataset(tokens[index], tokens[index], index)
