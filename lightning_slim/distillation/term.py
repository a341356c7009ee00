"""The distillation term of one training step, in plain torch: for every call of the student's logits
module in the step, the soft-target loss against the teacher's outputs for that call (top-k cached or
full logits, on the token positions that count) and the feature pairs' losses through their
projections; the calls' terms are averaged. Which token positions count is decided here too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_slim.distillation import functional as kd
from lightning_slim.distillation import topk
from lightning_slim.distillation.configs import FeatureDistillation, TokenMask
from lightning_slim.tokens import find_attention_mask, find_labels, is_causal_lm, resolve_shift, token_targets


def causal_model(model: nn.Module) -> nn.Module:
    """The causal LM that makes ``model``'s token logits: ``model``, or the one Hugging Face causal LM
    inside it (a LightningModule whose ``forward`` wraps ``self.model``), so Hugging Face-style
    ``labels`` given to the wrapper are shifted as the model's own loss shifts them."""
    if is_causal_lm(model):
        return model
    inner = [m for m in model.modules() if is_causal_lm(m)]
    return inner[0] if len(inner) == 1 else model


def kd_mask(
    logits: torch.Tensor, batch: Any, kwargs: Mapping[str, Any] | None, model: nn.Module, tokens: TokenMask
) -> torch.Tensor | None:
    """The ``(B, T)`` positions of token logits a KD term counts (None: every position)."""
    if logits.dim() != 3:
        return None
    shape = tuple(logits.shape[:2])
    labels, hugging_face = find_labels(batch, kwargs, shape)
    attention = find_attention_mask(batch, kwargs, shape) if tokens.padding else None
    attention = None if attention is None else attention.to(logits.device)
    if labels is None:
        return None if attention is None else attention.bool()
    shift = resolve_shift(tokens.shift, hugging_face, causal_model(model))
    return token_targets(labels.to(logits.device), attention, shift, tokens.ignore_index)[1]


def feature_mask(feature: torch.Tensor, batch: Any, kwargs: Mapping[str, Any] | None) -> torch.Tensor | None:
    """The real tokens ``(B, T)`` of token features ``(B, T, H)``: the call's (or batch's) ``attention_mask``."""
    return find_attention_mask(batch, kwargs, tuple(feature.shape[:2])) if feature.dim() == 3 else None


def call_masks(
    records: Sequence[Mapping[str, Any]], batch: Any, model: nn.Module, tokens: TokenMask, pooled: str | None
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """For each recorded call: the token positions its logits' KD counts, and (with ``pooled``, the
    record key of a pooled feature) the real tokens its features are pooled over."""
    masks = [kd_mask(r["logits"], batch, r["call"][1], model, tokens) if "logits" in r else None for r in records]
    features = [feature_mask(r[pooled], batch, r["call"][1]) for r in records] if pooled else []
    return masks, features


@dataclass
class StepTerm:
    """The term added to the loss, the values to log, and what it counted."""

    loss: torch.Tensor
    values: dict[str, torch.Tensor | float] = field(default_factory=dict)
    examples: int = 0  # student examples over all calls
    positions: tuple[int, int] = (0, 0)  # token positions distilled / seen (token logits only)


def logits_loss(
    student: torch.Tensor, teacher: Mapping[str, torch.Tensor], temperature: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """KD on full teacher logits, or on the cached top-k buckets when the teacher output holds them."""
    if "topk_index" in teacher:
        return topk.topk_soft_target_loss(student, teacher, temperature, mask)
    return kd.soft_target_loss(student, teacher["logits"], temperature, mask)


def agreement(student: torch.Tensor, teacher: Mapping[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    if "topk_index" in teacher:
        return topk.topk_agreement(student, teacher, mask)
    return kd.agreement(student, teacher["logits"], mask)


def check_logits_shape(student: torch.Tensor, teacher: Mapping[str, torch.Tensor]) -> None:
    cached = "topk_index" in teacher
    t_shape = teacher["topk_index"].shape[:-1] if cached else teacher["logits"].shape
    if (student.shape[:-1] if cached else student.shape) != t_shape:
        raise ValueError(
            f"student output shape {tuple(student.shape)} differs from the teacher's {tuple(t_shape)} on this batch"
        )


def step_term(
    records: Sequence[Mapping[str, torch.Tensor]],
    teachers: Sequence[Mapping[str, torch.Tensor]],
    alpha: float,
    temperature: float,
    masks: Sequence[torch.Tensor | None],
    features: FeatureDistillation | None = None,
    projections: nn.ModuleDict | None = None,
    feature_masks: Sequence[torch.Tensor | None] = (),
    with_agreement: bool = False,
) -> StepTerm:
    """``alpha * KD + weight * feature loss``, averaged over the step's calls (``records[i]`` is the
    student's call i, ``teachers[i]`` the teacher's outputs on it, ``masks[i]`` its counted token
    positions, ``feature_masks[i]`` its real tokens for pooled features). Logits are distilled when
    the records hold them."""
    parts: dict[str, list[torch.Tensor]] = {"kd_loss": [], "feature_loss": [], "agreement": []}
    counted = seen = examples = 0
    for i, (student, teacher) in enumerate(zip(records, teachers)):
        if "logits" in student:
            s, mask = student["logits"], masks[i]
            check_logits_shape(s, teacher)
            parts["kd_loss"].append(logits_loss(s, teacher, temperature, mask))
            if with_agreement:
                parts["agreement"].append(agreement(s, teacher, mask))
            if mask is not None:
                counted, seen = counted + int(mask.sum()), seen + mask.numel()
            examples += len(s)
        if features is not None:
            loss = sum(
                kd.feature_loss(
                    projections[str(j)](student[f"feat:{sn}"]),
                    teacher[f"feat:{tn}"],
                    features.loss,
                    features.pooling,
                    feature_masks[i] if feature_masks else None,
                )
                for j, (sn, tn) in enumerate(features.pairs.items())
            )
            parts["feature_loss"].append(loss)
            examples += 0 if "logits" in student else len(student[f"feat:{next(iter(features.pairs))}"])
    mean = {k: torch.stack(v).mean() for k, v in parts.items() if v}
    total = alpha * mean["kd_loss"] if "kd_loss" in mean else 0
    if "feature_loss" in mean:
        total = total + features.weight * mean["feature_loss"]
    return StepTerm(total, mean, examples, (counted, seen))
