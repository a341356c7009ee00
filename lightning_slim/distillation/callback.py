"""``KnowledgeDistillation``: the thin Lightning shell around :mod:`.functional` and :mod:`.topk`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_slim import interception, log
from lightning_slim.arguments import as_config, check_choice, check_range
from lightning_slim.batches import BatchFormatError, batch_indices, example_count, sample_batch, slice_batch
from lightning_slim.callback import SlimCallback
from lightning_slim.contract import Capability, Effect, ExportStage
from lightning_slim.distillation import functional as kd
from lightning_slim.distillation import topk
from lightning_slim.distillation.configs import (
    CONVENTIONS,
    DistillationSchedule,
    FeatureDistillation,
    LogitsSource,
    TeacherCacheConfig,
    TokenMask,
)
from lightning_slim.distillation.preflight import (
    build_projections,
    check_models,
    check_shapes,
    kd_mask,
    same_structure,
    sample_student_call,
)
from lightning_slim.distillation.teacher import TeacherRunner, resolve_teacher, teacher_arguments
from lightning_slim.lightning_glue import should_log, train_loader
from lightning_slim.loading import as_callable
from lightning_slim.modules import capture_calls, capture_outputs, forward_target, output_tensor

PROJECTIONS = "slim_distillation_projections"  # the LightningModule attribute holding learned projections
STUDENT_HINT = "set logits={'student_module': ...} to the submodule your training_step calls (e.g. 'model' or 'net')"


class KnowledgeDistillation(SlimCallback):
    """Distil a frozen teacher into the LightningModule being trained, without changing its code.

    Adds Hinton's soft-target loss ``alpha * KL(softmax(t/T) || softmax(s/T)) * T^2`` to the loss the
    module's ``training_step`` returns: ``convention="weighted"`` trains on
    ``(1 - alpha) * loss + alpha * KD``, ``"additive"`` on ``loss + alpha * KD``. The teacher is called
    with exactly the arguments the student's forward got inside ``training_step`` (``input_ids``,
    ``attention_mask``...; not ``labels``); on token logits padding and ``ignore_index`` positions
    are left out (``tokens``).

    Args:
        teacher: the teacher module (kept on this callback, frozen, eval mode, never checkpointed).
        teacher_checkpoint: a checkpoint of the teacher; with ``teacher_class`` (a class path, for
            LightningCLI) it builds the teacher, with ``teacher`` it loads weights into it.
        teacher_init_args: constructor arguments for ``teacher_class`` (extra ones for a LightningModule).
        alpha: KD weight in [0, 1].
        temperature: softmax temperature > 0.
        convention: ``"weighted"`` or ``"additive"`` (above).
        schedule: a :class:`~.configs.DistillationSchedule` (or its dict): the window of steps to
            distil in and the annealing of alpha / temperature.
        features: a :class:`~.configs.FeatureDistillation` (or its dict): feature pairs and their loss.
        logits: a :class:`~.configs.LogitsSource` (or its dict): which student call is repeated on the
            teacher and where the logits are (default: found from the module, see there).
        tokens: a :class:`~.configs.TokenMask` (or its dict): which positions of token logits count.
        input_fn: give the teacher ``input_fn(batch)`` instead of the student's recorded call.
        cache_teacher: True or a :class:`~.configs.TeacherCacheConfig` (or its dict): store the
            teacher's outputs (full logits, or the top-k per token) by example index so the teacher
            runs once per example.
        seed: seeds the projections' initialisation (no global RNG is used).

    >>> from lightning_slim.models import MNIST1DTeacherCNN
    >>> distil = KnowledgeDistillation(teacher=MNIST1DTeacherCNN(), alpha=0.9, temperature=4.0)
    >>> distil.teacher.training, any(p.requires_grad for p in distil.teacher.parameters())
    (False, False)
    """

    technique = "distillation"
    effects = frozenset({Effect.SCALE_LOSS, Effect.ADD_LOSS})
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
    ):
        check_range("alpha", alpha, 0.0, 1.0)
        check_range("temperature", temperature, 0.0, low_open=True)
        check_choice("convention", convention, CONVENTIONS)
        self.schedule = as_config(DistillationSchedule, schedule, "schedule") or DistillationSchedule()
        self.features = as_config(FeatureDistillation, features, "features")
        self.logits = as_config(LogitsSource, logits, "logits") or LogitsSource()
        self.tokens = as_config(TokenMask, tokens, "tokens") or TokenMask()
        if isinstance(cache_teacher, bool):
            cache_teacher = TeacherCacheConfig() if cache_teacher else None
        self.cache_config = as_config(TeacherCacheConfig, cache_teacher, "cache_teacher")
        if alpha == 0 and not self.schedule.alpha_final and self.features is None:
            raise ValueError("alpha=0 with no features distils nothing; set alpha in (0, 1] or features")
        if self.cache_config and self.cache_config.top_k and self.schedule.temperature_final is not None:
            raise ValueError(
                f"cache_teacher top_k={self.cache_config.top_k} stores the teacher's distribution at "
                f"temperature={temperature}; temperature_final={self.schedule.temperature_final} would "
                "need it at every temperature: drop temperature_final or top_k"
            )
        self.teacher = resolve_teacher(teacher, teacher_checkpoint, teacher_class, teacher_init_args)
        self.teacher_checkpoint, self.teacher_class = teacher_checkpoint, teacher_class
        self.alpha, self.temperature, self.convention, self.seed = alpha, temperature, convention, seed
        self.pairs = dict(self.features.pairs) if self.features else {}
        self.output_fn = as_callable(self.logits.output_fn, "output_fn") or output_tensor
        teacher_output_fn = as_callable(self.logits.teacher_output_fn, "teacher_output_fn") or self.output_fn
        self.input_fn = as_callable(input_fn, "input_fn")
        self.index_fn = (
            as_callable(self.cache_config.index_fn, "index_fn") if self.cache_config else None
        ) or batch_indices
        _, teacher_target = forward_target(self.teacher, None, "the teacher")
        self.runner = TeacherRunner(
            self.teacher,
            teacher_target,
            self.logits.teacher_module,
            teacher_output_fn,
            list(self.pairs.values()),
            self.cache_config,
            temperature,
        )
        self.counts = self.runner.counts
        self.counts.update(student_examples=0)
        self.student_path: str | None = None
        self._feature_shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
        self._sample: tuple[tuple, dict] | None = None  # the teacher's call on a sample batch (for its MACs)
        self._positions: list[int] = [0, 0]  # token positions distilled / seen (token logits only)
        self._vocab: int | None = None
        self._stack: contextlib.ExitStack | None = None
        self._student_out: dict[str, Any] = {}  # the student's logits (and features) in this training_step
        self._student_call: dict[str, Any] = {}  # ... and the arguments of its call
        self._task_loss: torch.Tensor | None = None
        self._anneal_stop = self.schedule.stop_step

    @property
    def cache(self):
        """The teacher outputs stored by example index (:class:`~lightning_slim.index_cache.IndexCache`)."""
        return self.runner.cache

    # --- the contract ------------------------------------------------------------------------
    @override
    def provides(self) -> Mapping[Capability, Any]:
        return {Capability.TEACHER: self.teacher}

    @override
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_models(pl_module, self.teacher, self.pairs, self.logits.student_module, self.logits.teacher_module)
        try:
            self.student_path, _ = forward_target(
                pl_module, self.logits.student_module, f"the student ({type(pl_module).__name__})"
            )
        except ValueError as err:
            raise ValueError(f"{err}; {STUDENT_HINT}") from None
        batch = sample_batch(train_loader(trainer))  # collated from the dataset: the loader is not iterated
        if self.cache_config and batch is not None and self.index_fn(batch) is None:
            raise BatchFormatError(
                "cache_teacher needs each example's dataset index in the batch (a sample training "
                "batch has none), e.g. MNIST1DDataModule(with_index=True) batches (x, y, index), an "
                "'index' key in dict batches, or pass its index_fn"
            )
        student = sample_student_call(
            pl_module, self._student_target(pl_module), batch, self.input_fn, lambda: self._capture(pl_module)
        )
        if isinstance(student, str):
            if self.pairs:
                raise ValueError(
                    f"feature pairs need one forward pass before training to size the projections, "
                    f"and it failed: {student}; set example_input_array on the module or fit with a "
                    "map-style dataset"
                )
            rank_zero_warn(
                f"KnowledgeDistillation could not run the student on a sample batch before training "
                f"({student}): output shapes will be checked at the first training step"
            )
            return
        # with input_fn the teacher gets what the student's module was fed (as in training: input_fn(batch))
        self._sample = student["fed"] if self.input_fn is not None else self._teacher_call(student["call"], batch)
        try:
            teacher = self.runner.forward(self._sample)
        except Exception as err:
            raise ValueError(
                f"the teacher ({type(self.runner.target).__name__}) cannot be called the way the student "
                f"was, with keyword arguments {sorted(self._sample[1])} ({type(err).__name__}: {err}); "
                "give a teacher with the student's interface, or input_fn(batch) -> its input"
            ) from err
        self._feature_shapes = check_shapes(student, teacher, self.pairs, self.features.dim if self.features else 1)
        self._vocab = int(teacher["logits"].shape[-1])
        if self.cache_config and self.cache_config.top_k and self.cache_config.top_k >= self._vocab:
            raise ValueError(
                f"cache_teacher top_k={self.cache_config.top_k} is not below the {self._vocab} classes of "
                "the teacher's output: the full-logit cache is smaller; unset top_k"
            )

    def _student_target(self, pl_module) -> nn.Module:
        return pl_module.get_submodule(self.student_path) if self.student_path else pl_module

    def _capture(self, pl_module, when=lambda: True):
        """Record the student's call and logits (and paired features) while the block runs."""
        target = self._student_target(pl_module)
        modules, fns = {"logits": target}, {"logits": self.output_fn}
        for name in self.pairs:
            modules[f"feat:{name}"], fns[f"feat:{name}"] = pl_module.get_submodule(name), output_tensor

        @contextlib.contextmanager
        def both():
            with capture_outputs(modules, when, fns) as out, capture_calls({"call": target}, when) as calls:
                yield out, calls

        return both()

    def _teacher_call(self, call, batch):
        if self.input_fn is not None:
            return (self.input_fn(batch),), {}
        return teacher_arguments(self.runner.target, call)

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
                raise RuntimeError(
                    f"the feature projections (pl_module.{PROJECTIONS}) are in no optimizer: build the "
                    "optimizer from self.parameters() in configure_optimizers so they are trained"
                )
        s, total = self.schedule, trainer.estimated_stepping_batches
        if s.anneal_steps:
            self._anneal_stop = s.start_step + s.anneal_steps
        elif s.stop_step is not None:
            self._anneal_stop = s.stop_step
        elif total != float("inf"):
            self._anneal_stop = int(total)
        elif s.alpha_final is not None or s.temperature_final is not None:
            raise ValueError(
                "alpha_final / temperature_final need anneal_steps or stop_step when training has "
                "no fixed length (max_steps / max_epochs unset)"
            )
        if self.cache_config:
            with contextlib.suppress(TypeError, AttributeError):  # a dataset with no len(): grow as indices arrive
                self.cache.reserve(len(trainer.train_dataloader.dataset))
        self._close()
        self._stack = contextlib.ExitStack()
        self._student_out, self._student_call = self._stack.enter_context(
            self._capture(pl_module, when=interception.InTrainingStep(pl_module))
        )

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._student_out.clear()
        self._student_call.clear()
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
        student = {**self._student_out, **self._student_call}
        self._student_out.clear()
        self._student_call.clear()
        proj = getattr(pl_module, PROJECTIONS, None) if self.pairs else None
        if not active:  # keep the projections in the graph: DDP expects a gradient for each parameter
            return sum(p.sum() * 0 for p in proj.parameters()) if proj is not None else None
        if "logits" not in student or "call" not in student:
            where = f"submodule {self.student_path!r}" if self.student_path else "module's forward"
            raise RuntimeError(
                f"KnowledgeDistillation saw no student output in training_step: the {where} was not "
                f"called inside it; {STUDENT_HINT}"
            )
        s, call = student["logits"], student["call"]
        index = self.index_fn(batch) if self.cache_config else None
        teacher = self.runner.outputs(self._teacher_call(call, batch), len(s), index, s.device)
        cached_topk = "topk_index" in teacher
        t_shape = teacher["topk_index"].shape[:-1] if cached_topk else teacher["logits"].shape
        if (s.shape[:-1] if cached_topk else s.shape) != t_shape:
            raise ValueError(
                f"student output shape {tuple(s.shape)} differs from the teacher's {tuple(t_shape)} on this batch"
            )
        mask = kd_mask(s, batch, call[1], self._student_target(pl_module), self.tokens)
        if cached_topk:
            loss = topk.topk_soft_target_loss(s, teacher, temperature, mask)
        else:
            loss = kd.soft_target_loss(s, teacher["logits"], temperature, mask)
        term = alpha * loss
        values = {"kd_loss": loss, "task_loss": self._task_loss}
        annealed = self.schedule  # an annealed weight is a metric; a constant one is run config (log_config below)
        values |= {"alpha": alpha} if annealed.alpha_final is not None else {}
        values |= {"temperature": temperature} if annealed.temperature_final is not None else {}
        if self.pairs:
            feat = sum(
                kd.feature_loss(proj[str(i)](student[f"feat:{sn}"]), teacher[f"feat:{tn}"], self.features.loss)
                for i, (sn, tn) in enumerate(self.pairs.items())
            )
            term = term + self.features.weight * feat
            values["feature_loss"] = feat
        self.counts["student_examples"] += len(s)
        if mask is not None:
            self._positions[0] += int(mask.sum())
            self._positions[1] += mask.numel()
        if should_log(trainer):  # only on the steps Lightning sends to loggers: logging costs more than the loss
            agree = topk.topk_agreement(s, teacher, mask) if cached_topk else kd.agreement(s, teacher["logits"], mask)
            values |= {"agreement": agree, "teacher_examples": float(self.counts["teacher_examples"])}
            if mask is not None:
                values["token_fraction"] = float(mask.float().mean())
            if self.cache_config:
                values |= {
                    "cache_hit_rate": self.counts["cache_hits"] / max(self.counts["student_examples"], 1),
                    "cache_mb": self.cache.nbytes / 2**20,
                }
            self.log_scalars(pl_module, {k: v for k, v in values.items() if v is not None})
            log.log_config(trainer, self.technique, {"alpha": self.alpha, "temperature": self.temperature})
        return term

    # --- end of fit, state, export, report --------------------------------------------------
    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack, self._student_out, self._student_call = None, {}, {}

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
        from lightning_slim.measure import count_macs, count_parameters, token_count

        rows: dict[str, Any] = {"teacher_params": count_parameters(self.teacher), **self.counts}
        if self._positions[1]:
            rows["token_fraction_distilled"] = self._positions[0] / self._positions[1]
        if self.cache_config:
            rows |= {
                "cache_examples": len(self.cache),
                "cache_bytes": self.cache.nbytes,
                "cache_dtype": str(self.cache_config.storage_dtype).removeprefix("torch."),
            }
            if self.cache_config.top_k:
                rows["cache_top_k"] = self.cache_config.top_k
            stored = self.cache.values.get("topk_index", self.cache.values.get("logits"))
            if stored is not None and self._vocab:  # what full float32 logits of the same examples would take
                rows["cache_bytes_full_logits"] = (
                    len(self.cache) * stored[0].numel() // stored.shape[-1] * self._vocab * 4
                )
        if self._sample is not None:
            one = slice_batch(self._sample, torch.arange(1), size=example_count(self._sample))
            try:
                macs = count_macs(self.runner.target, one)
                rows |= {"teacher_macs_per_example": macs, "teacher_macs_total": macs * self.counts["teacher_examples"]}
                tokens = token_count(one)
                if tokens:
                    rows["teacher_macs_per_token"] = macs / tokens
            except Exception as err:  # a teacher torch-pruning cannot trace still gets its counts reported
                rows["teacher_macs_error"] = f"{type(err).__name__}: {err}"[:200]
        return rows
