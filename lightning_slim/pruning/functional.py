"""Unstructured and N:M pruning in plain PyTorch: which tensors, which masks, applying them.

No Lightning here: every function takes modules, tensors and optimizers, so the math is
testable (and usable in a plain training loop) without a Trainer. :func:`prune` is the one verb:

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
>>> masks = prune(net, 0.5, pattern="2:4")
>>> [(name, m.shape) for name, m in masks.items()], is_nm(net[0].weight != 0, 2, 4)
([('0', torch.Size([8, 8])), ('2', torch.Size([4, 8]))], True)
>>> layers = select_layers(net, ["Linear"])
>>> masks = magnitude_masks({n: m.weight for n, m in layers.items()}, 0.75, scope="global")
>>> apply_masks({n: m.weight for n, m in layers.items()}, masks)
>>> round(global_sparsity({n: m.weight for n, m in layers.items()}), 2)
0.75
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lightning_slim.core import sharding
from lightning_slim.pruning import importance as imp
from lightning_slim.pruning import patterns
from lightning_slim.pruning.norms import InputNorms
from lightning_slim.pruning.patterns import Pattern, is_nm, nm_masks, parse_pattern  # noqa: F401 - the API
from lightning_slim.pruning.tensors import (
    Target,
    as_matrix,
    from_matrix,
    select_tensors,
    tensor_of,
    tied,
    untouched_matrices,
)
from lightning_slim.targets import select_modules

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SCOPES = patterns.SCOPES


def select_layers(
    model: nn.Module, targets: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> dict[str, nn.Module]:
    """The modules with a ``weight`` parameter selected by ``targets`` and not by ``exclude``
    (the grammar of :mod:`lightning_slim.targets`); ``targets=None``: every Linear / Conv layer.
    (Module level, for structural pruning; :func:`~lightning_slim.pruning.tensors.select_tensors`
    selects the tensors unstructured pruning masks.)"""
    return select_modules(
        model,
        targets,
        exclude,
        default=PRUNABLE_TYPES,
        what="pruning",
        supported=lambda m: isinstance(getattr(m, "weight", None), nn.Parameter),
    )


def classifier_name(layers: Mapping[str, nn.Module]) -> str:
    """The final classifier: the last of ``layers`` (pass every Linear/Conv) in registration order."""
    return list(layers)[-1]


def default_scope(importance: str) -> str:
    """Magnitude ranks globally; Wanda within each output row (its paper's comparison group)."""
    return "row" if importance == "wanda" else "global"


def compute_masks(
    model: nn.Module,
    targets: Mapping[str, Target],
    sparsity: float,
    pattern: Pattern | str = "unstructured",
    importance: str = "magnitude",
    scope: str | None = None,
    stats: InputNorms | None = None,
    previous: Mapping[str, torch.Tensor] | None = None,
    fallback: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks, each in its tensor's own shape, removing ``sparsity`` of the target weights
    by ``importance`` (``stats``: input norms for ``"wanda"``; ``fallback``: see
    :func:`~lightning_slim.pruning.importance.scores`), under ``pattern`` within ``scope``.
    Weights pruned in ``previous`` stay pruned."""
    pattern = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    scope = scope or default_scope(importance)
    tensors = {n: tensor_of(model, t) for n, t in targets.items()}
    group = sharded_group(targets, tensors)
    if group is not None and importance == "wanda" and stats is not None:  # FSDP2: the whole batch's norms
        stats = stats.reduced([t.module for t in targets.values()], group)
    for n, t in targets.items():
        patterns.check_nm_shape(n, tuple(as_matrix(tensors[n], t.layout).shape), pattern)
    scores = {n: sharding.local(s) for n, s in imp.scores(model, targets, importance, stats, fallback).items()}
    prev = {n: as_matrix(sharding.local(m), targets[n].layout) for n, m in (previous or {}).items() if n in targets}
    keep = patterns.masks(scores, sparsity, scope, pattern, prev, group)
    local = {n: sharding.local(t) for n, t in tensors.items()}  # masks: this rank's block only (FSDP2)
    return {n: sharding.like(from_matrix(keep[n], local[n], t.layout), tensors[n]) for n, t in targets.items()}


def sharded_group(targets: Mapping[str, Target], tensors: Mapping[str, torch.Tensor]):
    """The process group over which the targets' rows are sharded (FSDP2), None when not sharded.
    Rows must be outputs, so each rank ranks whole rows: transformers' Conv1D (``in_out``) is refused."""
    group = sharding.row_group(tensors)
    transposed = [n for n, t in targets.items() if t.layout != "out_in"]
    if group is not None and transposed:
        raise ValueError(
            f"pruning sharded {transposed}: their weight is stored inputs first (transformers' Conv1D), so "
            "FSDP2's row shards split its inputs; exclude them, or train unsharded (single device or DDP)"
        )
    return group


def nm_misfits(model: nn.Module, targets: Mapping[str, Target], pattern: Pattern) -> list[str]:
    """The targets whose rows do not split into whole groups of M inputs (e.g. a first conv's 3x3x3)."""
    return [
        n
        for n, t in targets.items()
        if pattern.kind == "N:M" and as_matrix(tensor_of(model, t), t.layout).shape[1] % pattern.m
    ]


@dataclass
class MaskedTargets:
    """What unstructured / N:M pruning acts on: ``counted`` (what the sparsity is over: the targets,
    excluded classifier included), ``masked`` (what is masked), ``untouched`` (weight matrices left
    dense, with why) and ``tied`` (masked parameters other modules share)."""

    counted: dict[str, Target]
    masked: dict[str, Target]
    untouched: dict[str, str]
    tied: dict[str, list[str]]


def resolve_targets(
    model: nn.Module,
    targets: Iterable[str] | None,
    exclude: Iterable[str],
    classifier: Iterable[str] = (),
    pattern: Pattern | None = None,
) -> MaskedTargets:
    """The targets of unstructured / N:M pruning. ``classifier``: paths left dense but counted. With
    N:M and default targets, layers whose inputs do not split into groups of M are left out and listed;
    a target named explicitly that does not split is a ``ValueError``."""
    pattern = pattern or Pattern("unstructured")
    counted = select_tensors(model, targets)
    exclude = [*exclude, *classifier]
    masked = select_tensors(model, targets, exclude)
    untouched = untouched_matrices(model, counted, exclude)
    if pattern.kind == "N:M" and targets is None:  # by kind: layers N:M cannot split are listed
        for name in nm_misfits(model, masked, pattern):
            untouched[name] = f"inputs not a multiple of {pattern.m}"
            del masked[name]
    for name, t in masked.items():
        patterns.check_nm_shape(name, tuple(as_matrix(tensor_of(model, t), t.layout).shape), pattern)
    sharded_group(masked, {n: tensor_of(model, t) for n, t in masked.items()})  # FSDP2 placements (after setup)
    return MaskedTargets(counted, masked, untouched, tied(model, counted))


def prune(
    model: nn.Module,
    sparsity: float,
    pattern: str = "unstructured",
    importance: str = "magnitude",
    scope: str | None = None,
    targets: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    stats: InputNorms | None = None,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Select the targets (default: every Linear, Conv, MultiheadAttention and transformers Conv1D
    weight), compute masks and zero the pruned weights in place; returns the masks. Keep applying
    them after each optimizer step (:func:`apply_masks`) to keep the zeros."""
    chosen = select_tensors(model, targets, exclude)
    masks = compute_masks(model, chosen, sparsity, pattern, importance, scope, stats, previous)
    apply_masks({n: tensor_of(model, t) for n, t in chosen.items()}, masks)
    return masks


def magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that zero the ``sparsity`` fraction of smallest-magnitude weights of any
    shape (``scope``: ``"global"`` or ``"layer"``); weights masked in ``masks`` stay masked. Ties
    are broken by position, deterministically, so every DDP rank computes the same masks."""
    rows = {n: w.detach().abs().reshape(1, -1) for n, w in weights.items()}
    prev = {n: m.reshape(1, -1) for n, m in (masks or {}).items()}
    keep = patterns.masks(rows, sparsity, scope, previous=prev)
    return {n: keep[n].view_as(w) for n, w in weights.items()}


@torch.no_grad()
def apply_masks(tensors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked entries of each tensor in place (parameters keep their identity)."""
    names = [n for n in tensors if n in masks]
    if names:
        torch._foreach_mul_([tensors[n] for n in names], [masks[n].to(tensors[n].dtype) for n in names])


@torch.no_grad()
def mask_optimizer_state(
    optimizer: torch.optim.Optimizer, params_and_masks: Iterable[tuple[nn.Parameter, torch.Tensor]]
) -> None:
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
    """Fraction of exact zeros of the whole tensor (over every rank's shard when it is sharded)."""
    return 1.0 - sharding.count_nonzero(tensor) / max(tensor.numel(), 1)


def global_sparsity(tensors: Mapping[str, torch.Tensor]) -> float:
    """Fraction of exact zeros over all the given tensors together."""
    total = sum(t.numel() for t in tensors.values())
    nonzero = sum(sharding.count_nonzero(t) for t in tensors.values())
    return 1.0 - nonzero / max(total, 1)


def sparsity_rows(model: nn.Module, counted: Mapping, initial_numel: Mapping[str, int] | None = None) -> dict:
    """``{"sparsity": over all of ``counted``, "sparsity/<name>": each}``: exact zeros of target tensors,
    or, given ``initial_numel`` (structural: ``counted`` are modules), the fraction of weights removed."""
    if initial_numel is not None:
        numel = {n: m.weight.numel() for n, m in counted.items()}
        per = {n: 1.0 - numel[n] / initial_numel[n] for n in numel}
        total = 1.0 - sum(numel.values()) / sum(initial_numel.values())
    else:
        tensors = {n: tensor_of(model, t) for n, t in counted.items()}
        per = {n: sparsity_of(t) for n, t in tensors.items()}
        total = global_sparsity(tensors)
    return {"sparsity": total, **{f"sparsity/{n}": v for n, v in per.items()}}


def mask_checksum(masks: Mapping[str, torch.Tensor]) -> int:
    """An order-sensitive integer fingerprint of a set of masks (to compare across ranks)."""
    total = 0
    for i, name in enumerate(sorted(masks)):
        flat = masks[name].flatten().to(torch.int64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.int64)
        total = (total * 1_000_003 + (i + 1) * int((flat * weights).sum())) % (2**61 - 1)
    return total


@torch.no_grad()
def to_semi_structured(model: nn.Module, names: Iterable[str], pattern: Pattern | str = "2:4") -> list[str]:
    """Swap each named ``nn.Linear``'s 2:4-sparse weight for ``torch.sparse.to_sparse_semi_structured``,
    the layout NVIDIA's sparse tensor cores multiply (CUDA, fp16/bf16, both dimensions multiples of
    64; see PyTorch's semi-structured sparsity docs). Returns the layers converted; others (not
    Linear, on CPU, fp32, odd shapes) are left dense. UNTESTED here: the test machines have no GPU;
    the CPU tests check the mask layout this kernel expects (groups of 4 along each row's inputs)."""
    pattern = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    if (pattern.n, pattern.m) != (2, 4) or not torch.cuda.is_available():
        return []
    from torch.sparse import to_sparse_semi_structured

    done = []
    for name in names:
        layer = model.get_submodule(name)
        w = getattr(layer, "weight", None)
        if (
            type(layer) is nn.Linear
            and w is not None
            and w.is_cuda
            and w.dtype in (torch.float16, torch.bfloat16)
            and w.shape[0] % 64 == 0
            and w.shape[1] % 64 == 0
            and is_nm(w != 0, 2, 4)
        ):
            layer.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            done.append(name)
    return done
