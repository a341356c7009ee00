"""Rewinding: snapshot the weights, optimizer and LR-scheduler state at one step, restore them later.

- ``"init"`` / ``"step"`` (Frankle & Carbin 2019; Frankle et al. 2020): weights, buffers,
  optimizer state and LR schedulers go back to the snapshot (masks are applied after).
- ``"lr"`` (Renda et al. 2020): the weights keep their trained values; only the learning-rate
  schedule (schedulers and the optimizers' hyper-parameters) goes back to the snapshot.
- ``"none"``: fine-tune, nothing is restored.

Plain PyTorch: optimizers and schedulers are passed in as lists. Under FSDP2 the snapshot holds each
rank's block of every weight and optimizer state, as training does; :func:`gathered` makes it whole for a
checkpoint (which keeps rank 0's copy) and :func:`placed` gives each rank its block back on resume.

>>> import torch
>>> net = torch.nn.Linear(2, 2); opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
>>> snap = take_snapshot("init", net, [opt], [])
>>> before = net.weight.detach().clone()
>>> net(torch.ones(1, 2)).sum().backward(); opt.step()
>>> restore("init", snap, net, [opt], []); torch.equal(net.weight, before), opt.state_dict()["state"]
(True, {})
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_slim.core import sharding

REWINDS = ("none", "init", "step", "lr")


def rewinds_weights(rewind: str) -> bool:
    return rewind in ("init", "step")


def take_snapshot(
    rewind: str, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any]
) -> dict[str, Any]:
    """Copies (never references) of what ``rewind`` will restore."""
    snap: dict[str, Any] = {"schedulers": [copy.deepcopy(s.state_dict()) for s in schedulers]}
    if rewinds_weights(rewind):
        snap["module"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        snap["optimizers"] = [copy.deepcopy(o.state_dict()) for o in optimizers]
    else:
        snap["optimizers"] = [{"param_groups": copy.deepcopy(o.state_dict()["param_groups"])} for o in optimizers]
    return snap


@torch.no_grad()
def restore(
    rewind: str,
    snap: dict[str, Any],
    module: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
) -> None:
    """Put back what ``take_snapshot`` saved for ``rewind`` (a no-op for ``"none"``)."""
    if rewind == "none":
        return
    if len(optimizers) != len(snap["optimizers"]) or len(schedulers) != len(snap["schedulers"]):
        raise RuntimeError(
            f"cannot rewind: the snapshot has {len(snap['optimizers'])} optimizer(s) and "
            f"{len(snap['schedulers'])} scheduler(s), training now has {len(optimizers)} and "
            f"{len(schedulers)}"
        )
    if rewinds_weights(rewind):
        module.load_state_dict(snap["module"])  # copies into the existing parameters
        for opt, state in zip(optimizers, snap["optimizers"]):
            # load_state_dict may alias the tensors it is given: hand it a copy, keep the snapshot intact
            opt.load_state_dict(copy.deepcopy(state))
    else:
        for opt, state in zip(optimizers, snap["optimizers"]):
            for group, saved in zip(opt.param_groups, state["param_groups"]):
                group.update({k: copy.deepcopy(v) for k, v in saved.items() if k != "params"})
    for sched, state in zip(schedulers, snap["schedulers"]):
        sched.load_state_dict(copy.deepcopy(state))


def gathered(snap: dict[str, Any]) -> dict[str, Any]:
    """The snapshot with every sharded tensor whole, on CPU, for a checkpoint: under FSDP2 on rank 0 only
    (None elsewhere: Lightning saves rank 0's callback state), a collective every rank calls."""
    if "module" not in snap:  # rewind="lr": hyper-parameters and schedules only, nothing sharded
        return snap
    snap = dict(snap)
    snap["module"] = {k: sharding.whole_on_rank0(v) for k, v in snap["module"].items()}
    snap["optimizers"] = [
        {**state, "state": {i: {k: _whole(v) for k, v in s.items()} for i, s in state.get("state", {}).items()}}
        for state in snap["optimizers"]
    ]
    return snap


def placed(snap: dict[str, Any], module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """A whole snapshot (read back from a checkpoint) placed as training holds the module and optimizers:
    under FSDP2 each rank keeps its own block of every weight and per-parameter optimizer state (nothing
    is sent); unsharded, as it is."""
    if "module" not in snap:  # rewind="lr": hyper-parameters and schedules only, nothing sharded
        return snap
    snap, current = dict(snap), module.state_dict()
    snap["module"] = {k: _like(v, current[k]) if k in current else v for k, v in snap["module"].items()}
    optimizer_states = []
    for opt, state in zip(optimizers, snap["optimizers"]):
        params = [p for group in opt.param_groups for p in group["params"]]  # state_dict's index order
        per_param = {i: {k: _like(v, params[i]) for k, v in s.items()} for i, s in state.get("state", {}).items()}
        optimizer_states.append({**state, "state": per_param})
    snap["optimizers"] = optimizer_states + list(snap["optimizers"][len(optimizer_states) :])
    return snap


def _whole(value: Any) -> Any:
    return sharding.whole_on_rank0(value) if isinstance(value, torch.Tensor) else value


def _like(value: Any, reference: torch.Tensor) -> Any:
    """A whole tensor of ``reference``'s shape placed as it is; anything else (a step count) as it is."""
    if not sharding.is_sharded(reference) or not isinstance(value, torch.Tensor) or value.shape != reference.shape:
        return value
    return sharding.place_like(value.to(reference.device), reference)
