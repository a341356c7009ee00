"""Distillation for language models: the teacher gets the student's exact call, token KD counts only
real, labelled positions (with the causal shift), and the top-k teacher cache is the full-logit loss
minus a tail term that is known in closed form."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader, Dataset
from zoo.models import VOCAB, HFCausalLM, text_windows

from lightning_slim import KnowledgeDistillation
from lightning_slim.distillation import functional as kd
from lightning_slim.distillation.configs import TokenMask
from lightning_slim.distillation.preflight import kd_mask
from lightning_slim.distillation.topk import full_kl, teacher_topk, topk_soft_target_loss

SEQ, ROWS = 16, 48


def llama(hidden: int, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        use_cache=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg)


class PaddedWindows(Dataset):
    """Byte windows of the standard library's sources; every third row is right-padded (attention 0,
    labels -100) after 10 tokens and every row ignores its first label (a prompt)."""

    def __init__(self):
        self.ids = text_windows(SEQ)[:ROWS, :SEQ].clone()
        self.attention = torch.ones_like(self.ids)
        self.attention[::3, 10:] = 0
        self.labels = self.ids.masked_fill(self.attention == 0, -100)
        self.labels[:, 0] = -100

    def __len__(self):
        return ROWS

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.attention[i], "labels": self.labels[i], "index": i}


def counted_positions(data: PaddedWindows) -> torch.Tensor:
    """By hand: position t predicts labels[t + 1], counted when that label is kept and both tokens are real."""
    nxt = torch.cat([data.labels[:, 1:], torch.full((ROWS, 1), -100)], 1)
    real_next = torch.cat([data.attention[:, 1:], torch.zeros(ROWS, 1, dtype=torch.long)], 1)
    return (nxt != -100) & (data.attention == 1) & (real_next == 1)


def test_topk_loss_is_the_full_loss_minus_the_teacher_tail_term():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 40, generator=g), 3 * torch.randn(3, 7, 40, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    temperature = 2.0
    full = full_kl(s, t, temperature, mask)
    assert torch.allclose(full, kd.soft_target_loss(s, t, temperature, mask), atol=1e-6)
    previous = torch.tensor(0.0)
    for k in (1, 4, 16, 39):
        cached = teacher_topk(t, k, temperature, dtype=torch.float32)
        topk = topk_soft_target_loss(s, cached, temperature, mask)
        # the KL chain rule: full = top-k buckets + p_rest * KL(p_tail || q_tail), each times T^2
        tail = torch.ones_like(t, dtype=torch.bool).scatter(-1, cached["topk_index"].long(), False)
        p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
        p_rest = (p * tail).sum(-1)
        p_tail, q_tail = p * tail / p_rest[..., None], q * tail / (q * tail).sum(-1, keepdim=True)
        kl_tail = torch.where(tail, p_tail * (p_tail.log() - q_tail.log()), 0).sum(-1)
        tail_term = (p_rest * kl_tail * mask).sum() / mask.sum() * temperature**2
        assert torch.allclose(topk + tail_term, full, atol=1e-4), k
        assert topk <= full + 1e-5 and topk >= previous - 1e-5  # more buckets: closer to the full loss
        previous = topk
    with pytest.raises(ValueError, match="top_k=40 must be in"):
        teacher_topk(t, 40, temperature)


def test_token_kd_counts_only_real_labelled_positions_after_the_causal_shift():
    data = PaddedWindows()
    batch = {k: torch.stack([data[i][k] for i in range(6)]) for k in ("input_ids", "attention_mask", "labels")}
    student = llama(16, 0)
    mask = kd_mask(torch.zeros(6, SEQ, VOCAB), batch, batch, student, TokenMask())
    assert torch.equal(mask, counted_positions(data)[:6])
    assert not mask[:, -1].any() and not mask[0, 9:].any()  # the last position predicts nothing; padding
    # the KD term's gradient is exactly zero at every position it does not count
    s = torch.randn(6, SEQ, VOCAB, requires_grad=True)
    kd.soft_target_loss(s, torch.randn(6, SEQ, VOCAB), 2.0, mask).backward()
    counted = s.grad.abs().sum(-1) > 0
    assert torch.equal(counted, mask)
    # ignore_index and shift are the user's to set
    no_shift = kd_mask(torch.zeros(6, SEQ, VOCAB), batch, batch, student, TokenMask(shift="none"))
    assert torch.equal(no_shift, (batch["labels"] != -100) & (batch["attention_mask"] == 1))


def test_llama_student_distils_from_a_wider_llama_through_a_topk_cache(tmp_path):
    teacher = llama(48, 1).eval()
    seen: list[dict] = []
    forward = teacher.forward
    teacher.forward = lambda *a, **kw: (seen.append(kw), forward(*a, **kw))[1]
    callback = KnowledgeDistillation(teacher=teacher, alpha=0.5, temperature=2.0, cache_teacher={"top_k": 8})
    pl.seed_everything(0)
    module = HFCausalLM(llama(16, 0))
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
        limit_val_batches=1,
        callbacks=[callback],
    )
    data = PaddedWindows()
    trainer.fit(module, DataLoader(data, batch_size=12, shuffle=True), DataLoader(data, batch_size=24))
    # the teacher got the student's own call: input ids and attention mask, never the labels
    training_calls = [kw for kw in seen if len(kw.get("input_ids", ())) == 12]
    assert training_calls and all(set(kw) >= {"input_ids", "attention_mask"} for kw in training_calls)
    assert not any("labels" in kw for kw in seen)
    assert any(not kw["attention_mask"].all() for kw in training_calls)  # the padded rows' mask reached it
    # the cache: the teacher ran once per example over two epochs, storing 8 of 96 classes per token
    rows = callback.report_rows()
    assert rows["teacher_examples"] == ROWS and rows["student_examples"] == 2 * ROWS
    assert rows["cache_top_k"] == 8 and rows["cache_examples"] == ROWS
    assert rows["cache_bytes"] < rows["cache_bytes_full_logits"] / 4
    # the fraction of token positions distilled is the fraction the model's own loss counts
    assert rows["token_fraction_distilled"] == pytest.approx(float(counted_positions(data).float().mean()))
    assert torch.isfinite(trainer.callback_metrics["slim/distillation/kd_loss"])
