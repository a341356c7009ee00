"""Structural pruning of transformers: whole attention heads and MLP channels, with the residual
stream (``hidden_size``) left alone, and the model config kept true to the pruned shapes.

What it recognises (by structure, not by class name, so Llama-style relatives such as Mistral or
Qwen2 are covered too):

- Hugging Face Llama-style attention (``q_proj``/``k_proj``/``v_proj``/``o_proj`` and ``head_dim``):
  heads removed whole through torch-pruning's ``num_heads`` mapping; the config's
  ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` are updated, so
  ``save_pretrained`` / ``from_pretrained`` reload the pruned model;
- Hugging Face BERT-style attention (``query``/``key``/``value`` and ``attention_head_size``):
  heads removed whole; their configs derive the head size from ``hidden_size / num_attention_heads``
  and cannot express fewer heads of the same size, so such a model reloads with
  ``lightning_slim.pruning.load_pruned`` (the shapes are in the checkpoint), not ``from_pretrained``;
- MLPs: ``gate_proj``/``up_proj`` (Llama), ``fc1`` (ViT), ``intermediate.dense`` (BERT), ``linear1``
  (``nn.TransformerEncoderLayer``); ``config.intermediate_size`` follows;
- GPT-2 (transformers' ``Conv1D``, a Linear with a transposed weight): heads of ``c_attn`` / ``c_proj``
  and MLP channels of ``c_fc`` / ``c_proj``; ``config.n_inner`` follows, but its config cannot express
  fewer heads of the same size, so pruned heads reload with ``load_pruned``;
- refused before training, with the reason: heads of ``nn.MultiheadAttention`` (its inner width is
  tied to ``embed_dim``, the residual stream), grouped-query attention (whose heads
  :func:`lightning_slim.pruning.width.keep_heads` removes, group by group, before training), and
  ``Conv1D`` layers in other structures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_slim.pruning.tensors import is_hf_conv1d


@dataclass
class Block:
    """One attention or MLP part of a transformer, by module paths."""

    kind: str  # "llama-attention", "bert-attention", "mha", "mlp", "conv1d"
    path: str
    roots: list[str] = field(default_factory=list)  # layers whose outputs are removed
    heads: int = 0
    problem: str = ""  # why it cannot be pruned structurally (empty: it can)


def _linear(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _conv1d(module: nn.Module, *names: str) -> bool:
    return all(is_hf_conv1d(getattr(module, n, None)) for n in names)


def find_blocks(model: nn.Module) -> list[Block]:
    """The attention and MLP parts of every transformer layer in ``model``."""
    blocks: list[Block] = []
    for path, m in model.named_modules():
        p = f"{path}." if path else ""
        if _linear(m, "q_proj", "k_proj", "v_proj", "o_proj") and isinstance(getattr(m, "head_dim", None), int):
            heads, kv = m.q_proj.out_features // m.head_dim, m.k_proj.out_features // m.head_dim
            problem = (
                ""
                if heads == kv
                else (
                    f"grouped-query attention ({heads} query heads, {kv} key/value heads): torch-pruning "
                    "cannot keep the groups whole, so this path does not remove its heads; "
                    "lightning_slim.pruning.width.keep_heads removes whole groups or query heads within "
                    "groups (before training, by activation importance)"
                )
            )
            blocks.append(Block("llama-attention", path, [f"{p}q_proj", f"{p}k_proj", f"{p}v_proj"], heads, problem))
        elif _linear(m, "query", "key", "value") and isinstance(getattr(m, "attention_head_size", None), int):
            blocks.append(
                Block(
                    "bert-attention",
                    path,
                    [f"{p}query", f"{p}key", f"{p}value"],
                    m.query.out_features // m.attention_head_size,
                )
            )
        elif isinstance(m, nn.MultiheadAttention):
            blocks.append(
                Block(
                    "mha",
                    path,
                    [],
                    m.num_heads,
                    f"nn.MultiheadAttention ties its inner width to embed_dim={m.embed_dim} (the residual "
                    "stream), so its heads cannot be removed without shrinking the model's width",
                )
            )
        elif _linear(m, "gate_proj", "up_proj", "down_proj"):
            blocks.append(Block("mlp", path, [f"{p}gate_proj", f"{p}up_proj"]))
        elif _linear(m, "fc1", "fc2"):  # ViT, CLIP, OPT-style MLPs
            blocks.append(Block("mlp", path, [f"{p}fc1"]))
        elif isinstance(getattr(m, "intermediate", None), nn.Module) and _linear(m.intermediate, "dense"):
            blocks.append(Block("mlp", path, [f"{p}intermediate.dense"]))
        elif isinstance(m, nn.TransformerEncoderLayer):
            blocks.append(Block("mlp", path, [f"{p}linear1"]))
        elif _conv1d(m, "c_attn", "c_proj") and isinstance(getattr(m, "head_dim", None), int):  # GPT-2
            cross = "" if getattr(m, "q_attn", None) is None else "GPT-2 cross-attention (q_attn) is not supported"
            blocks.append(Block("gpt2-attention", path, [f"{p}c_attn"], m.c_attn.nf // 3 // m.head_dim, cross))
        elif _conv1d(m, "c_fc", "c_proj"):  # GPT-2's MLP
            blocks.append(Block("mlp", path, [f"{p}c_fc"]))
        elif any(is_hf_conv1d(c) for c in m.children()):
            blocks.append(
                Block(
                    "conv1d",
                    path,
                    [],
                    0,
                    "its transformers Conv1D layers are not a GPT-2 attention (c_attn, c_proj) or MLP "
                    "(c_fc, c_proj), the Conv1D structures structural pruning knows",
                )
            )
    return blocks


def transformer_plan(model: nn.Module, heads: bool) -> tuple[list[str], dict[str, int], list[Block]]:
    """For a model with transformer blocks: the layers whose outputs structural pruning removes
    (MLP up-projections, and query/key/value when ``heads``), ``{q/k/v path: number of heads}``
    and the blocks that cannot be pruned (with ``problem`` set)."""
    roots, num_heads, refused = [], {}, []
    blocks = find_blocks(model)
    if not any(b.kind != "mlp" for b in blocks):  # no attention: not a transformer (a CNN's fc1/fc2 head)
        return [], {}, []
    for b in blocks:
        if b.kind == "mlp":
            roots += b.roots
        elif b.problem and (heads or b.kind == "conv1d"):
            refused.append(b)
        elif heads and b.kind.endswith("attention"):
            roots += b.roots
            num_heads.update({r: b.heads for r in b.roots})
    return roots, num_heads, refused


def choose(
    modules: dict[str, nn.Module],
    roots: list[str],
    refused: list[Block],
    selected: dict[str, nn.Module] | None,
    exclude: list[str],
) -> dict[str, nn.Module]:
    """The structural targets of a transformer: the user's ``selected`` layers (which must be among
    ``roots``) or every root not excluded; an error for any refused block they touch."""
    inside = lambda n, p: n == p or n.startswith(p + ".")
    chosen = selected or {n: modules[n] for n in roots if not any(inside(n, e) for e in exclude)}
    for block in refused:
        if selected is None or selected == {} or any(inside(n, block.path) for n in chosen):
            raise ValueError(
                f"structural pruning cannot prune {block.path!r}: {block.problem}. "
                + ("Pass heads=False to remove MLP channels only, or " if block.kind == "mha" else "")
                + "use pattern='unstructured' or '2:4' for this model"
            )
    residual = sorted(set(chosen) - set(roots))
    if residual:
        raise ValueError(
            f"structural pruning of a transformer removes MLP channels and attention heads only; "
            f"{residual} would shrink the hidden size (the residual stream). Allowed targets: {roots}"
        )
    return chosen


def sync_configs(model: nn.Module) -> dict[str, Any]:
    """Make the attributes and Hugging Face configs of pruned attention / MLP modules match their
    new shapes. Returns what changed (``{"num_attention_heads": 2, ...}``) and ``reloadable``: False
    where ``from_pretrained`` cannot rebuild the model from its config alone (use ``load_pruned``)."""
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "to_dict")}
    heads, kv_heads, head_dims, widths, reloadable = set(), set(), set(), set(), True
    for m in model.modules():
        if _linear(m, "q_proj", "k_proj", "v_proj", "o_proj") and isinstance(getattr(m, "head_dim", None), int):
            h, kv = m.q_proj.out_features // m.head_dim, m.k_proj.out_features // m.head_dim
            m.num_key_value_groups = h // max(kv, 1)
            for attr in ("num_heads", "num_attention_heads"):
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, h)
            heads.add(h), kv_heads.add(kv), head_dims.add(m.head_dim)
        elif _linear(m, "query", "key", "value") and isinstance(getattr(m, "attention_head_size", None), int):
            h = m.query.out_features // m.attention_head_size
            if h != m.num_attention_heads:
                m.num_attention_heads, m.all_head_size = h, m.query.out_features
            reloadable &= all(getattr(c, "num_attention_heads", h) == h for c in configs.values())
        elif _conv1d(m, "c_attn", "c_proj") and isinstance(getattr(m, "head_dim", None), int):  # GPT-2
            h = m.c_attn.nf // 3 // m.head_dim
            m.num_heads, m.split_size = h, h * m.head_dim  # its config cannot hold fewer heads of the same size
            reloadable &= all(getattr(c, "num_attention_heads", h) == h for c in configs.values())
        width = _mlp_width(m)
        if width is not None:
            widths.add(width)
    changed: dict[str, Any] = {}
    for c in configs.values():
        updates = {}
        counts = (getattr(c, "num_attention_heads", None), getattr(c, "num_key_value_heads", None))
        if len(heads) == 1 and len(kv_heads) == 1 and counts[0] is not None and counts != (*heads, *kv_heads):
            updates.update(
                num_attention_heads=next(iter(heads)),
                num_key_value_heads=next(iter(kv_heads)),
                head_dim=next(iter(head_dims)),
            )
        width = next(iter(widths)) if len(widths) == 1 else None
        if width is not None and hasattr(c, "n_inner"):  # GPT-2's name; None there means 4 * n_embd
            if (c.n_inner or 4 * c.n_embd) != width:
                updates["n_inner"] = width
        elif width is not None and getattr(c, "intermediate_size", None) not in (None, width):
            updates["intermediate_size"] = width
        for k, v in updates.items():
            setattr(c, k, v)
        changed.update(updates)
    changed["reloadable"] = reloadable and len(heads) <= 1 and len(widths) <= 1
    return changed


def _mlp_width(m: nn.Module) -> int | None:
    if _linear(m, "gate_proj", "up_proj", "down_proj"):
        return m.up_proj.out_features
    if _linear(m, "fc1", "fc2"):
        return m.fc1.out_features
    if _conv1d(m, "c_fc", "c_proj"):
        return m.c_fc.nf
    inner = getattr(m, "intermediate", None)
    if isinstance(inner, nn.Module) and _linear(inner, "dense"):
        return inner.dense.out_features
    return None
