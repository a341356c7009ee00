"""Activation importance and the student cut (lightning_slim.pruning.activations / student): the
scores see what weight magnitude misses (a channel with small weights and a large activation),
measure the right heads and layers, and the cut student holds the asked share of non-embedding
parameters, reloads and generates."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_slim.pruning.activations import activation_importance, weight_importance
from lightning_slim.pruning.depth import angular_distances, choose_layers_by_angle
from lightning_slim.pruning.student import StudentShape, cut, cut_student, nonembedding_parameters, shapes_at
from lightning_slim.pruning.width import keep_mlp_channels

transformers = pytest.importorskip("transformers")

VOCAB = 48


def llama(layers: int = 4, hidden: int = 32, width: int = 64, heads: int = 4, kv: int = 2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def calibration(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=g)} for _ in range(n)]


def kl_to(reference, model, batches) -> float:
    """Mean KL(reference || model) per token over ``batches``: how far the cut moved the predictions."""
    total = 0.0
    with torch.no_grad():
        for b in batches:
            p = reference(**b).logits.log_softmax(-1)
            q = model(**b).logits.log_softmax(-1)
            total += float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean())
    return total / len(batches)


def test_activation_importance_keeps_a_large_activation_channel_that_weight_magnitude_drops():
    # a "massive activation" as in pretrained LLMs: residual dimension 5 is scaled up 60x by the MLP's
    # input norm, and only channel 7 reads it, with weights far smaller than every other channel's
    model = llama(layers=1)
    mlp, norm = model.model.layers[0].mlp, model.model.layers[0].post_attention_layernorm
    with torch.no_grad():
        norm.weight[5] = 60.0
        mlp.gate_proj.weight[:, 5] = 0
        mlp.up_proj.weight[:, 5] = 0
        mlp.gate_proj.weight[7] = 0
        mlp.up_proj.weight[7] = 0
        mlp.gate_proj.weight[7, 5] = mlp.up_proj.weight[7, 5] = 0.05
        mlp.down_proj.weight[:, 7] *= 0.5
    batches = calibration()
    acts, weights = activation_importance(model, batches), weight_importance(model)
    path = "model.layers.0.mlp"
    assert int(weights.mlp[path].argmin()) == 7  # the smallest weights of all 64 channels ...
    assert int(acts.mlp[path].argmax()) == 7  # ... and the largest activation

    by_activation, by_weight = copy.deepcopy(model), copy.deepcopy(model)
    kept_a = keep_mlp_channels(by_activation, 32, acts.mlp)["kept_channels"][path]
    kept_w = keep_mlp_channels(by_weight, 32, weights.mlp)["kept_channels"][path]
    assert 7 in kept_a and 7 not in kept_w
    # and it matters: the activation cut stays closer to the full model's predictions
    assert kl_to(model, by_activation, batches) < 0.5 * kl_to(model, by_weight, batches)


def test_head_scores_are_per_query_head_and_a_silent_group_goes_first():
    model = llama(layers=2)
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        attn.v_proj.weight[8:16] = 0  # key/value group 1 (query heads 2 and 3) outputs nothing
    scores = activation_importance(model, calibration()).heads["model.layers.1.self_attn"]
    assert scores.shape == (4,)
    assert torch.all(scores[2:] == 0) and torch.all(scores[:2] > 0)
    from lightning_slim.pruning.width import keep_heads

    assert keep_heads(model, 1, 2, {p: s for p, s in activation_importance(model, calibration()).heads.items()})[
        "kept_heads"
    ]["model.layers.1.self_attn"] == [0, 1]


def test_layers_that_leave_the_residual_stream_unchanged_are_the_ones_dropped():
    model = llama(layers=5)
    with torch.no_grad():
        for i in (2, 3):  # identity layers: nothing is added to the residual stream
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    sim = activation_importance(model, calibration()).similarity
    assert sim.shape == (6, 6)
    # cosine of a state with itself is 1 (float32 normalisation: within 1e-5)
    torch.testing.assert_close(sim.diagonal(), torch.ones(6), atol=1e-5, rtol=0)
    distances = angular_distances(sim, 2)
    # layers 2 and 3 add exactly 0 (zeroed output projections), so their cosine is the diagonal's, 1 - d with d <= 1e-5;
    # arccos(1 - d) / pi <= sqrt(2d) / pi = 1.4e-3 < 1e-2 on any CPU; a real layer moves it > 0.05
    assert distances["2-3"] < 1e-2 and min(v for k, v in distances.items() if k != "2-3") > 0.05
    kept, _ = choose_layers_by_angle(sim, 3)
    assert kept == [0, 1, 4]


def test_the_cut_student_holds_the_asked_share_of_nonembedding_parameters_and_reloads(tmp_path):
    teacher = llama(layers=4, hidden=32, width=64, heads=4, kv=2)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    total = nonembedding_parameters(teacher)
    # by hand: a layer holds 2 norms (64) + q,o (2 * 32 * 32) + k,v (2 * 32 * 16) + MLP (3 * 32 * 64)
    assert total == 4 * (64 + 2048 + 1024 + 6144) + 32
    batches = calibration()
    scores = activation_importance(teacher, batches)
    loss = lambda m: sum(float(m(**b, labels=b["input_ids"]).loss) for b in batches)
    student, report = cut_student(teacher, scores, 0.5, loss, depths=[4, 3], heads=[(2, 2), (1, 2), (2, 1)], multiple=8)

    params = nonembedding_parameters(student)
    # the MLP width is the free variable, in steps of 8 channels: the count is within half a step
    # (layers x 8 channels x 3 matrices x 32 / 2) of the asked one
    assert abs(params - 0.5 * total) <= report["layers"] * 8 * 3 * 32 / 2
    assert report["params_ratio"] == params / total
    assert report["loss"] == min(c["loss"] for c in report["candidates"]) and len(report["candidates"]) >= 4
    assert student.config.num_hidden_layers == report["layers"]
    assert student.config.num_key_value_heads == report["kv_heads"]
    assert student.config.num_attention_heads == report["kv_heads"] * report["queries_per_kv"]
    assert student.config.intermediate_size == report["intermediate_size"]
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())  # the teacher is untouched

    ids = batches[0]["input_ids"]
    student.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)
    cached = student.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = student.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_shapes_and_cut_refuse_what_they_cannot_make():
    teacher = llama()
    with pytest.raises(ValueError, match=r"ratio=1.5 must be in \(0, 1\)"):
        shapes_at(teacher, 1.5)
    with pytest.raises(ValueError, match=r"heads \(3, 1\) must be \(kv_heads in 1..2, queries_per_kv in 1..2\)"):
        shapes_at(teacher, 0.5, heads=[(3, 1)])
    with pytest.raises(ValueError, match="kept_layers has 4 layers; the shape asks for 3"):
        cut(teacher, StudentShape(3, 2, 2, 32), weight_importance(teacher), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="weight_importance does not measure"):
        cut_student(teacher, weight_importance(teacher), 0.5, lambda m: 0.0, depths=[3])


def test_weight_magnitude_scores_keep_the_channels_the_structured_path_keeps():
    """weight_importance is the baseline the card compares against: it must rank MLP channels as
    torch-pruning's MagnitudeImportance(p=2) does in the structured path (channel_prune)."""
    from lightning_slim.pruning.heads import transformer_plan
    from lightning_slim.pruning.structured import channel_prune

    ours, theirs = llama(layers=2), llama(layers=2)
    keep_mlp_channels(ours, 48, weight_importance(ours).mlp)
    roots, _, _ = transformer_plan(theirs, heads=False)
    modules = dict(theirs.named_modules())
    channel_prune(theirs, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}, [modules[r] for r in roots], 0.25)
    for a, b in zip(ours.model.layers, theirs.model.layers):
        assert torch.equal(a.mlp.down_proj.weight, b.mlp.down_proj.weight)
        assert torch.equal(a.mlp.gate_proj.weight, b.mlp.gate_proj.weight)
