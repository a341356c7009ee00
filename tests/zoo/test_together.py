"""The last column of the zoo matrix: QAT, distillation, data selection and the report in one ``fit`` on
every zoo model (a quantized student distilled from a float teacher on the selected half of each batch).

QAT runs on onnxruntime where the module has a ``forward(x)`` to export, and on torchao for the Hugging
Face wrappers that define none (the onnxruntime cell of those models refuses before training, see
test_quantization.py). Evidence: every technique acted (fake quantization on, the teacher called once
per step on the selected examples only, half of each super-batch trained on) and the report judged the
exported int8 model with the metric of its task: the accuracy of the exported classifier equals the
accuracy computed here from the int8 model's outputs; a language model gets validation loss and
perplexity, never an accuracy. A cell that cannot run (BoringModel's batches of one example cannot be
halved) is refused before training.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_slim import CompressionReport, KnowledgeDistillation, OnlineDataSelection, QuantizationAwareTraining
from lightning_slim.modules import overrides_forward
from zoo.models import ZOO, available, build

ERRORS = {"boring": r"keep=0.5 of a super-batch of 1 keeps no example"}
WARNINGS = {
    "char_transformer": "nn.MultiheadAttention",
    "gpt2": "transformers Conv1D layers",
}
SLOW = {"mobilenet_v3_small", "char_transformer"}  # their onnxruntime export takes 15-35 s here
STEPS = 3
CELLS = [pytest.param(name, marks=[pytest.mark.zoo_slow] if name in SLOW else []) for name in ZOO]


class Steps(pl.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1


@torch.no_grad()
def accuracy(model, built) -> float:
    from lightning_slim.modules import call_model, output_tensor

    hits = total = 0
    for batch in built.data.val_dataloader():
        labels = batch["label"] if isinstance(batch, dict) and "label" in batch else None
        if labels is None:
            labels = batch["labels"] if isinstance(batch, dict) else batch[1]
        logits = output_tensor(call_model(model, batch))
        hits += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return hits / total


@pytest.mark.parametrize("name", CELLS)
def test_together_cell(name, tmp_path):
    if not available(name):
        pytest.skip(f"{ZOO[name].requires} cannot be imported here")
    torch.set_num_threads(1)
    built = build(name)
    runtime = "onnxruntime" if overrides_forward(built.module) else "torchao"
    qat = QuantizationAwareTraining(start_after=1, unit="step", runtime=runtime)
    kd = KnowledgeDistillation(teacher=build(name, seed=1).module, alpha=0.5)
    selection = OnlineDataSelection(keep=0.5, score="hard")
    report, steps = CompressionReport(measure_latency=False), Steps()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=STEPS,
        accelerator="cpu",
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[qat, kd, selection, report, steps],
    )
    if name in ERRORS:
        with pytest.raises(ValueError, match=ERRORS[name]):
            trainer.fit(built.module, datamodule=built.data)
        assert steps.steps == 0, "the error came after training had started"
        return
    if name in WARNINGS:
        with pytest.warns(UserWarning, match=WARNINGS[name]):
            trainer.fit(built.module, datamodule=built.data)
    else:
        trainer.fit(built.module, datamodule=built.data)
    assert steps.steps == STEPS
    rows = report.techniques
    assert set(rows) == {"quantization", "distillation", "selection"}, rows
    assert rows["quantization"]["phase"] == "fake_quant" and rows["quantization"]["runtime"] == runtime
    assert rows["selection"]["examples_trained"] * 2 == rows["selection"]["examples_seen"]
    # the teacher saw only what the student trained on: the selected half, once per step
    assert rows["distillation"]["teacher_passes"] == STEPS
    assert rows["distillation"]["teacher_examples"] == rows["selection"]["examples_trained"]
    if built.task == "classification":
        assert report.task == "classification" and "perplexity" not in report.after
        assert report.after["export_accuracy"] == pytest.approx(accuracy(report.exported_model, built), abs=1e-6)
    else:
        assert report.task == "language_model"
        assert not {"accuracy", "export_accuracy"} & (report.before.keys() | report.after.keys())
        assert math.isfinite(report.after["val_loss"])
        assert report.after["perplexity"] == pytest.approx(math.exp(report.after["val_loss"]), rel=1e-6)
