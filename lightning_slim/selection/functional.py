"""Online data selection in plain torch (no Lightning): per-example losses, scores, top-k or
sampled selection, and JEST's joint selection for batch-level losses.

Scores (higher = more worth training on):

- ``learnability``: learner loss - reference loss (RHO-LOSS's reducible loss; JEST's learnability);
- ``hard``: learner loss;
- ``easy_reference``: - reference loss (what a model trained on clean data finds easy);
- ``uniform``: no score, a uniformly random subset (the control).

>>> import torch
>>> scores = example_scores("learnability", torch.tensor([2.0, 0.1, 3.0]), torch.tensor([0.5, 0.1, 2.9]))
>>> select_topk(scores, 1).tolist()
[0]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_slim.batches import batch_targets, example_count  # noqa: F401 (example_count: re-exported)
from lightning_slim.modules import call_arguments, evaluating, forward_target
from lightning_slim.tokens import logits_and_producer, sequence_losses, token_positions

SCORES = ("learnability", "hard", "easy_reference", "uniform")
NEEDS_LEARNER = {"learnability", "hard"}
NEEDS_REFERENCE = {"learnability", "easy_reference"}
SELECTIONS = ("topk", "sample")

# cost units of the accounting: a trained example = forward + backward = 3, a scoring forward = 1
TRAIN_UNITS, FORWARD_UNITS = 3, 1


def default_per_sample_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The per-example loss when the user gives none, with the model called as it is trained
    (:func:`~lightning_slim.modules.call_model`: ``self(x)``, or ``self.model(input_ids=...,
    attention_mask=...)`` for a module without ``forward``):

    - token logits ``(B, T, V)`` with ``(B, T)`` labels (a Hugging Face ``ModelOutput.logits`` and
      the batch's ``labels``, shifted by one as a causal LM's own loss shifts them; or the ``y`` of
      an ``(x, y)`` batch): each sequence's mean token cross-entropy over its counted positions
      (not ``ignore_index``, not padding; :mod:`lightning_slim.tokens`);
    - otherwise cross-entropy per example against the batch's targets (``(x, y[, index])`` or dict
      classification batches).
    """
    _, target = forward_target(model)
    args, kwargs = call_arguments(target, batch)
    logits, producer = logits_and_producer(target, args, kwargs)
    positions = token_positions(logits, batch, kwargs, producer)
    if positions is not None:
        return sequence_losses(logits, *positions)[0]
    return F.cross_entropy(logits, batch_targets(batch), reduction="none")


def per_example_loss(model: nn.Module, batch: Any, loss_fn: Callable | None = None) -> torch.Tensor:
    """Per-example losses (shape ``(B,)``): ``loss_fn(model, batch)`` when given, else the model's
    ``per_sample_loss(batch)``, else :func:`default_per_sample_loss`."""
    if loss_fn is not None:
        return loss_fn(model, batch)
    if callable(getattr(model, "per_sample_loss", None)):
        return model.per_sample_loss(batch)
    return default_per_sample_loss(model, batch)


def pair_loss_matrix(model: nn.Module, batch: Any, pair_loss_fn: Callable | None = None) -> torch.Tensor:
    """The ``(B, B)`` pair-loss matrix of a batch-level loss: ``pair_loss_fn(model, batch)`` when given,
    else the model's ``per_pair_loss(batch)``. Entry ``(i, j)`` is the loss of pairing example i's
    first view with example j's second view, so a sub-batch S costs ``M[S][:, S].sum()``."""
    if pair_loss_fn is not None:
        return pair_loss_fn(model, batch)
    return model.per_pair_loss(batch)


def sigmoid_pair_losses(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise loss matrix from ``(B, B)`` similarity logits: ``-log sigmoid(z_ij * l_ij)``
    with ``z = +1`` on the diagonal (matching pairs) and ``-1`` elsewhere."""
    z = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits)


# scoring runs in eval mode without gradients (the package's one helper for it)
scoring_mode = evaluating


def example_scores(
    score: str | Callable, learner_loss: torch.Tensor | None, reference_loss: torch.Tensor | None
) -> torch.Tensor:
    """Per-example scores (higher is selected first) for a score name or a user function
    ``fn(learner_loss, reference_loss) -> scores`` (``reference_loss`` is None without a reference)."""
    if callable(score):
        return score(learner_loss, reference_loss)
    if score == "learnability":
        return learner_loss - reference_loss
    if score == "hard":
        return learner_loss
    if score == "easy_reference":
        return -reference_loss
    raise ValueError(f"score={score!r} is not one of {SCORES} or a function")


def _gumbel(shape, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator).clamp_(1e-20, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores."""
    return torch.topk(scores.detach().float().cpu(), k).indices


def select_sample(scores: torch.Tensor, k: int, generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """``k`` indices sampled without replacement with probability ``softmax(scores / temperature)``
    (Gumbel top-k)."""
    logits = scores.detach().float().cpu() / temperature
    return torch.topk(logits + _gumbel(logits.shape, generator), k).indices


def select_uniform(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` of ``n`` indices uniformly at random."""
    return torch.randperm(n, generator=generator)[:k]


def select(scores: torch.Tensor, k: int, method: str, generator: torch.Generator, temperature: float = 1.0):
    if method == "topk":
        return select_topk(scores, k)
    if method == "sample":
        return select_sample(scores, k, generator, temperature)
    raise ValueError(f"selection={method!r} is not one of {SELECTIONS}")


def chunk_sizes(k: int, num_chunks: int) -> list[int]:
    """Split ``k`` selections into ``min(num_chunks, k)`` near-equal chunks."""
    n = max(1, min(num_chunks, k))
    return [k // n + (1 if i < k % n else 0) for i in range(n)]


def jest_select(
    score_matrix: torch.Tensor,
    k: int,
    num_chunks: int,
    generator: torch.Generator,
    method: str = "sample",
    temperature: float = 1.0,
) -> torch.Tensor:
    """JEST joint selection (Evans et al. 2024): choose ``k`` of ``B`` examples in ``num_chunks``
    chunks; the first chunk by each example's own score ``M[i, i]``, every later one by its
    conditional score given the examples already chosen, ``M[i, i] + sum_{j in S} (M[i, j] + M[j, i])``
    (the increase of the sub-batch's joint score ``M[S][:, S].sum()`` if i joins S). ``score_matrix``
    is the joint learnability (learner minus reference pair losses), or the learner's pair losses
    for ``hard``. Within a chunk, ``sample`` draws without replacement from ``softmax(score / T)``
    as JEST does; ``topk`` takes the best.

    >>> g = torch.Generator().manual_seed(0)
    >>> m = torch.zeros(4, 4); m[0, 0] = m[1, 1] = 1.0; m[0, 1] = m[1, 0] = 5.0
    >>> sorted(jest_select(m, 2, 2, g, method="topk").tolist())
    [0, 1]
    """
    m = score_matrix.detach().float().cpu()
    b = m.shape[0]
    if m.shape != (b, b):
        raise ValueError(f"the joint score matrix must be square (B, B); got {tuple(m.shape)}")
    diag = m.diagonal().clone()
    chosen = torch.zeros(b, dtype=torch.bool)
    conditional = torch.zeros(b)
    picks = []
    for size in chunk_sizes(k, num_chunks):
        logits = (diag + conditional).masked_fill(chosen, -math.inf)
        new = select(logits, size, method, generator, temperature)
        picks.append(new)
        chosen[new] = True
        conditional += m[new].sum(0) + m[:, new].sum(1)
    return torch.cat(picks)
