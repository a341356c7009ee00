"""The reference model of learnability selection: where it comes from, how it is trained on a
clean holdout, and its per-example losses cached by dataset index (as RHO-LOSS does).

>>> cache = ReferenceLossCache(torch.tensor([0.5, float("nan"), 0.2]))
>>> cache.missing(torch.tensor([0, 1, 2])).tolist()
[1]
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lightning_slim.batches import batch_indices
from lightning_slim.selection.functional import per_example_loss, scoring_mode


def import_object(path: str) -> Any:
    """``"package.module.name"`` -> the object (YAML configs name functions and classes this way)."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"{path!r} is not a dotted path like 'package.module.name'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {path!r}: {err}") from err


def as_callable(value: str | Callable | None, what: str) -> Callable | None:
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        obj = import_object(value)
        if not callable(obj):
            raise ValueError(f"{what}={value!r} names {type(obj).__name__}, which is not callable")
        return obj
    raise TypeError(f"{what} must be a callable or a dotted path to one; got {type(value).__name__}")


def load_reference(spec: Mapping[str, Any], holdout_loader: Callable[[], Any] | None = None,
                   loss_fn: Callable | None = None, seed: int = 0) -> tuple[nn.Module, int]:
    """Build a reference from ``{"class_path", "init_args", "checkpoint" | "train_on_holdout"}``.

    With ``checkpoint``, a LightningModule class is restored with ``load_from_checkpoint``; any
    other ``nn.Module`` class is built from ``init_args`` and given the file's state dict (or its
    ``"state_dict"`` entry). With ``train_on_holdout: {epochs, lr}`` it is built from ``init_args``
    (seeded by ``seed``, without touching the global RNG) and trained on ``holdout_loader()``.
    Returns ``(model, examples the reference trained on here)``.
    """
    unknown = set(spec) - {"class_path", "checkpoint", "init_args", "train_on_holdout"}
    if unknown or "class_path" not in spec or ("checkpoint" in spec) == ("train_on_holdout" in spec):
        raise ValueError(f"reference={dict(spec)!r} needs 'class_path', optional 'init_args', and exactly one "
                         "of 'checkpoint' (a file) or 'train_on_holdout' ({epochs, lr})")
    cls, init_args = import_object(spec["class_path"]), dict(spec.get("init_args") or {})
    if "checkpoint" in spec:
        path = Path(spec["checkpoint"])
        if not path.is_file():
            raise FileNotFoundError(f"reference checkpoint {str(path)!r} does not exist")
        if hasattr(cls, "load_from_checkpoint"):
            return cls.load_from_checkpoint(path, map_location="cpu", **init_args), 0
        with torch.random.fork_rng(devices=[]):  # building it must not move the user's global RNG
            model = cls(**init_args)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, Mapping) else state)
        return model, 0
    options = dict(spec["train_on_holdout"] or {})
    if set(options) - {"epochs", "lr"}:
        raise ValueError(f"train_on_holdout={options!r} takes only 'epochs' and 'lr'")
    if holdout_loader is None:
        raise ValueError("train_on_holdout needs a datamodule with holdout_dataloader() (e.g. "
                         "MNIST1DDataModule(holdout_fraction=0.3))")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**init_args)
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


def freeze(model: nn.Module) -> nn.Module:
    """A reference never trains: eval mode, no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class ReferenceLossCache:
    """Reference losses by dataset index; NaN marks an index not computed yet."""

    def __init__(self, losses: torch.Tensor | None = None):
        self.losses = (torch.empty(0) if losses is None else losses.detach().float().cpu().flatten()).clone()

    @classmethod
    def from_file(cls, path: str) -> "ReferenceLossCache":
        if not Path(path).is_file():
            raise FileNotFoundError(f"reference_losses file {path!r} does not exist")
        return cls(torch.load(path, map_location="cpu", weights_only=True))

    def missing(self, indices: torch.Tensor) -> torch.Tensor:
        """The indices with no cached loss."""
        indices = indices.long().cpu()
        known = torch.zeros(len(indices), dtype=torch.bool)
        inside = (indices >= 0) & (indices < len(self.losses))
        known[inside] = ~torch.isnan(self.losses[indices[inside]])
        return indices[~known]

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        return self.losses[indices.long().cpu()]

    def put(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        indices = indices.long().cpu()
        size = int(indices.max()) + 1 if len(indices) else 0
        if size > len(self.losses):
            grown = torch.full((size,), float("nan"))
            grown[: len(self.losses)] = self.losses
            self.losses = grown
        self.losses[indices] = values.detach().float().cpu()

    def __len__(self) -> int:
        return int((~torch.isnan(self.losses)).sum())


@torch.no_grad()
def compute_reference_losses(reference: nn.Module, loader, loss_fn: Callable | None = None) -> torch.Tensor:
    """Every example's reference loss, as a tensor indexed by dataset index (batches must carry
    indices: ``(x, y, index)``). Save it with ``torch.save`` and pass the path as ``reference_losses``."""
    cache = ReferenceLossCache()
    device = next(reference.parameters(), torch.empty(0)).device
    with scoring_mode(reference):
        for batch in loader:
            idx = batch_indices(batch)
            if idx is None:
                raise ValueError("compute_reference_losses needs batches that carry example indices, e.g. "
                                 "(x, y, index) from MNIST1DDataModule(with_index=True)")
            batch = _to(batch, device)
            cache.put(idx, per_example_loss(reference, batch, loss_fn))
    return cache.losses


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

    args = dict(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, accelerator="cpu", devices=1)
    args.update(trainer_kwargs)
    trainer = pl.Trainer(**args)
    loader = datamodule.holdout_dataloader(shuffle=True)
    trainer.fit(module, train_dataloaders=loader,
                val_dataloaders=datamodule.val_dataloader() if validate else None)
    return freeze(module), len(loader.dataset) * trainer.current_epoch
