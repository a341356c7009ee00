"""The distillation column of the zoo matrix: KnowledgeDistillation on every zoo model, the teacher a
second copy of the same architecture (other random weights), called the way the user's
``training_step`` calls the student (``input_ids`` / ``attention_mask`` / ``pixel_values`` keywords,
``(x, y)`` tuples, dict batches).

Evidence that the KD term is in the gradients: one training step from the same student weights on the
same batch gives bit-identical gradients with the same teacher twice, and different gradients with a
different teacher (only the KD term sees the teacher). The KD loss is logged, finite and positive.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_slim import KnowledgeDistillation
from zoo.models import ZOO, available, build

# what each cell's report must say about the tokens it distilled (language models: the HF causal LMs
# shift their labels, so the last position of each window has no target and is left out)
TOKEN_FRACTION = {"char_transformer": 1.0, "llama": 31 / 32, "gpt2": 31 / 32}


class Gradients(pl.Callback):
    """The gradients of the first optimizer step, and the logged KD loss."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] | None = None
        self.kd_loss: float | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            logged = trainer.callback_metrics.get("slim/distillation/kd_loss")
            self.kd_loss = None if logged is None else float(logged)


def first_step(name: str, teacher_seed: int) -> tuple[dict[str, torch.Tensor], KnowledgeDistillation, Gradients]:
    built = build(name, seed=0)
    cb = KnowledgeDistillation(teacher=build(name, seed=teacher_seed).module, alpha=0.5, temperature=2.0)
    probe = Gradients()
    pl.seed_everything(0, verbose=False)  # the same dropout masks in every run
    pl.Trainer(
        max_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[cb, probe],
    ).fit(built.module, datamodule=built.data)
    return probe.grads, cb, probe


@pytest.mark.parametrize("name", list(ZOO))
def test_distillation_cell(name):
    if not available(name):
        pytest.skip(f"{ZOO[name].requires} cannot be imported here")
    torch.set_num_threads(1)
    same_a, cb, probe = first_step(name, teacher_seed=1)
    same_b, _, _ = first_step(name, teacher_seed=1)
    other, _, _ = first_step(name, teacher_seed=2)
    assert same_a and same_a.keys() == other.keys()
    for key in same_a:
        assert torch.equal(same_a[key], same_b[key]), f"{key}: the step is not deterministic"
    # 'changed': moved by more than float32 noise (rtol 1e-5); the step is deterministic (asserted above), so the
    # tolerance only keeps an ulp-level echo of the teacher from counting as its effect
    changed = [k for k in same_a if not torch.allclose(same_a[k], other[k], rtol=1e-5, atol=1e-8)]
    # the teacher's soft targets reach the student's output layer and everything below it
    assert len(changed) >= 0.5 * len(same_a), f"only {changed} of {list(same_a)} changed with the teacher"
    assert probe.kd_loss is not None and 0 < probe.kd_loss < float("inf")
    rows = cb.report_rows()
    assert rows["teacher_passes"] == 1 and rows["student_examples"] == rows["teacher_examples"] > 0
    if name in TOKEN_FRACTION:
        # a ratio of integer token counts: exact up to float rounding (default rel=1e-6)
        assert rows["token_fraction_distilled"] == pytest.approx(TOKEN_FRACTION[name])
