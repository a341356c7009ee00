"""The checkpoint side of factorization: give a freshly built model the factorized structure a checkpoint
holds before its weights are loaded (in a resumed fit, :meth:`LowRankFactorization.before_weights_load`;
outside a Trainer, :func:`load_factorized`). The weights these functions create are zeros: the
checkpoint's values replace them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lightning_slim.factorization.functional import (
    FACTORIZABLE,
    FactorizedLayer,
    is_factorizable,
    take_over,
    zero_factors,
    zeros_on,
)
from lightning_slim.modules import replace_submodule


def empty_like(module: nn.Module, rank: int) -> FactorizedLayer:
    """A :class:`FactorizedLayer` of ``module``'s geometry at ``rank`` whose weights are about to be
    loaded from a checkpoint (no SVD: they are zeros until then)."""
    return take_over(FactorizedLayer(*zero_factors(module, rank)), module)


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
    return take_over(zeros_on(dense, down.weight.device), layer.down)


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
