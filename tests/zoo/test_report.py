"""The report column of the zoo matrix: CompressionReport alone on every zoo model.

Evidence: the task it finds and the quality metric it reports fit the model. Classifiers get accuracy
(before training, and the exported model's after) equal to the accuracy computed here from the model's
own outputs on the same validation data; language models get validation loss and perplexity
(``exp(val_loss)``), never an accuracy, with the loss equal to the mean token cross-entropy computed here;
a model whose task cannot be known (Lightning's BoringModel: an MSE on unlabeled tensors) gets no
quality metric at all, with a warning that says so. Size and parameter counts are reported for all.
"""

from __future__ import annotations

import copy
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_slim import CompressionReport
from lightning_slim.modules import call_model, evaluating, output_tensor
from zoo.models import ZOO, available, build, param_count

TASK = {"classification": "classification", "lm": "language_model"}


@torch.no_grad()
def own_quality(built, module) -> float:
    """Accuracy (classifiers) or mean token cross-entropy (LMs) over the validation data, computed here."""
    hits = total = 0
    loss_sum = 0.0
    with evaluating(module):
        for batch in built.data.val_dataloader():
            if built.task == "classification":
                logits, labels = module.logits_and_labels(batch)
                hits += int((logits.argmax(-1) == labels).sum())
                total += len(labels)
            elif isinstance(batch, dict):  # Hugging Face causal LM: labels shifted by the model
                logits = output_tensor(call_model(module, batch))[:, :-1]
                target = batch["labels"][:, 1:]
                loss_sum += float(F.cross_entropy(logits.transpose(1, 2), target, reduction="sum"))
                total += target.numel()
            else:
                x, y = batch
                loss_sum += float(F.cross_entropy(module(x).transpose(1, 2), y, reduction="sum"))
                total += y.numel()
    return hits / total if built.task == "classification" else loss_sum / total


@pytest.mark.parametrize("name", list(ZOO))
def test_report_cell(name, tmp_path):
    if not available(name):
        pytest.skip(f"{ZOO[name].requires} cannot be imported here")
    torch.set_num_threads(1)
    built = build(name)
    untrained = copy.deepcopy(built.module)
    cb = CompressionReport(measure_latency=False)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,  # one short epoch, then validation logs val/acc or val/loss
        accelerator="cpu",
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[cb],
    )
    if name == "boring":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(built.module, datamodule=built.data)
        said = " | ".join(str(w.message) for w in caught)
        assert "CompressionReport reports no quality metric: the task is not known" in said, said
        assert (
            "CompressionReport(accuracy_metric='val/acc'): 'val/acc' was never logged" in said
        )  # and it says why there is no accuracy
        assert cb.task not in TASK.values()
        assert not {"accuracy", "export_accuracy", "val_loss", "perplexity"} & (cb.before.keys() | cb.after.keys())
        return
    trainer.fit(built.module, datamodule=built.data)
    assert cb.task == TASK[built.task]
    assert cb.before["params"] == cb.after["params"] == param_count(built.module)
    if built.task == "classification":
        assert "val_loss" not in cb.after and "perplexity" not in cb.after
        # the same predictions counted twice: equal ratios up to float32 representation (~6e-8)
        assert cb.before["accuracy"] == pytest.approx(own_quality(built, untrained), abs=1e-6)
        assert cb.after["export_accuracy"] == pytest.approx(own_quality(built, built.module), abs=1e-6)
    else:
        assert not {"accuracy", "export_accuracy"} & (cb.before.keys() | cb.after.keys())
        for when, module in (("before", untrained), ("after", built.module)):
            report = getattr(cb, when)
            # the same loss over the same batches, averaged in another order: float32 rounding ~1e-6 relative, 1e-4
            # leaves 100x on any CPU; perplexity = exp(val_loss) of the same number: rel=1e-6 is rounding only
            assert report["val_loss"] == pytest.approx(own_quality(built, module), rel=1e-4)
            assert report["perplexity"] == pytest.approx(math.exp(report["val_loss"]), rel=1e-6)
