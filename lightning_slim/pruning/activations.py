"""How much each part of a pretrained transformer matters, measured from its activations on a few
thousand calibration tokens (Minitron: Muralidharan et al. 2024; Sreenivas et al. 2024):

- an MLP channel: the root mean square of its activation (``act(gate) * up``, what ``down_proj``
  reads) over every calibration token. Pretrained LLMs have a few channels whose activations are
  orders of magnitude larger than the rest while their weights look ordinary; weight magnitude does
  not see them, and removing them ruins the model;
- an attention head: the root mean square of the L2 norm of its output (the head's slice of what
  ``o_proj`` reads), one score per query head; :func:`~lightning_slim.pruning.width.keep_heads`
  sums them per key/value group;
- a layer: how much it turns the residual stream, ``similarity[i, j]``, the mean cosine between the
  hidden states before layer ``i`` and before layer ``j`` (``j = L``: after the last layer), per
  token. Dropping layers ``a..a+n-1`` costs about the angle between states ``a`` and ``a+n``
  (Gromov et al. 2024); ``similarity[i, i + 1]`` is ShortGPT's block influence.

:func:`weight_importance` gives the same scores from weight magnitude alone (the L2 norm of each
channel's / head's weights), the baseline the activation scores are compared with.

Both reuse :class:`lightning_slim.pruning.norms.InputNorms` (the per-channel statistics Wanda uses) and
the forward-capture helpers of :mod:`lightning_slim.modules`; plain PyTorch, no Trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_slim.modules import capture_calls, capture_outputs, evaluating, output_tensor
from lightning_slim.pruning.depth import layer_stack
from lightning_slim.pruning.norms import InputNorms
from lightning_slim.pruning.width import head_counts, require_llama_style


@dataclass
class Importance:
    """Scores of a transformer's parts, keyed by module path in the model they were measured on.

    ``mlp``: ``{MLP path: (intermediate_size,)}``; ``heads``: ``{attention path: (query heads,)}``;
    ``similarity``: ``(L + 1, L + 1)`` mean cosine between residual-stream states (None for weight
    magnitude); ``tokens``: calibration tokens seen."""

    mlp: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    similarity: torch.Tensor | None = None
    tokens: int = 0


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k not in ("labels", "index")}, use_cache=False)
    return model(batch, use_cache=False)


def _stream_state(args: tuple, kwargs: dict) -> torch.Tensor:
    state = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(state, torch.Tensor):
        raise ValueError("the first transformer layer was called without a hidden-states tensor")
    return state


def _token_mask(batch: Any, shape: torch.Size) -> torch.Tensor:
    """Which positions are real tokens: the batch's ``attention_mask`` where it has one."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is None:
        return torch.ones(shape[:2], dtype=torch.bool)
    return mask.bool().cpu()


@torch.no_grad()
def activation_importance(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> Importance:
    """Run ``model`` (eval mode, no gradients) over ``batches`` and score its MLP channels,
    attention heads and layers from the activations (module docstring). ``forward(model, batch)``
    defaults to ``model(**batch)`` without ``labels`` / ``index`` for dicts (Hugging Face batches),
    ``model(batch)`` for tensors. Padding is left out where batches carry an ``attention_mask``
    (layer similarity only: MLP and head statistics assume unpadded calibration windows, as
    :func:`lightning_slim.demos.text.lm_windows` makes)."""
    forward = forward or _default_forward
    attns, found_mlps = require_llama_style(model)
    _, layers = layer_stack(model)
    norms = InputNorms()
    inputs = {f"{p}.o_proj": a.o_proj for p, a in attns.items()} | {
        f"{p}.down_proj": m.down_proj for p, m in found_mlps.items()
    }
    names = {str(i): layer for i, layer in enumerate(layers)}
    total = torch.zeros(len(layers) + 1, len(layers) + 1, dtype=torch.float64)
    tokens = 0
    with evaluating(model), norms.recording(inputs), capture_calls({"0": layers[0]}) as calls:
        with capture_outputs(names, output_fn=output_tensor) as outputs:
            for batch in batches:
                forward(model, batch)
                states = [_stream_state(*calls["0"])] + [outputs[str(i)] for i in range(len(layers))]
                mask = _token_mask(batch, states[0].shape)
                unit = torch.stack([s.detach().float().cpu()[mask] for s in states])  # (L + 1, tokens, hidden)
                unit = nn.functional.normalize(unit, dim=-1)
                total += torch.einsum("itd,jtd->ij", unit, unit).double()
                tokens += int(mask.sum())
    if tokens == 0:
        raise ValueError("activation_importance saw no calibration tokens: pass at least one batch")
    heads = {}
    for path, attn in attns.items():
        h, _, d = head_counts(attn)
        mean_square = norms.rms(f"{path}.o_proj")[0].pow(2)  # per channel of the concatenated head outputs
        heads[path] = mean_square.reshape(h, d).sum(1).sqrt()  # sqrt(E ||head output||^2)
    mlp = {path: norms.rms(f"{path}.down_proj")[0] for path in found_mlps}
    return Importance(mlp=mlp, heads=heads, similarity=(total / tokens).float(), tokens=tokens)


@torch.no_grad()
def weight_importance(model: nn.Module) -> Importance:
    """The weight-magnitude scores (no data): an MLP channel's L2 norm over its ``gate_proj`` and
    ``up_proj`` rows and ``down_proj`` column; a query head's over its ``q_proj`` rows and
    ``o_proj`` columns."""
    attns, found_mlps = require_llama_style(model)
    mlp = {
        p: (m.gate_proj.weight.pow(2).sum(1) + m.up_proj.weight.pow(2).sum(1) + m.down_proj.weight.pow(2).sum(0)).sqrt()
        for p, m in found_mlps.items()
    }
    heads = {}
    for p, a in attns.items():
        h, _, d = head_counts(a)
        q = a.q_proj.weight.pow(2).sum(1).reshape(h, d).sum(1)
        o = a.o_proj.weight.pow(2).sum(0).reshape(h, d).sum(1)
        heads[p] = (q + o).sqrt()
    return Importance(
        mlp={k: v.float().cpu() for k, v in mlp.items()}, heads={k: v.float().cpu() for k, v in heads.items()}
    )
