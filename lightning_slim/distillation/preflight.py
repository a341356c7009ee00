"""What ``KnowledgeDistillation`` checks on the student and teacher before training: which module the
user's ``training_step`` really calls (found by running that step once on a sample batch, see
:mod:`lightning_slim.core.step_probe`), that the teacher accepts that call, the shapes of logits and
feature pairs (which size the projections)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_slim.batches import move_to
from lightning_slim.core.step_probe import preserved_random_state, probe_training_step
from lightning_slim.core.step_record import record_calls
from lightning_slim.distillation.functional import Projection
from lightning_slim.modules import device_of, evaluating, overrides_forward, submodule

STUDENT_HINT = (
    "set logits={'student_module': ...} to the module whose output is the logits, as your training_step "
    "calls it (e.g. 'model' for self.model(input_ids=...)), and input_fn=... if the teacher needs another input"
)


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


def callable_modules(pl_module: nn.Module) -> dict[str, nn.Module]:
    """Every module of the LightningModule that holds parameters, by path (lightning-slim's own
    training-only ``slim_*`` attributes left out): what ``training_step`` may call."""
    return {
        path: m
        for path, m in pl_module.named_modules()
        if not path.split(".")[0].startswith("slim_") and next(m.parameters(), None) is not None
    }


def probe_student(
    pl_module: nn.Module,
    batch: Any,
    named: str | None,
    features: Mapping[str, nn.Module],
    output_fn: Callable | None,
) -> tuple[str, list[dict]]:
    """Run the user's ``training_step`` on ``batch`` (:func:`~lightning_slim.core.step_probe.probe_training_step`)
    and return ``(path, records)``: the module whose output is the student's logits (``named``, or the
    one module the step calls itself) and what each of its calls recorded
    (:meth:`~lightning_slim.core.step_record.StepRecord.records`). Raises ``ValueError`` naming
    the fix when the step never calls ``named`` or calls several modules itself."""
    targets = {named: submodule(pl_module, named)} if named else callable_modules(pl_module)
    with record_calls(targets, features) as seen:
        probe_training_step(pl_module, batch)
    if named:
        if not seen.calls.calls:
            with record_calls(callable_modules(pl_module), {}) as called:
                probe_training_step(pl_module, batch)
            raise ValueError(
                f"KnowledgeDistillation: training_step never called {named!r} (it calls "
                f"{called.paths() or 'no module with parameters'} itself); {STUDENT_HINT}"
            )
        return named, seen.records(named, output_fn)
    paths = seen.paths()
    if len(paths) != 1:
        what = f"calls {len(paths)} modules itself {paths}" if paths else "calls no module with parameters"
        raise ValueError(f"KnowledgeDistillation: {type(pl_module).__name__}.training_step {what}; {STUDENT_HINT}")
    return paths[0], seen.records(paths[0], output_fn)


def example_records(
    pl_module: nn.Module, path: str, features: Mapping[str, nn.Module], output_fn: Callable | None
) -> list[dict]:
    """Without a sample batch: the records of ``path`` in one forward of the module on its
    ``example_input_array`` (to size feature projections), run as the step probe runs the step."""
    example = getattr(pl_module, "example_input_array", None)
    if example is None or not overrides_forward(pl_module):
        raise ValueError(
            "feature pairs need one forward pass before training to size the projections: set "
            "example_input_array on a module that defines forward, or fit with a map-style dataset"
        )
    if isinstance(example, Mapping):
        args, kwargs = (), dict(example)
    else:
        args, kwargs = (tuple(example) if isinstance(example, (tuple, list)) else (example,)), {}
    with preserved_random_state(), evaluating(pl_module):
        with record_calls({path: submodule(pl_module, path)}, features) as seen:
            pl_module(*move_to(args, device_of(pl_module)), **move_to(kwargs, device_of(pl_module)))
    records = seen.records(path, output_fn)
    if not records:
        raise ValueError(f"example_input_array through forward never called {path!r}; {STUDENT_HINT}")
    return records


def check_shapes(
    student: Mapping[str, torch.Tensor],
    teacher: Mapping[str, torch.Tensor],
    feature_pairs: Mapping[str, str],
    width_dim: int,
    pooling: str,
) -> dict[str, tuple[torch.Size, torch.Size]]:
    """Logits of equal shape (when both have them); each feature pair equal but for ``width_dim``
    (the last dimension of token features when pooled). Returns the pairs' shapes."""
    if "logits" in student and "logits" in teacher and student["logits"].shape != teacher["logits"].shape:
        raise ValueError(
            f"student output shape {tuple(student['logits'].shape)} differs from the teacher's "
            f"{tuple(teacher['logits'].shape)} on the same input; name the logits modules "
            "(logits={'student_module': ..., 'teacher_module': ...}) or pass output_fn / teacher_output_fn"
        )
    shapes = {}
    for s_name, t_name in feature_pairs.items():
        fs, ft = student[f"feat:{s_name}"], teacher[f"feat:{t_name}"]
        dim = width_dim % fs.dim()
        others = lambda x, dim=dim: [n for i, n in enumerate(x.shape) if i != dim]
        if fs.dim() != ft.dim() or others(fs) != others(ft):
            raise ValueError(
                f"feature pair {s_name!r} -> {t_name!r}: shapes {tuple(fs.shape)} and "
                f"{tuple(ft.shape)} may differ only in dimension dim={width_dim}"
            )
        if pooling != "none" and (fs.dim() != 3 or dim != 2):
            raise ValueError(
                f"feature pair {s_name!r} -> {t_name!r}: pooling={pooling!r} needs token features "
                f"(B, T, H) compared along their last dimension; got {tuple(fs.shape)} with dim={width_dim}"
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
