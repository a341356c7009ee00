"""Depth pruning of transformers: keep some of the layers, drop the rest (ShortGPT; Minitron's depth
axis), with the model config kept true, so ``save_pretrained`` / ``from_pretrained`` reload it.

The usual use is to *derive a student from its teacher*: drop layers here, remove heads and MLP
channels with :mod:`lightning_slim.pruning.heads`, then train the small model (with or without
distillation). Which layers to drop is chosen by a loss the caller measures (validation loss):
:func:`choose_layers` tries each contiguous run of layers to drop, as Gromov et al. (2024) found
the deeper layers of trained LMs the least needed, and keeps the run whose removal costs least.
:func:`choose_layers_by_angle` ranks the same runs without running the model once per run: by the
angle between the residual stream before and after each run, measured on calibration data
(:func:`lightning_slim.pruning.activations.activation_importance`'s ``similarity``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_slim.pruning.heads import find_blocks

_LAYER_INDEX = ("layer_idx", "layer_id")  # attention modules index the key/value cache with these


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, ModuleList)`` of the transformer layers: the list whose every entry holds one
    attention block (``model.layers`` of Llama, ``transformer.h`` of GPT-2, ``encoder.layer`` of BERT)."""
    attention = [b.path for b in find_blocks(model) if b.kind != "mlp"]
    for path, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            prefix = f"{path}." if path else ""
            holders = {a.split(".")[len(prefix.split(".")) - 1] for a in attention if a.startswith(prefix)}
            if holders == {str(i) for i in range(len(m))}:
                return path, m
    raise ValueError(
        f"{type(model).__name__} has no list of transformer layers (an nn.ModuleList whose every entry "
        "holds one attention block); depth pruning needs one"
    )


def keep_layers(model: nn.Module, keep: Sequence[int]) -> dict[str, object]:
    """Keep only the layers ``keep`` (indices into the layer list, kept in their order), in place.
    Updates ``num_hidden_layers`` (and ``layer_types`` where the config has it) of every config in
    the model and renumbers the attention modules' cache index. Returns the changes."""
    path, layers = layer_stack(model)
    n = len(layers)
    kept = list(keep)
    if not kept or len(set(kept)) != len(kept) or any(not 0 <= i < n for i in kept):
        raise ValueError(f"keep={kept!r} must name distinct layers in 0..{n - 1} ({n} layers), at least one")
    kept.sort()
    types = {id(c): [t[i] for i in kept] for c in _configs(model, n) if len(t := _types(c)) == n}
    _install(model, path, nn.ModuleList([layers[i] for i in kept]), n, types)
    return {"num_hidden_layers": len(kept), "kept_layers": kept, "of": n}


def _configs(model: nn.Module, count: int) -> list:
    """The distinct Hugging Face configs in ``model`` that count ``count`` layers."""
    found = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "to_dict")}
    return [c for c in found.values() if getattr(c, "num_hidden_layers", None) == count]


def _types(config) -> list:
    types = getattr(config, "layer_types", None)
    return types if isinstance(types, list) else []


def _install(model: nn.Module, path: str, layers: nn.ModuleList, count_before: int, types: dict[int, list]) -> None:
    """Put ``layers`` at ``path`` and make the model agree with them: each attention's cache index
    is its layer's position, and the configs (and ``nn.TransformerEncoder``) that counted
    ``count_before`` layers count these, with ``types[id(config)]`` as their ``layer_types``."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, layers)
    for position, layer in enumerate(layers):
        for m in layer.modules():
            for attr in _LAYER_INDEX:
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, position)
    for config in _configs(model, count_before):
        config.num_hidden_layers = len(layers)
        if id(config) in types:
            config.layer_types = types[id(config)]
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and m.layers is layers:
            m.num_layers = len(layers)


def choose_layers(model: nn.Module, keep: int, loss: Callable[[nn.Module], float]) -> tuple[list[int], dict]:
    """The ``keep`` layers to keep: for each contiguous run of ``n - keep`` layers, ``loss(model
    without them)`` is measured and the run with the lowest loss is dropped. The model is changed
    in place for each measurement and restored after it (no copy: a large model fits once).
    Returns ``(kept indices, {"first-last" dropped: loss})``."""
    path, layers = layer_stack(model)
    n = len(layers)
    if not 0 < keep < n:
        raise ValueError(f"keep={keep} must be between 1 and {n - 1} (the model has {n} layers)")
    drop = n - keep
    losses = {}
    for start in range(n - drop + 1):
        with _trimmed(model, path, [i for i in range(n) if not start <= i < start + drop]):
            losses[f"{start}-{start + drop - 1}"] = float(loss(model))
    first, last = map(int, min(losses, key=losses.get).split("-"))
    return [i for i in range(n) if not first <= i <= last], losses


@contextlib.contextmanager
def _trimmed(model: nn.Module, path: str, keep: list[int]):
    """``keep_layers`` for the duration of the block; the original layers are put back after it
    (the cache indices of a Hugging Face model are the layers' positions, so they follow)."""
    layers = model.get_submodule(path)
    types = {id(c): _types(c) for c in _configs(model, len(layers)) if _types(c)}
    try:
        keep_layers(model, keep)
        yield
    finally:
        _install(model, path, layers, len(keep), types)


def angular_distances(similarity: torch.Tensor, drop: int) -> dict[str, float]:
    """``{"first-last": angle / pi}`` for each contiguous run of ``drop`` layers: the angular
    distance between the residual stream before the run and after it (Gromov et al. 2024), from
    the ``(L + 1, L + 1)`` mean cosine matrix of the stream states."""
    n = similarity.shape[0] - 1
    if not 0 < drop < n:
        raise ValueError(f"drop={drop} must be between 1 and {n - 1} (the similarity covers {n} layers)")
    return {
        f"{a}-{a + drop - 1}": float(torch.arccos(similarity[a, a + drop].clamp(-1, 1)) / torch.pi)
        for a in range(n - drop + 1)
    }


def choose_layers_by_angle(similarity: torch.Tensor, keep: int) -> tuple[list[int], dict[str, float]]:
    """The ``keep`` layers to keep: the contiguous run of ``n - keep`` layers that turns the residual
    stream least is dropped. Returns ``(kept indices, {"first-last": angular distance})``."""
    n = similarity.shape[0] - 1
    if not 0 < keep < n:
        raise ValueError(f"keep={keep} must be between 1 and {n - 1} (the model has {n} layers)")
    distances = angular_distances(similarity, n - keep)
    first, last = map(int, min(distances, key=distances.get).split("-"))
    return [i for i in range(n) if not first <= i <= last], distances
