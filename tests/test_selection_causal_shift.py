"""The per-token loss the library computes for a Hugging Face causal LM (selection's default scores, the
report's validation loss) is the model's own next-token loss, whether or not the user's LightningModule
defines ``forward`` (the ONNX export asks for one). The reference is the model's own ``.loss``, computed
here row by row with the batch's ``labels``: nothing of lightning_slim is used to compute it."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_lm_distillation import ROWS, PaddedWindows
from torch.utils.data import DataLoader
from zoo import models as zoo
from zoo.models import HFCausalLM

from lightning_slim.reporting.evaluation import detect_task, evaluate
from lightning_slim.selection import default_per_sample_loss

# Random-init logits (weights of std 0.02) are nearly uniform over the vocabulary, so a shifted and an
# unshifted loss would both be close to ln(96) and differ too little to tell apart. Weights of std 1 give
# each position a peaked, position-specific distribution: the two losses then differ by nats (asserted).
INIT_SCALE = 50.0


@torch.no_grad()
def sharpened(name: str) -> transformers.PreTrainedModel:
    """The zoo's random-weight Hugging Face causal LM ``name``, its matrices scaled to std ~1."""
    model = zoo.build(name).module.model
    for p in model.parameters():
        if p.dim() >= 2:
            p.mul_(INIT_SCALE)
    return model


class WithForward(HFCausalLM):
    """The same user module with the ``forward(input_ids, attention_mask)`` the ONNX export asks for."""

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class WithIdsOnlyForward(HFCausalLM):
    """A ``forward(input_ids)`` that takes no mask (padded rows are then masked by the batch's own mask)."""

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


MODELS = ("llama", "gpt2")
MODULES = {"no_forward": HFCausalLM, "forward": WithForward, "ids_forward": WithIdsOnlyForward}


def build(model: str, module: str):
    return MODULES[module](sharpened(model)).eval()


@torch.no_grad()
def own_losses(hf_model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's loss as the model itself computes it (``.loss`` with ``labels``, one row at a time),
    and how many labels that loss averages over (the shifted labels that are not -100)."""
    losses, counts = [], []
    for i in range(len(batch["input_ids"])):
        row = {k: batch[k][i : i + 1] for k in ("input_ids", "attention_mask", "labels")}
        losses.append(hf_model(**row).loss)
        counts.append((row["labels"][:, 1:] != -100).sum())
    return torch.stack(losses), torch.stack(counts)


@torch.no_grad()
def unshifted_losses(hf_model, batch) -> torch.Tensor:
    """The wrong answer, for contrast: position t scored against labels[t] (no causal shift)."""
    logits = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    counted = batch["labels"] != -100
    return (ce * counted).sum(1) / counted.sum(1)


def full_batch():
    data = PaddedWindows()
    return next(iter(DataLoader(data, batch_size=ROWS)))


# The batched forward and the row-by-row forward sum in different orders (the attention's batched
# matmuls, the padded rows' masks): float32 rounding on losses of a few nats, at most a few 1e-6 on any
# CPU's kernels. 1e-4 bounds that with margin and is 4 orders of magnitude below the shift error
# (asserted > 0.1 nats per row on average below).
ATOL = 1e-4


@pytest.mark.parametrize("module_kind", list(MODULES))
@pytest.mark.parametrize("model_kind", MODELS)
def test_per_sequence_loss_is_the_models_own_next_token_loss(model_kind, module_kind):
    module, batch = build(model_kind, module_kind), full_batch()
    expected, _ = own_losses(module.model, batch)
    wrong = unshifted_losses(module.model, batch)
    # the check's own power: the shift changes losses by > 0.1 nats per row, 1000x ATOL
    assert (expected - wrong).abs().mean() > 0.1, "the check cannot tell a shifted loss from an unshifted one"
    got = default_per_sample_loss(module, batch)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)  # summation order only: see ATOL


@pytest.mark.parametrize("module_kind", list(MODULES))
@pytest.mark.parametrize("model_kind", MODELS)
def test_validation_loss_is_the_models_own_loss(model_kind, module_kind):
    module, data = build(model_kind, module_kind), PaddedWindows()
    losses, counts = own_losses(module.model, full_batch())
    expected = float((losses * counts).sum() / counts.sum())  # token-weighted, as over a whole split
    loader = DataLoader(data, batch_size=12)
    assert detect_task(module, next(iter(loader)))[0] == "language_model"
    result = evaluate(module, loader, "language_model")
    assert result["val_tokens"] == int(counts.sum())
    assert result["val_loss"] == pytest.approx(expected, abs=ATOL)  # summation order only: see ATOL
