"""IterativeMagnitudePruning: the Lightning shell around ``functional`` (masks, patterns, importance),
``schedules``, ``rewind``, ``structured``, ``slicing`` and ``heads``, and ``curve``. Hooks decide *when*;
the pure functions decide *what*; :class:`~.configs.PruningConfig` holds the options."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_slim.core import log, sharding
from lightning_slim.core.arguments import config_from
from lightning_slim.core.callback import SlimCallback
from lightning_slim.core.clock import Moment, now
from lightning_slim.core.contract import Effect, ExportStage
from lightning_slim.core.interception import InTrainingStep
from lightning_slim.pruning import channel_targets
from lightning_slim.pruning.configs import PruningConfig
from lightning_slim.pruning.curve import AccuracyCurve
from lightning_slim.pruning.functional import (
    apply_masks,
    compute_masks,
    mask_optimizer_state,
    resolve_targets,
    sparsity_rows,
    to_semi_structured,
)
from lightning_slim.pruning.importance import record_inputs
from lightning_slim.pruning.norms import InputNorms
from lightning_slim.pruning.options import (
    PruningCoverageWarning,
    PruningScheduleWarning,
    coverage_warning,
    sharded_refusal,
    tied_heads_line,
)
from lightning_slim.pruning.rewind import gathered, placed, restore, take_snapshot
from lightning_slim.pruning.schedules import as_dict, timing
from lightning_slim.pruning.structured import restructure, structure_of
from lightning_slim.pruning.tensors import Target, select_tensors, tensor_of


class IterativeMagnitudePruning(SlimCallback):
    """Pruning on a schedule (magnitude or Wanda importance; unstructured, N:M or channels/heads),
    with rewinding, masks that cost nothing in ``forward``, and state that survives checkpoints.

    Args: the fields of :class:`~.configs.PruningConfig` (each is described there): ``schedule``,
    ``targets``, ``exclude``, ``exclude_classifier``, ``classifier``, ``scope``, ``rewind``,
    ``rewind_step``, ``accuracy_metric``, ``example_input_shape``, ``pattern``, ``importance``, ``heads``,
    ``example_input_dtype``; or ``config``: a ``PruningConfig`` (or its dict) instead of them.
    ``structured=True`` is deprecated: it is ``pattern="channels"`` (and warns).

    Every pruning event runs through the contract (``Effect.RESTRUCTURE_MID_FIT``, at a batch's start);
    after channels go, the shared machinery rebuilds the optimizers.

    >>> cb = IterativeMagnitudePruning({"kind": "imp", "rounds": 3, "rate": 0.5, "every": 1}, rewind="init")
    >>> cb.events
    [(1, 0.5), (2, 0.75), (3, 0.875)]
    >>> wanda = IterativeMagnitudePruning({"kind": "one_shot", "sparsity": 0.5, "at": 1}, pattern="2:4",
    ...                                   importance="wanda")
    >>> wanda.scope
    'row'
    >>> IterativeMagnitudePruning(config=PruningConfig(pattern="channels")).config.structured
    True
    """

    technique = "pruning"
    effects = frozenset({Effect.AFTER_OPTIMIZER_STEP, Effect.RESTRUCTURE, Effect.RESTRUCTURE_MID_FIT})
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
        config: PruningConfig | dict | None = None,
    ):
        if structured:
            if pattern not in (None, "channels"):
                raise ValueError(f"structured=True removes channels; it cannot be combined with pattern={pattern!r}")
            warnings.warn(
                "IterativeMagnitudePruning(structured=True) is deprecated: use pattern='channels' (the same thing)",
                FutureWarning,
                stacklevel=2,
            )
            pattern = "channels"
        pattern = pattern or "unstructured"
        self.config: PruningConfig = config_from(PruningConfig, config, locals())
        self.schedule, self.events, self.pattern = self.config.schedule, self.config.events, self.config.parsed_pattern
        # None: resolved per model (structural transformers rank per layer)
        self.scope = self.config.scope or ("row" if self.config.importance == "wanda" else "global")
        self.accuracy = AccuracyCurve(self.config.accuracy_metric)
        # state saved in checkpoints
        self.masks: dict[str, torch.Tensor] = {}
        self.events_done = 0
        self.snapshot: dict[str, Any] | None = None
        self.structure: dict | None = None
        self.initial_numel: dict[str, int] = {}
        self.channel_ratio = 0.0
        self.norms = InputNorms()  # Wanda's input statistics since the last event
        self._norms_group, self._saved_norms = None, None  # FSDP2: per rank, every rank's in checkpoints
        self.config_changes: dict[str, Any] = {}
        self._channels: channel_targets.ChannelTargets | None = None  # runtime only from here; what loses channels
        self._counted: dict[str, Any] = {}  # what the sparsity is over (targets, classifier included)
        self._targets: dict[str, Target] = {}  # what is masked
        self._untouched: dict[str, str] = {}  # weight matrices left dense, and why
        self._tied: dict[str, list[str]] = {}
        self._pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._sparsity: dict[str, float] = {}
        self._hooks: list = []
        self._whole_masks: dict[str, torch.Tensor] = {}  # FSDP2: the masks every rank gathered for export
        self._fallback: set[str] = set()  # Wanda targets scored by magnitude (their module saw no input)
        self._fired, self._training = False, False  # _training: between on_train_start and release

    @property
    def structured(self) -> bool:
        """Structural pruning (``pattern="channels"``), derived from the config's pattern."""
        return self.config.structured

    # --- the contract ---------------------------------------------------------------------------------
    @override
    def restructures_until(self) -> Moment | None:
        return Moment(self.schedule.unit, max(t for t, _ in self.events)) if self.structured else None

    @override
    def sharded_refusal(self, resuming: bool = False) -> str | None:
        return sharded_refusal(self.pattern)

    @override
    def before_weights_load(self, pl_module, state: Mapping[str, Any]) -> None:
        # Lightning loads a resumed checkpoint's weights into the model as built: resize it first
        if state.get("structure"):
            restructure(pl_module, state["structure"])

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
        config, exclude = self.config, list(self.config.exclude or [])
        if self.structured:
            self._channels = channel_targets.resolve(
                pl_module, config.targets, exclude, config.classifier, config.heads, config.scope
            )
            self._counted, self.scope = self._channels.layers, self._channels.scope
            return
        counted = select_tensors(pl_module, config.targets)
        wanted = config.exclude_classifier
        classifier = channel_targets.classifier_paths(pl_module, counted, config.classifier) if wanted else []
        chosen = resolve_targets(pl_module, config.targets, exclude, classifier, self.pattern)
        self._counted, self._targets = chosen.counted, chosen.masked
        self._untouched, self._tied = chosen.untouched, chosen.tied

    def _structural_call(self, pl_module):
        example, shape = getattr(pl_module, "example_input_array", None), self.config.example_input_shape
        return channel_targets.call(pl_module, self._channels, example, shape, self.config.example_input_dtype)

    # --- training hooks -------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer, pl_module):
        self._resolve(pl_module)
        if self.config.importance == "wanda" and not self._hooks:
            self._hooks = record_inputs(self.norms, pl_module, self._targets, InTrainingStep(pl_module))
            self._norms_group = sharding.row_group(self._tensors(pl_module))

    @override
    def on_train_start(self, trainer, pl_module):
        self._training = True
        self._refresh_masks(pl_module)  # here: ModelParallelStrategy restores callback state after on_fit_start
        if self.snapshot is not None:  # resumed under FSDP2: each rank keeps its block of the rewind state
            self.snapshot = placed(self.snapshot, pl_module, trainer.optimizers)
        apply_masks(self._tensors(pl_module), self.masks)
        if self._saved_norms is not None:  # resumed: this rank's (FSDP2) or every rank's added up
            self.norms.load_state_dict(self._saved_norms, self._norms_group)
            self._saved_norms = None
        self._update_sparsity(pl_module)
        per_epoch = -(-trainer.num_training_batches // trainer.accumulate_grad_batches)
        total = trainer.estimated_stepping_batches
        rewind_step = self.config.rewind_step if self.config.rewind != "none" and self.snapshot is None else None
        warning, info = timing(self.schedule, self.events_done, per_epoch, total, trainer.max_epochs, rewind_step)
        if warning:
            rank_zero_warn(warning, category=PruningScheduleWarning)
        if info:
            rank_zero_info(info)

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
        self._hooks, self._training, self._whole_masks = [], False, {}

    # --- pruning events ---------------------------------------------------------------------------
    @property
    def round(self) -> int:
        return self.events_done

    @property
    def curve(self) -> list[list]:
        """``[round, sparsity, accuracy or None, step]`` at each round boundary and at the end of training."""
        return self.accuracy.rows

    @override
    def restructure_now(self, trainer, pl_module) -> bool:
        """At every batch start: snapshot for rewinding when due, then prune if an event is due (True when
        channels went: the machinery then rebuilds the optimizers). Not in setup: the snapshot holds the
        optimizers Lightning builds after it, and a resumed run's state is loaded after it too."""
        if not self._training:
            return False
        step = trainer.global_step
        if self.config.rewind != "none" and self.snapshot is None and step >= self.config.rewind_step:
            schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
            self.snapshot = take_snapshot(self.config.rewind, pl_module, trainer.optimizers, schedulers)
            self.snapshot["step"] = step
        due = [e for e in self.events[self.events_done :] if e[0] <= now(trainer, self.schedule.unit)]
        if not due:
            return False
        self._prune(trainer, pl_module, due[-1][1])
        self.events_done += len(due)
        self._update_sparsity(pl_module)
        self._fired = True
        sparsity = self._sparsity["sparsity"]
        rank_zero_info(f"IterativeMagnitudePruning: round {self.round} at step {step}: sparsity {sparsity:.4f}")
        return self.structured

    def _prune(self, trainer, pl_module, target: float) -> None:
        self._update_sparsity(pl_module)
        self.accuracy.record(trainer, self.round, self._sparsity["sparsity"])
        if self.structured:
            return self._prune_channels(trainer, pl_module, target)
        fallback: list[str] = []
        how = dict(pattern=self.pattern, importance=self.config.importance, scope=self.scope, stats=self.norms)
        masks = compute_masks(pl_module, self._targets, target, previous=self.masks or None, fallback=fallback, **how)
        if set(fallback) - self._fallback:
            self._fallback.update(fallback)
            rank_zero_warn(coverage_warning({}, {}, sorted(fallback)), category=PruningCoverageWarning)
        self.norms.reset()  # the next event scores by the inputs seen after this one
        if trainer.world_size > 1 and not sharding.any_sharded(masks.values()):  # DDP: rank 0's masks for all
            masks = trainer.strategy.broadcast({k: v.cpu() for k, v in masks.items()}, src=0)
        self.masks = masks
        self._rewind(trainer, pl_module)
        self._refresh_masks(pl_module)
        apply_masks(self._tensors(pl_module), self.masks)
        for opt in trainer.optimizers:
            mask_optimizer_state(opt, self._pairs)

    def _prune_channels(self, trainer, pl_module, target: float) -> None:
        # "lr" only here: the schedule goes back, the weights stay; the optimizers rebuilt after (by the
        # machinery) keep the rewound hyper-parameters and schedules
        self._rewind(trainer, pl_module)
        relative = 1.0 - (1.0 - target) / (1.0 - self.channel_ratio)
        self.config_changes.update(channel_targets.prune(pl_module, self._structural_call(pl_module), relative))
        self.channel_ratio, self.structure = target, structure_of(pl_module)

    def _rewind(self, trainer, pl_module) -> None:
        if self.snapshot is not None:
            schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
            restore(self.config.rewind, self.snapshot, pl_module, trainer.optimizers, schedulers)

    # --- helpers ----------------------------------------------------------------------------------
    def _tensors(self, pl_module) -> dict[str, torch.Tensor]:
        return {n: tensor_of(pl_module, t) for n, t in self._targets.items()}

    def _numel(self, pl_module, name: str) -> int:
        item = self._counted[name]
        return (item.weight if self.structured else tensor_of(pl_module, item)).numel()

    def _refresh_masks(self, pl_module) -> None:
        tensors = self._tensors(pl_module)
        self.masks = {k: sharding.place_like(v.to(tensors[k].device), tensors[k]) for k, v in self.masks.items()}
        self._pairs = [(tensors[n], m.to(tensors[n].dtype)) for n, m in self.masks.items()]

    def _update_sparsity(self, pl_module) -> None:
        initial = self.initial_numel if self.structured else None
        self._sparsity = sparsity_rows(pl_module, self._counted, initial)

    # --- export, report, state ----------------------------------------------------------------------
    @torch.no_grad()
    @override
    def export(self, model: torch.nn.Module) -> torch.nn.Module:
        for name, mask in (self._whole_masks or self.masks).items():  # zeros where pruned, nothing attached
            tensor = tensor_of(model, self._targets[name])
            tensor.mul_(mask.to(tensor.device, tensor.dtype))
        if self.pattern.kind == "N:M":  # on a CUDA fp16/bf16 model only (untested here: no GPU)
            to_semi_structured(model, [t.module for t in self._targets.values()], self.pattern)
        return model

    @override
    def gather_for_export(self) -> None:  # FSDP2: each rank holds one block of every mask; export reads them whole
        self._whole_masks = {k: sharding.full(v).cpu() for k, v in self.masks.items()}

    @override
    def report_rows(self) -> dict[str, Any]:
        rows: dict[str, Any] = {
            "mode": "structured" if self.structured else "unstructured",
            "pattern": str(self.pattern),
        }
        rows |= {"importance": self.config.importance, "rounds": self.round, "scope": self.scope}
        rows |= {"rewind": self.config.rewind, "sparsity_over": f"{len(self._counted)} target tensors"}
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
            "masks": {k: sharding.whole_on_rank0(v) for k, v in self.masks.items()},  # FSDP2: on rank 0 only
            "events_done": self.events_done,
            "snapshot": gathered(self.snapshot) if self.snapshot is not None else None,  # FSDP2: gathered
            "curve": self.accuracy.rows,
            "structure": self.structure,
            "initial_numel": self.initial_numel,
            "channel_ratio": self.channel_ratio,
            "schedule": as_dict(self.schedule),
            "norms": self.norms.state_dict(self._norms_group),
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
            self._saved_norms = state_dict["norms"]  # loaded at train start, when the ranks are known
        self.config_changes = dict(state_dict.get("config_changes", {}))
