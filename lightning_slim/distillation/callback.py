"""``KnowledgeDistillation``: the thin Lightning shell around :mod:`.functional`."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_slim import interception
from lightning_slim.arguments import as_config, check_choice, check_range
from lightning_slim.batches import BatchFormatError, batch_indices, batch_inputs, sample_batch
from lightning_slim.callback import SlimCallback
from lightning_slim.contract import Capability, Effect, ExportStage
from lightning_slim.distillation import functional as kd
from lightning_slim.distillation.configs import (CONVENTIONS, DistillationSchedule, FeatureDistillation, LogitsSource,
                                                 TeacherCacheConfig)
from lightning_slim.distillation.preflight import build_projections, check_models, check_shapes, same_structure
from lightning_slim.distillation.teacher import resolve_teacher
from lightning_slim.index_cache import IndexCache
from lightning_slim.lightning_glue import should_log, train_loader
from lightning_slim.loading import as_callable
from lightning_slim.modules import capture_outputs, device_of, evaluating, output_tensor, submodule

PROJECTIONS = "slim_distillation_projections"  # the LightningModule attribute holding learned projections


class KnowledgeDistillation(SlimCallback):
    """Distil a frozen teacher into the LightningModule being trained, without changing its code.

    Adds Hinton's soft-target loss ``alpha * KL(softmax(t/T) || softmax(s/T)) * T^2`` to the loss the
    module's ``training_step`` returns: ``convention="weighted"`` trains on
    ``(1 - alpha) * loss + alpha * KD``, ``"additive"`` on ``loss + alpha * KD``.

    Args:
        teacher: the teacher module (kept on this callback, frozen, eval mode, never checkpointed).
        teacher_checkpoint: a checkpoint of the teacher; with ``teacher_class`` (a class path, for
            LightningCLI) it builds the teacher, with ``teacher`` it loads weights into it.
        teacher_init_args: constructor arguments for ``teacher_class`` (extra ones for a LightningModule).
        alpha, temperature: KD weight in [0, 1] and softmax temperature > 0.
        convention: ``"weighted"`` or ``"additive"`` (above).
        schedule: a :class:`~.configs.DistillationSchedule` (or its dict): the window of steps to
            distil in and the annealing of alpha / temperature.
        features: a :class:`~.configs.FeatureDistillation` (or its dict): feature pairs and their loss.
        logits: a :class:`~.configs.LogitsSource` (or its dict): where the logits are, when not the
            module's output (a tensor, ``.logits`` or its first tensor).
        input_fn: the teacher's input from a batch (default ``batches.batch_inputs``).
        cache_teacher: True or a :class:`~.configs.TeacherCacheConfig` (or its dict): store the
            teacher's outputs by example index so the teacher runs once per example.
        seed: seeds the projections' initialisation (no global RNG is used).

    >>> from lightning_slim.models import MNIST1DTeacherCNN
    >>> distil = KnowledgeDistillation(teacher=MNIST1DTeacherCNN(), alpha=0.9, temperature=4.0)
    >>> distil.teacher.training, any(p.requires_grad for p in distil.teacher.parameters())
    (False, False)
    """

    technique = "distillation"
    effects = frozenset({Effect.SCALE_LOSS, Effect.ADD_LOSS})
    export_stage = ExportStage.REMOVE_TRAINING_PARTS

    def __init__(self, teacher: nn.Module | None = None, teacher_checkpoint: str | None = None,
                 teacher_class: str | None = None, teacher_init_args: dict[str, Any] | None = None,
                 alpha: float = 0.5, temperature: float = 4.0, convention: str = "weighted",
                 schedule: DistillationSchedule | dict | None = None,
                 features: FeatureDistillation | dict | None = None, logits: LogitsSource | dict | None = None,
                 input_fn: Callable[[Any], torch.Tensor] | str | None = None,
                 cache_teacher: bool | TeacherCacheConfig | dict = False, seed: int = 0):
        check_range("alpha", alpha, 0.0, 1.0)
        check_range("temperature", temperature, 0.0, low_open=True)
        check_choice("convention", convention, CONVENTIONS)
        self.schedule = as_config(DistillationSchedule, schedule, "schedule") or DistillationSchedule()
        self.features = as_config(FeatureDistillation, features, "features")
        self.logits = as_config(LogitsSource, logits, "logits") or LogitsSource()
        if isinstance(cache_teacher, bool):
            cache_teacher = TeacherCacheConfig() if cache_teacher else None
        self.cache_config = as_config(TeacherCacheConfig, cache_teacher, "cache_teacher")
        if alpha == 0 and not self.schedule.alpha_final and self.features is None:
            raise ValueError("alpha=0 with no features distils nothing; set alpha in (0, 1] or features")
        self.teacher = resolve_teacher(teacher, teacher_checkpoint, teacher_class, teacher_init_args)
        self.teacher_checkpoint, self.teacher_class = teacher_checkpoint, teacher_class
        self.alpha, self.temperature, self.convention, self.seed = alpha, temperature, convention, seed
        self.pairs = dict(self.features.pairs) if self.features else {}
        self.output_fn = as_callable(self.logits.output_fn, "output_fn") or output_tensor
        self.teacher_output_fn = as_callable(self.logits.teacher_output_fn, "teacher_output_fn") or self.output_fn
        self.input_fn = as_callable(input_fn, "input_fn") or batch_inputs
        self.index_fn = (as_callable(self.cache_config.index_fn, "index_fn") if self.cache_config else None) \
            or batch_indices
        self.cache = IndexCache()
        self.counts = {"teacher_examples": 0, "teacher_passes": 0, "cache_hits": 0, "student_examples": 0}
        self._feature_shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
        self._sample: torch.Tensor | None = None
        self._stack: contextlib.ExitStack | None = None
        self._student_out: dict[str, torch.Tensor] = {}
        self._task_loss: torch.Tensor | None = None
        self._anneal_stop = self.schedule.stop_step

    # --- the contract ------------------------------------------------------------------------
    @override
    def provides(self) -> Mapping[Capability, Any]:
        return {Capability.TEACHER: self.teacher}

    @override
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_models(pl_module, self.teacher, self.pairs, self.logits.student_module, self.logits.teacher_module)
        self._sample = self._sample_input(trainer, pl_module)
        if self._sample is None:
            if self.pairs:
                raise ValueError("feature pairs need one forward pass before training to size the projections: "
                                 "set example_input_array on the module or fit with a map-style dataset")
            rank_zero_warn("KnowledgeDistillation found no example input (example_input_array or a training "
                           "batch): output shapes will be checked at the first training step")
            return
        student, teacher = self._forward_both(pl_module, self._sample)
        self._feature_shapes = check_shapes(student, teacher, self.pairs, self.features.dim if self.features else 1)

    def _sample_input(self, trainer, pl_module) -> torch.Tensor | None:
        x = getattr(pl_module, "example_input_array", None)
        if isinstance(x, torch.Tensor):
            return x
        batch = sample_batch(train_loader(trainer))  # collated from the dataset: the loader is not iterated
        try:
            return None if batch is None else self.input_fn(batch)
        except (BatchFormatError, AttributeError, TypeError):
            return None

    def _forward_both(self, pl_module, x) -> tuple[dict, dict]:
        """One eval-mode forward of student and teacher (no batch-norm statistics change)."""
        with evaluating(pl_module), self._capture(pl_module, student=True) as out_s:
            pl_module(x.to(pl_module.device))
        with torch.no_grad(), self._capture(self.teacher, student=False) as out_t:
            self.teacher(x.to(device_of(self.teacher, x.device)))
        return out_s, out_t

    def _capture(self, root: nn.Module, student: bool, when=lambda: True):
        logits = self.logits.student_module if student else self.logits.teacher_module
        fns = {"logits": self.output_fn if student else self.teacher_output_fn}
        modules = {"logits": submodule(root, logits)}
        for s_name, t_name in self.pairs.items():
            name = s_name if student else t_name
            modules[f"feat:{name}"], fns[f"feat:{name}"] = root.get_submodule(name), output_tensor
        return capture_outputs(modules, when, fns)

    @override
    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.pairs:  # before the optimizers are built: they must train the projections
            proj = build_projections(self._feature_shapes, self.features.dim, self.seed)
            if not same_structure(getattr(pl_module, PROJECTIONS, None), proj):  # a second fit keeps training them
                setattr(pl_module, PROJECTIONS, proj.to(next(pl_module.parameters()).device))

    # --- training ---------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer, pl_module):
        proj = getattr(pl_module, PROJECTIONS, None) if self.pairs else None
        if proj is not None:
            in_opt = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
            if any(id(p) not in in_opt for p in proj.parameters()):
                raise RuntimeError(f"the feature projections (pl_module.{PROJECTIONS}) are in no optimizer: build the "
                                   "optimizer from self.parameters() in configure_optimizers so they are trained")
        s, total = self.schedule, trainer.estimated_stepping_batches
        if s.anneal_steps:
            self._anneal_stop = s.start_step + s.anneal_steps
        elif s.stop_step is not None:
            self._anneal_stop = s.stop_step
        elif total != float("inf"):
            self._anneal_stop = int(total)
        elif s.alpha_final is not None or s.temperature_final is not None:
            raise ValueError("alpha_final / temperature_final need anneal_steps or stop_step when training has "
                             "no fixed length (max_steps / max_epochs unset)")
        if self.cache_config:
            with contextlib.suppress(TypeError, AttributeError):  # a dataset with no len(): grow as indices arrive
                self.cache.reserve(len(trainer.train_dataloader.dataset))
        self._close()
        self._stack = contextlib.ExitStack()
        self._student_out = self._stack.enter_context(
            self._capture(pl_module, student=True, when=interception.InTrainingStep(pl_module)))

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._student_out.clear()
        if self.teacher.training:  # whoever switched it: the teacher always runs in eval mode
            self.teacher.eval()

    def weights_at(self, step: int) -> tuple[bool, float, float]:
        """(distilling at this step, alpha, temperature) at optimizer step ``step``."""
        s = self.schedule
        active = step >= s.start_step and (s.stop_step is None or step < s.stop_step)
        stop = self._anneal_stop if self._anneal_stop is not None else s.start_step
        alpha = kd.linear_schedule(step, s.start_step, stop, self.alpha, s.alpha_final)
        temperature = kd.linear_schedule(step, s.start_step, stop, self.temperature, s.temperature_final)
        return active, alpha, temperature

    @override
    def scale_loss(self, trainer, pl_module, loss, batch, batch_idx):
        """The weighted convention's ``(1 - alpha) * loss``: scaled here, so its gradient is scaled too."""
        self._task_loss = loss.detach()
        active, alpha, _ = self.weights_at(trainer.global_step)
        return (1 - alpha) * loss if active and self.convention == "weighted" and alpha > 0 else loss

    @override
    def loss_term(self, trainer, pl_module, batch, batch_idx):
        active, alpha, temperature = self.weights_at(trainer.global_step)
        student = dict(self._student_out)
        self._student_out.clear()
        proj = getattr(pl_module, PROJECTIONS, None) if self.pairs else None
        if not active:  # keep the projections in the graph: DDP expects a gradient for each parameter
            return sum(p.sum() * 0 for p in proj.parameters()) if proj is not None else None
        if "logits" not in student:
            where = f"submodule {self.logits.student_module!r}" if self.logits.student_module else "module's forward"
            raise RuntimeError(f"KnowledgeDistillation saw no student output in training_step: the {where} was not "
                               "called inside it; set logits={'student_module': ...} to the submodule that computes "
                               "the logits (e.g. 'net' when training_step calls self.net(x))")
        s = student["logits"]
        teacher = self._teacher_outputs(batch, s.device)
        t = teacher["logits"]
        if s.shape != t.shape:
            raise ValueError(f"student output shape {tuple(s.shape)} differs from the teacher's {tuple(t.shape)} "
                             "on this batch (the teacher's input comes from input_fn(batch))")
        loss = kd.soft_target_loss(s, t, temperature)
        term = alpha * loss
        values = {"kd_loss": loss, "task_loss": self._task_loss, "alpha": alpha, "temperature": temperature}
        if self.pairs:
            feat = sum(kd.feature_loss(proj[str(i)](student[f"feat:{sn}"]), teacher[f"feat:{tn}"], self.features.loss)
                       for i, (sn, tn) in enumerate(self.pairs.items()))
            term = term + self.features.weight * feat
            values["feature_loss"] = feat
        self.counts["student_examples"] += len(s)
        if should_log(trainer):  # only on the steps Lightning sends to loggers: logging costs more than the loss
            values |= {"agreement": kd.agreement(s, t), "teacher_examples": float(self.counts["teacher_examples"])}
            if self.cache_config:
                values |= {"cache_hit_rate": self.counts["cache_hits"] / max(self.counts["student_examples"], 1),
                           "cache_mb": self.cache.nbytes / 2 ** 20}
            self.log_scalars(pl_module, {k: v for k, v in values.items() if v is not None})
        return term

    @torch.no_grad()
    def _teacher_outputs(self, batch, device) -> dict[str, torch.Tensor]:
        index = self.index_fn(batch) if self.cache_config else None
        if self.cache_config and index is None:
            raise BatchFormatError("cache_teacher needs each example's dataset index in the batch, e.g. "
                                   "MNIST1DDataModule(with_index=True) batches (x, y, index); or pass its index_fn")
        x = self.input_fn(batch)
        if index is None:
            return dict(self._run_teacher(x))
        missing = self.cache.missing(index)
        self.counts["cache_hits"] += int((~missing).sum())
        if missing.any():  # the teacher runs on the examples it has not seen yet, only
            rows = missing.nonzero().squeeze(1)
            self.cache.store(index[rows.to(index.device)], self._run_teacher(x[rows.to(x.device)]))
        return {k: v.to(device, non_blocking=True) for k, v in self.cache.lookup(index).items()}

    def _run_teacher(self, x: torch.Tensor):
        if device_of(self.teacher, x.device) != x.device:
            self.teacher.to(x.device)
        with self._capture(self.teacher, student=False) as out:
            self.teacher(x)
        self.counts["teacher_passes"] += 1
        self.counts["teacher_examples"] += len(x)
        return out

    # --- end of fit, state, export, report --------------------------------------------------
    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack, self._student_out = None, {}

    @override
    def on_train_end(self, trainer, pl_module):
        self._close()  # no hooks left on the module the report copies and the user keeps

    @override
    def _leave(self, pl_module) -> None:
        super()._leave(pl_module)
        self._close()

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"counts": dict(self.counts)}
        if self.cache_config and self.cache_config.checkpoint:
            state["cache"] = self.cache.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counts.update(state_dict.get("counts", {}))
        if "cache" in state_dict:
            self.cache.load_state_dict(state_dict["cache"])

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
        from lightning_slim.measure import count_macs, count_parameters

        rows = {"teacher_params": count_parameters(self.teacher), **self.counts}
        if self.cache_config:
            rows |= {"cache_examples": len(self.cache), "cache_bytes": self.cache.nbytes}
        if self._sample is not None:
            try:
                macs = count_macs(self.teacher, self._sample[:1].to(device_of(self.teacher)))
                rows |= {"teacher_macs_per_example": macs, "teacher_macs_total": macs * self.counts["teacher_examples"]}
            except Exception as err:  # a teacher torch-pruning cannot trace still gets its counts reported
                rows["teacher_macs_error"] = f"{type(err).__name__}: {err}"[:200]
        return rows
