"""What ``KnowledgeDistillation`` checks on the student and teacher before training, the feature
projections it sizes from one forward pass, and which token positions a KD term counts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_slim.batches import batch_inputs, move_to
from lightning_slim.distillation.configs import TokenMask
from lightning_slim.distillation.functional import Projection
from lightning_slim.modules import call_arguments, evaluating, overrides_forward, submodule
from lightning_slim.tokens import find_attention_mask, find_labels, resolve_shift, token_targets


def check_models(
    pl_module: nn.Module,
    teacher: nn.Module,
    feature_pairs: Mapping[str, str],
    student_logits_module: str | None,
    teacher_logits_module: str | None,
) -> None:
    if not getattr(pl_module, "automatic_optimization", True):
        raise RuntimeError(
            f"KnowledgeDistillation adds its term to the loss that {type(pl_module).__name__}.training_step "
            "returns (and scales that loss by 1 - alpha), which needs automatic optimization; this module sets "
            "automatic_optimization=False. With manual optimization, compute the term in your own step: "
            "lightning_slim.distillation.functional.soft_target_loss(student_logits, teacher_logits, T), "
            "with the teacher's forward under torch.no_grad()."
        )
    student_params = {id(p) for p in pl_module.parameters()}
    if teacher is pl_module or any(id(p) in student_params for p in teacher.parameters()):
        raise ValueError(
            "the teacher is (part of) the student module: it would be trained by the student's "
            "optimizer and saved in its checkpoint; give it only to KnowledgeDistillation"
        )
    for s_name, t_name in feature_pairs.items():
        submodule(pl_module, s_name, f"the student ({type(pl_module).__name__})")
        submodule(teacher, t_name, f"the teacher ({type(teacher).__name__})")
    if student_logits_module:
        submodule(pl_module, student_logits_module, f"the student ({type(pl_module).__name__})")
    if teacher_logits_module:
        submodule(teacher, teacher_logits_module, f"the teacher ({type(teacher).__name__})")


def check_shapes(
    student: Mapping[str, torch.Tensor],
    teacher: Mapping[str, torch.Tensor],
    feature_pairs: Mapping[str, str],
    feature_dim: int,
) -> dict[str, tuple[torch.Size, torch.Size]]:
    """Logits of equal shape; each feature pair equal but for ``feature_dim``. Returns the pairs' shapes."""
    s, t = student["logits"], teacher["logits"]
    if s.shape != t.shape:
        raise ValueError(
            f"student output shape {tuple(s.shape)} differs from the teacher's {tuple(t.shape)} on "
            "the same input; name the logits modules (logits={'student_module': ..., "
            "'teacher_module': ...}) or pass output_fn / teacher_output_fn"
        )
    shapes = {}
    for s_name, t_name in feature_pairs.items():
        fs, ft = student[f"feat:{s_name}"], teacher[f"feat:{t_name}"]
        dim = feature_dim % fs.dim()
        others = lambda x, dim=dim: [n for i, n in enumerate(x.shape) if i != dim]
        if fs.dim() != ft.dim() or others(fs) != others(ft):
            raise ValueError(
                f"feature pair {s_name!r} -> {t_name!r}: shapes {tuple(fs.shape)} and "
                f"{tuple(ft.shape)} may differ only in dimension dim={feature_dim}"
            )
        shapes[s_name] = (fs.shape, ft.shape)
    return shapes


def build_projections(
    shapes: Mapping[str, tuple[torch.Size, torch.Size]], feature_dim: int, seed: int
) -> nn.ModuleDict:
    """One projection per pair, in pair order (an identity where the widths already match)."""
    g = torch.Generator().manual_seed(seed)
    proj = nn.ModuleDict()
    for i, (fs, ft) in enumerate(shapes.values()):
        dim = feature_dim % len(fs)
        proj[str(i)] = Projection(fs[dim], ft[dim], dim, g) if fs[dim] != ft[dim] else nn.Identity()
    return proj


def same_structure(a: nn.Module | None, b: nn.Module) -> bool:
    signature = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()] + [type(v) for v in m.children()]
    return isinstance(a, nn.ModuleDict) and signature(a) == signature(b)


def as_call(example: Any) -> tuple[tuple, dict]:
    """Lightning's ``example_input_array`` as ``(args, kwargs)``: a tuple is positional, a dict keyword."""
    if isinstance(example, Mapping):
        return (), dict(example)
    return (tuple(example) if isinstance(example, (tuple, list)) else (example,)), {}


def sample_student_call(
    pl_module: nn.Module, target: nn.Module, batch: Any, input_fn: Callable | None, capture: Callable
) -> dict[str, Any] | str:
    """One eval-mode forward of the student before training, as ``training_step`` would run it
    (``self(x)`` with ``example_input_array`` or the sample batch's inputs; or, for a module
    without ``forward``, its ``target`` with the batch entries its ``forward`` names). Returns what
    ``capture`` recorded (logits, features, ``call``), or why it could not run. Batch-norm
    statistics are not touched."""
    example = getattr(pl_module, "example_input_array", None)
    if overrides_forward(pl_module) or target is pl_module:
        if example is None and batch is None:
            return "no example_input_array and no map-style training dataset to take a sample batch from"
        call, run = (as_call(example) if example is not None else (((input_fn or batch_inputs)(batch),), {})), pl_module
    elif batch is None:
        return "no map-style training dataset to take a sample batch from"
    else:
        call, run = call_arguments(target, batch, input_fn=input_fn), target
    device = next(pl_module.parameters()).device
    try:
        with evaluating(pl_module), capture() as (out, calls):
            run(*move_to(call[0], device), **move_to(call[1], device))
            recorded = {**out, **calls, "fed": call}
    except Exception as err:
        return f"{type(err).__name__}: {err}"[:300]
    if "logits" not in recorded or "call" not in recorded:
        return f"the forward did not call {type(target).__name__}"
    return recorded


def kd_mask(
    logits: torch.Tensor, batch: Any, kwargs: Mapping[str, Any] | None, model: nn.Module, tokens: TokenMask
) -> torch.Tensor | None:
    """The ``(B, T)`` positions of token logits a KD term counts (None: every position)."""
    if logits.dim() != 3:
        return None
    shape = tuple(logits.shape[:2])
    labels, hugging_face = find_labels(batch, kwargs, shape)
    attention = find_attention_mask(batch, kwargs, shape) if tokens.padding else None
    attention = None if attention is None else attention.to(logits.device)
    if labels is None:
        return None if attention is None else attention.bool()
    shift = resolve_shift(tokens.shift, hugging_face, model)
    return token_targets(labels.to(logits.device), attention, shift, tokens.ignore_index)[1]
