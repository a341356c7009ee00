"""Distilling sentence embeddings on the real all-MiniLM-L6-v2 (22.7M parameters, offline): the
student's encoder output against the teacher's, mean-pooled over the real tokens (a sentence
embedding) or per token, with the cosine or MSE, configured as YAML would give it, on the unchanged
``demos.modules.SentenceEncoder`` (whose ``training_step`` calls ``self.model`` twice: anchors and
positives; both calls are distilled)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_lm_distillation import FirstStep, quiet_trainer

from lightning_slim import KnowledgeDistillation
from lightning_slim.demos import pretrained, text
from lightning_slim.demos.modules import SentenceEncoder
from lightning_slim.pruning.depth import keep_layers

pytestmark = [
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
    # the student stays in eval mode as from_pretrained returns it (no dropout: the step is comparable by hand)
    pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode"),
]

CONFIG = """
alpha: 0.0            # no logits: a sentence encoder has none
features:
  pairs: {{model: ""}}  # the student's BertModel -> the teacher itself (a BertModel)
  loss: {loss}
  pooling: {pooling}
cache_teacher: true
"""


def by_hand(student, teacher, ids, mask, loss: str, pooling: str) -> torch.Tensor:
    """The feature term for one call of the encoder, written out."""
    s = student(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.unsqueeze(-1).float()
    if pooling == "mean":
        s, t = (s * real).sum(1) / real.sum(1), (t * real).sum(1) / real.sum(1)
        return F.mse_loss(s, t) if loss == "mse" else 1 - F.cosine_similarity(s, t, dim=-1).mean()
    per_token = (s - t).pow(2).mean(-1) if loss == "mse" else 1 - F.cosine_similarity(s, t, dim=-1)
    return (per_token * mask).sum() / mask.sum()


@pytest.fixture(scope="module")
def minilm():
    return pretrained.load_minilm()  # loaded once; every case copies it (KD freezes its teacher in place)


@pytest.mark.parametrize("loss,pooling", [("cosine", "mean"), ("mse", "token")])
def test_sentence_embedding_distillation_on_minilm(minilm, loss, pooling):
    torch.set_num_threads(1)
    teacher, student, tokenizer = copy.deepcopy(minilm[0]), copy.deepcopy(minilm[0]), minilm[1]
    keep_layers(student, [0, 2, 4])  # a student cut out of its teacher: half the layers
    initial = copy.deepcopy(student)
    kd = KnowledgeDistillation(teacher=teacher, **yaml.safe_load(CONFIG.format(loss=loss, pooling=pooling)))
    recorder = FirstStep()
    module = SentenceEncoder(student)
    data = text.pair_datamodule(tokenizer, max_length=32, batch_size=4, limit={"train": 8, "val": 4, "test": 4})
    trainer = quiet_trainer([kd, recorder], log_every_n_steps=1)
    trainer.fit(module, datamodule=data)

    b = recorder.batch
    calls = [(b["input_ids"], b["attention_mask"]), (b["positive_input_ids"], b["positive_attention_mask"])]
    assert any(not m.all() for _, m in calls)  # padding is there, and pooled over only where it is real
    # both of training_step's calls of the encoder were distilled: anchors and positives
    feature = torch.stack([by_hand(initial, teacher, ids, mask, loss, pooling) for ids, mask in calls]).mean()
    logged = float(trainer.callback_metrics["slim/distillation/feature_loss"])
    # the fit and this hand computation run the same float32 kernels in another order: 1e-5 relative
    assert logged == pytest.approx(float(feature.detach()), rel=1e-5) and logged > 0
    assert kd.counts["teacher_examples"] == 8 and "slim/distillation/kd_loss" not in trainer.callback_metrics
    # the gradients are the module's own contrastive loss plus the feature term (alpha=0: loss unscaled)
    reference = SentenceEncoder(initial)
    task = reference._loss(b)
    total = task + torch.stack([by_hand(initial, teacher, ids, mask, loss, pooling) for ids, mask in calls]).mean()
    names = [n for n, p in initial.named_parameters()]
    want = torch.autograd.grad(total, list(initial.parameters()), allow_unused=True, retain_graph=True)
    plain = torch.autograd.grad(task, list(initial.parameters()), allow_unused=True)
    changed = 0
    for name, w, p in zip(names, want, plain):
        if w is None:
            continue
        # float32 reductions over a 384-wide hidden state, reassociated: 1e-4 relative, 1e-6 absolute
        torch.testing.assert_close(recorder.grads[f"model.{name}"], w, rtol=1e-4, atol=1e-6)
        # 'changed': the feature term moves a gradient by more than 1e-3 relative, 10x the reassociation noise above
        changed += not torch.allclose(w, p, rtol=1e-3, atol=1e-6)
    assert changed > len(names) // 2  # the feature term reaches most of the encoder
    # the teacher ran once per example and call; its pooled features were cached per call
    assert {"feat:", "feat:@1"} == set(kd.cache.values)
