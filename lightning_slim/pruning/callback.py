"""IterativeMagnitudePruning: the Lightning shell around ``functional`` (masks, patterns, importance),
``schedules``, ``rewind``, ``structured``, ``slicing`` and ``heads``, and ``curve``. Hooks decide *when*;
the pure functions decide *what*."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_slim.core import log, sharding
from lightning_slim.core.arguments import check_int
from lightning_slim.core.callback import SlimCallback
from lightning_slim.core.clock import Moment
from lightning_slim.core.contract import Effect, ExportStage
from lightning_slim.core.interception import InTrainingStep
from lightning_slim.core.lightning_glue import rebuild_optimizers
from lightning_slim.modules import InputNorms
from lightning_slim.pruning import channel_targets
from lightning_slim.pruning import functional as masking
from lightning_slim.pruning import rewind as rewinding
from lightning_slim.pruning import structured as channels
from lightning_slim.pruning import tensors as tensor_targets
from lightning_slim.pruning.curve import AccuracyCurve
from lightning_slim.pruning.importance import record_inputs
from lightning_slim.pruning.options import (
    PruningCoverageWarning,
    PruningScheduleWarning,
    check_options,
    coverage_warning,
    resolve_pattern,
    sharded_refusal,
    tied_heads_line,
)
from lightning_slim.pruning.schedules import as_dict, parse_schedule, timing

DEFAULT_SCHEDULE = {"kind": "imp", "rounds": 5, "rate": 0.2, "every": 1, "unit": "epoch"}


class IterativeMagnitudePruning(SlimCallback):
    """Pruning on a schedule (magnitude or Wanda importance; unstructured, N:M or channels/heads),
    with rewinding, masks that cost nothing in ``forward``, and state that survives checkpoints.

    Args:
        schedule: when and how much to prune, as data: ``{"kind": "imp", "rounds", "rate" or
            "final_sparsity", "every", "start", "unit": "epoch"|"step"}``, ``{"kind": "gradual",
            "final_sparsity", "initial_sparsity", "start", "end", "every", "unit"}`` (Zhu & Gupta) or
            ``{"kind": "one_shot", "sparsity", "at", "unit"}``. Every kind counts in epochs unless
            ``"unit": "step"``. Sparsities are fractions of the target tensors' weights (of their output
            channels / heads with ``pattern="channels"``).
        targets: what to prune: class names (``"Conv1d"``, ``"torch.nn.Linear"``), module paths
            (``"net.0"``), ``"re:<regex>"`` on paths, or full parameter names
            (``"layers.0.self_attn.in_proj_weight"``). Default: every Linear, Conv, MultiheadAttention
            (``in_proj_weight``) and transformers ``Conv1D`` weight, except a tied output head (an
            ``lm_head`` whose weight is the input embedding: named by its path it is pruned, embedding
            and all); for structural pruning of a transformer, its MLP channels and attention heads.
        exclude: the same kind of specs, removed from ``targets``.
        exclude_classifier: leave the final classifier (the last Linear/Conv layer, or ``classifier``) dense.
            It still counts in the reported sparsity, which is over every target tensor.
        scope: ``"global"`` ranks all target weights together, ``"layer"`` each tensor, ``"row"`` each
            output row. Default: ``"row"`` for Wanda (its comparison group), ``"layer"`` for structural
            pruning of transformers, ``"global"`` otherwise.
        pattern: ``"unstructured"``, ``"N:M"`` semi-structured (``"2:4"``: 2 of every 4 consecutive
            inputs of a row stay; the schedule must end at ``1 - N/M``) or ``"channels"`` (structural,
            a smaller, faster model; transformer blocks are sliced directly, other models traced with
            torch-pruning; use ``strategy="ddp"``, not ``ddp_spawn``).
        structured: the same as ``pattern="channels"``.
        importance: ``"magnitude"`` (``|W|``) or ``"wanda"`` (``|W|`` times the input channel's norm,
            collected by forward hooks over the training steps since the previous pruning event).
        heads: with ``pattern="channels"`` on a transformer, remove whole attention heads as well as MLP
            channels (``False``: MLP channels only).
        rewind: at each pruning event, ``"none"`` (fine-tune), ``"init"`` (lottery ticket),
            ``"step"`` (to ``rewind_step``, Frankle et al. 2020) or ``"lr"`` (learning-rate rewinding,
            Renda et al. 2020, to ``rewind_step``). Weights and optimizer/scheduler state go back together.
        rewind_step: the optimizer step to snapshot for ``"step"`` and ``"lr"``.
        accuracy_metric: logged metric recorded at each round for the accuracy-vs-sparsity curve (warned
            once if it is never logged; None: no accuracy).
        example_input_shape: input shape for torch-pruning's tracing when the module has no
            ``example_input_array`` (structural only); ``example_input_dtype``: ``"auto"`` (int64 token
            ids when the model has an ``nn.Embedding``), ``"float32"`` or ``"int64"``.

    >>> cb = IterativeMagnitudePruning({"kind": "imp", "rounds": 3, "rate": 0.5, "every": 1}, rewind="init")
    >>> cb.events
    [(1, 0.5), (2, 0.75), (3, 0.875)]
    >>> wanda = IterativeMagnitudePruning({"kind": "one_shot", "sparsity": 0.5, "at": 1}, pattern="2:4",
    ...                                   importance="wanda")
    >>> wanda.scope
    'row'
    """

    technique = "pruning"
    effects = frozenset({Effect.AFTER_OPTIMIZER_STEP, Effect.RESTRUCTURE})
    export_stage = ExportStage.FINALIZE_WEIGHTS  # masks made permanent before any quantization

    def __init__(
        self,
        schedule: dict[str, Any] | None = None,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        exclude_classifier: bool = False,
        classifier: str | None = None,
        scope: str | None = None,
        structured: bool = False,
        rewind: str = "none",
        rewind_step: int = 0,
        accuracy_metric: str | None = "val/acc",
        example_input_shape: list[int] | None = None,
        pattern: str | None = None,
        importance: str = "magnitude",
        heads: bool = True,
        example_input_dtype: str = "auto",
    ):
        self.schedule = parse_schedule(DEFAULT_SCHEDULE if schedule is None else schedule)
        self.pattern = resolve_pattern(pattern, structured)
        check_int("rewind_step", rewind_step, minimum=0)
        self.events = self.schedule.events()
        check_options(self.pattern, importance, scope, rewind, rewind_step, self.schedule, self.events)
        self.structured = self.pattern.kind == "channels"
        self.targets, self.exclude = targets, list(exclude or [])
        self.exclude_classifier, self.classifier = exclude_classifier, classifier
        self._scope = scope  # None: resolved per model (structural transformers rank per layer)
        self.scope = scope or ("row" if importance == "wanda" else "global")
        self.importance, self.heads = importance, heads
        self.rewind, self.rewind_step = rewind, rewind_step
        self.accuracy_metric, self.accuracy = accuracy_metric, AccuracyCurve(accuracy_metric)
        self.example_input_shape, self.example_input_dtype = example_input_shape, example_input_dtype
        # state saved in checkpoints
        self.masks: dict[str, torch.Tensor] = {}
        self.events_done = 0
        self.snapshot: dict[str, Any] | None = None
        self.structure: dict | None = None
        self.initial_numel: dict[str, int] = {}
        self.channel_ratio = 0.0
        self.norms = InputNorms()  # Wanda's input statistics since the last event
        self.config_changes: dict[str, Any] = {}
        self._channels: channel_targets.ChannelTargets | None = None  # runtime only from here; what loses channels
        self._counted: dict[str, Any] = {}  # what the sparsity is over (targets, classifier included)
        self._targets: dict[str, tensor_targets.Target] = {}  # what is masked
        self._untouched: dict[str, str] = {}  # weight matrices left dense, and why
        self._tied: dict[str, list[str]] = {}
        self._pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._sparsity: dict[str, float] = {}
        self._hooks: list = []
        self._fallback: set[str] = set()  # Wanda targets scored by magnitude (their module saw no input)
        self._fired = False

    # --- the contract ---------------------------------------------------------------------------------
    @override
    def restructures_until(self) -> Moment | None:
        return Moment(self.schedule.unit, max(t for t, _ in self.events)) if self.structured else None

    @override
    def sharded_refusal(self, resuming: bool = False) -> str | None:
        return sharded_refusal(self.pattern, self.importance, self.rewind if resuming else "none")

    @override
    def before_weights_load(self, pl_module, state: Mapping[str, Any]) -> None:
        # Lightning loads a resumed checkpoint's weights into the model as built: resize it first
        if state.get("structure"):
            channels.restructure(pl_module, state["structure"])

    @override
    def after_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._pairs:  # the guarantee: whatever the optimizer did, pruned weights are exactly zero
            with torch.no_grad():
                torch._foreach_mul_([p for p, _ in self._pairs], [m for _, m in self._pairs])

    # --- validation ----------------------------------------------------------------------------------
    @override
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve(pl_module)
        if self.structured:  # on a fresh fit a copy is pruned to the final ratio and run, before training
            call, fresh = self._structural_call(pl_module), self.structure is None
            if not channel_targets.check(pl_module, self._channels, call, self.events[-1][1], fresh):
                rank_zero_warn(
                    "IterativeMagnitudePruning: this model's config cannot describe the pruned heads (its head "
                    "size is hidden_size / num_attention_heads): reload it with "
                    "lightning_slim.pruning.load_pruned(), not from_pretrained()",
                    category=PruningCoverageWarning,
                )
        elif message := coverage_warning(self._untouched, self._tied):
            rank_zero_warn(message, category=PruningCoverageWarning)
        if not self.structured and (line := tied_heads_line(self._untouched)):
            rank_zero_info(line)
        if not self.initial_numel:
            self.initial_numel = {n: self._numel(pl_module, n) for n in self._counted}

    def _resolve(self, pl_module) -> None:
        if self.structured:
            self._channels = channel_targets.resolve(
                pl_module, self.targets, self.exclude, self.classifier, self.heads, self._scope
            )
            self._counted, self.scope = self._channels.layers, self._channels.scope
            return
        counted = tensor_targets.select_tensors(pl_module, self.targets)
        wanted = self.exclude_classifier
        classifier = channel_targets.classifier_paths(pl_module, counted, self.classifier) if wanted else []
        chosen = masking.resolve_targets(pl_module, self.targets, self.exclude, classifier, self.pattern)
        self._counted, self._targets = chosen.counted, chosen.masked
        self._untouched, self._tied = chosen.untouched, chosen.tied

    def _structural_call(self, pl_module):
        example, shape = getattr(pl_module, "example_input_array", None), self.example_input_shape
        return channel_targets.call(pl_module, self._channels, example, shape, self.example_input_dtype)

    # --- training hooks -------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer, pl_module):
        self._resolve(pl_module)
        if self.importance == "wanda" and not self._hooks:
            self._hooks = record_inputs(self.norms, pl_module, self._targets, InTrainingStep(pl_module))

    @override
    def on_train_start(self, trainer, pl_module):
        self._refresh_masks(pl_module)  # here: ModelParallelStrategy restores callback state after on_fit_start
        masking.apply_masks(self._tensors(pl_module), self.masks)
        self._update_sparsity(pl_module)
        per_epoch = -(-trainer.num_training_batches // trainer.accumulate_grad_batches)
        total = trainer.estimated_stepping_batches
        rewind_step = self.rewind_step if self.rewind != "none" and self.snapshot is None else None
        warning, info = timing(self.schedule, self.events_done, per_epoch, total, trainer.max_epochs, rewind_step)
        if warning:
            rank_zero_warn(warning, category=PruningScheduleWarning)
        if info:
            rank_zero_info(info)

    @override
    def on_train_epoch_start(self, trainer, pl_module):
        self._advance(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._advance(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [(p.grad, m) for p, m in self._pairs if p.grad is not None]
        if grads:  # pruned weights get no gradient, so optimizer state stays zero there
            torch._foreach_mul_([g for g, _ in grads], [m for _, m in grads])

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._fired or batch_idx % max(trainer.log_every_n_steps, 1) == 0:
            self.log_scalars(pl_module, {"round": float(self.round), **self._sparsity})
            self._fired = False

    @override
    def on_train_end(self, trainer, pl_module):
        self._update_sparsity(pl_module)
        self.accuracy.record(trainer, self.round, self._sparsity["sparsity"], final=True)
        self.accuracy.log(trainer)
        log.set_summary(
            trainer, {"slim/pruning/final_sparsity": self._sparsity["sparsity"], "slim/pruning/rounds": self.round}
        )

    @override
    def release(self, pl_module) -> None:  # Wanda's calibration hooks
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # --- pruning events ---------------------------------------------------------------------------
    @property
    def round(self) -> int:
        return self.events_done

    @property
    def curve(self) -> list[list]:
        """``[round, sparsity, accuracy or None, step]`` at each round boundary and at the end of training."""
        return self.accuracy.rows

    def _advance(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if self.rewind != "none" and self.snapshot is None and step >= self.rewind_step:
            schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
            self.snapshot = rewinding.take_snapshot(self.rewind, pl_module, trainer.optimizers, schedulers)
            self.snapshot["step"] = step
        position = trainer.current_epoch if self.schedule.unit == "epoch" else step
        due = [e for e in self.events[self.events_done :] if e[0] <= position]
        if due:
            self._prune(trainer, pl_module, due[-1][1])
            self.events_done += len(due)
            self._update_sparsity(pl_module)
            self._fired = True
            sparsity = self._sparsity["sparsity"]
            rank_zero_info(f"IterativeMagnitudePruning: round {self.round} at step {step}: sparsity {sparsity:.4f}")

    def _prune(self, trainer, pl_module, target: float) -> None:
        self._update_sparsity(pl_module)
        self.accuracy.record(trainer, self.round, self._sparsity["sparsity"])
        if self.structured:
            return self._prune_channels(trainer, pl_module, target)
        fallback: list[str] = []
        how = dict(pattern=self.pattern, importance=self.importance, scope=self.scope, stats=self.norms)
        masks = masking.compute_masks(
            pl_module, self._targets, target, previous=self.masks or None, fallback=fallback, **how
        )
        if set(fallback) - self._fallback:
            self._fallback.update(fallback)
            rank_zero_warn(coverage_warning({}, {}, sorted(fallback)), category=PruningCoverageWarning)
        self.norms.reset()  # the next event scores by the inputs seen after this one
        if trainer.world_size > 1 and not sharding.any_sharded(masks.values()):  # DDP: rank 0's masks for all
            masks = trainer.strategy.broadcast({k: v.cpu() for k, v in masks.items()}, src=0)
        self.masks = masks
        self._rewind(trainer, pl_module)
        self._refresh_masks(pl_module)
        masking.apply_masks(self._tensors(pl_module), self.masks)
        for opt in trainer.optimizers:
            masking.mask_optimizer_state(opt, self._pairs)

    def _prune_channels(self, trainer, pl_module, target: float) -> None:
        relative = 1.0 - (1.0 - target) / (1.0 - self.channel_ratio)
        self.config_changes.update(channel_targets.prune(pl_module, self._structural_call(pl_module), relative))
        self.channel_ratio, self.structure = target, channels.structure_of(pl_module)
        rebuild_optimizers(trainer, pl_module)
        self._rewind(trainer, pl_module)  # "lr" only here: the schedule goes back, the weights stay

    def _rewind(self, trainer, pl_module) -> None:
        if self.snapshot is not None:
            schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
            rewinding.restore(self.rewind, self.snapshot, pl_module, trainer.optimizers, schedulers)

    # --- helpers ----------------------------------------------------------------------------------
    def _tensors(self, pl_module) -> dict[str, torch.Tensor]:
        return {n: tensor_targets.tensor_of(pl_module, t) for n, t in self._targets.items()}

    def _numel(self, pl_module, name: str) -> int:
        item = self._counted[name]
        return (item.weight if self.structured else tensor_targets.tensor_of(pl_module, item)).numel()

    def _refresh_masks(self, pl_module) -> None:
        tensors = self._tensors(pl_module)
        self.masks = {k: sharding.place_like(v.to(tensors[k].device), tensors[k]) for k, v in self.masks.items()}
        self._pairs = [(tensors[n], m.to(tensors[n].dtype)) for n, m in self.masks.items()]

    def _update_sparsity(self, pl_module) -> None:
        initial = self.initial_numel if self.structured else None
        self._sparsity = masking.sparsity_rows(pl_module, self._counted, initial)

    # --- export, report, state ----------------------------------------------------------------------
    @torch.no_grad()
    @override
    def export(self, model: torch.nn.Module) -> torch.nn.Module:
        for name, mask in self.masks.items():  # plain tensors: zeros where pruned, nothing attached
            tensor = tensor_targets.tensor_of(model, self._targets[name])
            tensor.mul_(mask.to(tensor.device, tensor.dtype))
        if self.pattern.kind == "N:M":  # on a CUDA fp16/bf16 model only (untested here: no GPU)
            masking.to_semi_structured(model, [t.module for t in self._targets.values()], self.pattern)
        return model

    @override
    def report_rows(self) -> dict[str, Any]:
        rows: dict[str, Any] = {
            "mode": "structured" if self.structured else "unstructured",
            "pattern": str(self.pattern),
            "importance": self.importance,
            "rounds": self.round,
            "scope": self.scope,
            "rewind": self.rewind,
            "sparsity_over": f"{len(self._counted)} target tensors",
        }
        if not self.structured:
            rows.update(untouched=dict(self._untouched), tied=dict(self._tied))
            if self._fallback:
                rows["magnitude_fallback"] = sorted(self._fallback)
        else:
            rows["config"] = dict(self.config_changes)
        rows.update(self._sparsity)
        return rows

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {k: sharding.full(v).detach().cpu() for k, v in self.masks.items()},  # FSDP2: gathered
            "events_done": self.events_done,
            "snapshot": self.snapshot,
            "curve": self.accuracy.rows,
            "structure": self.structure,
            "initial_numel": self.initial_numel,
            "channel_ratio": self.channel_ratio,
            "schedule": as_dict(self.schedule),
            "norms": self.norms.state_dict(),
            "config_changes": self.config_changes,
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.masks = dict(state_dict["masks"])
        self.events_done, self.snapshot = state_dict["events_done"], state_dict["snapshot"]
        self.accuracy.rows = [list(r) for r in state_dict["curve"]]
        self.structure, self.channel_ratio = state_dict["structure"], state_dict["channel_ratio"]
        self.initial_numel = dict(state_dict["initial_numel"])
        if "norms" in state_dict:  # checkpoints from before Wanda have none
            self.norms.load_state_dict(state_dict["norms"])
        self.config_changes = dict(state_dict.get("config_changes", {}))
