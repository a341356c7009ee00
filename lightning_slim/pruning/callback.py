"""IterativeMagnitudePruning: the Lightning shell around ``functional``, ``schedules``,
``rewind`` and ``structured``. Hooks decide *when*; the pure functions decide *what*."""
from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_slim import log
from lightning_slim.arguments import check_choice, check_int
from lightning_slim.callback import SlimCallback
from lightning_slim.clock import Moment
from lightning_slim.contract import Effect, ExportStage
from lightning_slim.lightning_glue import rebuild_optimizers
from lightning_slim.pruning import functional as masking
from lightning_slim.pruning import rewind as rewinding
from lightning_slim.pruning import structured as channels
from lightning_slim.pruning.schedules import as_dict, parse_schedule

DEFAULT_SCHEDULE = {"kind": "imp", "rounds": 5, "rate": 0.2, "every": 1, "unit": "epoch"}


class IterativeMagnitudePruning(SlimCallback):
    """Magnitude pruning on a schedule, with rewinding, masks that cost nothing in ``forward``,
    optional channel removal, and state that survives checkpoints.

    Args:
        schedule: when and how much to prune, as data: ``{"kind": "imp", "rounds", "rate" or
            "final_sparsity", "every", "start", "unit": "epoch"|"step"}``, ``{"kind": "gradual",
            "final_sparsity", "initial_sparsity", "start", "end", "every", "unit"}`` (Zhu & Gupta) or
            ``{"kind": "one_shot", "sparsity", "at", "unit"}``. Sparsities are fractions of the pruned
            layers' weights (of their output channels with ``structured=True``).
        targets: modules to prune: class names (``"Conv1d"``, ``"torch.nn.Linear"``), module paths
            (``"net.0"``) or ``"re:<regex>"`` on paths. Default: every Linear and Conv layer.
        exclude: the same kind of specs, removed from ``targets``.
        exclude_classifier: leave the final classifier (the last Linear/Conv layer, or ``classifier``) dense.
            It still counts in the reported sparsity, which is over every target layer.
        scope: ``"global"`` ranks all weights together, ``"layer"`` prunes each layer to the target.
        structured: remove whole output channels / neurons with torch-pruning (a smaller, faster
            model) instead of masking single weights. Use ``strategy="ddp"``, not ``ddp_spawn``.
        rewind: at each pruning event, ``"none"`` (fine-tune), ``"init"`` (lottery ticket),
            ``"step"`` (to ``rewind_step``, Frankle et al. 2020) or ``"lr"`` (learning-rate rewinding,
            Renda et al. 2020, to ``rewind_step``). Weights and optimizer/scheduler state go back together.
        rewind_step: the optimizer step to snapshot for ``"step"`` and ``"lr"``.
        accuracy_metric: logged metric recorded at each round for the accuracy-vs-sparsity curve.
        example_input_shape: input shape for torch-pruning's tracing when the module has no
            ``example_input_array`` (structured only).

    >>> cb = IterativeMagnitudePruning({"kind": "imp", "rounds": 3, "rate": 0.5, "every": 1}, rewind="init")
    >>> cb.events
    [(1, 0.5), (2, 0.75), (3, 0.875)]
    """

    technique = "pruning"
    effects = frozenset({Effect.AFTER_OPTIMIZER_STEP, Effect.RESTRUCTURE})
    export_stage = ExportStage.FINALIZE_WEIGHTS  # masks made permanent before any quantization

    def __init__(self, schedule: dict[str, Any] | None = None, targets: list[str] | None = None,
                 exclude: list[str] | None = None, exclude_classifier: bool = False, classifier: str | None = None,
                 scope: str = "global", structured: bool = False, rewind: str = "none", rewind_step: int = 0,
                 accuracy_metric: str | None = "val/acc", example_input_shape: list[int] | None = None):
        self.schedule = parse_schedule(DEFAULT_SCHEDULE if schedule is None else schedule)
        check_choice("scope", scope, masking.SCOPES)
        check_choice("rewind", rewind, rewinding.REWINDS)
        check_int("rewind_step", rewind_step, minimum=0)
        if rewind == "init" and rewind_step:
            raise ValueError(f"rewind='init' rewinds to step 0; use rewind='step' for rewind_step={rewind_step}")
        if structured and rewinding.rewinds_weights(rewind):
            raise ValueError(f"rewind={rewind!r} is not supported with structured=True (the snapshot has the "
                             "unpruned shapes); use rewind='none' or 'lr'")
        if self.schedule.kind == "gradual" and rewind != "none":
            raise ValueError(f"rewind={rewind!r} with a gradual schedule would rewind at every small step; "
                             "gradual pruning fine-tunes (rewind='none')")
        self.events = self.schedule.events()
        if self.schedule.unit == "step" and rewind != "none" and rewind_step > self.events[0][0]:
            raise ValueError(f"rewind_step={rewind_step} is later than the first pruning at step {self.events[0][0]}")
        self.targets, self.exclude = targets, list(exclude or [])
        self.exclude_classifier, self.classifier = exclude_classifier, classifier
        self.scope, self.structured, self.rewind, self.rewind_step = scope, structured, rewind, rewind_step
        self.accuracy_metric = accuracy_metric
        self.example_input_shape = example_input_shape
        # state saved in checkpoints
        self.masks: dict[str, torch.Tensor] = {}
        self.events_done = 0
        self.snapshot: dict[str, Any] | None = None
        self.curve: list[list] = []  # [round, sparsity, accuracy, step] at each round boundary and at the end
        self.structure: dict | None = None
        self.initial_numel: dict[str, int] = {}
        self.channel_ratio = 0.0
        # runtime only
        self._layers: dict[str, torch.nn.Module] = {}
        self._counted: dict[str, torch.nn.Module] = {}
        self._pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._sparsity: dict[str, float] = {}
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
            channels.check_prunable(pl_module, self._example(pl_module), self._layers)
        if not self.initial_numel:
            self.initial_numel = channels.count_weights(self._counted)

    def _resolve(self, pl_module) -> None:
        self._counted = masking.select_layers(pl_module, self.targets)
        exclude = list(self.exclude)
        if self.exclude_classifier or self.structured:  # structurally, the class outputs must stay
            name = self.classifier or masking.classifier_name(masking.select_layers(pl_module))
            if name not in dict(pl_module.named_modules()):
                raise ValueError(f"classifier={name!r} is not a module of {type(pl_module).__name__}")
            if name in self._counted:
                exclude.append(name)
        self._layers = masking.select_layers(pl_module, self.targets, exclude)

    def _example(self, pl_module):
        if self.example_input_shape is not None:
            x = torch.zeros(*self.example_input_shape)
        elif getattr(pl_module, "example_input_array", None) is not None:
            x = pl_module.example_input_array
        else:
            raise ValueError("structured pruning traces the model: set example_input_array on the module "
                             "or pass example_input_shape=[1, ...] to IterativeMagnitudePruning")
        return x.to(pl_module.device) if isinstance(x, torch.Tensor) else x

    # --- training hooks -------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer, pl_module):
        self._resolve(pl_module)
        self._refresh_masks(pl_module)
        masking.apply_masks(self._weights(), self.masks)
        self._update_sparsity()

    @override
    def on_train_start(self, trainer, pl_module):
        if self.schedule.unit == "epoch" and trainer.max_epochs not in (None, -1):
            late = [t for t, _ in self.events[self.events_done:] if t >= trainer.max_epochs]
            if late:  # an event at the last epoch boundary or after it is never trained (or never happens)
                rank_zero_info(f"IterativeMagnitudePruning: pruning events at epochs {late} come at or after "
                               f"max_epochs={trainer.max_epochs}; those rounds will not be trained")
        if self.schedule.unit == "epoch" and self.rewind != "none" and self.snapshot is None:
            per_epoch = -(-trainer.num_training_batches // trainer.accumulate_grad_batches)
            first = self.events[0][0] * per_epoch
            if self.rewind_step > first:
                raise ValueError(f"rewind_step={self.rewind_step} is later than the first pruning at epoch "
                                 f"{self.events[0][0]} (step {first})")

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
        self._update_sparsity()
        self.curve.append([self.round, self._sparsity["sparsity"], self._accuracy(trainer), trainer.global_step])
        self._log_curve(trainer)
        log.set_summary(trainer, {"slim/pruning/final_sparsity": self._sparsity["sparsity"],
                                  "slim/pruning/rounds": self.round})

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
        due = [e for e in self.events[self.events_done:] if e[0] <= position]
        if due:
            self._prune(trainer, pl_module, due[-1][1])
            self.events_done += len(due)
            self._update_sparsity()
            self._fired = True
            self._log_curve(trainer)
            rank_zero_info(f"IterativeMagnitudePruning: round {self.round} at step {step}: "
                           f"sparsity {self._sparsity['sparsity']:.4f}")

    def _prune(self, trainer, pl_module, target: float) -> None:
        self._update_sparsity()
        self.curve.append([self.round, self._sparsity["sparsity"], self._accuracy(trainer), trainer.global_step])
        if self.structured:
            return self._prune_channels(trainer, pl_module, target)
        masks = masking.magnitude_masks(self._weights(), target, self.scope, self.masks or None)
        if trainer.world_size > 1:  # ranks hold identical weights; rank 0's masks make that certain
            masks = trainer.strategy.broadcast({k: v.cpu() for k, v in masks.items()}, src=0)
        self.masks = {k: v.to(self._layers[k].weight.device) for k, v in masks.items()}
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        if self.snapshot is not None:
            rewinding.restore(self.rewind, self.snapshot, pl_module, trainer.optimizers, schedulers)
        self._refresh_masks(pl_module)
        masking.apply_masks(self._weights(), self.masks)
        for opt in trainer.optimizers:
            masking.mask_optimizer_state(opt, self._pairs)

    def _prune_channels(self, trainer, pl_module, target: float) -> None:
        relative = 1.0 - (1.0 - target) / (1.0 - self.channel_ratio)
        channels.channel_prune(pl_module, self._example(pl_module), self._layers.values(), relative,
                        global_pruning=self.scope == "global")
        self.channel_ratio = target
        self.structure = channels.structure_of(pl_module)
        rebuild_optimizers(trainer, pl_module)
        if self.snapshot is not None:  # "lr": the schedule goes back, the weights stay
            rewinding.restore(self.rewind, self.snapshot, pl_module, trainer.optimizers,
                      [c.scheduler for c in trainer.lr_scheduler_configs])

    # --- helpers ----------------------------------------------------------------------------------
    def _weights(self) -> dict[str, torch.Tensor]:
        return {n: m.weight for n, m in self._layers.items()}

    def _refresh_masks(self, pl_module) -> None:
        self.masks = {k: v.to(self._layers[k].weight.device) for k, v in self.masks.items()}
        self._pairs = [(self._layers[n].weight, m.to(self._layers[n].weight.dtype)) for n, m in self.masks.items()]

    def _update_sparsity(self) -> None:
        if self.structured:
            per = {n: 1.0 - m.weight.numel() / self.initial_numel[n] for n, m in self._counted.items()}
            total = 1.0 - sum(m.weight.numel() for m in self._counted.values()) / sum(self.initial_numel.values())
        else:
            per = {n: masking.sparsity_of(m.weight) for n, m in self._counted.items()}
            total = masking.global_sparsity({n: m.weight for n, m in self._counted.items()})
        self._sparsity = {"sparsity": total, **{f"sparsity/{n}": v for n, v in per.items()}}

    def _accuracy(self, trainer) -> float | None:
        value = trainer.callback_metrics.get(self.accuracy_metric) if self.accuracy_metric else None
        return None if value is None else float(value)

    def _log_curve(self, trainer) -> None:
        rows = [[r, s, float("nan") if a is None else a, st] for r, s, a, st in self.curve]
        log.log_line_plot(trainer, "slim/pruning/accuracy_vs_sparsity", ["round", "sparsity", "accuracy", "step"],
                          rows, x="sparsity", y="accuracy", title="accuracy vs sparsity over pruning rounds")

    # --- export, report, state ----------------------------------------------------------------------
    @torch.no_grad()
    @override
    def export(self, model: torch.nn.Module) -> torch.nn.Module:
        modules = dict(model.named_modules())
        for name, mask in self.masks.items():  # plain tensors: zeros where pruned, nothing attached
            weight = modules[name].weight
            weight.mul_(mask.to(weight.device, weight.dtype))
        return model

    @override
    def report_rows(self) -> dict[str, Any]:
        rows: dict[str, Any] = {"mode": "structured" if self.structured else "unstructured",
                                "rounds": self.round, "scope": self.scope, "rewind": self.rewind}
        rows.update(self._sparsity)
        return rows

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: v.detach().cpu() for k, v in self.masks.items()}, "events_done": self.events_done,
                "snapshot": self.snapshot, "curve": self.curve, "structure": self.structure,
                "initial_numel": self.initial_numel, "channel_ratio": self.channel_ratio,
                "schedule": as_dict(self.schedule)}

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.masks = dict(state_dict["masks"])
        self.events_done, self.snapshot = state_dict["events_done"], state_dict["snapshot"]
        self.curve = [list(r) for r in state_dict["curve"]]
        self.structure, self.channel_ratio = state_dict["structure"], state_dict["channel_ratio"]
        self.initial_numel = dict(state_dict["initial_numel"])
