"""Constructor arguments checked up front, and the teacher built from them: an object, or a
checkpoint plus a class path (what LightningCLI / YAML can express)."""
from __future__ import annotations

import importlib
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_slim.distillation.functional import FEATURE_LOSSES

CONVENTIONS = ("weighted", "additive")


def _check_range(name: str, value: float | None, low: float, high: float | None = None, open_low=False) -> None:
    if value is None:
        return
    if (value <= low if open_low else value < low) or (high is not None and value > high):
        allowed = f"{'(' if open_low else '['}{low}, " + (f"{high}]" if high is not None else "inf)")
        raise ValueError(f"{name}={value!r} is outside the allowed range {allowed}")


def check_arguments(*, alpha, alpha_final, temperature, temperature_final, feature_weight, start_step, stop_step,
                    anneal_steps, convention, feature_loss, feature_pairs) -> None:
    """Raise a ValueError naming the first bad argument and what is allowed."""
    _check_range("alpha", alpha, 0.0, 1.0)
    _check_range("alpha_final", alpha_final, 0.0, 1.0)
    _check_range("temperature", temperature, 0.0, open_low=True)
    _check_range("temperature_final", temperature_final, 0.0, open_low=True)
    _check_range("feature_weight", feature_weight, 0.0)
    _check_range("start_step", start_step, 0)
    _check_range("anneal_steps", anneal_steps, 0, open_low=True)
    if stop_step is not None and stop_step <= start_step:
        raise ValueError(f"stop_step={stop_step!r} must be greater than start_step={start_step!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not one of {CONVENTIONS}")
    if feature_loss not in FEATURE_LOSSES:
        raise ValueError(f"feature_loss={feature_loss!r} is not one of {FEATURE_LOSSES}")
    if not isinstance(feature_pairs or {}, Mapping):
        raise ValueError(f"feature_pairs={feature_pairs!r} must be a dict {{student module: teacher module}}")
    if alpha == 0 and not alpha_final and not feature_pairs:
        raise ValueError("alpha=0 with no feature_pairs distils nothing; set alpha in (0, 1] or feature_pairs")


def import_class(path: str) -> type:
    """``"package.module.Class"`` -> the class, with an error naming what failed."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"teacher_class={path!r} must be a full class path like 'package.module.Class'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"teacher_class={path!r} cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"teacher_class={path!r} is not an nn.Module subclass")
    return cls


def _state_dict(checkpoint: str) -> Mapping[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)  # a Lightning checkpoint or a bare state_dict


def resolve_teacher(teacher: nn.Module | None, checkpoint: str | None, class_path: str | None,
                    init_args: Mapping[str, Any] | None = None) -> nn.Module:
    """The frozen (no grad, eval mode) teacher. A LightningModule ``class_path`` loads through
    ``load_from_checkpoint``; a plain ``nn.Module`` class is built from ``init_args``; a given
    ``teacher`` object gets the checkpoint's weights when one is named."""
    if teacher is not None and class_path is not None:
        raise ValueError("pass either teacher (a module) or teacher_class (a class path), not both")
    if teacher is None:
        if class_path is None or checkpoint is None:
            raise ValueError("no teacher: pass teacher=<nn.Module>, or teacher_checkpoint=<path> with "
                             "teacher_class=<'package.module.Class'>")
        cls = import_class(class_path)
        if issubclass(cls, pl.LightningModule):
            teacher = cls.load_from_checkpoint(checkpoint, map_location="cpu", **dict(init_args or {}))
        else:
            teacher = cls(**dict(init_args or {}))
            teacher.load_state_dict(_state_dict(checkpoint))
    elif not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    elif checkpoint is not None:
        teacher.load_state_dict(_state_dict(checkpoint))
    teacher.requires_grad_(False)
    return teacher.eval()
