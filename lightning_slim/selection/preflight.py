"""Checks that turn bad selection setups into clear errors before the first training step: run
on a sample batch collated from the train loader's dataset (the loader is not iterated, so the
training order is unchanged), or on the first real batch when no sample can be built."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from lightning_slim.batches import batch_indices, example_count, slice_batch
from lightning_slim.selection.scoring import Scorer


def _check_losses(what: str, scorer: Scorer, model, batch, n: int) -> None:
    try:
        out = scorer.losses(model, batch)
    except Exception as err:
        hint = (
            "pass joint={'pair_loss_fn': fn(model, batch) -> (B, B)} or define per_pair_loss(batch)"
            if scorer.joint
            else "pass loss_fn(model, batch) -> (B,) losses or define per_sample_loss(batch) on the module"
        )
        raise ValueError(
            f"OnlineDataSelection cannot compute {what} losses on a sample training batch "
            f"({type(err).__name__}: {err}); {hint}"
        ) from err
    want = (n, n) if scorer.joint else (n,)
    if tuple(out.shape) != want:
        raise ValueError(
            f"the {what} {'pair' if scorer.joint else 'per-example'} loss must have shape {want} for a "
            f"batch of {n}; got {tuple(out.shape)} (reduction='none'?)"
        )


def check_loader(loader: Any, keep: float, batch_size: int | None, scorer: Scorer) -> int | None:
    """Raise on a super-batch that cannot yield what is asked, or a precomputed cache that misses
    training examples; return the nominal super-batch size (None if unknown)."""
    nominal = getattr(loader, "batch_size", None) if isinstance(loader, DataLoader) else None
    if nominal is not None:
        if batch_size is not None and nominal < batch_size:
            raise ValueError(
                f"the super-batch ({nominal} examples per loader batch) is smaller than the "
                f"batch_size={batch_size} it must yield; raise the DataLoader's batch_size"
            )
        if batch_size is None and round(keep * nominal) < 1:
            raise ValueError(
                f"keep={keep} of a super-batch of {nominal} keeps no example; "
                f"use keep >= {1 / nominal:.3g} or a larger DataLoader batch_size"
            )
    if scorer.cache is not None and scorer.reference is None and isinstance(loader, DataLoader):
        size = len(loader.dataset) if hasattr(loader.dataset, "__len__") else 0
        missing = scorer.cache.missing(torch.arange(size)).nonzero().flatten()
        if len(missing):
            raise ValueError(
                f"reference_losses covers {size - len(missing)} of the {size} training examples; "
                f"missing indices {missing[:10].tolist()}{'...' if len(missing) > 10 else ''}"
            )
    return nominal


def check_batch(
    scorer: Scorer, pl_module, batch, n: int, slicer: Callable[[Any, torch.Tensor], Any], count: Callable[[Any], int]
) -> None:
    """Losses computable with the right shape, indices present for a cache, the batch sliceable."""
    if scorer.cache is not None and not scorer.joint and batch_indices(batch) is None:
        raise ValueError(
            "a reference-loss cache (reference_losses / cache_reference) needs batches that carry "
            "example indices, e.g. (x, y, index) from MNIST1DDataModule(with_index=True)"
        )
    if scorer.score != "uniform" and scorer.needs_learner:
        _check_losses("learner", scorer, pl_module, batch, n)
    if scorer.reference is not None and scorer.needs_reference:
        _check_losses("reference", scorer, scorer.reference, batch, n)
    rows = torch.arange(min(2, n))
    try:
        sliced = count(slicer(batch, rows))
    except Exception as err:
        raise ValueError(
            f"cannot slice a {type(batch).__name__} batch with slice_batch ({err}); pass selector(batch, rows) -> batch"
        ) from err
    if sliced != len(rows):
        raise ValueError(
            f"slicing a {type(batch).__name__} batch to {len(rows)} rows gave {sliced}; slice_batch "
            "does not know this type: pass selector(batch, rows) -> batch"
        )


def macs_per_example(scorer: Scorer, model, batch) -> tuple[float, float]:
    """``(MACs of scoring one example, its tokens)``: counted on the scorer's own call of the model
    (its default loss, the module's ``per_sample_loss`` or the user's ``loss_fn``, however they call
    it); tokens are 0 for inputs that are not token ids."""
    from lightning_slim.reporting.measure import macs_of, token_count

    one = slice_batch(batch, torch.arange(1), size=example_count(batch))
    return float(macs_of(model, lambda m: scorer.losses(m, one))), float(token_count(one))


def batch_note(keep: float, batch_size: int | None, super_batch: int | None, trained: int, others: list[str]) -> str:
    """What a fraction-based ``keep`` does to the training batch, said before training (empty when the
    user gave the trained count, or nothing is dropped): ``training_step`` gets ``trained`` of every
    ``super_batch`` examples, so at the same number of optimizer steps the model trains on that
    fraction of the examples, and every schedule counted in steps or epochs (``others``' and the
    learning rate's) advances over that fraction. Deliberate with a DataLoader already enlarged to a
    super-batch; a silent loss of data (and accuracy) when the DataLoader is the one tuned for plain
    training. The two cannot be told apart here, hence a note, not an error."""
    if batch_size is not None or super_batch is None or trained >= super_batch:
        return ""
    schedules = ", ".join([*others, "the learning rate"])
    return (
        f"training_step gets {trained} of every {super_batch} examples the DataLoader yields (keep={keep}): at "
        f"the same number of steps the model trains on {trained / super_batch:.0%} of the examples training on "
        f"this DataLoader without selection would, and schedules counted in steps or epochs ({schedules}) "
        f"advance over that fraction. If {super_batch} per step is the batch your training was tuned for, let "
        f"the DataLoader yield super-batches of {math.ceil(super_batch / keep)} and pass "
        f"batch_size={super_batch} instead of keep"
    )
