"""What YAML can name: objects by dotted path, and models built from a class path plus a checkpoint.

One loader for every technique (a teacher, a selection reference, a score function...).

>>> import_object("torch.nn.Linear").__name__
'Linear'
>>> import_object("torch.nn.NoSuchThing", what="teacher_class")
Traceback (most recent call last):
...
ValueError: teacher_class='torch.nn.NoSuchThing' cannot be imported: module 'torch.nn' has no attribute 'NoSuchThing'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


def import_object(path: str, what: str = "path") -> Any:
    """``"package.module.name"`` -> the object, with an error naming the argument and the cause."""
    module_name, _, attr = path.rpartition(".") if isinstance(path, str) else ("", "", "")
    if not module_name:
        raise ValueError(f"{what}={path!r} must be a dotted path like 'package.module.name'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what}={path!r} cannot be imported: {err}") from None


def find_class(spec: str) -> type | None:
    """``"Linear"`` (a ``torch.nn`` name), ``"torch.nn.Linear"`` or ``"my.pkg.Block"`` -> the class,
    None if ``spec`` names no class (a module path such as ``"net.0"`` names none)."""
    if "." not in spec:
        cls = getattr(nn, spec, None)
    else:
        try:
            cls = import_object(spec)
        except (ValueError, TypeError):
            return None
    return cls if isinstance(cls, type) else None


def as_callable(value: str | Callable | None, what: str) -> Callable | None:
    """A callable, a dotted path to one, or None."""
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        obj = import_object(value, what)
        if not callable(obj):
            raise ValueError(f"{what}={value!r} names a {type(obj).__name__}, which is not callable")
        return obj
    raise TypeError(f"{what} must be a callable or a dotted path to one; got {type(value).__name__}")


def read_state_dict(checkpoint: str | Path) -> Mapping[str, torch.Tensor]:
    """The weights in a Lightning checkpoint (its ``"state_dict"``) or a bare state dict file."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, Mapping) else state


def build_module(
    class_path: str,
    init_args: Mapping[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    what: str = "class_path",
) -> nn.Module:
    """A model from its class path: a LightningModule with a checkpoint through ``load_from_checkpoint``
    (its saved hyper-parameters, ``init_args`` overriding), any other ``nn.Module`` built from
    ``init_args`` and given the checkpoint's weights. Building does not move the global RNG."""
    cls = import_object(class_path, what)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{what}={class_path!r} is not an nn.Module subclass")
    init_args = dict(init_args or {})
    if checkpoint is not None and hasattr(cls, "load_from_checkpoint"):
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
        return cls.load_from_checkpoint(checkpoint, map_location="cpu", **init_args)
    with torch.random.fork_rng(devices=[]):
        model = cls(**init_args)
    if checkpoint is not None:
        model.load_state_dict(read_state_dict(checkpoint))
    return model


def freeze(model: nn.Module) -> nn.Module:
    """A model that only ever scores or teaches: eval mode, no gradients."""
    model.requires_grad_(False)
    return model.eval()
