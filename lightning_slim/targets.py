"""Which modules a callback acts on: the one grammar every technique's ``targets`` / ``exclude``
use (YAML-expressible, as in torchao's ``filter_fn`` by name).

An entry is ``"re:<regex>"`` (full match on the module path), an exact module path
(``"net.0"``), or a class: a ``torch.nn`` name (``"Linear"``) or a dotted path
(``"my.pkg.Block"``), matched with ``isinstance``.

>>> from torch import nn
>>> m = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Linear(2, 2))
>>> [n for n, mod in m.named_modules() if n and matches("re:[02]", n, mod)], matches("Linear", "2", m[2])
(['0', '2'], True)
"""
from __future__ import annotations

import importlib
import re

from torch import nn


def resolve_class(spec: str) -> type | None:
    """``"Linear"``, ``"torch.nn.Linear"`` or ``"my.pkg.Block"`` -> the class, else None."""
    if "." not in spec:
        cls = getattr(nn, spec, None)
        return cls if isinstance(cls, type) else None
    module_name, _, attr = spec.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr, None)
    except (ImportError, ValueError):
        return None
    return cls if isinstance(cls, type) else None


def matches(spec: str, name: str, module: nn.Module) -> bool:
    """Does ``spec`` (a ``re:`` regex on the module path, an exact path, or a class) select it?"""
    if spec.startswith("re:"):
        return re.fullmatch(spec[3:], name) is not None
    if spec == name:
        return True
    cls = resolve_class(spec)
    return cls is not None and isinstance(module, cls)
