"""LowRankFactorization: the Lightning shell around :mod:`.functional`. Hooks decide *when* the layers
are replaced by their rank-``r`` factors; the pure functions decide *how*."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_slim.core import log
from lightning_slim.core.arguments import config_from
from lightning_slim.core.callback import SlimCallback
from lightning_slim.core.clock import Moment
from lightning_slim.core.compose import IncompatibleCallbacksError, techniques
from lightning_slim.core.contract import Effect
from lightning_slim.factorization import functional as F
from lightning_slim.factorization.configs import FactorizationConfig
from lightning_slim.factorization.structure import restructure

# what another technique declares when it takes hold of the model's layers or parameters in its setup
# (masks keyed by parameter path, swapped layers, clamped weight lists): replacing layers after that
# would leave it acting on parameters the model no longer has
HOLDS_LAYERS = frozenset({Effect.AFTER_OPTIMIZER_STEP, Effect.RESTRUCTURE, Effect.SWAP_MODULES})
TABLE = ["layer", "out", "fan_in", "rank", "full_rank", "params_before", "params_after", "macs_before", "macs_after"]
TABLE += ["energy_kept"]  # MACs per output position


class FactorizationCoverageWarning(UserWarning):
    """Layers the targets match that stay dense because factorization cannot handle them."""


def _returns_weights_only(trainer: pl.Trainer) -> bool:
    """``ddp_spawn`` / ``ddp_fork`` / ``ddp_notebook``: the fit runs in child processes and Lightning loads
    only the weights back (non-strictly) into the launching process's module, which keeps its dense
    layers: the factorized weights would be dropped without an error."""
    launcher = getattr(trainer.strategy, "launcher", None)
    return any(c.__name__ == "_MultiProcessingLauncher" for c in type(launcher).__mro__)


class LowRankFactorization(SlimCallback):
    """Replace Linear / Conv1d / Conv2d layers by two smaller ones from the truncated SVD of their weights,
    at a moment of the fit, and fine-tune the factors with the rest of the model (Composer's Factorize,
    but from the weights alone and at any epoch or step).

    Args (the fields of :class:`~.configs.FactorizationConfig`; or pass ``config=`` instead):
        rank: each layer's rank: a fraction in (0, 1] of ``min(out, in x kernel taps)`` or a number >= 1.
        energy: instead of ``rank``: the smallest rank keeping this fraction of ``sum sigma_i^2``.
        targets / exclude: classes, module paths or ``re:`` regexes; default every Linear and conv.
        min_size: leave layers whose smaller side ``min(out, in x kernel taps)`` is below this dense.
        at / unit: when (epochs or optimizer steps); ``at=0`` factorizes in ``setup``, before training.
        config: a :class:`~.configs.FactorizationConfig` (or dict) holding all of the above.

    A layer is replaced only where its rank saves parameters and MACs (``r (out + fan_in) < out fan_in``).
    After a mid-fit replacement (``Effect.RESTRUCTURE_MID_FIT``) the machinery rebuilds the optimizers (the
    dense weights leave them; learning-rate schedules and other parameters' state are kept). A resumed run
    gets the checkpoint's structure before Lightning loads its weights; :func:`~.functional.load_factorized`
    does the same outside a Trainer.

    >>> cb = LowRankFactorization(energy=0.9, targets=["Linear"], at=2, unit="step")
    >>> cb.config.rule, str(cb.config.moment)
    ('energy=0.9', 'step 2')
    """

    technique = "factorization"
    effects = frozenset({Effect.RESTRUCTURE_MID_FIT, Effect.RESTRUCTURE})

    def __init__(
        self,
        rank: float | int | None = None,
        energy: float | None = None,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        min_size: int = 1,
        at: int = 0,
        unit: str = "epoch",
        config: FactorizationConfig | dict | None = None,
    ):
        self.config: FactorizationConfig = config_from(FactorizationConfig, config, locals())
        # state saved in checkpoints
        self.ranks: dict[str, int] = {}  # factorized layers: path -> rank
        self.layers: dict[str, dict[str, Any]] = {}  # per factorized layer: shapes, params, energy kept
        self.kept_dense: dict[str, str] = {}  # targeted layers left dense by the rank rule, with why
        self.unsupported: dict[str, str] = {}  # targeted layers factorization cannot handle, with why
        self.done = False
        self.factorized_at: int | None = None  # the global step of the replacement
        # runtime only
        self._targets: dict[str, nn.Module] = {}

    # --- the contract ---------------------------------------------------------------------------------
    @override
    def restructures_until(self) -> Moment | None:
        # at=0 replaces layers in setup, before any moment of training (techniques that take hold of
        # layers in their setup must come after it in the callback list: checked in validate)
        return self.config.moment if self.config.at > 0 and not self.done else None

    @override
    def sharded_refusal(self, resuming: bool = False) -> str | None:
        # at=0 factorizes in setup, before configure_model shards: FSDP2 shards the factors (tests/sharded)
        if resuming:
            return (
                "LowRankFactorization cannot resume sharded: it gives the model the checkpoint's factors before "
                "Lightning loads the weights, after configure_model sharded them; resume unsharded (single device "
                "or DDP)"
            )
        if self.config.at > 0:
            return (
                f"LowRankFactorization(at={self.config.at}, unit={self.config.unit!r}) replaces layers mid-fit, "
                "changing parameter shapes FSDP2 fixed when configure_model sharded them: factorize before "
                "training (at=0: in setup, before configure_model shards), or factorize unsharded, then shard"
            )
        return None

    @override
    def before_weights_load(self, pl_module, state: Mapping[str, Any]) -> None:
        # a resumed checkpoint may hold factors (or other ranks than setup chose): its structure first
        saved = dict(state.get("ranks", {}))
        restructure(pl_module, saved, dense=[p for p in self.ranks if p not in saved])
        self.ranks = saved

    # --- before training --------------------------------------------------------------------------------
    @override
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_neighbours(trainer)
        if _returns_weights_only(trainer) and self.config.at == 0 and not self.done:
            raise ValueError(
                f"{type(trainer.strategy).__name__} runs the fit in child processes and loads only the weights "
                "back into this process's module, which keeps its dense layers: the factorized weights would be "
                "lost. Use strategy='ddp'"
            )
        if self.done:
            return
        self._targets, self.unsupported = F.select_layers(pl_module, self.config.targets, self.config.exclude or ())
        if not self._targets:
            raise ValueError(f"factorization: none of the targeted layers can be factorized: {self.unsupported}")
        if self.unsupported:
            rank_zero_warn(
                f"LowRankFactorization leaves these targeted layers dense: {self.unsupported} (listed in "
                "report_rows()['unsupported']; exclude them to silence this)",
                category=FactorizationCoverageWarning,
            )

    def _check_neighbours(self, trainer: pl.Trainer) -> None:
        slim = techniques(trainer)
        holders = [cb for cb in slim if cb is not self and (cb.effects & HOLDS_LAYERS or cb.structure_fixed_from())]
        names = [type(cb).__name__ for cb in holders]
        if self.config.at > 0 and holders and not self.done:
            raise IncompatibleCallbacksError(
                f"LowRankFactorization replaces layers at {self.config.moment}, but {names} take hold of the "
                "model's layers or parameters in their setup (masks, swapped layers) and would keep acting on the "
                "replaced ones; factorize before training (at=0) with LowRankFactorization listed before them"
            )
        earlier = [type(cb).__name__ for cb in holders if slim.index(cb) < slim.index(self)]
        if self.config.at == 0 and earlier and not self.done:
            raise IncompatibleCallbacksError(
                f"list LowRankFactorization before {earlier} in the Trainer's callbacks: their setup (which runs "
                "in list order) took hold of the dense layers that factorization replaces in its own"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done or not _returns_weights_only(trainer):
            return
        per_epoch = -(-trainer.num_training_batches // trainer.accumulate_grad_batches)
        first_step = self.config.at * (per_epoch if self.config.unit == "epoch" else 1)
        if first_step < trainer.estimated_stepping_batches:  # before any optimizer step
            raise ValueError(
                f"LowRankFactorization would replace layers at {self.config.moment} of this fit, but "
                f"{type(trainer.strategy).__name__} loads only the weights back into the launching process's "
                "dense module: the factorized weights would be lost. Use strategy='ddp'"
            )

    # --- the replacement --------------------------------------------------------------------------------
    @override
    def restructure_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        if self.done:  # a later fit: the model keeps (or, if new, gets) the factorized structure
            return self._apply(pl_module, self.ranks) > 0
        if not self.config.moment.reached(trainer):
            return False
        self._factorize(trainer, pl_module)
        return True

    def _factorize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = self.config
        plan, self.kept_dense = F.plan_ranks(self._targets, config.rank_or_default, config.energy, config.min_size)
        if trainer.world_size > 1:  # every rank holds the same weights; rank 0's plan makes that certain
            plan = trainer.strategy.broadcast(plan, src=0)
        self._apply(pl_module, plan)
        self.done, self.factorized_at = True, trainer.global_step
        if self.kept_dense:
            rank_zero_info(f"LowRankFactorization keeps these layers dense: {self.kept_dense}")
        if not plan:
            rank_zero_warn(
                f"LowRankFactorization factorized nothing: {self.config.rule} saves nothing on any target "
                f"({self.kept_dense})",
                category=FactorizationCoverageWarning,
            )
            return
        row = self.report_rows()
        rank_zero_info(
            f"LowRankFactorization: {len(plan)} layers at step {trainer.global_step}, parameters of the "
            f"targets {row['params_before']} -> {row['params_after']}"
        )
        rows = [[n, *(self.layers[n][c] for c in TABLE[1:])] for n in plan]
        log.log_table(trainer, "slim/factorization/layers", TABLE, rows)

    def _apply(self, pl_module: nn.Module, plan: Mapping[str, int]) -> int:
        """Factorize the layers of ``plan`` that are not yet (a later fit of the same model keeps its factors;
        a new model handed to a finished callback gets the recorded ranks); how many were."""
        todo = {p: r for p, r in plan.items() if not isinstance(pl_module.get_submodule(p), F.FactorizedLayer)}
        rows = F.factorize_layers(pl_module, todo)
        if not self.done:
            self.layers = rows
        self.ranks = dict(plan)
        return len(todo)

    # --- logging, report, state --------------------------------------------------------------------------
    def _scalars(self) -> dict[str, float]:
        before = sum(r["params_before"] for r in self.layers.values())
        after = sum(r["params_after"] for r in self.layers.values())
        values = {"factorized": float(self.done), "layers": float(len(self.ranks))}
        values["params_ratio"] = before / after if after else 1.0
        if self.layers:
            values["energy_kept"] = min(r["energy_kept"] for r in self.layers.values())
        return values

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.log_scalars(pl_module, self._scalars())

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        log.set_summary(trainer, {f"slim/factorization/final_{k}": v for k, v in self._scalars().items()})

    @override
    def report_rows(self) -> dict[str, Any]:
        before = sum(r["params_before"] for r in self.layers.values())
        after = sum(r["params_after"] for r in self.layers.values())
        return {
            "rule": self.config.rule,
            "at": str(self.config.moment),
            "factorized_at_step": self.factorized_at,
            "layers_factorized": len(self.ranks),
            "ranks": dict(self.ranks),
            "params_before": before,
            "params_after": after,
            "params_ratio": round(before / after, 4) if after else 1.0,
            "energy_kept": {n: r["energy_kept"] for n, r in self.layers.items()},
            "kept_dense": dict(self.kept_dense),
            "unsupported": dict(self.unsupported),
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "ranks": dict(self.ranks),
            "layers": {n: dict(r) for n, r in self.layers.items()},
            "kept_dense": dict(self.kept_dense),
            "unsupported": dict(self.unsupported),
            "done": self.done,
            "factorized_at": self.factorized_at,
            "rule": self.config.rule,
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.ranks = dict(state_dict["ranks"])
        self.layers = {n: dict(r) for n, r in state_dict["layers"].items()}
        self.kept_dense, self.unsupported = dict(state_dict["kept_dense"]), dict(state_dict["unsupported"])
        self.done, self.factorized_at = bool(state_dict["done"]), state_dict["factorized_at"]
