"""The data-selection column of the zoo matrix: OnlineDataSelection(score="hard", keep=0.5) on every
zoo model, with dict batches (``image``/``label``, Hugging Face ``input_ids``/``attention_mask``/
``labels`` or ``pixel_values``/``labels``) and ``(x, y)`` tuples.

Evidence: the rows the user's ``training_step`` receives are exactly the top-scoring half of each
super-batch, where the scores are the per-example losses computed here, independently of the library,
from the model's own outputs (cross-entropy per example; the mean token cross-entropy per window for
language models, with Hugging Face's label shift). Lightning's BoringModel (a batch of one example)
is refused before training.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_slim import OnlineDataSelection
from lightning_slim.modules import call_model, evaluating, output_tensor
from zoo.models import ZOO, available, build

ERRORS = {"boring": r"keep=0.5 of a super-batch of 1 keeps no example; use keep >= 1 or a larger DataLoader"}


def inputs_of(batch) -> torch.Tensor:
    """The tensor that identifies each example's row (its image or token ids)."""
    if isinstance(batch, dict):
        return next(batch[k] for k in ("image", "pixel_values", "input_ids") if k in batch)
    return batch[0]


@torch.no_grad()
def losses(built, batch) -> torch.Tensor:
    """Per-example losses from the model's outputs, computed here (not by lightning_slim.selection)."""
    module = built.module
    with evaluating(module):
        if isinstance(batch, dict) and "input_ids" in batch and built.task == "lm":  # HF causal LM: shift
            logits = output_tensor(call_model(module, batch))[:, :-1]
            target = batch["labels"][:, 1:]
            return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)
        if built.task == "lm":  # (x, y) with y already shifted
            return F.cross_entropy(module(batch[0]).transpose(1, 2), batch[1], reduction="none").mean(1)
        logits, labels = module.logits_and_labels(batch)
        return F.cross_entropy(logits, labels, reduction="none")


class Rows(pl.Callback):
    """For each step: the top-scoring half of the super-batch by the losses above, and the rows the
    user's forward actually got in training (matched by content)."""

    def __init__(self, built):
        self.built, self.expected, self.got, self.steps = built, [], [], 0
        self._super: torch.Tensor | None = None
        self._hook = None

    def on_train_start(self, trainer, pl_module):
        from lightning_slim.modules import forward_target

        _, target = forward_target(pl_module)

        def record(module, args, kwargs):
            if module.training and self._super is not None:
                x = kwargs.get("input_ids", kwargs.get("pixel_values")) if kwargs else None
                x = args[0] if x is None else x
                rows = [int((self._super == row).flatten(1).all(1).nonzero()[0]) for row in x]
                self.got.append(sorted(rows))
                self._super = None  # only the training step's own call

        self._hook = target.register_forward_pre_hook(record, with_kwargs=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1
        scores = losses(self.built, batch)
        keep = round(0.5 * len(scores))
        self.expected.append(sorted(scores.topk(keep).indices.tolist()))
        self._super = inputs_of(batch)

    def on_train_end(self, trainer, pl_module):
        self._hook.remove()


@pytest.mark.parametrize("name", list(ZOO))
def test_selection_cell(name):
    if not available(name):
        pytest.skip(f"{ZOO[name].requires} cannot be imported here")
    torch.set_num_threads(1)
    built = build(name)
    cb, rows = OnlineDataSelection(keep=0.5, score="hard"), Rows(built)
    trainer = pl.Trainer(
        max_steps=3,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[cb, rows],
    )
    if name in ERRORS:
        with pytest.raises(ValueError, match=ERRORS[name]):
            trainer.fit(built.module, datamodule=built.data)
        assert rows.steps == 0, "the error came after training had started"
        return
    trainer.fit(built.module, datamodule=built.data)
    assert rows.steps == 3 and len(rows.got) == 3
    assert rows.got == rows.expected, "the trained rows are not the top-scoring half"
    summary = cb.report_rows()
    assert summary["examples_trained"] * 2 == summary["examples_seen"] and summary["selection_steps"] == 3
