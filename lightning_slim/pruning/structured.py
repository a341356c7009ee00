"""Structural (channel / neuron) pruning in plain PyTorch: transformer blocks sliced directly
(:mod:`.slicing`), any other model with torch-pruning's DepGraph.

Removing a channel shrinks every layer that depends on it (the next layer's inputs, batch
norm statistics...), so the model gets really smaller and faster. torch-pruning replaces
parameter objects: whoever holds the old ones (optimizers, DDP) must be rebuilt.

A pruned model's *structure* (shapes of every parameter and buffer, plus the size
attributes such as ``out_channels``) is plain data: :func:`structure_of` records it and
:func:`restructure` makes a freshly built model match it, so a checkpoint of a pruned
model can be loaded (``load_state_dict`` then fits).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv1d(1, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 36, 2))
>>> _ = channel_prune(net, torch.zeros(1, 1, 40), [net[0], net[2]], ratio=0.5)
>>> net[0].out_channels, net[2].in_channels, net[4].in_features
(4, 4, 144)
>>> fresh = nn.Sequential(nn.Conv1d(1, 8, 3), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 36, 2))
>>> restructure(fresh, structure_of(net))
5
>>> _ = fresh.load_state_dict(net.state_dict())
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_slim.modules import device_of, evaluating, output_tensor
from lightning_slim.pruning import slicing
from lightning_slim.pruning.heads import sync_configs

ROOTS = (nn.Linear, nn.modules.conv._ConvNd)  # layers whose output channels we remove
SIZE_ATTRS = (
    "in_channels",
    "out_channels",
    "in_features",
    "out_features",
    "num_features",
    "normalized_shape",
    "num_embeddings",
    "embedding_dim",
    "embed_dim",
    "num_channels",
    "nf",  # transformers' Conv1D: outputs
    "nx",  # and inputs
)


def dependency_graph(model: nn.Module, example_inputs: Any):
    import torch_pruning as tp

    with evaluating(model, no_grad=False), warnings.catch_warnings():  # tracing follows grad_fn
        warnings.filterwarnings("ignore", message=".*Unwrapped parameters.*")  # norms' weights: pruned with them
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, output_transform=output_tensor
        )


def trace_inputs(
    module: nn.Module,
    example_input_array: Any = None,
    example_input_shape: Any = None,
    example_input_dtype: str = "auto",
) -> tuple[nn.Module, Any]:
    """What torch-pruning traces: ``(root module, example inputs)``.

    In order: the module's ``example_input_array``; zeros of ``example_input_shape`` (integer
    token ids when ``example_input_dtype`` is ``"int64"``, or ``"auto"`` and the model has an
    ``nn.Embedding``); else a Hugging Face model inside the module, traced alone with
    ``input_ids`` or ``pixel_values`` built from its config (its parameters are the module's).
    """
    if example_input_shape is not None:
        dtype = {"float32": torch.float32, "int64": torch.long}.get(example_input_dtype)
        if dtype is None:  # "auto"
            has_embedding = any(isinstance(m, nn.Embedding) for m in module.modules())
            dtype = torch.long if has_embedding else torch.float32
        return module, torch.zeros(*example_input_shape, dtype=dtype, device=device_of(module))
    if example_input_array is not None:
        return module, example_input_array
    for _, sub in module.named_modules():
        config = getattr(sub, "config", None)
        if hasattr(config, "to_dict") and hasattr(sub, "main_input_name"):
            device = device_of(sub)
            if sub.main_input_name == "pixel_values":
                size = getattr(config, "image_size", 32)
                size = size if isinstance(size, int) else size[0]
                return sub, {
                    "pixel_values": torch.zeros(1, getattr(config, "num_channels", 3), size, size, device=device)
                }
            return sub, {"input_ids": torch.zeros(1, 8, dtype=torch.long, device=device)}
    raise ValueError(
        "structured pruning traces the model: set example_input_array on the module or pass "
        "example_input_shape=[1, ...] to IterativeMagnitudePruning (token ids are fed as int64)"
    )


def remove_channels(
    model: nn.Module,
    example_inputs: Any,
    roots: Iterable[str],
    ratio: float,
    *,
    slice_blocks: bool,
    global_pruning: bool = False,
) -> None:
    """Remove ``ratio`` of the current output channels of the layers at ``roots`` (module paths in
    ``model``), and the inputs that read them. ``slice_blocks``: ``model`` is a transformer whose
    blocks :mod:`.slicing` knows: heads and MLP channels are sliced directly, nothing is traced;
    otherwise torch-pruning traces ``example_inputs``. Configs are left to :func:`sync_configs`."""
    roots = list(roots)
    if slice_blocks:
        slicing.prune(model, slicing.cuts(model, roots), ratio)
    else:
        modules = dict(model.named_modules())
        channel_prune(model, example_inputs, [modules[r] for r in roots], ratio, global_pruning)


def dry_run(model: nn.Module, example_inputs: Any, roots: Iterable[str], ratio: float, **how: Any) -> dict[str, Any]:
    """Prune a copy of ``model`` to ``ratio`` (:func:`remove_channels` with ``how``) and run it, so that
    a model the pruned shapes break fails here, before training, and not mid-fit. Returns the config
    changes it would make."""
    roots = list(roots)
    copy_ = copy.deepcopy(model)
    try:
        remove_channels(copy_, example_inputs, roots, ratio, **how)
        changed = sync_configs(copy_)
        with evaluating(copy_):
            out = copy_(**example_inputs) if isinstance(example_inputs, dict) else copy_(example_inputs)
            output_tensor(out)
    except Exception as err:
        raise ValueError(
            f"structural pruning of {sorted(roots)} to {ratio:g} breaks the model "
            f"({type(err).__name__}: {err}); exclude the layers involved or prune less"
        ) from err
    return changed


def check_prunable(model: nn.Module, example_inputs: Any, layers: Mapping[str, nn.Module]) -> None:
    """Raise ``ValueError`` naming any layer torch-pruning cannot remove channels from."""
    try:
        graph = dependency_graph(model, example_inputs)
    except Exception as err:  # tracing failures come in many types
        raise ValueError(
            f"torch-pruning cannot trace this model for structural pruning: {type(err).__name__}: {err}"
        ) from err
    for name, module in layers.items():
        if not isinstance(module, ROOTS):
            raise ValueError(
                f"structural pruning cannot handle layer {name!r} ({type(module).__name__}): it "
                "removes output channels of Linear / Conv layers only; target those or exclude it"
            )
        pruner = graph.get_pruner_of_module(module)
        if module not in graph.module2node:
            raise ValueError(f"structural pruning target {name!r} is never used in forward(); exclude it")
        try:
            graph.get_pruning_group(module, pruner.prune_out_channels, [0])
        except Exception as err:
            raise ValueError(f"structural pruning cannot remove output channels of {name!r}: {err}") from err


def channel_prune(
    model: nn.Module,
    example_inputs: Any,
    targets: Iterable[nn.Module],
    ratio: float,
    global_pruning: bool = False,
    ignored: Iterable[nn.Module] = (),
    num_heads: Mapping[nn.Module, int] | None = None,
) -> list:
    """Remove ``ratio`` of the *current* output channels of ``targets`` (L2 magnitude ranking).

    Every other root layer (Conv / Linear) is left as is; its inputs still shrink when a layer
    feeding it loses channels. ``num_heads`` (``{query/key/value layer: heads}``) removes ``ratio``
    of those layers' attention heads whole instead of single channels (head size unchanged).
    Returns torch-pruning's pruning history (module, out?, indices).
    """
    import torch_pruning as tp

    if ratio <= 0:
        return []
    targets = list(targets)
    target_ids = {id(m) for m in targets}
    keep_out = [m for m in model.modules() if isinstance(m, ROOTS) and id(m) not in target_ids]
    with evaluating(model, no_grad=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Unwrapped parameters.*")  # norms' weights: pruned with them
        pruner = tp.pruner.BasePruner(
            model,
            example_inputs,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            global_pruning=global_pruning,
            ignored_layers=keep_out + list(ignored),
            output_transform=output_tensor,
            num_heads=dict(num_heads or {}),
            prune_num_heads=bool(num_heads),
            prune_head_dims=not num_heads,
            head_pruning_ratio=ratio if num_heads else 0.0,
        )
        pruner.step()
    return [list(h) for h in pruner.pruning_history()]


def structure_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Shapes of each module's own parameters and buffers, and its size attributes."""
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        params = {k: tuple(p.shape) for k, p in module.named_parameters(recurse=False)}
        buffers = {k: tuple(b.shape) for k, b in module.named_buffers(recurse=False) if b is not None}
        if not params and not buffers:
            continue
        attrs = {a: getattr(module, a) for a in SIZE_ATTRS if isinstance(getattr(module, a, None), (int, tuple))}
        out[name] = {"params": params, "buffers": buffers, "attrs": attrs}
    return out


@torch.no_grad()
def restructure(model: nn.Module, structure: Mapping[str, Mapping[str, Any]]) -> int:
    """Resize ``model``'s parameters and buffers in place to ``structure`` (values are left
    uninitialised: load a state dict next). Returns how many tensors changed shape."""
    changed = 0
    modules = dict(model.named_modules())
    for name, spec in structure.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"pruned checkpoint has module {name!r}, which this model does not have")
        for key, shape in spec["params"].items():
            old = getattr(module, key)
            if tuple(old.shape) != tuple(shape):
                setattr(module, key, nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad))
                changed += 1
        for key, shape in spec["buffers"].items():
            old = getattr(module, key)
            if old is not None and tuple(old.shape) != tuple(shape):
                setattr(module, key, old.new_empty(shape))
                changed += 1
        for key, value in spec["attrs"].items():
            setattr(module, key, value)
    sync_configs(model)  # head counts, intermediate_size: the config follows the shapes
    return changed


def count_weights(layers: Mapping[str, nn.Module]) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in layers.items()}


def load_pruned(
    model: nn.Module, checkpoint_path: str, strict: bool = True, state_key: str = "IterativeMagnitudePruning"
) -> nn.Module:
    """Load a checkpoint written while ``IterativeMagnitudePruning`` trained into a freshly built
    ``model``: structurally pruned layers are resized first, then the weights are loaded.

    ``state_key`` is the callback's key in the checkpoint (its class name).

    Usage (tested in tests/test_pruning*.py): ``load_pruned(MNIST1DCNN(channels=64), "epoch=9.ckpt")``
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    state = checkpoint.get("callbacks", {}).get(state_key) or {}
    if state.get("structure"):
        restructure(model, state["structure"])
    model.load_state_dict(checkpoint["state_dict"], strict=strict)
    return model
