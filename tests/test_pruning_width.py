"""Width pruning of Llama-style transformers (lightning_slim.pruning.width): heads of grouped-query
attention removed group by group or within groups, MLP channels, each sliced so that the pruned model
computes exactly what the full model computes with those heads / channels silenced, with a config
that reloads with from_pretrained and a key/value cache that still generates."""

from __future__ import annotations

import pytest
import torch

from lightning_slim.pruning.width import attentions, keep_heads, keep_mlp_channels, mlps

transformers = pytest.importorskip("transformers")

VOCAB = 40


def model_of(kind: str, heads: int = 6, kv: int = 2, layers: int = 2, dtype=torch.float64):
    """A random-weight causal LM with grouped-query attention (``heads`` query heads, ``kv`` groups)."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=64,
        head_dim=8,  # not hidden_size / heads: pruning must keep it, not recompute it
    )
    config = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[kind](**common)
    if kind == "qwen2":
        config.attention_bias = True  # Qwen2 has q/k/v biases: they must be sliced with the rows
    model = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[kind](config)
    return model.to(dtype).eval()


def silenced(model, heads: dict[str, list[int]] | None = None, channels: dict[str, list[int]] | None = None):
    """The full model with the given query heads' o_proj columns / MLP channels' down_proj columns set
    to zero: what a correctly sliced model must compute."""
    with torch.no_grad():
        for path, removed in (heads or {}).items():
            attn = model.get_submodule(path)
            for h in removed:
                attn.o_proj.weight[:, h * attn.head_dim : (h + 1) * attn.head_dim] = 0
        for path, removed in (channels or {}).items():
            model.get_submodule(path).down_proj.weight[:, removed] = 0
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("kv_heads, per_group", [(1, 3), (2, 2), (1, 1)], ids=["drop-group", "within", "both"])
def test_heads_of_grouped_query_attention_are_removed_consistently(kind, kv_heads, per_group, tmp_path):
    model, reference = model_of(kind), model_of(kind)
    scores = {p: torch.rand(6, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(attentions(model))}
    changes = keep_heads(model, kv_heads, per_group, scores)

    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (kv_heads * per_group, kv_heads)
    assert model.config.head_dim == 8
    for path, kept in changes["kept_heads"].items():
        score = scores[path].reshape(2, 3)
        groups = score.sum(1).topk(kv_heads).indices.sort().values  # the groups of highest summed score
        expected = [int(g) * 3 + int(h) for g in groups for h in score[g].topk(per_group).indices.sort().values]
        assert kept == expected
        attn = model.get_submodule(path)
        assert attn.q_proj.out_features == kv_heads * per_group * 8 and attn.k_proj.out_features == kv_heads * 8
        assert attn.num_key_value_groups == per_group

    removed = {p: [h for h in range(6) if h not in kept] for p, kept in changes["kept_heads"].items()}
    ids = torch.randint(0, VOCAB, (2, 9))
    # float64: the two computations differ only by summation order over the silenced terms (exact zeros)
    # and matmul shapes; 1e-10 bounds float64 reassociation at these sizes (~1e-15 relative per op)
    torch.testing.assert_close(logits(model, ids), logits(silenced(reference, heads=removed), ids), atol=1e-10, rtol=0)

    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert torch.equal(logits(reloaded, ids), logits(model, ids))

    prompt = ids[:1, :4]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_mlp_channels_kept_are_the_highest_scoring_and_the_rest_are_silenced(tmp_path):
    model, reference = model_of("llama"), model_of("llama")
    scores = {p: torch.randn(32, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(mlps(model))}
    changes = keep_mlp_channels(model, 12, scores)
    assert model.config.intermediate_size == 12
    for path, kept in changes["kept_channels"].items():
        assert kept == sorted(scores[path].topk(12).indices.tolist())
    removed = {p: [c for c in range(32) if c not in kept] for p, kept in changes["kept_channels"].items()}
    ids = torch.randint(0, VOCAB, (2, 9))
    # float64, as above: the sliced model only leaves out exact-zero terms
    torch.testing.assert_close(
        logits(model, ids), logits(silenced(reference, channels=removed), ids), atol=1e-10, rtol=0
    )
    model.save_pretrained(tmp_path)
    assert torch.equal(
        logits(type(model).from_pretrained(tmp_path, dtype=torch.float64).eval(), ids), logits(model, ids)
    )


def test_bad_counts_and_scores_fail_with_the_allowed_values():
    model = model_of("llama")
    scores = {p: torch.ones(6) for p in attentions(model)}
    with pytest.raises(ValueError, match=r"kv_heads=3 must be an integer in 1..2 \(the model has 6 query heads in 2"):
        keep_heads(model, 3, 1, scores)
    with pytest.raises(ValueError, match=r"queries_per_kv=0 must be an integer in 1..3"):
        keep_heads(model, 1, 0, scores)
    with pytest.raises(ValueError, match=r"width=33 must be an integer in 1..32"):
        keep_mlp_channels(model, 33, {})
    with pytest.raises(ValueError, match=r"attention head importance of 'model.layers.0.self_attn' has shape \(5,\)"):
        keep_heads(model, 1, 1, {p: torch.ones(5) for p in scores})
    with pytest.raises(ValueError, match="no MLP channel importance for 'model.layers.0.mlp'"):
        keep_mlp_channels(model, 4, {})
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="no Llama-style attention"):
        keep_heads(gpt2, 1, 1, {})


def test_the_structured_callback_path_points_grouped_query_attention_to_keep_heads():
    from lightning_slim.pruning.heads import find_blocks

    problems = {b.problem for b in find_blocks(model_of("llama")) if b.kind == "llama-attention"}
    assert len(problems) == 1 and "width.keep_heads" in problems.pop()
