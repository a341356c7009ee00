"""``KnowledgeDistillation``: the thin Lightning shell around :mod:`.functional` and :mod:`.topk`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.distributed.fsdp import fully_shard
from typing_extensions import override

from lightning_slim.batches import batch_indices, example_count, sample_batch
from lightning_slim.core import log, sharding
from lightning_slim.core.arguments import config_from
from lightning_slim.core.callback import SlimCallback
from lightning_slim.core.compose import techniques
from lightning_slim.core.contract import Capability, Effect, ExportStage
from lightning_slim.core.lightning_glue import data_parallel_mesh, should_log, train_loader
from lightning_slim.core.loading import as_callable
from lightning_slim.core.step_probe import StepProbeError
from lightning_slim.distillation import functional as kd
from lightning_slim.distillation.cache_keys import CacheKeys
from lightning_slim.distillation.configs import (
    DistillationConfig,
    DistillationSchedule,
    FeatureDistillation,
    LogitsSource,
    TeacherCacheConfig,
    TokenMask,
)
from lightning_slim.distillation.preflight import (
    STUDENT_HINT,
    build_projections,
    check_models,
    check_shapes,
    example_records,
    probe_student,
    same_structure,
)
from lightning_slim.distillation.reporting import distillation_rows, logged_values
from lightning_slim.distillation.teacher import (
    TeacherRunner,
    resolve_teacher,
    shard_teacher,
    teacher_calls,
    teacher_target,
)
from lightning_slim.distillation.term import call_masks, step_term
from lightning_slim.modules import forward_target, output_tensor, submodule

PROJECTIONS = "slim_distillation_projections"  # the LightningModule attribute holding learned projections
SAMPLE_ROWS = 2  # examples in the batch the user's training_step is run on before training


class KnowledgeDistillation(SlimCallback):
    """Distil a frozen teacher into the LightningModule being trained, without changing its code.

    Adds Hinton's soft-target loss ``alpha * KL(softmax(t/T) || softmax(s/T)) * T^2`` to the loss the
    module's ``training_step`` returns: ``convention="weighted"`` trains on
    ``(1 - alpha) * loss + alpha * KD``, ``"additive"`` on ``loss + alpha * KD``. The student's logits
    are the output of the module the user's ``training_step`` calls (found before training by running
    that step once on a sample batch), and the teacher is called with exactly the arguments of that
    call (``input_ids``, ``attention_mask``...; not ``labels``); on token logits padding and
    ``ignore_index`` positions are left out (``tokens``).

    Args: the fields of :class:`~.configs.DistillationConfig` (each is described there): ``teacher``, or
    ``teacher_class`` + ``teacher_checkpoint`` (+ ``teacher_init_args``); ``alpha``, ``temperature``,
    ``convention``; the groups ``schedule``, ``features``, ``logits``, ``tokens``, ``cache_teacher`` (each
    its dataclass or its dict); ``input_fn``, ``seed``, ``teacher_sharding``; or ``config``: a
    ``DistillationConfig`` (or its dict, a ``config:`` mapping in YAML) instead. The teacher is kept on
    this callback (``teacher``), frozen, in eval mode, never checkpointed.

    >>> from lightning_slim.demos.models import MNIST1DTeacherCNN
    >>> distil = KnowledgeDistillation(teacher=MNIST1DTeacherCNN(), alpha=0.9, temperature=4.0)
    >>> distil.teacher.training, any(p.requires_grad for p in distil.teacher.parameters())
    (False, False)
    >>> same = KnowledgeDistillation(config={"teacher": distil.teacher, "alpha": 0.9, "temperature": 4.0})
    >>> same.config == distil.config
    True
    """

    technique = "distillation"
    effects = frozenset({Effect.ADD_MODULES, Effect.WATCH_STEP, Effect.SCALE_LOSS, Effect.ADD_LOSS})
    export_stage = ExportStage.REMOVE_TRAINING_PARTS

    def __init__(
        self,
        teacher: nn.Module | None = None,
        teacher_checkpoint: str | None = None,
        teacher_class: str | None = None,
        teacher_init_args: dict[str, Any] | None = None,
        alpha: float = 0.5,
        temperature: float = 4.0,
        convention: str = "weighted",
        schedule: DistillationSchedule | dict | None = None,
        features: FeatureDistillation | dict | None = None,
        logits: LogitsSource | dict | None = None,
        tokens: TokenMask | dict | None = None,
        input_fn: Callable[[Any], torch.Tensor] | str | None = None,
        cache_teacher: bool | TeacherCacheConfig | dict = False,
        seed: int = 0,
        teacher_sharding: str = "replicate",
        config: DistillationConfig | dict | None = None,
    ):
        self.config: DistillationConfig = config_from(DistillationConfig, config, locals())
        config = self.config
        self.teacher = resolve_teacher(config)
        # the callables a config may name by dotted path, resolved once
        self._read_logits = as_callable(config.logits.output_fn, "output_fn") or output_tensor
        teacher_output_fn = as_callable(config.logits.teacher_output_fn, "teacher_output_fn") or self._read_logits
        self._input_fn = as_callable(config.input_fn, "input_fn")
        cache = config.cache_teacher
        index_fn = (as_callable(cache.index_fn, "index_fn") if cache else None) or batch_indices
        self.cache_keys = CacheKeys(cache.key if cache else "auto", index_fn)
        self.runner = TeacherRunner(
            self.teacher,
            config.logits.teacher_module,
            teacher_output_fn,
            list(config.pairs.values()),
            cache,
            config.temperature,
            logits=config.uses_logits,
        )
        self.counts = self.runner.counts
        self.counts.update(student_examples=0)
        self.student_path: str | None = None
        self._feature_shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
        self._sample: tuple[tuple, dict] | None = None  # the teacher's call on a sample batch (for its MACs)
        self._positions: list[int] = [0, 0]  # token positions distilled / seen (token logits only)
        self._vocab: int | None = None
        self._task_loss: torch.Tensor | None = None
        self._anneal_stop = config.schedule.stop_step
        self._whole_teacher: nn.Module | None = None  # a sharded teacher, gathered on rank 0 after the fit

    def __deepcopy__(self, memo: dict[int, object]) -> KnowledgeDistillation:
        """Itself: a copy of the LightningModule (an export, the report's baseline) reaches this callback through its
        step wrapper; it must not copy the teacher and cache, nor a sharded teacher and process group (it cannot)."""
        return self

    @property
    def cache(self):
        """The teacher outputs stored per example (:class:`~lightning_slim.index_cache.IndexCache`)."""
        return self.runner.cache

    # --- the contract ------------------------------------------------------------------------
    @override
    def sharded_refusal(self, resuming: bool = False) -> str | None:
        cache = self.config.cache_teacher
        if cache is not None and cache.key == "content":
            return (
                "KnowledgeDistillation with cache_teacher key='content' is not supported sharded (its slots are "
                "numbered per rank, the cache is shared across ranks by dataset index); use key='index' or 'auto' "
                "with batches that carry each example's dataset index"
            )
        return None  # logits, features, the cache by index, a replicated or sharded teacher: tests/sharded

    @override
    def provides(self) -> Mapping[Capability, Any]:
        return {Capability.TEACHER: self.measurable_teacher}

    @property
    def measurable_teacher(self) -> nn.Module | None:
        """The teacher as one process can run it: itself, or when sharded its copy gathered for export (rank 0,
        after the fit; None before, and on the other ranks: its forward alone would wait for them)."""
        return self._whole_teacher if self.runner.teacher_sharded else self.teacher

    @override
    def gather_for_export(self) -> None:
        """A sharded teacher, whole on rank 0 (a collective), for the report to measure."""
        if self.runner.teacher_sharded:
            self._whole_teacher = sharding.unsharded_copy(self.teacher)

    @override
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        users = [type(cb).__name__ for cb in techniques(trainer) if Capability.TEACHER in cb.requires()]
        if self.config.teacher_sharding == "shard" and users:
            raise ValueError(
                f"teacher_sharding='shard' makes the teacher's forward a collective of every rank, which {users} "
                "would call on its own; use teacher_sharding='replicate' with them"
            )
        mesh = data_parallel_mesh(trainer.strategy)
        if self.config.teacher_sharding == "shard" and mesh is None:
            raise ValueError(
                f"teacher_sharding='shard' shards the teacher with FSDP2 over ModelParallelStrategy's data-parallel "
                f"mesh, but this Trainer runs {type(trainer.strategy).__name__}; use teacher_sharding='replicate' "
                "(allowed: 'replicate', 'shard')"
            )
        if mesh is not None and self.config.cache_teacher:
            self.cache_keys.require_index(
                "under ModelParallelStrategy the cache is shared across ranks by dataset index (key='content' is "
                "refused sharded): give each example's index, e.g. (x, y, index) batches, an 'index' key, or index_fn"
            )
        logits = self.config.logits
        check_models(pl_module, self.teacher, self.config.pairs, logits.student_module, logits.teacher_module)
        batch = sample_batch(train_loader(trainer), SAMPLE_ROWS)  # from the dataset: the loader is not iterated
        if batch is None:
            records = self._without_sample_batch(pl_module, "no map-style training dataset to take one from")
        else:
            if self.config.cache_teacher:
                self.cache_keys.choose(batch)
            try:
                self.student_path, records = probe_student(
                    pl_module, batch, logits.student_module, self._feature_modules(pl_module), self._output_fn
                )
            except StepProbeError as err:  # the step needs what only a running fit has: check at the first step
                records = self._without_sample_batch(pl_module, f"it raised {err}")
            else:
                self.runner.target = teacher_target(self.teacher, self.student_path)
        if records is None:
            return
        calls = self._teacher_calls(records, batch)
        self._sample = calls[0]
        try:
            teacher = [self.runner.forward(call) for call in calls]
        except Exception as err:
            raise ValueError(
                f"the teacher ({type(self.runner.target).__name__}) cannot be called the way the student "
                f"was, with keyword arguments {sorted(calls[0][1])} ({type(err).__name__}: {err}); "
                "give a teacher with the student's interface, or input_fn(batch) -> its input"
            ) from err
        width = self.config.features.width_dim if self.config.features else 1
        pooling = self.config.features.pooling if self.config.features else "none"
        self._feature_shapes = check_shapes(records[0], teacher[0], self.config.pairs, width, pooling)
        if "logits" in teacher[0]:
            self._vocab = int(teacher[0]["logits"].shape[-1])
        top_k = self.config.cache_teacher.top_k if self.config.cache_teacher else None
        if top_k and self._vocab and top_k >= self._vocab:
            raise ValueError(
                f"cache_teacher top_k={top_k} is not below the {self._vocab} classes of "
                "the teacher's output: the full-logit cache is smaller; unset top_k"
            )

    @property
    def _output_fn(self) -> Callable | None:
        return self._read_logits if self.config.uses_logits else None

    def _feature_modules(self, pl_module) -> dict[str, nn.Module]:
        return {name: pl_module.get_submodule(name) for name in self.config.pairs}

    def _without_sample_batch(self, pl_module, why: str) -> list[dict] | None:
        """No sample batch to run ``training_step`` on: take the module ``forward`` would call, size the
        feature projections from ``example_input_array`` if pairs need it, and say the step's call is
        checked at the first step."""
        owner = f"the student ({type(pl_module).__name__})"
        try:
            self.student_path, _ = forward_target(pl_module, self.config.logits.student_module, owner)
        except ValueError as err:
            raise ValueError(f"{err}; {STUDENT_HINT}") from None
        self.runner.target = teacher_target(self.teacher, self.student_path)
        rank_zero_warn(
            f"KnowledgeDistillation could not run training_step on a sample batch before training ({why}): "
            f"the student's call (of {self.student_path or 'its forward'!r}) is checked at the first training step"
        )
        if not self.config.pairs:
            return None
        return example_records(pl_module, self.student_path, self._feature_modules(pl_module), self._output_fn)

    def _student_target(self, pl_module) -> nn.Module:
        return submodule(pl_module, self.student_path)

    def _teacher_calls(self, records: list[dict], batch) -> list[tuple[tuple, dict]]:
        return teacher_calls(self.runner.target, records, batch, self._input_fn, self.student_path)

    @override
    def add_training_modules(self, trainer, pl_module):
        """The feature projections, before the optimizers are built: they must train them. Under FSDP2 each
        is sharded over the data-parallel mesh: its gradients are averaged across ranks as the student's are."""
        mesh = data_parallel_mesh(trainer.strategy)
        if self.config.pairs:
            proj = build_projections(self._feature_shapes, self.config.features.width_dim, self.config.seed)
            if not same_structure(getattr(pl_module, PROJECTIONS, None), proj):  # a second fit keeps training them
                setattr(pl_module, PROJECTIONS, proj.to(next(pl_module.parameters()).device))
                if mesh is not None:  # each is called on its own (not through the ModuleDict): one FSDP2 unit each
                    for layer in proj.values():
                        if not isinstance(layer, nn.Identity):  # nothing to train where the widths match
                            fully_shard(layer, mesh=mesh)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Under FSDP2, after the checks: the cache is shared across the data-parallel ranks, and with
        ``teacher_sharding="shard"`` the teacher is sharded over them (docs/sharded.md)."""
        super().setup(trainer, pl_module, stage)
        self._whole_teacher = None
        mesh = data_parallel_mesh(trainer.strategy)
        if stage != "fit" or mesh is None:
            return
        self.runner.group = mesh.get_group()
        if self.config.teacher_sharding == "shard":
            shard_teacher(self.teacher, mesh)
            self.runner.teacher_sharded = True

    # --- training ---------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer, pl_module):
        proj = getattr(pl_module, PROJECTIONS, None) if self.config.pairs else None
        if proj is not None:
            in_opt = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
            if any(id(p) not in in_opt for p in proj.parameters()):
                raise RuntimeError(
                    f"the feature projections (pl_module.{PROJECTIONS}) are in no optimizer: build the "
                    "optimizer from self.parameters() in configure_optimizers so they are trained"
                )
        self._anneal_stop = self.config.schedule.anneal_stop(trainer.estimated_stepping_batches)
        if self.config.cache_teacher:
            with contextlib.suppress(TypeError, AttributeError):  # a dataset with no len(): grow as examples arrive
                self.cache.reserve(len(trainer.train_dataloader.dataset))

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.teacher.training:  # whoever switched it: the teacher always runs in eval mode
            self.teacher.eval()

    def weights_at(self, step: int) -> tuple[bool, float, float]:
        """(distilling at this step, alpha, temperature) at optimizer step ``step``."""
        s, c = self.config.schedule, self.config
        active = step >= s.start_step and (s.stop_step is None or step < s.stop_step)
        stop = self._anneal_stop if self._anneal_stop is not None else s.start_step
        alpha = kd.linear_schedule(step, s.start_step, stop, c.alpha, s.alpha_final)
        temperature = kd.linear_schedule(step, s.start_step, stop, c.temperature, s.temperature_final)
        return active, alpha, temperature

    @override
    def scale_loss(self, trainer, pl_module, loss, batch, batch_idx):
        """The weighted convention's ``(1 - alpha) * loss``: scaled here, so its gradient is scaled too."""
        self._task_loss = loss.detach()
        active, alpha, _ = self.weights_at(trainer.global_step)
        return (1 - alpha) * loss if active and self.config.convention == "weighted" and alpha > 0 else loss

    @override
    def watched_modules(self, pl_module):
        """The student's logits module (its calls: the teacher repeats them) and the paired features."""
        return {self.student_path: self._student_target(pl_module)}, self._feature_modules(pl_module)

    @override
    def loss_term(self, trainer, pl_module, batch, batch_idx, seen):
        active, alpha, temperature = self.weights_at(trainer.global_step)
        records = seen.records(self.student_path, self._output_fn)
        proj = getattr(pl_module, PROJECTIONS, None) if self.config.pairs else None
        if not active:  # keep the projections in the graph: DDP expects a gradient for each parameter
            return sum(p.sum() * 0 for p in proj.parameters()) if proj is not None else None
        if not records:
            raise RuntimeError(
                f"KnowledgeDistillation saw no call of {self.student_path or 'the module forward'!r} in "
                f"training_step; {STUDENT_HINT}"
            )
        calls = self._teacher_calls(records, batch)
        n = example_count(calls[0])
        device = next(pl_module.parameters()).device
        teachers = self.runner.outputs(
            calls, n, self.cache_keys(batch, calls, n) if self.config.cache_teacher else None, device
        )
        features = self.config.features
        pooled = f"feat:{next(iter(features.pairs))}" if features and features.pooling != "none" else None
        masks, feature_masks = call_masks(records, batch, self._student_target(pl_module), self.config.tokens, pooled)
        logging = should_log(trainer)  # only on the steps Lightning sends to loggers: logging costs more than the loss
        term = step_term(records, teachers, alpha, temperature, masks, features, proj, feature_masks, logging)
        self.counts["student_examples"] += term.examples
        self._positions = [a + b for a, b in zip(self._positions, term.positions)]
        if logging:
            self.log_scalars(pl_module, logged_values(self, term, alpha, temperature))
            log.log_config(
                trainer, self.technique, {"alpha": self.config.alpha, "temperature": self.config.temperature}
            )
        return term.loss

    # --- state, export, report ---------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"counts": dict(self.counts)}
        if self.config.cache_teacher and self.config.cache_teacher.checkpoint:
            state["cache"] = self.cache.state_dict()
            state |= self.cache_keys.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counts.update(state_dict.get("counts", {}))
        if "cache" in state_dict:
            self.cache.load_state_dict(state_dict["cache"])
            self.cache_keys.load_state_dict(state_dict)

    @staticmethod
    def remove_projections(model: nn.Module) -> nn.Module:
        """Drop the training-only feature projections from a (copy of a) distilled module."""
        if hasattr(model, PROJECTIONS):
            delattr(model, PROJECTIONS)
        return model

    @override
    def export(self, model: nn.Module) -> nn.Module:
        return self.remove_projections(model)

    @override
    def report_rows(self) -> dict[str, Any]:
        return distillation_rows(self)
