"""Width pruning of Llama-style transformers by importance scores: MLP channels and attention heads,
grouped-query attention included, sliced in place with the model config kept true, so the pruned
model reloads with ``from_pretrained`` and generates with its key/value cache.

Llama-style means attention with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and ``head_dim``
(Llama, Mistral, Qwen2/3, SmolLM...) and MLPs with ``gate_proj``/``up_proj``/``down_proj``. Every
layer keeps the same number of heads and channels (Hugging Face configs hold one
``num_attention_heads`` and one ``intermediate_size``); *which* ones each layer keeps follows that
layer's own scores (:mod:`lightning_slim.pruning.activations` measures them on calibration data).

Grouped-query attention: query head ``h`` reads key/value head ``h // (heads / kv_heads)``, so heads
go in a way that keeps the groups whole and equal: :func:`keep_heads` keeps the ``kv_heads`` groups
with the highest summed score and, inside each, its ``queries_per_kv`` best query heads.
``head_dim`` never changes.

>>> import torch, transformers
>>> cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
...                                num_attention_heads=4, num_key_value_heads=2)
>>> model = transformers.LlamaForCausalLM(cfg)
>>> scores = {"model.layers.0.self_attn": torch.tensor([1.0, 2.0, 0.5, 0.1])}  # group 0 (heads 0, 1) wins
>>> keep_heads(model, kv_heads=1, queries_per_kv=1, importance=scores)["kept_heads"]
{'model.layers.0.self_attn': [1]}
>>> model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim
(1, 1, 4)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_slim.modules import replace_submodule
from lightning_slim.pruning.heads import find_blocks, sync_configs

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def attentions(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: attention}`` of every Llama-style attention (``q/k/v/o_proj`` and ``head_dim``)."""
    return {b.path: model.get_submodule(b.path) for b in find_blocks(model) if b.kind == "llama-attention"}


def mlps(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: MLP}`` of every gated MLP (``gate_proj``/``up_proj``/``down_proj``)."""
    return {
        b.path: m
        for b in find_blocks(model)
        if b.kind == "mlp"
        and all(isinstance(getattr(m := model.get_submodule(b.path), n, None), nn.Linear) for n in MLP_PROJECTIONS)
    }


def head_counts(attention: nn.Module) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head_dim)`` of a Llama-style attention, read from its shapes."""
    d = attention.head_dim
    return attention.q_proj.out_features // d, attention.k_proj.out_features // d, d


def require_llama_style(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """The attentions and MLPs of ``model``; a ``ValueError`` naming what is missing when it has
    none of one kind (the slicing here knows Llama-style blocks only)."""
    found_attn, found_mlp = attentions(model), mlps(model)
    if not found_attn or not found_mlp:
        kinds = sorted({b.kind for b in find_blocks(model)})
        raise ValueError(
            f"{type(model).__name__} has no Llama-style {'attention' if not found_attn else 'MLP'} "
            f"(q/k/v/o_proj with head_dim; gate/up/down_proj); it has blocks of kinds {kinds}. "
            "Activation-aware width pruning slices Llama-style blocks (Llama, Mistral, Qwen2, SmolLM); "
            "use IterativeMagnitudePruning(pattern='structured') for other transformers"
        )
    return found_attn, found_mlp


@torch.no_grad()
def slice_linear(linear: nn.Linear, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None):
    """A new ``nn.Linear`` holding the rows ``out_index`` and columns ``in_index`` of ``linear``
    (None: all), with its dtype, device and ``requires_grad``."""
    weight = linear.weight
    if out_index is not None:
        weight = weight.index_select(0, out_index.to(weight.device))
    if in_index is not None:
        weight = weight.index_select(1, in_index.to(weight.device))
    new = nn.Linear(
        weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device, dtype=weight.dtype
    )
    new.weight.copy_(weight)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias if out_index is None else linear.bias.index_select(0, out_index.to(weight.device))
        new.bias.copy_(bias)
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _scores(importance: Mapping[str, torch.Tensor], path: str, size: int, what: str) -> torch.Tensor:
    if path not in importance:
        raise ValueError(f"no {what} importance for {path!r}; importance has {sorted(importance)[:6]}...")
    score = torch.as_tensor(importance[path]).detach().float().cpu()
    if score.shape != (size,):
        raise ValueError(f"{what} importance of {path!r} has shape {tuple(score.shape)}; expected ({size},)")
    return score


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in their original order (ties: the lower index)."""
    order = torch.argsort(-score, stable=True)
    return order[:k].sort().values


def keep_mlp_channels(model: nn.Module, width: int, importance: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Keep the ``width`` intermediate channels of highest ``importance[path]`` in every gated MLP,
    in place (rows of ``gate_proj``/``up_proj``, columns of ``down_proj``); ``intermediate_size``
    follows. Returns ``{"intermediate_size": width, "kept_channels": {path: [...]}}``."""
    _, found = require_llama_style(model)
    sizes = {m.up_proj.out_features for m in found.values()}
    if isinstance(width, bool) or not isinstance(width, int) or not 0 < width <= min(sizes):
        raise ValueError(f"width={width!r} must be an integer in 1..{min(sizes)} (the MLPs' intermediate size)")
    kept = {}
    for path, mlp in found.items():
        index = _top(_scores(importance, path, mlp.up_proj.out_features, "MLP channel"), width)
        for name in ("gate_proj", "up_proj"):
            replace_submodule(mlp, name, slice_linear(getattr(mlp, name), out_index=index))
        replace_submodule(mlp, "down_proj", slice_linear(mlp.down_proj, in_index=index))
        for attr in ("intermediate_size",):
            if isinstance(getattr(mlp, attr, None), int):
                setattr(mlp, attr, width)
        kept[path] = index.tolist()
    sync_configs(model)
    return {"intermediate_size": width, "kept_channels": kept}


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def keep_heads(
    model: nn.Module, kv_heads: int, queries_per_kv: int, importance: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Keep ``kv_heads`` key/value groups and ``queries_per_kv`` query heads in each, in place, in
    every Llama-style attention: the groups with the highest summed ``importance[path]`` (one score
    per query head) and, inside each, its highest-scoring query heads. ``q_proj``/``o_proj`` keep
    the kept query heads' rows/columns, ``k_proj``/``v_proj`` the kept groups' rows; the config's
    ``num_attention_heads`` = ``kv_heads * queries_per_kv``, ``num_key_value_heads`` = ``kv_heads``,
    ``head_dim`` unchanged. Returns the new counts and ``{"kept_heads": {path: [query heads]}}``."""
    found, _ = require_llama_style(model)
    counts = {head_counts(a) for a in found.values()}
    if len(counts) != 1:
        raise ValueError(f"the attentions have different head counts {sorted(counts)}; keep_heads needs them equal")
    heads, groups, head_dim = counts.pop()
    per_group = heads // groups
    for name, value, most in (("kv_heads", kv_heads, groups), ("queries_per_kv", queries_per_kv, per_group)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most:
            raise ValueError(
                f"{name}={value!r} must be an integer in 1..{most} (the model has {heads} query heads in "
                f"{groups} key/value groups of {per_group})"
            )
    kept = {}
    for path, attn in found.items():
        score = _scores(importance, path, heads, "attention head").reshape(groups, per_group)
        kept_groups = _top(score.sum(1), kv_heads)
        within = torch.stack([_top(score[g], queries_per_kv) for g in kept_groups.tolist()])
        query = (kept_groups[:, None] * per_group + within).flatten()
        q_rows, kv_rows = _head_rows(query, head_dim), _head_rows(kept_groups, head_dim)
        replace_submodule(attn, "q_proj", slice_linear(attn.q_proj, out_index=q_rows))
        replace_submodule(attn, "k_proj", slice_linear(attn.k_proj, out_index=kv_rows))
        replace_submodule(attn, "v_proj", slice_linear(attn.v_proj, out_index=kv_rows))
        replace_submodule(attn, "o_proj", slice_linear(attn.o_proj, in_index=q_rows))
        kept[path] = query.tolist()
    changed = sync_configs(model)
    return {
        "num_attention_heads": kv_heads * queries_per_kv,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "reloadable": changed["reloadable"],
        "kept_heads": kept,
    }
