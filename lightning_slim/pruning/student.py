"""Cut a student out of a pretrained Llama-style transformer at a target fraction of its
non-embedding parameters, Minitron's way (Muralidharan et al. 2024; Sreenivas et al. 2024):
score MLP channels, attention heads and layers from activations on calibration data
(:mod:`~lightning_slim.pruning.activations`), enumerate student shapes (depth x heads x MLP width)
that each hold the asked number of parameters, cut each from a copy of the teacher and keep the
one with the lowest loss on the caller's validation data. Then train it (with
:class:`~lightning_slim.KnowledgeDistillation` from the teacher: ``benchmarks/real/smol_student.py``).

It is a one-shot step before training, not a callback option: ``IterativeMagnitudePruning``
prunes a model gradually inside a fit; a student is a new, smaller model made once from the
teacher, which the Trainer then fits.

>>> import torch, transformers
>>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
...                                num_attention_heads=4, num_key_value_heads=2)
>>> teacher = transformers.LlamaForCausalLM(cfg).eval()
>>> ids = torch.randint(0, 32, (2, 12))
>>> scores = activation_importance(teacher, [{"input_ids": ids}])
>>> loss = lambda m: float(m(input_ids=ids, labels=ids).loss)
>>> student, report = cut_student(teacher, scores, 0.5, loss, depths=[4, 3], heads=[(2, 2), (1, 2)])
>>> abs(report["params_ratio"] - 0.5) < 0.05, len(report["candidates"]) > 1
(True, True)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from lightning_slim.modules import evaluating
from lightning_slim.pruning.activations import Importance, activation_importance
from lightning_slim.pruning.depth import choose_layers_by_angle, keep_layers, layer_stack
from lightning_slim.pruning.width import head_counts, keep_heads, keep_mlp_channels, require_llama_style

__all__ = ["StudentShape", "activation_importance", "cut", "cut_student", "nonembedding_parameters", "shapes_at"]


@dataclass(frozen=True)
class StudentShape:
    """The architecture of a student: layers kept, key/value groups, query heads per group and
    MLP intermediate size (the same in every layer)."""

    layers: int
    kv_heads: int
    queries_per_kv: int
    intermediate_size: int


def nonembedding_parameters(model: nn.Module) -> int:
    """Parameters outside the token embeddings and the output head (each tied tensor counted
    once): what a student's size is measured in (Minitron, Kaplan et al. 2020)."""
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = _output_head(model)
    if head is not None:
        embedded |= {id(p) for p in head.parameters()}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        if id(p) not in embedded and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _output_head(model: nn.Module) -> nn.Module | None:
    from transformers import PreTrainedModel

    return model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None


@dataclass(frozen=True)
class _Costs:
    """Parameters of one layer as a function of its shape: ``fixed`` + ``per_query`` x query
    heads + ``per_kv`` x key/value heads + ``per_channel`` x MLP channels; ``outside``: the
    non-embedding parameters not in any layer (final norm)."""

    fixed: int
    per_query: int
    per_kv: int
    per_channel: int
    outside: int
    shape: StudentShape

    def params(self, shape: StudentShape) -> int:
        heads = shape.kv_heads * shape.queries_per_kv
        per_layer = self.fixed + heads * self.per_query + shape.kv_heads * self.per_kv
        return self.outside + shape.layers * (per_layer + shape.intermediate_size * self.per_channel)


def _numel(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _costs(model: nn.Module) -> _Costs:
    attns, found_mlps = require_llama_style(model)
    _, layers = layer_stack(model)
    counts = {head_counts(a) for a in attns.values()}
    widths = {m.up_proj.out_features for m in found_mlps.values()}
    layer_sizes = {_numel(layer) for layer in layers}
    if len(counts) != 1 or len(widths) != 1 or len(layer_sizes) != 1 or len(attns) != len(layers):
        raise ValueError(
            "cut_student needs every layer alike (one attention and one gated MLP each, the same head "
            f"counts and MLP width): found head counts {sorted(counts)}, widths {sorted(widths)}"
        )
    heads, kv, _ = counts.pop()
    width = widths.pop()
    attn, mlp = next(iter(attns.values())), next(iter(found_mlps.values()))
    per_query = (_numel(attn.q_proj) + attn.o_proj.weight.numel()) // heads  # q rows (+ bias) and o columns
    per_kv = (_numel(attn.k_proj) + _numel(attn.v_proj)) // kv
    per_channel = (_numel(mlp.gate_proj, mlp.up_proj) + mlp.down_proj.weight.numel()) // width
    prunable = heads * per_query + kv * per_kv + width * per_channel
    fixed = layer_sizes.pop() - prunable
    outside = nonembedding_parameters(model) - len(layers) * (fixed + prunable)
    return _Costs(fixed, per_query, per_kv, per_channel, outside, StudentShape(len(layers), kv, heads // kv, width))


def shapes_at(
    model: nn.Module,
    ratio: float,
    depths: Sequence[int] | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    multiple: int = 32,
) -> list[tuple[StudentShape, float]]:
    """Every student shape of ``depths`` layers (default: the model's depth down to half of it,
    in steps of a tenth) and ``heads`` ``(kv_heads, queries_per_kv)`` (default: every pair) whose
    MLP width, a multiple of ``multiple``, brings it nearest to ``ratio`` of the model's
    non-embedding parameters; shapes that need a wider MLP than the model's, or none, are left
    out. Returns ``[(shape, its parameter ratio)]``."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio={ratio!r} must be in (0, 1): the student's share of non-embedding parameters")
    costs = _costs(model)
    full, total = costs.shape, nonembedding_parameters(model)
    if depths is None:
        depths = sorted({max(1, round(full.layers * (1 - k / 10))) for k in range(6)}, reverse=True)
    if heads is None:
        heads = [(g, q) for g in range(full.kv_heads, 0, -1) for q in range(full.queries_per_kv, 0, -1)]
    found = []
    for layers in depths:
        if not 0 < layers <= full.layers:
            raise ValueError(f"depth {layers} must be in 1..{full.layers} (the model's layers)")
        for kv, per_kv in heads:
            if not (0 < kv <= full.kv_heads and 0 < per_kv <= full.queries_per_kv):
                raise ValueError(
                    f"heads ({kv}, {per_kv}) must be (kv_heads in 1..{full.kv_heads}, queries_per_kv in "
                    f"1..{full.queries_per_kv})"
                )
            base = StudentShape(layers, kv, per_kv, 0)
            room = ratio * total - costs.params(base)
            width = multiple * round(room / (layers * costs.per_channel * multiple))
            if 0 < width <= full.intermediate_size:
                shape = StudentShape(layers, kv, per_kv, width)
                found.append((shape, costs.params(shape) / total))
    return found


def cut(model: nn.Module, shape: StudentShape, importance: Importance, kept_layers: Sequence[int]) -> dict[str, Any]:
    """Cut ``model`` to ``shape`` in place: heads and MLP channels by ``importance`` (measured on
    this model, so its paths match), then the layers ``kept_layers``. Returns the config changes."""
    if len(kept_layers) != shape.layers:
        raise ValueError(f"kept_layers has {len(kept_layers)} layers; the shape asks for {shape.layers}")
    full = _costs(model).shape
    changes: dict[str, Any] = {}
    if (shape.kv_heads, shape.queries_per_kv) != (full.kv_heads, full.queries_per_kv):
        changes.update(keep_heads(model, shape.kv_heads, shape.queries_per_kv, importance.heads))
    if shape.intermediate_size != full.intermediate_size:
        changes.update(keep_mlp_channels(model, shape.intermediate_size, importance.mlp))
    if shape.layers != full.layers:  # last: the importance is keyed by the layers' original paths
        changes.update(keep_layers(model, kept_layers))
    return changes


def cut_student(
    teacher: nn.Module,
    importance: Importance,
    ratio: float,
    loss: Callable[[nn.Module], float],
    depths: Sequence[int] | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    multiple: int = 32,
) -> tuple[nn.Module, dict[str, Any]]:
    """The student with ``ratio`` of ``teacher``'s non-embedding parameters whose ``loss`` (the
    caller's validation loss, called in eval mode without gradients) is lowest right after the cut,
    among :func:`shapes_at`'s shapes.
    Layers to drop are chosen by angular distance (:func:`choose_layers_by_angle`: it needs
    ``importance.similarity``, so activation scores); heads and channels by ``importance``.
    The teacher is left unchanged (each candidate is cut from a copy). Returns ``(student,
    report)`` with every candidate's shape, parameter ratio and loss."""
    n = len(layer_stack(teacher)[1])
    shapes = shapes_at(teacher, ratio, depths, heads, multiple)
    if not shapes:
        raise ValueError(f"no student shape holds {ratio:g} of the non-embedding parameters with these depths/heads")
    if importance.similarity is None and any(shape.layers < n for shape, _ in shapes):
        raise ValueError(
            "cut_student chooses the layers to drop from importance.similarity, which weight_importance "
            f"does not measure: pass activation_importance(...) or depths=[{n}]"
        )
    total = nonembedding_parameters(teacher)
    best: tuple[float, nn.Module, dict] | None = None
    candidates = []
    for shape, _ in shapes:
        kept = list(range(n)) if shape.layers == n else choose_layers_by_angle(importance.similarity, shape.layers)[0]
        student = copy.deepcopy(teacher)
        cut(student, shape, importance, kept)
        with evaluating(student):
            value = float(loss(student))
        row = {
            **asdict(shape),
            "kept_layers": kept,
            "params_ratio": nonembedding_parameters(student) / total,
            "loss": value,
        }
        candidates.append(row)
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, student, row)
        del student
    if best is None:
        raise ValueError(f"every candidate student's loss was not finite: {candidates}")
    return best[1], {**best[2], "candidates": candidates}
