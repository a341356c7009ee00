"""Wanda's input statistics: per-channel norms of what the pruned layers receive, accumulated by
forward hooks during training steps (or calibration batches) and kept in checkpoints."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_slim.core import sharding


def first_input(module: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The first positional tensor a module was called with (``inputs_of`` for most layers)."""
    return [args[0]] if args and isinstance(args[0], torch.Tensor) else []


class InputNorms:
    """Per-channel statistics of what modules receive, accumulated by forward hooks: for each
    named module and each of its inputs (``inputs_of(module, args, kwargs)`` returns tensors with
    channels on the last dimension), the sum of squares over every other position and how many
    positions were seen. ``rms(name)`` is the root mean square per channel, the input norm of
    activation-aware pruning (Wanda). State is plain tensors, so it can be checkpointed.

    >>> lin = nn.Linear(3, 1)
    >>> stats = InputNorms()
    >>> with stats.recording({"lin": lin}):
    ...     _ = lin(torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 0.0]]))
    >>> stats.rms("lin")[0].tolist(), stats.count["lin"]
    ([1.0, 0.0, 1.4142135381698608], 2)
    """

    def __init__(self):
        self.sumsq: dict[str, list[torch.Tensor]] = {}
        self.count: dict[str, int] = {}

    def reset(self) -> None:
        self.sumsq, self.count = {}, {}

    def add(self, name: str, inputs: list[torch.Tensor]) -> None:
        sums = [x.detach().float().pow(2).reshape(-1, x.shape[-1]).sum(0) for x in inputs]
        if not sums:
            return
        if name in self.sumsq:
            self.sumsq[name] = [a + b.to(a.device) for a, b in zip(self.sumsq[name], sums)]
        else:
            self.sumsq[name] = sums
        self.count[name] = self.count.get(name, 0) + inputs[0].numel() // inputs[0].shape[-1]

    def rms(self, name: str) -> list[torch.Tensor]:
        if name not in self.sumsq:
            raise KeyError(f"no inputs were recorded for {name!r}; recorded: {sorted(self.sumsq)}")
        return [(s / max(self.count[name], 1)).sqrt() for s in self.sumsq[name]]

    def reduced(self, names: Iterable[str], group: dist.ProcessGroup) -> InputNorms:
        """The statistics of every rank of ``group`` together: sums of squares and counts added, as if one
        process had seen every rank's inputs (a collective: every rank calls it with the same ``names``)."""
        names = sorted(set(names))
        device = next((t.device for v in self.sumsq.values() for t in v), torch.device("cpu"))
        seen = torch.tensor([[int(n in self.count), self.count.get(n, 0)] for n in names], device=device).reshape(-1, 2)
        seen = sharding.all_reduce(seen, group)
        world = dist.get_world_size(group)
        partial = [n for n, (ranks, _) in zip(names, seen.tolist()) if 0 < ranks < world]
        if partial:  # every rank runs the same forward under FSDP2: a module called on some ranks only is a bug
            raise RuntimeError(f"Wanda's input norms of {partial} were recorded on some ranks only")
        present = [n for n, (ranks, _) in zip(names, seen.tolist()) if ranks]
        sums = [t for n in present for t in self.sumsq[n]]
        flat = torch.cat([t.flatten() for t in sums]) if sums else torch.zeros(0, device=device)
        flat = sharding.all_reduce(flat, group)
        out, blocks = InputNorms(), iter(flat.split([t.numel() for t in sums]))
        for n in present:
            out.sumsq[n] = [next(blocks).view_as(t) for t in self.sumsq[n]]
        out.count = {n: int(c) for n, (ranks, c) in zip(names, seen.tolist()) if ranks}
        return out

    @contextlib.contextmanager
    def recording(
        self,
        modules: Mapping[str, nn.Module],
        when: Callable[[], bool] = lambda: True,
        inputs_of: Callable | Mapping[str, Callable] = first_input,
    ) -> Iterator[InputNorms]:
        """Accumulate while the block runs (and ``when()`` holds); ``inputs_of`` may be one per name."""
        handles = self.attach(modules, when, inputs_of)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def attach(
        self,
        modules: Mapping[str, nn.Module],
        when: Callable[[], bool] = lambda: True,
        inputs_of: Callable | Mapping[str, Callable] = first_input,
    ) -> list:
        """Register the hooks and return their handles (``handle.remove()`` detaches them)."""
        pick = inputs_of.get if isinstance(inputs_of, Mapping) else (lambda name, default: inputs_of)
        return [
            m.register_forward_hook(_NormHook(self, name, when, pick(name, first_input)), with_kwargs=True)
            for name, m in modules.items()
        ]

    def state_dict(self, group: dist.ProcessGroup | None = None) -> dict[str, Any]:
        """Plain tensors; with ``group`` (FSDP2, where a checkpoint keeps rank 0's callback state) every
        rank's, ``{"per_rank": [...]}`` (a collective: every rank calls it)."""
        state = {"sumsq": {k: [t.cpu() for t in v] for k, v in self.sumsq.items()}, "count": dict(self.count)}
        if group is None:
            return state
        per_rank: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(per_rank, state, group=group)
        return {"per_rank": per_rank}

    def load_state_dict(self, state: Mapping[str, Any], group: dist.ProcessGroup | None = None) -> None:
        """A saved state; every rank's (``per_rank``): this rank's of ``group``, or all of them added up
        when resumed unsharded (what one process would have seen)."""
        if "per_rank" in state:
            states = state["per_rank"]
            world = dist.get_world_size(group) if group is not None else None
            if world is not None and world != len(states):
                raise ValueError(f"Wanda's input norms were saved by {len(states)} ranks; resumed on {world}")
            if world is not None:
                return self.load_state_dict(states[dist.get_rank(group)])
            self.reset()
            for saved in states:
                for name, sums in saved["sumsq"].items():
                    self.sumsq[name] = [a + b for a, b in zip(self.sumsq[name], sums)] if name in self.sumsq else sums
                    self.count[name] = self.count.get(name, 0) + saved["count"][name]
            return
        self.sumsq = {k: list(v) for k, v in state["sumsq"].items()}
        self.count = dict(state["count"])


class _NormHook:
    """A forward hook (picklable) feeding one module's inputs to :class:`InputNorms`."""

    def __init__(self, stats: InputNorms, name: str, when: Callable[[], bool], inputs_of: Callable):
        self.stats, self.name, self.when, self.inputs_of = stats, name, when, inputs_of

    def __call__(self, module, args, kwargs, output):
        if self.when():
            self.stats.add(self.name, self.inputs_of(module, args, kwargs))
