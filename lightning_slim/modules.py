"""Small things every technique does to an ``nn.Module``: run it in eval mode and put every
submodule's mode back, find or replace a submodule by path, read a module's output, and
record outputs with forward hooks.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
>>> net[1].eval()  # a mode the user set on one submodule survives
Dropout(p=0.5, inplace=False)
>>> with evaluating(net) as m:
...     m.training
False
>>> net.training, net[1].training
(True, False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module, no_grad: bool = True) -> Iterator[nn.Module]:
    """Eval mode (and no gradients) for the block; each submodule's own mode comes back after.

    Eval mode keeps scoring and tracing deterministic (no dropout) and leaves BatchNorm's
    running statistics untouched by examples that are never trained on.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield model
    finally:
        for m, mode in modes:
            m.training = mode


def device_of(module: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device(default)


def submodule(root: nn.Module, name: str | None, owner: str = "the model") -> nn.Module:
    """``root.get_submodule(name)`` (``""``/None: the root) with an error listing what exists."""
    if name in (None, "", "."):
        return root
    try:
        return root.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n]
        shown = ", ".join(names[:30]) + (" ..." if len(names) > 30 else "")
        raise ValueError(f"{owner} has no submodule named {name!r}; it has: {shown}") from None


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a module's output: a tensor, ``.logits``, ``['logits']`` (Hugging Face
    ``ModelOutput``) or the first tensor of a tuple / dict."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    items = list(output.values()) if isinstance(output, Mapping) else output
    if isinstance(items, (tuple, list)):
        for item in items:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(
        f"cannot find the output tensor (logits) in a module output of type {type(output).__name__}; "
        "pass a function that extracts it"
    )


class _Recorder:
    """A forward hook (a picklable object, not a closure) storing one module's output."""

    def __init__(self, records: dict, name: str, when: Callable[[], bool], output_fn: Callable):
        self.records, self.name, self.when, self.output_fn = records, name, when, output_fn

    def __call__(self, module, args, output):
        if self.when():
            self.records[self.name] = self.output_fn(output)


@contextlib.contextmanager
def capture_outputs(
    modules: Mapping[str, nn.Module],
    when: Callable[[], bool] = lambda: True,
    output_fn: Callable | Mapping[str, Callable] = output_tensor,
) -> Iterator[dict]:
    """Record ``output_fn(output)`` of each named module while the block runs (and ``when()`` holds).

    ``output_fn`` may be one function or one per name. A module that runs several times keeps
    its last output.
    """
    records: dict[str, torch.Tensor] = {}
    fn = output_fn.get if isinstance(output_fn, Mapping) else (lambda name, default: output_fn)
    handles = [
        m.register_forward_hook(_Recorder(records, name, when, fn(name, output_tensor))) for name, m in modules.items()
    ]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


# --- which module a LightningModule calls, and with what ----------------------------------------------
def overrides_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class defines its own ``forward`` (``nn.Module``'s and
    ``LightningModule``'s own placeholders do not count)."""
    owner = next(c for c in type(module).__mro__ if "forward" in c.__dict__)
    return owner is not nn.Module and not (
        owner.__name__ == "LightningModule" and owner.__module__.startswith(("lightning", "pytorch_lightning"))
    )


def forward_target(module: nn.Module, name: str | None = None, owner: str = "the model") -> tuple[str, nn.Module]:
    """``(path, module)`` of what is called to run ``module``: the submodule ``name`` when given;
    ``module`` itself when its class defines ``forward``; else its one child with parameters (a
    LightningModule whose ``training_step`` calls ``self.model(**batch)``). lightning-slim's own
    training-only attributes (``slim_*``) never count.

    >>> import lightning.pytorch as pl
    >>> class Wrapper(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.model = nn.Linear(2, 2)
    >>> forward_target(Wrapper())[0], forward_target(nn.Linear(2, 2))[0]
    ('model', '')
    """
    if name not in (None, "", "."):
        return name, submodule(module, name, owner)
    if overrides_forward(module):
        return "", module
    children = [
        (n, c)
        for n, c in module.named_children()
        if not n.startswith("slim_") and next(c.parameters(), None) is not None
    ]
    if len(children) == 1:
        return children[0]
    raise ValueError(
        f"{owner} ({type(module).__name__}) defines no forward() and has {len(children)} submodules "
        f"with parameters ({[n for n, _ in children]}): name the one your training_step calls"
    )


def named_arguments(module: nn.Module) -> set[str]:
    """The names ``module.forward`` takes as keywords (``**kwargs`` does not count)."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def call_arguments(
    target: nn.Module, batch: Any, drop: tuple[str, ...] = ("labels",), input_fn: Callable[[Any], Any] | None = None
) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call ``target`` with a batch: the dict batch's entries that its
    ``forward`` names (``input_ids``, ``attention_mask``, ``pixel_values``...; ``drop`` left out),
    else ``(input_fn(batch),)`` (default :func:`~lightning_slim.batches.batch_inputs`). A model
    whose ``forward`` takes ``use_cache`` gets ``use_cache=False``: nothing here generates, and a
    key/value cache would only cost memory."""
    from lightning_slim.batches import batch_inputs

    names = named_arguments(target)
    kwargs = {k: v for k, v in batch.items() if k in names and k not in drop} if isinstance(batch, Mapping) else {}
    args = () if kwargs else ((input_fn or batch_inputs)(batch),)
    return args, without_cache(target, kwargs, names)


def without_cache(target: nn.Module, kwargs: Mapping[str, Any], names: set[str] | None = None) -> dict:
    """``kwargs`` plus ``use_cache=False`` when ``target.forward`` takes ``use_cache`` (Hugging Face)."""
    kwargs = dict(kwargs)
    if "use_cache" in (named_arguments(target) if names is None else names):
        kwargs.setdefault("use_cache", False)
    return kwargs


def call_model(module: nn.Module, batch: Any, drop: tuple[str, ...] = ("labels",)) -> Any:
    """Run ``module`` on a batch through :func:`forward_target` and :func:`call_arguments`."""
    _, target = forward_target(module)
    args, kwargs = call_arguments(target, batch, drop)
    return target(*args, **kwargs)


class _CallRecorder:
    """A forward pre-hook (picklable) storing the positional and keyword arguments of one module's call."""

    def __init__(self, records: dict, name: str, when: Callable[[], bool]):
        self.records, self.name, self.when = records, name, when

    def __call__(self, module, args, kwargs):
        if self.when():
            self.records[self.name] = (tuple(args), dict(kwargs))


@contextlib.contextmanager
def capture_calls(modules: Mapping[str, nn.Module], when: Callable[[], bool] = lambda: True) -> Iterator[dict]:
    """Record ``(args, kwargs)`` of each named module's call while the block runs (and ``when()``
    holds); a module called several times keeps its last call. The tensors are the caller's own
    (not copied).

    >>> lin = nn.Linear(2, 1)
    >>> with capture_calls({"lin": lin}) as calls:
    ...     _ = lin(input=torch.ones(1, 2))
    >>> calls["lin"][0], sorted(calls["lin"][1])
    ((), ['input'])
    """
    records: dict[str, tuple[tuple, dict]] = {}
    handles = [
        m.register_forward_pre_hook(_CallRecorder(records, name, when), with_kwargs=True) for name, m in modules.items()
    ]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()
