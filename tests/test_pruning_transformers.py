"""Pruning on Hugging Face transformers as users bring them: tied output heads left out of the
targets (SmolLM2 and GPT-2 tie ``lm_head`` to the input embedding), transformers' ``Conv1D`` (GPT-2)
pruned structurally as the transposed Linear it is, and structural pruning of a Llama that slices
known blocks directly instead of tracing the model with torch-pruning."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_slim.pruning import IterativeMagnitudePruning, PruningCoverageWarning, slicing
from lightning_slim.pruning import functional as F
from lightning_slim.pruning import structured as S
from lightning_slim.pruning.heads import find_blocks, sync_configs
from lightning_slim.pruning.importance import calibrate, scores
from lightning_slim.pruning.tensors import select_tensors

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_llama(tied: bool = True, layers: int = 1, heads: int = 4, kv_heads: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(cfg)


class CausalLM(pl.LightningModule):
    """A user's module: ``self.model(**batch).loss``, no ``forward``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def token_loader(n: int = 8, length: int = 16, batch_size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size)


def fit(model, callback, steps: int = 2):
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(CausalLM(model), token_loader())
    return trainer


WANDA_24 = dict(schedule={"kind": "one_shot", "sparsity": 0.5, "at": 1, "unit": "step"}, pattern="2:4")


def test_a_tied_output_head_stays_dense_by_default_and_an_info_line_says_so(caplog):
    model = tiny_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cb = IterativeMagnitudePruning(importance="wanda", accuracy_metric=None, **WANDA_24)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("error", PruningCoverageWarning)  # leaving the embedding dense is no warning
        fit(model, cb)
    assert cb.round == 1 and "model.lm_head" not in cb.masks
    assert bool((model.model.embed_tokens.weight != 0).all()), "the input embedding lost entries"
    q = model.model.layers[0].self_attn.q_proj.weight
    assert (q == 0).float().mean().item() == 0.5  # the layers themselves are 2:4
    assert cb.report_rows()["untouched"]["model.model.embed_tokens.weight"] == "tied output head model.lm_head"
    said = [r.getMessage() for r in caplog.records if "lm_head shares its weight" in r.getMessage()]
    assert said and "model.model.embed_tokens" in said[0] and "targets" in said[0]


def test_a_tied_output_head_named_explicitly_is_pruned_with_its_embedding_and_warned():
    model = tiny_llama(tied=True)
    cb = IterativeMagnitudePruning(targets=["Linear", "model.lm_head"], accuracy_metric=None, **WANDA_24)
    with pytest.warns(PruningCoverageWarning, match=r"model.lm_head is shared with model.model.embed_tokens"):
        fit(model, cb)
    assert "model.lm_head" in cb.masks
    assert (model.model.embed_tokens.weight == 0).float().mean().item() == 0.5


def test_the_functional_default_targets_leave_a_tied_head_out_and_an_untied_one_in():
    tied, untied = tiny_llama(tied=True), tiny_llama(tied=False)
    assert "lm_head" not in F.prune(tied, 0.5, pattern="2:4")
    assert bool((tied.model.embed_tokens.weight != 0).all())
    assert "lm_head" in F.prune(untied, 0.5, pattern="2:4")  # a head of its own is an ordinary layer


# --- structural pruning by slicing known blocks -------------------------------------------------------
# Each model gets some of its units (attention heads, or key/value groups; MLP channels) made dead by
# hand: every weight (and bias) that writes or reads them is zeroed, with index arithmetic written here
# independently of lightning_slim.pruning.slicing. Dead units score 0 by magnitude, so pruning exactly
# that fraction must remove them and no others, and the logits must not change: any wrong axis, offset
# or head order would change them (or break the shapes).
DEAD_HEADS, DEAD_CHANNELS = [1, 3], [0, 5, 6, 11, 17, 20, 30, 47]  # of 4 heads / groups, of 48 channels


def kill_llama(model, group: int):
    hd = model.config.head_dim
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for u in DEAD_HEADS:  # unit u: key/value head u and the `group` query heads that read it
            q, kv = slice(u * group * hd, (u + 1) * group * hd), slice(u * hd, (u + 1) * hd)
            a.q_proj.weight[q] = 0
            a.k_proj.weight[kv] = 0
            a.v_proj.weight[kv] = 0
            a.o_proj.weight[:, q] = 0
        m.gate_proj.weight[DEAD_CHANNELS] = 0
        m.up_proj.weight[DEAD_CHANNELS] = 0
        m.down_proj.weight[:, DEAD_CHANNELS] = 0


def kill_gpt2(model):
    hd, width = model.config.n_embd // model.config.n_head, model.config.n_embd
    for block in model.transformer.h:
        a, m = block.attn, block.mlp
        for h in DEAD_HEADS:  # c_attn's outputs are [query | key | value], each head_dim per head
            for offset in (0, width, 2 * width):
                cols = slice(offset + h * hd, offset + (h + 1) * hd)
                a.c_attn.weight[:, cols] = 0  # Conv1D weights are [in, out]
                a.c_attn.bias[cols] = 0
            a.c_proj.weight[h * hd : (h + 1) * hd] = 0
        m.c_fc.weight[:, DEAD_CHANNELS] = 0
        m.c_fc.bias[DEAD_CHANNELS] = 0  # gelu(0) = 0: the channel then carries nothing
        m.c_proj.weight[DEAD_CHANNELS] = 0


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "llama_gqa", "gpt2"])
def test_slicing_removes_exactly_the_dead_heads_and_channels_and_keeps_the_logits(arch):
    if arch == "gpt2":
        model, kill = tiny_gpt2(), kill_gpt2
    else:
        heads = 8 if arch == "llama_gqa" else 4  # 8 query heads over 4 key/value heads: groups of 2
        model = tiny_llama(tied=False, layers=2, heads=heads, kv_heads=4).eval()
        kill = lambda m: kill_llama(m, heads // 4)
    with torch.no_grad():
        kill(model)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    roots = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "c_attn")]
    roots += [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("up_proj", "c_fc")]
    # (heads.py refuses grouped-query attention for head pruning; the slicer itself cuts whole groups)
    cuts = (
        [slicing.block_cut(model, b) for b in find_blocks(model)] if arch == "llama_gqa" else slicing.cuts(model, roots)
    )
    assert len(cuts) == 4  # 2 layers x (attention, MLP)
    heads_kept = slicing.prune(model, [c for c in cuts if c.kind == "heads"], 0.5)
    channels_kept = slicing.prune(model, [c for c in cuts if c.kind == "mlp"], len(DEAD_CHANNELS) / 48)
    assert all(k.tolist() == [0, 2] for k in heads_kept.values())
    assert all(k.tolist() == sorted(set(range(48)) - set(DEAD_CHANNELS)) for k in channels_kept.values())
    changes = sync_configs(model)
    # the same dot products without their zero terms: float32 sums over <= 48 terms regrouped, far below 1e-5
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    if arch == "gpt2":
        assert changes == {"n_inner": 40, "reloadable": False}  # its config cannot hold 2 heads of size 8
    else:
        assert changes["num_attention_heads"] == heads // 2 and changes["num_key_value_heads"] == 2
        assert changes["intermediate_size"] == 40 and changes["reloadable"]


def test_a_pruned_gpt2_reloads_from_its_structure_with_the_same_logits():
    model = tiny_gpt2()
    roots = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "mlp.c_fc")]
    slicing.prune(model, slicing.cuts(model, roots), 0.5)
    sync_configs(model)
    fresh = restructure_into(tiny_gpt2(seed=1), model)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    assert fresh.transformer.h[0].attn.num_heads == 2 and fresh.transformer.h[0].attn.split_size == 16
    # exact: the same weights in the same shapes on the same CPU run the same kernels in the same order
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def restructure_into(fresh, pruned):
    S.restructure(fresh, S.structure_of(pruned))
    fresh.load_state_dict(pruned.state_dict())
    return fresh.eval()


def test_structural_pruning_of_a_llama_in_a_trainer_slices_and_never_traces(monkeypatch):
    """The callback prunes heads and MLP channels of a Llama without torch-pruning's graph tracing
    (which took minutes on a 30-layer model): tracing is made to fail here, and the fit still prunes."""
    import torch_pruning as tp

    def no_tracing(*args, **kwargs):
        raise AssertionError("torch-pruning traced a transformer")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", no_tracing)
    model = tiny_llama(tied=True, layers=2)
    cb = IterativeMagnitudePruning({"kind": "one_shot", "sparsity": 0.5, "at": 1, "unit": "step"}, pattern="channels")
    fit(model, cb, steps=3)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 16 and model.config.num_attention_heads == 2
    assert model.model.layers[1].mlp.down_proj.in_features == 24 == model.config.intermediate_size
    # half the heads and channels removed: a ratio of integer sizes, rounding only
    assert cb.report_rows()["sparsity"] == pytest.approx(0.5)
    with pytest.raises(AssertionError, match="traced"):  # the CNN path still traces (the patch is live)
        S.dependency_graph(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2))


def test_wanda_on_conv1d_scores_each_weight_by_the_norm_of_the_input_it_multiplies():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 8))  # weight [in=8, out=6]
    targets = select_tensors(model)
    x = torch.randn(5, 8) * torch.arange(1, 9)  # inputs of very different scales
    stats = calibrate(model, targets, [x])
    by_hand = model[0].weight.detach().abs().t() * x.pow(2).mean(0).sqrt()  # (outputs, inputs)
    # |W| * input RMS over 5 rows: elementwise products and a 5-term mean, a few ulps: float32 defaults hold
    torch.testing.assert_close(scores(model, targets, "wanda", stats)["0"], by_hand)
    keep = F.compute_masks(model, targets, 0.5, pattern="2:4", importance="wanda", stats=stats)["0"]
    assert keep.shape == (8, 6)  # the Conv1D's own layout
    for o in range(6):  # per output, in each group of 4 consecutive inputs (weight dim 0), the 2 best
        for g in range(2):
            kept = torch.nonzero(keep[4 * g : 4 * g + 4, o]).flatten().tolist()
            assert set(kept) == set(by_hand[o, 4 * g : 4 * g + 4].topk(2).indices.tolist())


@pytest.mark.slow_real
def test_wanda_2to4_on_real_smollm2_keeps_its_tied_embedding_and_most_of_its_quality():
    """SmolLM2-135M ties lm_head to its input embedding. 2:4 by default leaves that table dense;
    named explicitly, the head is pruned with the embedding (the issue measured perplexity 23.4 -> 274
    then). On the same validation windows, calibrated on the same training windows, the default cut
    must be far better than the one through the embedding."""
    import copy
    import math

    from lightning_slim.demos import pretrained, text

    model, tok = pretrained.load_smollm2()
    calibration, val = text.lm_windows(tok, "train", 128)[:4], text.lm_windows(tok, "val", 128)[:4]
    loss = lambda m: m(input_ids=val, labels=val, use_cache=False).loss.item()

    def wanda_24(m, targets=None):
        chosen = select_tensors(m, targets)
        stats = calibrate(m, chosen, [{"input_ids": calibration, "use_cache": False}])
        return F.prune(m, 0.5, pattern="2:4", importance="wanda", targets=targets, stats=stats)

    with torch.no_grad():
        dense = loss(model)
        through_head = copy.deepcopy(model)
        embedding = model.model.embed_tokens.weight.clone()  # ~1% exact zeros of its own (dequantized Q4_1)
        masks = wanda_24(model)
        assert "lm_head" not in masks and torch.equal(model.model.embed_tokens.weight, embedding)
        default = loss(model)
        wanda_24(through_head, ["Linear", "lm_head"])
        assert (through_head.model.embed_tokens.weight == 0).float().mean().item() >= 0.5
        embedding_pruned = loss(through_head)
    # perplexities on 4 windows (about 500 tokens): dense about 23; each bound is a factor of >= 2
    # from what was measured here (dense 3.1 nats, default cut ~4.6, through the embedding ~6.2 nats)
    assert math.exp(dense) < 40 and default < embedding_pruned - 0.7, (dense, default, embedding_pruned)
