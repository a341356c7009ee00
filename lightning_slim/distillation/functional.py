"""Knowledge distillation in plain PyTorch (no Lightning): the losses, the projection that
matches feature widths, and the annealing schedule. (Output capture with forward hooks lives in
:mod:`lightning_slim.modules`, the per-example teacher cache in :mod:`lightning_slim.index_cache`.)

>>> import torch
>>> s, t = torch.zeros(4, 10), torch.zeros(4, 10)
>>> float(soft_target_loss(s, t, temperature=2.0))
0.0
>>> linear_schedule(step=50, start=0, stop=100, begin=1.0, end=0.0)
0.5
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_slim.distillation.configs import FEATURE_LOSSES, FEATURE_POOLINGS
from lightning_slim.tokens import masked_mean


def soft_target_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinton et al. (2015): ``KL(softmax(t / T) || softmax(s / T)) * T^2``, mean over examples.

    Classes are the last dimension; any leading dimensions (tokens, positions) count as examples.
    ``mask`` (the leading shape, e.g. ``(B, T)``) keeps only its True positions in the mean: padding
    and ``ignore_index`` tokens contribute nothing (:func:`lightning_slim.tokens.token_targets`).
    The ``T^2`` factor keeps the gradient scale independent of ``T``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    c = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, c).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, c).float().detach() / temperature, dim=-1)
    if mask is None:
        return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
    per_position = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    return masked_mean(per_position, mask.reshape(-1)) * temperature**2


def agreement(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of examples (positions ``mask`` keeps) where student and teacher predict the same class."""
    return masked_mean((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float(), mask)


def feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str = "mse",
    pooling: str = "none",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE, or ``1 - cosine similarity``, between student and teacher features, averaged.

    ``pooling="none"``: each example's whole feature (the cosine of the flattened features). For token
    features ``(B, T, H)``: ``"mean"`` compares each sequence's mean over the positions ``mask``
    ``(B, T)`` keeps (all without a mask), a sentence embedding; ``"token"`` compares every kept
    position's ``H``-vector and averages over kept positions.

    >>> s, t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[1.0, 0.0], [5.0, 5.0]]])
    >>> round(float(feature_loss(s, t, "cosine", "token", torch.tensor([[1, 0]]))), 6)
    0.0
    """
    teacher = teacher.detach()
    student, teacher = student.float(), teacher.float()
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"feature loss {kind!r} is not one of {FEATURE_LOSSES}")
    if pooling == "none":
        if kind == "mse":
            return F.mse_loss(student, teacher)
        return 1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1).mean()
    if student.dim() != 3 or teacher.shape != student.shape:
        raise ValueError(
            f"pooling={pooling!r} compares token features (B, T, H) of one shape; got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    keep = torch.ones(student.shape[:2], device=student.device) if mask is None else mask.to(student.device).float()
    if pooling == "mean":
        weights = keep.unsqueeze(-1) / keep.sum(1, keepdim=True).clamp_min(1).unsqueeze(-1)
        student, teacher = (student * weights).sum(1), (teacher * weights).sum(1)
        if kind == "mse":
            return F.mse_loss(student, teacher)
        return 1 - F.cosine_similarity(student, teacher, dim=-1).mean()
    if pooling != "token":
        raise ValueError(f"pooling={pooling!r} is not one of {FEATURE_POOLINGS}")
    per_token = (student - teacher).pow(2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(student, teacher, -1)
    return masked_mean(per_token, keep.bool())


class Projection(nn.Module):
    """A learned linear map of the width dimension ``dim`` (a 1x1 conv for ``(N, C, ...)`` maps)."""

    def __init__(self, in_width: int, out_width: int, dim: int = 1, generator: torch.Generator | None = None):
        super().__init__()
        self.dim = dim
        self.linear = nn.utils.skip_init(nn.Linear, in_width, out_width)  # no draw from the global RNG
        bound = in_width**-0.5  # nn.Linear's default range, drawn from our own generator: no global RNG use
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound, generator=generator)
            self.linear.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.movedim(self.dim, -1)).movedim(-1, self.dim)


def linear_schedule(step: int, start: int, stop: int, begin: float, end: float | None) -> float:
    """``begin`` at ``start`` moving linearly to ``end`` at ``stop`` (constant when ``end`` is None)."""
    if end is None or stop <= start:
        return begin if end is None or step < stop else end
    frac = min(max((step - start) / (stop - start), 0.0), 1.0)
    return begin + frac * (end - begin)
