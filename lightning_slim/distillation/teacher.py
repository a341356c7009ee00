"""The frozen teacher: built from an object, or a checkpoint plus a class path (what LightningCLI /
YAML can express), and run on the student's own inputs, once per example with the cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from lightning_slim.batches import BatchFormatError, move_to, slice_batch
from lightning_slim.core import sharding
from lightning_slim.core.loading import build_module, freeze, read_state_dict
from lightning_slim.distillation.configs import DistillationConfig, TeacherCacheConfig
from lightning_slim.distillation.topk import teacher_topk
from lightning_slim.index_cache import IndexCache
from lightning_slim.modules import (
    capture_outputs,
    device_of,
    forward_target,
    named_arguments,
    output_tensor,
    submodule,
)

Call = tuple[tuple, dict]  # the positional and keyword arguments of one forward call


def resolve_teacher(config: DistillationConfig) -> nn.Module:
    """The frozen (no grad, eval mode) teacher the config names (checked when it was built). A
    LightningModule ``teacher_class`` loads through ``load_from_checkpoint``; a plain ``nn.Module`` class
    is built from ``teacher_init_args``; a given ``teacher`` object gets the checkpoint's weights when
    one is named."""
    teacher, checkpoint = config.teacher, config.teacher_checkpoint
    if teacher is None:
        teacher = build_module(config.teacher_class, config.teacher_init_args, checkpoint, what="teacher_class")
    elif checkpoint is not None:
        teacher.load_state_dict(read_state_dict(checkpoint))
    return freeze(teacher)


def shard_teacher(teacher: nn.Module, mesh: DeviceMesh) -> None:
    """FSDP2 over ``mesh``, in place: each block transformers names unsplittable (``_no_split_modules``:
    its decoder layers), then the rest, so a rank holds its share of every block and a forward gathers
    one block at a time. A teacher already sharded is left as it is (a second fit)."""
    if isinstance(teacher, FSDPModule):
        return
    blocks = {name for m in teacher.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    # resharded after every forward, the root too (FSDP2 keeps a root gathered for the backward a teacher never runs)
    for module in list(teacher.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)


def teacher_arguments(target: nn.Module, call: Call) -> Call:
    """The student's call as the teacher gets it: ``labels`` left out (the teacher would compute a
    loss nobody uses), ``use_cache=False`` added where its ``forward`` takes it (no key/value cache)."""
    args, kwargs = call
    kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
    if "use_cache" in named_arguments(target):
        kwargs["use_cache"] = False
    return args, kwargs


def teacher_calls(
    target: nn.Module, records: list[dict], batch: Any, input_fn: Callable | None, path: str | None
) -> list[Call]:
    """The teacher's call for each of the student's recorded calls (:func:`teacher_arguments`), or
    ``input_fn(batch)`` when given (one call per step; with no batch, the ``example_input_array`` the
    student was run on is repeated)."""
    if input_fn is None or batch is None:
        return [teacher_arguments(target, r["call"]) for r in records]
    if len(records) > 1:
        raise ValueError(
            f"input_fn gives the teacher one input per batch, but training_step called {path!r} "
            f"{len(records)} times: leave input_fn unset so the teacher repeats each call"
        )
    return [((input_fn(batch),), {})]


def teacher_target(teacher: nn.Module, student_path: str | None) -> nn.Module:
    """What the teacher's call goes to: its submodule at the student's path when the teacher is a
    user-style LightningModule that has one (a second instance of the student's class), else the
    teacher itself, or its one child when it is a LightningModule without ``forward``."""
    import lightning.pytorch as pl

    if student_path and isinstance(teacher, pl.LightningModule):
        try:
            return teacher.get_submodule(student_path)
        except AttributeError:
            pass
    return forward_target(teacher, None, "the teacher")[1]


def _split_calls(outputs: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """``{"logits@1": ...}`` -> one dict per call (the cache keeps call i's outputs under ``@i``)."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    for key, value in outputs.items():
        name, _, number = key.partition("@")
        if int(number or 0) < count:
            out[int(number or 0)][name] = value
    if not all(out):
        raise ValueError(
            f"cache_teacher holds the teacher's outputs for {len({k.partition('@')[2] for k in outputs})} call(s) "
            f"of the student per example, but this step made {count}: the cache needs the same calls every step"
        )
    return out


class TeacherRunner:
    """Runs the teacher (``target`` is what is called, ``logits_module`` what outputs the logits) and
    keeps its outputs per example when a cache is configured: full logits, or the top-k buckets of
    ``softmax(logits / temperature)``; paired features as they are. With ``logits=False`` only the
    features are read.

    Under FSDP2 the callback sets ``group`` (the data-parallel ranks): the cache is shared across them
    after each step (every rank holds every example seen by any rank, by dataset index), and with
    ``teacher_sharded`` the teacher's forward is a collective every rank takes part in, each step alike."""

    group: dist.ProcessGroup | None = None
    teacher_sharded: bool = False

    def __init__(
        self,
        teacher: nn.Module,
        logits_module: str | None,
        output_fn: Callable,
        features: list[str],
        cache: TeacherCacheConfig | None,
        temperature: float,
        logits: bool = True,
    ):
        self.teacher, self.output_fn, self.features, self.logits = teacher, output_fn, features, logits
        self.target = teacher_target(teacher, None)
        self.logits_name = logits_module
        if logits_module:
            submodule(teacher, logits_module, f"the teacher ({type(teacher).__name__})")
        self.config, self.temperature = cache, temperature
        self.cache = IndexCache()
        self.counts = {"teacher_examples": 0, "teacher_passes": 0, "cache_hits": 0}

    def _hooks(self):
        modules = {f"feat:{n}": self.teacher.get_submodule(n) for n in self.features}
        fns: dict[str, Callable] = {f"feat:{n}": output_tensor for n in self.features}
        if self.logits:
            modules["logits"] = submodule(self.teacher, self.logits_name) if self.logits_name else self.target
            fns["logits"] = self.output_fn
        return capture_outputs(modules, output_fn=fns)

    @torch.no_grad()
    def forward(self, call: Call, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The teacher's logits (and features) on one call, not cached, not counted. The teacher
        moves to ``device`` (the student's) on first use."""
        args, kwargs = call
        if device is not None and device_of(self.teacher, device) != device:
            self.teacher.to(device)
        device = device_of(self.teacher)
        with self._hooks() as out:
            self.target(*move_to(args, device), **move_to(kwargs, device))
        return dict(out)

    def _anyone_runs(self, mine: bool) -> bool:
        """Whether any rank has examples the cache lacks this step (a collective)."""
        anyone = torch.tensor([int(mine)], dtype=torch.int64)
        return bool(sharding.all_reduce(anyone, self.group, dist.ReduceOp.MAX))

    def _run(self, call: Call, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        out = self.forward(call, device)
        self.counts["teacher_passes"] += 1
        self.counts["teacher_examples"] += n
        return out

    def _stored(self, out: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
        dtype = self.config.storage_dtype
        if "logits" in out:
            logits = out.pop("logits")
            if self.config.top_k:
                out |= teacher_topk(logits, self.config.top_k, self.temperature, dtype)
            else:
                out["logits"] = logits.to(dtype)
        out = {f"{k}{suffix}": v for k, v in out.items()}
        for key, value in out.items():
            held = self.cache.values.get(key)
            if held is not None and held.shape[1:] != value.shape[1:]:
                raise ValueError(
                    f"cache_teacher stores {key!r} of shape {tuple(held.shape[1:])} per example, but this "
                    f"batch gives {tuple(value.shape[1:])}: the cache needs one fixed shape per example "
                    "(pad every sequence to one length, e.g. padding='max_length'), or disable it"
                )
        return out

    def outputs(
        self, calls: list[Call], n: int, keys: torch.Tensor | None, device: torch.device
    ) -> list[dict[str, torch.Tensor]]:
        """Teacher outputs for each call (of ``n`` examples) of one step; ``keys`` name the examples
        in the cache (dataset indices or content slots)."""
        if self.config is None:
            return [self._run(call, n, device) for call in calls]
        if keys is None:
            raise BatchFormatError(
                "cache_teacher with key='index' needs each example's dataset index in the batch, e.g. "
                "MNIST1DDataModule(with_index=True) batches (x, y, index), an 'index' key in dict batches, "
                "or pass its index_fn; or use key='content'"
            )
        missing = self.cache.missing(keys)
        self.counts["cache_hits"] += int((~missing).sum()) * len(calls)
        rows = missing.nonzero().squeeze(1)
        # a sharded teacher's forward gathers its blocks from every rank: all run it, or none (agreed first)
        everyone_runs = self.teacher_sharded and self._anyone_runs(bool(len(rows)))
        if len(rows):  # the teacher runs on the examples it has not seen yet, only
            stored: dict[str, torch.Tensor] = {}
            for i, call in enumerate(calls):
                sub = slice_batch(call, rows, size=n) if len(rows) < n else call
                stored |= self._stored(self._run(sub, len(rows), device), f"@{i}" if i else "")
            self.cache.store(keys[rows.to(keys.device)], stored)
        elif everyone_runs:
            for call in calls:  # take part in the others' gathers: one row, its output unused
                self.forward(slice_batch(call, torch.zeros(1, dtype=torch.long), size=n), device)
        if self.group is not None:
            self.cache.share(keys[rows.to(keys.device)].cpu(), self.group)
        looked = self.cache.lookup(keys)
        return _split_calls({k: v.to(device, non_blocking=True) for k, v in looked.items()}, len(calls))
