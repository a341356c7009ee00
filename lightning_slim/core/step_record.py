"""What the model did inside one ``training_step``: every outermost call of the watched modules (its
arguments and its output) and, one per call, the outputs of feature modules. The machinery records
it for a ``WATCH_STEP`` technique around the user's step and hands it to the technique's
``loss_term`` (distillation: the student's logits call, which the teacher repeats, and its paired
features). The same recorder serves checks before training (watching every module, to find which
one the step calls).

>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
>>> with record_calls({"": net}, {"0": net[0]}) as seen:
...     _ = net(torch.ones(4, 2)), net(torch.zeros(4, 2))
>>> [tuple(r["logits"].shape) for r in seen.records("")], len(seen.records("")[1]["feat:0"])
([(4, 3), (4, 3)], 4)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lightning_slim.core.step_probe import OutermostCalls, outermost_calls
from lightning_slim.modules import output_tensor


class FeatureOutputs:
    """Forward hooks (picklable) appending each named module's output tensor, in call order."""

    def __init__(self, when: Callable[[], bool]):
        self.when = when
        self.outputs: dict[str, list[torch.Tensor]] = {}

    def record(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if self.when():
            self.outputs.setdefault(name, []).append(output_tensor(output))

    def clear(self) -> None:
        self.outputs.clear()


class StepRecord:
    """The calls and feature outputs recorded since the last :meth:`clear`."""

    def __init__(self, calls: OutermostCalls, features: FeatureOutputs):
        self.calls, self.features = calls, features

    def clear(self) -> None:
        self.calls.clear()
        self.features.clear()

    def paths(self) -> list[str]:
        """The watched modules called, each once, in first-call order."""
        return list(dict.fromkeys(c.path for c in self.calls.calls))

    def records(self, path: str, output_fn: Callable[[Any], torch.Tensor] | None = output_tensor) -> list[dict]:
        """One dict per call of ``path``: ``"call"`` ``(args, kwargs)``, ``"logits"`` (``output_fn`` of its
        output; left out when ``output_fn`` is None) and ``"feat:<module>"`` for each feature module."""
        calls = [c for c in self.calls.calls if c.path == path]
        out = [{"call": (c.args, c.kwargs)} for c in calls]
        if output_fn is not None:
            for record, c in zip(out, calls):
                record["logits"] = output_fn(c.output)
        for name, outputs in self.features.outputs.items():
            if calls and len(outputs) != len(calls):
                raise ValueError(
                    f"feature module {name!r} ran {len(outputs)} times in training_step, but the watched module's "
                    f"{path or 'forward'!r} ran {len(calls)} times: feature pairs need one output per call "
                    "of the student (pair a module that runs once per call)"
                )
            for record, value in zip(out, outputs):
                record[f"feat:{name}"] = value
        return out


@contextlib.contextmanager
def record_calls(
    targets: Mapping[str, nn.Module], features: Mapping[str, nn.Module], when: Callable[[], bool] = lambda: True
) -> Iterator[StepRecord]:
    """Record the outermost calls among ``targets`` and every output of ``features`` while the block runs."""
    feats = FeatureOutputs(when)
    handles = [m.register_forward_hook(functools.partial(feats.record, name)) for name, m in features.items()]
    try:
        with outermost_calls(targets, when) as calls:
            yield StepRecord(calls, feats)
    finally:
        for h in handles:
            h.remove()
