"""Sharded parameters (FSDP2's ``fully_shard``, as Lightning's ``ModelParallelStrategy`` runs it): what
each rank holds, and the few collectives that make every rank decide alike.

FSDP2 turns each parameter into a ``DTensor`` placed ``Shard(0)`` on a one-dimensional data-parallel
mesh: rank ``r`` holds the ``r``-th block of rows (``torch.chunk`` sizes; the last block may be shorter
or empty). A weight's rows are its outputs (``out_in`` layout), so whatever is decided per output row
is decided locally, and whatever ranks weights of a whole tensor or model against each other (a
global magnitude threshold) is agreed with :func:`keep_top` without gathering any tensor: a
bisection on the scores' bit patterns, one all-reduce of a few counts per step.

Plain torch and ``torch.distributed``: no Lightning here. Tensors that are not DTensors pass
through every function unchanged, so callers need no branch of their own.

>>> import torch
>>> keep_top([[torch.tensor([0.1, 0.4]), torch.tensor([0.3, 0.2])]], 0.5)  # one process: a plain top-k
[[tensor([False,  True]), tensor([ True, False])]]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

SUPPORTED = "ModelParallelStrategy (FSDP2: fully_shard over its data-parallel mesh, tensor_parallel_size=1)"


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def any_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    return any(isinstance(t, DTensor) for t in tensors)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's block of a DTensor (shares its storage); any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def like(block: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``block`` (this rank's part, in ``reference``'s local shape) placed as ``reference`` is."""
    if not isinstance(reference, DTensor):
        return block
    return DTensor.from_local(
        block, reference.device_mesh, reference.placements, shape=reference.shape, stride=reference.stride()
    )


def place_like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A whole ``tensor`` (e.g. read back from a checkpoint) placed as ``reference`` is: this rank keeps
    its block only. Already placed tensors and unsharded references pass through."""
    if not isinstance(reference, DTensor) or isinstance(tensor, DTensor):
        return tensor
    # every rank holds the whole tensor: each keeps its own block, nothing is sent (src_data_rank=None)
    return distribute_tensor(tensor, reference.device_mesh, reference.placements, src_data_rank=None)


def rows_of(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``tensor``, a whole tensor of ``reference``'s shape or one row broadcast over
    all of them (kept as it is: every block broadcasts it alike). Unsharded references: ``tensor`` itself."""
    if not isinstance(reference, DTensor) or tensor.shape[0] == 1:
        return tensor
    return place_like(tensor.expand(reference.shape).contiguous(), reference).to_local()


def row_group(tensors: Mapping[str, torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group over which ``tensors`` are split by rows (None: none is sharded). Every one
    must be a ``Shard(0)`` DTensor on the same one-dimensional mesh: other layouts (tensor parallel,
    HSDP's 2-D mesh, a mix of sharded and plain tensors) are a ``ValueError`` naming the tensor."""
    if not any_sharded(tensors.values()):
        return None
    meshes = set()
    for name, t in tensors.items():
        placements = getattr(t, "placements", None)
        if placements != (Shard(0),) or t.device_mesh.ndim != 1:
            raise ValueError(
                f"{name!r} is placed {placements} on a {getattr(getattr(t, 'device_mesh', None), 'ndim', 0)}-D mesh; "
                f"supported: every target a Shard(0) DTensor on one 1-D mesh, as {SUPPORTED} makes them"
            )
        meshes.add(t.device_mesh)
    if len(meshes) != 1:
        raise ValueError(f"targets on {len(meshes)} different meshes; supported: one, as {SUPPORTED} makes them")
    return next(iter(meshes)).get_group()


def count_nonzero(tensor: torch.Tensor) -> int:
    """Non-zero entries of the whole tensor, summed over its shards (a collective for a DTensor)."""
    count = torch.count_nonzero(local(tensor).detach()).reshape(1).to(torch.int64)
    if isinstance(tensor, DTensor):
        count = all_reduce(count, tensor.device_mesh.get_group())
    return int(count)


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``tensor`` reduced over ``group`` (None: the default group), returned on its own device: the
    collective runs where the backend takes tensors (NCCL: CUDA only; gloo: CPU)."""
    moved = tensor.to(collective_device(group))
    dist.all_reduce(moved, op=op, group=group)
    return moved.to(tensor.device)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def whole_on_rank0(tensor: torch.Tensor) -> torch.Tensor | None:
    """The whole tensor on rank 0's CPU and None on the other ranks, for state that only rank 0 saves
    (Lightning writes callback state from rank 0): no other rank ever holds the whole (a collective for
    a DTensor: every rank calls it). A plain tensor: as it is, on the CPU, on every rank."""
    if not isinstance(tensor, DTensor):
        return tensor.detach().cpu()
    if tensor.placements != (Shard(0),) or tensor.device_mesh.ndim != 1:
        whole = tensor.full_tensor().detach().cpu()  # not FSDP2's row blocks: gathered on every rank
        return whole if dist.get_rank() == 0 else None
    group = tensor.device_mesh.get_group()
    world, rank, device = dist.get_world_size(group), dist.get_rank(group), collective_device(group)
    n, per_rank = tensor.shape[0], math.ceil(tensor.shape[0] / world)  # torch.chunk's blocks, as FSDP2 cuts
    block = tensor.to_local().detach()
    padded = _padded_bytes(block, per_rank, device)
    parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, parts, group_dst=0, group=group)
    if rank != 0:
        return None
    return _unpadded(parts, [max(0, min(per_rank, n - r * per_rank)) for r in range(world)], block)


def _padded_bytes(value: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """``value``'s rows as bytes, zero-padded to ``rows`` rows: any dtype, whatever the backend sends."""
    row = math.prod(value.shape[1:])  # explicit: a rank may hold no rows
    padded = torch.zeros(rows, row * value.element_size(), dtype=torch.uint8, device=device)
    padded[: len(value)] = value.contiguous().reshape(len(value), row).view(torch.uint8).to(device)
    return padded


def _unpadded(parts: Sequence[torch.Tensor], counts: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """The ranks' padded byte rows (:func:`_padded_bytes`) trimmed to ``counts`` and joined, as ``like``'s dtype."""
    whole = torch.cat([p[:k] for p, k in zip(parts, counts, strict=True)]).cpu()
    return whole.view(like.dtype).reshape(len(whole), *like.shape[1:])


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where ``group``'s collectives take their tensors: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(rows: Mapping[str, torch.Tensor], group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    """Every rank's rows of each tensor, concatenated in rank order, on the CPU (a collective). The ranks may
    hold different numbers of rows; each key must have the same trailing shape and dtype, and the keys the
    same order, on every rank. Sent as bytes: any dtype, whatever the backend supports."""
    world, device = dist.get_world_size(group), collective_device(group)
    mine = torch.tensor([len(next(iter(rows.values()), ()))], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(counts, mine, group=group)
    most = max(int(c) for c in counts)
    if most == 0:  # every rank knows: nothing to send (a warm cache's step costs one small all-gather)
        return {key: value[:0].cpu() for key, value in rows.items()}
    out = {}
    for key, value in rows.items():
        padded = _padded_bytes(value.detach(), most, device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        out[key] = _unpadded(parts, [int(c) for c in counts], value)
    return out


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state dict on CPU (a collective when its parameters are sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not any_sharded(module.parameters()):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(module: nn.Module) -> nn.Module | None:
    """The whole module on CPU, unsharded: ``module`` itself when no parameter is sharded; under FSDP2 a
    copy built on rank 0 from the full state dict (None on the other ranks). A collective when sharded:
    every rank calls it at the same point (not in ``teardown``, where Lightning may have torn down the group).

    The copy is a plain module of the user's classes: FSDP2's class swap, hooks and state are removed,
    its parameters are the gathered tensors (the sharded ones are never copied)."""
    if not any_sharded(module.parameters()):
        return module
    whole = full_state_dict(module)  # on rank 0 only: cpu_offload keeps it there
    if dist.get_rank() != 0:
        return None
    fsdp_state = object()  # stands in for FSDP2's per-module state in the copy, then is removed
    memo: dict[int, object] = {}
    for name, parameter in module.named_parameters():
        if name not in whole:
            raise KeyError(f"{name!r} is not in the full state dict; its keys: {sorted(whole)[:8]}...")
        memo[id(parameter)] = nn.Parameter(whole[name], requires_grad=parameter.requires_grad)
    for sub in module.modules():
        for key, value in vars(sub).items():
            if key.startswith(_FSDP_STATE_KEY):  # FSDP2's state (process groups, sharded params): not copied
                memo[id(value)] = {}
                memo.update({id(state): fsdp_state for state in value.values()})
        mesh = vars(sub).get("_device_mesh")  # a LightningModule's mesh under ModelParallelStrategy
        if mesh is not None:
            memo[id(mesh)] = None
    # FSDP2's classes refuse deepcopy: each becomes an empty module of the user's class first (any
    # reference to it, from anywhere in the copy, finds that one), then gets a copy of its attributes
    fsdp_modules = [sub for sub in module.modules() if isinstance(sub, FSDPModule)]
    for sub in fsdp_modules:
        memo[id(sub)] = object.__new__(next(c for c in type(sub).__mro__[1:] if not issubclass(c, FSDPModule)))
    for sub in fsdp_modules:
        vars(memo[id(sub)]).update(copy.deepcopy(vars(sub), memo))
    copied = copy.deepcopy(module, memo)
    for sub in copied.modules():
        _strip_fsdp(sub)
    return copied


_FSDP_STATE_KEY = "__composable_api_state_key"
_FSDP_HOOKS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _strip_fsdp(sub: nn.Module) -> None:
    """Undo what ``fully_shard`` did to one module of a copy (its class is already the user's): state, hooks."""
    for key in [k for k in vars(sub) if k.startswith(_FSDP_STATE_KEY) or k.startswith("_fsdp_")]:
        delattr(sub, key)
    vars(sub).pop("_is_fsdp_managed_module", None)
    for hooks_name in _FSDP_HOOKS:
        hooks = getattr(sub, hooks_name)
        for handle in [h for h, fn in hooks.items() if _from_fsdp(fn)]:
            del hooks[handle]
            sub._forward_pre_hooks_with_kwargs.pop(handle, None)
            sub._forward_hooks_with_kwargs.pop(handle, None)
            sub._forward_hooks_always_called.pop(handle, None)


def _from_fsdp(hook: object) -> bool:
    function = getattr(hook, "__func__", hook)
    return getattr(function, "__module__", "").startswith("torch.distributed.fsdp")


def _ordered_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys that sort like the float32 scores (NaN aside): sign-magnitude bits made two's complement
    (no wider than the scores: a rank's keys cost what its scores cost)."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 ties with 0.0, as in a sort
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


def keep_top(
    groups: Sequence[Sequence[torch.Tensor]], sparsity: float, group: dist.ProcessGroup | None = None
) -> list[list[torch.Tensor]]:
    """Boolean keep-masks that keep the highest ``1 - sparsity`` of the scores of each group, ties
    broken by position (first kept), exactly as a stable sort of the whole group would.

    Each group is a list of 1-D segments, this rank's part of each tensor (flattened rows) in the
    group's order. Without a process group they are this process's whole tensors. With one, each
    segment is one rank's block of its tensor and the group's order is tensor by tensor, rank by
    rank within a tensor (``Shard(0)``). Every rank calls it with the same groups and segment count.
    """
    flat = [torch.cat(list(g)) if len(g) else torch.zeros(0) for g in groups]
    sizes = torch.tensor([f.numel() for f in flat], dtype=torch.int64)
    keys = [_ordered_keys(f) for f in flat]
    bounds = torch.tensor(
        [[int(k.min()) if k.numel() else 2**40, -int(k.max()) if k.numel() else 2**40] for k in keys],
        dtype=torch.int64,
    ).reshape(-1, 2)
    if group is not None:  # the bookkeeping stays on the CPU; all_reduce moves it to the backend's device
        sizes, bounds = all_reduce(sizes, group), all_reduce(bounds, group, dist.ReduceOp.MIN)
    n_keep = sizes - torch.round(sizes.double() * sparsity).to(torch.int64)
    # the threshold of each group: the largest key t with at least n_keep scores >= t (bisection)
    lo, hi = bounds[:, 0].clone(), -bounds[:, 1] + 1  # count(>= lo) = size >= n_keep > count(>= hi) = 0
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        counts = torch.tensor([int((k >= m).sum()) for k, m in zip(keys, mid.tolist())], dtype=torch.int64)
        if group is not None:
            counts = all_reduce(counts, group)
        enough = counts >= n_keep
        lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
    above = torch.tensor([int((k > t).sum()) for k, t in zip(keys, lo.tolist())], dtype=torch.int64)
    if group is not None:
        above = all_reduce(above, group)
    ties_wanted = (n_keep - above).tolist()
    # ties at the threshold, per segment of this rank; every rank's, to know what comes before its own
    seg_ties = [[int((_ordered_keys(s) == t).sum()) for s in g] for g, t in zip(groups, lo.tolist())]
    mine = torch.tensor([c for row in seg_ties for c in row], dtype=torch.int64)
    everyone = [mine]
    if group is not None:
        mine = mine.to(collective_device(group))
        everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(everyone, mine, group=group)
        everyone = [t.cpu() for t in everyone]
    me = 0 if group is None else dist.get_rank(group)
    out, flat_index = [], 0
    for g, threshold, wanted, n in zip(groups, lo.tolist(), ties_wanted, n_keep.tolist()):
        masks, before = [], 0  # ties kept by the segments ahead of this one, in the group's order
        for s in g:
            if n <= 0:
                masks.append(torch.zeros(s.numel(), dtype=torch.bool, device=s.device))
                flat_index += 1
                continue
            ahead = before + sum(int(everyone[r][flat_index]) for r in range(me))
            k = _ordered_keys(s)
            tie = k == threshold
            allowed = max(0, min(int(tie.sum()), wanted - ahead))
            keep = k > threshold
            keep[torch.nonzero(tie).flatten()[:allowed]] = True
            masks.append(keep.to(s.device))
            before += sum(int(e[flat_index]) for e in everyone)
            flat_index += 1
        out.append(masks)
    return out
