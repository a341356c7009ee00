"""Batch handling shared by every callback: find the inputs, the targets and the example
indices in a batch, and slice a batch down to chosen rows, whatever its container.

Supported without help: tensors, tuples/lists whose elements are tensors (``(x, y)`` or
``(x, y, index)``), and dicts (``x``/``input``/``inputs``, ``y``/``target``/``label``,
``index``/``idx``). Anything else needs a user-supplied function on the callback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

INPUT_KEYS = ("x", "input", "inputs", "input_ids", "image", "images")
TARGET_KEYS = ("y", "target", "targets", "label", "labels")
INDEX_KEYS = ("index", "indices", "idx")


class BatchFormatError(TypeError):
    """Raised when a batch has a shape the default helpers cannot read."""


def _first_key(batch: Mapping, keys: Sequence[str], what: str):
    for key in keys:
        if key in batch:
            return batch[key]
    raise BatchFormatError(
        f"cannot find the {what} in a dict batch with keys {sorted(batch)}; "
        f"expected one of {list(keys)}, or pass your own extractor to the callback"
    )


def batch_inputs(batch: Any) -> torch.Tensor:
    """The model inputs of a batch: ``batch[0]``, ``batch['x']`` or the batch itself."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        return _first_key(batch, INPUT_KEYS, "inputs")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise BatchFormatError(
        f"cannot find the inputs in a batch of type {type(batch).__name__}; "
        "expected a tensor, an (x, y[, index]) tuple/list or a dict, or pass your own extractor"
    )


def batch_targets(batch: Any) -> torch.Tensor:
    """The targets of a batch: ``batch[1]`` or ``batch['y']``."""
    if isinstance(batch, Mapping):
        return _first_key(batch, TARGET_KEYS, "targets")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    raise BatchFormatError(
        f"cannot find the targets in a batch of type {type(batch).__name__}; "
        "expected an (x, y[, index]) tuple/list or a dict with a 'y' key"
    )


def batch_indices(batch: Any) -> torch.Tensor | None:
    """Per-example dataset indices if the batch carries them (``batch[2]`` or ``batch['index']``)."""
    if isinstance(batch, Mapping):
        for key in INDEX_KEYS:
            if key in batch:
                return batch[key]
        return None
    if isinstance(batch, (tuple, list)) and len(batch) >= 3 and isinstance(batch[2], torch.Tensor):
        return batch[2]
    return None


def batch_size(batch: Any) -> int:
    """Number of examples in a batch (the first dimension of its inputs)."""
    return int(batch_inputs(batch).shape[0])


def example_count(batch: Any) -> int:
    """Examples in a batch (or an ``(args, kwargs)`` call): the inputs' leading dimension, else the
    first tensor's, else ``len(batch)``."""
    try:
        return batch_size(batch)
    except BatchFormatError:
        leaves = [batch]
        while leaves:
            leaf = leaves.pop(0)
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
                return int(leaf.shape[0])
            if isinstance(leaf, Mapping):
                leaves.extend(leaf.values())
            elif isinstance(leaf, (tuple, list)):
                leaves.extend(leaf)
        if hasattr(batch, "__len__"):
            return len(batch)
        raise


def slice_batch(batch: Any, rows: torch.Tensor, size: int | None = None) -> Any:
    """The same batch restricted to ``rows`` (a 1-D index tensor), container preserved.

    Every tensor whose first dimension equals the batch size is indexed; other values
    (strings, scalars, metadata) pass through unchanged. Pass ``size`` when it is known
    (e.g. from per-example losses) for containers whose inputs cannot be found by name.
    """
    n = batch_size(batch) if size is None else size

    def take(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            return value[rows.to(value.device)]
        if isinstance(value, Mapping):
            return type(value)({k: take(v) for k, v in value.items()})
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
            return type(value)(*(take(v) for v in value))
        if isinstance(value, (tuple, list)):
            return type(value)(take(v) for v in value)
        return value

    return take(batch)


def sample_batch(loader: Any, n: int = 4) -> Any | None:
    """A small batch collated from the first ``n`` items of a DataLoader's dataset, or None.

    The loader is not iterated: its sampler draws nothing and no worker starts, so the training
    order is the same with and without a callback that asks for a sample (tested).
    """
    from torch.utils.data import DataLoader, IterableDataset

    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    try:
        size = len(loader.dataset)
        return loader.collate_fn([loader.dataset[i] for i in range(min(n, size))]) if size else None
    except Exception:
        return None


def move_to(value: Any, device: torch.device | str) -> Any:
    """Every tensor in a (nested) batch, ``(args, kwargs)`` call or container moved to ``device``
    (tensors already there are returned as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return type(value)({k: move_to(v, device) for k, v in value.items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(move_to(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(move_to(v, device) for v in value)
    return value
