"""OnlineDataSelection: train on the most learnable part of each super-batch (RHO-LOSS, JEST)."""
from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_slim import interception, log
from lightning_slim.batches import BatchFormatError, batch_indices, slice_batch
from lightning_slim.callback import SlimCallback
from lightning_slim.selection import functional as F
from lightning_slim.selection.accounting import CostLedger
from lightning_slim.selection.checks import check_batch, check_before_training
from lightning_slim.selection.reference import ReferenceLossCache, as_callable, freeze, load_reference

WINDOW_MODES = ("uniform", "full")


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
        reference: an ``nn.Module``; ``"teacher"`` (the ``teacher`` of another callback, e.g.
            KnowledgeDistillation); or ``{"class_path", "checkpoint", "init_args"}``.
        reference_losses: precomputed reference losses by dataset index (a tensor or a ``torch.save``
            file, see ``compute_reference_losses``); every training index must be covered.
        cache_reference: compute each example's reference loss once, the first time it is seen,
            and keep it (saved in checkpoints). Both caches need batches that carry indices.
        loss_fn: ``fn(model, batch) -> (B,) losses`` (object or dotted path). Without it the module's
            ``per_sample_loss(batch)`` is used, else cross-entropy on ``(x, y[, index])`` batches.
            An explicit ``loss_fn`` wins over the module's method (it was asked for).
        joint: JEST joint selection for batch-level losses, from ``pair_loss_fn(model, batch) -> (B, B)``
            pair losses (or the module's ``per_pair_loss(batch)``), in ``num_chunks`` chunks.
        start_step, end_step: select only for optimizer steps in ``[start_step, end_step)``; outside,
            ``outside_window="uniform"`` trains on a random sub-batch of the same size (no scoring),
            ``"full"`` on the whole super-batch.
        selector: ``fn(batch, rows) -> batch`` for batch types ``slice_batch`` cannot slice.
        reference_train_examples: examples the reference was trained on (its cost, reported beside).
        histogram_every_n_steps: how often score histograms go to W&B (0: never).
        seed: seed of sampling / uniform choices (mixed with epoch, batch index and rank; resumes exactly).

    >>> cb = OnlineDataSelection(keep=0.25, score="hard")
    >>> cb.keep, cb.score
    (0.25, 'hard')
    """

    technique = "selection"
    step_order = interception.ORDER_SELECTION

    def __init__(self, keep: float = 0.1, batch_size: int | None = None, score: str | Callable = "learnability",
                 selection: str = "topk", temperature: float = 1.0, reference: Any = None,
                 reference_losses: str | torch.Tensor | None = None, cache_reference: bool = False,
                 loss_fn: str | Callable | None = None, joint: bool = False,
                 pair_loss_fn: str | Callable | None = None, num_chunks: int = 4, start_step: int = 0,
                 end_step: int | None = None, outside_window: str = "uniform",
                 selector: str | Callable | None = None, reference_train_examples: int = 0,
                 histogram_every_n_steps: int = 50, seed: int = 0):
        if not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise ValueError(f"keep={keep!r} must be a fraction in (0, 1]")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer or None")
        if isinstance(score, str) and score not in F.SCORES and "." not in score:
            raise ValueError(f"score={score!r} is not one of {F.SCORES} or a dotted path to a function")
        if selection not in F.SELECTIONS:
            raise ValueError(f"selection={selection!r} is not one of {F.SELECTIONS}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be positive")
        if not isinstance(num_chunks, int) or num_chunks < 1:
            raise ValueError(f"num_chunks={num_chunks!r} must be a positive integer")
        if start_step < 0 or (end_step is not None and end_step <= start_step):
            raise ValueError(f"the window start_step={start_step!r}, end_step={end_step!r} must satisfy "
                             "0 <= start_step < end_step (or end_step=None)")
        if outside_window not in WINDOW_MODES:
            raise ValueError(f"outside_window={outside_window!r} is not one of {WINDOW_MODES}")
        if reference_losses is not None and reference is not None:
            raise ValueError("give either reference (a model) or reference_losses (a cache), not both")
        if reference_train_examples < 0 or histogram_every_n_steps < 0:
            raise ValueError(f"reference_train_examples={reference_train_examples!r} and histogram_every_n_steps="
                             f"{histogram_every_n_steps!r} must be >= 0")
        if joint and score == "uniform":
            raise ValueError("joint=True needs a score other than 'uniform' (uniform has nothing to join)")
        self.keep, self.batch_size, self.score, self.selection = float(keep), batch_size, score, selection
        self.temperature, self.reference, self.reference_losses = temperature, reference, reference_losses
        self.cache_reference, self.loss_fn = cache_reference, loss_fn
        self.joint, self.pair_loss_fn = joint, pair_loss_fn
        self.num_chunks, self.start_step, self.end_step = num_chunks, start_step, end_step
        self.outside_window, self.selector, self.seed = outside_window, selector, seed
        self.histogram_every_n_steps = histogram_every_n_steps
        self.ledger = CostLedger(reference_train_examples=reference_train_examples)
        self.cache: ReferenceLossCache | None = None
        self._reference_model: nn.Module | None = None
        self._score_fn = self._loss = self._pair_loss = self._selector = None
        self.nominal_super_batch: int | None = None
        self._noisy: torch.Tensor | None = None
        self.checked = False  # the batch checks ran (on a sample batch in setup, else on the first batch)

    # --- setup: resolve every argument and check it on a sample batch, before training ---------------
    def needs_reference(self) -> bool:
        return self.score in F.NEEDS_REFERENCE or (callable(self._score_fn) and self.has_reference())

    def has_reference(self) -> bool:
        return self.reference is not None or self.reference_losses is not None

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._score_fn = as_callable(self.score, "score") if self.score not in F.SCORES else self.score
        self._loss = as_callable(self.loss_fn, "loss_fn")
        self._pair_loss = as_callable(self.pair_loss_fn, "pair_loss_fn")
        self._selector = as_callable(self.selector, "selector")
        if self.needs_reference() and not self.has_reference():
            raise ValueError(f"score={self.score!r} needs a reference: pass reference= (a model, 'teacher' or a "
                             "checkpoint spec) or reference_losses= (a cache by example index)")
        if self.joint and self._pair_loss is None and not callable(getattr(pl_module, "per_pair_loss", None)):
            raise ValueError("joint=True needs pair_loss_fn(model, batch) -> (B, B) pair losses, or a "
                             "per_pair_loss(batch) method on the module")
        if self.joint and (self.reference_losses is not None or self.cache_reference):
            raise ValueError("joint=True scores pairs within each super-batch; per-example reference caches "
                             "(reference_losses, cache_reference) do not apply: pass a reference model")
        if isinstance(self.reference, dict):
            if self._reference_model is None:  # built (and trained) once per callback, reused by later fits
                holdout = getattr(trainer.datamodule, "holdout_dataloader", None)
                model, seen = load_reference(self.reference, holdout and (lambda: holdout(shuffle=True)),
                                             self._loss, self.seed)
                self._reference_model = freeze(model)
                self.ledger.reference_train_examples += seen
        elif isinstance(self.reference, nn.Module):
            self._reference_model = freeze(self.reference)
        elif isinstance(self.reference, str):
            if self.reference != "teacher":
                raise ValueError(f"reference={self.reference!r}: the only string allowed is 'teacher'; "
                                 "give a model or {'class_path', 'checkpoint', 'init_args'}")
            if not any(hasattr(cb, "teacher") for cb in trainer.callbacks if cb is not self):
                raise ValueError("reference='teacher' needs another callback with a `teacher` attribute "
                                 "(e.g. KnowledgeDistillation) in trainer.callbacks")
        elif self.reference is not None:
            raise TypeError(f"reference must be an nn.Module, 'teacher' or a checkpoint dict; got "
                            f"{type(self.reference).__name__}")
        if self.reference_losses is not None:
            self.cache = (ReferenceLossCache.from_file(self.reference_losses) if isinstance(self.reference_losses, str)
                          else ReferenceLossCache(torch.as_tensor(self.reference_losses)))
        elif self.cache_reference and self.cache is None:
            self.cache = ReferenceLossCache()
        self._noisy = getattr(trainer.datamodule, "noisy", None) if trainer.datamodule is not None else None
        if self.keep == 1.0 and self.batch_size is None and self.score != "uniform":
            rank_zero_warn("OnlineDataSelection(keep=1.0) trains on every example: scoring only adds cost")
        self.checked = False
        self.nominal_super_batch = check_before_training(self, trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reference == "teacher":
            teachers = [cb.teacher for cb in trainer.callbacks if cb is not self and hasattr(cb, "teacher")]
            found = [t for t in teachers if isinstance(t, nn.Module)]
            if not found:
                raise ValueError("reference='teacher': the callback's `teacher` is not an nn.Module at fit start")
            self._reference_model = found[0]  # shared with its owner: only read it, never change its mode
        if self._reference_model is not None and self.reference != "teacher":
            self._reference_model.to(pl_module.device)

    # --- the step: score, choose, slice ----------------------------------------------------------------
    def _generator(self, trainer: pl.Trainer, batch_idx: int) -> torch.Generator:
        key = ((self.seed * 1_000_003 + trainer.current_epoch) * 1_000_003 + batch_idx) * 257 + trainer.global_rank
        return torch.Generator().manual_seed(key % (2**63))

    def _keep_count(self, n: int) -> int:
        if self.batch_size is None:
            return max(1, min(n, round(self.keep * n)))
        nominal = self.nominal_super_batch or n
        return max(1, min(n, self.batch_size if n >= nominal else round(n * self.batch_size / nominal)))

    def in_window(self, step: int) -> bool:
        return step >= self.start_step and (self.end_step is None or step < self.end_step)

    def _reference_loss(self, batch, n: int) -> torch.Tensor:
        if self.cache is None:
            self.ledger.reference_forwards += n
            with F.scoring_mode(self._reference_model) as ref:
                return F.per_example_loss(ref, batch, self._loss)
        idx = batch_indices(batch)
        if idx is None:
            raise BatchFormatError("a reference-loss cache needs batches that carry example indices")
        missing = self.cache.missing(idx)
        if len(missing) and self._reference_model is None:
            raise KeyError(f"reference_losses has no loss for example indices {missing[:10].tolist()}")
        if len(missing):  # cache_reference: computed once per index, on first sight
            rows = torch.isin(idx.long().cpu(), missing).nonzero().flatten()
            with F.scoring_mode(self._reference_model) as ref:
                self.cache.put(idx.cpu()[rows], F.per_example_loss(ref, self._select_rows(batch, rows), self._loss))
            self.ledger.reference_forwards += len(rows)
        return self.cache.get(idx)

    def _scores(self, pl_module, batch, n: int) -> torch.Tensor:
        if self.joint:
            learner = reference = None
            if self.score != "easy_reference":
                with F.scoring_mode(pl_module) as m:
                    learner = F.pair_loss_matrix(m, batch, self._pair_loss).float()
                self.ledger.learner_forwards += n
            if self.needs_reference():
                with F.scoring_mode(self._reference_model) as ref:
                    reference = F.pair_loss_matrix(ref, batch, self._pair_loss).float()
                self.ledger.reference_forwards += n
            return F.example_scores(self._score_fn, learner, reference)
        learner = reference = None
        if self.score != "easy_reference":
            with F.scoring_mode(pl_module) as m:
                learner = F.per_example_loss(m, batch, self._loss).detach().float().cpu()
            self.ledger.learner_forwards += n
        if self.needs_reference():
            reference = self._reference_loss(batch, n).detach().float().cpu()
        return F.example_scores(self._score_fn, learner, reference)

    def _super_batch_size(self, batch) -> int:
        return F.example_count(batch)

    def _select_rows(self, batch, rows: torch.Tensor, n: int | None = None):
        if self._selector is not None:
            return self._selector(batch, rows)
        return slice_batch(batch, rows, size=n if n is not None else self._super_batch_size(batch))

    def transform_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if not self.checked:  # no sample batch before training (an iterable dataset): check the first one
            check_batch(self, pl_module, batch)
        n = self._super_batch_size(batch)
        k = self._keep_count(n)
        g = self._generator(trainer, batch_idx)
        active = self.in_window(trainer.global_step) and self.score != "uniform"
        scores = None
        if active:
            scores = self._scores(pl_module, batch, n)
            if self.joint:
                rows = F.jest_select(scores, k, self.num_chunks, g, self.selection, self.temperature)
            else:
                rows = F.select(scores, k, self.selection, g, self.temperature)
        elif self.in_window(trainer.global_step) or self.outside_window == "uniform":
            rows = F.select_uniform(n, k, g)
        else:
            rows = torch.arange(n)
        rows = rows.sort().values
        self.ledger.step(seen=n, trained=len(rows), active=active)
        self._log(trainer, pl_module, batch, rows, scores, n)
        return batch if len(rows) == n else self._select_rows(batch, rows, n)

    # --- logging, report, state --------------------------------------------------------------------
    def _log(self, trainer, pl_module, batch, rows, scores, n) -> None:
        values = {"active": float(self.ledger.last_active), "kept_fraction": len(rows) / n, **self.ledger.summary()}
        idx = batch_indices(batch) if self._noisy is not None else None
        if idx is not None and int(idx.max()) < len(self._noisy):
            noisy = self._noisy[idx.long().cpu()]
            self.ledger.noisy(int(noisy.sum()), int(noisy[rows].sum()), n, len(rows))
            values.update(batch_noisy_fraction_selected=float(noisy[rows].float().mean()),
                          batch_noisy_fraction_seen=float(noisy.float().mean()))
            values.update(self.ledger.noisy_summary())
        if scores is not None:
            s = scores.diagonal() if scores.dim() == 2 else scores
            values.update(score_mean=float(s.mean()), selected_score_mean=float(s[rows].mean()))
            every = self.histogram_every_n_steps
            if every and trainer.global_step % every == 0 and trainer.is_global_zero:
                log.log_histogram(trainer, "slim/selection/scores", s)
                log.log_histogram(trainer, "slim/selection/selected_scores", s[rows])
        self.log_scalars(pl_module, values, batch_size=len(rows))

    def report_rows(self) -> dict[str, Any]:
        rows = {"score": self.score if isinstance(self.score, str) else getattr(self.score, "__name__", "custom"),
                "keep": self.keep if self.batch_size is None else f"{self.batch_size} per super-batch",
                "joint": self.joint, **self.ledger.summary(), **self.ledger.noisy_summary()}
        return rows

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            log.set_summary(trainer, {log.metric_key(self.technique, k): v for k, v in self.ledger.summary().items()})

    def state_dict(self) -> dict[str, Any]:
        state = {"ledger": self.ledger.state_dict()}
        if self.cache_reference and self.cache is not None:
            state["reference_cache"] = self.cache.losses.clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state_dict["ledger"])
        if "reference_cache" in state_dict and self.cache_reference:
            self.cache = ReferenceLossCache(state_dict["reference_cache"])

    def teardown(self, trainer, pl_module, stage):
        super().teardown(trainer, pl_module, stage)
        if stage == "fit" and self.reference == "teacher":
            self._reference_model = None  # owned by the other callback
