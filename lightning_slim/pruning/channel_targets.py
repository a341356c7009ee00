"""What structural pruning removes channels from, resolved from ``IterativeMagnitudePruning``'s
arguments (plain PyTorch, no Trainer): a transformer's MLP up-projections and attention projections
(its blocks sliced directly, :mod:`.slicing`), or, in any other model, every target Linear / Conv but
the classifier (traced with torch-pruning, :mod:`.structured`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_slim.pruning import slicing, structured
from lightning_slim.pruning.functional import classifier_name, select_layers
from lightning_slim.pruning.heads import choose, sync_configs, transformer_plan


@dataclass
class ChannelTargets:
    """``layers``: ``{path: layer}`` whose output channels go (the sparsity is over them); ``sliced``:
    a transformer, whose blocks are sliced; ``scope``: ``"layer"`` for transformers (their configs hold
    one width), else the user's."""

    layers: dict[str, nn.Module]
    sliced: bool
    scope: str


def classifier_paths(model: nn.Module, counted: Iterable[str], classifier: str | None) -> list[str]:
    """``[the classifier's path]`` if it is among ``counted`` (default: the last Linear / Conv), else ``[]``."""
    name = classifier or classifier_name(select_layers(model))
    if name not in dict(model.named_modules()):
        raise ValueError(f"classifier={name!r} is not a module of {type(model).__name__}")
    return [name] if name in counted else []


def resolve(
    model: nn.Module,
    targets: list[str] | None,
    exclude: list[str],
    classifier: str | None,
    heads: bool,
    scope: str | None,
) -> ChannelTargets:
    """The layers that lose output channels: in a transformer its MLP up-projections (and attention
    projections with ``heads``), or the user's ``targets`` among them (refused blocks and residual-stream
    targets are errors, :func:`heads.choose`); in any other model every target Linear / Conv but the
    classifier."""
    roots, _, refused = transformer_plan(model, heads)
    if not (roots or refused):  # a CNN / MLP: every target but the classifier (its class outputs must stay)
        counted = select_layers(model, targets)
        kept = classifier_paths(model, counted, classifier)
        if set(counted) <= set(kept):
            raise ValueError(
                f"structural pruning keeps the classifier's outputs ({kept}), and "
                f"{type(model).__name__} has no other Linear/Conv target; use pattern='unstructured'"
            )
        return ChannelTargets(select_layers(model, targets, [*exclude, *kept]), False, scope or "global")
    if scope == "global":
        raise ValueError(
            "scope='global' would give transformer layers different head counts and MLP widths, "
            "which a model config cannot hold; use scope='layer' (the default for transformers)"
        )
    selected = targets and select_layers(model, targets, exclude)
    chosen = choose(dict(model.named_modules()), roots, refused, selected, exclude)
    return ChannelTargets(chosen, True, "layer")


def call(
    model: nn.Module, plan: ChannelTargets, example_input_array: Any, example_input_shape: Any, example_input_dtype: str
) -> tuple[nn.Module, Any, list[str], dict[str, Any]]:
    """``(root, example inputs, roots, how)`` for :func:`structured.remove_channels`: the module it acts
    on (a Hugging Face model inside a module without ``example_input_array``) and paths relative to it."""
    root, example = structured.trace_inputs(model, example_input_array, example_input_shape, example_input_dtype)
    prefix = next(f"{n}." if n else "" for n, m in model.named_modules() if m is root)
    outside = [n for n in plan.layers if not n.startswith(prefix)]
    if outside:
        raise ValueError(f"structural pruning targets {outside} are outside the traced model {prefix[:-1]!r}")
    how = dict(slice_blocks=plan.sliced, global_pruning=plan.scope == "global")
    return root, example, [n[len(prefix) :] for n in plan.layers], how


def check(model: nn.Module, plan: ChannelTargets, call: tuple, ratio: float, fresh: bool) -> bool:
    """Raise ``ValueError`` before training for what structural pruning cannot do; on a ``fresh`` fit,
    prune a copy to the final ``ratio`` and run it (:func:`structured.dry_run`). Returns whether the
    pruned model's config can rebuild it (False: it reloads with ``load_pruned`` only)."""
    root, example, roots, how = call
    if plan.sliced:
        slicing.check(model, slicing.cuts(model, plan.layers))
    else:
        structured.check_prunable(root, example, plan.layers)
    return not fresh or structured.dry_run(root, example, roots, ratio, **how).get("reloadable", True)


def prune(model: nn.Module, call: tuple, ratio: float) -> dict[str, Any]:
    """Remove ``ratio`` of the current channels (``call`` from :func:`call`); returns the config changes."""
    root, example, roots, how = call
    structured.remove_channels(root, example, roots, ratio, **how)
    return sync_configs(model)
