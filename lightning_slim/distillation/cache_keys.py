"""Naming an example for the teacher cache without a dataset index: by the content of what the teacher
is given for it.

An example's key is a digest of its row of every tensor in the teacher's call(s) (with dtype and
shape) and of the call's other values, so two examples share a key only if the teacher would see
exactly the same input for both, and then it gives the same output: the cache is correct whatever
the data pipeline does (an input augmented differently is a new entry, computed once more).
Digests map to slots ``0, 1, 2...`` of :class:`~lightning_slim.index_cache.IndexCache` in the order
they are first seen.

>>> keys = ContentKeys()
>>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]])
>>> keys([((x,), {})], 3).tolist(), keys([((x[1:],), {})], 2).tolist()
([0, 1, 0], [1, 0])
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lightning_slim.batches import BatchFormatError

Call = tuple[tuple, dict]
DIGEST_BYTES = 16
INDEX_HINT = (
    "e.g. MNIST1DDataModule(with_index=True), whose batches are (x, y, index); a dataset returning "
    "(x, y, index) or dicts with an 'index' key; or your index_fn. Or leave key='auto' (the default) to "
    "recognise examples by the content of the teacher's input"
)


def _leaves(value: Any, path: str = ""):
    """(path, leaf) pairs of a nested call, in a fixed order (mapping keys sorted)."""
    if isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield from _leaves(value[key], f"{path}.{key}")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def row_digests(calls: list[Call], n: int) -> list[bytes]:
    """One digest per example of ``calls`` (each ``(args, kwargs)`` with ``n`` examples)."""
    shared = hashlib.blake2b(digest_size=DIGEST_BYTES)
    rows: list[tuple[str, torch.Tensor]] = []
    for path, leaf in _leaves(list(calls)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == n:
            rows.append((f"{path}:{leaf.dtype}:{tuple(leaf.shape[1:])}", leaf))
        elif isinstance(leaf, torch.Tensor):
            shared.update(f"{path}:{leaf.dtype}:{tuple(leaf.shape)}".encode())
            shared.update(leaf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            shared.update(f"{path}={leaf!r}".encode())
    heads = [shared.digest()]
    data = []
    for name, leaf in rows:
        heads.append(name.encode())
        data.append(leaf.detach().cpu().contiguous().reshape(n, -1).view(torch.uint8).numpy())
    head = b"|".join(heads)
    return [
        hashlib.blake2b(b"".join([head, *(d[i].tobytes() for d in data)]), digest_size=DIGEST_BYTES).digest()
        for i in range(n)
    ]


class ContentKeys:
    """Digest -> cache slot, assigned in first-seen order; checkpointed with the cache."""

    def __init__(self):
        self.slots: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.slots)

    def __call__(self, calls: list[Call], n: int) -> torch.Tensor:
        return torch.tensor([self.slots.setdefault(d, len(self.slots)) for d in row_digests(calls, n)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        digests = sorted(self.slots, key=self.slots.__getitem__)
        table = (
            torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8)
            if digests
            else torch.zeros(0, dtype=torch.uint8)
        )
        return {"digests": table.reshape(len(digests), DIGEST_BYTES).clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        table = state["digests"].to(torch.uint8)
        self.slots = {bytes(row.tolist()): i for i, row in enumerate(table)}


class CacheKeys:
    """How the teacher cache names the examples of a batch: ``key="index"`` by ``index_fn(batch)``,
    ``"content"`` by :class:`ContentKeys`, ``"auto"`` by the index when the batches carry one (decided
    once, on the sample batch before training or on the first batch), else by content."""

    def __init__(self, key: str, index_fn: Callable[[Any], torch.Tensor | None]):
        self.key, self.index_fn = key, index_fn
        self.content = ContentKeys()
        self.keying: str | None = None if key == "auto" else key
        self.index_only: str | None = None  # why only dataset indices will do (see require_index)

    def require_index(self, why: str) -> None:
        """Name examples by dataset index only (``why``: the reason, put in the error when batches carry none)."""
        self.index_only = why
        if self.keying is None:
            self.keying = "index"

    def choose(self, batch: Any) -> None:
        """Decide from a batch (``None``: no batch yet, decide later)."""
        has_index = batch is not None and self.index_fn(batch) is not None
        if (self.key == "index" or self.index_only) and batch is not None and not has_index:
            raise BatchFormatError(
                f"cache_teacher with key={self.key!r} needs each example's dataset index in the batch (a sample "
                f"training batch has none): {self.index_only or INDEX_HINT}"
            )
        if batch is not None and self.keying is None:
            self.keying = "index" if has_index else "content"

    def __call__(self, batch: Any, calls: list[Call], n: int) -> torch.Tensor | None:
        if self.keying is None:
            self.choose(batch)
        return self.content(calls, n) if self.keying == "content" else self.index_fn(batch)

    def state_dict(self) -> dict[str, Any]:
        return {"content_keys": self.content.state_dict()} if self.keying == "content" else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "content_keys" in state:
            self.content.load_state_dict(state["content_keys"])
            self.keying = "content"
