"""Depth pruning: the kept layers are the teacher's own, the config says so (the model reloads from
it), the key/value cache still works, and the run of layers dropped is the one whose removal
costs least on the caller's loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_slim.pruning.depth import choose_layers, keep_layers, layer_stack

transformers = pytest.importorskip("transformers")


def llama(layers=4):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=3, n_head=2, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32
    )
    return transformers.BertForMaskedLM(cfg).eval()


@pytest.mark.parametrize("make", [llama, gpt2, bert], ids=["llama", "gpt2", "bert"])
def test_kept_layers_are_the_originals_and_the_model_reloads_from_its_config(make, tmp_path):
    model = make()
    _, layers = layer_stack(model)
    kept_modules = [layers[0], layers[-1]]
    changes = keep_layers(model, [len(layers) - 1, 0])  # any order: kept in the model's order
    assert changes["kept_layers"] == [0, len(layers) - 1] and changes["num_hidden_layers"] == 2
    assert list(layer_stack(model)[1]) == kept_modules
    assert model.config.num_hidden_layers == 2
    ids = torch.randint(0, 32, (2, 10))
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_generation_with_the_key_value_cache_matches_the_full_forward_after_dropping_layers():
    model = llama()
    keep_layers(model, [1, 3])  # the cache is indexed by layer: the kept layers must be renumbered
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    prompt = torch.randint(0, 32, (1, 5))
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_choose_layers_drops_the_cheapest_contiguous_run_and_leaves_the_model_alone():
    model = llama()
    ids = torch.randint(0, 32, (4, 12))
    with torch.no_grad():
        reference = model(input_ids=ids).logits.log_softmax(-1)

    def divergence(m):  # how far the smaller model's predictions move from the full model's
        with torch.no_grad():
            out = m(input_ids=ids).logits.log_softmax(-1)
        return float(torch.nn.functional.kl_div(out, reference, log_target=True, reduction="batchmean"))

    state = {k: v.clone() for k, v in model.state_dict().items()}
    kept, losses = choose_layers(model, 2, divergence)
    assert set(losses) == {"0-1", "1-2", "2-3"}  # every contiguous run of two layers tried
    cheapest = min(losses, key=losses.get)
    a, b = map(int, cheapest.split("-"))
    assert kept == [i for i in range(4) if not a <= i <= b]
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4  # measured in place, put back
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    assert model.state_dict().keys() == state.keys() and all(
        torch.equal(v, state[k]) for k, v in model.state_dict().items()
    )
    assert divergence(model) == 0
    trimmed = llama()
    keep_layers(trimmed, kept)
    # the same model, the same inputs, the same kernels (one process): the KL is recomputed identically, approx's
    # rel=1e-6 only absorbs float32 -> float conversion
    assert divergence(trimmed) == pytest.approx(losses[cheapest])


def test_transformer_encoder_layers_are_found_and_bad_indices_fail_with_the_allowed_range():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    keep_layers(encoder, [2])
    assert encoder.num_layers == 1 and len(encoder.layers) == 1
    with pytest.raises(ValueError, match=r"keep=\[0, 0\] must name distinct layers in 0..3"):
        keep_layers(llama(), [0, 0])
    with pytest.raises(ValueError, match=r"keep=4 must be between 1 and 3"):
        choose_layers(llama(), 4, lambda m: 0.0)
    with pytest.raises(ValueError, match="has no list of transformer layers"):
        layer_stack(nn.Sequential(nn.Linear(4, 4)))


def test_per_layer_attention_types_follow_the_kept_layers_and_are_restored_after_choosing():
    cfg = transformers.Qwen2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        use_sliding_window=True,
        sliding_window=4,
    )
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    original = list(model.config.layer_types)
    choose_layers(model, 2, lambda m: float(m.config.num_hidden_layers))
    assert model.config.layer_types == original and model.config.num_hidden_layers == 4
    keep_layers(model, [1, 2])
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert torch.isfinite(model(input_ids=torch.randint(0, 32, (1, 6))).logits).all()
