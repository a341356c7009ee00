"""Scoring a super-batch in plain PyTorch: the learner's and the reference's losses (the
reference's cached by example index), combined into per-example (or JEST pair) scores, with
every forward counted in the cost ledger. The callback only decides *when* to call it.

>>> import torch
>>> from torch import nn
>>> learner, reference = nn.Linear(4, 3), nn.Linear(4, 3)
>>> batch = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
>>> scorer = Scorer("learnability", reference=reference)
>>> scorer.scores(learner, batch, 6).shape, scorer.ledger.learner_forwards, scorer.ledger.reference_forwards
(torch.Size([6]), 6, 6)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_slim.batches import BatchFormatError, batch_indices, slice_batch
from lightning_slim.index_cache import IndexCache
from lightning_slim.modules import evaluating
from lightning_slim.selection.accounting import CostLedger
from lightning_slim.selection.functional import NEEDS_REFERENCE, example_scores, pair_loss_matrix, per_example_loss


class Scorer:
    """Scores for ``score`` (a name of :data:`~.functional.SCORES` or ``fn(learner, reference)``).

    ``cache`` holds reference losses by index under ``"loss"``: given complete (precomputed
    reference losses), or filled lazily when a ``reference`` model is also given.
    """

    def __init__(
        self,
        score: str | Callable,
        loss_fn: Callable | None = None,
        reference: nn.Module | None = None,
        cache: IndexCache | None = None,
        joint: bool = False,
        pair_loss_fn: Callable | None = None,
        ledger: CostLedger | None = None,
        slicer: Callable[[Any, torch.Tensor], Any] | None = None,
    ):
        self.score, self.loss_fn, self.reference, self.cache = score, loss_fn, reference, cache
        self.joint, self.pair_loss_fn = joint, pair_loss_fn
        self.ledger = ledger if ledger is not None else CostLedger()
        self.slicer = slicer or (lambda batch, rows: slice_batch(batch, rows))

    @property
    def needs_learner(self) -> bool:
        return self.score != "easy_reference"

    @property
    def needs_reference(self) -> bool:
        has_one = self.reference is not None or self.cache is not None
        return self.score in NEEDS_REFERENCE or (callable(self.score) and has_one)

    def losses(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example losses (or the ``(B, B)`` pair losses with ``joint``) in eval mode, no grad."""
        with evaluating(model) as m:
            out = (
                pair_loss_matrix(m, batch, self.pair_loss_fn)
                if self.joint
                else per_example_loss(m, batch, self.loss_fn)
            )
        return out.detach().float().cpu()

    def reference_losses(self, batch: Any, n: int) -> torch.Tensor:
        if self.cache is None or self.joint:
            self.ledger.reference_forwards += n
            return self.losses(self.reference, batch)
        index = batch_indices(batch)
        if index is None:
            raise BatchFormatError("a reference-loss cache needs batches that carry example indices")
        missing = self.cache.missing(index)
        if missing.any():
            if self.reference is None:
                raise KeyError(f"reference_losses has no loss for example indices {index.cpu()[missing][:10].tolist()}")
            rows = missing.nonzero().flatten()  # computed once per index, on first sight
            self.cache.store(index.cpu()[rows], {"loss": self.losses(self.reference, self.slicer(batch, rows))})
            self.ledger.reference_forwards += len(rows)
        return self.cache.lookup(index)["loss"]

    def scores(self, learner: nn.Module, batch: Any, n: int) -> torch.Tensor:
        """Higher is chosen first: ``(B,)``, or ``(B, B)`` joint scores with ``joint``."""
        learner_loss = reference_loss = None
        if self.needs_learner:
            learner_loss = self.losses(learner, batch)
            self.ledger.learner_forwards += n
        if self.needs_reference:
            reference_loss = self.reference_losses(batch, n)
        return example_scores(self.score, learner_loss, reference_loss)
