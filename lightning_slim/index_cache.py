"""Per-example values stored by dataset index: the one cache every technique uses
(distillation's teacher outputs, selection's reference losses).

Each entry is a dict of tensors with one row per example (``{"logits": (V,)}``, ``{"loss": ()}``);
storage grows as larger indices arrive. ``missing`` says which rows of a batch still need
computing, so a batch that mixes seen and new examples (as data selection makes them) is
computed for its new rows only.

>>> cache = IndexCache()
>>> cache.store(torch.tensor([3, 1]), {"loss": torch.tensor([0.5, 0.2])})
>>> cache.missing(torch.tensor([1, 0, 3, 7])).tolist()
[False, True, False, True]
>>> cache.lookup(torch.tensor([1, 3]))["loss"].tolist(), cache.lookup(torch.tensor([0]))
([0.20000000298023224, 0.5], None)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from lightning_slim.core import sharding


class IndexCache:
    def __init__(self):
        self.filled = torch.zeros(0, dtype=torch.bool)
        self.values: dict[str, torch.Tensor] = {}

    @classmethod
    def from_tensor(cls, key: str, values: torch.Tensor) -> IndexCache:
        """A cache of one value per index from a dense tensor; NaN rows count as missing."""
        values = values.detach().float().cpu()
        cache = cls()
        cache.values[key] = values.clone()
        cache.filled = ~torch.isnan(values.reshape(len(values), -1)).any(1)
        return cache

    def __len__(self) -> int:
        return int(self.filled.sum())

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values.values()) + self.filled.numel()

    def reserve(self, size: int) -> None:
        """Room for indices ``< size`` up front (e.g. the training set's length)."""
        self._grow(size, exact=True)

    def _grow(self, size: int, exact: bool = False) -> None:
        if size <= len(self.filled):
            return
        size = size if exact else max(size, int(1.5 * len(self.filled)))
        grown = torch.zeros(size, dtype=torch.bool)
        grown[: len(self.filled)] = self.filled
        self.filled = grown
        for key, v in self.values.items():
            new = v.new_zeros((size, *v.shape[1:]))
            new[: len(v)] = v
            self.values[key] = new

    def missing(self, index: torch.Tensor) -> torch.Tensor:
        """A boolean mask over ``index``: True where nothing is stored yet."""
        index = index.long().cpu()
        known = (index >= 0) & (index < len(self.filled))
        out = torch.ones(len(index), dtype=torch.bool)
        out[known] = ~self.filled[index[known]]
        return out

    def lookup(self, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The stored rows of every index, or None unless all are stored."""
        index = index.long().cpu()
        if not len(index) or bool(self.missing(index).any()):
            return None
        return {k: v[index] for k, v in self.values.items()}

    def store(self, index: torch.Tensor, outputs: Mapping[str, torch.Tensor]) -> None:
        index = index.long().cpu()
        if not len(index):
            return
        self._grow(int(index.max()) + 1)
        for key, value in outputs.items():
            value = value.detach().cpu()
            if key not in self.values:
                self.values[key] = value.new_zeros((len(self.filled), *value.shape[1:]))
            self.values[key][index] = value.to(self.values[key].dtype)
        self.filled[index] = True

    def share(self, index: torch.Tensor, group: dist.ProcessGroup) -> None:
        """Store on every rank the rows each rank stored at ``index`` this step (a collective: every rank
        calls it, with its own, possibly empty, ``index``), so the caches stay equal across ranks and an
        example computed on one rank is served from the cache on all. An index stored by several ranks
        at once keeps the lowest rank's row, on every rank."""
        index = index.long().cpu()
        rows = {"index": index} | {k: v[index] for k, v in sorted(self.values.items())}
        everyone = sharding.gather_rows(rows, group)
        first: dict[int, int] = {}
        for position, i in enumerate(everyone.pop("index").tolist()):
            first.setdefault(i, position)
        keep = torch.tensor(list(first.values()), dtype=torch.int64)  # first occurrences, in rank order
        self.store(torch.tensor(list(first), dtype=torch.int64), {k: v[keep] for k, v in everyone.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"filled": self.filled.clone(), "values": {k: v.clone() for k, v in self.values.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.filled = state["filled"].clone()
        self.values = {k: v.clone() for k, v in state["values"].items()}
