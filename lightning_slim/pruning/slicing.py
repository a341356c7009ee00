"""Structural pruning of recognised transformer blocks by slicing their weights directly.

A transformer's MLP channels and attention heads are known structures (:func:`heads.find_blocks`):
the channels an MLP's up-projections produce are the inputs of its down-projection; a head's rows
of the query/key/value projections are its columns of the output projection. Removing them is
indexing, so no graph has to be traced (torch-pruning's DepGraph spends tens of seconds to minutes
on a 30-layer Llama; this takes well under a second), and transformers' ``Conv1D`` (GPT-2: a Linear
whose weight is stored ``[in, out]``) is sliced like the Linear it is.

A :class:`Cut` lists, for one block, every layer that holds its *units* (one MLP channel, or one
attention head; with grouped-query attention one key/value head and the query heads that read it)
and where: ``"out"`` rows of a producer or ``"in"`` columns of a consumer, as segments
``(offset, width)`` (GPT-2's fused ``c_attn`` holds a head's query, key and value at three offsets).

>>> import torch
>>> from torch import nn
>>> layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
>>> cut = cuts(layer, ["linear1"])[0]
>>> cut.units(layer), prune(layer, [cut], 0.25)[""].numel(), layer.linear1.out_features, layer.linear2.in_features
(16, 12, 12, 12)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lightning_slim.pruning.heads import Block, find_blocks
from lightning_slim.pruning.tensors import is_hf_conv1d

# an MLP's up-projection (relative to the block) -> the down-projection that reads its channels
CONSUMER_OF = {"up_proj": "down_proj", "fc1": "fc2", "intermediate.dense": "output.dense", "linear1": "linear2"}
CONSUMER_OF["c_fc"] = "c_proj"  # GPT-2 (Conv1D)


@dataclass(frozen=True)
class Part:
    """Where one layer holds a block's units: its outputs (``"out"``) or inputs (``"in"``); unit ``u``
    is channels ``offset + u * width ... + width`` of each segment."""

    layer: str
    side: str
    segments: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Cut:
    """The units of one block (``kind``: ``"mlp"`` channels or ``"heads"``) and every layer holding them."""

    block: str
    kind: str
    parts: tuple[Part, ...]

    def units(self, model: nn.Module) -> int:
        part = self.parts[0]
        return size(model.get_submodule(part.layer), part.side) // sum(w for _, w in part.segments)


def matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as ``(outputs, inputs)``: a Linear's own, a Conv1D's transposed."""
    return layer.weight.t() if is_hf_conv1d(layer) else layer.weight


def size(layer: nn.Module, side: str) -> int:
    return matrix(layer).shape[0 if side == "out" else 1]


def _attention_parts(model: nn.Module, kind: str, path: str, roots: list[str]) -> tuple[Part, ...]:
    p = f"{path}." if path else ""
    if kind == "gpt2-attention":
        attn = model.get_submodule(path)
        hd, split = attn.head_dim, attn.split_size
        qkv = ((0, hd), (split, hd), (2 * split, hd))
        return (Part(f"{p}c_attn", "out", qkv), Part(f"{p}c_proj", "in", ((0, hd),)))
    attn = model.get_submodule(path)
    if kind == "bert-attention":  # BertSelfAttention at <layer>.attention.self, its output at <layer>.attention.output
        hd, group, consumer = attn.attention_head_size, 1, f"{path.rpartition('.')[0]}.output.dense"
    else:  # Llama-style: units are key/value heads, each with the query heads of its group
        hd, consumer = attn.head_dim, f"{p}o_proj"
        group = attn.q_proj.out_features // attn.k_proj.out_features
    q, k, v = roots
    return (
        Part(q, "out", ((0, group * hd),)),
        Part(k, "out", ((0, hd),)),
        Part(v, "out", ((0, hd),)),
        Part(consumer, "in", ((0, group * hd),)),
    )


def block_cut(model: nn.Module, block: Block) -> Cut:
    """The :class:`Cut` of one block of :func:`heads.find_blocks` (its ``problem``, a policy such as
    refusing heads of grouped-query attention, is the caller's to honour: here a Llama-style block with
    fewer key/value heads is cut by whole key/value groups)."""
    p = f"{block.path}." if block.path else ""
    if block.kind == "mlp":
        consumer = p + CONSUMER_OF[block.roots[-1][len(p) :]]
        return Cut(
            block.path, "mlp", (*(Part(r, "out", ((0, 1),)) for r in block.roots), Part(consumer, "in", ((0, 1),)))
        )
    return Cut(block.path, "heads", _attention_parts(model, block.kind, block.path, block.roots))


def cuts(model: nn.Module, chosen: Iterable[str]) -> list[Cut]:
    """A :class:`Cut` for every recognised block without a ``problem`` that has a root among ``chosen``
    (module paths: MLP up-projections, attention query/key/value); a block is cut whole whichever of
    its roots is named."""
    chosen = set(chosen)
    return [block_cut(model, b) for b in find_blocks(model) if not b.problem and chosen & set(b.roots)]


def check(model: nn.Module, plan: Iterable[Cut]) -> None:
    """Raise ``ValueError`` naming a block whose layers are not Linear / Conv1D or disagree on its units."""
    for cut in plan:
        counts = set()
        for part in cut.parts:
            layer = model.get_submodule(part.layer)
            if not (isinstance(layer, nn.Linear) or is_hf_conv1d(layer)):
                raise ValueError(
                    f"structural pruning of {cut.block!r} expects Linear or transformers Conv1D layers; "
                    f"{part.layer!r} is a {type(layer).__name__}"
                )
            width = sum(w for _, w in part.segments)
            if size(layer, part.side) % width:
                raise ValueError(f"{part.layer!r} does not split into whole units of {width} channels")
            counts.add(size(layer, part.side) // width)
        if len(counts) != 1:
            raise ValueError(f"the layers of {cut.block!r} disagree on its number of {cut.kind}: {sorted(counts)}")


def channels(part: Part, units: torch.Tensor) -> torch.Tensor:
    """The channel indices of ``units`` (sorted unit indices) in ``part``'s layer, in the layer's order."""
    pieces = [offset + (units[:, None] * width + torch.arange(width)).flatten() for offset, width in part.segments]
    return torch.cat(pieces)


@torch.no_grad()
def magnitude_scores(model: nn.Module, cut: Cut) -> torch.Tensor:
    """Each unit's weight magnitude: in every layer, the squared L2 norm of each channel's weights over
    the mean channel's (so layers of different scales count alike), averaged over the unit's channels
    and then over the layers."""
    n = cut.units(model)
    total = torch.zeros(n)
    for part in cut.parts:
        w = matrix(model.get_submodule(part.layer)).detach().float().pow(2)
        per_channel = (w.sum(1) if part.side == "out" else w.sum(0)).cpu()
        per_channel = per_channel / per_channel.mean().clamp_min(torch.finfo(torch.float32).tiny)
        unit_sum = sum(per_channel[o : o + n * w].reshape(n, w).sum(1) for o, w in part.segments)
        total += unit_sum / sum(w for _, w in part.segments)
    return total / len(cut.parts)


@torch.no_grad()
def keep(layer: nn.Module, side: str, index: torch.Tensor) -> None:
    """Keep only channels ``index`` of ``layer``'s outputs or inputs, in place (new parameter objects:
    optimizers holding the old ones must be rebuilt)."""
    conv1d = is_hf_conv1d(layer)
    dim = (1 if conv1d else 0) if side == "out" else (0 if conv1d else 1)
    index = index.to(layer.weight.device)
    layer.weight = nn.Parameter(layer.weight.index_select(dim, index).clone(), layer.weight.requires_grad)
    if side == "out" and getattr(layer, "bias", None) is not None:
        layer.bias = nn.Parameter(layer.bias.index_select(0, index).clone(), layer.bias.requires_grad)
    attr = {("out", True): "nf", ("in", True): "nx", ("out", False): "out_features", ("in", False): "in_features"}
    setattr(layer, attr[side, conv1d], len(index))


def prune(
    model: nn.Module, plan: Iterable[Cut], ratio: float, scores: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Remove ``ratio`` of the current units of every cut (at least one stays), the lowest-scoring
    ones: ``scores[block path]`` (one value per unit, e.g. from activations) or the weight magnitude.
    Returns ``{block path: the kept units' former indices}``. Configs are not touched: call
    :func:`heads.sync_configs` next."""
    kept = {}
    for cut in plan:
        n = cut.units(model)
        n_keep = max(1, n - round(ratio * n))
        score = (scores or {}).get(cut.block)
        score = magnitude_scores(model, cut) if score is None else score.detach().float().cpu()
        if score.shape != (n,):
            raise ValueError(f"scores for {cut.block!r} have shape {tuple(score.shape)}; it has {n} {cut.kind}")
        units = torch.sort(torch.sort(score, descending=True, stable=True).indices[:n_keep]).values
        for part in cut.parts:
            keep(model.get_submodule(part.layer), part.side, channels(part, units))
        kept[cut.block] = units
    return kept
