"""OnlineDataSelection: train on the most learnable part of each super-batch (RHO-LOSS, JEST).
The Lightning shell around :mod:`.scoring` (what the scores are) and :mod:`.functional` (which rows)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_slim.batches import batch_indices, sample_batch, slice_batch
from lightning_slim.core import compose, log
from lightning_slim.core.arguments import config_from
from lightning_slim.core.callback import SlimCallback
from lightning_slim.core.contract import Capability, Effect
from lightning_slim.core.lightning_glue import train_loader
from lightning_slim.core.loading import as_callable, freeze
from lightning_slim.index_cache import IndexCache
from lightning_slim.selection.accounting import CostLedger
from lightning_slim.selection.configs import JointSelection, SelectionConfig, SelectionWindow
from lightning_slim.selection.functional import (
    NEEDS_REFERENCE,
    SCORES,
    example_count,
    jest_select,
    select,
    select_uniform,
)
from lightning_slim.selection.preflight import batch_note, check_batch, check_loader, macs_per_example
from lightning_slim.selection.reference import load_reference, reference_loss_cache
from lightning_slim.selection.scoring import Scorer


class OnlineDataSelection(SlimCallback):
    """Score every example of each super-batch without gradients and train on the best ``keep`` fraction.

    The DataLoader yields super-batches; the user's unchanged ``training_step`` receives the chosen
    sub-batch. Scoring runs in eval mode under ``no_grad`` (deterministic, and BatchNorm's running
    statistics only ever see trained examples).

    Args: the fields of :class:`~.configs.SelectionConfig` (each is described there): ``keep``,
    ``batch_size``, ``score``, ``selection``, ``temperature``, ``reference``, ``reference_losses``,
    ``cache_reference``, ``reference_train_examples``, ``loss_fn``, ``joint``, ``window``, ``selector``,
    ``histogram_every_n_steps``, ``seed``; or ``config``: a ``SelectionConfig`` (or its dict) instead.

    >>> cb = OnlineDataSelection(keep=0.25, score="hard")
    >>> cb.keep, cb.score
    (0.25, 'hard')
    >>> OnlineDataSelection(config={"keep": 0.25, "score": "hard"}).config == cb.config
    True
    """

    technique = "selection"
    effects = frozenset({Effect.SELECT_BATCH})

    def __init__(
        self,
        keep: float = 0.1,
        batch_size: int | None = None,
        score: str | Callable = "learnability",
        selection: str = "topk",
        temperature: float = 1.0,
        reference: Any = None,
        reference_losses: str | torch.Tensor | None = None,
        cache_reference: bool = False,
        reference_train_examples: int = 0,
        loss_fn: str | Callable | None = None,
        joint: bool | JointSelection | dict = False,
        window: SelectionWindow | dict | None = None,
        selector: str | Callable | None = None,
        histogram_every_n_steps: int = 50,
        seed: int = 0,
        config: SelectionConfig | dict | None = None,
    ):
        self.config: SelectionConfig = config_from(SelectionConfig, config, locals())
        config = self.config
        self.ledger = CostLedger(reference_train_examples=config.reference_train_examples)  # this rank's
        self.job_ledger = self.ledger  # every rank's counts added up (the same object when not distributed)
        self.scorer: Scorer | None = None
        self.reference_cache = IndexCache() if config.cache_reference else None  # filled lazily, checkpointed
        self._built_reference: nn.Module | None = None  # a reference built from a dict: built once, reused
        self._slice: Callable = slice_batch
        self.nominal_super_batch: int | None = None
        self.note = ""  # what keep does to the training batch (said at setup, a line of the report)
        self._noisy: torch.Tensor | None = None
        self.checked = False  # the batch checks ran (on a sample batch in setup, else on the first batch)
        self.macs_error: str | None = None

    @property
    def keep(self) -> float:
        return self.config.keep

    @property
    def score(self) -> str | Callable:
        return self.config.score

    # --- the contract ---------------------------------------------------------------------------------
    @override
    def sharded_refusal(self, resuming: bool = False) -> str | None:
        # each rank scores its own super-batch, as under DDP (a frozen reference replicated on every rank;
        # reference losses read or cached by the batch's global dataset index): tests/sharded/test_selection.py
        if isinstance(self.config.reference, dict):
            return (
                "OnlineDataSelection with a reference built from a dict spec is not tested sharded; build it "
                "and pass the nn.Module (or reference_losses)"
            )
        if resuming and self.config.cache_reference:
            return (
                "OnlineDataSelection(cache_reference=True) cannot resume sharded (untested): each rank fills its "
                "own cache and a checkpoint keeps rank 0's"
            )
        return None

    @override
    def requires(self) -> set[Capability]:
        return {Capability.TEACHER} if self.config.reference == "teacher" else set()

    @property
    def cache(self) -> IndexCache | None:
        """Reference losses by example index (precomputed, or filled as examples are first seen)."""
        return self.scorer.cache if self.scorer is not None else self.reference_cache

    # --- setup: resolve every argument and check it on a sample batch, before training ---------------
    @override
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        score = self.config.score if self.config.score in SCORES else as_callable(self.config.score, "score")
        loss_fn = as_callable(self.config.loss_fn, "loss_fn")
        pair_loss_fn = as_callable(self.config.joint.pair_loss_fn, "pair_loss_fn") if self.config.joint else None
        selector = as_callable(self.config.selector, "selector")
        self._slice = (lambda b, rows, n=None: selector(b, rows)) if selector else slice_batch
        has_reference = self.config.reference is not None or self.config.reference_losses is not None
        if (score in NEEDS_REFERENCE) and not has_reference:
            raise ValueError(
                f"score={self.config.score!r} needs a reference: pass reference= (a model, 'teacher' or a "
                "checkpoint spec) or reference_losses= (a cache by example index)"
            )
        if self.config.joint and pair_loss_fn is None and not callable(getattr(pl_module, "per_pair_loss", None)):
            raise ValueError(
                "joint selection needs joint={'pair_loss_fn': fn(model, batch) -> (B, B)} pair losses, "
                "or a per_pair_loss(batch) method on the module"
            )
        if self.config.joint and (self.config.reference_losses is not None or self.config.cache_reference):
            raise ValueError(
                "joint selection scores pairs within each super-batch; per-example reference caches "
                "(reference_losses, cache_reference) do not apply: pass a reference model"
            )
        reference = self._resolve_reference(trainer, loss_fn)
        cache = (
            reference_loss_cache(self.config.reference_losses)
            if self.config.reference_losses is not None
            else self.reference_cache
        )  # a second fit keeps what the first one computed
        self.scorer = Scorer(
            score,
            loss_fn,
            reference,
            cache,
            self.config.joint is not None,
            pair_loss_fn,
            self.ledger,
            slicer=lambda b, rows: self._slice(b, rows, example_count(b)),
        )
        self._noisy = getattr(trainer.datamodule, "noisy", None) if trainer.datamodule is not None else None
        if self.config.keep == 1.0 and self.config.batch_size is None and self.config.score != "uniform":
            rank_zero_warn("OnlineDataSelection(keep=1.0) trains on every example: scoring only adds cost")
        loader = train_loader(trainer)
        self.nominal_super_batch = check_loader(loader, self.config.keep, self.config.batch_size, self.scorer)
        n = self.nominal_super_batch
        others = sorted(  # the techniques that act on training steps (the report only measures)
            type(cb).__name__ for cb in compose.techniques(trainer) if cb is not self and cb.effects - {Effect.BASELINE}
        )
        self.note = batch_note(self.config.keep, self.config.batch_size, n, self._keep_count(n) if n else 0, others)
        if self.note:
            rank_zero_info(f"OnlineDataSelection: {self.note}")
        batch = sample_batch(loader)
        self.checked = False
        if batch is not None:
            self._check(pl_module, batch)
            self._weigh(pl_module, batch)

    def _weigh(self, pl_module, batch) -> None:
        """Measure the learner's and reference's MACs per example once, for the MACs-weighted ledger."""
        if self.ledger.learner_macs or self.config.score == "uniform":
            return
        reference = self.scorer.reference if self.scorer.needs_reference else None
        try:
            learner, tokens = macs_per_example(self.scorer, pl_module, batch)
            reference_macs = macs_per_example(self.scorer, reference, batch)[0] if reference is not None else 0.0
            self.ledger.weigh(learner, reference_macs, tokens)
            self.macs_error = None
        except Exception as err:
            self.macs_error = f"not measurable: {type(err).__name__}: {err}"[:240]
            rank_zero_warn(
                f"OnlineDataSelection cannot measure the models' MACs on a sample batch ({self.macs_error}); "
                "its cost ledger counts examples only (compute_units), not MACs"
            )

    def _resolve_reference(self, trainer, loss_fn) -> nn.Module | None:
        reference = self.config.reference
        if isinstance(reference, dict):
            if self._built_reference is None:  # built (and trained) once per callback, reused by later fits
                holdout = getattr(trainer.datamodule, "holdout_dataloader", None)
                model, seen = load_reference(
                    reference, holdout and (lambda: holdout(shuffle=True)), loss_fn, self.config.seed
                )
                self._built_reference = freeze(model)
                self.ledger.reference_train_examples += seen
            return self._built_reference
        if isinstance(reference, nn.Module):
            return freeze(reference)
        if reference == "teacher":
            return compose.capability(trainer, Capability.TEACHER, asker=self)  # only read, never its mode
        return None  # no reference (SelectionConfig refuses any other kind)

    def _check(self, pl_module, batch) -> None:
        check_batch(self.scorer, pl_module, batch, example_count(batch), self.scorer.slicer, example_count)
        self.checked = True

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reference = self.scorer.reference
        if reference is not None and self.config.reference != "teacher":
            reference.to(pl_module.device)

    # --- the step: score, choose, slice ----------------------------------------------------------------
    def _generator(self, trainer: pl.Trainer, batch_idx: int) -> torch.Generator:
        key = (
            (self.config.seed * 1_000_003 + trainer.current_epoch) * 1_000_003 + batch_idx
        ) * 257 + trainer.global_rank
        return torch.Generator().manual_seed(key % (2**63))

    def _keep_count(self, n: int) -> int:
        if self.config.batch_size is None:
            return max(1, min(n, round(self.config.keep * n)))
        nominal = self.nominal_super_batch or n
        return max(1, min(n, self.config.batch_size if n >= nominal else round(n * self.config.batch_size / nominal)))

    @override
    def select_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if not self.checked:  # no sample batch before training (an iterable dataset): check the first one
            self._check(pl_module, batch)
            self._weigh(pl_module, batch)
        n = example_count(batch)
        k, g = self._keep_count(n), self._generator(trainer, batch_idx)
        in_window = self.config.window.contains(trainer.global_step)
        active = in_window and self.config.score != "uniform"
        scores = None
        if active:
            scores = self.scorer.scores(pl_module, batch, n)
            rows = (
                jest_select(scores, k, self.config.joint.num_chunks, g, self.config.selection, self.config.temperature)
                if self.config.joint
                else select(scores, k, self.config.selection, g, self.config.temperature)
            )
        elif in_window or self.config.window.outside == "uniform":
            rows = select_uniform(n, k, g)
        else:
            rows = torch.arange(n)
        rows = rows.sort().values
        self.ledger.step(seen=n, trained=len(rows), active=active)
        self._log(trainer, pl_module, batch, rows, scores, n)
        return batch if len(rows) == n else self._slice(batch, rows, n)

    # --- logging, report, state --------------------------------------------------------------------
    def _log(self, trainer, pl_module, batch, rows, scores, n) -> None:
        idx = batch_indices(batch) if self._noisy is not None else None
        values: dict[str, float] = {"kept_fraction": len(rows) / n}
        if idx is not None and int(idx.max()) < len(self._noisy):
            noisy = self._noisy[idx.long().cpu()]
            self.ledger.noisy(int(noisy.sum()), int(noisy[rows].sum()), n, len(rows))
            values.update(
                batch_noisy_fraction_selected=float(noisy[rows].float().mean()),
                batch_noisy_fraction_seen=float(noisy.float().mean()),
            )
        # the whole job's counts: every rank selects (and so reduces) at every step
        self.job_ledger = self.ledger.across_ranks()
        job = self.job_ledger
        values.update(active=float(job.last_active), **job.summary(), **job.noisy_summary())
        if scores is not None:
            s = scores.diagonal() if scores.dim() == 2 else scores
            values.update(score_mean=float(s.mean()), selected_score_mean=float(s[rows].mean()))
            every = self.config.histogram_every_n_steps
            if every and trainer.global_step % every == 0 and trainer.is_global_zero:
                log.log_histogram(trainer, "slim/selection/scores", s)
                log.log_histogram(trainer, "slim/selection/selected_scores", s[rows])
        self.log_scalars(pl_module, values, batch_size=len(rows))

    @override
    def report_rows(self) -> dict[str, Any]:
        return {
            "score": self.config.score
            if isinstance(self.config.score, str)
            else getattr(self.config.score, "__name__", "custom"),
            "keep": self.config.keep if self.config.batch_size is None else f"{self.config.batch_size} per super-batch",
            "super_batch": self.nominal_super_batch,
            "trained_per_step": self._keep_count(self.nominal_super_batch) if self.nominal_super_batch else None,
            **({"batch_note": self.note} if self.note else {}),
            "joint": self.config.joint is not None,
            **self.job_ledger.summary(),
            **self.job_ledger.noisy_summary(),
            **({"macs_error": self.macs_error} if self.macs_error else {}),
        }

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            job = self.job_ledger.summary()
            log.set_summary(trainer, {log.metric_key(self.technique, k): v for k, v in job.items()})

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"ledger": self.ledger.state_dict()}
        if self.reference_cache is not None:
            state["reference_cache"] = self.reference_cache.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state_dict["ledger"])
        if "reference_cache" in state_dict and self.reference_cache is not None:
            self.reference_cache.load_state_dict(state_dict["reference_cache"])
