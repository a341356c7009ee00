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
from lightning_slim.distillation.term import kd_mask
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


class FirstStep(pl.Callback):
    """The first training batch (a dict) and the gradients of the first optimizer step, by parameter name."""

    def __init__(self):
        self.batch = self.grads = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = self.batch or {k: v.clone() for k, v in batch.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def quiet_trainer(callbacks, **kwargs) -> pl.Trainer:
    """One step (by default) of a quiet CPU fit that trains only."""
    args = dict(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(callbacks=callbacks, **{**args, **kwargs})


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
    # the same masked KL computed two ways in float32 (40 classes, 46 counted rows averaged, values ~1): a few ulps of
    # ~1, i.e. ~1e-7; atol 1e-6 (plus allclose's rtol 1e-5) holds on any CPU
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
        # an exact identity (KL = top-k part + tail mass * tail KL) evaluated in float32 through log-ratios of
        # renormalised tails, values ~10 (3x-scaled logits, T^2 = 4): ~10 * 40 * 2**-24 = 2e-5 of rounding; 1e-4 leaves
        # 4x, and dropping the tail term moves the sum by >= 1e-2
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


# --- the real SmolLM2-135M-Instruct (slow_real: a load, two short steps and a hand computation) -----------
class RealWindows(Dataset):
    """Four 32-token windows of Python's documentation (training split) as the demo's CausalLM batches,
    with right padding (row 1 after 20 tokens: attention 0, labels -100) and a 5-token prompt whose
    labels are -100 (row 0)."""

    def __init__(self, tokenizer):
        from lightning_slim.demos import text

        self.ids = text.lm_windows(tokenizer, "train", 32)[:4].clone()
        self.attention = torch.ones_like(self.ids)
        self.attention[1, 20:] = 0
        self.labels = self.ids.masked_fill(self.attention == 0, -100)
        self.labels[0, :5] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.attention[i], "labels": self.labels[i], "index": i}


@pytest.mark.slow_real
@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")  # SmolLM2 as from_pretrained returns it
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")  # trains only
def test_smollm2_topk_cached_teacher_is_the_teacher_and_its_term_reaches_the_gradients():
    import copy

    from lightning_slim.demos import pretrained
    from lightning_slim.demos.modules import CausalLM
    from lightning_slim.pruning.depth import keep_layers

    torch.set_num_threads(1)
    teacher, tokenizer = pretrained.load_smollm2()
    student = copy.deepcopy(teacher)
    keep_layers(student, range(0, 30, 3))  # a 10-layer student cut out of the 30-layer teacher
    initial = copy.deepcopy(student)
    alpha, temperature, k = 0.5, 2.0, 16
    kd = KnowledgeDistillation(teacher=teacher, alpha=alpha, temperature=temperature, cache_teacher={"top_k": k})
    first = FirstStep()
    data = RealWindows(tokenizer)
    quiet_trainer([kd, first], max_steps=2).fit(CausalLM(student, lr=1e-5), DataLoader(data, batch_size=2))

    # the teacher ran once per window; its cached top-k is a fresh forward's top-k (same 2-row batches)
    assert kd.counts["teacher_examples"] == 4 and kd.student_path == "model"
    for rows in (torch.tensor([0, 1]), torch.tensor([2, 3])):
        with torch.no_grad():
            fresh = teacher(input_ids=data.ids[rows], attention_mask=data.attention[rows]).logits
        logp = F.log_softmax(fresh / temperature, -1)
        cached = kd.cache.lookup(rows)
        index = cached["topk_index"].long()
        # float16 storage: relative rounding 2^-11 of log-probabilities of magnitude < 30 -> within 0.02
        torch.testing.assert_close(cached["topk_logp"].float(), logp.gather(-1, index), rtol=0, atol=0.02)
        outside = logp.scatter(-1, index, float("-inf")).amax(-1)
        assert (cached["topk_logp"].float().amin(-1) >= outside - 0.02).all()  # nothing outside is larger
        tail = logp.scatter(-1, index, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(cached["tail_logp"], tail, rtol=0, atol=1e-4)  # float32, exact up to order
    # the first step trained on (1 - alpha) * the model's own loss + alpha * top-k KD on the positions
    # that loss counts: shifted by one, padding and -100 left out
    b = first.batch
    out = initial(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False)
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    nxt = torch.cat([b["labels"][:, 1:], torch.full((2, 1), -100)], 1)
    real_next = torch.cat([b["attention_mask"][:, 1:], torch.zeros(2, 1, dtype=torch.long)], 1)
    mask = (nxt != -100) & (b["attention_mask"] == 1) & (real_next == 1)
    assert int(mask.sum()) == (31 - 4) + (20 - 1)  # row 0: targets 1-4 are the prompt; row 1: padding
    term = topk_soft_target_loss(out.logits, teacher_topk(t, k, temperature), temperature, mask)
    params = list(initial.parameters())
    want = torch.autograd.grad((1 - alpha) * out.loss + alpha * term, params, retain_graph=True)
    plain = torch.autograd.grad(out.loss, params)
    flat = lambda grads: torch.cat([g.flatten() for g in grads])
    got = flat(first.grads[f"model.{n}"] for n, _ in initial.named_parameters())
    want, plain = flat(want), (1 - alpha) * flat(plain)
    # float32 gradients of a 10-layer model computed twice in another order: relative error ~1e-6, bound 1e-4
    assert float((got - want).norm() / want.norm()) < 1e-4
    # the KD term is a large part of the update (the student is far from its teacher after the cut)
    assert float((got - plain).norm() / got.norm()) > 0.1
    assert kd.report_rows()["token_fraction_distilled"] < 1.0
