"""Run the user's own ``training_step`` once on a sample batch before training, and see which of its
modules it calls and how, without changing anything the fit will see.

A technique that must know what ``training_step`` really does (distillation: which module's output
is the student's logits, and the exact call the teacher must repeat) cannot learn it from
``forward`` or from ``example_input_array``: a module may define ``forward`` for export while its
step calls ``self.model(input_ids=..., labels=...)``. :func:`probe_training_step` runs the step
itself:

- on a batch collated from the first items of the dataset (:func:`~lightning_slim.batches.sample_batch`),
  so the loader is never iterated and the data order is unchanged;
- in eval mode under ``torch.no_grad()`` (:func:`~lightning_slim.modules.evaluating`): no batch-norm
  statistics move and nothing is trained;
- with torch's, Python's and NumPy's global random states put back afterwards, so the fit draws the
  same numbers as without the probe;
- with ``self.log`` / ``self.log_dict`` silenced (Lightning refuses logging outside its loops).

:func:`outermost_calls` records, among a set of modules, the calls that are not nested inside
another recorded call: with every module of a LightningModule watched, those are what
``training_step`` calls itself (``self(x)``: the module; ``self.model(**batch)``: ``model``).

>>> import lightning.pytorch as pl
>>> from torch import nn
>>> class Step(pl.LightningModule):
...     def __init__(self):
...         super().__init__()
...         self.model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
...     def training_step(self, batch, batch_idx):
...         self.log("loss", 0.0)
...         return self.model(batch[0]).sum()
>>> module = Step()
>>> with outermost_calls(dict(module.named_modules())) as recorder:
...     loss = probe_training_step(module, (torch.ones(3, 2),))
>>> [(c.path, tuple(c.args[0].shape)) for c in recorder.calls]
[('model', (3, 2))]
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_slim.batches import move_to
from lightning_slim.modules import device_of, evaluating


@contextlib.contextmanager
def preserved_random_state(device: torch.device | None = None) -> Iterator[None]:
    """Torch's (CPU, and ``device``'s if it is an accelerator), Python's and NumPy's global random
    states are as they were once the block ends."""
    devices = [device] if device is not None and device.type == "cuda" else []
    python = random.getstate()
    try:
        import numpy as np
    except ImportError:  # NumPy is optional
        np = None
    numpy = np.random.get_state() if np is not None else None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        if np is not None:
            np.random.set_state(numpy)


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def silenced_logging(module: nn.Module) -> Iterator[None]:
    """``module.log`` / ``module.log_dict`` do nothing while the block runs (instance attributes,
    removed after: the class's own methods come back)."""
    own = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
    module.__dict__["log"] = module.__dict__["log_dict"] = _silent
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            module.__dict__.pop(name, None)
        module.__dict__.update(own)


class StepProbeError(RuntimeError):
    """The user's ``training_step`` raised when run on the sample batch before training (the
    original exception is its ``__cause__``)."""


def probe_training_step(pl_module: nn.Module, batch: Any, batch_idx: int = 0) -> Any:
    """The output of the class's own ``training_step`` on ``batch`` (moved to the module's device), run
    as the module docstring describes. Hooks the caller registered see the calls it makes. An
    exception inside the step is raised as :class:`StepProbeError`."""
    step = type(pl_module).training_step
    takes_index = len(inspect.signature(step).parameters) > 2  # (self, batch, batch_idx, ...)
    device = device_of(pl_module)
    batch = move_to(batch, device)
    with preserved_random_state(device), evaluating(pl_module), silenced_logging(pl_module):
        try:
            return step(pl_module, batch, batch_idx) if takes_index else step(pl_module, batch)
        except Exception as err:
            raise StepProbeError(f"{type(err).__name__}: {err}"[:300]) from err


@dataclass
class ModuleCall:
    """One call of a watched module: its path, arguments and output (the caller's own tensors)."""

    path: str
    args: tuple
    kwargs: dict
    output: Any = None


class OutermostCalls:
    """Forward pre-/post-hooks keeping the stack of watched calls in progress; ``calls`` lists, in
    order, the finished calls that were not nested inside another watched call. Picklable (a fit
    may copy or spawn the module while the hooks are on it)."""

    def __init__(self, when: Callable[[], bool] = lambda: True):
        self.when = when
        self.calls: list[ModuleCall] = []
        self.open: list[ModuleCall | None] = []

    def clear(self) -> None:
        self.calls.clear()
        self.open.clear()

    def before(self, path: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.when():
            self.open.append(None if self.open else ModuleCall(path, tuple(args), dict(kwargs)))

    def after(self, path: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.when() and self.open:
            call = self.open.pop()
            if call is not None:
                call.output = output
                self.calls.append(call)


@contextlib.contextmanager
def outermost_calls(
    modules: Mapping[str, nn.Module], when: Callable[[], bool] = lambda: True
) -> Iterator[OutermostCalls]:
    """Record every call of one of ``modules`` that is not nested inside another call of one of them
    (while ``when()`` holds). A module registered under two paths counts under the first."""
    recorder = OutermostCalls(when)
    handles, seen = [], set()
    for path, module in modules.items():
        if id(module) in seen:
            continue
        seen.add(id(module))
        handles.append(module.register_forward_pre_hook(functools.partial(recorder.before, path), with_kwargs=True))
        handles.append(module.register_forward_hook(functools.partial(recorder.after, path), with_kwargs=True))
    try:
        yield recorder
    finally:
        for h in handles:
            h.remove()
