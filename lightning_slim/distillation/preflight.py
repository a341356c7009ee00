"""What ``KnowledgeDistillation`` checks on the student and teacher before training, and the
feature projections it sizes from one forward pass."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from lightning_slim.distillation.functional import Projection
from lightning_slim.modules import submodule


def check_models(pl_module: nn.Module, teacher: nn.Module, feature_pairs: Mapping[str, str],
                 student_logits_module: str | None, teacher_logits_module: str | None) -> None:
    if not getattr(pl_module, "automatic_optimization", True):
        raise RuntimeError(
            f"KnowledgeDistillation adds its term to the loss that {type(pl_module).__name__}.training_step "
            "returns (and scales that loss by 1 - alpha), which needs automatic optimization; this module sets "
            "automatic_optimization=False. With manual optimization, compute the term in your own step: "
            "lightning_slim.distillation.functional.soft_target_loss(student_logits, teacher_logits, T), "
            "with the teacher's forward under torch.no_grad().")
    student_params = {id(p) for p in pl_module.parameters()}
    if teacher is pl_module or any(id(p) in student_params for p in teacher.parameters()):
        raise ValueError("the teacher is (part of) the student module: it would be trained by the student's "
                         "optimizer and saved in its checkpoint; give it only to KnowledgeDistillation")
    for s_name, t_name in feature_pairs.items():
        submodule(pl_module, s_name, f"the student ({type(pl_module).__name__})")
        submodule(teacher, t_name, f"the teacher ({type(teacher).__name__})")
    if student_logits_module:
        submodule(pl_module, student_logits_module, f"the student ({type(pl_module).__name__})")
    if teacher_logits_module:
        submodule(teacher, teacher_logits_module, f"the teacher ({type(teacher).__name__})")


def check_shapes(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                 feature_pairs: Mapping[str, str], feature_dim: int) -> dict[str, tuple[torch.Size, torch.Size]]:
    """Logits of equal shape; each feature pair equal but for ``feature_dim``. Returns the pairs' shapes."""
    s, t = student["logits"], teacher["logits"]
    if s.shape != t.shape:
        raise ValueError(f"student output shape {tuple(s.shape)} differs from the teacher's {tuple(t.shape)} on "
                         "the same input; name the logits modules (student_logits_module / "
                         "teacher_logits_module) or pass output_fn / teacher_output_fn")
    shapes = {}
    for s_name, t_name in feature_pairs.items():
        fs, ft = student[f"feat:{s_name}"], teacher[f"feat:{t_name}"]
        dim = feature_dim % fs.dim()
        others = lambda x: [n for i, n in enumerate(x.shape) if i != dim]
        if fs.dim() != ft.dim() or others(fs) != others(ft):
            raise ValueError(f"feature pair {s_name!r} -> {t_name!r}: shapes {tuple(fs.shape)} and "
                             f"{tuple(ft.shape)} may differ only in dimension dim={feature_dim}")
        shapes[s_name] = (fs.shape, ft.shape)
    return shapes


def build_projections(shapes: Mapping[str, tuple[torch.Size, torch.Size]], feature_dim: int,
                      seed: int) -> nn.ModuleDict:
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
