"""The reference model of learnability selection: where it comes from, how it is trained on a
clean holdout, and its per-example losses computed once by dataset index (as RHO-LOSS does).

>>> cache = reference_loss_cache(torch.tensor([0.5, float("nan"), 0.2]))
>>> cache.missing(torch.tensor([0, 1, 2])).tolist()
[False, True, False]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_slim.batches import batch_indices
from lightning_slim.core.loading import build_module, freeze
from lightning_slim.index_cache import IndexCache
from lightning_slim.modules import device_of, evaluating
from lightning_slim.selection.functional import per_example_loss


def load_reference(
    spec: Mapping[str, Any],
    holdout_loader: Callable[[], Any] | None = None,
    loss_fn: Callable | None = None,
    seed: int = 0,
) -> tuple[nn.Module, int]:
    """Build a reference from ``{"class_path", "init_args", "checkpoint" | "train_on_holdout"}``.

    With ``checkpoint``, a LightningModule class is restored with ``load_from_checkpoint``; any
    other ``nn.Module`` class is built from ``init_args`` and given the file's state dict (or its
    ``"state_dict"`` entry). With ``train_on_holdout: {epochs, lr}`` it is built from ``init_args``
    (seeded by ``seed``, without touching the global RNG) and trained on ``holdout_loader()``.
    Returns ``(model, examples the reference trained on here)``.
    """
    unknown = set(spec) - {"class_path", "checkpoint", "init_args", "train_on_holdout"}
    if unknown or "class_path" not in spec or ("checkpoint" in spec) == ("train_on_holdout" in spec):
        raise ValueError(
            f"reference={dict(spec)!r} needs 'class_path', optional 'init_args', and exactly one "
            "of 'checkpoint' (a file) or 'train_on_holdout' ({epochs, lr})"
        )
    init_args = dict(spec.get("init_args") or {})
    if "checkpoint" in spec:
        return build_module(spec["class_path"], init_args, spec["checkpoint"], what="reference class_path"), 0
    options = dict(spec["train_on_holdout"] or {})
    if set(options) - {"epochs", "lr"}:
        raise ValueError(f"train_on_holdout={options!r} takes only 'epochs' and 'lr'")
    if holdout_loader is None:
        raise ValueError(
            "train_on_holdout needs a datamodule with holdout_dataloader() (e.g. "
            "MNIST1DDataModule(holdout_fraction=0.3))"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_module(spec["class_path"], init_args, what="reference class_path")
        seen = fit_on_holdout(model, holdout_loader(), loss_fn=loss_fn, **options)
    return model, seen


def fit_on_holdout(model: nn.Module, loader, epochs: int = 5, lr: float = 1e-2, loss_fn: Callable | None = None) -> int:
    """Plain-torch training of a reference (Adam, cosine-decayed LR) on mean per-example loss.
    Returns the number of examples trained on (the reference's cost)."""
    if epochs < 1 or not lr > 0:
        raise ValueError(f"train_on_holdout epochs={epochs!r} must be >= 1 and lr={lr!r} positive")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model.train()
    seen = 0
    for epoch in range(epochs):
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            loss = per_example_loss(model, batch, loss_fn)
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
            sched.step()
            seen += len(loss)
    return seen


def reference_loss_cache(losses: torch.Tensor | str) -> IndexCache:
    """An index cache of reference losses from a dense tensor (NaN: not computed) or its file."""
    if isinstance(losses, str):
        if not Path(losses).is_file():
            raise FileNotFoundError(f"reference_losses file {losses!r} does not exist")
        losses = torch.load(losses, map_location="cpu", weights_only=True)
    return IndexCache.from_tensor("loss", torch.as_tensor(losses).flatten())


@torch.no_grad()
def compute_reference_losses(reference: nn.Module, loader, loss_fn: Callable | None = None) -> torch.Tensor:
    """Every example's reference loss, as a tensor indexed by dataset index (batches must carry
    indices: ``(x, y, index)``). Save it with ``torch.save`` and pass the path as ``reference_losses``."""
    cache = IndexCache()
    device = device_of(reference)
    with evaluating(reference):
        for batch in loader:
            idx = batch_indices(batch)
            if idx is None:
                raise ValueError(
                    "compute_reference_losses needs batches that carry example indices, e.g. "
                    "(x, y, index) from MNIST1DDataModule(with_index=True)"
                )
            cache.store(idx, {"loss": per_example_loss(reference, _to(batch, device), loss_fn).float()})
    size = int(cache.filled.nonzero().max()) + 1 if len(cache) else 0  # storage grows ahead: trim it
    return torch.where(cache.filled[:size], cache.values["loss"][:size], float("nan")) if size else torch.empty(0)


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def train_reference(module, datamodule, max_epochs: int = 10, validate: bool = True, **trainer_kwargs):
    """Train ``module`` (a LightningModule) on ``datamodule.holdout_dataloader()``, the clean
    holdout, with a plain Lightning ``Trainer``. Returns ``(module, train_examples)``: pass
    ``train_examples`` as ``reference_train_examples`` so the reference's cost is reported.

    >>> # ref, n = train_reference(MNIST1DCNN(), MNIST1DDataModule(holdout_fraction=0.3), max_epochs=5)
    """
    import lightning.pytorch as pl

    args = dict(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    args.update(trainer_kwargs)
    trainer = pl.Trainer(**args)
    loader = datamodule.holdout_dataloader(shuffle=True)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=datamodule.val_dataloader() if validate else None)
    return freeze(module), len(loader.dataset) * trainer.current_epoch
