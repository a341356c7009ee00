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
from lightning_slim.core.arguments import as_config, check_choice, check_fraction, check_int, check_range
from lightning_slim.core.callback import SlimCallback
from lightning_slim.core.contract import Capability, Effect
from lightning_slim.core.lightning_glue import train_loader
from lightning_slim.core.loading import as_callable, freeze
from lightning_slim.index_cache import IndexCache
from lightning_slim.selection import functional as selecting
from lightning_slim.selection.accounting import CostLedger
from lightning_slim.selection.configs import JointSelection, SelectionWindow
from lightning_slim.selection.preflight import batch_note, check_batch, check_loader, macs_per_example
from lightning_slim.selection.reference import load_reference, reference_loss_cache
from lightning_slim.selection.scoring import Scorer


class OnlineDataSelection(SlimCallback):
    """Score every example of each super-batch without gradients and train on the best ``keep`` fraction.

    The DataLoader yields super-batches; the user's unchanged ``training_step`` receives the chosen
    sub-batch. Scoring runs in eval mode under ``no_grad`` (deterministic, and BatchNorm's running
    statistics only ever see trained examples).

    Args:
        keep: fraction of each super-batch to train on, in (0, 1].
        batch_size: train on exactly this many examples per step instead (overrides ``keep``).
        score: ``"learnability"`` (learner - reference loss), ``"hard"`` (learner loss),
            ``"easy_reference"`` (- reference loss), ``"uniform"`` (the control), or a function
            ``fn(learner_loss, reference_loss) -> scores`` (object or dotted path).
        selection: ``"topk"`` or ``"sample"`` (without replacement from ``softmax(score / temperature)``).
        reference: an ``nn.Module``; ``"teacher"`` (the teacher another callback provides, e.g.
            KnowledgeDistillation's); or ``{"class_path", "checkpoint" | "train_on_holdout", "init_args"}``.
        reference_losses: precomputed reference losses by dataset index (a tensor or a ``torch.save``
            file, see ``compute_reference_losses``); every training index must be covered.
        cache_reference: compute each example's reference loss once, the first time it is seen,
            and keep it (saved in checkpoints). Both caches need batches that carry indices.
        reference_train_examples: examples the reference was trained on (its cost, reported beside).
        loss_fn: ``fn(model, batch) -> (B,) losses`` (object or dotted path). Without it the module's
            ``per_sample_loss(batch)`` is used, else cross-entropy on ``(x, y[, index])`` batches.
            An explicit ``loss_fn`` wins over the module's method (it was asked for).
        joint: True or a :class:`~.configs.JointSelection` (or its dict): JEST joint selection.
        window: a :class:`~.configs.SelectionWindow` (or its dict): the steps to select in.
        selector: ``fn(batch, rows) -> batch`` for batch types ``slice_batch`` cannot slice.
        histogram_every_n_steps: how often score histograms go to W&B (0: never).
        seed: seed of sampling / uniform choices (mixed with epoch, batch index and rank; resumes exactly).

    >>> cb = OnlineDataSelection(keep=0.25, score="hard")
    >>> cb.keep, cb.score
    (0.25, 'hard')
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
    ):
        check_fraction("keep", keep, low_open=True, high_closed=True)
        check_int("batch_size", batch_size, minimum=1, allow_none=True)
        if isinstance(score, str) and score not in selecting.SCORES and "." not in score:
            raise ValueError(f"score={score!r} is not one of {selecting.SCORES} or a dotted path to a function")
        check_choice("selection", selection, selecting.SELECTIONS)
        check_range("temperature", temperature, 0.0, low_open=True)
        check_int("reference_train_examples", reference_train_examples, minimum=0)
        check_int("histogram_every_n_steps", histogram_every_n_steps, minimum=0)
        if reference_losses is not None and reference is not None:
            raise ValueError("give either reference (a model) or reference_losses (a cache), not both")
        if isinstance(joint, bool):
            joint = JointSelection() if joint else None
        self.joint = as_config(JointSelection, joint, "joint")
        if self.joint is not None and score == "uniform":
            raise ValueError("joint=True needs a score other than 'uniform' (uniform has nothing to join)")
        self.window = as_config(SelectionWindow, window, "window") or SelectionWindow()
        self.keep, self.batch_size, self.score, self.selection = float(keep), batch_size, score, selection
        self.temperature, self.reference, self.reference_losses = temperature, reference, reference_losses
        self.cache_reference, self.loss_fn, self.selector, self.seed = cache_reference, loss_fn, selector, seed
        self.histogram_every_n_steps = histogram_every_n_steps
        self.ledger = CostLedger(reference_train_examples=reference_train_examples)
        self.scorer: Scorer | None = None
        self.reference_cache = IndexCache() if cache_reference else None  # filled lazily, checkpointed
        self._built_reference: nn.Module | None = None  # a reference built from a dict: built once, reused
        self._slice: Callable = slice_batch
        self.nominal_super_batch: int | None = None
        self.note = ""  # what keep does to the training batch (said at setup, a line of the report)
        self._noisy: torch.Tensor | None = None
        self.checked = False  # the batch checks ran (on a sample batch in setup, else on the first batch)
        self.macs_error: str | None = None

    # --- the contract ---------------------------------------------------------------------------------
    @override
    def sharded_refusal(self, resuming: bool = False) -> str | None:
        if self.reference is None and self.reference_losses is None and self.joint is None:
            return None  # per rank, as under DDP: tests/sharded
        return "OnlineDataSelection with a reference or joint=True is not tested sharded; reference-free scores are"

    @override
    def requires(self) -> set[Capability]:
        return {Capability.TEACHER} if self.reference == "teacher" else set()

    @property
    def cache(self) -> IndexCache | None:
        """Reference losses by example index (precomputed, or filled as examples are first seen)."""
        return self.scorer.cache if self.scorer is not None else self.reference_cache

    # --- setup: resolve every argument and check it on a sample batch, before training ---------------
    @override
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        score = self.score if self.score in selecting.SCORES else as_callable(self.score, "score")
        loss_fn = as_callable(self.loss_fn, "loss_fn")
        pair_loss_fn = as_callable(self.joint.pair_loss_fn, "pair_loss_fn") if self.joint else None
        selector = as_callable(self.selector, "selector")
        self._slice = (lambda b, rows, n=None: selector(b, rows)) if selector else slice_batch
        has_reference = self.reference is not None or self.reference_losses is not None
        if (score in selecting.NEEDS_REFERENCE) and not has_reference:
            raise ValueError(
                f"score={self.score!r} needs a reference: pass reference= (a model, 'teacher' or a "
                "checkpoint spec) or reference_losses= (a cache by example index)"
            )
        if self.joint and pair_loss_fn is None and not callable(getattr(pl_module, "per_pair_loss", None)):
            raise ValueError(
                "joint selection needs joint={'pair_loss_fn': fn(model, batch) -> (B, B)} pair losses, "
                "or a per_pair_loss(batch) method on the module"
            )
        if self.joint and (self.reference_losses is not None or self.cache_reference):
            raise ValueError(
                "joint selection scores pairs within each super-batch; per-example reference caches "
                "(reference_losses, cache_reference) do not apply: pass a reference model"
            )
        reference = self._resolve_reference(trainer, loss_fn)
        cache = (
            reference_loss_cache(self.reference_losses) if self.reference_losses is not None else self.reference_cache
        )  # a second fit keeps what the first one computed
        self.scorer = Scorer(
            score,
            loss_fn,
            reference,
            cache,
            self.joint is not None,
            pair_loss_fn,
            self.ledger,
            slicer=lambda b, rows: self._slice(b, rows, selecting.example_count(b)),
        )
        self._noisy = getattr(trainer.datamodule, "noisy", None) if trainer.datamodule is not None else None
        if self.keep == 1.0 and self.batch_size is None and self.score != "uniform":
            rank_zero_warn("OnlineDataSelection(keep=1.0) trains on every example: scoring only adds cost")
        loader = train_loader(trainer)
        self.nominal_super_batch = check_loader(loader, self.keep, self.batch_size, self.scorer)
        n = self.nominal_super_batch
        others = sorted(  # the techniques that act on training steps (the report only measures)
            type(cb).__name__ for cb in compose.techniques(trainer) if cb is not self and cb.effects - {Effect.BASELINE}
        )
        self.note = batch_note(self.keep, self.batch_size, n, self._keep_count(n) if n else 0, others)
        if self.note:
            rank_zero_info(f"OnlineDataSelection: {self.note}")
        batch = sample_batch(loader)
        self.checked = False
        if batch is not None:
            self._check(pl_module, batch)
            self._weigh(pl_module, batch)

    def _weigh(self, pl_module, batch) -> None:
        """Measure the learner's and reference's MACs per example once, for the MACs-weighted ledger."""
        if self.ledger.learner_macs or self.score == "uniform":
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
        if isinstance(self.reference, dict):
            if self._built_reference is None:  # built (and trained) once per callback, reused by later fits
                holdout = getattr(trainer.datamodule, "holdout_dataloader", None)
                model, seen = load_reference(
                    self.reference, holdout and (lambda: holdout(shuffle=True)), loss_fn, self.seed
                )
                self._built_reference = freeze(model)
                self.ledger.reference_train_examples += seen
            return self._built_reference
        if isinstance(self.reference, nn.Module):
            return freeze(self.reference)
        if self.reference == "teacher":
            return compose.capability(trainer, Capability.TEACHER, asker=self)  # only read, never its mode
        if isinstance(self.reference, str):
            raise ValueError(
                f"reference={self.reference!r}: the only string allowed is 'teacher'; give a model "
                "or {'class_path', 'checkpoint', 'init_args'}"
            )
        if self.reference is not None:
            raise TypeError(
                f"reference must be an nn.Module, 'teacher' or a checkpoint dict; got {type(self.reference).__name__}"
            )
        return None

    def _check(self, pl_module, batch) -> None:
        check_batch(
            self.scorer, pl_module, batch, selecting.example_count(batch), self.scorer.slicer, selecting.example_count
        )
        self.checked = True

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reference = self.scorer.reference
        if reference is not None and self.reference != "teacher":
            reference.to(pl_module.device)

    # --- the step: score, choose, slice ----------------------------------------------------------------
    def _generator(self, trainer: pl.Trainer, batch_idx: int) -> torch.Generator:
        key = ((self.seed * 1_000_003 + trainer.current_epoch) * 1_000_003 + batch_idx) * 257 + trainer.global_rank
        return torch.Generator().manual_seed(key % (2**63))

    def _keep_count(self, n: int) -> int:
        if self.batch_size is None:
            return max(1, min(n, round(self.keep * n)))
        nominal = self.nominal_super_batch or n
        return max(1, min(n, self.batch_size if n >= nominal else round(n * self.batch_size / nominal)))

    @override
    def select_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if not self.checked:  # no sample batch before training (an iterable dataset): check the first one
            self._check(pl_module, batch)
            self._weigh(pl_module, batch)
        n = selecting.example_count(batch)
        k, g = self._keep_count(n), self._generator(trainer, batch_idx)
        in_window = self.window.contains(trainer.global_step)
        active = in_window and self.score != "uniform"
        scores = None
        if active:
            scores = self.scorer.scores(pl_module, batch, n)
            rows = (
                selecting.jest_select(scores, k, self.joint.num_chunks, g, self.selection, self.temperature)
                if self.joint
                else selecting.select(scores, k, self.selection, g, self.temperature)
            )
        elif in_window or self.window.outside == "uniform":
            rows = selecting.select_uniform(n, k, g)
        else:
            rows = torch.arange(n)
        rows = rows.sort().values
        self.ledger.step(seen=n, trained=len(rows), active=active)
        self._log(trainer, pl_module, batch, rows, scores, n)
        return batch if len(rows) == n else self._slice(batch, rows, n)

    # --- logging, report, state --------------------------------------------------------------------
    def _log(self, trainer, pl_module, batch, rows, scores, n) -> None:
        values = {"active": float(self.ledger.last_active), "kept_fraction": len(rows) / n, **self.ledger.summary()}
        idx = batch_indices(batch) if self._noisy is not None else None
        if idx is not None and int(idx.max()) < len(self._noisy):
            noisy = self._noisy[idx.long().cpu()]
            self.ledger.noisy(int(noisy.sum()), int(noisy[rows].sum()), n, len(rows))
            values.update(
                batch_noisy_fraction_selected=float(noisy[rows].float().mean()),
                batch_noisy_fraction_seen=float(noisy.float().mean()),
            )
            values.update(self.ledger.noisy_summary())
        if scores is not None:
            s = scores.diagonal() if scores.dim() == 2 else scores
            values.update(score_mean=float(s.mean()), selected_score_mean=float(s[rows].mean()))
            every = self.histogram_every_n_steps
            if every and trainer.global_step % every == 0 and trainer.is_global_zero:
                log.log_histogram(trainer, "slim/selection/scores", s)
                log.log_histogram(trainer, "slim/selection/selected_scores", s[rows])
        self.log_scalars(pl_module, values, batch_size=len(rows))

    @override
    def report_rows(self) -> dict[str, Any]:
        return {
            "score": self.score if isinstance(self.score, str) else getattr(self.score, "__name__", "custom"),
            "keep": self.keep if self.batch_size is None else f"{self.batch_size} per super-batch",
            "super_batch": self.nominal_super_batch,
            "trained_per_step": self._keep_count(self.nominal_super_batch) if self.nominal_super_batch else None,
            **({"batch_note": self.note} if self.note else {}),
            "joint": self.joint is not None,
            **self.ledger.summary(),
            **self.ledger.noisy_summary(),
            **({"macs_error": self.macs_error} if self.macs_error else {}),
        }

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            log.set_summary(trainer, {log.metric_key(self.technique, k): v for k, v in self.ledger.summary().items()})

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
