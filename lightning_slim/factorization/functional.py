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
from collections.abc import Iterable

import torch
from torch import nn

from lightning_slim.modules import replace_submodule

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


def _layers_for(module: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """Zero ``down`` / ``up`` layers of ``module``'s geometry at ``rank``, on its device and dtype. Built
    on the meta device: their default initialisation would draw from the global RNG and move the fit's
    random stream (dropout, sampling) at the moment of factorization."""
    w = module.weight
    like = {"device": "meta", "dtype": w.dtype}
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        down = nn.Linear(module.in_features, rank, bias=False, **like)
        up = nn.Linear(rank, module.out_features, bias=has_bias, **like)
        return _materialize(down, w.device), _materialize(up, w.device)
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
    return _materialize(down, w.device), _materialize(up, w.device)


def _materialize(layer: nn.Module, device: torch.device) -> nn.Module:
    layer = layer.to_empty(device=device)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    return layer


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """The replaced layer's hooks (another technique's forward hooks keep firing), mode and trainability."""
    new._forward_hooks, new._forward_pre_hooks = old._forward_hooks, old._forward_pre_hooks
    new.train(old.training)
    frozen = not old.weight.requires_grad
    for p in new.parameters():
        p.requires_grad_(not frozen)
    return new


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` matrices (``out x rank``, ``rank x fan_in``) of the best rank-``rank`` approximation
    of ``weight`` as a matrix, singular values split evenly; computed in float64, returned in its dtype."""
    matrix = weight.detach().reshape(weight.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


@torch.no_grad()
def factorize(module: nn.Module, rank: int) -> FactorizedLayer:
    """The rank-``rank`` :class:`FactorizedLayer` of a Linear / Conv1d / Conv2d, from the truncated SVD
    of its weight (the bias goes to ``up``)."""
    if not is_factorizable(module):
        raise TypeError(f"cannot factorize a {type(module).__name__}: {unsupported_reason(module)}")
    out, fan_in = matrix_shape(module)
    if not 1 <= rank <= min(out, fan_in):
        raise ValueError(f"rank={rank} must be in [1, {min(out, fan_in)}] for a {out} x {fan_in} weight")
    down, up = _layers_for(module, rank)
    up_matrix, down_matrix = svd_factors(module.weight, rank)
    down.weight.copy_(down_matrix.reshape(down.weight.shape))
    up.weight.copy_(up_matrix.reshape(up.weight.shape))
    if module.bias is not None:
        up.bias.copy_(module.bias)
    return _adopt(FactorizedLayer(down, up), module)


def empty_like(module: nn.Module, rank: int) -> FactorizedLayer:
    """A :class:`FactorizedLayer` of ``module``'s geometry at ``rank`` whose weights are about to be
    loaded from a checkpoint (no SVD: they are zeros until then)."""
    return _adopt(FactorizedLayer(*_layers_for(module, rank)), module)


def resize(layer: FactorizedLayer, rank: int) -> None:
    """Change ``layer``'s rank in place, keeping its parameter objects (and so any module another
    technique wrapped them in); the values are about to be loaded from a checkpoint."""
    down, up = layer.down, layer.up
    with torch.no_grad():
        down.weight.data = down.weight.new_zeros((rank, *down.weight.shape[1:]))
        up.weight.data = up.weight.new_zeros((up.weight.shape[0], rank, *up.weight.shape[2:]))
    if isinstance(down, nn.Linear):
        down.out_features, up.in_features = rank, rank
    else:
        down.out_channels, up.in_channels = rank, rank


def params_of(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def macs_per_position(module: nn.Module) -> int:
    """Multiply-accumulates per output position (per token for a Linear, per output pixel for a conv)."""
    if isinstance(module, FactorizedLayer):
        return macs_per_position(module.down) + macs_per_position(module.up)
    out, fan_in = matrix_shape(module)
    return out * fan_in


def dense_like(layer: FactorizedLayer) -> nn.Module:
    """A zero dense layer of the geometry ``layer`` was factorized from (its weights are about to be loaded)."""
    down, up = layer.down, layer.up
    like = {"device": "meta", "dtype": down.weight.dtype}
    if isinstance(down, nn.Linear):
        dense = nn.Linear(down.in_features, up.out_features, bias=up.bias is not None, **like)
    else:
        dense = type(down)(
            down.in_channels,
            up.out_channels,
            down.kernel_size,
            stride=down.stride,
            padding=down.padding,
            dilation=down.dilation,
            padding_mode=down.padding_mode,
            bias=up.bias is not None,
            **like,
        )
    return _adopt(_materialize(dense, down.weight.device), layer.down)


def _swapped_by_another(path: str, module: nn.Module) -> ValueError:
    return ValueError(
        f"{path!r} must change its structure to load the checkpoint, but it is a {type(module).__name__} now "
        "(swapped in by another callback's setup): its factorization was decided on this model's weights and "
        "differs from the checkpoint's. Build the model with the weights the checkpointed run started from, "
        "or choose ranks by shape alone (rank=...)"
    )


def restructure(model: nn.Module, ranks: dict[str, int], dense: Iterable[str] = ()) -> int:
    """Give ``model`` the factorized structure ``{layer path: rank}`` before a checkpoint's weights are
    loaded into it: dense layers become empty factorized ones, factorized layers of another rank are
    resized in place, and factorized layers at the paths ``dense`` become dense again. Returns how many
    layers changed."""
    changed = 0
    for path in dense:
        layer = model.get_submodule(path)
        if isinstance(layer, FactorizedLayer):
            for part in (layer.down, layer.up):
                if type(part) not in FACTORIZABLE:
                    raise _swapped_by_another(f"{path}.{'down' if part is layer.down else 'up'}", part)
            replace_submodule(model, path, dense_like(layer))
            changed += 1
    for path, rank in ranks.items():
        module = model.get_submodule(path)
        if isinstance(module, FactorizedLayer):
            if module.rank != rank:
                resize(module, rank)
                changed += 1
        elif is_factorizable(module):
            replace_submodule(model, path, empty_like(module, rank))
            changed += 1
        elif isinstance(module, FACTORIZABLE):
            raise _swapped_by_another(path, module)
        else:
            raise ValueError(
                f"the checkpoint factorized {path!r}, but this model's {path!r} is a {type(module).__name__}; "
                "build the model the checkpoint was trained from"
            )
    return changed


def load_factorized(
    model: nn.Module, checkpoint_path: str, strict: bool = True, state_key: str = "LowRankFactorization"
) -> nn.Module:
    """Load a Lightning checkpoint written while ``LowRankFactorization`` trained into a freshly built
    ``model``: the factorized layers are restructured first (from the callback's saved ranks), then the
    weights are loaded. ``state_key`` is the callback's key in the checkpoint (its class name)."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    state = checkpoint.get("callbacks", {}).get(state_key) or {}
    restructure(model, dict(state.get("ranks", {})))
    model.load_state_dict(checkpoint["state_dict"], strict=strict)
    return model
