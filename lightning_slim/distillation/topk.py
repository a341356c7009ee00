"""The teacher's top-k distribution per token, and the KD loss against it (plain torch).

A full-logit teacher cache stores ``T x V`` floats per sequence (a 32k vocabulary at 512 tokens:
64 MB per sequence). The top-k cache stores, per position, the ``k`` most likely classes of the
teacher's tempered distribution ``p = softmax(t / T)``, their log-probabilities, and the log of
the mass left on the other ``V - k`` classes (the tail). The loss is the KL divergence between
teacher and student on ``k + 1`` buckets, the ``k`` classes and one "rest" bucket:

    KD_k = T^2 * [ sum_{i in S} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest) ]

with ``q = softmax(s / T)`` the student's full distribution and ``q_rest = 1 - sum_{i in S} q_i``
(computed as a log-sum-exp over the student's other classes). The stored teacher buckets are
renormalised to sum to one (their values are rounded to the storage dtype). By the chain rule of
the KL divergence, the full-logit loss is exactly

    KD_full = KD_k + T^2 * p_rest * KL(p_tail || q_tail),

where ``p_tail``, ``q_tail`` are the two distributions renormalised over the tail: ``KD_k`` never
exceeds the full loss, equals it at ``k = V``, and its gap is the teacher's tail mass times how
differently the two spread that tail (tested in ``tests/test_lm_distillation.py``).

>>> t, s = torch.tensor([[3.0, 1.0, 0.0, -1.0]]), torch.zeros(1, 4)
>>> cached = teacher_topk(t, k=2, temperature=1.0, dtype=torch.float32)
>>> cached["topk_index"].tolist(), round(float(cached["tail_logp"].exp()), 4)
([[0, 1]], 0.0566)
>>> bool(topk_soft_target_loss(s, cached, 1.0) <= full_kl(s, t, 1.0))
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_slim.tokens import masked_mean

LOG_FLOOR = -1e4  # log-probabilities below this are zero mass (keeps 0 * log 0 finite)


def index_dtype(vocab: int) -> torch.dtype:
    """The smallest integer type that holds class indices ``< vocab``."""
    return torch.int16 if vocab <= 2**15 else torch.int32


def teacher_topk(
    logits: torch.Tensor, k: int, temperature: float, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """``{"topk_index", "topk_logp", "tail_logp"}`` of ``softmax(logits / temperature)`` over the
    last dimension: the ``k`` largest classes, their log-probabilities (``dtype``), and the log of
    the remaining mass (float32)."""
    vocab = logits.shape[-1]
    if not 0 < k < vocab:
        raise ValueError(
            f"top_k={k} must be in [1, {vocab - 1}] for {vocab} classes (at top_k >= the number of "
            "classes the full-logit cache is smaller: unset top_k)"
        )
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    values, index = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, index, float("-inf")).logsumexp(-1)
    return {
        "topk_index": index.to(index_dtype(vocab)),
        "topk_logp": values.to(dtype),
        "tail_logp": tail.clamp_min(LOG_FLOOR),
    }


def _buckets(cached: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``k + 1`` bucket log-probabilities, renormalised to sum to one."""
    logp = torch.cat([cached["topk_logp"].float(), cached["tail_logp"].float().unsqueeze(-1)], -1)
    logp = logp.clamp_min(LOG_FLOOR)
    return logp - logp.logsumexp(-1, keepdim=True), cached["topk_index"].long()


def topk_soft_target_loss(
    student_logits: torch.Tensor, cached: dict[str, torch.Tensor], temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``KD_k`` (module docstring): mean over positions (those ``mask`` keeps), times ``T^2``."""
    teacher, index = _buckets(cached)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_top = s.gather(-1, index)
    s_rest = s.scatter(-1, index, float("-inf")).logsumexp(-1, keepdim=True)
    student = torch.cat([s_top, s_rest], -1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    return masked_mean(kl, mask) * temperature**2


def full_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The full-logit KD loss per the same convention (mean over kept positions, times ``T^2``)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().detach() / temperature, dim=-1)
    return masked_mean((t.exp() * (t - s)).sum(-1), mask) * temperature**2


def topk_agreement(
    student_logits: torch.Tensor, cached: dict[str, torch.Tensor], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of (kept) positions where the student's top class is the teacher's."""
    same = (student_logits.argmax(-1) == cached["topk_index"][..., 0].long()).float()
    return masked_mean(same, mask)


def cache_bytes_per_position(k: int, vocab: int, dtype: torch.dtype) -> int:
    """Bytes the top-k cache stores per position (indices, log-probabilities, tail)."""
    return (
        k * (torch.empty(0, dtype=index_dtype(vocab)).element_size() + torch.empty(0, dtype=dtype).element_size()) + 4
    )
