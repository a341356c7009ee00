"""What a pruning target is: a module *and* the parameter it prunes, with the layout of that
parameter, so every weight matrix a user expects is covered and the rest is said out loud.

- ``nn.Linear``, ``nn.Conv1d/2d/3d``: ``weight`` (output channels first);
- ``nn.MultiheadAttention``: ``in_proj_weight`` (a bare parameter holding the query, key and value
  projections; or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``); its ``out_proj`` is a Linear;
- Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2): ``weight``, stored *input first*
  (``[in, out]``); :func:`as_matrix` gives every target as ``(rows = outputs, cols = inputs)``;
- a module named explicitly whose ``weight`` is a parameter (an ``nn.Embedding``, a custom layer).

A *tied output head* (a layer whose weight is an ``nn.Embedding``'s table: GPT-2's and SmolLM2's
``lm_head``) is never a target by kind: pruning it prunes the input embedding. It is pruned only
when named by its path or parameter name (:func:`tied_output_heads`).

A target's name (the key of its mask and of its ``sparsity/<name>`` metric) is the module path for a
module's ``weight`` (``"net.0"``, as before parameter-level targets existed) and the full parameter
name otherwise (``"layers.0.self_attn.in_proj_weight"``).

>>> from torch import nn
>>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1,
...                             enable_nested_tensor=False)
>>> list(select_tensors(enc))  # doctest: +NORMALIZE_WHITESPACE
['layers.0.self_attn.in_proj_weight', 'layers.0.self_attn.out_proj', 'layers.0.linear1', 'layers.0.linear2']
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lightning_slim.targets import select_parameters

MHA_PARAMS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's Linear with a transposed weight), without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def default_kinds() -> tuple[type[nn.Module], ...]:
    kinds: list[type[nn.Module]] = [nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention]
    hf = sys.modules.get("transformers.pytorch_utils")  # a model holding a Conv1D has imported it already
    if hf is not None:
        kinds.append(hf.Conv1D)
    return tuple(kinds)


def params_of(module: nn.Module) -> list[str]:
    """The parameter names pruning handles on ``module`` (empty: it handles none)."""
    if isinstance(module, nn.MultiheadAttention):
        return [k for k in MHA_PARAMS if isinstance(getattr(module, k, None), nn.Parameter)]
    weight = getattr(module, "weight", None)
    return ["weight"] if isinstance(weight, nn.Parameter) else []


@dataclass(frozen=True)
class Target:
    """One pruned tensor: ``module`` (path), ``param`` (its name there) and ``layout``: ``"out_in"``
    (outputs on dim 0, inputs flattened over the rest) or ``"in_out"`` (transformers' Conv1D)."""

    name: str
    module: str
    param: str
    layout: str = "out_in"


def tied_output_heads(model: nn.Module, targets: Iterable[str] | None = None) -> dict[str, str]:
    """The tied output heads that pruning leaves out: ``{head path: the embedding it shares its weight
    with}``, for every module other than an ``nn.Embedding`` whose ``weight`` is an ``nn.Embedding``'s
    table, unless ``targets`` names it by its path or by the shared parameter's name (selecting it by
    class or regex does not: "every Linear" means the matrices of the layers, not the vocabulary).

    >>> from torch import nn
    >>> lm = nn.ModuleDict({"embed": nn.Embedding(10, 4), "body": nn.Linear(4, 4), "head": nn.Linear(4, 10)})
    >>> lm.head.weight = lm.embed.weight
    >>> tied_output_heads(lm), tied_output_heads(lm, ["head"]), list(select_tensors(lm))
    ({'head': 'embed'}, {}, ['body'])
    """
    named = set(targets or ())
    tables = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    param_names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Embedding) or id(weight) not in tables:
            continue
        if path not in named and param_names.get(id(weight)) not in named:
            out[path] = tables[id(weight)]
    return out


def select_tensors(
    model: nn.Module, targets: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> dict[str, Target]:
    """The tensors ``targets`` selects (the grammar of :mod:`lightning_slim.targets`, plus full
    parameter names); ``targets=None``: every Linear, Conv, MultiheadAttention and Conv1D. Tied
    output heads are left out unless named (:func:`tied_output_heads`)."""
    targets = None if targets is None else list(targets)
    chosen = select_parameters(model, targets, exclude, default=default_kinds(), params_of=params_of, what="pruning")
    heads = tied_output_heads(model, targets)
    modules = dict(model.named_modules())
    out = {}
    for path, key in chosen.values():
        if path in heads:
            continue
        name = path if key == "weight" else f"{path}.{key}"
        out[name] = Target(name, path, key, "in_out" if is_hf_conv1d(modules[path]) else "out_in")
    if not out:
        raise ValueError(
            f"pruning: no target left: the only ones selected are tied output heads {sorted(heads)} (their weight "
            "is the input embedding); name them in targets to prune the embedding through them"
        )
    return out


def tensor_of(model: nn.Module, target: Target) -> nn.Parameter:
    return getattr(model.get_submodule(target.module), target.param)


def as_matrix(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """A ``(rows = outputs, cols = inputs)`` view of a weight (conv kernels flattened into the inputs)."""
    if layout == "in_out":
        return tensor.t()
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() != 2 else tensor


def from_matrix(matrix: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """The inverse of :func:`as_matrix`: back to ``like``'s own shape."""
    return matrix.t().contiguous() if layout == "in_out" else matrix.reshape(like.shape)


TIED_HEAD = "tied output head"  # a reason in untouched_matrices: expected, stated in an info line, never warned


def untouched_matrices(model: nn.Module, pruned: Mapping[str, Target], excluded: Iterable[str] = ()) -> dict[str, str]:
    """Every weight matrix (a parameter with 2 or more dimensions) that is not pruned, with why:
    ``"tied output head <path>"`` (an embedding table that a tied output head left out by
    :func:`tied_output_heads` multiplies), ``"excluded"`` (by ``exclude`` / the classifier),
    ``"embedding"`` (an ``nn.Embedding``, or a bare parameter named like ``pos``/``cls_token``/
    ``position_embeddings``), ``"not a target"`` (a kind
    the user did not select) or ``"unsupported"`` (on a module pruning has no handling for, e.g. a
    custom layer's bare parameter). A tied parameter pruned under another name counts as pruned."""
    excluded = set(excluded)
    heads = {id(model.get_submodule(h).weight): h for h in tied_output_heads(model)}  # pruned ones skip below
    handled_kinds = default_kinds()
    pruned_ids = {id(tensor_of(model, t)) for t in pruned.values()}
    out: dict[str, str] = {}
    owners = {}
    for mod_name, module in model.named_modules():
        for key, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (mod_name, module, key))
    for name, p in model.named_parameters():
        if id(p) in pruned_ids or p.dim() < 2:
            continue
        mod_name, module, key = owners[id(p)]
        if id(p) in heads:
            out[name] = f"{TIED_HEAD} {heads[id(p)]}"
        elif name in excluded or mod_name in excluded or f"{mod_name}.{key}" in excluded:
            out[name] = "excluded"
        elif isinstance(module, nn.Embedding) or any(w in key.lower() for w in ("embed", "pos", "token")):
            out[name] = "embedding"  # nn.Embedding, or a bare positional / class-token table
        elif isinstance(module, handled_kinds) and key in params_of(module):
            out[name] = "not a target"
        else:
            out[name] = "unsupported"
    return out


def tied(model: nn.Module, pruned: Mapping[str, Target]) -> dict[str, list[str]]:
    """Pruned parameters that other modules share (e.g. GPT-2's ``lm_head`` and token embedding):
    ``{pruned name: [the other module paths]}``. Their zeros show up in every place they are used."""
    users: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            users.setdefault(id(p), []).append(mod_name)
    out = {}
    for name, t in pruned.items():
        others = [u for u in users.get(id(tensor_of(model, t)), []) if u != t.module]
        if others:
            out[name] = others
    return out
