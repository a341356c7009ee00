"""Language-model positions, shared by distillation (which tokens a KD term counts), selection
(per-sequence losses) and the report (validation loss and perplexity). Plain torch.

A batch's logits are *token logits* when they are ``(B, T, V)`` and the batch carries ``(B, T)``
labels: a ``labels`` argument of the model's call or key of a dict batch (Hugging Face style:
``labels`` are the input ids, -100 where no loss is wanted) or the targets of an ``(x, y)`` batch
(already aligned with the logits). The causal shift is the one Hugging Face causal LMs apply in
their own loss: position t predicts ``labels[t + 1]``; the last position predicts nothing.

A position counts when its target is not ``ignore_index`` and, where an ``attention_mask`` is
given, both the position's own token and (with the shift) the token it predicts are real:

>>> labels = torch.tensor([[5, 6, 7, -100]])
>>> targets, mask = token_targets(labels, attention_mask=torch.tensor([[1, 1, 1, 0]]), shift=True)
>>> targets.tolist(), mask.tolist()
([[6, 7, 0, 0]], [[True, True, False, False]])
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
SHIFTS = ("auto", "causal", "none")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@cache
def _causal_lm_class_names() -> frozenset[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return frozenset()
    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def is_causal_lm(module: nn.Module) -> bool:
    """A Hugging Face causal LM (its class is in transformers' causal-LM mapping, or named so)."""
    name = type(module).__name__
    if name.endswith(_CAUSAL_SUFFIXES):
        return True
    return "transformers" in type(module).__module__ and name in _causal_lm_class_names()


class _LogitsShapes:
    """A forward hook (picklable) recording which module ran and the ``(B, T)`` of its logits."""

    def __init__(self, records: list):
        self.records = records

    def __call__(self, module, args, output):
        from lightning_slim.modules import output_tensor

        try:
            self.records.append((module, tuple(output_tensor(output).shape[:2])))
        except TypeError:  # no tensor output: it produced nothing the caller can read as logits
            pass


def logits_and_producer(
    target: nn.Module, args: tuple = (), kwargs: Mapping[str, Any] | None = None
) -> tuple[torch.Tensor, nn.Module]:
    """``target(*args, **kwargs)``'s logits and the module that produced them, for ``"auto"`` shifts:
    ``target`` itself when it is a Hugging Face causal LM; else the causal LM inside it that this very
    call ran and whose logits have the output's ``(B, T)`` (a LightningModule whose ``forward``
    returns ``self.model(...).logits``: its class is no causal LM, but its logits are one's, to be
    shifted as that model's own loss shifts them); else ``target``."""
    from lightning_slim.modules import output_tensor

    kwargs = dict(kwargs or {})
    if is_causal_lm(target):
        return output_tensor(target(*args, **kwargs)), target
    ran: list[tuple[nn.Module, tuple]] = []
    hook = _LogitsShapes(ran)
    handles = [m.register_forward_hook(hook) for m in target.modules() if m is not target and is_causal_lm(m)]
    try:
        logits = output_tensor(target(*args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    shape = tuple(logits.shape[:2])
    return logits, next((m for m, ran_shape in reversed(ran) if ran_shape == shape), target)


def _tensor(value: Any, shape: tuple[int, int]) -> torch.Tensor | None:
    ok = isinstance(value, torch.Tensor) and tuple(value.shape) == shape and not value.is_floating_point()
    return value if ok else None


def find_labels(
    batch: Any, kwargs: Mapping[str, Any] | None, shape: tuple[int, int]
) -> tuple[torch.Tensor | None, bool]:
    """``(labels, hugging_face_style)`` of shape ``shape`` = ``(B, T)``: the call's ``labels``
    argument or a dict batch's ``labels`` (Hugging Face style, shifted by causal LMs), else the
    targets of a dict (``y``/``target``...) or ``(x, y)`` batch (aligned); ``(None, False)`` if none."""
    from lightning_slim.batches import TARGET_KEYS

    for source in (kwargs or {}, batch if isinstance(batch, Mapping) else {}):
        found = _tensor(source.get("labels"), shape)
        if found is not None:
            return found, True
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            found = _tensor(batch.get(key), shape)
            if found is not None:
                return found, False
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        found = _tensor(batch[1], shape)
        if found is not None:
            return found, False
    return None, False


def find_attention_mask(batch: Any, kwargs: Mapping[str, Any] | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """The ``(B, T)`` ``attention_mask`` of the call (or of a dict batch), if any."""
    for source in (kwargs or {}, batch if isinstance(batch, Mapping) else {}):
        value = source.get("attention_mask")
        if isinstance(value, torch.Tensor) and tuple(value.shape) == shape:
            return value
    return None


def resolve_shift(shift: str, hugging_face_labels: bool, model: nn.Module | None) -> bool:
    """``"causal"``/``"none"`` as given; ``"auto"``: shift Hugging Face-style labels of a causal LM.
    ``model`` is the module that produced the logits (:func:`logits_and_producer` finds it)."""
    if shift not in SHIFTS:
        raise ValueError(f"shift={shift!r} is not one of {SHIFTS}")
    if shift != "auto":
        return shift == "causal"
    return hugging_face_labels and model is not None and is_causal_lm(model)


def token_targets(
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    shift: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, mask)``, both ``(B, T)`` like the logits: the class each position must predict
    (0 where masked, so it can index) and whether the position counts (see the module docstring)."""
    targets = labels.long()
    real = attention_mask.bool() if attention_mask is not None else None
    if shift:
        pad = targets.new_full((targets.shape[0], 1), ignore_index)
        targets = torch.cat([targets[:, 1:], pad], dim=1)
    mask = targets != ignore_index
    if real is not None:
        mask &= real
        if shift:
            mask &= torch.cat([real[:, 1:], real.new_zeros(real.shape[0], 1)], dim=1)
    return targets.masked_fill(~mask, 0), mask


def token_positions(
    logits: torch.Tensor,
    batch: Any,
    kwargs: Mapping[str, Any] | None = None,
    model: nn.Module | None = None,
    shift: str = "auto",
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(targets, mask)`` when ``logits`` are token logits of this batch (``(B, T, V)`` with
    ``(B, T)`` labels), else None. ``model`` is the module that produced them (for ``"auto"``; see
    :func:`logits_and_producer`: the class of a user's wrapper says nothing about the shift)."""
    if logits.dim() != 3:
        return None
    shape = tuple(logits.shape[:2])
    labels, hugging_face = find_labels(batch, kwargs, shape)
    if labels is None:
        return None
    mask = find_attention_mask(batch, kwargs, shape)
    return token_targets(
        labels.to(logits.device),
        None if mask is None else mask.to(logits.device),
        resolve_shift(shift, hugging_face, model),
        ignore_index,
    )


def sequence_losses(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean token cross-entropy of each sequence over its counted positions, counted positions)``,
    both ``(B,)``; a sequence with no counted position has loss 0."""
    b, t, v = logits.shape
    ce = F.cross_entropy(logits.reshape(b * t, v).float(), targets.reshape(-1), reduction="none").view(b, t)
    counts = mask.sum(1)
    return (ce * mask).sum(1) / counts.clamp_min(1), counts


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``values`` over the positions ``mask`` keeps (all of them without a mask; 0 if none)."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp_min(1)
