"""Low-rank factorization in plain PyTorch (no Lightning): a layer's weight ``W`` (``out x fan_in``,
``fan_in = in x kernel taps``) becomes two layers of rank ``r`` from its truncated SVD
``W ~= U_r S_r V_r^T``: ``down`` (``r x fan_in``, the original kernel and geometry, no bias) then
``up`` (``out x r``, a Linear or a 1x1 convolution, the original bias). The singular values are split
evenly, ``down = sqrt(S_r) V_r^T`` and ``up = U_r sqrt(S_r)``, so neither factor is much larger than
the other (Composer's Factorize does the same). By Eckart-Young the product is the best rank-``r``
approximation: ``||W - up @ down||_F^2`` is the sum of the discarded ``sigma_i^2``.

A layer is worth factorizing only when ``r (out + fan_in) < out fan_in``: then it has fewer
parameters and, per output position, fewer multiply-accumulates (the two counts have the same ratio).

>>> layer = nn.Linear(64, 32)
>>> small = factorize(layer, 8)
>>> small.rank, params_of(layer), params_of(small)
(8, 2080, 800)
>>> choose_rank(torch.tensor([3.0, 2.0, 1.0, 0.0]), rank=0.5), choose_rank(torch.tensor([3.0, 2.0, 1.0]), energy=0.9)
(2, 2)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_slim.factorization.configs import FactorizationConfig
from lightning_slim.modules import replace_submodule
from lightning_slim.targets import select_modules

FACTORIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


class FactorizedLayer(nn.Module):
    """``up(down(x))``: the rank-``r`` form of a Linear or convolution. ``down`` keeps the original
    kernel, stride, padding and dilation with ``r`` outputs; ``up`` is a Linear or a 1x1 convolution
    back to the original outputs and holds the original bias. Both are plain torch layers, so other
    techniques (quantization, pruning) and exporters treat them as they treat any Linear or conv."""

    def __init__(self, down: nn.Module, up: nn.Module):
        super().__init__()
        self.down, self.up = down, up

    @property
    def rank(self) -> int:
        return self.down.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def is_factorizable(module: nn.Module) -> bool:
    """Exactly a Linear, Conv1d or Conv2d (ungrouped). A subclass is not: it may read its weight
    directly (``nn.MultiheadAttention``'s ``out_proj``) or be another technique's swapped layer."""
    if type(module) not in FACTORIZABLE:
        return False
    return isinstance(module, nn.Linear) or module.groups == 1


def unsupported_reason(module: nn.Module) -> str:
    """Why a Linear / conv the targets match stays dense."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and type(module) in FACTORIZABLE:
        return f"grouped convolution (groups={module.groups})"
    return (
        f"{type(module).__name__} is a subclass of {type(module).__mro__[1].__name__} (its weight may be read directly)"
    )


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, fan_in)`` of the weight as a matrix (a conv's kernel taps count in ``fan_in``)."""
    w = module.weight
    return w.shape[0], w[0].numel()


def singular_values(module: nn.Module) -> torch.Tensor:
    """The weight's singular values, largest first (float64)."""
    with torch.no_grad():
        return torch.linalg.svdvals(module.weight.detach().reshape(module.weight.shape[0], -1).double())


def breakeven_rank(out: int, fan_in: int) -> float:
    """Ranks strictly below this save parameters and MACs: ``r (out + fan_in) < out fan_in``."""
    return out * fan_in / (out + fan_in)


def saves(out: int, fan_in: int, rank: int) -> bool:
    return rank * (out + fan_in) < out * fan_in


def choose_rank(values: torch.Tensor, rank: float | int | None = None, energy: float | None = None) -> int:
    """The rank to keep from singular ``values`` (largest first): ``rank`` as a fraction in (0, 1] of
    the full rank (at least 1) or an absolute count (at most the full rank), or the smallest rank whose
    ``sum sigma_i^2`` reaches the fraction ``energy`` of the total (all of it for a zero matrix)."""
    full = len(values)
    if energy is not None:
        power = values.double() ** 2
        total = float(power.sum())
        if total == 0:
            return full
        kept = power.cumsum(0) / total
        # float64 cumulative sums: a fraction that the last term reaches exactly must count as reached
        return min(full, int((kept < energy - 1e-12).sum()) + 1)
    if isinstance(rank, float):
        return max(1, min(full, math.floor(rank * full)))
    return min(full, int(rank))


def energy_kept(values: torch.Tensor, rank: int) -> float:
    """The fraction of ``sum sigma_i^2`` the first ``rank`` values hold (1 for a zero matrix)."""
    power = values.double() ** 2
    total = float(power.sum())
    return float(power[:rank].sum()) / total if total > 0 else 1.0


def zero_factors(module: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """Zero ``down`` / ``up`` layers of ``module``'s geometry at ``rank``, on its device and dtype. Built
    on the meta device: their default initialisation would draw from the global RNG and move the fit's
    random stream (dropout, sampling) at the moment of factorization."""
    w = module.weight
    like = {"device": "meta", "dtype": w.dtype}
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        down = nn.Linear(module.in_features, rank, bias=False, **like)
        up = nn.Linear(rank, module.out_features, bias=has_bias, **like)
        return zeros_on(down, w.device), zeros_on(up, w.device)
    conv = type(module)
    down = conv(
        module.in_channels,
        rank,
        module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        padding_mode=module.padding_mode,
        bias=False,
        **like,
    )
    up = conv(rank, module.out_channels, 1, bias=has_bias, **like)
    return zeros_on(down, w.device), zeros_on(up, w.device)


def zeros_on(layer: nn.Module, device: torch.device) -> nn.Module:
    layer = layer.to_empty(device=device)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    return layer


def take_over(new: nn.Module, old: nn.Module) -> nn.Module:
    """The replaced layer's hooks (another technique's forward hooks keep firing), mode and trainability."""
    new._forward_hooks, new._forward_pre_hooks = old._forward_hooks, old._forward_pre_hooks
    new.train(old.training)
    frozen = not old.weight.requires_grad
    for p in new.parameters():
        p.requires_grad_(not frozen)
    return new


def svd(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V^T)`` of the weight as a matrix, in float64 (so the factors' only error is their final
    rounding to the weight's dtype)."""
    w = module.weight.detach()
    return torch.linalg.svd(w.reshape(w.shape[0], -1).double(), full_matrices=False)


def svd_factors(decomposition: tuple[torch.Tensor, ...], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` matrices (``out x rank``, ``rank x fan_in``) of the best rank-``rank`` approximation,
    from :func:`svd`'s ``decomposition``, the singular values split evenly between them."""
    u, s, vh = decomposition
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@torch.no_grad()
def factorize(module: nn.Module, rank: int, decomposition: tuple[torch.Tensor, ...] | None = None) -> FactorizedLayer:
    """The rank-``rank`` :class:`FactorizedLayer` of a Linear / Conv1d / Conv2d, from the truncated SVD
    of its weight (the bias goes to ``up``); ``decomposition``: its :func:`svd`, if already computed."""
    if not is_factorizable(module):
        raise TypeError(f"cannot factorize a {type(module).__name__}: {unsupported_reason(module)}")
    out, fan_in = matrix_shape(module)
    if not 1 <= rank <= min(out, fan_in):
        raise ValueError(f"rank={rank} must be in [1, {min(out, fan_in)}] for a {out} x {fan_in} weight")
    down, up = zero_factors(module, rank)
    up_matrix, down_matrix = svd_factors(decomposition or svd(module), rank)
    down.weight.copy_(down_matrix.reshape(down.weight.shape))
    up.weight.copy_(up_matrix.reshape(up.weight.shape))
    if module.bias is not None:
        up.bias.copy_(module.bias)
    return take_over(FactorizedLayer(down, up), module)


def params_of(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def macs_per_position(module: nn.Module) -> int:
    """Multiply-accumulates per output position (per token for a Linear, per output pixel for a conv)."""
    if isinstance(module, FactorizedLayer):
        return macs_per_position(module.down) + macs_per_position(module.up)
    out, fan_in = matrix_shape(module)
    return out * fan_in


# --- a whole model: which layers, to which rank -------------------------------------------------------
def select_layers(
    model: nn.Module, targets: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers ``targets`` / ``exclude`` select (:func:`lightning_slim.targets.select_modules`; default
    every Linear, Conv1d and Conv2d) that can be factorized, and those they select that cannot, with why:
    subclasses, grouped convolutions, layers whose parameters another module shares (tied weights).
    Factors of already factorized layers are never selected."""
    factors = {id(m) for f in model.modules() if isinstance(f, FactorizedLayer) for m in (f.down, f.up)}
    matched = select_modules(
        model,
        targets,
        exclude,
        default=FACTORIZABLE,
        supported=lambda m: isinstance(m, FACTORIZABLE) and id(m) not in factors,
        what="factorization",
    )
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), []).append(name)
    unsupported = {}
    for name, module in matched.items():
        others = sorted({o for p in module.parameters(recurse=False) for o in holders[id(p)] if o != name})
        if not is_factorizable(module):
            unsupported[name] = unsupported_reason(module)
        elif others:
            unsupported[name] = f"its parameters are shared with {others}"
    return {n: m for n, m in matched.items() if n not in unsupported}, unsupported


def plan_ranks(
    layers: Mapping[str, nn.Module], rank: float | int | None = None, energy: float | None = None, min_size: int = 1
) -> tuple[dict[str, int], dict[str, str]]:
    """``({path: rank}, {path: why it stays dense})``: each layer's rank by :func:`choose_rank`, kept
    only where the smaller side is at least ``min_size`` and the rank saves parameters (:func:`saves`)."""
    plan, kept_dense = {}, {}
    for name, module in layers.items():
        out, fan_in = matrix_shape(module)
        values = singular_values(module)
        chosen = choose_rank(values, rank, energy)
        if min(out, fan_in) < min_size:
            kept_dense[name] = f"min(out, fan_in) = {min(out, fan_in)} < min_size={min_size}"
        elif not saves(out, fan_in, chosen):
            kept_dense[name] = (
                f"rank {chosen} of {len(values)} saves nothing (below {breakeven_rank(out, fan_in):.1f} does)"
            )
        else:
            plan[name] = chosen
    return plan, kept_dense


def factorize_layers(model: nn.Module, plan: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Replace each layer of ``plan`` (``{path: rank}``) by its :func:`factorize` in ``model``; returns a row
    per layer: ``out``, ``fan_in``, ``rank``, ``full_rank``, ``params_before`` / ``params_after``,
    ``macs_before`` / ``macs_after`` (per output position) and ``energy_kept``."""
    rows = {}
    for path, rank in plan.items():
        module = model.get_submodule(path)
        out, fan_in = matrix_shape(module)
        decomposition = svd(module)
        new = factorize(module, rank, decomposition)
        rows[path] = {
            "out": out,
            "fan_in": fan_in,
            "rank": rank,
            "full_rank": min(out, fan_in),
            "params_before": params_of(module),
            "params_after": params_of(new),
            "macs_before": macs_per_position(module),
            "macs_after": macs_per_position(new),
            "energy_kept": round(energy_kept(decomposition[1], rank), 6),
        }
        replace_submodule(model, path, new)
    return rows


def apply_factorization(model: nn.Module, config: FactorizationConfig | None = None) -> dict[str, Any]:
    """Factorize ``model`` in place as ``config`` says (its ``at`` / ``unit`` are the callback's business):
    the plain-PyTorch form of :class:`~lightning_slim.factorization.LowRankFactorization`. Returns
    ``ranks``, per-layer ``layers`` rows, ``kept_dense`` and ``unsupported``.

    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    >>> out = apply_factorization(model, FactorizationConfig(rank=0.25, min_size=8))
    >>> out["ranks"], sorted(out["kept_dense"])
    ({'0': 16}, ['2'])
    """
    config = config or FactorizationConfig()
    layers, unsupported = select_layers(model, config.targets, config.exclude or ())
    plan, kept_dense = plan_ranks(layers, config.rank_or_default, config.energy, config.min_size)
    return {
        "ranks": plan,
        "layers": factorize_layers(model, plan),
        "kept_dense": kept_dense,
        "unsupported": unsupported,
    }
