"""The frozen teacher: an object, or a checkpoint plus a class path (what LightningCLI / YAML can
express), built through the package's one loader (:mod:`lightning_slim.loading`)."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from lightning_slim.loading import build_module, freeze, read_state_dict


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
        teacher = build_module(class_path, init_args, checkpoint, what="teacher_class")
    elif not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    elif checkpoint is not None:
        teacher.load_state_dict(read_state_dict(checkpoint))
    return freeze(teacher)
