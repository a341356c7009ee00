"""Checks that turn bad selection setups into clear errors before the first training step:
run on a sample batch collated from the train loader's dataset (no sampler iteration, so no
RNG is consumed and the training order is unchanged)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_slim.batches import batch_indices
from lightning_slim.selection import functional as F


def train_loader(trainer) -> Any | None:
    """The train DataLoader the fit will use, built but not iterated (None if unavailable)."""
    try:
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader()
        source = trainer.fit_loop._data_source  # the loader or module given to fit()
        return source.dataloader() if source.is_defined() else None
    except Exception:  # noqa: BLE001 - the first batch is checked again at step time
        return None


def sample_batch(loader: Any, n: int = 4) -> Any | None:
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    try:
        size = len(loader.dataset)
        return loader.collate_fn([loader.dataset[i] for i in range(min(n, size))]) if size else None
    except Exception:  # noqa: BLE001 - datasets without integer indexing: check at the first step
        return None


def _check_losses(what: str, model, batch, fn, n: int, joint: bool) -> None:
    try:
        with F.scoring_mode(model) as m:
            out = F.pair_loss_matrix(m, batch, fn) if joint else F.per_example_loss(m, batch, fn)
    except Exception as err:
        hint = ("pass pair_loss_fn(model, batch) -> (B, B) or define per_pair_loss(batch)" if joint else
                "pass loss_fn(model, batch) -> (B,) losses or define per_sample_loss(batch) on the module")
        raise ValueError(f"OnlineDataSelection cannot compute {what} losses on a sample training batch "
                         f"({type(err).__name__}: {err}); {hint}") from err
    want = (n, n) if joint else (n,)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the {what} {'pair' if joint else 'per-example'} loss must have shape {want} for a "
                         f"batch of {n}; got {got} (reduction='none'?)")


def check_before_training(cb, trainer, pl_module) -> int | None:
    """Raise on a bad setup; return the nominal super-batch size (None if unknown)."""
    loader = train_loader(trainer)
    nominal = getattr(loader, "batch_size", None) if isinstance(loader, DataLoader) else None
    if nominal is not None:
        if cb.batch_size is not None and nominal < cb.batch_size:
            raise ValueError(f"the super-batch ({nominal} examples per loader batch) is smaller than the "
                             f"batch_size={cb.batch_size} it must yield; raise the DataLoader's batch_size")
        if cb.batch_size is None and round(cb.keep * nominal) < 1:
            raise ValueError(f"keep={cb.keep} of a super-batch of {nominal} keeps no example; "
                             f"use keep >= {1 / nominal:.3g} or a larger DataLoader batch_size")
    if cb.cache is not None and cb.reference_losses is not None and isinstance(loader, DataLoader):
        size = len(loader.dataset) if hasattr(loader.dataset, "__len__") else 0
        missing = cb.cache.missing(torch.arange(size))
        if len(missing):
            raise ValueError(f"reference_losses covers {size - len(missing)} of the {size} training examples; "
                             f"missing indices {missing[:10].tolist()}{'...' if len(missing) > 10 else ''}")
    batch = sample_batch(loader)
    if batch is not None:
        check_batch(cb, pl_module, batch)
    return nominal


def check_batch(cb, pl_module, batch) -> None:
    """Losses computable with the right shape, indices present for a cache, the batch sliceable.
    Runs on a sample batch in ``setup``, or on the first real batch when no sample could be built."""
    n = cb._super_batch_size(batch)
    if cb.cache is not None and batch_indices(batch) is None:
        raise ValueError("a reference-loss cache (reference_losses / cache_reference) needs batches that carry "
                         "example indices, e.g. (x, y, index) from MNIST1DDataModule(with_index=True)")
    if cb.score != "uniform" and cb.score != "easy_reference":
        _check_losses("learner", pl_module, batch, cb._pair_loss if cb.joint else cb._loss, n, cb.joint)
    if cb._reference_model is not None and cb.needs_reference():
        fn = cb._pair_loss if cb.joint else cb._loss
        _check_losses("reference", cb._reference_model, batch, fn, n, cb.joint)
    rows = torch.arange(min(2, n))
    try:
        sliced = cb._super_batch_size(cb._select_rows(batch, rows, n))
    except Exception as err:
        raise ValueError(f"cannot slice a {type(batch).__name__} batch with slice_batch ({err}); pass "
                         "selector(batch, rows) -> batch") from err
    if sliced != len(rows):
        raise ValueError(f"slicing a {type(batch).__name__} batch to {len(rows)} rows gave {sliced}; slice_batch "
                         "does not know this type: pass selector(batch, rows) -> batch")
    cb.checked = True
