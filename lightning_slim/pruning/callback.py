"""IterativeMagnitudePruning: the Lightning shell around ``functional`` (masks, patterns, importance),
``schedules``, ``rewind``, ``structured`` and ``heads``. Hooks decide *when*; the pure functions decide *what*."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_slim import log
from lightning_slim.arguments import check_int
from lightning_slim.callback import SlimCallback
from lightning_slim.clock import Moment
from lightning_slim.contract import Effect, ExportStage
from lightning_slim.interception import InTrainingStep
from lightning_slim.lightning_glue import rebuild_optimizers
from lightning_slim.modules import InputNorms
from lightning_slim.pruning import functional as masking
from lightning_slim.pruning import heads as attention
from lightning_slim.pruning import rewind as rewinding
from lightning_slim.pruning import structured as channels
from lightning_slim.pruning import tensors as tensor_targets
from lightning_slim.pruning.importance import inputs_of
from lightning_slim.pruning.options import PruningCoverageWarning, check_options, coverage_warning, resolve_pattern
from lightning_slim.pruning.schedules import as_dict, parse_schedule

DEFAULT_SCHEDULE = {"kind": "imp", "rounds": 5, "rate": 0.2, "every": 1, "unit": "epoch"}


class IterativeMagnitudePruning(SlimCallback):
    """Pruning on a schedule (magnitude or Wanda importance; unstructured, N:M or channels/heads),
    with rewinding, masks that cost nothing in ``forward``, and state that survives checkpoints.

    Args:
        schedule: when and how much to prune, as data: ``{"kind": "imp", "rounds", "rate" or
            "final_sparsity", "every", "start", "unit": "epoch"|"step"}``, ``{"kind": "gradual",
            "final_sparsity", "initial_sparsity", "start", "end", "every", "unit"}`` (Zhu & Gupta) or
            ``{"kind": "one_shot", "sparsity", "at", "unit"}``. Sparsities are fractions of the target
            tensors' weights (of their output channels / heads with ``pattern="channels"``).
        targets: what to prune: class names (``"Conv1d"``, ``"torch.nn.Linear"``), module paths
            (``"net.0"``), ``"re:<regex>"`` on paths, or full parameter names
            (``"layers.0.self_attn.in_proj_weight"``). Default: every Linear, Conv, MultiheadAttention
            (``in_proj_weight``) and transformers ``Conv1D`` weight; for structural pruning of a
            transformer, its MLP channels and attention heads.
        exclude: the same kind of specs, removed from ``targets``.
        exclude_classifier: leave the final classifier (the last Linear/Conv layer, or ``classifier``) dense.
            It still counts in the reported sparsity, which is over every target tensor.
        scope: ``"global"`` ranks all target weights together, ``"layer"`` each tensor, ``"row"`` each
            output row. Default: ``"row"`` for Wanda (its comparison group), ``"layer"`` for structural
            pruning of transformers, ``"global"`` otherwise.
        pattern: ``"unstructured"``, ``"N:M"`` semi-structured (``"2:4"``: 2 of every 4 consecutive
            inputs of a row stay; the schedule must end at ``1 - N/M``) or ``"channels"`` (structural,
            with torch-pruning: a smaller, faster model; use ``strategy="ddp"``, not ``ddp_spawn``).
        structured: the same as ``pattern="channels"``.
        importance: ``"magnitude"`` (``|W|``) or ``"wanda"`` (``|W|`` times the input channel's norm,
            collected by forward hooks over the training steps since the previous pruning event).
        heads: with ``pattern="channels"`` on a transformer, remove whole attention heads as well as MLP
            channels (``False``: MLP channels only).
        rewind: at each pruning event, ``"none"`` (fine-tune), ``"init"`` (lottery ticket),
            ``"step"`` (to ``rewind_step``, Frankle et al. 2020) or ``"lr"`` (learning-rate rewinding,
            Renda et al. 2020, to ``rewind_step``). Weights and optimizer/scheduler state go back together.
        rewind_step: the optimizer step to snapshot for ``"step"`` and ``"lr"``.
        accuracy_metric: logged metric recorded at each round for the accuracy-vs-sparsity curve.
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
        self.accuracy_metric = accuracy_metric
        self.example_input_shape, self.example_input_dtype = example_input_shape, example_input_dtype
        # state saved in checkpoints
        self.masks: dict[str, torch.Tensor] = {}
        self.events_done = 0
        self.snapshot: dict[str, Any] | None = None
        self.curve: list[list] = []  # [round, sparsity, accuracy, step] at each round boundary and at the end
        self.structure: dict | None = None
        self.initial_numel: dict[str, int] = {}
        self.channel_ratio = 0.0
        self.norms = InputNorms()  # Wanda's input statistics since the last event
        self.config_changes: dict[str, Any] = {}
        # runtime only
        self._layers: dict[str, torch.nn.Module] = {}  # structural roots
        self._counted: dict[str, Any] = {}  # what the sparsity is over (targets, classifier included)
        self._targets: dict[str, tensor_targets.Target] = {}  # what is masked
        self._untouched: dict[str, str] = {}
        self._tied: dict[str, list[str]] = {}
        self._num_heads: dict[torch.nn.Module, int] = {}
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
        if self.structured:
            root, example = self._example(pl_module)
            channels.check_prunable(root, example, self._layers)
            if self.structure is None:  # a fresh fit: prune a copy to the final ratio, run it, before training
                changes = channels.dry_run(
                    root, example, self._layers, self.events[-1][1], self.scope == "global", self._num_heads
                )
                if not changes.get("reloadable", True):
                    rank_zero_warn(
                        "IterativeMagnitudePruning: this model's config cannot describe the pruned heads "
                        "(its head size is hidden_size / num_attention_heads): reload it with "
                        "lightning_slim.pruning.load_pruned(), not from_pretrained()",
                        category=PruningCoverageWarning,
                    )
        else:
            for name, t in self._targets.items():
                shape = tensor_targets.as_matrix(tensor_targets.tensor_of(pl_module, t), t.layout).shape
                masking.patterns.check_nm_shape(name, tuple(shape), self.pattern)
            message = coverage_warning(self._untouched, self._tied)
            if message:
                rank_zero_warn(message, category=PruningCoverageWarning)
        if not self.initial_numel:
            self.initial_numel = {n: self._numel(pl_module, n) for n in self._counted}

    def _resolve(self, pl_module) -> None:
        if self.structured:
            return self._resolve_channels(pl_module)
        self._counted = tensor_targets.select_tensors(pl_module, self.targets)
        exclude = list(self.exclude) + self._classifier(pl_module, self._counted, self.exclude_classifier)
        self._targets = tensor_targets.select_tensors(pl_module, self.targets, exclude)
        self._untouched = tensor_targets.untouched_matrices(pl_module, self._counted, exclude)
        if self.pattern.kind == "N:M" and self.targets is None:  # by kind: layers N:M cannot split are listed
            for name in masking.nm_misfits(pl_module, self._targets, self.pattern):
                self._untouched[name] = f"inputs not a multiple of {self.pattern.m}"
                del self._targets[name]
        self._tied = tensor_targets.tied(pl_module, self._counted)

    def _classifier(self, pl_module, counted, wanted: bool) -> list[str]:
        if not wanted:
            return []
        name = self.classifier or masking.classifier_name(masking.select_layers(pl_module))
        if name not in dict(pl_module.named_modules()):
            raise ValueError(f"classifier={name!r} is not a module of {type(pl_module).__name__}")
        return [name] if name in counted else []

    def _resolve_channels(self, pl_module) -> None:
        roots, num_heads, refused = attention.transformer_plan(pl_module, self.heads)
        modules = dict(pl_module.named_modules())
        if not (roots or refused):  # a CNN / MLP: every target but the classifier (its class outputs must stay)
            self._counted = masking.select_layers(pl_module, self.targets)
            classifier = self._classifier(pl_module, self._counted, True)
            if set(self._counted) <= set(classifier):
                raise ValueError(
                    f"structural pruning keeps the classifier's outputs ({classifier}), and "
                    f"{type(pl_module).__name__} has no other Linear/Conv target; "
                    "use pattern='unstructured'"
                )
            self._layers = masking.select_layers(pl_module, self.targets, list(self.exclude) + classifier)
            return
        if self._scope == "global":
            raise ValueError(
                "scope='global' would give transformer layers different head counts and MLP widths, "
                "which a model config cannot hold; use scope='layer' (the default for transformers)"
            )
        chosen = attention.choose(
            modules,
            roots,
            refused,
            self.targets and masking.select_layers(pl_module, self.targets, self.exclude),
            self.exclude,
        )
        self.scope = "layer"
        self._num_heads = {modules[n]: h for n, h in num_heads.items() if n in chosen}
        self._counted = self._layers = chosen

    def _example(self, pl_module):
        return channels.trace_inputs(
            pl_module,
            getattr(pl_module, "example_input_array", None),
            self.example_input_shape,
            self.example_input_dtype,
        )

    # --- training hooks -------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer, pl_module):
        self._resolve(pl_module)
        self._refresh_masks(pl_module)
        masking.apply_masks(self._tensors(pl_module), self.masks)
        self._update_sparsity(pl_module)
        if self.importance == "wanda" and not self._hooks:
            modules = {t.module: pl_module.get_submodule(t.module) for t in self._targets.values()}
            self._hooks = self.norms.attach(
                modules, InTrainingStep(pl_module), {n: inputs_of(m) for n, m in modules.items()}
            )

    @override
    def on_train_start(self, trainer, pl_module):
        if self.schedule.unit == "epoch" and trainer.max_epochs not in (None, -1):
            late = [t for t, _ in self.events[self.events_done :] if t >= trainer.max_epochs]
            if late:  # an event at the last epoch boundary or after it is never trained (or never happens)
                rank_zero_info(
                    f"IterativeMagnitudePruning: pruning events at epochs {late} come at or after "
                    f"max_epochs={trainer.max_epochs}; those rounds will not be trained"
                )
        if self.schedule.unit == "epoch" and self.rewind != "none" and self.snapshot is None:
            per_epoch = -(-trainer.num_training_batches // trainer.accumulate_grad_batches)
            first = self.events[0][0] * per_epoch
            if self.rewind_step > first:
                raise ValueError(
                    f"rewind_step={self.rewind_step} is later than the first pruning at epoch "
                    f"{self.events[0][0]} (step {first})"
                )

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
        self.curve.append([self.round, self._sparsity["sparsity"], self._accuracy(trainer), trainer.global_step])
        self._log_curve(trainer)
        log.set_summary(
            trainer, {"slim/pruning/final_sparsity": self._sparsity["sparsity"], "slim/pruning/rounds": self.round}
        )

    @override
    def _leave(self, pl_module) -> None:  # teardown, or on_exception: Wanda's hooks go too
        for h in self._hooks:
            h.remove()
        self._hooks = []
        super()._leave(pl_module)

    # --- pruning events ---------------------------------------------------------------------------
    @property
    def round(self) -> int:
        return self.events_done

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
            rank_zero_info(
                f"IterativeMagnitudePruning: round {self.round} at step {step}: "
                f"sparsity {self._sparsity['sparsity']:.4f}"
            )

    def _prune(self, trainer, pl_module, target: float) -> None:
        self._update_sparsity(pl_module)
        self.curve.append([self.round, self._sparsity["sparsity"], self._accuracy(trainer), trainer.global_step])
        if self.structured:
            return self._prune_channels(trainer, pl_module, target)
        fallback: list[str] = []
        masks = masking.compute_masks(
            pl_module,
            self._targets,
            target,
            self.pattern,
            self.importance,
            self.scope,
            self.norms,
            self.masks or None,
            fallback,
        )
        if set(fallback) - self._fallback:
            self._fallback.update(fallback)
            rank_zero_warn(coverage_warning({}, {}, sorted(fallback)), category=PruningCoverageWarning)
        self.norms.reset()  # the next event scores by the inputs seen after this one
        if trainer.world_size > 1:  # ranks hold identical weights; rank 0's masks make that certain
            masks = trainer.strategy.broadcast({k: v.cpu() for k, v in masks.items()}, src=0)
        self.masks = masks
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        if self.snapshot is not None:
            rewinding.restore(self.rewind, self.snapshot, pl_module, trainer.optimizers, schedulers)
        self._refresh_masks(pl_module)
        masking.apply_masks(self._tensors(pl_module), self.masks)
        for opt in trainer.optimizers:
            masking.mask_optimizer_state(opt, self._pairs)

    def _prune_channels(self, trainer, pl_module, target: float) -> None:
        relative = 1.0 - (1.0 - target) / (1.0 - self.channel_ratio)
        root, example = self._example(pl_module)
        channels.channel_prune(
            root,
            example,
            self._layers.values(),
            relative,
            global_pruning=self.scope == "global",
            num_heads=self._num_heads,
        )
        self.config_changes.update(attention.sync_configs(pl_module))
        self.channel_ratio = target
        self.structure = channels.structure_of(pl_module)
        rebuild_optimizers(trainer, pl_module)
        if self.snapshot is not None:  # "lr": the schedule goes back, the weights stay
            rewinding.restore(
                self.rewind,
                self.snapshot,
                pl_module,
                trainer.optimizers,
                [c.scheduler for c in trainer.lr_scheduler_configs],
            )

    # --- helpers ----------------------------------------------------------------------------------
    def _tensors(self, pl_module) -> dict[str, torch.Tensor]:
        return {n: tensor_targets.tensor_of(pl_module, t) for n, t in self._targets.items()}

    def _numel(self, pl_module, name: str) -> int:
        item = self._counted[name]
        return (item.weight if self.structured else tensor_targets.tensor_of(pl_module, item)).numel()

    def _refresh_masks(self, pl_module) -> None:
        tensors = self._tensors(pl_module)
        self.masks = {k: v.to(tensors[k].device) for k, v in self.masks.items()}
        self._pairs = [(tensors[n], m.to(tensors[n].dtype)) for n, m in self.masks.items()]

    def _update_sparsity(self, pl_module) -> None:
        initial = self.initial_numel if self.structured else None
        self._sparsity = masking.sparsity_rows(pl_module, self._counted, initial)

    def _accuracy(self, trainer) -> float | None:
        value = trainer.callback_metrics.get(self.accuracy_metric) if self.accuracy_metric else None
        return None if value is None else float(value)

    def _log_curve(self, trainer) -> None:
        rows = [[r, s, float("nan") if a is None else a, st] for r, s, a, st in self.curve]
        log.log_line_plot(
            trainer,
            "slim/pruning/accuracy_vs_sparsity",
            ["round", "sparsity", "accuracy", "step"],
            rows,
            x="sparsity",
            y="accuracy",
            title="accuracy vs sparsity over pruning rounds",
        )

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
            "masks": {k: v.detach().cpu() for k, v in self.masks.items()},
            "events_done": self.events_done,
            "snapshot": self.snapshot,
            "curve": self.curve,
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
        self.curve = [list(r) for r in state_dict["curve"]]
        self.structure, self.channel_ratio = state_dict["structure"], state_dict["channel_ratio"]
        self.initial_numel = dict(state_dict["initial_numel"])
        if "norms" in state_dict:  # checkpoints from before Wanda have none
            self.norms.load_state_dict(state_dict["norms"])
        self.config_changes = dict(state_dict.get("config_changes", {}))
