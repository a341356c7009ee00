"""``KnowledgeDistillation``: the thin Lightning shell around :mod:`.functional`."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_slim import interception
from lightning_slim.batches import BatchFormatError, batch_indices, batch_inputs
from lightning_slim.callback import SlimCallback
from lightning_slim.distillation import functional as F
from lightning_slim.distillation.arguments import check_arguments, resolve_teacher
from lightning_slim.distillation.model_checks import build_projections, check_models, check_shapes, same_structure

PROJECTIONS = "slim_distillation_projections"  # the LightningModule attribute holding learned projections


class KnowledgeDistillation(SlimCallback):
    """Distil a frozen teacher into the LightningModule being trained, without changing its code.

    Adds Hinton's soft-target loss ``alpha * KL(softmax(t/T) || softmax(s/T)) * T^2`` to the loss the
    module's ``training_step`` returns: ``convention="weighted"`` trains on
    ``(1 - alpha) * loss + alpha * KD``, ``"additive"`` on ``loss + alpha * KD``. ``feature_pairs``
    adds ``feature_weight * loss(proj(student feature), teacher feature)`` per pair.

    Args:
        teacher: the teacher module (kept on this callback, frozen, eval mode, never checkpointed).
        teacher_checkpoint: a checkpoint of the teacher; with ``teacher_class`` (a class path, for
            LightningCLI) it builds the teacher, with ``teacher`` it loads weights into it.
        teacher_init_args: constructor arguments for ``teacher_class`` (extra ones for a LightningModule).
        alpha, temperature: KD weight in [0, 1] and softmax temperature > 0.
        alpha_final, temperature_final: anneal linearly to these over ``anneal_steps`` optimizer
            steps from ``start_step`` (default: to ``stop_step`` or the end of training).
        start_step, stop_step: distil only for ``start_step <= trainer.global_step < stop_step``.
        feature_pairs: ``{student module name: teacher module name}``; a learned projection (a
            submodule of the student, in its optimizer and checkpoint; removed by ``export``) maps
            the student's width (dimension ``feature_dim``) to the teacher's when they differ.
        feature_loss: ``"mse"`` or ``"cosine"``; feature_weight: its weight.
        student_logits_module / teacher_logits_module: a submodule whose output is the logits
            (default: the module itself). output_fn / teacher_output_fn: map that output to logits.
        input_fn: the teacher's input from a batch (default ``batches.batch_inputs``).
        cache_teacher: store teacher outputs by example index (``index_fn``, default
            ``batches.batch_indices``) so the teacher runs once per example. Needs a
            deterministic input per index (no random augmentation). checkpoint_cache: save the
            cache in checkpoints (exact resume); False rebuilds it after a resume.
        seed: seeds the projections' initialisation (no global RNG is used).

    >>> from lightning_slim.models import MNIST1DTeacherCNN
    >>> kd = KnowledgeDistillation(teacher=MNIST1DTeacherCNN(), alpha=0.9, temperature=4.0)
    >>> kd.teacher.training, any(p.requires_grad for p in kd.teacher.parameters())
    (False, False)
    """

    technique = "distillation"
    step_order = interception.ORDER_LOSS

    def __init__(self, teacher: nn.Module | None = None, teacher_checkpoint: str | None = None,
                 teacher_class: str | None = None, teacher_init_args: dict[str, Any] | None = None,
                 alpha: float = 0.5, temperature: float = 4.0, convention: str = "weighted",
                 alpha_final: float | None = None, temperature_final: float | None = None,
                 anneal_steps: int | None = None, start_step: int = 0, stop_step: int | None = None,
                 feature_pairs: dict[str, str] | None = None, feature_loss: str = "mse",
                 feature_weight: float = 1.0, feature_dim: int = 1,
                 student_logits_module: str | None = None, teacher_logits_module: str | None = None,
                 output_fn: Callable[[Any], torch.Tensor] | None = None,
                 teacher_output_fn: Callable[[Any], torch.Tensor] | None = None,
                 input_fn: Callable[[Any], torch.Tensor] | None = None,
                 index_fn: Callable[[Any], torch.Tensor | None] | None = None,
                 cache_teacher: bool = False, checkpoint_cache: bool = True, seed: int = 0):
        check_arguments(alpha=alpha, alpha_final=alpha_final, temperature=temperature,
                        temperature_final=temperature_final, feature_weight=feature_weight, start_step=start_step,
                        stop_step=stop_step, anneal_steps=anneal_steps, convention=convention,
                        feature_loss=feature_loss, feature_pairs=feature_pairs)
        self.teacher = resolve_teacher(teacher, teacher_checkpoint, teacher_class, teacher_init_args)
        self.teacher_checkpoint, self.teacher_class = teacher_checkpoint, teacher_class
        self.alpha, self.temperature, self.convention = alpha, temperature, convention
        self.alpha_final, self.temperature_final, self.anneal_steps = alpha_final, temperature_final, anneal_steps
        self.start_step, self.stop_step = start_step, stop_step
        self.feature_pairs = dict(feature_pairs or {})
        self.feature_loss, self.feature_weight, self.feature_dim = feature_loss, feature_weight, feature_dim
        self.student_logits_module, self.teacher_logits_module = student_logits_module, teacher_logits_module
        self.output_fn = output_fn or F.default_output
        self.teacher_output_fn = teacher_output_fn or self.output_fn
        self.input_fn, self.index_fn = input_fn or batch_inputs, index_fn or batch_indices
        self.cache_teacher, self.checkpoint_cache, self.seed = cache_teacher, checkpoint_cache, seed
        self.cache = F.TeacherCache()
        self.counts = {"teacher_examples": 0, "teacher_passes": 0, "cache_hits": 0, "student_examples": 0}
        self._feature_shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
        self._sample: torch.Tensor | None = None
        self._stack: contextlib.ExitStack | None = None
        self._student_out: dict[str, torch.Tensor] = {}
        self._task_loss: torch.Tensor | None = None
        self._anneal_stop = stop_step

    # --- setup: validate, then add projections before the optimizers are built ---------------
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_models(pl_module, self.teacher, self.feature_pairs, self.student_logits_module,
                     self.teacher_logits_module)
        self._sample = self._sample_input(trainer, pl_module)
        if self._sample is None:
            if self.feature_pairs:
                raise ValueError("feature_pairs need one forward pass before training to size the projections: "
                                 "set example_input_array on the module or fit with a datamodule")
            rank_zero_warn("KnowledgeDistillation found no example input (example_input_array or a training "
                           "batch): output shapes will be checked at the first training step")
            return
        student, teacher = self._forward_both(pl_module, self._sample)
        self._feature_shapes = check_shapes(student, teacher, self.feature_pairs, self.feature_dim)

    def _sample_input(self, trainer, pl_module) -> torch.Tensor | None:
        x = getattr(pl_module, "example_input_array", None)
        if isinstance(x, torch.Tensor):
            return x
        try:  # the first training batch, through the user's input extractor
            return self.input_fn(next(iter(trainer.fit_loop._data_source.dataloader())))
        except (BatchFormatError, AttributeError, TypeError, StopIteration, NotImplementedError):
            return None

    @torch.no_grad()
    def _forward_both(self, pl_module, x) -> tuple[dict, dict]:
        """One eval-mode forward of student and teacher (no batch-norm statistics change)."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            with self._capture(pl_module, student=True) as out_s:
                pl_module(x.to(pl_module.device))
            with self._capture(self.teacher, student=False) as out_t:
                self.teacher(x.to(_device(self.teacher, x.device)))
        finally:
            pl_module.train(was_training)
        return out_s, out_t

    def _capture(self, root: nn.Module, student: bool, when=lambda: True):
        logits = self.student_logits_module if student else self.teacher_logits_module
        fns = {"logits": self.output_fn if student else self.teacher_output_fn}
        modules = {"logits": F.get_submodule(root, logits or "", "")}
        for s_name, t_name in self.feature_pairs.items():
            name = s_name if student else t_name
            modules[f"feat:{name}"], fns[f"feat:{name}"] = root.get_submodule(name), F.default_output
        return F.capture_outputs(modules, when, fns)

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.feature_pairs:
            self._add_projections(pl_module)

    def _add_projections(self, pl_module) -> None:
        proj = build_projections(self._feature_shapes, self.feature_dim, self.seed)
        if not same_structure(getattr(pl_module, PROJECTIONS, None), proj):  # a second fit keeps training them
            setattr(pl_module, PROJECTIONS, proj.to(next(pl_module.parameters()).device))

    # --- training ---------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        proj = getattr(pl_module, PROJECTIONS, None) if self.feature_pairs else None
        if proj is not None:
            in_opt = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
            if any(id(p) not in in_opt for p in proj.parameters()):
                raise RuntimeError(f"the feature projections (pl_module.{PROJECTIONS}) are in no optimizer: build the "
                                   "optimizer from self.parameters() in configure_optimizers so they are trained")
        total = trainer.estimated_stepping_batches
        if self.anneal_steps:
            self._anneal_stop = self.start_step + self.anneal_steps
        elif self.stop_step is not None:
            self._anneal_stop = self.stop_step
        elif total != float("inf"):
            self._anneal_stop = int(total)
        elif self.alpha_final is not None or self.temperature_final is not None:
            raise ValueError("alpha_final / temperature_final need anneal_steps or stop_step when training has "
                             "no fixed length (max_steps / max_epochs unset)")
        if self.cache_teacher:
            with contextlib.suppress(TypeError, AttributeError):  # a dataset with no len(): grow as indices arrive
                self.cache.reserve(len(trainer.train_dataloader.dataset))
        self._close()
        self._stack = contextlib.ExitStack()
        when = _InStep(pl_module)
        self._student_out = self._stack.enter_context(self._capture(pl_module, student=True, when=when))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._student_out.clear()
        if self.teacher.training:  # whoever switched it: the teacher always runs in eval mode
            self.teacher.eval()

    def schedule(self, step: int) -> tuple[bool, float, float]:
        """(distilling at this step, alpha, temperature) at optimizer step ``step``."""
        active = step >= self.start_step and (self.stop_step is None or step < self.stop_step)
        stop = self._anneal_stop if self._anneal_stop is not None else self.start_step
        alpha = F.linear_schedule(step, self.start_step, stop, self.alpha, self.alpha_final)
        temperature = F.linear_schedule(step, self.start_step, stop, self.temperature, self.temperature_final)
        return active, alpha, temperature

    def transform_loss(self, trainer, pl_module, loss, batch, batch_idx):
        """The weighted convention's ``(1 - alpha) * loss``: scaled here, so its gradient is scaled too."""
        self._task_loss = loss.detach()
        active, alpha, _ = self.schedule(trainer.global_step)
        return (1 - alpha) * loss if active and self.convention == "weighted" and alpha > 0 else loss

    def extra_loss(self, trainer, pl_module, batch, batch_idx):
        active, alpha, temperature = self.schedule(trainer.global_step)
        student = dict(self._student_out)
        self._student_out.clear()
        proj = getattr(pl_module, PROJECTIONS, None) if self.feature_pairs else None
        if not active:  # keep the projections in the graph: DDP expects a gradient for each parameter
            return sum(p.sum() * 0 for p in proj.parameters()) if proj is not None else None
        if "logits" not in student:
            where = f"submodule {self.student_logits_module!r}" if self.student_logits_module else "module's forward"
            raise RuntimeError(f"KnowledgeDistillation saw no student output in training_step: the {where} was not "
                               "called inside it; set student_logits_module to the submodule that computes the "
                               "logits (e.g. 'net' when training_step calls self.net(x))")
        s = student["logits"]
        teacher = self._teacher_outputs(batch, s.device)
        t = teacher["logits"]
        if s.shape != t.shape:
            raise ValueError(f"student output shape {tuple(s.shape)} differs from the teacher's {tuple(t.shape)} "
                             "on this batch (the teacher's input comes from input_fn(batch))")
        kd = F.soft_target_loss(s, t, temperature)
        term = alpha * kd
        values = {"kd_loss": kd, "task_loss": self._task_loss, "alpha": alpha, "temperature": temperature}
        if self.feature_pairs:
            feat = sum(F.feature_loss(proj[str(i)](student[f"feat:{sn}"]), teacher[f"feat:{tn}"], self.feature_loss)
                       for i, (sn, tn) in enumerate(self.feature_pairs.items()))
            term = term + self.feature_weight * feat
            values["feature_loss"] = feat
        self.counts["student_examples"] += len(s)
        if _should_log(trainer):  # only on the steps Lightning sends to loggers: logging costs more than the loss
            values |= {"agreement": F.agreement(s, t), "teacher_examples": float(self.counts["teacher_examples"])}
            if self.cache_teacher:
                values |= {"cache_hit_rate": self.counts["cache_hits"] / max(self.counts["student_examples"], 1),
                           "cache_mb": self.cache.nbytes / 2 ** 20}
            self.log_scalars(pl_module, {k: v for k, v in values.items() if v is not None})
        return term

    @torch.no_grad()
    def _teacher_outputs(self, batch, device) -> dict[str, torch.Tensor]:
        index = self.index_fn(batch) if self.cache_teacher else None
        if self.cache_teacher and index is None:
            raise BatchFormatError("cache_teacher=True needs each example's dataset index in the batch, e.g. "
                                   "MNIST1DDataModule(with_index=True) batches (x, y, index); or pass index_fn")
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
        if _device(self.teacher, x.device) != x.device:
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

    def on_train_end(self, trainer, pl_module):
        self._close()  # no hooks left on the module the report copies and the user keeps

    def on_exception(self, trainer, pl_module, exception):
        super().on_exception(trainer, pl_module, exception)
        self._close()

    def teardown(self, trainer, pl_module, stage):
        super().teardown(trainer, pl_module, stage)
        self._close()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"counts": dict(self.counts)}
        if self.cache_teacher and self.checkpoint_cache:
            state["cache"] = self.cache.state_dict()
        return state

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

    def export(self, model: nn.Module) -> nn.Module:
        return self.remove_projections(model)

    def report_rows(self) -> dict[str, Any]:
        from lightning_slim.measure import count_macs, count_parameters

        rows = {"teacher_params": count_parameters(self.teacher), **{k: v for k, v in self.counts.items()}}
        if self.cache_teacher:
            rows |= {"cache_examples": len(self.cache), "cache_bytes": self.cache.nbytes}
        if self._sample is not None:
            try:
                macs = count_macs(self.teacher, self._sample[:1].to(_device(self.teacher)))
                rows |= {"teacher_macs_per_example": macs, "teacher_macs_total": macs * self.counts["teacher_examples"]}
            except Exception as err:  # a teacher torch-pruning cannot trace still gets its counts reported
                rows["teacher_macs_error"] = f"{type(err).__name__}: {err}"[:200]
        return rows


def _device(module: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device(default)


def _should_log(trainer) -> bool:
    try:  # Lightning's own decision (log_every_n_steps), so the values logged are the ones loggers receive
        return bool(trainer._logger_connector.should_update_logs)
    except AttributeError:
        return True


class _InStep:
    """Forward hooks record the student only inside the user's training_step (not validation)."""

    def __init__(self, pl_module):
        self.pl_module = pl_module

    def __call__(self) -> bool:
        return interception.in_training_step(self.pl_module)
