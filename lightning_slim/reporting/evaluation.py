"""What a model is for, and how well it does it: the task of a batch (classification or language
modelling) and the quality metric that fits it, on a validation loader. Plain torch.

- ``"classification"``: the output is ``(B, C)`` logits and the batch carries ``(B,)`` integer
  targets; quality is accuracy (and mean cross-entropy).
- ``"language_model"``: the output is ``(B, T, V)`` token logits and the batch carries ``(B, T)``
  labels (:mod:`lightning_slim.tokens`: Hugging Face ``labels`` shifted as the model's own loss
  shifts them, or the aligned ``y`` of an ``(x, y)`` batch); quality is the mean token
  cross-entropy over counted positions (weighted by tokens across batches) and its perplexity.
  An accuracy is never computed for a language model.
- anything else is ``"unknown"``: no quality number, and the reason why.

>>> import torch
>>> from torch import nn
>>> detect_task(nn.Linear(4, 3), (torch.randn(2, 4), torch.tensor([0, 2])))
('classification', '')
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_slim.batches import BatchFormatError, batch_targets, example_count, move_to, slice_batch
from lightning_slim.modules import call_arguments, evaluating, forward_target
from lightning_slim.tokens import logits_and_producer, sequence_losses, token_positions

TASKS = ("auto", "classification", "language_model")


def _outputs(model: nn.Module, batch: Any, input_fn: Callable | None = None) -> tuple[torch.Tensor, dict, nn.Module]:
    """``(logits, the call's kwargs, the module that produced the logits)``."""
    _, target = forward_target(model)
    args, kwargs = call_arguments(target, batch, input_fn=input_fn)
    device = next(target.parameters(), torch.empty(0)).device
    logits, producer = logits_and_producer(target, move_to(args, device), move_to(kwargs, device))
    return logits, kwargs, producer


def _class_targets(batch: Any, n: int) -> torch.Tensor | None:
    try:
        y = batch_targets(batch)
    except BatchFormatError:
        return None
    ok = isinstance(y, torch.Tensor) and y.dim() == 1 and len(y) == n and not y.is_floating_point()
    return y if ok else None


@torch.no_grad()
def detect_task(model: nn.Module, batch: Any, input_fn: Callable | None = None) -> tuple[str, str]:
    """``(task, why not)`` from one forward on (two rows of) ``batch``: ``"classification"``,
    ``"language_model"``, or ``"unknown"`` with the reason."""
    n = example_count(batch)
    small = slice_batch(batch, torch.arange(min(2, n)), size=n)
    try:
        with evaluating(model):
            logits, kwargs, target = _outputs(model, small, input_fn)
    except Exception as err:
        return "unknown", f"cannot run the model on a training batch ({type(err).__name__}: {err})"[:240]
    if token_positions(logits, small, kwargs, target) is not None:
        return "language_model", ""
    if logits.dim() == 2 and _class_targets(small, len(logits)) is not None:
        return "classification", ""
    return "unknown", (
        f"the output has shape {tuple(logits.shape)} and the batch has no matching class targets "
        "(B,) or token labels (B, T); pass task= and a metric the module logs"
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, task: str, input_fn: Callable | None = None, max_batches: int | None = None
) -> dict[str, float]:
    """Quality of ``model`` on ``loader`` for ``task``: ``{"accuracy", "loss"}`` (classification) or
    ``{"val_loss", "perplexity", "val_tokens"}`` (language model). Runs in eval mode; the global
    RNG is left as it was (iterating a DataLoader draws from it)."""
    if task not in ("classification", "language_model"):
        raise ValueError(f"task={task!r}: only 'classification' and 'language_model' have a quality metric")
    total = count = correct = 0.0
    with torch.random.fork_rng(devices=[]), evaluating(model):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            logits, kwargs, target = _outputs(model, batch, input_fn)
            logits = logits.float().cpu()
            if task == "language_model":
                positions = token_positions(logits, batch, move_to(kwargs, "cpu"), target)
                if positions is None:
                    raise BatchFormatError(
                        f"a validation batch gave logits of shape {tuple(logits.shape)} without "
                        "(B, T) token labels: not a language-model batch"
                    )
                losses, tokens = sequence_losses(logits, *positions)
                total += float((losses * tokens).sum())
                count += float(tokens.sum())
            else:
                y = _class_targets(batch, len(logits))
                if y is None or logits.dim() != 2:
                    raise BatchFormatError(
                        f"a validation batch gave logits of shape {tuple(logits.shape)} without "
                        "(B,) class targets: not a classification batch"
                    )
                total += float(F.cross_entropy(logits, y.cpu(), reduction="sum"))
                correct += float((logits.argmax(-1) == y.cpu()).sum())
                count += len(y)
    if not count:
        return {}
    if task == "language_model":
        loss = total / count
        return {"val_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "val_tokens": int(count)}
    return {"accuracy": correct / count, "loss": total / count}
