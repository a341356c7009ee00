"""Which weights a pruning round removes, given scores: unstructured (ranked globally, per tensor or
per output row) and N:M semi-structured sparsity (in every group of M consecutive inputs of a row,
N weights stay: the layout ``torch.sparse.to_sparse_semi_structured`` accelerates for 2:4).

Scores and masks are ``(rows = outputs, cols = inputs)`` matrices (``tensors.as_matrix``).
Weights already pruned (``masks``) stay pruned: masks only grow, so rounds compose.

>>> import torch
>>> w = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.2, 0.3]])
>>> nm_masks(w.abs(), 2, 4).int().tolist()
[[1, 0, 1, 0, 1, 0, 0, 1]]
>>> masks({"w": w.abs()}, 0.5, scope="layer", pattern=parse_pattern("2:4"))["w"].int().tolist()
[[1, 0, 1, 0, 1, 0, 0, 1]]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightning_slim.core import sharding
from lightning_slim.core.arguments import check_fraction

SCOPES = ("global", "layer", "row")
KINDS = ("unstructured", "channels", "N:M")


@dataclass(frozen=True)
class Pattern:
    """``kind`` is ``"unstructured"``, ``"channels"`` (structural) or ``"N:M"`` with ``n`` of ``m`` kept."""

    kind: str
    n: int = 0
    m: int = 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity the pattern itself fixes (``1 - n / m`` for N:M), else None."""
        return 1.0 - self.n / self.m if self.kind == "N:M" else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "N:M" else self.kind


def parse_pattern(value: str) -> Pattern:
    """``"unstructured"``, ``"channels"`` or ``"N:M"`` (``"2:4"``, ``"4:8"``, ``0 < N < M``)."""
    if value in ("unstructured", "channels"):
        return Pattern(value)
    match = re.fullmatch(r"(\d+):(\d+)", str(value))
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(
            f"pattern={value!r} is not one of 'unstructured', 'channels' or 'N:M' with 0 < N < M (e.g. '2:4')"
        )
    return Pattern("N:M", int(match[1]), int(match[2]))


def check_nm_shape(name: str, matrix_shape: tuple[int, ...], pattern: Pattern) -> None:
    """Every row must split into whole groups of M inputs."""
    if pattern.kind == "N:M" and matrix_shape[1] % pattern.m:
        raise ValueError(
            f"pattern={str(pattern)!r} needs the inputs of {name!r} (shape {tuple(matrix_shape)} as "
            f"outputs x inputs) to be a multiple of {pattern.m}; exclude it or use another pattern"
        )


def nm_masks(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive inputs of each row (ties: first wins)."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return keep.reshape(rows, cols)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Does every group of ``m`` inputs of each row keep at most ``n`` weights?"""
    rows, cols = mask.shape
    return cols % m == 0 and bool((mask.reshape(rows, cols // m, m).sum(-1) <= n).all())


def _keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest scores of a 1-D tensor; a stable sort breaks ties by position, the same on every rank."""
    n_keep = scores.numel() - round(sparsity * scores.numel())
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_keep > 0:
        keep[torch.sort(scores, descending=True, stable=True).indices[:n_keep]] = True
    return keep


def _keep_top_rows(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    n_keep = scores.shape[1] - round(sparsity * scores.shape[1])
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if n_keep > 0:
        keep.scatter_(1, torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n_keep], True)
    return keep


def masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    pattern: Pattern = Pattern("unstructured"),
    previous: Mapping[str, torch.Tensor] | None = None,
    group: dist.ProcessGroup | None = None,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (matrices) that remove the ``sparsity`` fraction of the lowest scores.

    ``scope``: ``"global"`` ranks all tensors together, ``"layer"`` each tensor, ``"row"`` each
    output row (Wanda's comparison group). With an N:M ``pattern``, ``sparsity`` may not exceed
    ``1 - N/M``; below it, each group's N best are protected while the rest is ranked as usual, so
    a gradual schedule reaches exactly N:M at its last round. With a process ``group`` the scores are
    this rank's rows of row-sharded tensors (FSDP2): rows and N:M groups are whole on each rank, and
    the global / per-tensor thresholds are agreed across ranks (:func:`lightning_slim.core.sharding.keep_top`).
    """
    check_fraction("sparsity", sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}")
    scores = {k: s.detach().float() for k, s in scores.items()}
    if previous:
        scores = {
            k: torch.where(previous[k].to(s.device), s, torch.full_like(s, -1.0)) if k in previous else s
            for k, s in scores.items()
        }
    if pattern.kind == "N:M":
        limit = pattern.sparsity
        if sparsity > limit + 1e-6:
            raise ValueError(f"sparsity={sparsity:g} exceeds what pattern={str(pattern)!r} allows ({limit:g})")
        if sparsity >= limit - 1e-6:
            return {k: nm_masks(s, pattern.n, pattern.m) for k, s in scores.items()}
        protected = {k: nm_masks(s, pattern.n, pattern.m) for k, s in scores.items()}
        scores = {k: torch.where(protected[k], torch.full_like(s, float("inf")), s) for k, s in scores.items()}
    if scope == "row":
        return {k: _keep_top_rows(s, sparsity) for k, s in scores.items()}
    if group is not None:
        names = list(scores)
        ranked = [names] if scope == "global" else [[k] for k in names]
        kept = sharding.keep_top([[scores[k].flatten() for k in g] for g in ranked], sparsity, group)
        return {k: m.view_as(scores[k]) for g, ms in zip(ranked, kept) for k, m in zip(g, ms)}
    if scope == "layer":
        return {k: _keep_top(s.flatten(), sparsity).view_as(s) for k, s in scores.items()}
    keep = _keep_top(torch.cat([s.flatten() for s in scores.values()]), sparsity)
    out, start = {}, 0
    for k, s in scores.items():
        out[k] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return out
