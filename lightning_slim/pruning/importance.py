"""How important each weight is: magnitude ``|W|`` or Wanda's activation-aware ``|W| * ||x_j||``
(Sun et al. 2023: the weight times the norm of the input channel it multiplies), with the input
norms collected by forward hooks (:class:`lightning_slim.pruning.norms.InputNorms`, the same hooks
distillation records features with).

The input norm is the root mean square of the channel over every position seen (tokens, pixels,
batch rows): within a row it ranks exactly as Wanda's L2 norm, and it stays comparable across
layers that see different numbers of positions. Plain PyTorch, no Trainer:

>>> import torch
>>> from torch import nn
>>> from lightning_slim.pruning.tensors import select_tensors
>>> net = nn.Sequential(nn.Linear(4, 2))
>>> targets = select_tensors(net)
>>> stats = calibrate(net, targets, [torch.tensor([[1.0, 2.0, 0.0, 4.0]])])
>>> scores(net, targets, "wanda", stats)["0"].shape
torch.Size([2, 4])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_slim.core import sharding
from lightning_slim.modules import evaluating
from lightning_slim.pruning.norms import InputNorms, first_input
from lightning_slim.pruning.tensors import Target, as_matrix, tensor_of

IMPORTANCES = ("magnitude", "wanda")


def _mha_inputs(module: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    names = ("query", "key", "value")
    values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]) :] if n in kwargs]
    return [v for v in values if isinstance(v, torch.Tensor)]


def _conv_inputs(module: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [args[0].movedim(1, -1)]  # (N, C, *spatial) -> channels last


def inputs_of(module: nn.Module) -> Callable:
    """How to read a module's inputs, channels last, for :class:`InputNorms`."""
    if isinstance(module, nn.MultiheadAttention):
        return _mha_inputs
    if isinstance(module, nn.modules.conv._ConvNd):
        return _conv_inputs
    return first_input


def norm_matrix(module: nn.Module, target: Target, rms: list[torch.Tensor]) -> torch.Tensor:
    """The input norm each weight of ``target``'s matrix multiplies, broadcastable to ``(rows, cols)``."""
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        if target.param == "in_proj_weight":  # rows: query, key, value projections, each of e outputs
            if len(rms) != 3:
                rms = [rms[0]] * 3  # called with a single tensor: self-attention
            return torch.cat([r.expand(e, -1) for r in rms])
        return rms[{"q_proj_weight": 0, "k_proj_weight": 1, "v_proj_weight": 2}[target.param] % len(rms)][None]
    if isinstance(module, nn.modules.conv._ConvNd):
        weight = getattr(module, target.param)
        out, per_group = weight.shape[0], weight.shape[1]
        groups = rms[0].reshape(module.groups, per_group)  # input channels of each group
        rows = groups[torch.arange(out, device=groups.device) // (out // module.groups)]
        return rows.repeat_interleave(math.prod(weight.shape[2:]), dim=1)  # each kernel tap of a channel
    return rms[0][None]


def record_inputs(stats: InputNorms, model: nn.Module, targets: Mapping[str, Target], when: Callable[[], bool]) -> list:
    """Hooks that add every target module's inputs to ``stats`` whenever ``when()`` holds (inside the
    training steps); returns their handles."""
    modules = {t.module: model.get_submodule(t.module) for t in targets.values()}
    return stats.attach(modules, when, {n: inputs_of(m) for n, m in modules.items()})


def calibrate(
    model: nn.Module,
    targets: Mapping[str, Target],
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> InputNorms:
    """Input norms of every target over ``batches``, run in eval mode without gradients.
    ``forward(model, batch)`` defaults to ``model(**batch)`` for dicts, ``model(batch)`` for tensors."""
    forward = forward or (lambda m, b: m(**b) if isinstance(b, Mapping) else m(b))
    stats = InputNorms()
    modules = {t.module: model.get_submodule(t.module) for t in targets.values()}
    with evaluating(model), stats.recording(modules, inputs_of={n: inputs_of(m) for n, m in modules.items()}):
        for batch in batches:
            forward(model, batch)
    return stats


def scores(
    model: nn.Module,
    targets: Mapping[str, Target],
    importance: str = "magnitude",
    stats: InputNorms | None = None,
    fallback: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: score matrix (rows = outputs, cols = inputs)}``; ``"wanda"`` needs ``stats`` keyed by module
    path. A target whose module saw no input is an error, or, given a ``fallback`` list, scored by
    magnitude and its name appended there."""
    out = {}
    for name, t in targets.items():
        w = as_matrix(tensor_of(model, t).detach(), t.layout).abs().float()
        if importance == "wanda" and fallback is not None and (stats is None or t.module not in stats.count):
            fallback.append(name)
        elif importance == "wanda":
            if stats is None or t.module not in stats.count:
                raise ValueError(
                    f"importance='wanda' has no input statistics for {t.module!r}: it was not called "
                    "in the training steps (or calibration batches) seen since the last pruning"
                )
            norm = norm_matrix(model.get_submodule(t.module), t, stats.rms(t.module)).to(w.device)
            w = sharding.like(sharding.local(w) * sharding.rows_of(norm, w), w)  # FSDP2: this rank's rows
        elif importance != "magnitude":
            raise ValueError(f"importance={importance!r} is not one of {IMPORTANCES}")
        out[name] = w
    return out
