"""Unstructured magnitude pruning in plain PyTorch: which weights, which masks, when.

No Lightning here: every function takes modules, tensors and optimizers, so the math is
testable without a Trainer.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
>>> layers = select_layers(net, ["Linear"])
>>> masks = magnitude_masks({n: m.weight for n, m in layers.items()}, 0.5, scope="global")
>>> apply_masks({n: m.weight for n, m in layers.items()}, masks)
>>> round(global_sparsity({n: m.weight for n, m in layers.items()}), 2)
0.5
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from lightning_slim.arguments import check_fraction
from lightning_slim.targets import select_modules

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SCOPES = ("global", "layer")


def select_layers(model: nn.Module, targets: Iterable[str] | None = None,
                  exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The modules with a ``weight`` parameter selected by ``targets`` and not by ``exclude``
    (the grammar of :mod:`lightning_slim.targets`); ``targets=None``: every Linear / Conv layer."""
    return select_modules(model, targets, exclude, default=PRUNABLE_TYPES, what="pruning",
                          supported=lambda m: isinstance(getattr(m, "weight", None), nn.Parameter))


def classifier_name(layers: Mapping[str, nn.Module]) -> str:
    """The final classifier: the last of ``layers`` (pass every Linear/Conv) in registration order."""
    return list(layers)[-1]


def magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float, scope: str = "global",
                    masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that zero the ``sparsity`` fraction of smallest-magnitude weights.

    ``scope="global"`` ranks all weights together; ``"layer"`` prunes each tensor to ``sparsity``.
    Weights already masked in ``masks`` stay masked (masks only grow), so IMP rounds compose.
    Ties are broken by position, deterministically, so every DDP rank computes the same masks.
    """
    check_fraction("sparsity", sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}")
    scores = {}
    for name, w in weights.items():
        s = w.detach().abs().float().flatten()
        if masks is not None and name in masks:
            s = torch.where(masks[name].flatten().to(s.device), s, torch.full_like(s, -1.0))
        scores[name] = s
    if scope == "layer":
        return {n: _keep_top(s, sparsity).view_as(weights[n]) for n, s in scores.items()}
    flat = torch.cat(list(scores.values()))
    keep = _keep_top(flat, sparsity)
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = keep[start:start + w.numel()].view_as(w)
        start += w.numel()
    return out


def _keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    n_keep = scores.numel() - int(round(sparsity * scores.numel()))
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_keep > 0:
        # stable sort: equal magnitudes keep their order, the same on every rank and run
        order = torch.sort(scores, descending=True, stable=True).indices
        keep[order[:n_keep]] = True
    return keep


@torch.no_grad()
def apply_masks(tensors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked entries of each tensor in place (parameters keep their identity)."""
    names = [n for n in tensors if n in masks]
    if names:
        torch._foreach_mul_([tensors[n] for n in names], [masks[n].to(tensors[n].dtype) for n in names])


@torch.no_grad()
def mask_optimizer_state(optimizer: torch.optim.Optimizer, params_and_masks: Iterable[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Zero every per-element optimizer state (SGD momentum, Adam exp_avg / exp_avg_sq...) at masked
    positions, so the optimizer cannot move a pruned weight again."""
    for param, mask in params_and_masks:
        state = optimizer.state.get(param)
        if not state:
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.mul_(mask.to(value.dtype))


def sparsity_of(tensor: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(tensor.detach())) / max(tensor.numel(), 1)


def global_sparsity(tensors: Mapping[str, torch.Tensor]) -> float:
    """Fraction of exact zeros over all the given tensors together."""
    total = sum(t.numel() for t in tensors.values())
    nonzero = sum(int(torch.count_nonzero(t.detach())) for t in tensors.values())
    return 1.0 - nonzero / max(total, 1)


def mask_checksum(masks: Mapping[str, torch.Tensor]) -> int:
    """An order-sensitive integer fingerprint of a set of masks (to compare across ranks)."""
    total = 0
    for i, name in enumerate(sorted(masks)):
        flat = masks[name].flatten().to(torch.int64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64)
        total = (total * 1_000_003 + (i + 1) * int((flat * weights).sum())) % (2**61 - 1)
    return total
