"""Which modules a technique acts on: one grammar and one selector for every technique's
``targets`` / ``exclude`` (YAML-expressible, as torchao's ``filter_fn`` by name).

An entry is ``"re:<regex>"`` (full match on the module path), an exact module path
(``"net.0"``), or a class: a ``torch.nn`` name (``"Linear"``) or a dotted path
(``"torch.nn.Linear"``, ``"transformers.pytorch_utils.Conv1D"``), matched with ``isinstance``.

>>> from torch import nn
>>> m = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Linear(2, 2))
>>> [n for n, mod in m.named_modules() if n and matches("re:[02]", n, mod)], matches("torch.nn.Linear", "2", m[2])
(['0', '2'], True)
>>> list(select_modules(m, None, default=(nn.Linear,), what="pruning"))
['2']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from lightning_slim.core.loading import find_class


def matches(spec: str, name: str, module: nn.Module) -> bool:
    """Does ``spec`` (a ``re:`` regex on the module path, an exact path, or a class) select it?"""
    if spec.startswith("re:"):
        return re.fullmatch(spec[3:], name) is not None
    if spec == name:
        return True
    cls = find_class(spec)
    return cls is not None and isinstance(module, cls)


def _check_spec(spec: object, what: str) -> str:
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            f"{what} entry {spec!r} must be a non-empty string: a class such as 'Linear', a module "
            "path such as 'net.0', or 're:<regex>'"
        )
    if spec.startswith("re:"):
        try:
            re.compile(spec[3:])
        except re.error as err:
            raise ValueError(f"{what} entry {spec!r} is not a valid regex: {err}") from None
    return spec


def describe(modules: Mapping[str, nn.Module], limit: int = 40) -> str:
    items = [f"{n} ({type(m).__name__})" for n, m in modules.items()]
    return (", ".join(items[:limit]) + (" ..." if len(items) > limit else "")) if items else "(none)"


def select_modules(
    model: nn.Module,
    targets: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    *,
    default: tuple[type[nn.Module], ...],
    supported: Callable[[nn.Module], bool] | None = None,
    what: str = "targets",
) -> dict[str, nn.Module]:
    """The modules ``targets`` selects and ``exclude`` does not, in the model's order.

    ``targets=None`` selects every module of a ``default`` type. ``supported(module)`` says which
    modules the technique can handle (default: the ``default`` types). Errors, all before training:
    a path or ``re:`` entry that selects nothing, a name that is neither a path nor a class, a
    module named by its path that is not supported, an ``exclude`` entry that removes nothing, and
    an empty selection. A class the model does not use is allowed (one YAML for many models).
    """
    supported = supported or (lambda m: isinstance(m, default))
    modules = {n: m for n, m in model.named_modules() if n}
    candidates = {n: m for n, m in modules.items() if supported(m)}
    if targets is None:
        chosen = {n: m for n, m in candidates.items() if isinstance(m, default)}
    else:
        chosen = {}
        for spec in map(lambda s: _check_spec(s, f"{what} targets"), targets):
            if spec in modules and spec not in candidates:
                raise ValueError(
                    f"{what} target {spec!r} is a {type(modules[spec]).__name__}, which {what} does not "
                    f"handle; it handles: {describe(candidates)}"
                )
            hits = {n: m for n, m in candidates.items() if matches(spec, n, m)}
            if not hits and (spec.startswith("re:") or find_class(spec) is None):
                raise ValueError(
                    f"{what} target {spec!r} matches no module {what} can handle; those are {describe(candidates)}"
                )
            chosen.update(hits)
    for spec in map(lambda s: _check_spec(s, f"{what} exclude"), exclude):
        hits = [n for n, m in chosen.items() if matches(spec, n, m)]
        if not hits:
            raise ValueError(f"{what} exclude entry {spec!r} matches none of the targets {sorted(chosen)}")
        for n in hits:
            del chosen[n]
    if not chosen:
        raise ValueError(f"{what}: no module left to act on; modules it can handle are {describe(candidates)}")
    return {n: chosen[n] for n in modules if n in chosen}


def select_parameters(
    model: nn.Module,
    targets: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    *,
    default: tuple[type[nn.Module], ...],
    params_of: Callable[[nn.Module], Iterable[str]],
    what: str = "targets",
) -> dict[str, tuple[str, str]]:
    """Parameters to act on, ``{full name: (module path, parameter name)}`` in the model's order.

    Module entries (the grammar of :func:`select_modules`) select ``params_of(module)`` of each
    module they match (``targets=None``: the modules of a ``default`` type); an entry may also name
    one parameter by its full name (``"layers.0.self_attn.in_proj_weight"``). ``exclude`` takes
    both kinds. A parameter tied to several modules appears once, under its first name. Errors as
    in :func:`select_modules`, all before training.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.MultiheadAttention(2, 1))
    >>> sorted(select_parameters(m, ["1.in_proj_weight", "Linear"], exclude=["1.out_proj"], default=(nn.Linear,),
    ...                          params_of=lambda mod: ["weight"]))
    ['0.weight', '1.in_proj_weight']
    """
    params = dict(model.named_parameters())
    prefixes = {id(p): name for name, p in params.items()}
    targets = None if targets is None else [_check_spec(s, f"{what} targets") for s in targets]
    exclude = [_check_spec(s, f"{what} exclude") for s in exclude]
    module_specs = None if targets is None else [s for s in targets if s not in params]
    chosen: dict[str, tuple[str, str]] = {}
    if module_specs is None or module_specs:
        supported = lambda mod: any(isinstance(getattr(mod, k, None), nn.Parameter) for k in params_of(mod))
        for path, module in select_modules(
            model, module_specs, (), default=default, supported=supported, what=what
        ).items():
            for key in params_of(module):
                p = getattr(module, key, None)
                if isinstance(p, nn.Parameter):
                    chosen.setdefault(prefixes[id(p)], (path, key))
    for spec in targets or ():
        if spec in params:
            path, _, key = spec.rpartition(".")
            chosen[spec] = (path, key)
    modules = dict(model.named_modules())
    for spec in exclude:
        hits = [n for n, (path, _) in chosen.items() if spec == n or matches(spec, path, modules[path])]
        if not hits:
            raise ValueError(f"{what} exclude entry {spec!r} matches none of the targets {sorted(chosen)}")
        for n in hits:
            del chosen[n]
    if not chosen:
        raise ValueError(f"{what}: no parameter left to act on")
    return {n: chosen[n] for n in params if n in chosen}
