"""Selection and the report on a Hugging Face causal LM with no user code beyond ``training_step``:
per-sequence scores from ``ModelOutput.logits`` and the batch's ``labels``, and a report in validation
loss and perplexity (never an accuracy)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from test_lm_distillation import ROWS, PaddedWindows, counted_positions, llama
from torch.utils.data import DataLoader
from zoo.models import HFCausalLM

from lightning_slim import CompressionReport, OnlineDataSelection
from lightning_slim.modules import evaluating


class SeesSelectedRows(HFCausalLM):
    """Records, per step, the full super-batch's per-sequence losses (computed here by hand, in eval
    mode as the scorer runs) and the rows its ``training_step`` received."""

    def __init__(self, model):
        super().__init__(model)
        self.expected: list[set[int]] = []
        self.received: list[set[int]] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.model.eval()
        with torch.no_grad():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        self.model.train()
        data = PaddedWindows()
        counted = counted_positions(data)[batch["index"]]
        targets = torch.cat([batch["labels"][:, 1:], batch["labels"][:, :1]], 1).clamp_min(0)
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        losses = (ce * counted).sum(1) / counted.sum(1)
        keep = len(losses) // 2
        self.expected.append(set(batch["index"][losses.topk(keep).indices].tolist()))

    def training_step(self, batch, batch_idx):
        self.received.append(set(batch["index"].tolist()))
        return super().training_step(batch, batch_idx)


class SeesSelectedRowsWithForward(SeesSelectedRows):
    """The same module with the ``forward`` the ONNX export asks for: its class is no causal LM, but
    its logits are one's, and must be scored with the shift."""

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class CausalLMWithForward(HFCausalLM):
    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@torch.no_grad()
def own_validation_loss(module, data) -> float:
    """The model's own ``.loss`` (labels given), token-weighted over the split, in eval mode."""
    total = count = 0.0
    with evaluating(module):
        for batch in DataLoader(data, batch_size=24):
            row = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
            n = float((row["labels"][:, 1:] != -100).sum())
            total += float(module.model(**row).loss) * n
            count += n
    return total / count


def trainer_for(callback, tmp_path, epochs=1):
    return pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )


@pytest.mark.parametrize("module_class", [SeesSelectedRows, SeesSelectedRowsWithForward], ids=["no_forward", "forward"])
def test_hard_selection_on_a_causal_lm_trains_on_the_highest_loss_sequences(tmp_path, module_class):
    pl.seed_everything(0)
    module = module_class(llama(16, 0))
    selection = OnlineDataSelection(keep=0.5, score="hard")  # no loss_fn: read from the ModelOutput
    data = PaddedWindows()
    trainer_for(selection, tmp_path, epochs=2).fit(
        module, DataLoader(data, batch_size=12, shuffle=True), DataLoader(data, batch_size=24)
    )
    assert len(module.received) == 2 * ROWS // 12
    assert module.received == module.expected  # exactly the top half by mean token loss over counted positions
    assert selection.ledger.learner_forwards == 2 * ROWS


@pytest.mark.parametrize("module_class", [HFCausalLM, CausalLMWithForward], ids=["no_forward", "forward"])
def test_report_on_a_causal_lm_is_validation_loss_and_perplexity(tmp_path, module_class):
    pl.seed_everything(0)
    module = module_class(llama(16, 0), lr=1e-2)
    data = PaddedWindows()
    untrained = own_validation_loss(module, data)
    report = CompressionReport(latency_batch_size=4, generate_tokens=8, output_path=str(tmp_path / "r.json"))
    trainer_for(report, tmp_path, epochs=3).fit(
        module, DataLoader(data, batch_size=12, shuffle=True), DataLoader(data, batch_size=24)
    )
    assert report.task == "language_model"
    for side in (report.before, report.after):
        assert "accuracy" not in side and "export_accuracy" not in side
        # perplexity = exp(val_loss) in float64 from the same number: default rel=1e-6 is rounding only
        assert side["perplexity"] == pytest.approx(math.exp(side["val_loss"]))
        assert side["val_tokens"] == int(counted_positions(data).sum())
    assert report.before["val_loss"] == pytest.approx(math.log(96), abs=0.3)  # random init: about uniform
    # the model's own loss, before and after: batched vs this function's batches of 24 differ only in
    # float32 summation order (a few 1e-6 on any CPU); 1e-4 bounds it, far below a missing shift (nats)
    assert report.before["val_loss"] == pytest.approx(untrained, abs=1e-4)
    assert report.after["val_loss"] == pytest.approx(own_validation_loss(module, data), abs=1e-4)
    assert report.after["val_loss"] < report.before["val_loss"] - 0.3  # training moved it
    # the same logged float32 value read back: equal up to float64 conversion (default rel=1e-6)
    assert report.after["logged_val_loss"] == pytest.approx(float(module.trainer.callback_metrics["val/loss"]))
    assert report.after["generate_tokens_per_s"] > 0 and report.after["train_tokens_per_s"] > 0
